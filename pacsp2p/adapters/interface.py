"""The role of an archive, as every adapter provides it (zope.interface, as in Tahoe-LAFS).

A capability the archive lacks is simply absent from ``capabilities``; callers route
around it. Every method is called from the reactor thread and returns a Deferred; the
adapter runs its blocking work in a thread pool.

Capabilities: ``store`` (keep a new instance), ``open`` (read one instance's bytes),
``send`` (the archive sends instances straight to a DICOM destination), ``crawl`` (list
what it holds, page by page: joining an archive that already holds studies),
``changes`` (follow what is added behind the cluster's back).
"""

from zope.interface import Attribute, Interface


class IArchive(Interface):
    name = Attribute("the archive's name from config (unique on its peer)")
    site = Attribute("an optional site label, for site-aware placement")
    capabilities = Attribute('frozenset of "store", "open", "send", "crawl", "changes"')

    def start():
        """Get ready (create directories, check the archive answers). Deferred."""

    def stop():
        """Release resources. Deferred or None."""

    def store(received, meta):
        """Keep the Part-10 file at path *received* byte-identical. Deferred[Stored]."""

    def discard(sop_instance_uid, sha256):
        """Drop a copy that was stored but never recorded (a failed replicated write)."""

    def open(sop_instance_uid, sha256=None):
        """Deferred[binary file] of one stored instance (Part-10, as received)."""

    def send(sop_instance_uids, destination):
        """Have the archive send these instances to *destination* (config.Destination)
        itself. Deferred[dict(completed, failed, warning, failed_uids)]."""

    def crawl(cursor, throttle):
        """One page of what the archive holds, from *cursor* (None: the beginning).

        Deferred[(items, next_cursor, total)] where items is a list of
        (InstanceMeta, size) and next_cursor is None after the last page; *total* is the
        number of instances expected overall, if known (for progress), else None.
        Call ``yield throttle()`` before every query sent to the archive, so crawling
        never starves its clinical traffic.
        """

    def changes(since, throttle):
        """What was added since *since* (None: from now on). Deferred[(items, since)]."""

    def health():
        """Deferred[dict]: up, latency_ms, free_bytes."""
