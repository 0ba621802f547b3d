"""Recheck (``transfer.recheck``): a sample of an archive that may have lost what it held
starts a scrub pass for a bad copy it finds — once per bad copy. A copy the scrub cannot
replace (no good replica anywhere) stays in the catalog, so the archive goes on reporting
fewer instances than the catalog places there and health names it every 5 s: before, each
sample that found that copy started a full pass again (one a minute, for ever).

A real SQLite catalog and a real embedded archive (its jobs run at once); the scrub is a
stand-in that counts the passes asked of it (what is under test is whether one is asked).
"""
from __future__ import annotations

from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.catalog import db, tombstones
from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import datasets
from pacsp2p.transfer.recheck import Recheck
from twisted.internet import defer

from test_delete_guards import SyncCatalog, result

EXPLICIT = "1.2.840.10008.1.2.1"


class Scrub:
    def __init__(self):
        self.passes = 0

    def run(self):
        self.passes += 1
        return defer.succeed({"pass": self.passes})


def held_in_catalog(tmp_path, n: int, patient: str):
    """A real embedded archive (its jobs run at once) holding *n* instances, and a real
    catalog placing them there (peerb's copies, facts 1..n): (archive, conn, uids)."""
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    archive._prepare()
    archive._run = lambda fn, *args: defer.maybeDeferred(fn, *args)
    files = datasets.make_study(tmp_path / "in", patient_id=patient, size=32,
                                series=[("CT", n, EXPLICIT)])
    conn = db._connect(tmp_path / "c.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    uids = []
    for seq, f in enumerate(files, 1):
        meta = read_meta(f)
        stored = archive._store(f, meta.sop_instance_uid)
        uids.append(meta.sop_instance_uid)
        db.write_facts(conn, [({**meta.attributes, "SOPInstanceUID": meta.sop_instance_uid,
                                "SOPClassUID": meta.sop_class_uid},
                               (meta.sop_instance_uid, "local", "peerb", stored.sha256,
                                stored.size, seq))])
    return archive, conn, uids


def test_a_bad_copy_starts_one_pass_not_one_a_sample(tmp_path):
    archive, conn, uids = held_in_catalog(tmp_path, 2, "RECHECK")
    scrub = Scrub()
    recheck = Recheck("peerb", SyncCatalog(conn), {"local": archive}, scrub)

    def sample():                       # the next sample, EVERY seconds later
        recheck._at.clear()
        return result(recheck.check("local"))

    assert sample() is False and scrub.passes == 0          # both copies good
    archive.path_for(uids[0]).unlink()                     # lost, no replica anywhere
    assert sample() is True and scrub.passes == 1
    for _ in range(3):                  # still missing: the pass for it was started
        assert sample() is False
    assert scrub.passes == 1
    archive.path_for(uids[1]).unlink()                     # another copy lost: a pass
    assert sample() is True and scrub.passes == 2
    assert recheck.stats == {"samples": 6, "passes": 2}
