"""The copy paths' guards against deleted instances (``transfer.delete``, ``replicas``).

A replica holder refuses a copy of a copy (``Replicate`` without the writer's header:
hinted hand-off, repair) of an instance deleted there while it knows no live copy of
it, and refuses to commit a copy made before it learned of the deletion (a late push);
a copy sent again after the delete (the writer's header given) is kept. The catalog is
a real SQLite catalog written with the catalog's functions; the rest are stand-ins.
"""
from __future__ import annotations

import time

from twisted.internet import defer, task
from twisted.python.failure import Failure

from pacsp2p.catalog import db, tombstones
from pacsp2p.overlay.commands import ReplicaRefused
from pacsp2p.transfer.delete import copy_allowed, pushed_before
from pacsp2p.transfer.replicas import ReplicaService
from pacsp2p.types import InstanceMeta, Stored

UID = "1.2.3.4.5"


class SyncCatalog:
    """What the guards use of a Catalog (``read``), on one connection, synchronously."""

    def __init__(self, conn):
        self.conn = conn
        self.recorded = []

    def read(self, fn):
        return defer.succeed(fn(self.conn))

    def record(self, meta, location, hints=(), then=None):
        self.recorded.append(location)
        return defer.succeed(1)


class Archive:
    name = "local"
    capabilities = frozenset({"store"})

    def __init__(self):
        self.discarded = []

    def discard(self, uid, sha):
        self.discarded.append((uid, sha))
        return defer.succeed(None)


class Overlay:
    class membership:
        members = {"peera": object()}


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    return out[0]


def catalog(tmp_path):
    conn = db._connect(tmp_path / "c.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    attrs = {"PatientID": "P", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4",
             "SOPInstanceUID": UID, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    db.write_facts(conn, [(attrs, (UID, "local", "peerb", "ab" * 32, 10, 1))])
    return conn


def delete(conn, seq=2):
    db.write_facts(conn, [(None, (UID, "", "peerb", "", -2, seq))],
                   after=lambda c: tombstones.issued(c, "peerb", UID, seq, {}, "test"))


def service(conn):
    cat = SyncCatalog(conn)
    clock = task.Clock()
    clock.advance(1e6)      # a reactor's clock that is neither time.time nor monotonic
    return ReplicaService("peerb", {"local": Archive()}, cat, Overlay(), clock), cat


def test_copy_allowed_and_pushed_before(tmp_path):
    conn = catalog(tmp_path)
    cat = SyncCatalog(conn)
    assert result(copy_allowed(cat, UID)) is True           # never deleted
    before = time.monotonic()       # copies' times: this process's monotonic clock
    delete(conn)
    assert result(copy_allowed(cat, UID)) is False          # deleted, no live copy
    assert result(pushed_before(cat, UID, before - 1)) is True
    assert result(pushed_before(cat, UID, time.monotonic() + 1)) is False
    # sent again: a live copy again, copies of it are fine
    attrs = {"SOPInstanceUID": UID, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
             "SeriesInstanceUID": "1.2.3.4"}
    db.write_facts(conn, [(attrs, (UID, "local", "peerb", "ab" * 32, 10, 3))])
    assert result(copy_allowed(cat, UID)) is True


def test_a_copy_of_a_deleted_copy_is_refused(tmp_path):
    conn = catalog(tmp_path)
    delete(conn)
    svc, _ = service(conn)
    got = result(svc.replicate("peera", "local", UID, "", "token", None))
    assert isinstance(got, Failure) and got.check(ReplicaRefused)
    assert "deleted" in got.getErrorMessage()


def test_a_late_push_is_not_committed_a_new_one_is(tmp_path):
    conn = catalog(tmp_path)
    svc, cat = service(conn)
    meta = InstanceMeta(UID, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    stored = Stored("local", "cd" * 32, 10)
    now = svc.reactor.seconds
    svc.pending[("local", UID, "cd" * 32)] = (meta, stored, now() - 60, "peera")   # earlier
    delete(conn)
    got = result(svc.commit("local", UID, "cd" * 32))
    assert isinstance(got, Failure) and got.check(ReplicaRefused)
    assert svc.archives["local"].discarded == [(UID, "cd" * 32)]
    assert not cat.recorded and not svc.pending
    # a copy made after this peer learned of the delete (sent again): committed
    svc.pending[("local", UID, "cd" * 32)] = (meta, stored, now() + 1, "peera")
    assert result(svc.commit("local", UID, "cd" * 32)) == 1
    assert [loc.sop_instance_uid for loc in cat.recorded] == [UID]
