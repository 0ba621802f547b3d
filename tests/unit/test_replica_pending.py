"""Pending copies on a replica holder (``transfer.replicas``): two copies of the same
bytes for one archive made before either is committed (a C-STORE sent twice at once, or
hinted hand-off redoing a copy whose group commit is still on its way) are two pending
copies, each committed by its own Commit; discarding one keeps the bytes the other
needs. Before, the second overwrote the first's slot: the first Commit took it and the
second was refused ('no pending copy', the writer's 'commit ... failed: the holder did
not record' at ERROR, the copy made again by hinted hand-off).

A real SQLite catalog for the guards; the archive and the overlay are stand-ins.
"""
from __future__ import annotations

import dataclasses
import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pacsp2p.transfer.replicas import ReplicaService
from pacsp2p.types import InstanceMeta, Stored

from test_delete_guards import UID, SyncCatalog, catalog, result

SHA = "cd" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"


class Archive:
    """Keeps one file per UID: the same bytes again are a duplicate."""
    name = "local"
    capabilities = frozenset({"store"})

    def __init__(self):
        self.held, self.discarded = set(), []

    def store(self, path, meta):
        again = meta.sop_instance_uid in self.held
        self.held.add(meta.sop_instance_uid)
        return defer.succeed(Stored("local", meta.sha256, 10, duplicate=again))

    def discard(self, uid, sha):
        self.discarded.append((uid, sha))
        self.held.discard(uid)
        return defer.succeed(None)


class Offer:
    name, sha256, data_size, size = "/nonexistent/offer.dcm", SHA, 10, 142

    def close(self):
        pass


class Overlay:
    class membership:
        members = {"peera": object(), "peerc": object()}
        dead: set = set()

        @classmethod
        def alive(cls, name):
            return name in cls.members and name not in cls.dead

    class bulk:
        @staticmethod
        def fetch_offer(member, token):
            return defer.succeed(Offer())


META = json.dumps(dataclasses.asdict(InstanceMeta(UID, CT, "1.2.840.10008.1.2.1", {
    "SOPInstanceUID": UID, "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"})))


def service(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cat = SyncCatalog(catalog(tmp_path))
    return ReplicaService("peerb", {"local": Archive()}, cat, Overlay(), Clock()), cat


def copy(svc, token, writer="peera"):
    stored = result(svc.replicate(writer, "local", UID, SHA, token, META))
    assert not isinstance(stored, Failure), stored
    return stored


def test_two_pending_copies_of_the_same_bytes_are_both_committed(tmp_path):
    svc, cat = service(tmp_path)
    first, second = copy(svc, "t1"), copy(svc, "t2")
    assert not first.duplicate and second.duplicate
    assert result(svc.commit("local", UID, SHA)) == 1
    got = result(svc.commit("local", UID, SHA))
    assert got == 1, got
    assert len(cat.recorded) == 2 and not svc.pending


def test_discarding_one_keeps_the_bytes_the_other_needs(tmp_path):
    svc, cat = service(tmp_path)
    archive = svc.archives["local"]
    copy(svc, "t1"), copy(svc, "t2")
    result(svc.discard("local", UID, SHA))             # the first writer gave up
    assert archive.discarded == []                      # the second one's copy stays
    assert result(svc.commit("local", UID, SHA)) == 1
    assert len(cat.recorded) == 1 and not svc.pending
    svc, _ = service(tmp_path / "again")
    archive = svc.archives["local"]
    copy(svc, "t3"), copy(svc, "t4")                    # both give up: the bytes go
    result(svc.discard("local", UID, SHA))
    assert archive.discarded == []
    result(svc.discard("local", UID, SHA))
    assert archive.discarded == [(UID, SHA)] and not svc.pending and not svc.more


def test_every_pending_copy_of_a_key_expires_in_one_pass(tmp_path):
    """Copies never committed (their writers died) are all dropped after PENDING_TTL,
    not one per key and janitor pass (60 s): 20 copies of one key left 19 behind after
    the first pass, the last only after 20 minutes (and a writer that sent the same copy
    again and again kept that list growing)."""
    from pacsp2p.transfer.replicas import PENDING_TTL
    svc, _ = service(tmp_path)
    archive = svc.archives["local"]
    for i in range(20):
        copy(svc, f"t{i}")
    svc.reactor.advance(PENDING_TTL + 1)
    svc._expire()
    assert not svc.pending and not svc.more
    assert archive.discarded == [(UID, SHA)]            # the bytes once, with the last


def test_a_dead_writers_pending_copy_is_recorded_not_dropped(tmp_path, monkeypatch):
    """The writer answers Success once its own copy is recorded with a hint per remote
    copy and the remote copies are durable; the holders record theirs ~50 ms later. A
    writer lost for good in between left its holders' copies pending, and each holder
    dropped its copy after PENDING_TTL: an acknowledged instance lost after one failure.
    Now a pending copy whose writer was declared dead is recorded at PENDING_TTL; one
    whose writer is alive is still dropped (its commit or discard was lost; the writer
    has its record and hints)."""
    from pacsp2p.transfer.replicas import PENDING_TTL
    monkeypatch.setattr(Overlay.membership, "dead", {"peerc"})
    svc, cat = service(tmp_path)
    archive = svc.archives["local"]
    copy(svc, "t1", writer="peerc")                    # its writer then died
    svc.reactor.advance(PENDING_TTL + 1)
    svc._expire()
    assert [loc.sop_instance_uid for loc in cat.recorded] == [UID]
    assert archive.discarded == [] and not svc.pending and not svc.more
    svc, cat = service(tmp_path / "alive")
    copy(svc, "t2", writer="peera")                    # alive: its discard was lost
    svc.reactor.advance(PENDING_TTL + 1)
    svc._expire()
    assert not cat.recorded and svc.archives["local"].discarded == [(UID, SHA)]


def test_a_dead_writers_copy_keeps_the_bytes_an_alive_writers_expired_copy_put_there(
        tmp_path, monkeypatch):
    """Two pending copies of the same bytes (a modality that sent the instance again to
    another peer, both writers pushing to this holder), both past PENDING_TTL in one
    pass: the first, whose writer is alive, is dropped; the second, whose writer was
    declared dead, is recorded. Before, the dropped copy's bytes were discarded (the
    other was taken out of pending, so nothing kept them) and the dead writer's copy
    recorded naming a file that was gone (review of 07f0ef3). In the other order the
    alive writer's copy is a duplicate and keeps nothing: the same outcome."""
    from pacsp2p.transfer.replicas import PENDING_TTL
    monkeypatch.setattr(Overlay.membership, "dead", {"peerc"})
    for n, writers in enumerate((("peera", "peerc"), ("peerc", "peera"))):
        svc, cat = service(tmp_path / str(n))
        archive = svc.archives["local"]
        for i, writer in enumerate(writers):
            copy(svc, f"t{i}", writer=writer)
        svc.reactor.advance(PENDING_TTL + 1)
        svc._expire()
        assert [loc.sop_instance_uid for loc in cat.recorded] == [UID], writers
        assert archive.discarded == [] and UID in archive.held, writers
        assert not svc.pending and not svc.more


def test_a_pending_copy_of_an_instance_deleted_since_goes_at_the_janitors_next_pass(
        tmp_path):
    """A writer killed right after its C-STOREs' Success, before its group commit,
    leaves its copies pending here; the study deleted meanwhile, the copies' files
    stayed PENDING_TTL (10 min) on this archive, though no commit could take them (a
    copy made before the deletion was learned is refused: ``_checked``):
    test_delete's stale-writer test failed on the files left at peerc. Now the janitor
    drops them at its next pass (60 s); a copy made after the deletion (sent again) is
    left for its commit."""
    from test_delete_guards import delete
    svc, cat = service(tmp_path)
    archive = svc.archives["local"]
    copy(svc, "t1")                  # its writer then killed before its commit
    svc.reactor.advance(1)
    delete(cat.conn)                 # the study deleted: this peer learns it
    svc._expire()
    assert archive.discarded == [(UID, SHA)] and not svc.pending and not svc.more
    svc.reactor.advance(1)
    copy(svc, "t2")                  # sent again after the delete
    svc._expire()
    assert list(svc.pending) == [("local", UID, SHA)]
    assert archive.discarded == [(UID, SHA)]
    assert result(svc.commit("local", UID, SHA)) == 1
