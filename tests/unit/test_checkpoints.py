"""The catalog's WAL checkpoints run in a thread of their own (``catalog.checkpoints``),
never in the commit of a lone instance's fact (``record_now``: in the C-STORE's critical
path), and they keep the WAL bounded; a catalog so written closes cleanly and holds
every fact. Real SQLite, real threads."""
from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from pacsp2p.catalog.checkpoints import BACKSTOP, EVERY
from pacsp2p.catalog.db import Catalog, stored_location
from pacsp2p.catalog.facts import new_stamp, stamped
from pacsp2p.types import InstanceMeta, Stored
from tests.unit.test_catalog_scale import ThreadReactor

MR = "1.2.840.10008.5.1.4.1.1.4"


def meta(i: int) -> InstanceMeta:
    return InstanceMeta(f"1.2.3.{i}", MR, "1.2.840.10008.1.2.1", {
        "PatientID": "P1", "PatientName": "DOE^JANE", "StudyInstanceUID": "1.2.3.1",
        "SeriesInstanceUID": "1.2.3.1.1", "SOPInstanceUID": f"1.2.3.{i}",
        "Modality": "MR", "InstanceNumber": str(i)}, 10_000, f"{i:064x}", 10_000)


def record(cat: Catalog, i: int) -> int:
    """As the one-job path does it: in a thread that is not the reactor (here, the
    test's), on the writer's connection."""
    m = meta(i)
    return cat.record_now(stamped(m, new_stamp()),
                          stored_location(m, Stored("local", m.sha256, m.data_size), "p"))


def wal(path) -> tuple[int, int]:
    """(the WAL header's checkpoint sequence number — raised each time the WAL restarts
    after a checkpoint —, its file's size in frames), read without a checkpoint."""
    with open(f"{path}-wal", "rb") as f:
        head = f.read(32)
        size = f.seek(0, 2)
    return struct.unpack(">4I", head[:16])[3], (size - 32) // (struct.unpack(
        ">4I", head[:16])[2] + 24)


@pytest.fixture
def opened(tmp_path):
    """(reactor, catalog, path, WAL restarts and frames after its first fact, WAL frames
    per commit of one more instance of the same series); stopped afterwards."""
    reactor = ThreadReactor()
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path, reactor, peer="p")
    reactor.wait(cat.start())
    try:
        record(cat, 0)
        restarts, frames = wal(path)
        for i in range(1, 11):
            record(cat, i)
        yield reactor, cat, path, restarts, frames, (wal(path)[1] - frames) / 10
    finally:
        if not cat.checkpoints.stopped:         # (not stopped by the test)
            reactor.wait(cat.stop())


def test_a_commit_of_record_now_never_checkpoints(opened):
    """Without the checkpoint thread told of the commits, the WAL only grows: the
    writer's own commits did not copy it back and restart it (SQLite's default did so
    every 1000 pages, in the commit that crossed them: in a C-STORE's critical path)."""
    _, cat, path, restarts, frames, per_commit = opened
    assert per_commit >= 2
    n = int(3000 / per_commit)                  # ~3000 frames: < BACKSTOP
    assert n * per_commit < BACKSTOP * 3 / 4
    for i in range(11, 11 + n):
        record(cat, i)
    assert wal(path)[0] == restarts, "a commit checkpointed, and the WAL restarted"
    assert wal(path)[1] >= frames + 2500


def test_checkpoints_run_in_their_thread_and_keep_the_wal_bounded(opened):
    """Told of each commit, the checkpoint thread copies the WAL back every EVERY
    commits: the WAL restarts each time and its file stays at EVERY commits' frames;
    the catalog closes with every fact in its database file."""
    reactor, cat, path, restarts, frames, per_commit = opened
    n = 10 * EVERY
    for i in range(11, n):
        cat.committed_now(record(cat, i))        # the reactor's part (here: this thread)
        if cat.checkpoints.running is not None:
            reactor.wait(cat.checkpoints.running)
    assert cat.checkpoints.done >= n // EVERY - 1
    assert wal(path)[0] >= restarts + n // EVERY - 2
    assert wal(path)[1] < frames + 1.5 * EVERY * per_commit
    reactor.wait(cat.stop())
    assert cat.checkpoints.pool.joined
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == n
    finally:
        conn.close()


class ClockedReactor(ThreadReactor):
    """ThreadReactor with a clock the test moves (``task.Clock``): callLater, seconds."""

    def __init__(self):
        from twisted.internet import task
        super().__init__()
        self.clock = task.Clock()
        self.callLater, self.seconds = self.clock.callLater, self.clock.seconds


def test_a_checkpoint_waits_for_a_second_without_commits_not_a_second_from_the_first(
        tmp_path):
    """Commits every 0.2 s (a replica holder of a stream at 32 peers: one copy each
    0.2 s, a pull now and then), fewer than EVERY: no checkpoint while they come — each
    would be two fsyncs beside the copies' own, at 31 holders at once; timed from the
    first commit, one ran every IDLE s of the stream (5 in these 5 s) — then one IDLE s
    after the last; the catalog closes with every fact."""
    reactor = ClockedReactor()
    path = tmp_path / "catalog.sqlite"
    cat = Catalog(path, reactor, peer="p")
    reactor.wait(cat.start())
    try:
        ran = []
        for i in range(25):                      # 5 s, 25 < EVERY commits
            cat.committed_now(record(cat, i))
            reactor.clock.advance(0.2)
            if cat.checkpoints.running is not None:
                ran.append(reactor.clock.seconds())
                reactor.wait(cat.checkpoints.running)
        assert 25 < EVERY
        assert ran == [], ran
        reactor.clock.advance(0.5)
        assert cat.checkpoints.running is None and cat.checkpoints.done == 0
        reactor.clock.advance(0.5)               # IDLE s after the last commit
        assert cat.checkpoints.running is not None
        reactor.wait(cat.checkpoints.running)
        assert cat.checkpoints.done == 1
    finally:
        reactor.wait(cat.stop())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 25
    finally:
        conn.close()
