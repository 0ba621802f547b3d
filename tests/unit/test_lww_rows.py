"""What the last-writer-wins rows must not forget (``catalog.rows``): a row emptied by
a delete keeps its stamp, a patient emptied by a move leaves the view, and rows that
differed before the stamps (schema < 5) are announced again once after the upgrade.

Real SQLite catalogs written with the catalog's own functions, pulls as a pull makes
them (``read_changes`` -> ``check_wire`` -> ``write_wires``, from where the puller
stands), a deletion as ``transfer.delete`` records it (a marker fact and
``tombstones.issued``). No mocks.
"""
from __future__ import annotations

import itertools

from pacsp2p.catalog import db, schema, tombstones
from tests.unit.test_facts_lww import Peer as _Peer
from tests.unit.test_facts_lww import attrs


class Peer(_Peer):
    def __init__(self, tmp_path, name):
        super().__init__(tmp_path, name)
        self.known: dict[str, int] = {}

    def pull(self, other: Peer) -> None:
        """What *other* holds that this peer does not, every origin, as a pull does."""
        mine = db.vector(self.conn)
        for origin, top in db.vector(other.conn).items():
            if top > mine.get(origin, 0):
                rows = db.read_changes(other.conn, origin, mine.get(origin, 0), 10000)
                db.check_wire(rows)
                db.write_wires(self.conn, [rows], self.name)
        self.parents.clear()

    def delete(self, uid: str) -> None:
        """An admin delete of *uid* here: the marker fact and its tombstone."""
        self.seq = max(self.seq, db.vector(self.conn).get(self.name, 0)) + 1
        seq, vector = self.seq, db.vector(self.conn)
        db.write_facts(self.conn, [(None, (uid, "", self.name, "", -2, seq))], after=lambda c:
                       tombstones.issued(c, self.name, uid, seq, vector, "admin"))
        self.parents.clear()

    def patients(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT PatientID FROM patients ORDER BY 1")]


def test_a_series_emptied_by_a_delete_keeps_its_stamp(tmp_path):
    """b V1@1000, a V2@2000 in one series; c pulls both, then a deletes its instance;
    c learns the delete, a pulls b's instance (V1, older). Before: a forgot the row with
    its instance and took V1, c kept V2 (both holding b's instance only), for ever."""
    a, b, c = (Peer(tmp_path, n) for n in "abc")
    series = {"SeriesInstanceUID": "1.20.9"}
    a.receive(attrs(2, 2000, "1.20.2", **series))
    b.receive(attrs(1, 1000, "1.20.1", **series))
    c.pull(a)
    c.pull(b)
    a.delete("1.20.2")
    assert a.patients() == []                  # the view of a: nothing left
    c.pull(a)
    a.pull(b)
    b.pull(a)
    b.pull(c)
    for p in (a, b, c):
        assert p.name_of() == "RACE^V2", p.name
        assert p.conn.execute("SELECT SOPInstanceUID FROM instances").fetchall() == \
            [("1.20.1",)]
    assert a.rows() == b.rows() == c.rows()
    assert db.digest(a.conn) == db.digest(b.conn) == db.digest(c.conn)


def test_a_deleted_study_is_not_answered_and_its_row_comes_back_with_a_new_instance(
        tmp_path):
    """A retired row is out of the view (C-FIND reads the tables) and an instance of it
    received later brings it back with the greater of the two versions."""
    a = Peer(tmp_path, "a")
    a.receive(attrs(2, 2000, "1.22.2"))
    a.delete("1.22.2")
    assert a.rows() == [[], [], []]
    assert a.conn.execute("SELECT count(*) FROM gone_rows WHERE level != 'IMAGE'"
                          ).fetchone() == (3,)
    a.receive(attrs(1, 1000, "1.22.1"))        # older than what was deleted
    assert a.name_of() == "RACE^V2"
    a.receive(attrs(1, 3000, "1.22.3"))        # newer
    assert a.name_of() == "RACE^V1"
    assert a.conn.execute("SELECT count(*) FROM gone_rows WHERE level != 'IMAGE'"
                          ).fetchone() == (1,)     # its series


def test_a_patient_emptied_by_a_move_leaves_the_view_at_every_peer(tmp_path):
    """One study stored under P1 at a (1000), then re-sent under P2 at b (2000): every
    peer, whatever the order of its pulls, answers P2 alone. Before: every peer kept P1,
    a patient without studies (a C-FIND at PATIENT level answered it, 0 studies)."""
    move = {"SeriesInstanceUID": "1.21.9"}
    want = None
    for n, order in enumerate(itertools.permutations("ab")):
        d = tmp_path / str(n)
        d.mkdir()
        a, b, c = Peer(d, "a"), Peer(d, "b"), Peer(d, "c")
        a.receive(attrs(1, 1000, "1.21.1", PatientID="P1", **move))
        b.receive(attrs(1, 2000, "1.21.1", PatientID="P2", **move))
        for x in order:
            c.pull({"a": a, "b": b}[x])
        a.pull(b)
        b.pull(a)
        for p in (a, b, c):
            assert p.patients() == ["P2"], (order, p.name)
        assert a.rows() == b.rows() == c.rows()
        want = want or c.rows()
        assert c.rows() == want


def _pre_stamp_catalog(tmp_path, name: str, version: int) -> Peer:
    """A peer whose catalog holds version *version* of P1 (stamp 0) in a schema-5 file,
    as a release before the stamps left it."""
    d = tmp_path / name
    d.mkdir()
    p = Peer(d, name)
    p.receive(attrs(version, None, f"1.23.{version}", SeriesInstanceUID=f"1.23.{version}.9"))
    return p


def test_rows_that_differed_before_the_stamps_converge_after_the_upgrade(tmp_path):
    """a and b each applied another version of P1 last (a release before schema 5: no
    stamps), c, which holds no copy, a third; every peer holds every fact. Upgraded, each
    announces its rows of stamp-less series once (a fact of its own), and the pulls that
    follow leave all three with the greatest values (c's). Before: nothing was pulled
    again, a answered RACE^V1, b RACE^V2 and c RACE^V3 for ever (and with the own
    facts numbered again instead, c's version, of no own fact, never left c)."""
    a, b = _pre_stamp_catalog(tmp_path, "a", 1), _pre_stamp_catalog(tmp_path, "b", 2)
    (tmp_path / "c").mkdir()
    c = Peer(tmp_path / "c", "c")
    for x, y in ((a, b), (b, a), (c, a), (c, b)):
        x.pull(y)
    a.conn.execute("UPDATE patients SET PatientName = 'RACE^V1', PatientSex = 'F'")
    a.conn.execute("UPDATE studies SET StudyDescription = 'study v1'")
    c.conn.execute("UPDATE patients SET PatientName = 'RACE^V3', PatientSex = 'F'")
    c.conn.execute("UPDATE studies SET StudyDescription = 'study v3'")
    assert [p.name_of() for p in (a, b, c)] == ["RACE^V1", "RACE^V2", "RACE^V3"]
    # a patient whose study moved to P1 under a release of schema 5: left, empty
    b.conn.execute("INSERT INTO patients (PatientID, PatientName) VALUES ('P0', 'MOVED')")
    for p in (a, b, c):                    # the file as the release of schema 5 left it
        p.conn.execute("PRAGMA user_version=5")
        for name in ("row_check_patient", "row_check_study", "row_check_series",
                     "row_check_study_moved", "row_check_series_moved",
                     "row_check_instance_moved"):
            p.conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        p.conn.execute("DROP TABLE IF EXISTS gone_rows")
        p.conn.execute("DROP TABLE IF EXISTS row_checks")
        p.conn.close()
        catalog = db.Catalog(tmp_path / p.name / f"{p.name}.sqlite", None, peer=p.name)
        catalog._open_writer()                 # what the upgraded peer's start does
        p.conn = catalog._writer
    for x, y in itertools.permutations((a, b, c), 2):
        x.pull(y)
    assert [p.name_of() for p in (a, b, c)] == ["RACE^V3"] * 3
    assert b.patients() == ["P1"]           # P0 retired at the upgrade
    assert a.rows() == b.rows() == c.rows()
    assert db.digest(a.conn) == db.digest(b.conn) == db.digest(c.conn)
    assert a.conn.execute("SELECT count(*) FROM catalog_meta WHERE key = 'reannounce'"
                          ).fetchone() == (0,)
    # the announcements are no copies: C-FIND counts and copies stay as they were
    assert schema.read_counts(a.conn)["locations"] == 2
    assert a.conn.execute("SELECT count(*) FROM locations WHERE size = -3").fetchone() == (6,)


def test_two_versions_of_one_instance_converge_and_an_emptied_series_leaves(tmp_path):
    """One SOP Instance UID sent twice with other instance attributes: at a under series
    S1 (1000, InstanceNumber 1, Explicit VR), at b under S2 (2000, InstanceNumber 7, RLE).
    Every peer, whatever the order of its pulls, holds a's instance row -- the current
    version's, the first received (``catalog.shown``; until then b's, the latest) -- and
    S1 alone. Before: an instance row took the last version applied (c and d answered
    two InstanceNumbers and two series), and the emptied series stayed at those that saw
    it."""
    one = "1.24.1"
    v1 = attrs(1, 1000, one, SeriesInstanceUID="1.24.1.9", InstanceNumber="1")
    v2 = attrs(1, 2000, one, SeriesInstanceUID="1.24.2.9", InstanceNumber="7",
               TransferSyntaxUID="1.2.840.10008.1.2.5")
    a, b, c, d = (Peer(tmp_path, n) for n in "abcd")
    a.receive(v1)
    b.receive(v2)
    c.pull(a)
    c.pull(b)
    d.pull(b)
    d.pull(a)
    a.pull(b)
    b.pull(a)
    want = [(one, "1", "1.24.1.9", "1.2.840.10008.1.2.1")]
    for p in (a, b, c, d):
        assert p.conn.execute("SELECT SOPInstanceUID, InstanceNumber, SeriesInstanceUID, "
                              "TransferSyntaxUID FROM instances").fetchall() == want, p.name
        assert p.conn.execute("SELECT SeriesInstanceUID FROM series").fetchall() == \
            [("1.24.1.9",)], p.name
    assert db.digest(a.conn) == db.digest(b.conn) == db.digest(c.conn) == db.digest(d.conn)
