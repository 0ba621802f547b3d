"""Delivery: the C-STORE sub-operations of one C-MOVE, run in the reactor.

A ``Delivery`` opens one association to the move destination with the native SCU
(``pacsp2p.dicom.scu``), proposing each SOP class in the exact transfer syntaxes the
instances are stored in (plus the uncompressed ones), and sends every instance of a
``Retrieval`` as the stored data set bytes: the file meta header is skipped, nothing is
decoded. Up to ``window`` instances are opened and read ahead while one is on the wire.
A destination with ``associations = N`` gets them over up to N associations at once
(``transfer.assocpool``: one shared queue, the extra ones opened once the first is up).
An instance whose stored syntax the destination did not accept is decoded and re-encoded
(content kept) into an accepted uncompressed syntax, in the file pool. A destination
with ``tls = true`` is reached over DICOM TLS (``dicom.tls.client_options``: its
certificate must chain to its ``tls_ca``; ours is ``[facade] tls_cert``).

Progress goes, as ``Progress`` snapshots, to each callable in ``listeners`` (called in
the reactor: the facade's C-MOVE). ``cancel()`` (reactor thread) stops starting new
sub-operations; the one on the wire (on each association) finishes and is counted. A
delivery cancelled before it starts opens no association; one cancelled while its
association is being set up stops the connection attempt or aborts the negotiation, and
ends (``finished``) only then: nothing is left open at the destination once it ended.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.status import code_to_category
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pacsp2p.dicom import contexts, scu, tls
from pacsp2p.dicom.part10 import BadFile, Part10Bytes, convert, dataset_start
from pacsp2p.tally import Tally as Events
from pacsp2p.transfer.assocpool import DEPTH, AssociationPool

log = Logger()

@dataclass(frozen=True)
class Progress:
    """Counts of a delivery; the last one has ``done`` set."""

    remaining: int
    completed: int
    failed: int
    warning: int
    done: bool = False
    cancelled: bool = False
    error: str | None = None          # the destination could not be reached
    failed_uids: tuple[str, ...] = ()


def _close(f) -> None:
    f.close()


def _prepare(f, accepted, sop_class: str, limit: int):
    """Thread, one job per instance: position *f* at its data set and, when the
    destination accepted its transfer syntax and it is at most *limit* bytes, read it
    whole and close *f*. (transfer syntax, stored SOP Instance UID, data set bytes or
    None: then *f* is open at the data set). Closes *f* on error."""
    try:
        ts, uid = dataset_start(f)
        if (sop_class, ts) in accepted:
            pos = f.tell()
            end = f.seek(0, 2)
            f.seek(pos)
            if end - pos <= limit:
                data = f.read(end - pos)
                if len(data) != end - pos:
                    raise OSError(f"file ended early: {len(data)} of {end - pos} bytes")
                f.close()
                return ts, uid, data
    except BaseException:
        f.close()
        raise
    return ts, uid, None


class Tally:
    """The sub-operation counts of one C-MOVE's delivery, and who is told of them:
    ``listeners`` (called in the reactor with each Progress)."""

    def __init__(self, retrieval, destination, calling_ae: str, reactor,
                 originator_ae: str | None, originator_msg_id: int | None):
        self.retrieval = retrieval
        self.refs = list(retrieval.refs)
        self.destination = destination
        self.calling_ae = calling_ae
        self.reactor = reactor
        self.originator = (originator_ae, originator_msg_id)
        self.listeners: list = []
        self.completed = self.failed = self.warning = 0
        self.failed_uids: list[str] = []
        self.cancelled = False
        self.error: str | None = None
        self.finished = defer.Deferred()

    @property
    def remaining(self) -> int:
        return len(self.refs) - self.completed - self.failed - self.warning

    def progress(self, done: bool = False) -> Progress:
        return Progress(self.remaining, self.completed, self.failed, self.warning, done,
                        self.cancelled, self.error,
                        tuple(self.failed_uids) if done else ())

    def _tell(self, p: Progress) -> None:
        for listener in self.listeners:
            try:
                listener(p)
            except Exception:
                log.failure("delivery progress listener failed")


class Delivery(Tally):
    """Send a Retrieval's instances to *destination* (config.Destination) as *calling_ae*."""

    def __init__(self, retrieval, destination, calling_ae: str, reactor, *,
                 originator_ae: str | None = None, originator_msg_id: int | None = None,
                 window: int = 8, connect_timeout: float = 10, acse_timeout: float = 30,
                 dimse_timeout: float = 120):
        super().__init__(retrieval, destination, calling_ae, reactor, originator_ae,
                         originator_msg_id)
        self.pool = scu.file_pool(reactor)
        self.associations = max(1, int(getattr(destination, "associations", 1)))
        self.window = window + DEPTH * (self.associations - 1)
        self.timeouts = dict(connect_timeout=connect_timeout, acse_timeout=acse_timeout,
                             dimse_timeout=dimse_timeout)
        self._links = None
        self._opening = None                 # links.open() while the first one is set up
        self._next = 0
        self._active = 0
        self._closing = False
        self.events = Events()               # per-instance events: one line at the end

    # -- control (reactor thread) --------------------------------------------------------
    def start(self):
        """Deferred[Progress] of the end of the delivery (at once if cancelled)."""
        if not self.cancelled:
            self._connect()
        return self.finished

    def cancel(self) -> None:
        if self.cancelled or self.finished.called:
            return
        self.cancelled = True
        stop_sources = getattr(self.retrieval, "cancel", None)
        if stop_sources is not None:
            stop_sources()                  # no new fetches from any source
        if self._links is not None:
            self._links.drop_queued()
        elif self._opening is not None:     # the association was set up for nobody and
            self._opening.cancel()          # kept (released once accepted): stopped now;
            return                          # _connect ends the delivery
        self._fill()

    # -- the run ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _connect(self):
        dest = self.destination
        pairs = {(r.sop_class_uid, r.transfer_syntax_uid) for r in self.refs}
        proposed = [(cx.abstract_syntax, list(cx.transfer_syntax))
                    for cx in contexts.for_sending(pairs)]
        try:
            options = tls.client_options(dest.tls_cert, dest.tls_key, dest.tls_ca) \
                if getattr(dest, "tls", False) else None

            def connect():
                return scu.associate(self.reactor, dest.host, dest.port,
                                     called_ae=dest.ae_title, calling_ae=self.calling_ae,
                                     contexts=proposed, pool=self.pool, tls=options,
                                     **self.timeouts)
            links = AssociationPool(connect, self.associations, self.pool, dest.ae_title)
            self._opening = links.open(len(self.refs))
            yield self._opening
            self._links = links
        except Exception as e:
            if not self.cancelled:
                self.error = str(e)
                log.error("C-MOVE to {ae}: {err}", ae=dest.ae_title, err=e)
            self._end()
            return
        finally:
            self._opening = None
        self._fill()

    def _fill(self):
        if self._closing:
            return
        while (not self.cancelled and self._active < self.window
               and self._next < len(self.refs)):
            ref = self.refs[self._next]
            self._next += 1
            self._active += 1
            self._one(ref).addBoth(self._one_done, ref)
        if self._active == 0 and (self.cancelled or self._next >= len(self.refs)):
            self._closing = True
            self._close()

    def _one(self, ref):
        d = self.retrieval.open(ref)
        d.addCallback(self._opened, ref)
        return d

    def _opened(self, f, ref):
        """A file read whole and examined (``Part10Bytes``) in a syntax the destination
        accepted goes to the SCU's queue at once: no generator, no thread hop."""
        if isinstance(f, Part10Bytes) and not self.cancelled and (
                ref.sop_class_uid, f.transfer_syntax) in self._links.accepted:
            if f.media_uid and f.media_uid != ref.sop_instance_uid:
                raise BadFile(f"the stored file holds {f.media_uid}")
            return self._links.store(ref.sop_class_uid, ref.sop_instance_uid,
                                     f.transfer_syntax, f.data(), *self.originator)
        return self._prepared(f, ref)

    @defer.inlineCallbacks
    def _prepared(self, f, ref):
        if self.cancelled:
            self.pool.callInThread(_close, f)
            raise defer.CancelledError()
        sop_class = ref.sop_class_uid
        if isinstance(f, io.BytesIO):       # read already (verify.SMALL): no thread hop
            ts, uid, data = _prepare(f, self._links.accepted, sop_class, scu.CHUNK)
        else:
            ts, uid, data = yield deferToThreadPool(self.reactor, self.pool, _prepare, f,
                                                    self._links.accepted, sop_class,
                                                    scu.CHUNK)
        if uid and uid != ref.sop_instance_uid:
            if data is None:
                self.pool.callInThread(_close, f)
            raise BadFile(f"the stored file holds {uid}")
        if data is not None:                # read whole in the one job: f is closed
            f = data
        elif self._links.context_for(sop_class, ts) is None:
            target = next((t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                           if self._links.context_for(sop_class, t) is not None), None)
            if target is None:
                self.pool.callInThread(_close, f)
                raise scu.NotAccepted(f"{self.destination.ae_title} accepted {sop_class} "
                                      f"in none of {ts} or an uncompressed syntax")
            self.events.add(f"sent as {target} (the destination did not accept {ts})")
            f = yield deferToThreadPool(self.reactor, self.pool, convert, f, target)
            ts = target
        if self.cancelled:
            if not isinstance(f, bytes):
                self.pool.callInThread(_close, f)
            raise defer.CancelledError()
        status = yield self._links.store(sop_class, ref.sop_instance_uid, ts, f,
                                         *self.originator)
        return status

    def _one_done(self, result, ref):
        self._active -= 1
        uid = ref.sop_instance_uid
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                pass                                    # stays remaining
            else:
                self.failed += 1
                self.failed_uids.append(uid)
                self.events.add("failed", uid, result.getErrorMessage())
        else:
            category = code_to_category(result)
            if category == "Success":
                self.completed += 1
            elif category == "Warning":
                self.warning += 1
            else:
                self.failed += 1
                self.failed_uids.append(uid)
                self.events.add(f"answered {result:#06x} by the destination", uid,
                               "C-STORE refused")
        self._tell(self.progress())
        self._fill()

    @defer.inlineCallbacks
    def _close(self):
        if self._links is not None:
            try:
                yield self._links.close()
            except Exception as e:
                log.warn("release of the association to {ae}: {err}",
                         ae=self.destination.ae_title, err=e)
        self._end()

    def _end(self):
        if self.finished.called:
            return
        if self.events:
            failed = any(k.startswith(("failed", "answered")) for k in self.events.counts)
            (log.warn if failed else log.info)(
                "C-MOVE to {ae}: of {n} instances, {summary}", ae=self.destination.ae_title,
                n=len(self.refs), summary=self.events.summary())
        if self.associations > 1 and self._links is not None:
            shares = list(self._links.carried.values())
            k = len(shares)
            log.info("C-MOVE to {ae}: {n} instances over {k} association{s} (up to {m}; "
                     "C-STOREs each: {each})", ae=self.destination.ae_title,
                     n=len(self.refs), k=k, s="" if k == 1 else "s", m=self.associations,
                     each="/".join(map(str, shares)) or "none")
        final = self.progress(done=True)
        self._tell(final)
        self.finished.callback(final)
