"""A copy the scrub could not replace is tried again with backoff
(``transfer.unrepaired``): still bad, its wait doubles (5, 10, ... s, an hour at most);
put back by hand, it is dropped as good; gone from the catalog, dropped. Before, nothing
tried it again until the next full pass (a week by default).

A real SQLite catalog and a real embedded archive (its jobs run at once), as in
test_scrub_suspect; the tries are started by hand by making them due.
"""
from __future__ import annotations

from pathlib import Path

from pacsp2p import config
from pacsp2p.catalog.scrub import Copy
from pacsp2p.transfer import unrepaired
from pacsp2p.transfer.scrub import Scrub
from pacsp2p.types import Location

from test_recheck import held_in_catalog
from test_scrub_suspect import Catalog


def make_due(scrub):
    for entry in scrub.later._due.values():
        entry[1] = 0.0
    scrub.later.tick()


def test_an_unrepaired_copy_is_tried_again_with_backoff_and_dropped_once_good(tmp_path):
    archive, conn, uids = held_in_catalog(tmp_path, 2, "LATER")
    settings = config.from_dict({"peer": {"name": "peerb", "data_dir": str(tmp_path)}},
                                "t.toml", Path("."))
    scrub = Scrub(settings, Catalog(conn), {"local": archive}, None, None, None)
    scrub.running = True
    rows = dict(conn.execute("SELECT SOPInstanceUID, sha256 FROM locations").fetchall())
    kept = {}
    for uid in uids:
        kept[uid] = archive.path_for(uid).read_bytes()
        archive.path_for(uid).unlink()
        scrub.suspect(Location(uid, "local", "peerb", rows[uid], 1))
    assert scrub.totals["unrepaired"] == 2
    assert len(scrub.later) == 2 and scrub.status()["awaiting_repair"] == 2
    assert all(w == unrepaired.FIRST for _, _, w in scrub.later._due.values())

    make_due(scrub)                          # still missing, no replica: wait doubled
    assert len(scrub.later) == 2
    assert all(w == 2 * unrepaired.FIRST for _, _, w in scrub.later._due.values())
    for _ in range(20):
        make_due(scrub)
    assert all(w == unrepaired.LAST for _, _, w in scrub.later._due.values())

    a, b = uids
    archive.path_for(a).write_bytes(kept[a])     # put back by hand: good again, dropped
    conn.execute("DELETE FROM locations WHERE SOPInstanceUID = ?", (b,))   # b forgotten
    make_due(scrub)
    assert len(scrub.later) == 0 and scrub.status()["awaiting_repair"] == 0
    assert scrub.later.repaired == 0


def test_at_most_MOST_are_kept(tmp_path, monkeypatch):
    archive, conn, _ = held_in_catalog(tmp_path, 1, "MOST")
    settings = config.from_dict({"peer": {"name": "peerb", "data_dir": str(tmp_path)}},
                                "t.toml", Path("."))
    scrub = Scrub(settings, Catalog(conn), {"local": archive}, None, None, None)
    monkeypatch.setattr(unrepaired, "MOST", 3)
    for i in range(10):
        scrub.later.add(Copy(i, f"1.2.3.{i}", "local", "ab" * 32, 1), "ab" * 32)
    assert len(scrub.later) == 3


def test_a_copy_replaced_otherwise_is_not_tried_again(tmp_path):
    archive, conn, [uid] = held_in_catalog(tmp_path, 1, "OTHERWISE")
    settings = config.from_dict({"peer": {"name": "peerb", "data_dir": str(tmp_path)}},
                                "t.toml", Path("."))
    scrub = Scrub(settings, Catalog(conn), {"local": archive}, None, None, None)
    [(seq, sha, size)] = conn.execute("SELECT seq, sha256, size FROM locations").fetchall()
    c = Copy(seq, uid, "local", sha, size)
    scrub.later.add(c, sha)
    assert len(scrub.later) == 1
    scrub.later.discard(c)                  # (a pass, or a retrieval's report, replaced it)
    assert len(scrub.later) == 0


def test_they_are_kept_across_a_restart(tmp_path):
    """The copies to try again are in the scrub's saved state: a peer started again tries
    them after FIRST s (before: forgotten until the next full pass, a week by default).
    Entries of a saved state that are not [UID, archive, hash] are ignored."""
    from twisted.internet import task

    from pacsp2p.catalog import scrub as sql
    archive, conn, [uid] = held_in_catalog(tmp_path, 1, "RESTART")
    settings = config.from_dict({"peer": {"name": "peerb", "data_dir": str(tmp_path)}},
                                "t.toml", Path("."))
    scrub = Scrub(settings, Catalog(conn), {"local": archive}, None, None, task.Clock())
    scrub.start()
    [(sha,)] = conn.execute("SELECT sha256 FROM locations").fetchall()
    kept = archive.path_for(uid).read_bytes()
    archive.path_for(uid).unlink()
    scrub.suspect(Location(uid, "local", "peerb", sha, 1))
    assert len(scrub.later) == 1
    scrub.stop()                                   # saves its state

    state = sql.load_state(conn, "scrub")
    state["unrepaired"] += [["not a uid", "local", sha], [uid + ".1", {"x": 1}, sha], "junk"]
    sql.save_state(conn, "scrub", state)
    again = Scrub(settings, Catalog(conn), {"local": archive}, None, None, task.Clock())
    again.start()
    assert list(again.later._due) == [(uid, "local")]
    assert again.later._due[(uid, "local")][0] == sha
    assert again.later._due[(uid, "local")][2] == unrepaired.FIRST
    archive.path_for(uid).write_bytes(kept)        # put back: found good by the try
    make_due(again)
    assert len(again.later) == 0
    again.stop()
