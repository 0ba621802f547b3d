"""The role of an archive, as every adapter provides it (zope.interface, as in Tahoe-LAFS).

Every archive provides :class:`IArchive`. What else it can do is named in its
``capabilities`` and declared as one optional interface per capability
(``@implementer(IArchive, IStores, IOpens, ...)``); callers route on the capability
names, and a capability the archive lacks is simply absent. :func:`problems` checks an
archive against all of this (``zope.interface.verify.verifyObject``) when it is loaded.

Unless said otherwise a method is called from the reactor thread and returns a Deferred;
the adapter runs its blocking work in a thread pool of its own. ``IKeeps`` and ``IWalks``
are the exceptions: blocking, called from a thread.
"""

from zope.interface import Attribute, Interface
from zope.interface.exceptions import BrokenMethodImplementation, DoesNotImplement, Invalid
from zope.interface.verify import verifyObject


class IArchive(Interface):
    """What every archive provides."""

    name = Attribute("the archive's name from config (unique on its peer)")
    site = Attribute("an optional site label, for site-aware placement")
    capabilities = Attribute("frozenset of the capability names below (CAPABILITIES)")
    up = Attribute("whether the archive answered its last health check (True, False, "
                   "or None before the first); set by the peer's health loop")

    def start():
        """Get ready (thread pool, directories, check the archive answers). Deferred or
        None; a failure stops the peer with one line naming the archive."""

    def stop():
        """Release resources. Deferred or None."""

    def health():
        """Deferred[dict]: up, latency_ms, free_bytes (and error when down). Never fails
        for "down": answers ``up: False``."""


class IArchiveFactory(Interface):
    """What an adapter class provides: the ``pacsp2p.adapters`` entry point names it."""

    def from_config(cfg, settings, reactor, catalog=None):
        """The archive for one ``[[archives]]`` block (raises config.ConfigError).

        *catalog* provides ICatalogLookups (the peer's catalog seen through its declared
        read methods), or is None (a tool run without a catalog)."""


class ICatalogLookups(Interface):
    """What an adapter may ask the peer's catalog (``from_config``'s *catalog*): the
    declared read methods below, never its tables."""

    def hierarchy(sop_instance_uid):
        """Deferred[(study uid, series uid, SOP class uid, transfer syntax uid ("" if
        unknown)) or None]: where the instance sits, if the catalog knows it."""


class IStores(Interface):
    """Capability ``store``: new instances may be placed here."""

    def store(received, meta):
        """Keep the Part-10 file at path *received* byte-identical (the file stays the
        peer's). Deferred[types.Stored]: duplicate when the same data set was held
        already, conflict when another one with the same UID is."""

    def discard(sop_instance_uid, sha256):
        """Drop the copy with data set hash *sha256*, stored but never recorded (a
        failed replicated write). An archive that cannot delete logs and succeeds."""


class IStoresUnsynced(Interface):
    """Capability ``store_unsynced``: the ingest records an instance while the archive
    makes it durable, and answers the C-STORE after both."""

    def store_unsynced(received, meta):
        """Like ``store``, but fires once the copy is in place, before it is durable.
        Deferred[types.Stored]."""

    def sync(sop_instance_uid, stored):
        """Deferred that fires once the copy ``store_unsynced`` made is durable."""


class IKeeps(Interface):
    """Capability ``keep``: the ingest's one-job path (a peer alone with one archive).
    Blocking methods, called from the thread that received the data set."""

    def begin_flush(received, now=False):
        """Start making the file *received* durable; returns ``wait()``, which blocks
        until it is and raises OSError if it cannot be. *now*: make it durable before
        returning (the caller has nothing to do meanwhile)."""

    def keep(received, meta):
        """Keep *received* (the archive takes the file: it is gone afterwards).
        types.Stored; durable only once ``made_durable`` returns. An archive whose
        ``keep`` also takes ``fd`` (the file's open descriptor) and that has ``flusher``
        (the embedded one) may be given a file with no name yet (``unnamed``); any
        other is given a file with a name (``onejob.keeps_unnamed``)."""

    def made_durable(meta, stored, flushed):
        """Block until the copy ``keep`` made is durable (*flushed*: the ``wait`` of
        ``begin_flush``); raises OSError if it cannot be."""


class IOpens(Interface):
    """Capability ``open``: instances can be read back."""

    def open(sop_instance_uid, sha256=None):
        """Deferred[binary file at offset 0] of one instance: the Part-10 file, data set
        bytes as stored. *sha256* chooses among versions if several are kept (a
        conflicting version kept beside the first: that one, never another). Fails with
        KeyError (FileNotFoundError for files on disk) if the archive does not hold it."""


class IReadsMany(Interface):
    """Capability ``read_many``: small instances read whole, a batch in one job (a
    retrieval's thread hop per batch instead of two per instance)."""

    def read_many(items, limit, examined=True):
        """Deferred[list], one entry per (sop_instance_uid, sha256) of *items*, in order:
        ``(bytes, part10.examine of them or None if not Part-10)`` for a file of at most
        *limit* bytes (with *examined* False: ``(bytes, None)``, not examined, for a
        reader that checks them itself: the bulk channel's), the open file (as ``open``
        gives it) for a larger one, or the exception that stopped it
        (FileNotFoundError if the archive does not hold it)."""


class ISends(Interface):
    """Capability ``send``: the archive sends instances to a DICOM destination itself."""

    def send(sop_instance_uids, destination):
        """Deferred[dict(completed, failed, warning, failed_uids)]; *destination* is a
        config.Destination."""


class ICrawls(Interface):
    """Capability ``crawl``: list what the archive holds, page by page (joining an
    archive that already holds studies)."""

    crawl_qps = Attribute("queries per second the crawl may send the archive at most")

    def crawl(cursor, throttle):
        """One page from *cursor* (None: the beginning).

        Deferred[(items, next_cursor, total)]: items is a list of (InstanceMeta, size);
        next_cursor is None after the last page; total is the number of instances
        expected overall if known, else None. ``yield throttle()`` before every query
        sent to the archive, so crawling never starves its clinical traffic.
        """


class IFollows(Interface):
    """Capability ``changes``: follow what is added behind the cluster's back."""

    def changes(since, throttle):
        """What was added since *since* (None: from now on). Deferred[(items, since)]."""


class IDeletes(Interface):
    """Capability ``delete``: instances can be removed for good (a cluster-wide delete:
    ``pacsp2p delete``, an IOCM rejection note). An archive without it keeps what the
    cluster deletes: the instance is hidden from the view and listed in ``pacsp2p
    status`` as retained by that archive."""

    def delete(sop_instance_uid, sha256):
        """Remove the copy of *sop_instance_uid* whose data set hashes to *sha256*, or
        every copy of that UID when *sha256* is empty. Deferred[int]: the copies removed
        (0 when none was held: not an error)."""


class IWalks(Interface):
    """Capability ``walk``: list every copy held, blocking (``pacsp2p catalog rebuild``
    of the archive the peer itself writes to)."""

    def walk(skipped=None):
        """Iterator of (InstanceMeta, types.Stored), one per copy held; a file held that
        cannot be read as an instance is told to *skipped(path, reason)*, if given."""


class IVerifies(Interface):
    """Capability ``verify``: the archive checks its own copies against the catalog's
    hashes where they are, without sending them anywhere (a scrub; ``transfer.scrub``).
    An archive without it is scrubbed by reading each copy through ``open``."""

    def verify(items):
        """*items*: a list of (SOP Instance UID, sha256 of the data set as the catalog
        holds it). Deferred[list of (uid, state, bytes read)], one per item, in order;
        state is ``"ok"``, ``"damaged"`` (the bytes held hash otherwise or cannot be read
        as a Part-10 file) or ``"missing"`` (the archive holds no copy of *uid*). A batch
        is one job of the archive's own threads: the scrub sizes batches to its rate."""


class IRestores(Interface):
    """Capability ``restore``: a damaged or lost copy can be put back in place (a scrub
    replacing it with a good replica's bytes)."""

    def restore(received, meta):
        """Make the Part-10 file at path *received* (its data set checked by the caller
        against the catalog's hash) the archive's copy of ``meta.sop_instance_uid``,
        replacing whatever it holds under that UID now (the damaged bytes), atomically
        where the archive can. Deferred[types.Stored] once it is durable."""


CAPABILITIES = {"store": IStores, "store_unsynced": IStoresUnsynced, "keep": IKeeps,
                "open": IOpens, "read_many": IReadsMany, "send": ISends, "crawl": ICrawls, "changes": IFollows,
                "walk": IWalks, "delete": IDeletes, "verify": IVerifies,
                "restore": IRestores}


def problems(archive) -> list[str]:
    """What *archive* lacks of IArchive and of the interface of each capability it
    claims (also: an optional interface declared without its capability), each as
    ``"IStores.discard: not provided"``. Empty: it provides everything it claims."""
    out = _verify(IArchive, archive)
    if out:
        return out
    caps = archive.capabilities
    if not isinstance(caps, (set, frozenset)):
        return [f"IArchive.capabilities: a frozenset, not {type(caps).__name__}"]
    for cap in sorted(caps):
        iface = CAPABILITIES.get(cap)
        if iface is None:
            out.append(f"IArchive.capabilities: unknown capability {cap!r} "
                       f"(known: {', '.join(sorted(CAPABILITIES))})")
        else:
            out += _verify(iface, archive)
    for cap, iface in sorted(CAPABILITIES.items()):
        if cap not in caps and iface.providedBy(archive):
            out.append(f"{iface.__name__}: declared, but {cap!r} is not in capabilities")
    return out


def factory_problems(cls) -> list[str]:
    """What the adapter class *cls* lacks of IArchiveFactory (declared or not)."""
    return _verify(IArchiveFactory, cls, tentative=True)


def _verify(iface, obj, tentative=False) -> list[str]:
    try:
        verifyObject(iface, obj, tentative=tentative)
    except Invalid as e:
        return [_describe(iface, x) for x in getattr(e, "exceptions", None) or (e,)]
    return []


def _describe(iface, error) -> str:
    if isinstance(error, DoesNotImplement):
        return f"{iface.__name__}: not declared (@implementer({iface.__name__}))"
    name = error.method if isinstance(error, BrokenMethodImplementation) else error.name
    name = getattr(name, "__name__", name)
    if isinstance(error, BrokenMethodImplementation):
        wanted = iface[name].getSignatureString() if name in iface else ""
        return f"{iface.__name__}.{name}{wanted}: {error.mess}"
    return f"{iface.__name__}.{name}: not provided"
