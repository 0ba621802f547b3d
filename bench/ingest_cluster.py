#!/usr/bin/env python3
"""Replicated ingest benchmark: DCMTK storescu (one association, TCP_NODELAY=1) of the
300 x 512x512x16-bit CT study (~157 MB, cached by bench/common.py) into

  cluster    a 3-peer pacsp2p cluster (overlay, defaults R=2, W=2), sent to peer A:
             every instance is acknowledged once 2 copies on 2 distinct peers are durable
  single     one pacsp2p peer on its own (R=1, W=1)
  storescp   DCMTK storescp +xa (no fsync)
  cluster-nosync  the cluster with [storage] fsync = false (what fsync costs; not --quick)

with the same storescu invocation. Every repetition gets fresh targets (a fresh cluster).
Prints median MB/s and inst/s and the ratios; target of issue 5: cluster >= 0.6 x single.

    .venv/bin/python bench/ingest_cluster.py [--quick] [--reps N]
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.testing import Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.cluster import Cluster, get_json, wait_until  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402


def cpu_seconds(pids) -> float:
    """user + system CPU seconds used so far by the processes *pids* (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


CPU: dict[str, list] = {}


def send(port: int, aec: str, data: common.DataSet, pids=(), target="") -> float:
    """storescu all files of *data* on one association (every response checked); the CPU
    time the processes *pids* used meanwhile is noted in CPU[target]."""
    before = cpu_seconds(pids)
    with Timer() as t:
        proc = storescu(port, aec, [data.directory], aet="BENCHSCU", timeout=900,
                        extra=["-v"])
    CPU.setdefault(target, []).append(cpu_seconds(pids) - before)
    ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")
    if ok != data.count:
        raise RuntimeError(f"{ok} of {data.count} C-STOREs succeeded\n{proc.stderr[-2000:]}")
    return t.seconds


def run_cluster(work: Path, data: common.DataSet, fsync: bool = True) -> tuple[float, dict]:
    cluster = Cluster(work, config=None if fsync else {"storage": {"fsync": False}})
    try:
        cluster.start(3)
        cluster.wait_mesh(timeout=30)
        a = cluster[0]
        seconds = send(a.port, a.ae_title, data, [p.pid for p in cluster],
                       "cluster" if fsync else "cluster-nosync")
        # every instance acknowledged means 2 durable copies; check where they are
        held = {p.name: common.held_instances(p)
                for p in cluster}
        if sum(held.values()) != 2 * data.count:
            raise RuntimeError(f"copies on disk {held}, expected {2 * data.count} in all")
        wait_until(lambda: len(get_json(a, f"where?study={data.study_uid}", 30)) == data.count,
                   30, interval=0.5, what="peer A lists every instance")
        rows = get_json(a, f"where?study={data.study_uid}", 30)
        per_peer = Counter(x["peer"] for r in rows for x in r["replicas"])
        if any(len({x["peer"] for x in r["replicas"]}) < 2 for r in rows):
            raise RuntimeError("an instance has fewer than 2 replicas on distinct peers")
        return seconds, dict(per_peer)
    finally:
        cluster.stop()


def run_single(work: Path, data: common.DataSet) -> tuple[float, dict]:
    with Peer(work) as peer:
        seconds = send(peer.port, peer.ae_title, data, [peer.pid], "single")
        held = common.held_instances(peer)
    if held != data.count:
        raise RuntimeError(f"peer holds {held} of {data.count} instances")
    return seconds, {"peer": held}


def run_storescp(work: Path, data: common.DataSet) -> tuple[float, dict]:
    with StoreSCP(work / "in", ae_title="STORESCP", log_path=work / "storescp.log") as scp:
        seconds = send(scp.port, scp.ae_title, data)
    held = common.count_files(work / "in")
    if held != data.count:
        raise RuntimeError(f"storescp wrote {held} of {data.count} files")
    return seconds, {"files": held}


RUNNERS = {"cluster": run_cluster, "single": run_single, "storescp": run_storescp,
           "cluster-nosync": lambda w, d: run_cluster(w, d, fsync=False)}


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions per target (3; 1 quick)")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    common.header("replicated ingest: DCMTK storescu, one association, TCP_NODELAY=1")
    data = common.ct_study(args.cache)
    size = data.bytes
    print(f"-- {data.name}: {data.count} instances, {mb(size):.1f} MB, {reps} rep(s)")
    results: dict[str, dict] = {}
    with common.workdir(args.keep, "pacsp2p-bench-ingest-cluster-") as wd:
        for rep in range(reps):               # interleaved: drift hits every target alike
            for target, run in RUNNERS.items():
                if args.quick and target == "cluster-nosync":
                    continue
                s, where = run(wd / f"{target}-{rep}", data)
                results.setdefault(target, {"s": []})["s"].append(s)
                results[target]["where"] = where
                print(f"   {target:9s} rep {rep + 1}: {s:6.2f} s  {mb(size) / s:7.1f} MB/s  "
                      f"{data.count / s:6.0f} inst/s  {where}", flush=True)
                time.sleep(1.0)
    print()
    for r in results.values():
        r["median"] = median(r["s"])
        r["mbs"] = mb(size) / r["median"]
    single = results["single"]["mbs"]
    rows = [[t, f"{r['median']:.2f}", f"{r['mbs']:.1f}", f"{data.count / r['median']:.0f}",
             f"{r['mbs'] / single:.2f}",
             f"{median(CPU[t]):.2f}" if t in CPU else "-"] for t, r in results.items()]
    print(table(rows, ["target", "median s", "MB/s", "inst/s", "this/single",
                       "pacsp2p CPU s"]))
    c, sc = results["cluster"]["mbs"], results["storescp"]["mbs"]
    verdict = "meets" if c >= 0.6 * single else "MISSES"
    print(f"\ncluster/single = {c / single:.2f}   cluster/storescp = {c / sc:.2f}   "
          f"single/storescp = {single / sc:.2f}   ({verdict} target cluster >= 0.6 x single)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
