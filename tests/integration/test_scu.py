"""The Twisted-native Storage SCU (pacsp2p.dicom.scu) against real Storage SCPs.

DCMTK storescp (+B: writes the data set exactly as received) and an in-process pynetdicom
SCP receive stored files; every data set arrives byte-identical (sha256 after the file
meta). Rejection, abort, refused connection, silent acceptors and late responses give
clear Deferred errors. The reactor runs in a thread; the tests call into it with
blockingCallFromThread (every SCU operation has its own timeout, so nothing hangs).
"""
from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, RLELossless)
from pynetdicom import AE, evt
from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread

from pacsp2p.dicom import scu
from pacsp2p.testing import StoreSCP, dataset_sha256, datasets, free_port
from pacsp2p.dicom.part10 import dataset_start

ALL = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]
# one context per (class, syntax): an acceptor accepts one syntax per context
CONTEXTS = [(c, [ts]) for c in (CTImageStorage, MRImageStorage) for ts in ALL]


@pytest.fixture(scope="module", autouse=True)
def running_reactor():
    if not reactor.running:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                         daemon=True, name="reactor").start()
    yield reactor


def call(fn, *args, **kw):
    return blockingCallFromThread(reactor, fn, *args, **kw)


def connect(port, called="STORESCP", contexts=CONTEXTS, **kw):
    return call(scu.associate, reactor, "127.0.0.1", port, called_ae=called,
                calling_ae="PACSP2PTEST", contexts=contexts, **kw)


def send(assoc, path: Path, **kw):
    """C-STORE the data set of Part-10 *path* (meta skipped here, in the test thread)."""
    f = open(path, "rb")
    ts, uid = dataset_start(f)
    sop_class = str(dcmread(path, stop_before_pixels=True).SOPClassUID)
    return call(assoc.store, sop_class, uid, ts, f, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("scu-files")
    out = []
    for i, (modality, ts, private, size) in enumerate([
            ("CT", ExplicitVRLittleEndian, False, 512),
            ("CT", RLELossless, False, 64),
            ("MR", ImplicitVRLittleEndian, True, 64),
            ("MR", ExplicitVRLittleEndian, True, 16),
            ("CT", ExplicitVRLittleEndian, False, 1200)]):   # 2.9 MB: several read chunks
        ds = datasets.make_image(modality, size=size, transfer_syntax=ts, private=private,
                                 seed=i, SOPInstanceUID=datasets.uid("scu-test", i))
        out.append(datasets.write(ds, d / f"{i}.dcm"))
    return out


@pytest.mark.parametrize("pdu", [None, "4096"])
def test_dcmtk_storescp_receives_byte_identical(files, tmp_path, pdu):
    extra = ["+B"] + (["--max-pdu", pdu] if pdu else [])
    with StoreSCP(tmp_path / "in", extra=extra) as dest:
        assoc = connect(dest.port)
        if pdu:
            assert assoc.max_data == int(pdu) - 6
        # queue them all at once: sent one after the other, answered in order
        f_and_meta = []
        for p in files:
            f = open(p, "rb")
            ts, uid = dataset_start(f)
            f_and_meta.append((dcmread(p, stop_before_pixels=True).SOPClassUID,
                               uid, ts, f))
        statuses = call(lambda: defer.gatherResults(
            [assoc.store(str(c), u, t, f, "MOVER", 7) for c, u, t, f in f_and_meta],
            consumeErrors=True))
        assert statuses == [0] * len(files)
        call(assoc.release)
        assert assoc.state == "closed"
        got = {p.name.split(".", 1)[1]: dataset_sha256(p) for p in dest.files()}
    assert got == {str(datasets.uid("scu-test", i)): dataset_sha256(p)
                   for i, p in enumerate(files)}


def _pynetdicom_scp(port, handler, max_pdu=0, require_called=False):
    ae = AE(ae_title="PYSCP")
    ae.maximum_pdu_size = max_pdu
    ae.require_called_aet = require_called
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, ALL)
    return ae, ae.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, handler)])


@pytest.mark.parametrize("max_pdu", [0, 8192])
def test_pynetdicom_scp_receives_byte_identical(files, max_pdu):
    got = {}

    def on_store(event):
        req = event.request
        got[req.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax),
            hashlib.sha256(req.DataSet.getvalue()).hexdigest(),
            req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID)
        return 0x0000

    port = free_port()
    ae, server = _pynetdicom_scp(port, on_store, max_pdu)
    try:
        assoc = connect(port, called="PYSCP")
        for p in files:
            assert send(assoc, p, originator_ae="MOVER", originator_msg_id=42) == 0
        call(assoc.release)
    finally:
        server.shutdown()
        ae.shutdown()
    assert got == {str(datasets.uid("scu-test", i)): (
        str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID),
        dataset_sha256(p), "MOVER", 42) for i, p in enumerate(files)}


def test_failure_status_is_returned(files):
    port = free_port()
    ae, server = _pynetdicom_scp(port, lambda event: 0xA700)
    try:
        assoc = connect(port, called="PYSCP")
        assert send(assoc, files[3]) == 0xA700
        call(assoc.release)
    finally:
        server.shutdown()
        ae.shutdown()


def test_rejected_association_is_a_clear_error(tmp_path):
    with StoreSCP(tmp_path / "in", extra=["--refuse"]) as dest:
        with pytest.raises(scu.AssociationRejected) as e:
            connect(dest.port)
    assert "rejected" in str(e.value)
    port = free_port()
    ae, server = _pynetdicom_scp(port, lambda event: 0, require_called=True)
    try:
        with pytest.raises(scu.AssociationRejected) as e:
            connect(port, called="SOMEONE")
    finally:
        server.shutdown()
        ae.shutdown()
    assert "Called AE title not recognised" in str(e.value)


def test_abort_by_acceptor_is_a_clear_error(files, tmp_path):
    with StoreSCP(tmp_path / "in", extra=["--abort-after"]) as dest:
        assoc = connect(dest.port)
        with pytest.raises(scu.AssociationAborted):
            send(assoc, files[3])
        assert assoc.state in ("aborted", "closed")
        # a later store on the dead association fails at once, and closes its file
        with pytest.raises(scu.AssociationAborted):
            send(assoc, files[3])


def test_our_abort_fails_queued_stores(files, tmp_path):
    with StoreSCP(tmp_path / "in", extra=["--sleep-during", "3"]) as dest:
        assoc = connect(dest.port)
        f = open(files[3], "rb")
        ts, uid = dataset_start(f)

        def store_then_abort():
            d = assoc.store(MRImageStorage, uid, ts, f)
            reactor.callLater(0.5, assoc.abort)       # while storescp sleeps
            return d
        with pytest.raises(scu.AssociationAborted) as e:
            call(store_then_abort)
        assert "aborted by us" in str(e.value)


def test_context_not_accepted(files, tmp_path):
    with StoreSCP(tmp_path / "in") as dest:
        assoc = connect(dest.port, contexts=[(MRImageStorage, [ExplicitVRLittleEndian])])
        with pytest.raises(scu.NotAccepted):
            send(assoc, files[0])                         # CT: not proposed
        assert send(assoc, files[3]) == 0                 # the association is still fine
        call(assoc.release)


def test_connection_refused():
    with pytest.raises(scu.ConnectFailed):
        connect(free_port(), connect_timeout=5)


def test_silent_acceptor_times_out():
    with socket.socket() as listener:                     # accepts TCP, never speaks DICOM
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with pytest.raises(scu.DimseTimeout) as e:
            connect(listener.getsockname()[1], acse_timeout=0.5)
    assert "A-ASSOCIATE" in str(e.value)


def test_late_response_times_out(files, tmp_path):
    with StoreSCP(tmp_path / "in", extra=["--sleep-during", "3"]) as dest:
        assoc = connect(dest.port, dimse_timeout=0.5)
        with pytest.raises(scu.DimseTimeout) as e:
            send(assoc, files[3])
    assert "C-STORE-RSP" in str(e.value)
