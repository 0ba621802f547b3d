"""Every path of the facade's C-FIND ends in one final response (issue 19.1), in-process.

The real acceptor (``dicom.acceptor``) and the real ``facade.find.Find`` on a ``Clock``
and a string transport; a stand-in cluster whose ``find`` fails in each way it can: at
once, as a failed Deferred, with something that is not rows, in the middle of the rows
(after a reactor turn), and while the transport is paused (the rest runs from the
association's resume). Each ends in Unable to process (0xC001) after the Pending responses
already sent, with one log line; the association goes on to its next request. Stored
values their VR cannot carry go out empty, the row is still sent.
"""
from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from pacsp2p.dicom import dimse
from pacsp2p.dicom.acceptor import AcceptorFactory
from pacsp2p.dicom.pdu import PDV, associate_rq
from pacsp2p.facade.find import FIND_BATCH
from pacsp2p.facade.services import Services

FIND = str(StudyRootQueryRetrieveInformationModelFind)
IMPLICIT = str(ImplicitVRLittleEndian)


class Pages:
    """The matches *rows*, given a page of *size* at a time (all at once: None), as
    ``catalog.findpages.Matches`` gives them; a page in *failing* fails."""

    def __init__(self, rows, size=None, failing=None):
        self.pages = [rows] if size is None else \
            [rows[i:i + size] for i in range(0, len(rows), size)]
        self.failing, self.given = failing, 0

    def next_page(self):
        self.given += 1
        if self.given == self.failing:
            return defer.fail(RuntimeError("the catalog went away between pages"))
        return defer.succeed(self.pages.pop(0) if self.pages else [])


class Cluster:
    """``matches`` answers what the test puts in ``answer`` (a callable), in pages of
    ``page`` rows (None: one page), the page ``failing`` failing."""

    def __init__(self):
        self.answer = lambda: []
        self.page = self.failing = None

    def matches(self, query, keys):
        d = self.answer()                       # (may raise here: at once)
        d = d if isinstance(d, defer.Deferred) else defer.succeed(d)
        return d.addCallback(Pages, self.page, self.failing)


def rows(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("the catalog went away")
        yield {"PatientID": f"P{i}", "PatientName": "DOE^JOHN",
               "StudyInstanceUID": f"1.2.{i}"}


class Peer:
    """One association with the acceptor, driven by hand."""

    def __init__(self):
        self.clock = Clock()
        self.cluster = Cluster()
        ae = AE()
        ae.add_supported_context(Verification, [IMPLICIT])
        ae.add_supported_context(FIND, [IMPLICIT])
        services = Services(None, self.cluster, self.clock, None, None, None)
        factory = AcceptorFactory(self.clock, services, ae.supported_contexts)
        self.assoc = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
        self.wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4242))
        self.wire.setTcpNoDelay = lambda enabled: None
        self.assoc.makeConnection(self.wire)
        self.assoc.dataReceived(associate_rq("PACSP2P", "UNITSCU", [
            (1, str(Verification), [IMPLICIT]), (3, FIND, [IMPLICIT])]))
        assert self.wire.value()[:1] == b"\x02", "association not accepted"
        self.wire.clear()
        self.msg_id = 0

    def send(self, cid: int, command: bytes, data: bytes | None = None,
             now: bool = False) -> None:
        out = PDV.pack(0x04, 0, len(command) + 6, len(command) + 2, cid, 3) + command
        if data is not None:
            out += PDV.pack(0x04, 0, len(data) + 6, len(data) + 2, cid, 2) + data
        self.assoc.dataReceived(out)

    def find(self, **keys) -> int:
        self.msg_id += 1
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for kw in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesNumber",
                   "StudyDate"):
            setattr(ds, kw, keys.get(kw, ""))
        self.send(3, dimse.command([(dimse.AFFECTED_SOP_CLASS, FIND.encode()),
                                    (dimse.COMMAND_FIELD, dimse.C_FIND_RQ),
                                    (dimse.MESSAGE_ID, self.msg_id), (dimse.PRIORITY, 0),
                                    (dimse.DATA_SET_TYPE, 0)]),
                  encode(ds, True, True))
        return self.msg_id

    def echo(self) -> int:
        self.msg_id += 1
        self.send(1, dimse.command([(dimse.AFFECTED_SOP_CLASS, str(Verification).encode()),
                                    (dimse.COMMAND_FIELD, dimse.C_ECHO_RQ),
                                    (dimse.MESSAGE_ID, self.msg_id),
                                    (dimse.DATA_SET_TYPE, dimse.NO_DATA_SET)]))
        return self.msg_id

    def responses(self) -> list[tuple[int, int, Dataset | None]]:
        """(message ID responded to, status, identifier) of everything sent so far."""
        raw, self.wire.io = self.wire.value(), BytesIO()
        out, pos, cmd, data = [], 0, b"", b""
        while pos < len(raw):
            pdu_type, _, length = struct.unpack_from(">BBI", raw, pos)
            assert pdu_type == 0x04
            end, pos = pos + 6 + length, pos + 6
            while pos < end:
                item, _, control = struct.unpack_from(">IBB", raw, pos)
                piece = raw[pos + 6:pos + 4 + item]
                pos += 4 + item
                if control & 1:
                    cmd += piece
                else:
                    data += piece
                fields = dimse.command_elements(cmd) if control & 3 == 3 else None
                no_data = fields is not None and \
                    dimse.us(fields, dimse.DATA_SET_TYPE) == dimse.NO_DATA_SET
                if control & 2 and (not control & 1 or no_data):
                    fields = dimse.command_elements(cmd)
                    ds = decode(BytesIO(data), True, True, False) if data else None
                    out.append((dimse.us(fields, dimse.RESPONDED_TO),
                                dimse.us(fields, dimse.STATUS), ds))
                    cmd, data = b"", b""
        return out

    def run(self) -> list[tuple[int, int, Dataset | None]]:
        for _ in range(100):
            self.clock.advance(0)
        return self.responses()


def statuses(responses) -> list[int]:
    return [status for _, status, _ in responses]


def failures(logs) -> list[str]:
    return [e["log_format"] for e in logs if "failed after" in e.get("log_format", "")]


def check_ends_in_failure(peer, msg_id, pending: int, logs) -> None:
    got = peer.run()
    assert statuses(got) == [0xFF00] * pending + [0xC001]
    assert {m for m, _, _ in got} == {msg_id}
    assert len(failures(logs)) == 1
    # the association goes on with its next request
    echo = peer.echo()
    assert peer.run() == [(echo, 0x0000, None)]
    assert not peer.assoc._ops


def test_find_that_raises_at_once():
    peer = Peer()

    def boom():
        raise RuntimeError("no catalog")
    peer.cluster.answer = boom
    with capturedLogs() as logs:
        msg_id = peer.find()
        check_ends_in_failure(peer, msg_id, 0, logs)


def test_find_whose_deferred_fails():
    peer = Peer()
    peer.cluster.answer = lambda: defer.fail(RuntimeError("database is locked"))
    with capturedLogs() as logs:
        msg_id = peer.find()
        check_ends_in_failure(peer, msg_id, 0, logs)


def test_an_error_in_found_is_answered():
    peer = Peer()
    peer.cluster.answer = lambda: defer.succeed(None)       # not rows: _found raises
    with capturedLogs() as logs:
        msg_id = peer.find()
        check_ends_in_failure(peer, msg_id, 0, logs)


def test_rows_that_fail_after_a_reactor_turn():
    peer = Peer()
    fail_at = FIND_BATCH + 5                # the first batch went out, then callLater
    peer.cluster.answer = lambda: defer.succeed(rows(100, fail_at))
    with capturedLogs() as logs:
        msg_id = peer.find()
        check_ends_in_failure(peer, msg_id, fail_at, logs)


def test_rows_that_fail_when_the_transport_resumes():
    peer = Peer()
    peer.cluster.answer = lambda: defer.succeed(rows(100, 3))
    with capturedLogs() as logs:
        peer.assoc.pauseProducing()             # the requestor reads nothing for now
        msg_id = peer.find()
        got = peer.run()
        assert statuses(got) == [0xFF00]        # one Pending, then it waits
        peer.assoc.resumeProducing()            # the rest runs from the resume
        got += peer.run()
        assert statuses(got) == [0xFF00] * 3 + [0xC001]
        assert {m for m, _, _ in got} == {msg_id}
        assert len(failures(logs)) == 1


@pytest.mark.parametrize("page", [None, 7])
def test_paused_and_resumed_many_times_every_row_then_success(page):
    """Every row once, in order, then Success, across pauses — and across pages when the
    matches come a page of 7 at a time (``catalog.findpages``)."""
    peer = Peer()
    peer.cluster.page = page
    peer.cluster.answer = lambda: defer.succeed(list(rows(50)))
    msg_id = peer.find()
    got = []
    for _ in range(60):
        peer.assoc.pauseProducing()
        got += peer.run()
        peer.assoc.resumeProducing()
    got += peer.run()
    assert statuses(got) == [0xFF00] * 50 + [0x0000]
    assert [str(ds.PatientID) for _, _, ds in got[:-1]] == [f"P{i}" for i in range(50)]
    assert {m for m, _, _ in got} == {msg_id}


def test_a_page_that_fails_ends_in_unable_to_process():
    peer = Peer()
    peer.cluster.page, peer.cluster.failing = 7, 3       # the third page fails
    peer.cluster.answer = lambda: list(rows(50))
    with capturedLogs() as logs:
        msg_id = peer.find()
        check_ends_in_failure(peer, msg_id, 14, logs)


@pytest.mark.filterwarnings("ignore::UserWarning")       # pydicom on the odd values
def test_values_their_vr_cannot_carry_are_sent_empty():
    peer = Peer()
    bad = [{"PatientID": "P1", "PatientName": "Müller^Jürgen", "StudyInstanceUID": "1.2.3",
            "SeriesNumber": "abc", "StudyDate": "二〇二四"},
           {"PatientID": "P2", "PatientName": "DOE", "StudyInstanceUID": "1.2.4",
            "SeriesNumber": "7", "StudyDate": "20240101"}]
    peer.cluster.answer = lambda: defer.succeed(bad)
    with capturedLogs() as logs:
        peer.find()
        got = peer.run()
    assert statuses(got) == [0xFF00, 0xFF00, 0x0000]
    first, second = got[0][2], got[1][2]
    assert str(first.PatientName) == "Müller^Jürgen"
    assert first.StudyDate in ("", None) and first.SeriesNumber in ("", None)
    assert str(second.SeriesNumber) == "7"
    assert str(second.StudyDate) == "20240101"
    assert not failures(logs)
    assert any("cannot carry" in e.get("log_format", "") for e in logs)
