"""A catalog restored from an older backup is mended (``overlay.reclaim``): facts it
numbered anew after the restore (numbers the others already hold, for other content)
are re-issued above everything the cluster holds, and its own facts the others hold
are pulled back — so both catalogs end up with the same facts.

Real SQLite catalogs written with the catalog's own functions (``test_sync_batched``'s
synchronous ``Catalog``, plus the three things ``Reclaim`` asks of a catalog); the pulls
go through ``sync.serve`` / ``sync.AntiEntropy.pull`` as on the wire, synchronously.
"""
from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from pacsp2p.catalog import db
from pacsp2p.overlay import sync
from pacsp2p.overlay import reclaim as reclaim_module
from pacsp2p.overlay.reclaim import Reclaim

from test_sync_batched import Bulk, Catalog, Member, facts, pulled


class Restorable(Catalog):
    def __init__(self, tmp_path, peer, conn=None):
        super().__init__(tmp_path, peer)
        if conn is not None:                 # restored: this file is the backup's copy
            self.conn = conn
            self.vector = db.vector(conn)
        self.opened_at = self.vector.get(peer, 0)
        self.own_seq = 0

    def own_counter(self):
        return max(self.own_seq, self.vector.get(self.peer, 0))

    def store(self, n, origin=None, study="1.2.3"):
        """*n* facts of ours, of new instances of *study*, numbered past any skip."""
        seq = self.own_counter()
        db.write_facts(self.conn, facts(self.peer, range(seq + 1, seq + n + 1), study,
                                        prefix=f"{study}.1"))
        self.vector[self.peer] = seq + n

    def reissue(self, after, upto, start):
        n, last = db.renumber(self.conn, self.peer, after, upto, start)
        self.own_seq = max(self.own_seq, last)
        self.vector = db.vector(self.conn)
        return defer.succeed((n, last))

    def forget(self, uid):
        """Our copy of *uid* is found gone (the catalog did not know it): a fact, size -1."""
        seq = self.own_counter() + 1
        self.conn.execute("INSERT INTO locations (SOPInstanceUID, archive, peer, sha256, "
                          "size, available, seq) VALUES (?, 'local', ?, ?, -1, 1, ?)",
                          (uid, self.peer, "ab" * 32, seq))
        self.vector[self.peer] = seq

    def rows(self):
        return set(self.conn.execute("SELECT SOPInstanceUID, archive, peer, sha256, size "
                                     "FROM locations"))


class Pulls(Bulk):
    def pull_body(self, member, vector, limit, own=0):
        self.asked.append(dict(vector))
        return sync.serve(self.other, vector, self.asker, limit, own)


class Live(Member):
    state = "alive"


def restored(tmp_path, new: int, epoch: int | None = None):
    """c stores 5 facts, is backed up, stores 5 more (which a pulls), is restored from
    the backup and started (numbers skipped, as ``Catalog.start`` does), stores *new*
    new instances and finds a copy it lost gone: (a, c, c's Reclaim, its clock, the
    facts lost, c's new ones)."""
    c = Restorable(tmp_path, "c")
    c.store(5)
    backup = db._connect(tmp_path / "backup.sqlite")
    c.conn.backup(backup)
    c.store(5, study="1.2.4")                       # 6..10: lost with the restore
    lost = {r for r in c.rows() if r[0].startswith("1.2.4.")}
    a = Restorable(tmp_path, "a")
    a.store(3)
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    assert a.vector["c"] == 10

    (tmp_path / "restored").mkdir()
    c = Restorable(tmp_path / "restored", "c", backup)     # restarted from the backup
    clock = Clock()
    reclaim = Reclaim(c, sync.AntiEntropy(c, Pulls(a, "c")), {"a": Live("a")}, clock)
    if epoch is not None:
        reclaim.epoch = epoch
    c.own_seq = c.numbers_from(c.opened_at)
    c.store(new, study="1.2.5")                     # new content, numbered after 5
    c.forget("1.2.4.1.8")                           # not even held: a newer fact of it
    mine = {r for r in c.rows() if r[2] == "c"} - {r for r in a.rows()}
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    return a, c, reclaim, clock, lost, mine


def mended(a, c, reclaim, lost, new):
    """Both catalogs, once c mended and a pulled again, hold the same facts."""
    assert not reclaim.busy and not reclaim.probes, reclaim.status()
    c.store(1, study="1.2.6")                       # a fact of after the mend
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    pulled(sync.AntiEntropy(c, Pulls(a, "c")).pull(Member("a")))
    assert a.rows() == c.rows()                     # the same facts, both sides
    assert new <= a.rows()
    assert {r[0] for r in lost} <= {r[0] for r in c.rows()}
    assert ("1.2.4.1.8", "local", "c", "ab" * 32, -1) in a.rows()      # newer kept
    assert a.vector == c.vector
    seqs = [s for (s,) in c.conn.execute("SELECT seq FROM locations WHERE peer = 'c'")]
    assert len(seqs) == len(set(seqs))              # no number given twice
    reclaim.heard("a", a.vector["c"])               # nothing more to mend
    assert not reclaim.busy and not reclaim.probes


def test_a_restored_catalog_numbers_a_new_epoch_and_pulls_back_what_it_lost(tmp_path):
    a, c, reclaim, clock, lost, new = restored(tmp_path, 3)
    assert new <= a.rows()                          # new to a: taken at once
    reclaim.member_changed(Live("a"), "alive")      # a seen: asked for the gap
    clock.advance(0)
    mended(a, c, reclaim, lost, new)
    assert reclaim.mends == 0 and reclaim.reissued == 0, reclaim.status()
    assert reclaim.pulled_to == 10 and reclaim.said == 1


def test_facts_numbered_as_the_clusters_are_reissued_above_them(tmp_path, monkeypatch):
    """No epoch (a clock set back; GAP 1 here): c's new facts take numbers a holds (6,
    7); a's vector shows more than c's counter: the counter skips past it, they are
    re-issued, and what c lost is pulled back (then re-issued too)."""
    monkeypatch.setattr(reclaim_module, "GAP", 1)
    a, c, reclaim, clock, lost, new = restored(tmp_path, 1, epoch=0)
    assert not new <= a.rows()                      # the harm: ignored as already held
    reclaim.member_changed(Live("a"), "alive")      # no gap to ask for: nothing
    clock.advance(0)
    reclaim.heard("a", a.vector["c"])               # then: 10 > 7
    mended(a, c, reclaim, lost, new)
    assert reclaim.mends == 1 and reclaim.reissued == 2 + 4, reclaim.status()  # 6..10 but 8
    assert c.own_counter() > 11


def test_a_lone_peer_or_one_with_no_lost_facts_mends_nothing(tmp_path):
    c = Restorable(tmp_path, "c")
    c.store(4)
    reclaim = Reclaim(c, None, {}, Clock())
    for top in (0, 3, 4):
        reclaim.heard("a", top)
    assert reclaim.mends == 0 and reclaim.said == 0 and not reclaim.probes
    assert c.own_counter() == 4


def test_a_pull_back_is_answered_with_the_askers_facts_in_its_range_only(tmp_path):
    x = Restorable(tmp_path, "x")
    x.store(4)
    c = Restorable(tmp_path, "c")
    c.store(9)
    pulled(sync.AntiEntropy(x, Pulls(c, "x")).pull(Member("c")))
    body = pulled(sync.serve(x, {"c": 3, "x": 0}, "c", 100, own=7))
    vector, parts = sync.decode_answer(body)
    assert vector == {"x": 4, "c": 9}
    assert [(o, [r[0] for r in json.loads(raw)[1:]]) for o, raw in parts] == \
        [("c", [4, 5, 6, 7])]
    body = pulled(sync.serve(x, {"c": 3, "x": 0}, None, 100, own=7))    # nobody's
    assert sync.decode_answer(body)[1] == []


def test_a_member_that_cannot_answer_is_asked_three_times_then_left(tmp_path):
    c = Restorable(tmp_path, "c")
    c.store(4)

    class Down:
        asked = 0

        def pull(self, member, own=None):
            Down.asked += 1
            return defer.fail(ConnectionError("refused"))
    clock = Clock()
    reclaim = Reclaim(c, Down(), {"a": Live("a")}, clock)
    reclaim.member_changed(Live("a"), "alive")
    clock.advance(0)
    for _ in range(5):
        clock.advance(5)
    assert Down.asked == 3 and not reclaim.busy and not clock.getDelayedCalls()


def test_a_rebuilt_catalog_pulls_back_its_old_facts_and_their_rows(tmp_path):
    """c's catalog is lost and rebuilt from its archive: the files do not say when each
    instance was received, so its rows carry stamp 0 and the files' greater values
    (RACE^V2), while a holds c's old facts and the row of the newer receipt (RACE^V1,
    stamp 2000). At c's first start every fact of its own that a holds is pulled back,
    with their rows. Before: nothing was pulled back (the rebuilt facts are numbered
    above the lost ones), and c answered RACE^V2, a RACE^V1, for ever."""
    from pacsp2p.adapters.embedded import EmbeddedArchive
    from pacsp2p.catalog import schema, tombstones
    from pacsp2p.catalog.facts import STAMP
    from pacsp2p.catalog.rebuild import rebuild
    from pacsp2p.dicom.header import read_meta
    from pacsp2p.testing import datasets

    archive = EmbeddedArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    archive._prepare()
    c = Restorable(tmp_path, "c")
    for seq, (v, stamp) in enumerate(((1, 2000), (2, 1000)), 1):
        path = datasets.write(datasets.make_image(
            "CT", size=8, seed=v, PatientName=f"RACE^V{v}", PatientID="P1",
            StudyInstanceUID="1.2.77", SeriesInstanceUID="1.2.77.1",
            SOPInstanceUID=f"1.2.77.1.{v}"), tmp_path / "in" / f"{v}.dcm")
        meta = read_meta(path)
        stored = archive.keep(path, meta)
        db.write_facts(c.conn, [({**db.meta_attributes(meta), STAMP: stamp},
                                 (meta.sop_instance_uid, "local", "c", stored.sha256,
                                  stored.size, seq))])
    c.vector = db.vector(c.conn)
    (tmp_path / "a").mkdir()
    a = Restorable(tmp_path / "a", "a")
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    name = "SELECT PatientName, stamp FROM patients"
    assert a.conn.execute(name).fetchall() == [("RACE^V1", 2000)]

    c.conn.close()                                  # lost
    path = tmp_path / "c.sqlite"
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"c.sqlite{suffix}").unlink(missing_ok=True)
    assert rebuild(path, [archive], "c", progress=lambda line: None) == 2
    conn = db._connect(path)                        # opened as Catalog.start opens it
    db.create_schema(conn)
    tombstones.create_schema(conn)
    assert conn.execute(name).fetchall() == [("RACE^V2", 0)]   # the files' version
    (tmp_path / "rebuilt").mkdir()
    c = Restorable(tmp_path / "rebuilt", "c", conn)
    c.rebuilt = schema.take_rebuilt_mark(conn)      # what Catalog.start reads
    assert c.rebuilt
    clock = Clock()
    reclaim = Reclaim(c, sync.AntiEntropy(c, Pulls(a, "c")), {"a": Live("a")}, clock)
    reclaim.member_changed(Live("a"), "alive")      # a seen: asked for our facts
    clock.advance(0)
    assert c.conn.execute(name).fetchall() == [("RACE^V1", 2000)]
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    assert a.conn.execute(name).fetchall() == [("RACE^V1", 2000)]
    assert db.digest(a.conn) == db.digest(c.conn)
