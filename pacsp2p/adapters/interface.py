"""The role of an archive, as every adapter provides it (zope.interface, as in Tahoe-LAFS).

A capability the archive lacks is simply absent from ``capabilities``; callers route
around it. Every method is called from the reactor thread and returns a Deferred; the
adapter runs its blocking work in a thread pool.
"""

from zope.interface import Attribute, Interface


class IArchive(Interface):
    name = Attribute("the archive's name from config (unique on its peer)")
    site = Attribute("an optional site label, for site-aware placement")
    capabilities = Attribute('frozenset of "store", "open", "send", "find", "changes"')

    def start():
        """Get ready (create directories, check the archive answers). Deferred."""

    def stop():
        """Release resources. Deferred or None."""

    def store(received, meta):
        """Keep the Part-10 file at path *received* byte-identical. Deferred[Stored]."""

    def open(sop_instance_uid, sha256=None):
        """Deferred[binary file] of one stored instance (Part-10, as received)."""

    def crawl():
        """Iterate (InstanceMeta, Stored) for everything held (blocking; run in a thread)."""

    def health():
        """Deferred[dict]: up, latency_ms, free_bytes."""
