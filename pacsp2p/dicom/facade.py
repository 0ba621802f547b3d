"""The facade: a pynetdicom SCP that presents the whole cluster as one archive.

C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET. pynetdicom runs every association in its own
thread; handlers here reach the cluster API only through ``blockingCallFromThread`` and
never touch SQL or file paths of archives. Received datasets are streamed to a file by
pynetdicom (``STORE_RECV_CHUNKED_DATASET``) and never decoded beyond their header.
C-MOVE is served by ``pacsp2p.dicom.move`` (stored bytes sent by the native SCU).
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import Logger

from pacsp2p.dicom import contexts, polling, move
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.dicom.identifiers import IdentifierError, to_dataset, to_query
from pacsp2p.dicom.status import (SUCCESS, PENDING, CANCEL, SOP_CLASS_NOT_SUPPORTED,
                                  OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND,
                                  UNABLE_TO_PROCESS)

log = Logger()

_config.STORE_RECV_CHUNKED_DATASET = True
_config.UNRESTRICTED_STORAGE_SERVICE = False
_config.LOG_HANDLER_LEVEL = "none"
polling.install()

# A transfer syntax UID no association ever accepts: a sub-operation built on it fails
# inside pynetdicom before anything is sent, and is counted as failed under its UID.
_NO_SUCH_SYNTAX = "1.2.826.0.1.3680043.10.1406.0.404"


def _nodelay(event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _SharedContexts(list):
    """The facade's supported presentation contexts, shared by all its associations.

    pynetdicom deep-copies the server's contexts for every association it accepts: ~25 ms
    for every storage class in every transfer syntax, before the A-ASSOCIATE-AC. The
    negotiation only reads them (``presentation.negotiate_as_acceptor`` builds new result
    contexts), so one shared list serves all associations.
    """

    def __deepcopy__(self, memo):
        return list(self)


class Facade:
    def __init__(self, settings, cluster, reactor):
        self.settings = settings
        self.fs = settings.facade
        self.cluster = cluster
        self.reactor = reactor
        self.server = None
        self.incoming = settings.data_dir / "incoming"

    # -- life cycle (reactor thread) -------------------------------------------------
    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
        # pynetdicom streams each received dataset to a temp file: keep it on the
        # archive's filesystem so that storing it is a link, not a copy.
        tempfile.tempdir = str(self.incoming)
        ae = AE(ae_title=self.fs.ae_title)
        ae.maximum_pdu_size = self.fs.max_pdu
        ae.maximum_associations = self.fs.max_associations
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        if self.fs.allowed_calling_aes:
            ae.require_calling_aet = list(self.fs.allowed_calling_aes)
        contexts.add_supported(ae)
        move.install(ae, self)          # C-MOVE: pacsp2p.dicom.move, not an evt handler
        self.ae = ae
        handlers = [
            (evt.EVT_CONN_OPEN, _nodelay),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_REJECTED, self.on_rejected),
        ]
        self.server = ae.start_server((self.fs.bind, self.fs.port), block=False,
                                      evt_handlers=handlers)
        self.server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.contexts = _SharedContexts(self.server.contexts)
        log.info("facade {ae} listening on {bind}:{port}", ae=self.fs.ae_title,
                 bind=self.fs.bind, port=self.fs.port)

    def stop(self):
        if self.server is not None:
            server, self.server = self.server, None
            return deferToThread(server.shutdown)

    # -- helpers (association threads) -----------------------------------------------
    def call(self, fn, *args):
        return blockingCallFromThread(self.reactor, fn, *args)

    def on_rejected(self, event):
        log.warn("association from {ae}@{addr} rejected (calling AE not allowed)",
                 ae=event.assoc.requestor.ae_title, addr=event.assoc.requestor.address)

    def on_echo(self, event):
        return SUCCESS

    # -- C-STORE ---------------------------------------------------------------------
    def on_store(self, event):
        req = event.request
        path = Path(event.dataset_path)
        if req.AffectedSOPClassUID != event.context.abstract_syntax:
            log.warn("C-STORE of {cls} on a context for {cx}: refused",
                     cls=req.AffectedSOPClassUID, cx=event.context.abstract_syntax)
            return SOP_CLASS_NOT_SUPPORTED
        try:
            meta = read_meta(path)
        except BadDataset as e:
            log.warn("C-STORE {uid} from {ae}: {err}", uid=req.AffectedSOPInstanceUID,
                     ae=event.assoc.requestor.ae_title, err=e)
            return CANNOT_UNDERSTAND
        if (meta.sop_instance_uid != req.AffectedSOPInstanceUID
                or meta.sop_class_uid != req.AffectedSOPClassUID):
            log.warn("C-STORE {uid}: dataset UIDs do not match the request",
                     uid=req.AffectedSOPInstanceUID)
            return DOES_NOT_MATCH
        try:
            self.call(self.cluster.store, path, meta)
        except Exception as e:
            status = getattr(e, "status", OUT_OF_RESOURCES)
            log.error("C-STORE {uid} failed: {err}", uid=meta.sop_instance_uid, err=e)
            return status
        return SUCCESS

    # -- C-FIND ----------------------------------------------------------------------
    def on_find(self, event):
        root = contexts.QR_FIND.get(event.context.abstract_syntax, "STUDY")
        try:
            query, requested = to_query(event.identifier, root)
            rows = self.call(self.cluster.find, query, requested)
        except IdentifierError as e:
            log.warn("C-FIND: {err}", err=e)
            yield DOES_NOT_MATCH, None
            return
        except Exception as e:
            log.error("C-FIND failed: {err}", err=e)
            yield UNABLE_TO_PROCESS, None
            return
        for row in rows:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, to_dataset(row, requested, query.level)

    # -- C-GET (C-MOVE: pacsp2p.dicom.move) --------------------------------------------
    def _resolve(self, event, table):
        root = table.get(event.context.abstract_syntax, "STUDY")
        query, _ = to_query(event.identifier, root)
        return self.call(self.cluster.retrieve, query)

    def _load(self, retrieval, ref) -> Dataset:
        """Read one instance for sending (raw elements: re-encoded byte for byte)."""
        try:
            f = self.call(retrieval.open, ref)
            with f:
                return dcmread(f)
        except Exception as e:
            log.error("sub-operation for {uid} failed: {err}", uid=ref.sop_instance_uid, err=e)
            return _unsendable(ref)

    def on_get(self, event):
        try:
            retrieval = self._resolve(event, contexts.QR_GET)
        except IdentifierError as e:
            log.warn("C-GET: {err}", err=e)
            yield 0
            return
        accepted = {}
        for cx in event.assoc.accepted_contexts:
            accepted.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax[0])
        yield len(retrieval.refs)
        for ref in retrieval.refs:
            if event.is_cancelled:
                yield CANCEL, None
                return
            ds = self._load(retrieval, ref)
            yield PENDING, _fit(ds, ref, accepted.get(ref.sop_class_uid, set()))


def _unsendable(ref) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = _NO_SUCH_SYNTAX
    return ds


def _fit(ds: Dataset, ref, syntaxes: set[str]) -> Dataset:
    """Make *ds* sendable on a C-GET association that accepted *syntaxes* for its class."""
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts in syntaxes or str(ts) == _NO_SUCH_SYNTAX:
        return ds                                       # the stored bytes, as they are
    if ts.is_compressed and syntaxes & set(contexts.UNCOMPRESSED):
        try:
            ds.decompress(generate_instance_uid=False)  # same content, explicit VR LE
            return ds
        except Exception as e:
            log.error("cannot decompress {uid} for C-GET: {err}",
                      uid=ref.sop_instance_uid, err=e)
            return _unsendable(ref)
    if not ts.is_compressed and syntaxes & set(contexts.UNCOMPRESSED):
        return ds                                       # pynetdicom converts the VR
    log.warn("C-GET requester accepted no usable transfer syntax for {uid}",
             uid=ref.sop_instance_uid)
    return _unsendable(ref)
