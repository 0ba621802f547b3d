"""A C-STORE's Success is sent by the thread that made its copy durable (issue 15 item
5): a storage SCU waits for each C-STORE-RSP, and the hop back to the reactor (a wake-up
through its waker pipe, then the GIL) was on that path for every instance. The thread
sends only what is safe to send from it (``Association.send_from_thread``): a plain TCP
socket with nothing queued before the response; anything else is left to the reactor.
The reactor's ``finish`` then does the rest (audit, metrics, the next request) without
sending again."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from pacsp2p import unnamed
from pacsp2p.dicom import dimse
from pacsp2p.facade.store import Store
from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import wait_until
from tests.unit.test_answer_now import Reactor, _rsp, wired  # noqa: F401 (a fixture)
from tests.unit.test_onejob import alone

MR = "1.2.840.10008.5.1.4.1.1.4"


def _in_thread(fn, *args):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join(60)
    return out[0]


def test_a_response_from_another_thread_reaches_the_socket_with_no_reactor_turn(wired):
    assoc, theirs, reactor = wired
    assert _in_thread(assoc.send_from_thread, 1, _rsp(0x0000)) is True
    got = theirs.recv(65536)
    assert got[:1] == b"\x04" and got.endswith(_rsp(0x0000))
    assert not reactor.writers


def test_nothing_is_sent_from_a_thread_past_what_the_reactor_queued(wired):
    assoc, theirs, reactor = wired
    assoc.send(1, _rsp(0xFF00))                    # a Pending response, queued
    assert _in_thread(assoc.send_from_thread, 1, _rsp(0x0000)) is False
    with pytest.raises(BlockingIOError):
        theirs.recv(65536)                         # not even the final one: in order


def test_nothing_is_sent_from_a_thread_while_corked(wired):
    assoc, theirs, reactor = wired
    assoc.cork()
    assert _in_thread(assoc.send_from_thread, 1, _rsp(0x0000)) is False
    with pytest.raises(BlockingIOError):
        theirs.recv(65536)


def test_a_thread_sends_on_a_socket_of_its_own_closed_with_the_connection(wired):
    """The thread sends on a duplicate of the socket, which the association closes
    under the lock the thread sends under: when the reactor closes the connection's own
    descriptor, no file or connection opened meanwhile can take the number the thread
    is about to write to."""
    assoc, theirs, reactor = wired
    own = assoc._own
    assert own is not None and own.fileno() != assoc.transport.socket.fileno()
    assoc.transport.connectionLost(Failure(ConnectionDone()))
    assert own.fileno() == -1 and assoc._own is None
    assert _in_thread(assoc.send_from_thread, 1, _rsp(0x0000)) is False


class QueueingReactor(Reactor):
    """Runs nothing a thread hands it until told (``run_handed``): what reaches the
    socket before that was sent by the thread."""

    def __init__(self):
        super().__init__()
        self.handed, self.at_shutdown = [], []

    def callFromThread(self, fn, *args, **kw):
        self.handed.append((fn, args, kw))

    def addSystemEventTrigger(self, phase, event, fn, *args):
        self.at_shutdown.append(fn)

    def run_handed(self):
        while self.handed:
            fn, args, kw = self.handed.pop(0)
            fn(*args, **kw)


def _data_set(uid: str):
    """(the data set, its bytes as a storage SCU sends them: explicit VR LE)."""
    ds = datasets.make_image("MR", size=16, SOPInstanceUID=uid)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return ds, out.getvalue()


@pytest.mark.parametrize("nameless", [False, True])
def test_a_durable_c_store_is_answered_by_the_thread_that_made_it_durable(tmp_path, wired,
                                                                         nameless):
    """*nameless*: the facade's spare has no name (``unnamed``): the file is written,
    fsynced and kept through its descriptor, named only in ``objects/``."""
    assoc, theirs, _ = wired
    reactor = QueueingReactor()
    uid = datasets.uid("answer-thread", "one")
    ds, body = _data_set(uid)
    archive, ingest = alone(tmp_path, reactor, fail_fsync=False)
    (tmp_path / "incoming").mkdir()
    recv = ThreadPool(1, 1, "test-recv")         # started once the operation is
    spare = unnamed.make(tmp_path / "incoming") if nameless else None
    assert (spare is not None) == nameless
    svc = SimpleNamespace(
        reactor=reactor, recv_pool=recv, observer=None,
        spares=SimpleNamespace(take_file=lambda: (tmp_path / "incoming" / "one.dcm", spare)),
        series_seen={ds.SeriesInstanceUID: ds.StudyInstanceUID},
        cluster=SimpleNamespace(receive=ingest.begin))
    cx = SimpleNamespace(context_id=1, abstract_syntax=MR,
                         transfer_syntax=[ExplicitVRLittleEndian])
    fields = {dimse.AFFECTED_SOP_CLASS: MR.encode(), dimse.AFFECTED_SOP_INSTANCE: uid.encode(),
              dimse.MESSAGE_ID: (5).to_bytes(2, "little")}
    try:
        op = Store(svc, assoc, cx, fields)
        op.sink.feed(memoryview(body))
        op.data_complete(op.sink)
        assoc._ops.append(op)
        op.start()                               # as the association does
        recv.start()
        got = []

        def answered():                          # by the thread: no reactor turn
            try:
                got.append(theirs.recv(65536))
            except BlockingIOError:
                return False
            return True
        wait_until(answered, 30, what="a C-STORE-RSP from the writing thread")
        got = got[0]
        answer = dimse.command_elements(got[12:])
        assert dimse.us(answer, dimse.STATUS) == 0x0000
        assert dimse.us(answer, dimse.RESPONDED_TO) == 5
        assert dimse.text(answer, dimse.AFFECTED_SOP_INSTANCE) == uid
        assert op.answered and not op.finished
        assert ingest.catalog.recorded and len(list(archive.objects.glob("*/*.dcm"))) == 1
        kept = next(archive.objects.glob("*/*.dcm"))
        assert kept.read_bytes()[128:132] == b"DICM" and kept.stat().st_nlink == 1
        assert list((tmp_path / "incoming").iterdir()) == []    # named once, or removed
        wait_until(lambda: reactor.run_handed() or op.finished, 30,   # the reactor's part
                   what="the operation finished")
        assert not assoc._ops                     # and no second response
        with pytest.raises(BlockingIOError):
            theirs.recv(65536)
    finally:
        recv.stop()
        for fn in reactor.at_shutdown:
            fn()


# -- which thread answers: the one that finishes last, with no hop to the other ----------
def _then_in(tmp_path, keeping_last: bool):
    """One data set through a OneJob session whose fsync and keeping job are made to end
    in the order asked: (the thread *then* ran in, the writing thread, durable_now)."""
    from tests.unit.test_onejob import Reactor as InlineReactor
    reactor = InlineReactor()
    archive, ingest = alone(tmp_path, reactor, fail_fsync=False)
    fsynced, kept, started = threading.Event(), threading.Event(), threading.Event()
    flusher = archive.flusher

    def ordered_flusher(received, fd=None):
        flush = flusher(received, fd)

        def run():
            if not keeping_last:
                kept.wait(60)                    # the keeping job ends first
            else:       # the keeping thread has taken its job (on a busy machine the
                started.wait(60)    # writing thread could finish first and take it)
            flush()
            fsynced.set()
        return run
    archive.flusher = ordered_flusher
    ds = datasets.make_image("MR", size=16, SOPInstanceUID=datasets.uid("then", str(keeping_last)))
    path = datasets.write(ds, tmp_path / "incoming" / "then.dcm")
    session = ingest.begin("", "", "", b"", None, None)
    seen = []

    def rest():
        from pacsp2p.dicom.header import read_meta
        started.set()
        if keeping_last:
            fsynced.wait(60)                     # the fsync ends first
        meta = read_meta(path)
        session.header_read(path, meta)
        kept.set()
        return meta
    writer = []

    def write():
        writer.append(threading.current_thread().name)
        session.written_then(path, rest, None, lambda got: seen.append(
            (threading.current_thread().name, session.durable_now())))
    try:
        t = threading.Thread(target=write, name="writing-thread")
        t.start()
        t.join(60)
    finally:
        reactor.stop()
    (thread, durable), = seen
    return thread, writer[0], durable


def test_the_keeping_thread_answers_when_it_ends_after_the_fsync(tmp_path):
    thread, writer, durable = _then_in(tmp_path, keeping_last=True)
    assert thread != writer and durable                 # no hop back to the writer


def test_the_writing_thread_answers_when_its_fsync_ends_last(tmp_path):
    thread, writer, durable = _then_in(tmp_path, keeping_last=False)
    assert thread == writer and durable
