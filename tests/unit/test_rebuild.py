"""``pacsp2p catalog rebuild`` walks the archive in bounded memory (issue 19.7).

Before, the embedded archive's ``walk`` sorted a list of every file path first (~3.9 GB at
10M instances). Now it is a generator over ``os.scandir``: the rebuilt catalog is the one
the peer wrote as the instances arrived, and the memory a walk takes does not grow with
the number of files.
"""
from __future__ import annotations

import inspect
import sqlite3
import tracemalloc
from pathlib import Path

from pacsp2p.adapters import embedded, layout
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.catalog import db
from pacsp2p.catalog.rebuild import rebuild
from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import datasets
from pacsp2p.types import InstanceMeta, Stored

PEER = "p"


def archive(root: Path) -> EmbeddedArchive:
    a = EmbeddedArchive("local", root, reactor=None, fsync=False)
    a._prepare()
    return a


def content(path: Path) -> dict:
    """Every table of a catalog that rebuild must reproduce, order-free (sequence numbers
    are new after a rebuild, by design)."""
    conn = sqlite3.connect(path)
    try:
        out = {t: sorted(conn.execute(f"SELECT * FROM {t}"))
               for t in ("patients", "studies", "series", "instances")}
        out["locations"] = sorted(conn.execute(
            "SELECT SOPInstanceUID, archive, peer, sha256, size, available FROM locations"))
        out["conflicts"] = sorted(conn.execute(
            "SELECT SOPInstanceUID, archive, sha256 FROM conflicts"))
        return out
    finally:
        conn.close()


def test_rebuild_gives_the_catalog_the_peer_wrote(tmp_path):
    a = archive(tmp_path / "archive")
    live = db._connect(tmp_path / "live.sqlite")
    db.create_schema(live)
    seq = 0
    for p in range(3):
        study = datasets.make_study(tmp_path / "in" / f"p{p}", patient_id=f"PAT{p}",
                                    patient_name=f"DOE^P{p}",
                                    series=[("CT", 3, datasets.ExplicitVRLittleEndian),
                                            ("MR", 2, datasets.ImplicitVRLittleEndian)],
                                    size=8, StudyDescription="STUDY")  # one per study
        for path in study:
            meta = read_meta(path)
            stored = a.keep(path, meta)
            seq += 1
            db.write_facts(live, [(db.meta_attributes(meta),
                                   (meta.sop_instance_uid, "local", PEER, stored.sha256,
                                    stored.size, seq))])
    # a second version of one instance (other bytes, same UID): a conflict
    held = read_meta(next(layout.files(a.objects)))
    other = datasets.write(datasets.make_image("CT", size=8, seed=99,
                                               SOPInstanceUID=held.sop_instance_uid),
                           tmp_path / "in" / "other.dcm")
    stored = a.keep(other, read_meta(other))
    assert stored.conflict
    live.execute("INSERT INTO conflicts VALUES (?, 'local', ?, datetime('now'))",
                 (held.sop_instance_uid, stored.sha256))
    live.close()

    lines = []
    n = rebuild(tmp_path / "rebuilt.sqlite", [a], PEER, progress=lines.append)
    assert n == 15
    assert content(tmp_path / "rebuilt.sqlite") == content(tmp_path / "live.sqlite")


def test_walk_is_a_generator_in_bounded_memory(tmp_path, monkeypatch):
    """tracemalloc peak of a whole walk over N and 4N files: the same (before: a sorted
    list of every path, ~200 bytes a file)."""
    a = archive(tmp_path / "archive")
    uid_of: dict[str, str] = {}

    def make(n: int, start: int) -> None:
        for i in range(start, start + n):
            uid = f"1.2.826.0.1.3680043.10.1.{i}"
            path = a.path_for(uid)
            path.parent.mkdir(exist_ok=True)
            path.touch()
            uid_of[path.name] = uid

    meta_of = {}
    # the per-file work (header, hash) is not what grew with N: keep it out of the measure
    monkeypatch.setattr(embedded, "read_meta", lambda path: meta_of[path.name])
    monkeypatch.setattr(embedded, "content_hash", lambda path: ("0" * 64, 0))

    def peak_of_walk() -> tuple[int, int]:
        meta_of.update((name, InstanceMeta(uid, "1.2.840.10008.5.1.4.1.1.2",
                                           "1.2.840.10008.1.2.1"))
                       for name, uid in uid_of.items() if name not in meta_of)
        walk = a.walk()
        assert inspect.isgenerator(walk)
        tracemalloc.start()
        try:
            count = 0
            for meta, stored in walk:
                assert isinstance(stored, Stored)
                count += 1
            return count, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    make(2000, 0)
    peak_of_walk()                                     # warm caches (regex, imports)
    small, small_peak = peak_of_walk()
    make(6000, 2000)
    big, big_peak = peak_of_walk()
    print(f"walk peak: {small} files {small_peak} B, {big} files {big_peak} B")
    assert (small, big) == (2000, 8000)
    # before: 6,000 more paths held at once, > 1 MB more
    assert big_peak < small_peak + 100_000, (small_peak, big_peak)
    assert big_peak < 1_000_000, big_peak


def test_a_rebuild_keeps_the_row_stamps_the_old_file_still_has(tmp_path):
    """The files do not say when their instances were received: rebuilt rows carry
    stamp 0 and lose to the other peers' rows. Where the old file can be read, its rows'
    stamps and values are kept, so the rebuilt peer answers as the others do. Before: the
    rebuilt PAT0 was DOE^P0 (the files' version) with stamp 0, the others DOE^FIXED."""
    from pacsp2p.catalog.facts import STAMP
    a = archive(tmp_path / "archive")
    path = tmp_path / "catalog.sqlite"
    live = db._connect(path)
    db.create_schema(live)
    study = datasets.make_study(tmp_path / "in", patient_id="PAT0", patient_name="DOE^P0",
                                series=[("CT", 2, datasets.ExplicitVRLittleEndian)], size=8)
    for seq, f in enumerate(study, 1):
        meta = read_meta(f)
        stored = a.keep(f, meta)
        db.write_facts(live, [({**db.meta_attributes(meta), STAMP: 1000 + seq},
                               (meta.sop_instance_uid, "local", PEER, stored.sha256,
                                stored.size, seq))])
    # a later version of the patient (an instance held elsewhere, or deleted since)
    live.execute("UPDATE patients SET PatientName = 'DOE^FIXED', stamp = 9000")
    want = [live.execute(f"SELECT * FROM {t}").fetchall() for t in ("patients", "studies",
                                                                    "series")]
    live.close()
    lines = []
    assert rebuild(path, [a], PEER, progress=lines.append) == 2
    conn = sqlite3.connect(path)
    assert [conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("patients", "studies",
                                                                    "series")] == want
    assert conn.execute("SELECT PatientName, stamp FROM patients").fetchall() == \
        [("DOE^FIXED", 9000)]
    assert any("keep their stamps" in line for line in lines)


def test_a_file_not_read_as_an_instance_is_named_not_silently_left_out(tmp_path):
    """A file the archive holds that the walk cannot read (damaged, or refused by a newer
    release's checks) stays on the archive and out of the catalog, and the rebuild says
    so, naming it: before, it was left out without a word."""
    a = archive(tmp_path / "archive")
    study = datasets.make_study(tmp_path / "in", patient_id="SKIP01", size=8,
                                series=[("CT", 7, datasets.ExplicitVRLittleEndian)])
    for path in study:
        a.keep(path, read_meta(path))
    held = sorted(layout.files(a.objects))
    for victim in held[:6]:                    # cut short: no longer a complete data set
        victim.write_bytes(victim.read_bytes()[:200])
    lines = []
    n = rebuild(tmp_path / "rebuilt.sqlite", [a], PEER, progress=lines.append)
    assert n == 1
    said = [ln for ln in lines if "not read as an instance" in ln]
    assert len(said) == 1, lines
    assert said[0].startswith("archive local: 6 file(s) not read as an instance"), said
    assert sum(str(v) in said[0] for v in held[:6]) == 5 and "and 1 more" in said[0], said
    assert all(p.exists() for p in held[:6])   # left where they are
