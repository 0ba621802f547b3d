"""Patient, study and series rows are last-writer-wins registers (``catalog.facts``):
two peers that learn two versions of a patient in either order keep the same rows.

Real SQLite catalogs written with the catalog's own functions: a peer's own facts with
``write_facts`` (as its writer does), another peer's with ``read_changes`` ->
``check_wire`` -> ``write_wires`` (what a pull does). No mocks.
"""
from __future__ import annotations

import itertools

import pytest

from pacsp2p.catalog import db, tombstones
from pacsp2p.catalog.facts import STAMP, STAMPS_KEY, Stamps

STUDY = "1.2.3.4"


def attrs(version: int, stamp: int | None, uid: str, **extra) -> dict:
    """An instance of patient P1, study STUDY, in its own series, of *version*."""
    a = {"PatientID": "P1", "PatientName": f"RACE^V{version}", "PatientSex": "MF"[version % 2],
         "StudyInstanceUID": STUDY, "StudyDescription": f"study v{version}",
         "SeriesInstanceUID": f"{uid}.9", "Modality": "CT", "SeriesDescription": f"v{version}",
         "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
         "TransferSyntaxUID": "1.2.840.10008.1.2.1", **extra}
    if stamp is not None:
        a[STAMP] = stamp
    return a


class Peer:
    def __init__(self, tmp_path, name):
        self.name = name
        self.conn = db._connect(tmp_path / f"{name}.sqlite")
        db.create_schema(self.conn)
        tombstones.create_schema(self.conn)
        self.seq = 0
        self.parents: dict = {}          # the writer's parent-row memory

    def receive(self, a: dict) -> None:
        """An instance received here: our own fact, written as our writer does."""
        self.seq += 1
        db.write_facts(self.conn, [(a, (a["SOPInstanceUID"], "local", self.name, "ab" * 32,
                                        100, self.seq))], parents=self.parents)

    def pull(self, other: "Peer") -> None:
        """Every fact of *other*'s origin, as a pull brings it."""
        rows = db.read_changes(other.conn, other.name, 0, 1000)
        db.check_wire(rows)
        db.write_wires(self.conn, [rows], self.name)
        self.parents.clear()             # (the Catalog clears it after others write)

    def rows(self):
        return [self.conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("patients", "studies", "series")]

    def name_of(self, pid="P1") -> str:
        return self.conn.execute("SELECT PatientName FROM patients WHERE PatientID = ?",
                                 (pid,)).fetchone()[0]


@pytest.mark.parametrize("first", ["a", "b"])
@pytest.mark.parametrize("newer", [1, 2])
def test_two_versions_converge_whatever_the_order(tmp_path, first, newer):
    """V1 received at a, V2 at b (the one stamped later: *newer*); each pulls the
    other's facts, *first* pulls first. Before: each kept the version it applied last
    (a: V2, b: V1), digests unequal."""
    a, b = Peer(tmp_path, "a"), Peer(tmp_path, "b")
    a.receive(attrs(1, 2000 if newer == 1 else 1000, "1.5.1"))
    b.receive(attrs(2, 2000 if newer == 2 else 1000, "1.5.2"))
    for x, y in ((a, b), (b, a)) if first == "a" else ((b, a), (a, b)):
        x.pull(y)
    assert a.name_of() == b.name_of() == f"RACE^V{newer}"
    assert a.rows() == b.rows()
    assert db.digest(a.conn) == db.digest(b.conn)


def test_rows_of_many_versions_are_the_greatest_in_every_order(tmp_path):
    """Four peers, each received another version; every order of pulls gives every
    peer the rows of the greatest stamp (ties: the greater values)."""
    stamps = [3000, 1000, 3000, 2000]          # a tie between versions 0 and 2
    peers = [Peer(tmp_path, f"p{i}") for i in range(4)]
    for i, p in enumerate(peers):
        p.receive(attrs(i, stamps[i], f"1.6.{i}"))
    want = None
    for n, order in enumerate(itertools.permutations(range(4))):
        target = Peer(tmp_path, f"t{n}")
        for i in order:
            target.pull(peers[i])
        if want is None:
            want = target.rows()
        assert target.rows() == want, order
    assert want[0][0][1] == "RACE^V2"       # tie at 3000: "RACE^V2" > "RACE^V0"


def test_a_later_local_write_wins_and_an_earlier_loses(tmp_path):
    """The writer's parent-row memory: a row it wrote is not rewritten when the values
    are the same, only its stamp raised — but only while the row still holds them."""
    a, b = Peer(tmp_path, "a"), Peer(tmp_path, "b")
    a.receive(attrs(1, 1000, "1.7.1"))
    b.receive(attrs(2, 3000, "1.7.2"))
    a.pull(b)
    assert a.name_of() == "RACE^V2"
    a.parents["PATIENT"] = {"P1": ["P1", "RACE^V1"]}     # stale memory: must not matter
    a.receive(attrs(1, 2000, "1.7.3"))          # earlier than V2's: loses
    assert a.name_of() == "RACE^V2"
    a.receive(attrs(1, 4000, "1.7.4"))          # later: wins, every column
    assert a.name_of() == "RACE^V1"
    assert a.conn.execute("SELECT stamp, StudyDescription FROM studies").fetchone() == \
        (4000, "study v1")
    a.receive(attrs(1, 5000, "1.7.5"))          # same values: the stamp raised only
    assert a.conn.execute("SELECT stamp FROM patients").fetchone() == (5000,)
    b.pull(a)
    assert a.rows() == b.rows()


def test_one_batch_keeps_the_highest_stamp_of_a_row(tmp_path):
    """Facts of one patient in one writer batch out of stamp order (a group commit of
    copies another peer received): the row is the highest stamp's, as a peer that
    learns them one by one makes it."""
    a, b = Peer(tmp_path, "a"), Peer(tmp_path, "b")
    later, earlier = attrs(2, 2000, "1.8.2"), attrs(1, 1000, "1.8.1")
    db.write_facts(a.conn, [(later, ("1.8.2", "local", "a", "ab" * 32, 1, 1)),
                            (earlier, ("1.8.1", "local", "a", "ab" * 32, 1, 2))])
    for x in (earlier, later):
        b.receive(x)
    assert a.name_of() == b.name_of() == "RACE^V2"
    assert a.rows() == b.rows()


def test_unstamped_rows_lose_and_old_peers_batches_are_taken(tmp_path):
    """A catalog of schema 4 opens (its rows stamp 0) and keeps working; a batch of a
    peer of the previous release (no stamps) writes a row only over a stamp-less one."""
    path = tmp_path / "old.sqlite"
    conn = db._connect(path)
    db.create_schema(conn)
    for t in ("patients", "studies", "series"):
        conn.execute(f"ALTER TABLE {t} DROP COLUMN stamp")
    conn.execute("PRAGMA user_version=4")
    conn.execute("INSERT INTO patients (PatientID, PatientName) VALUES ('P1', 'OLD^ROW')")
    conn.close()
    old = Peer.__new__(Peer)
    old.name, old.seq, old.parents = "old", 0, {}
    old.conn = db._connect(path)
    db.create_schema(old.conn)
    tombstones.create_schema(old.conn)
    assert old.conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    assert old.conn.execute("SELECT PatientName, stamp FROM patients").fetchone() == \
        ("OLD^ROW", 0)
    b = Peer(tmp_path, "b")
    b.receive(attrs(1, None, "1.9.1"))          # unstamped: loses to nothing unstamped
    rows = db.read_changes(b.conn, "b", 0, 10)
    assert STAMPS_KEY not in rows[0]            # what an old peer's batch looks like
    db.write_wires(old.conn, [rows], "old")
    assert old.name_of() == "RACE^V1"
    b2 = Peer(tmp_path, "b2")
    b2.receive(attrs(2, 1000, "1.9.2"))
    old.pull(b2)
    assert old.name_of() == "RACE^V2"           # a stamped row wins over stamp 0
    db.write_wires(old.conn, [rows], "old")     # the old peer's batch again: loses
    assert old.name_of() == "RACE^V2"


@pytest.mark.parametrize("bad", ["1", -1, True, 2 ** 53, 1.5, None])
def test_a_batch_with_a_bad_stamp_is_refused(tmp_path, bad):
    b = Peer(tmp_path, "b")
    b.receive(attrs(1, 1000, "1.10.1"))
    rows = db.read_changes(b.conn, "b", 0, 10)
    rows[0][STAMPS_KEY]["PATIENT"]["P1"] = bad
    with pytest.raises(ValueError):
        db.check_wire(rows)


def test_stamps_increase_strictly_even_if_the_clock_goes_back():
    times = iter([5.0, 5.0, 4.0, 6.0])
    stamps = Stamps(clock=lambda: next(times))
    assert [stamps() for _ in range(4)] == [5000, 5001, 5002, 6000]


def test_the_digest_is_of_what_a_peer_answers_not_of_stamps(tmp_path):
    """A catalog of the previous release (no stamp column) holding the same rows has the
    same digest: ``pacsp2p catalog digest`` compares peers across a rolling upgrade."""
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    new, old = Peer(tmp_path / "new", "a"), Peer(tmp_path / "old", "a")
    for p in (new, old):
        p.receive(attrs(1, 1000, "1.11.1"))
    for t in ("patients", "studies", "series"):
        old.conn.execute(f"ALTER TABLE {t} DROP COLUMN stamp")
    assert db.digest(new.conn) == db.digest(old.conn)


@pytest.mark.parametrize("bad", ["1", -1, True, 2 ** 53])
def test_a_copy_announced_with_a_bad_stamp_is_refused(bad):
    """The stamp in a Replicate/push header comes from another peer: checked."""
    from pacsp2p.overlay.commands import InvalidArgument, check_meta
    meta = {"sop_instance_uid": "1.2.3", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1", "attributes": {STAMP: 5}}
    assert check_meta(meta, "1.2.3") is meta
    meta["attributes"][STAMP] = bad
    with pytest.raises(InvalidArgument):
        check_meta(meta, "1.2.3")


def test_a_stamp_far_ahead_of_the_clock_wins_only_until_now_plus_the_skew(tmp_path):
    """A peer's stamp of 2^53-1 (hostile) or of a clock set years ahead: taken as this
    peer's clock + ``MAX_AHEAD`` (a pull and a pushed copy alike), so a correction
    received after that still wins. Before: the row kept the far stamp, and every
    later version lost, at every peer, for ever (or for the years of the bad clock)."""
    import time
    from pacsp2p.catalog.facts import MAX_AHEAD, MAX_STAMP, STAMP_GRAIN
    a, b, c = Peer(tmp_path, "a"), Peer(tmp_path, "b"), Peer(tmp_path, "c")
    now = int(time.time() * 1000)
    a.receive(attrs(1, MAX_STAMP - 1, "1.12.1"))      # a pushed copy's header
    b.receive(attrs(3, now + 10 * 365 * 86400 * 1000, "1.12.3"))
    c.pull(b)
    for p in (a, c):
        stamp = p.conn.execute("SELECT stamp FROM patients").fetchone()[0]
        assert now < stamp < int(time.time() * 1000) + MAX_AHEAD + STAMP_GRAIN
    time.sleep(2 * STAMP_GRAIN / 1000)     # (a parent row's stamp is cut to the grain)
    late = int(time.time() * 1000) + MAX_AHEAD + 1000   # received after the skew passed
    a.receive(attrs(2, late, "1.12.2"))
    c.receive(attrs(2, late + 1, "1.12.4"))
    assert a.name_of() == c.name_of() == "RACE^V2"


def test_a_stamp_learned_makes_the_next_stamps_of_this_peer_later():
    """The receive rule of a hybrid logical clock: a peer whose clock is behind another's
    stamps what it receives after it learned a row above that row's stamp, so a
    correction made after the row was seen wins (within ``MAX_AHEAD``)."""
    import time
    from pacsp2p.catalog.facts import new_stamp
    ahead = int(time.time() * 1000) + 60000             # a peer a minute ahead
    new_stamp.observe(ahead)
    assert new_stamp() > ahead


def test_a_correction_after_a_row_of_a_clock_an_hour_ahead_wins(tmp_path):
    """A peer an hour ahead: its rows reach this peer cut to this clock + ``MAX_AHEAD``,
    and this peer's next receipt is stamped above that (``Stamps.observe``). Before, the
    cut value was not at a grain's end: the next stamp, cut to its grain for the parent
    rows, fell below the row's, so a correction received seconds later lost (found by
    clock-skew injection: a patient renamed at a correct peer 3 s after a peer an hour
    ahead stored it kept the old name at every peer). The new name sorts lower, so a
    tie would keep the old one too."""
    import time
    from pacsp2p.catalog.facts import STAMP_GRAIN, new_stamp
    b, c = Peer(tmp_path, "b"), Peer(tmp_path, "c")
    b.receive(attrs(3, int(time.time() * 1000) + 3_600_000, "1.14.3"))   # an hour ahead
    c.pull(b)
    time.sleep(2 * STAMP_GRAIN / 1000)               # (a correction: seconds later)
    c.receive(attrs(2, new_stamp(), "1.14.2"))       # stamped as a C-STORE here is
    assert c.name_of() == "RACE^V2"


def test_one_batch_breaks_a_tie_of_stamps_as_sql_does(tmp_path):
    """Two versions of one stamp (two peers' receipts in the same ms) in one writer
    batch, in either order: the row is the greater values', as a peer that learns them
    one by one keeps it. Before: the batch's last one."""
    for order in ((1, 2), (2, 1)):
        (tmp_path / str(order)).mkdir()
        a = Peer(tmp_path / str(order), "a")
        facts = [(attrs(v, 1000, f"1.13.{v}"), (f"1.13.{v}", "local", "a", "ab" * 32, 1, v))
                 for v in order]
        db.write_facts(a.conn, facts)
        assert a.name_of() == "RACE^V2", order


def test_a_stream_raises_its_parents_stamps_once_per_grain(tmp_path):
    """40 instances of one series, 6 ms apart (a C-STORE stream at ~165/s), each its own
    transaction with the writer's parent-row memory: the patient, study and series rows
    are written or their stamps raised once per ``STAMP_GRAIN`` ms, not per instance
    (before: 3 statements on them per instance, 120); each row's stamp stays within the
    grain of the last instance's, and a peer that pulls the stream holds the same rows."""
    from pacsp2p.catalog.facts import STAMP_GRAIN
    a, b = Peer(tmp_path, "a"), Peer(tmp_path, "b")
    on_parents = []          # (a trigger's run is traced as its statement again: once)
    parent_sql = (("UPDATE", "patients", "SET"), ("UPDATE", "studies", "SET"),
                  ("UPDATE", "series", "SET"), ("INSERT", "INTO", "patients"),
                  ("INSERT", "INTO", "studies"), ("INSERT", "INTO", "series"))
    a.conn.set_trace_callback(lambda sql: on_parents.append(sql) if (
        on_parents[-1:] != [sql] and tuple(sql.split(" ")[:3]) in parent_sql) else None)
    stamps = [10_000 + 6 * i for i in range(40)]
    for i, stamp in enumerate(stamps):
        a.receive(attrs(1, stamp, f"1.14.{i}", SeriesInstanceUID="1.14.9"))
    a.conn.set_trace_callback(None)
    span = stamps[-1] - stamps[0]
    assert len(on_parents) <= 3 * (span // STAMP_GRAIN + 2), len(on_parents)
    for table in ("patients", "studies", "series"):
        stamp = a.conn.execute(f"SELECT stamp FROM {table}").fetchone()[0]
        assert stamps[-1] - STAMP_GRAIN < stamp <= stamps[-1], table
    b.pull(a)
    assert a.rows() == b.rows()
    assert db.digest(a.conn) == db.digest(b.conn)


def test_a_row_lost_to_another_version_is_not_taken_as_held(tmp_path):
    """The writer remembers the stamp a parent row holds its values with only where its
    write of them won: V1 written at a lost to b's V2 (1150 over 1040), so a's V1 of 1260,
    in the next grain, is written (and wins) though its values are those a wrote last."""
    a, b = Peer(tmp_path, "a"), Peer(tmp_path, "b")
    series = {"SeriesInstanceUID": "1.15.9"}
    a.receive(attrs(1, 1000, "1.15.1", **series))
    b.receive(attrs(2, 1150, "1.15.2", **series))
    a.pull(b)
    a.receive(attrs(1, 1040, "1.15.3", **series))       # older than V2: loses
    assert a.name_of() == "RACE^V2"
    a.receive(attrs(1, 1140, "1.15.4", **series))       # V2's grain: the greater values
    assert a.name_of() == "RACE^V2"
    a.receive(attrs(1, 1260, "1.15.5", **series))       # newer: wins
    assert a.name_of() == "RACE^V1"
    assert a.conn.execute("SELECT stamp FROM patients").fetchone() == (1200,)
    b.pull(a)
    assert a.rows() == b.rows()


def test_the_remembered_stamps_are_bounded_too(tmp_path, monkeypatch):
    """The writer remembers at most ``REMEMBERED`` rows per level, their stamps included:
    rows forgotten by ``remembered.keep_where_same`` (facts of others wrote them otherwise)
    leave no stamp behind for ever (before: only the rows were counted, so the stamps of
    rows dropped from them grew without bound)."""
    from pacsp2p.catalog import facts, remembered
    monkeypatch.setattr(facts, "REMEMBERED", 3)
    a = Peer(tmp_path, "a")
    for i in range(12):
        a.receive(attrs(1, 1000 + i, f"1.16.{i}", PatientID=f"P{i}",
                        StudyInstanceUID=f"1.16.{i}.1"))
        # another peer's facts wrote this patient otherwise: its row is forgotten
        remembered.keep_where_same(a.parents, a.conn, {"PATIENT": {f"P{i}": [f"P{i}", "X"]}})
        assert len(a.parents[facts.STAMP]["PATIENT"]) <= 4
