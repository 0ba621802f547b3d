"""What the first start of this release costs on a catalog of the first milestone
(schema 1, f4c5aaf): the schema migration (``catalog.schema.create_schema`` and the
tombstone tables), timed on a copy of a cached catalog of N instances reshaped to schema 1
(everything schema 2-4 and the tombstone tables added dropped, ``user_version`` 1),
against the same call on the catalog as it is (no migration), in one invocation.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/upgrade_migration.py --instances 200000

The catalog is ``bench/catalog10m.py``'s cache (``--fill-only --instances N`` makes it).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from pacsp2p.catalog import tombstones
from pacsp2p.catalog.db import _connect
from pacsp2p.catalog.schema import create_schema

# what the first milestone's catalog did not have (schema 2-4, tombstones, repair state)
LATER_TABLES = ("catalog_meta", "catalog_counts", "archive_counts", "tombstones", "purge",
                "retained", "follow_ups", "tombstone_count", "repair_state")
LATER_INDEXES = ("idx_studies_AccessionNumber", "idx_patients_PatientName_key")


def copy(src: Path, dst: Path, schema_1: bool) -> None:
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as s, sqlite3.connect(dst) as d:
        s.backup(d)
    if not schema_1:
        return
    conn = sqlite3.connect(dst, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                                ).fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    for name in LATER_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    for name in LATER_TABLES:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("VACUUM")
    conn.close()


def start(path: Path) -> tuple[float, float]:
    """(wall s, CPU s) of what a peer's start does to its catalog's schema."""
    w0, c0 = time.perf_counter(), time.process_time()
    conn = _connect(path)
    create_schema(conn, path)
    tombstones.create_schema(conn)
    conn.close()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "pacsp2p-bench-cache"
    src = cache / f"catalog10m-{args.instances}" / "peer" / "data" / "catalog.sqlite"
    if not src.exists():
        print(f"no cached catalog {src}: bench/catalog10m.py --fill-only --instances "
              f"{args.instances} makes it")
        return 1
    print(f"load {os.getloadavg()[0]:.1f}; catalog of {args.instances} instances: {src}")
    figures: dict[str, list] = {"migrated 1 -> current": [], "current (no migration)": []}
    with tempfile.TemporaryDirectory(prefix="upgrade-migration-") as tmp:
        for _ in range(args.runs):                  # interleaved
            for label, schema_1 in (("migrated 1 -> current", True),
                                    ("current (no migration)", False)):
                path = Path(tmp) / "catalog.sqlite"
                copy(src, path, schema_1)
                figures[label].append(start(path))
                for f in Path(tmp).iterdir():
                    f.unlink()
    for label, runs in figures.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{label:24s} wall {wall:7.2f} s  CPU {cpu:7.2f} s  "
              f"({cpu / args.instances * 1e6:.2f} us CPU per instance)")
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
