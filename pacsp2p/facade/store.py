"""C-STORE (PS3.4 annex B, PS3.7 9.1.1) of the facade.

The data set is written to ``incoming`` while it arrives (``dicom.incoming``, in a thread
pool) and handed, with a ``StoreSession`` from ``cluster.receive``, to the cluster: the
session gets the fragments too if it streams them to replica holders, the writer thread
tells it when the file is complete and its header read, and ``session.store`` keeps it.
Success is answered only once the cluster says the copies are durable.

Refused before anything is written: a SOP Class or Instance UID that is not a valid UID
(PS3.5 §9.1: 0xC000 with an Error Comment), a SOP class other than the context's (0x0122).
Refused once complete: a data set whose header cannot be read, or that is deflated and
inflates past ``deflate.bound`` of its size (0xC000: a bomb), that holds File
Meta Information elements (group 0002, PS3.10 7.1: they would become part of the stored
file's, a Media Storage SOP Instance UID of another instance making it unretrievable;
0xC000), whose UIDs are
not those of the request (0xA900), whose Study or Series Instance UID is invalid or
whose catalog attribute (Patient Name, Study Description, ...) is longer than
``validate.VALUE_MAX`` characters (0xC000: kept, it would be in every peer's catalog and
every sync answer, and one past a sync answer's bound stops the sync of its peer), or
whose series the catalog holds in another study (0xC000: keeping it would move that
series, of another patient, into this study). No
hostile value reaches a path or a log line whole.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from pacsp2p import metrics, threads
from pacsp2p.dicom import dimse
from pacsp2p.dicom.messages import DiscardSink
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.dicom.incoming import Incoming, file_meta, remove
from pacsp2p.dicom.status import (CANNOT_UNDERSTAND, DOES_NOT_MATCH, OUT_OF_RESOURCES,
                                  SOP_CLASS_NOT_SUPPORTED, SUCCESS)
from pacsp2p.facade.operation import Operation
from pacsp2p.types import Query
from pacsp2p.validate import InvalidUID, check_uid, long_value, shown

log = Logger()
STOPPING = "the peer is stopping"

SERIES_SEEN = 4096        # series known to be in their study, not looked up again


def _meta_of(path, sha256, data_size, content=None):
    """Thread pool: (path, InstanceMeta or None, BadDataset or None); *content*: the
    file's bytes, if still in memory."""
    try:
        return path, read_meta(path, sha256, data_size, content, bounded=True), None
    except BadDataset as e:
        return path, None, e


def _bad_header(meta) -> str:
    """Why the data set's header cannot go into the catalog (a Study/Series Instance UID
    that is not a valid UID, a value too long), or ''."""
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        try:
            check_uid(meta.attributes.get(key, ""), key)
        except InvalidUID as e:
            return str(e)
    return long_value(meta.attributes)


class Store(Operation):
    RSP = dimse.C_STORE_RSP

    def __init__(self, svc, assoc, cx, fields):
        super().__init__(svc, assoc, cx, fields)
        self.instance = fields.get(dimse.AFFECTED_SOP_INSTANCE, b"")
        self.uid = dimse.text(fields, dimse.AFFECTED_SOP_INSTANCE)
        self.cls = dimse.text(fields, dimse.AFFECTED_SOP_CLASS)
        self.refused = None
        self.comment = ""
        self.incoming = self.session = self.result = None
        self.meta = None                 # the header read (the audit record's patient, study)
        try:
            check_uid(self.cls, "Affected SOP Class UID")
            check_uid(self.uid, "Affected SOP Instance UID")
        except InvalidUID as e:
            self.warn("C-STORE refused", "C-STORE from {ae}@{peer} refused: {err}",
                      ae=shown(assoc.calling_ae), peer=assoc.peer, err=e)
            self.refused, self.comment = CANNOT_UNDERSTAND, "invalid UID"
            self.instance = b""
        else:
            if self.cls != cx.abstract_syntax:
                self.warn("C-STORE refused", "C-STORE of {cls} on a context for {cx}: "
                          "refused", cls=self.cls, cx=cx.abstract_syntax)
                self.refused = SOP_CLASS_NOT_SUPPORTED
        if self.refused is not None:
            self.sink = DiscardSink()
            return
        head = file_meta(self.cls, self.uid, str(self.ts), assoc.calling_ae)
        self.meta_end = len(head)                # where the data set starts in the file
        path, fd = svc.spares.take_file()        # (fd: a spare with no name yet)
        self.incoming = Incoming(path, svc.recv_pool, svc.reactor, head,
                                 assoc.pause_reading, assoc.resume_reading, fd=fd)
        self.session = svc.cluster.receive(self.uid, self.cls, str(self.ts), head,
                                           assoc.pause_reading, assoc.resume_reading)
        self.sink = self if self.session.streams else self.incoming

    def feed(self, piece) -> None:
        """The sink when the session streams: each fragment to the file and to it."""
        self.incoming.feed(piece)
        if self.session.streams:
            try:
                self.session.feed(piece)
            except Exception:                     # never at the cost of the association
                log.failure("C-STORE {uid}: forwarding failed; copied once complete",
                            uid=self.uid)
                self.session.abort()

    def data_complete(self, sink):
        if self.incoming is None:
            return
        if sink is None:                      # a C-STORE-RQ without a data set
            self.incoming.discard()
            self.session.abort()
            self.incoming, self.refused = None, CANNOT_UNDERSTAND
            return
        self.session.complete()
        self.result = self.incoming.finish(self._written)
        self.result.addErrback(self._write_failed)

    def _written(self, path, sha256, data_size):
        """Thread pool: the file is complete (still open: its descriptor, to make it
        durable, and its bytes if one job wrote it — not read back); tell the session,
        which has its header read (``_header``, maybe in another thread while it makes
        the file durable). If the copy is then durable and recorded with nothing left to
        decide (``durable_now``), Success is sent by the thread that finished it
        (``_answer``): the requestor does not wait for the hop to the reactor, nor for one
        between the fsyncing and the keeping thread; the reactor does the rest (``finish``).
        A file with no name yet (``unnamed``) is named in ``incoming`` unless the session
        keeps it from its descriptor and its bytes are in memory (its header read)."""
        fd, content = self.incoming.written()
        if self.incoming.unnamed and (content is None or not self.session.keeps_unnamed):
            self.incoming.name()
        reading = self.incoming.readable
        return self.session.written_then(
            path, lambda: self._header(path, sha256, data_size, content, reading), fd,
            self._answer)

    def _answer(self, got):
        """The thread that finished the copy: Success sent from here if the copy is
        durable and recorded with nothing left to decide (``answered``)."""
        if got[2] is None and self.started and not self.gone and self.session.durable_now():
            self.answered = self.assoc.send_from_thread(self.cid, dimse.response(
                self.RSP, self.msg_id, SUCCESS, self.sop_class, self.instance))

    def _header(self, path, sha256, data_size, content=None, reading=None):
        """Thread pool: read the file's header (by *reading*, if the file has no name
        yet) and tell the session."""
        got = (path,) + _meta_of(reading or path, sha256, data_size, content)[1:]
        meta = got[1]
        if meta is not None and meta.size - meta.data_size != self.meta_end:
            self.session.abandon()              # the file meta walk went on into it
            return path, None, BadDataset("the data set holds File Meta Information "
                                          "elements (group 0002)")
        if meta is not None and meta.sop_instance_uid == self.uid and \
                meta.sop_class_uid == self.cls and not _bad_header(meta):
            why = self._series_conflict(meta)
            if why:
                self.session.abandon()
                return path, None, BadDataset(why)
            self.session.header_read(path, meta)
        else:
            self.session.abandon()
        return got

    def _write_failed(self, failure):
        """Not written or not kept (a full disk, too many versions of the UID): logged
        through the acceptor's limit (a requestor can make it happen in a loop)."""
        self.note("store failure", LogLevel.error,
                  "C-STORE {uid} from {ae}: cannot write the received data set: {err}",
                  uid=self.uid, ae=self.assoc.calling_ae, err=failure.getErrorMessage())
        return None

    def run(self):
        if self.refused is not None:
            return self.finish(self.refused, instance=self.instance, comment=self.comment)
        self.result.addCallback(self._received)

    def _received(self, got):
        if got is None:                                    # not written (disk full, ...)
            self.session.abort()
            return self.finish(OUT_OF_RESOURCES, instance=self.instance)
        path, meta, err = got
        self.meta = meta
        kept = self.session.kept is not None
        if err is not None:
            self.warn("C-STORE refused", "C-STORE {uid} from {ae}: {err}", uid=self.uid,
                      ae=self.assoc.calling_ae, err=err)
            status = OUT_OF_RESOURCES if str(err) == STOPPING else CANNOT_UNDERSTAND
        elif meta.sop_instance_uid != self.uid or meta.sop_class_uid != self.cls:
            self.warn("C-STORE refused", "C-STORE {uid}: dataset UIDs do not match the "
                      "request", uid=self.uid)
            status = DOES_NOT_MATCH
        elif not kept and _bad_header(meta):     # (a copy kept passed it in the thread)
            self.warn("C-STORE refused", "C-STORE {uid} from {ae}: {err}", uid=self.uid,
                      ae=self.assoc.calling_ae, err=_bad_header(meta))
            status = CANNOT_UNDERSTAND
        elif self.gone and not self.started and not kept:
            status = None                                  # nobody to answer: drop it
        else:
            self.quorum_t0 = self.svc.reactor.seconds()
            d = defer.maybeDeferred(self.session.store, path, meta)
            d.addCallbacks(self._stored, self._store_failed, errbackArgs=(meta,))
            if not kept:
                d.addBoth(self._cleanup, path)
            return
        self.session.abort()
        remove(self.svc.recv_pool, path)
        if status is not None:
            self.finish(status, instance=self.instance)

    def _series_conflict(self, meta) -> str:
        """Thread pool: ``_series_checked``, waited for (the catalog is read in its own
        pool; a series seen lately is not read again: no reactor round trip)."""
        if self.svc.series_seen.get(meta.attributes["SeriesInstanceUID"]) == \
                meta.attributes["StudyInstanceUID"]:
            return ""
        try:
            return threads.on_reactor(self.svc.reactor, self._series_checked, meta)
        except threads.Stopped:
            return STOPPING                   # (0xA700: the modality sends it again)
        except Exception:
            log.failure("C-STORE {uid}: its series could not be looked up; kept",
                        uid=self.uid)
            return ""

    def _series_checked(self, meta) -> defer.Deferred:
        """Deferred[str]: '' if the instance's series is new or held in its own study,
        else why not. A series UID is unique (PS3.3 C.7.3.1): one that the catalog holds
        in another study is refused, since keeping it would move the catalog's series —
        every instance stored before, of another patient — into this study. The series
        seen in their study lately are not looked up again (``SERIES_SEEN``)."""
        series = meta.attributes["SeriesInstanceUID"]
        study = meta.attributes["StudyInstanceUID"]
        seen = self.svc.series_seen

        def compare(rows):
            others = {r.get("StudyInstanceUID") for r in rows} - {study, None, ""}
            if others:
                return f"SeriesInstanceUID {series} is held in another study"
            if len(seen) >= SERIES_SEEN:
                seen.clear()
            seen[series] = study
            return ""
        d = defer.maybeDeferred(self.svc.cluster.find,
                                Query("SERIES", {"SeriesInstanceUID": series}),
                                ["StudyInstanceUID"])
        return d.addCallback(compare)

    def _stored(self, _):
        metrics.QUORUM_SECONDS.observe(max(0.0, self.svc.reactor.seconds() - self.quorum_t0))
        self.finish(SUCCESS, instance=self.instance)

    def _store_failed(self, failure, meta):
        metrics.QUORUM_SECONDS.observe(max(0.0, self.svc.reactor.seconds() - self.quorum_t0))
        status = getattr(failure.value, "status", OUT_OF_RESOURCES)
        log.error("C-STORE {uid} failed: {err}", uid=meta.sop_instance_uid,
                  err=failure.getErrorMessage())
        self.finish(status, instance=self.instance)

    def _cleanup(self, result, path):
        remove(self.svc.recv_pool, path)
        return None

    def finishes_after_loss(self) -> bool:
        return True                          # a started C-STORE is kept or refused

    def lost(self):
        super().lost()
        if self.incoming is not None and self.result is None:
            self.incoming.discard()          # the data set never arrived whole
            self.session.abort()
        elif self.result is not None and not self.started:
            self.result.addCallback(self._received)   # whole but never started
