#!/usr/bin/env python3
"""What bounding a DIMSE archive's answers costs: crawl and C-GET through the ``dimse``
adapter, two code trees in one invocation.

A DCMTK dcmqrscp (filled once by storescu, not timed) holds N tiny instances (50 per study,
two series: ``--instances``, default 1,000) and one CT study of C x 512x512x16-bit
(``--ct``, default 100, ~52 MB). For each code tree (``--code before=DIR,after=DIR``: the
peers run with that PYTHONPATH; a ``git archive`` snapshot each) and each repetition,
interleaved before/after so the machine's load drifts over both alike:

  crawl    a fresh peer whose only ``[[archives]]`` is dcmqrscp (adapter ``dimse``,
           ``crawl_qps`` 10,000) crawls it: the peer's CPU seconds (utime+stime, /proc)
           from spawn to the crawl's ``finished``, per instance crawled;
  c-move   movescu of the CT study through that peer to a storescp (the peer reads every
           instance from dcmqrscp by C-GET): the peer's CPU seconds per instance, and the
           wall clock; every file arrives (checked).

Printed: per tree the medians, and after/before ratios of each (CPU is steadier than wall
clock on a busy machine; load average printed with each run).

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/dimse_bounds.py \\
        --code before=/tmp/snapA,after=/tmp/snapB [--reps 3] [--instances N] [--ct C]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import cpu_seconds, median, table  # noqa: E402

from pacsp2p.testing import Peer, StoreSCP, storescu  # noqa: E402
from pacsp2p.testing import dicomnet as dn  # noqa: E402
from pacsp2p.testing.cluster import get_json, wait_until  # noqa: E402
from pacsp2p.testing.dcmqrscp import DcmQrScp  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK  # noqa: E402
from pacsp2p.testing.preload import tiny_corpus  # noqa: E402


def load() -> str:
    return "%.1f" % os.getloadavg()[0]


def one_run(work: Path, q: DcmQrScp, ct, n: int, scp: StoreSCP) -> dict:
    block = {"name": "pacs", "adapter": "dimse", "ae_title": q.ae_title, "host": LOOPBACK,
             "port": q.port, "crawl_qps": 10_000}
    peer = Peer(work, name="bounds", destinations={"STORESCP": scp.address},
                config={"archives": [block]}, startup_timeout=60)
    try:
        peer.start()
        wait_until(lambda: get_json(peer)["crawls"][0]["finished"], 900, 0.05,
                   "crawl finished")
        crawl_cpu = cpu_seconds([peer.pid])
        done = get_json(peer)["crawls"][0]["done"]
        if done != n + ct.count:
            raise RuntimeError(f"crawled {done}, expected {n + ct.count}")
        dn.clear(scp.directory)
        c0, t0 = cpu_seconds([peer.pid]), time.monotonic()
        proc = dn.movescu(peer.port, peer.ae_title, "STORESCP", {
            "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ct.study_uid}, timeout=600)
        wall, cpu = time.monotonic() - t0, cpu_seconds([peer.pid]) - c0
        got = len(scp.files())
        if proc.returncode != 0 or got != ct.count:
            raise RuntimeError(f"C-MOVE: {got} of {ct.count} files; {proc.stderr[-1500:]}")
    finally:
        peer.stop()
    return {"crawl_ms": crawl_cpu / (n + ct.count) * 1000, "move_ms": cpu / ct.count * 1000,
            "move_s": wall}


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--code", default=None, help="before=DIR,after=DIR (PYTHONPATH of peers)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--instances", type=int, default=1_000)
    p.add_argument("--ct", type=int, default=100)
    args = p.parse_args()
    reps = 1 if args.quick else args.reps
    trees = common.code_versions(args.code)
    common.header(f"dimse bounds: crawl {args.instances:,} tiny + {args.ct} CT, C-MOVE of "
                  f"the CT study via C-GET; {reps} reps, trees {[t for t, _ in trees]}")
    args.cache.mkdir(parents=True, exist_ok=True)
    tiny = args.cache / f"bounds-tiny-{args.instances}"
    tiny_corpus(tiny, args.instances, per_study=50, tag="bbounds")
    ct = common.ct_study(args.cache, args.ct)
    results = {label: [] for label, _ in trees}
    with common.workdir(args.keep, "pacsp2p-bench-bounds-") as work:
        q = DcmQrScp(work / "dcmqrscp", ae_title="DCMQR", max_studies=1000)
        q.start()
        try:
            storescu(q.port, q.ae_title, [tiny, ct.directory], timeout=1800)
            with StoreSCP(work / "scp", ae_title="STORESCP", extra=["+B"]) as scp:
                for i in range(reps):
                    for label, tree in trees:
                        with common.code_tree(tree):
                            r = one_run(work / f"{label}-{i}", q, ct, args.instances, scp)
                        r["load"] = load()
                        results[label].append(r)
                        print(f"  {label or 'this'} run {i + 1}: crawl {r['crawl_ms']:.2f} "
                              f"ms CPU/instance, C-MOVE {r['move_ms']:.2f} ms CPU/instance, "
                              f"{r['move_s']:.2f} s (load {r['load']})", flush=True)
        finally:
            q.stop()
    rows = []
    for label, runs in results.items():
        rows.append([label or "this", f"{median([r['crawl_ms'] for r in runs]):.2f}",
                     f"{median([r['move_ms'] for r in runs]):.2f}",
                     f"{median([r['move_s'] for r in runs]):.2f}"])
    print(table(rows, ["tree", "crawl ms CPU/inst", "C-MOVE ms CPU/inst", "C-MOVE s"]))
    if len(trees) == 2:
        (a, ra), (b, rb) = results.items()
        for key in ("crawl_ms", "move_ms", "move_s"):
            print(f"{key}: {b}/{a} = {median([r[key] for r in rb]) / median([r[key] for r in ra]):.2f}")


if __name__ == "__main__":
    main()
