#!/usr/bin/env python3
"""The CPU of answering one catalog pull mid-stream, as a writer at 32 peers does (issue
18): 1,000 instances of one series, two copies each on 31 holders (2,000 facts of 31
origins); the asker lags 5 facts on each origin (``read_changes_of`` + ``encode_answer``,
what ``/changes`` runs per request, without the HTTPS around it). And the asker's side:
the whole stream's 2,000 facts taken in 7 pulls into an empty catalog (``decode_answer``,
``check_wire``, ``write_wires``: what ``AntiEntropy.pull`` and ``Catalog.apply_all`` run),
what each of the 31 other peers spends on a stream's facts.

    .venv/bin/python bench/pull_serve.py                     # this tree
    .venv/bin/python bench/pull_serve.py /tmp/before /tmp/after   # source trees, alternated

Each tree runs in a process of its own, three times in turn; CPU ms per pull (process
time over 300 answers).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CT = "1.2.840.10008.5.1.4.1.1.2"


def measure(n: int = 300) -> str:
    from pacsp2p.catalog import db, facts, schema
    from pacsp2p.overlay.sync import encode_answer
    conn = db._connect(Path(tempfile.mkdtemp()) / "catalog.sqlite")
    schema.create_schema(conn)
    rng = random.Random(1)
    holders = [f"peer{i:02d}" for i in range(1, 32)]
    seq = dict.fromkeys(holders, 1_800_000_000_000)
    rows = []
    for i in range(1000):
        attrs = {"PatientID": "P1", "PatientName": "N^1", "StudyInstanceUID": "1.2.4.1",
                 "SeriesInstanceUID": "1.2.5.1", "StudyDate": "20240101", "Modality": "CT",
                 "SOPInstanceUID": f"1.2.3.{i}", "SOPClassUID": CT,
                 "TransferSyntaxUID": "1.2.840.10008.1.2.1", "InstanceNumber": str(i)}
        for h in rng.sample(holders, 2):
            seq[h] += 1
            rows.append((attrs, (f"1.2.3.{i}", "local", h, f"{i:064x}", 10000, seq[h])))
    db.write_facts(conn, rows)
    mine = db.vector(conn)
    wanted = [(o, s - 5) for o, s in sorted(mine.items())]
    body = encode_answer(mine, facts.read_changes_of(conn, wanted, 5000))
    t = time.process_time()
    for _ in range(n):
        encode_answer(mine, facts.read_changes_of(conn, wanted, 5000))
    ms = 1000 * (time.process_time() - t) / n
    take = min(_take(conn) for _ in range(5))
    return (f"{ms:.2f} ms CPU per pull ({len(body):,} bytes, {len(wanted)} origins); "
            f"taking the stream in 7 pulls {1000 * take:.1f} ms CPU (best of 5)")


def _take(source) -> float:
    """CPU seconds to take *source*'s facts in 7 pulls, each of the facts committed in a
    seventh of the stream (every origin at once, as a pull from the writer brings them)."""
    from pacsp2p.catalog import db, facts, schema, tombstones
    from pacsp2p.overlay.sync import checked_rows, decode_answer, encode_answer
    order = source.execute("SELECT peer, seq FROM locations ORDER BY rowid").fetchall()
    bodies, had = [], {}
    for k in range(1, 8):
        upto = {}
        for peer, seq in order[:len(order) * k // 7]:
            upto[peer] = max(upto.get(peer, 0), seq)
        wanted = [(o, had.get(o, 0), s) for o, s in sorted(upto.items()) if s > had.get(o, 0)]
        bodies.append(encode_answer(upto, facts.read_changes_of(source, wanted, 5000)))
        had = upto
    conn = db._connect(Path(tempfile.mkdtemp()) / "catalog.sqlite")
    schema.create_schema(conn)
    tombstones.create_schema(conn)
    t = time.process_time()
    for body in bodies:
        _, parts = decode_answer(body)
        batch = [checked_rows(origin, json.loads(raw))[0] for origin, raw in parts]
        for rows in batch:
            facts.check_wire(rows)
        facts.write_wires(conn, batch, "peer32")
    return time.process_time() - t


def main() -> None:
    trees = sys.argv[1:]
    if not trees:
        print(measure())
        return
    for rep in range(3):
        for tree in trees:
            out = subprocess.run([sys.executable, __file__, "--one"], cwd=tree, check=True,
                                 env={"PYTHONPATH": str(Path(tree).resolve()),
                                      "PATH": "/usr/bin:/bin"},
                                 capture_output=True, text=True).stdout.strip()
            print(f"{rep + 1} {tree}: {out}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        sys.path.insert(0, ".")
        print(measure())
    else:
        main()
