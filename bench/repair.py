#!/usr/bin/env python3
"""Repair benchmark: how fast a cluster gives instances their second copy back, against
how fast the same peers ingest.

A fresh 3-peer pacsp2p cluster (R=2, W=2, ``repair_after`` = 3 s, ``repair_rate`` = 0:
unthrottled) per repetition:

  ingest   DCMTK storescu (one association, TCP_NODELAY=1) of the 300 x 512x512x16-bit
           CT study (~157 MB, cached by bench/common.py) to peer A: every instance
           acknowledged once 2 copies on 2 distinct peers are durable
  repair   kill -9 of peer C; the instances that had a copy on C (about 2/3) get a new
           one from peers A and B. Timed from the first repair copy to the last
           (the peers' own ``repair.started``/``repair.last`` in GET /status), and, end to
           end, from C seen dead + repair_after to every instance with 2 live copies in
           ``where`` and ``under_replicated`` 0 at A and B

Prints instances/s and MB/s of both (MB of instances: a stored instance is written twice,
a repaired one once) and the ratio; target of issue 13: repair >= 0.5 x ingest.

    .venv/bin/python bench/repair.py [--quick] [--reps N]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402

REPAIR_AFTER = 3.0


def where(peer, study: str) -> dict:
    rows = get_json(peer, f"where?study={study}", 60)
    return {r["instance"]: r["replicas"] for r in rows}


def run(work: Path, data: common.DataSet) -> dict:
    cluster = Cluster(work, config={"cluster": {"repair_after": REPAIR_AFTER,
                                                "repair_rate": 0}})
    try:
        cluster.start(3)
        cluster.wait_mesh(timeout=30)
        a, b, c = cluster
        with Timer() as t:
            proc = storescu(a.port, a.ae_title, [data.directory], aet="BENCHSCU",
                            timeout=900, extra=["-v"])
        ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")
        if ok != data.count:
            raise RuntimeError(f"{ok} of {data.count} C-STOREs succeeded")
        ingest_s = t.seconds
        wait_until(lambda: len(where(a, data.study_uid)) == data.count, 60, 0.5,
                   "peer A lists every instance")
        rows = where(a, data.study_uid)
        lost = [u for u, reps in rows.items() if any(x["peer"] == "peerc" for x in reps)]

        c.kill9()
        wait_until(lambda: members(a).get("peerc") == "dead"
                   and members(b).get("peerc") == "dead", 30, 0.1, "C seen dead")
        t_due = time.monotonic() + REPAIR_AFTER

        def repaired():
            rs = where(a, data.study_uid)
            return (all(sum(1 for x in v if x["available"]) == 2 for v in rs.values())
                    and all(get_json(p, timeout=30)["under_replicated"]["instances"] == 0
                            for p in (a, b)))
        wait_until(repaired, 900, 0.2, "every instance has 2 live copies")
        end_to_end = time.monotonic() - t_due
        st = {p.name: get_json(p, timeout=30)["repair"] for p in (a, b)}
        done = sum(s["done"] for s in st.values())
        nbytes = sum(s["bytes"] for s in st.values())
        starts = [s["started"] for s in st.values() if s["done"]]
        lasts = [s["last"] for s in st.values() if s["done"]]
        window = max(lasts) - min(starts)
        if done != len(lost):
            raise RuntimeError(f"{done} repair copies made for {len(lost)} lost copies")
        return {"ingest_s": ingest_s, "ingest_n": data.count, "ingest_bytes": data.bytes,
                "repair_s": window, "repair_n": done, "repair_bytes": nbytes,
                "end_to_end_s": end_to_end,
                "per_peer": {n: (s["done"], round(s["avg_rate"], 1)) for n, s in st.items()}}
    finally:
        cluster.stop()


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (2; 1 quick)")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 2)
    common.header("repair: 3 peers, R=2, kill -9 of one, unthrottled re-replication")
    data = common.ct_study(args.cache)
    print(f"-- {data.name}: {data.count} instances, {mb(data.bytes):.1f} MB, {reps} rep(s)")
    results = []
    with common.workdir(args.keep, "pacsp2p-bench-repair-") as wd:
        for rep in range(reps):
            r = run(wd / f"rep{rep}", data)
            results.append(r)
            print(f"   rep {rep + 1}: ingest {r['ingest_s']:6.2f} s "
                  f"{mb(r['ingest_bytes']) / r['ingest_s']:6.1f} MB/s "
                  f"{r['ingest_n'] / r['ingest_s']:5.0f} inst/s | repair {r['repair_n']} "
                  f"copies in {r['repair_s']:6.2f} s "
                  f"{mb(r['repair_bytes']) / r['repair_s']:6.1f} MB/s "
                  f"{r['repair_n'] / r['repair_s']:5.0f} inst/s, end to end "
                  f"{r['end_to_end_s']:.2f} s after repair_after; per peer "
                  f"(copies, MB/s) {r['per_peer']}", flush=True)
            time.sleep(1.0)
    print()
    ing_mbs = median([mb(r["ingest_bytes"]) / r["ingest_s"] for r in results])
    ing_is = median([r["ingest_n"] / r["ingest_s"] for r in results])
    rep_mbs = median([mb(r["repair_bytes"]) / r["repair_s"] for r in results])
    rep_is = median([r["repair_n"] / r["repair_s"] for r in results])
    e2e_mbs = median([mb(r["repair_bytes"]) / r["end_to_end_s"] for r in results])
    rows = [["ingest (storescu -> A, 2 copies each)", f"{ing_is:.0f}", f"{ing_mbs:.1f}", "1.00"],
            ["repair (A and B copy, 1 copy each)", f"{rep_is:.0f}", f"{rep_mbs:.1f}",
             f"{rep_mbs / ing_mbs:.2f}"],
            ["repair, end to end (detection, count)", "-", f"{e2e_mbs:.1f}",
             f"{e2e_mbs / ing_mbs:.2f}"]]
    print(table(rows, ["what (median)", "inst/s", "MB/s", "x ingest"]))
    verdict = "meets" if rep_mbs >= 0.5 * ing_mbs else "MISSES"
    print(f"\nrepair/ingest = {rep_mbs / ing_mbs:.2f} ({verdict} target repair >= 0.5 x ingest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
