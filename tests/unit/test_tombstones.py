"""Tombstones in the catalog (pacsp2p.catalog.tombstones), peers simulated in process.

Each simulated peer is one SQLite catalog written with the catalog's own functions
(``write_facts`` for its own facts, ``read_changes`` -> ``write_wire`` for anti-entropy),
so what is tested is exactly what runs: observed-remove (R1), the copies a peer holds
when it learns a delete (R2) and the follow-up it owes, hiding from C-FIND, the purge
queue, and a new copy after the delete staying.
"""
from __future__ import annotations

import json
import time

from pacsp2p.catalog import db, matching, tombstones
from pacsp2p.types import Query


class SimPeer:
    def __init__(self, tmp_path, name):
        self.name = name
        self.conn = db._connect(tmp_path / f"{name}.sqlite")
        db.create_schema(self.conn)
        tombstones.create_schema(self.conn)

    def seq(self) -> int:
        return db.vector(self.conn).get(self.name, 0)

    def store(self, uid, study="1.2.3", series="1.2.3.4", archive="local", size=100):
        seq = self.seq() + 1
        attrs = {"PatientID": "P1", "PatientName": "DOE^J", "StudyInstanceUID": study,
                 "SeriesInstanceUID": series, "Modality": "CT", "SOPInstanceUID": uid,
                 "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
        db.write_facts(self.conn, [(attrs, (uid, archive, self.name, "ab" * 32, size, seq))])
        return seq

    def delete(self, uid, reason="admin"):
        seq = self.seq() + 1
        vector = db.vector(self.conn)
        db.write_facts(self.conn, [(None, (uid, tombstones.MARKER_ARCHIVE, self.name, "",
                                           tombstones.MARKER_SIZE, seq))],
                       after=lambda c: tombstones.issued(c, self.name, uid, seq, vector,
                                                         reason))
        return seq

    def follow_up(self, uid):
        """What transfer.delete does for a follow-up: a tombstone with {self: seq}."""
        [(u, seq, reason)] = [f for f in tombstones.follow_ups(self.conn) if f[0] == uid]
        mine = self.seq() + 1
        db.write_facts(self.conn, [(None, (uid, "", self.name, "", -2, mine))],
                       after=lambda c: tombstones.issued(c, self.name, uid, mine,
                                                         {self.name: seq}, reason,
                                                         follow_up=True))

    def pull(self, other, origins=None):
        """Anti-entropy from *other*: every origin it is ahead on, through the wire."""
        mine = db.vector(self.conn)
        for origin, top in db.vector(other.conn).items():
            if origin == self.name or (origins and origin not in origins):
                continue
            after = mine.get(origin, 0)
            while after < top:
                batch = json.loads(json.dumps(db.read_changes(other.conn, origin, after,
                                                              2)))
                if not batch:
                    break
                db.write_wire(self.conn, batch, self.name)
                after = max(int(r[0]) for r in batch[1:])

    def live(self, uid) -> set[tuple[str, str]]:
        return {(p, a) for p, a in self.conn.execute(
            "SELECT peer, archive FROM locations WHERE SOPInstanceUID = ? AND size >= 0",
            (uid,))}

    def find(self, level="IMAGE", **keys) -> list:
        sql, params, _ = matching.build(Query(level, keys), [])
        return self.conn.execute(sql, params).fetchall()

    def purge(self):
        return {(u, a) for u, a, _s, _r in tombstones.to_purge(self.conn)}

    def rows(self) -> list:
        """The replicated content (what the digest hashes), for convergence."""
        out = []
        for table, key in (("patients", "PatientID"), ("studies", "StudyInstanceUID"),
                           ("series", "SeriesInstanceUID"), ("instances", "SOPInstanceUID"),
                           ("locations", "SOPInstanceUID, peer, archive")):
            cols = [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")
                    if r[1] != "available"]
            out += list(self.conn.execute(f"SELECT {', '.join(cols)} FROM {table} "
                                          f"ORDER BY {key}"))
        return out


def test_a_delete_hides_the_instance_everywhere_and_queues_the_own_copies(tmp_path):
    a, b, c = (SimPeer(tmp_path, n) for n in "abc")
    a.store("1.9.1")
    a.store("1.9.2")
    b.store("1.9.1")
    b.store("1.9.2")
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:
                x.pull(y)
    assert len(c.find(StudyInstanceUID="1.2.3")) == 2

    a.delete("1.9.1")
    assert a.live("1.9.1") == set()
    assert a.purge() == {("1.9.1", "local")}
    assert len(a.find(StudyInstanceUID="1.2.3")) == 1      # the other instance stays

    b.pull(a)
    c.pull(a)
    for p in (b, c):
        assert p.live("1.9.1") == set()
        assert [r[0] for r in p.find(StudyInstanceUID="1.2.3")] == [1]
    assert b.purge() == {("1.9.1", "local")}
    assert c.purge() == set()                                # holds no copy itself
    assert a.rows() == b.rows() == c.rows()
    a.delete("1.9.1")                                        # again: still one instance
    b.delete("1.9.2")
    for p in (a, b):
        c.pull(p)
    assert tombstones.summary(c.conn, "c")["tombstones"] == 2


def test_the_whole_study_goes_from_every_level(tmp_path):
    a = SimPeer(tmp_path, "a")
    a.store("1.9.1")
    a.store("1.9.2")
    a.store("1.8.1", study="1.2.4", series="1.2.4.1")
    a.delete("1.9.1")
    a.delete("1.9.2")
    assert a.find("STUDY", StudyInstanceUID="1.2.3") == []
    assert a.find("SERIES", SeriesInstanceUID="1.2.3.4") == []
    assert len(a.find("PATIENT", PatientID="P1")) == 1      # keeps its other study
    a.delete("1.8.1")
    assert a.find("PATIENT", PatientID="P1") == []


def test_a_peer_down_during_the_delete_removes_its_copy_when_it_returns(tmp_path):
    a, b, c = (SimPeer(tmp_path, n) for n in "abc")
    a.store("1.9.1")
    b.store("1.9.1")
    for x, y in ((a, b), (b, a), (c, a), (c, b)):
        x.pull(y)
    # b is down: a deletes, c learns it
    a.delete("1.9.1")
    c.pull(a)
    assert c.live("1.9.1") == set()
    # b returns; before it syncs it still shows the instance; then it learns
    assert b.live("1.9.1") == {("a", "local"), ("b", "local")}
    b.pull(c)                                    # the tombstone, from a neighbour
    assert b.live("1.9.1") == set() and b.find(SOPInstanceUID="1.9.1") == []
    assert b.purge() == {("1.9.1", "local")}
    assert tombstones.follow_ups(b.conn) == []   # a knew b's copy: no follow-up owed
    # c pulls b's old facts again (a fresh neighbour would): they stay removed
    c.pull(b)
    assert c.live("1.9.1") == set() and c.find(SOPInstanceUID="1.9.1") == []
    assert a.rows() == b.rows() == c.rows()


def test_a_copy_the_deleter_never_saw_goes_by_a_follow_up(tmp_path):
    a, b, c = (SimPeer(tmp_path, n) for n in "abc")
    a.store("1.9.1")
    b.pull(a)
    c.pull(a)
    b.store("1.9.1")            # e.g. a late hinted hand-off: a has not seen it
    a.delete("1.9.1")
    c.pull(b)                   # c sees b's copy before the tombstone...
    c.pull(a)
    assert c.live("1.9.1") == {("b", "local")}   # ...not covered: a never saw it
    b.pull(a)                   # b learns the delete: its own copy goes (R2)
    assert b.live("1.9.1") == set()
    assert b.purge() == {("1.9.1", "local")}
    assert [f[0] for f in tombstones.follow_ups(b.conn)] == ["1.9.1"]
    b.follow_up("1.9.1")
    assert tombstones.follow_ups(b.conn) == []
    c.pull(b)
    assert c.live("1.9.1") == set() and c.find(SOPInstanceUID="1.9.1") == []
    a.pull(b)
    assert a.rows() == b.rows() == c.rows()


def test_news_of_a_delete_never_removes_a_copy_sent_again(tmp_path):
    """A follow-up (or the same tombstone seen again from another neighbour) is no new
    deletion: copies made after a peer learned the delete stay."""
    a, b, c = (SimPeer(tmp_path, n) for n in "abc")
    a.store("1.9.1")
    b.pull(a)
    b.store("1.9.1")            # unseen by a
    a.delete("1.9.1")
    c.pull(a)                   # c learns the delete
    c.store("1.9.1")            # ...then the instance is sent again, kept on c
    b.pull(a)                   # b learns it: its own copy goes, a follow-up is owed
    b.follow_up("1.9.1")
    c.pull(b)                   # c learns b's follow-up: its new copy stays
    assert c.live("1.9.1") == {("c", "local")}
    assert len(c.find(SOPInstanceUID="1.9.1")) == 1
    a.pull(b)
    a.pull(c)
    b.pull(c)
    assert a.live("1.9.1") == b.live("1.9.1") == {("c", "local")}
    assert a.rows() == b.rows() == c.rows()


def test_sending_again_after_a_delete_stores_again(tmp_path):
    a, b = SimPeer(tmp_path, "a"), SimPeer(tmp_path, "b")
    a.store("1.9.1")
    b.store("1.9.1")
    a.pull(b)
    b.pull(a)
    a.delete("1.9.1")
    b.pull(a)
    assert b.find(SOPInstanceUID="1.9.1") == []
    # sent again: new facts, after the tombstone
    a.store("1.9.1")
    b.store("1.9.1")
    b.pull(a)
    a.pull(b)
    for p in (a, b):
        assert p.live("1.9.1") == {("a", "local"), ("b", "local")}
        assert len(p.find(SOPInstanceUID="1.9.1")) == 1
        assert len(p.find("STUDY", StudyInstanceUID="1.2.3")) == 1
    # a third peer joining late gets old facts, the tombstone and the new facts: the
    # same view
    c = SimPeer(tmp_path, "c")
    c.pull(a)
    c.pull(b)
    assert c.live("1.9.1") == {("a", "local"), ("b", "local")}
    assert a.rows() == b.rows() == c.rows()
    # and deleted again
    b.delete("1.9.1")
    a.pull(b)
    c.pull(b)
    assert a.live("1.9.1") == c.live("1.9.1") == set()


def test_wire_payloads_are_cleaned(tmp_path):
    assert tombstones.clean_vector({"a": 3, "b": -1, "c": "x", 7: 1, "d": True}) == {"a": 3}
    assert tombstones.clean_vector("nope") == {}
    assert tombstones.clean_reason("ok\nnot\x00") == "ok?not?"
    a, b = SimPeer(tmp_path, "a"), SimPeer(tmp_path, "b")
    a.store("1.9.1")
    b.pull(a)
    a.delete("1.9.1")
    batch = db.read_changes(a.conn, "a", 1, 10)
    batch[0][tombstones.WIRE_KEY] = {"1.9.1": ["garbage", 5, None, "x"]}   # hostile
    db.write_wire(b.conn, batch, "b")
    # the marker still counts (R2 on b's own copies; b holds none); nothing crashed
    assert tombstones.tombstoned(b.conn, ["1.9.1", "1.9.2"]) == {"1.9.1"}


def test_a_copy_pushed_before_the_delete_and_recorded_after_it_goes_at_once(tmp_path):
    """A push (repair, hand-off) received before this peer learned the delete but
    recorded after it: R2 ran before the copy was in the catalog, so the record itself
    removes it (``late_copy``, in the record's transaction) — a follow-up owed, the file
    queued for the purge. A copy received after the news is a copy sent again: kept."""
    a, b, c = (SimPeer(tmp_path, n) for n in "abc")
    a.store("1.9.1")
    b.pull(a)
    received = time.monotonic() - 1     # the push arrived here before the news
    a.delete("1.9.1")
    b.pull(a)                           # b learns the delete, holding no copy yet

    def late(uid, since):
        seq = b.seq() + 1
        attrs = {"PatientID": "P1", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4",
                 "Modality": "CT", "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                 "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
        gone = []
        db.write_facts(b.conn, [(attrs, (uid, "local", "b", "ab" * 32, 100, seq))],
                       after=lambda conn: gone.append(tombstones.late_copy(conn, "b", uid,
                                                                           since)))
        return gone[0]

    assert late("1.9.1", received) is True
    assert b.live("1.9.1") == set() and b.find(SOPInstanceUID="1.9.1") == []
    assert b.purge() == {("1.9.1", "local")}
    assert [f[0] for f in tombstones.follow_ups(b.conn)] == ["1.9.1"]
    b.follow_up("1.9.1")
    c.pull(a)
    c.pull(b)
    assert c.live("1.9.1") == set()
    a.pull(b)
    assert a.rows() == b.rows() == c.rows()
    # received after the news: sent again, kept
    assert late("1.9.1", time.monotonic() + 1) is False
    assert b.live("1.9.1") == {("b", "local")}
