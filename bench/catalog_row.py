#!/usr/bin/env python3
"""What recording one instance costs the catalog (issue 15 items 4-5): the keeping
thread's ``Catalog.record_now``, one transaction per instance, as a lone peer's C-STORE
stream records it.

In one process per rep, with the product's own ``Catalog`` on a real SQLite file (WAL,
synchronous=NORMAL, as a peer opens it; the WAL left to grow, as the peer's checkpoints
keep it out of this path): N instances of one study and one series (the shape
bench/ingest.py sends: MR, 6 ms apart in their stamps, ~165/s), each recorded with a
location. Prints per instance: SQL statements (the trace callback; a trigger's run
counted as a statement), WAL pages written, and CPU us of the recording thread (median
of the reps, untraced). ``--code a=DIR,b=DIR`` runs each rep from each tree, interleaved.
``--resent``: one other instance received twice first (the same bytes sent again: its
two receipts' rows kept, ``catalog.shown``), so ``version_rows`` is not empty, as in a
catalog where any instance was ever sent again.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/catalog_row.py [--instances N]
        [--reps R] [--code before=DIR,after=DIR] [--resent]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = "1.2.826.0.1.3680043.9.7777"
WARM = 10                  # the first instances (the parents' first writes): not counted


def one(n: int, traced: bool, resent: bool = False) -> dict:
    """One rep in this process: {statements, pages, us} per instance."""
    from pacsp2p.catalog import db
    from pacsp2p.catalog.facts import stamped
    from pacsp2p.types import InstanceMeta, Location
    t0 = int(time.time() * 1000)
    metas = []
    for i in range(n):
        a = {"PatientID": "PID0001", "PatientName": "DOE^JANE", "PatientBirthDate": "19700101",
             "PatientSex": "F", "StudyInstanceUID": f"{ROOT}.1", "StudyDate": "20240115",
             "StudyTime": "101500", "AccessionNumber": "A1", "StudyID": "1",
             "StudyDescription": "MR BRAIN", "ReferringPhysicianName": "REF^X",
             "SeriesInstanceUID": f"{ROOT}.1.1", "Modality": "MR", "SeriesNumber": "1",
             "SeriesDescription": "T1 AX", "InstanceNumber": str(i + 1),
             "ImageType": "ORIGINAL\\PRIMARY"}
        metas.append(stamped(InstanceMeta(f"{ROOT}.1.1.{i}", "1.2.840.10008.5.1.4.1.1.4",
                                          "1.2.840.10008.1.2.1", a, 33000), t0 + 6 * i))
    locs = [Location(m.sop_instance_uid, "local", "a", "ab" * 32, 33000) for m in metas]
    with tempfile.TemporaryDirectory(prefix="pacsp2p-bench-row-") as d:
        cat = db.Catalog(Path(d) / "catalog.sqlite", None, peer="a")
        cat._open_writer()
        conn = cat._writer
        conn.execute("PRAGMA wal_autocheckpoint=0")
        if resent:             # one other instance received twice (its receipts' rows kept)
            again = dataclasses.replace(metas[0], sop_instance_uid=f"{ROOT}.1.1.x")
            for k in (1, 2):
                cat.record_now(stamped(again, t0 - 100 * k), dataclasses.replace(
                    locs[0], sop_instance_uid=again.sop_instance_uid))
        for i in range(WARM):
            cat.record_now(metas[i], locs[i])
        wal = Path(str(cat.path) + "-wal")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        w0, statements = wal.stat().st_size, [0]
        if traced:
            conn.set_trace_callback(lambda _: statements.__setitem__(0, statements[0] + 1))
        c0 = time.thread_time()
        for i in range(WARM, n):
            cat.record_now(metas[i], locs[i])
        c1 = time.thread_time()
        conn.set_trace_callback(None)
        counted = n - WARM
        out = {"us": (c1 - c0) / counted * 1e6,
               "pages": (wal.stat().st_size - w0) / (page + 24) / counted,
               "statements": statements[0] / counted}
        conn.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--code", default=None, help="LABEL=DIR,...: trees (PYTHONPATH), interleaved")
    p.add_argument("--resent", action="store_true", help="an instance received twice first")
    p.add_argument("--one", choices=["traced", "timed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.instances, args.one == "traced", args.resent)))
        return 0
    trees = [tuple(x.split("=", 1)) for x in args.code.split(",")] if args.code else \
        [("", None)]
    print(f"catalog row: {args.instances} instances, one series, record_now each"
          f"{' (an instance received twice first)' if args.resent else ''}; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def run(tree, mode):
        env = dict(os.environ)
        if tree:
            env["PYTHONPATH"] = tree
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--instances",
                              str(args.instances)] + ["--resent"] * args.resent, env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)
    traced = {label: run(tree, "traced") for label, tree in trees}
    us: dict[str, list] = {label: [] for label, _ in trees}
    for _ in range(args.reps):
        for label, tree in trees:
            us[label].append(run(tree, "timed")["us"])
    print(f"{'code':10} {'statements':>10} {'WAL pages':>10} {'CPU us (median)':>16}  reps")
    for label, _ in trees:
        t = traced[label]
        print(f"{label or 'this':10} {t['statements']:10.2f} {t['pages']:10.2f} "
              f"{statistics.median(us[label]):16.0f}  "
              f"{' '.join(f'{u:.0f}' for u in us[label])}")
    print(f"load after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
