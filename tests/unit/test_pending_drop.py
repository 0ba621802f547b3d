"""A holder never commits a pending copy whose bytes a drop of the same copy is removing.

A pending copy dropped (its writer's ``Discard``, its TTL, a deletion) has its file
removed by the archive's pool, a thread hop later. A push of the same bytes kept in that
window is a *duplicate* of the file about to go (``keep`` links nothing new): noted
pending, committed at the writer's W=2 — Success to the storage SCU — then the file went
and the holder's catalog named a copy it does not have. Now such a duplicate is refused
(the writer's copy to this holder fails: its C-STORE goes elsewhere or fails, never
acknowledged on a copy that is gone). Real push port and TLS, a real embedded archive
whose pool is held busy to open the window, a real ``ReplicaService`` and ``Catalog``."""
from __future__ import annotations

import hashlib
import json
import threading

from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.dicom.header import dataset_offset
from pacsp2p.testing import datasets
from pacsp2p.transfer.pushport import COMMIT, DATA, END, HEAD, OPEN, _frame
from test_push_commits import Reactor, _in_thread, copies, serve_pushes
from test_push_port import UID, answer, certs, connect, meta_json  # noqa: F401 (a fixture)


def _part10(tmp_path):
    """(head, data set) of a real Part-10 file of ``UID`` (the archive reads it back)."""
    path = datasets.write(datasets.make_image("CT", size=32, SOPInstanceUID=UID),
                          tmp_path / "one.dcm")
    raw = path.read_bytes()
    at = dataset_offset(path)
    return raw[:at], raw[at:]


def push(sock, head, data):
    sock.sendall(_frame(OPEN, json.dumps({"archive": "local", "uid": UID,
                                          "meta": meta_json(UID)}).encode()) +
                 _frame(HEAD, head) + _frame(DATA, data) + _frame(END))
    return answer(sock)


def test_a_duplicate_kept_while_its_bytes_are_dropped_is_not_committed(certs, tmp_path):  # noqa: F811
    reactor = Reactor()
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor, threads=1)
    reactor.wait(archive.start())
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, archive)
    busy = threading.Event()
    try:
        sock = connect(certs, server.port)
        head, data = _part10(tmp_path)
        sha = hashlib.sha256(data).hexdigest()
        first = push(sock, head, data)
        assert first["sha256"] == sha and not first["duplicate"]
        key = ("local", UID, sha)
        assert key in svc.pending
        archive._pool.callInThread(busy.wait, 600)   # its one thread held: the drop waits
        dropped = svc.discard(*key)                   # the writer's Discard
        assert not dropped.called and key not in svc.pending
        again = push(sock, head, data)                      # the same bytes again, kept now
        busy.set()
        reactor.wait(dropped)
        sock.sendall(_frame(COMMIT, copies(key).encode()))
        seq = reactor.wait(_in_thread(reactor, answer, sock))["seqs"][0]
        assert seq is None, f"committed (fact {seq}) a copy whose file is " + (
            "there" if archive.path_for(UID).exists() else "gone")
        assert "refused" in again and "being removed" in again["refused"], again
        assert key not in svc.pending and not svc.dropping
        assert push(sock, head, data)["sha256"] == sha          # and then kept anew
        assert key in svc.pending and archive.path_for(UID).exists()
        sock.close()
    finally:
        busy.set()
        server.stopListening()
        reactor.wait(catalog.stop())
        archive.stop()
        for stop in reactor.shutdown:
            stop()
