"""A catalog restored from an older backup is mended (``overlay.reclaim``): facts it
numbered anew after the restore (numbers the others already hold, for other content)
are re-issued above everything the cluster holds, and its own facts the others hold
are pulled back — so both catalogs end up with the same facts.

Real SQLite catalogs written with the catalog's own functions (``test_sync_batched``'s
synchronous ``Catalog``, plus the three things ``Reclaim`` asks of a catalog); the pulls
go through ``sync.serve`` / ``sync.AntiEntropy.pull`` as on the wire, synchronously.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from pacsp2p.catalog import db, facts
from pacsp2p.overlay import sync
from pacsp2p.overlay.reclaim import GAP, Reclaim

from test_sync_batched import Bulk, Catalog, Member, pulled


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
        rows = []
        for i in range(n):
            seq += 1
            uid = f"{study}.1.{seq}"
            attrs = {"PatientID": "P1", "PatientName": "DOE^J", "StudyInstanceUID": study,
                     "SeriesInstanceUID": study + ".1", "Modality": "CT",
                     "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                     "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
            rows.append((attrs, (uid, "local", self.peer, "ab" * 32, 100, seq)))
        db.write_facts(self.conn, rows)
        self.vector[self.peer] = seq

    def reissue(self, after, upto, start):
        n, last = facts.renumber(self.conn, self.peer, after, upto, start)
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
    def pull_body(self, member, vector, limit, own=False):
        self.asked.append(dict(vector))
        return sync.serve(self.other, vector, self.asker, limit, own)


class Live(Member):
    state = "alive"


def test_facts_numbered_after_a_restore_reach_the_others_and_the_lost_ones_come_back(
        tmp_path):
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
    c.store(3, study="1.2.5")                       # numbered 6..8 again: new content
    c.forget(sorted(lost)[0][0])                    # not even held: a newer fact of it
    new = {r for r in c.rows() if r[2] == "c"} - {r for r in a.rows()}
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    assert not new <= a.rows()                      # the harm: ignored as already held

    to_c = sync.AntiEntropy(c, Pulls(a, "c"))
    asked = []
    clock = Clock()
    reclaim = Reclaim(c, to_c, {"a": Live("a")}, asked.append, clock)
    reclaim.member_changed(Live("a"), "alive")
    clock.advance(0)
    assert asked == [["a"]]
    reclaim.heard("a", a.vector["c"])               # a Vector answer, or a pull
    assert reclaim.mends == 1 and reclaim.due is None, reclaim.status()
    assert c.own_counter() > 10 + GAP
    c.store(1, study="1.2.6")                       # a fact of after the mend
    pulled(sync.AntiEntropy(a, Pulls(c, "a")).pull(Member("c")))
    pulled(sync.AntiEntropy(c, Pulls(a, "c")).pull(Member("a")))
    assert a.rows() == c.rows()                     # the same facts, both sides
    assert new <= a.rows()
    assert {r[0] for r in lost} <= {r[0] for r in c.rows()}
    assert (sorted(lost)[0][0], "local", "c", "ab" * 32, -1) in a.rows()  # newer kept
    assert a.vector == c.vector
    reclaim.heard("a", a.vector["c"])               # nothing more to mend
    assert reclaim.mends == 1


def test_a_lone_peer_or_one_with_no_lost_facts_mends_nothing(tmp_path):
    c = Restorable(tmp_path, "c")
    c.store(4)
    reclaim = Reclaim(c, None, {}, lambda names: None, Clock())
    for top in (0, 3, 4):
        reclaim.heard("a", top)
    assert reclaim.mends == 0 and reclaim.due is None
    assert c.own_counter() == 4
