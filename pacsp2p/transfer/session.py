"""StoreSession: one C-STORE's data set on its way into the cluster (``Cluster.receive``).

The front end that receives a data set writes it to a file of its own and tells the
session what happens, in this order:

- reactor: ``feed(piece)`` for every fragment as it arrives — only if ``streams`` is true
  (a session that pushes the data set to remote replica holders while it arrives);
- reactor: ``complete()`` once the data set is whole, or ``abort()`` if it never will be
  (the association was lost, the request was refused); after ``abort()`` nothing of it
  is kept anywhere, and ``store`` still works (copies are then made from the file);
- writer thread: ``written_then(path, rest, fd, then)`` once the file is whole (*fd*:
  still open, valid during the call): ``written(path)``,
  then ``rest()`` — the front end's header read, which calls ``header_read(path, meta)``
  if the header names what the request announced (the session may keep the file from
  there: ``kept`` is then set, and the front end must not remove it), else
  ``abandon()`` — whose result it returns (a session may run ``rest`` in another thread
  meanwhile); ``header_read`` raises OSError if it could not keep it;
- in ``then(result)``, in the thread that finished the work last (or after
  ``written_then``): ``durable_now()``: true if ``store`` can only succeed (the front
  end may answer Success from there);
- reactor: ``store(path, meta)`` -> Deferred[StoreResult], or a failure whose value has
  a DIMSE ``status`` (``types.StoreError``).

Three implementations (``ingest.Ingest.begin`` picks one): ``Plain`` (placed and copied
once complete), ``forward.Forward`` (placed on the first bytes, pushed while arriving)
and ``ingest.OneJob`` (a peer alone with one archive that keeps files in the writer
thread).
"""

from __future__ import annotations

from pacsp2p.catalog.facts import new_stamp


class StoreSession:
    """The declared shape of a store session; the methods here do nothing."""

    streams = False        # feed() wants every fragment
    kept = None            # the archive's Stored once header_read kept the file

    def __init__(self, ingest):
        self.ingest = ingest
        self.stamp = new_stamp()   # its receipt: the catalog's last-writer-wins stamp

    # reactor thread
    def feed(self, piece) -> None:
        """One data set fragment (bytes or memoryview, valid during the call)."""

    def complete(self) -> None:
        """The data set is whole (the file may still be being written)."""

    def abort(self) -> None:
        """The data set will not be stored here: drop anything made from it."""

    def store(self, path, meta):
        """Keep the received file at *path*; Deferred[StoreResult] or StoreError."""
        return self.ingest.store(path, meta, self)

    # the thread that wrote the file
    keeps_unnamed = False   # keeps a file with no name from its descriptor (``unnamed``)

    def written_then(self, path, rest, fd=None, then=None):
        """The file is complete: ``written``, then rest()'s result (*fd*: its open
        descriptor, valid during the call, or None); *then(result)*, if given, is called
        with it first, by whichever thread finishes the work last (``durable_now`` is
        known there)."""
        self.written(path)
        result = rest()
        if then is not None:
            then(result)
        return result

    def written(self, path) -> None:
        """The file is complete and closed."""

    def header_read(self, path, meta) -> None:
        """Its header was read and matches the request; may keep the file (``kept``)."""

    def abandon(self) -> None:
        """It will not be stored (its header is bad or names another instance)."""

    def durable_now(self) -> bool:
        """In ``written_then``'s *then* (or after it): the copies are durable and recorded
        and ``store`` has nothing left to decide but Success (the front end may answer
        from this thread). False unless a session knows it."""
        return False


class Plain(StoreSession):
    """Placed, copied and recorded once the data set is complete (``Ingest.store``)."""
