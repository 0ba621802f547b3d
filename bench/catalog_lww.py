#!/usr/bin/env python3
"""What the catalog's last-writer-wins rows cost the writer (catalog/facts.py).

In this process, with the product's own functions on real SQLite files: N instance
facts (20 per series, 4 series per study, 2 studies per patient, each stamped as a
receiving peer stamps it) written as this peer's writer writes a stream of C-STOREs
(``write_facts`` in batches of --batch with the writer's parent-row memory), then
pulled by a second catalog as anti-entropy does (``read_changes`` in batches of 5,000
-> ``check_wire`` -> ``write_wires``). Prints CPU-seconds per 1,000 facts of each and
the catalog's bytes per instance. Run it against two trees to compare (PYTHONPATH):

    PYTHONPATH=TREE .venv/bin/python bench/catalog_lww.py [--facts N] [--batch B] [--gone G]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pacsp2p.catalog import db, tombstones


def facts(n: int, batch: int):
    """Batches of (attributes, location) facts of peer 'a', stamped in order."""
    out, stamp = [], 1_800_000_000_000
    for i in range(n):
        series, study = i // 20, i // 80
        uid = f"1.2.826.0.1.3680043.9.7777.{study}.{series}.{i}"
        stamp += 1
        attrs = {"PatientID": f"PID{study // 2:07d}", "PatientName": f"DOE^JOHN^{study // 2}",
                 "PatientBirthDate": "19700101", "PatientSex": "M",
                 "StudyInstanceUID": f"1.2.826.0.1.3680043.9.7777.{study}",
                 "StudyDate": "20240115", "StudyTime": "101500", "AccessionNumber": f"A{study}",
                 "StudyDescription": "CT CHEST WITH CONTRAST", "ReferringPhysicianName": "REF^X",
                 "SeriesInstanceUID": f"1.2.826.0.1.3680043.9.7777.{study}.{series}",
                 "Modality": "CT", "SeriesNumber": str(series % 4 + 1),
                 "SeriesDescription": "AXIAL 1.25", "SOPInstanceUID": uid,
                 "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "InstanceNumber": str(i % 20 + 1),
                 "TransferSyntaxUID": "1.2.840.10008.1.2.1", "stamp": stamp}
        out.append((attrs, (uid, "local", "a", "ab" * 32, 530_000, i + 1)))
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


def open_catalog(path: Path):
    conn = db._connect(path)
    db.create_schema(conn)
    tombstones.create_schema(conn)
    return conn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=50, help="facts per writer batch")
    p.add_argument("--gone", type=int, default=0,
                   help="retired rows in each catalog first (schema 6: a catalog where "
                        "deletions emptied series; ignored by a tree without gone_rows)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="catalog-lww-") as tmp:
        a, b = open_catalog(Path(tmp) / "a.sqlite"), open_catalog(Path(tmp) / "b.sqlite")
        for c in (a, b):
            if args.gone and c.execute("SELECT 1 FROM sqlite_master WHERE name = "
                                       "'gone_rows'").fetchone():
                c.executemany("INSERT INTO gone_rows VALUES ('SERIES', ?, 1, '[]')",
                              [(f"1.2.3.gone.{i}",) for i in range(args.gone)])
        parents: dict = {}
        cpu = time.process_time()
        for batch in facts(args.facts, args.batch):
            db.write_facts(a, batch, parents=parents)
        write = time.process_time() - cpu
        cpu, after = time.process_time(), 0
        while True:
            rows = db.read_changes(a, "a", after, 5000)
            if not rows:
                break
            after = db.check_wire(rows)
            db.write_wires(b, [rows], "b")
        pull = time.process_time() - cpu
        same = [[c.execute(f"SELECT count(*) FROM {t}").fetchone() for t in
                 ("patients", "studies", "series", "instances")] for c in (a, b)]
        assert same[0] == same[1], f"the pulled catalog differs: {same}"
        a.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = (Path(tmp) / "a.sqlite").stat().st_size
        print(f"schema {db.SCHEMA_VERSION}: {args.facts} facts, writer batches of {args.batch}:"
              f" write {1000 * write / args.facts:.3f} CPU-s/1000 facts, pull "
              f"{1000 * pull / args.facts:.3f} CPU-s/1000 facts, {size / args.facts:.0f} "
              f"bytes/instance")


if __name__ == "__main__":
    main()
