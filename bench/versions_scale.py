#!/usr/bin/env python3
"""What schema 7 (``catalog.versions``: copies' stamps, instances held in several
versions) costs a large catalog: its migration at the first start, and repair's census
(one pass over the locations, now asking ``versions`` for each copy) before and after.

On a COPY of a catalog (``--catalog``: e.g. bench/catalog10m.py's cache copied; the file
is migrated in place, never use the cache itself): the census of the tree *before*
(schema 6 SQL), then the migration by the tree *after* (``create_schema``, timed), then
the census of both trees on the migrated file, interleaved, *reps* each. CPU seconds of
this process's thread (``time.thread_time``) and wall seconds.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/versions_scale.py \\
        --catalog /tmp/copy/catalog.sqlite --code before=DIR,after=DIR [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(what: str, path: str) -> dict:
    import sqlite3
    from pacsp2p.catalog import copies
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA cache_size=-1000000")
    t, w = time.thread_time(), time.time()
    if what == "migrate":
        from pacsp2p.catalog.db import _connect
        from pacsp2p.catalog.schema import create_schema
        conn.close()
        conn = _connect(path)
        t, w = time.thread_time(), time.time()
        create_schema(conn, path)
        out = {"versions": conn.execute("SELECT count(*) FROM versions").fetchone()[0]}
    else:
        out = copies.census(conn, 2, copies.Liveness())
    return {"cpu": time.thread_time() - t, "wall": time.time() - w, **out}


def run(tree: str, what: str, path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, __file__, "--one", what, "--catalog", path],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--catalog", required=True)
    p.add_argument("--code", default=None, help="before=DIR,after=DIR")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--one", choices=["census", "migrate"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.catalog)))
        return
    trees = dict(item.split("=", 1) for item in a.code.split(","))
    print(f"versions scale: {a.catalog} ({os.path.getsize(a.catalog) / 2**30:.2f} GiB); "
          f"load {os.getloadavg()}")
    print("census before, schema 6:", run(trees["before"], "census", a.catalog))
    print("migration to schema 7:", run(trees["after"], "migrate", a.catalog))
    rows = {k: [] for k in trees}
    for _ in range(a.reps):
        for label, tree in trees.items():
            rows[label].append(run(tree, "census", a.catalog))
    for label, got in rows.items():
        print(f"census {label}: cpu {[round(r['cpu'], 1) for r in got]} s, wall "
              f"{[round(r['wall'], 1) for r in got]} s; {got[-1]}")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
