#!/usr/bin/env python3
"""Join benchmark: a peer whose archive is an Orthanc already holding N instances joins.

An Orthanc is filled behind the cluster's back (REST upload, several threads) with N
(default 10,000) tiny 8x8 CT instances, 50 per study (two series), 2 studies per patient.
The filled Orthanc (storage + index) is cached in ``--cache`` and copied for every run, so
filling it is done once and never timed. A running 2-peer cluster (peera, peerb; embedded
archives; overlay with mutual TLS on 127.0.0.1) is joined by peerc, whose only
``[[archives]]`` is that Orthanc through the ``orthanc`` adapter (crawl fast path:
``/studies?expand`` pages + two requests per study). Timed from peerc's spawn:

  crawl     peerc's /status "crawls": done == N, finished (its own rate: instances per
            second of crawling, from the first page to the last)
  visible   findscu (study level, NumberOfStudyRelatedInstances) at peera — the OTHER
            peer — counts all N instances (crawl + gossip)

Target: crawl rate >= 1,000 instances/s for the Orthanc fast path.

    .venv/bin/python bench/join.py [--quick | --instances N] [--keep]
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, table  # noqa: E402

from pacsp2p.testing import Orthanc, findscu  # noqa: E402
from pacsp2p.testing.cluster import Cluster, get_json, wait_until  # noqa: E402
from pacsp2p.testing.preload import tiny_corpus, upload_parallel  # noqa: E402

PER_STUDY = 50


def filled_orthanc(cache: Path, n: int) -> Path:
    """A directory holding an Orthanc storage + index with the N-instance corpus."""
    done = cache / f"orthanc-join-{n}"
    if (done / "complete").exists():
        return done
    files = tiny_corpus(cache / f"join-files-{n}", n, per_study=PER_STUDY, tag="bjoin")
    shutil.rmtree(done, ignore_errors=True)
    with Timer() as t:
        with Orthanc(done) as o:
            upload_parallel(o, files, threads=8)
            count = o.statistics()["CountInstances"]
    if count != n:
        raise RuntimeError(f"Orthanc holds {count} instances, expected {n}")
    print(f"filled Orthanc with {n} instances in {t.seconds:.1f} s "
          f"({n / t.seconds:.0f}/s, REST, 8 threads); cached in {done}")
    (done / "complete").write_text("ok\n")
    return done


def total_at(peer) -> int:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
        "NumberOfStudyRelatedInstances": ""}, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return sum(int(r.NumberOfStudyRelatedInstances or 0) for r in rows)


def run(work: Path, filled: Path, n: int) -> dict:
    store = work / "orthanc"
    shutil.copytree(filled, store, ignore=shutil.ignore_patterns("complete", "*.log"))
    with Orthanc(store) as o:
        cluster = Cluster(work / "cluster")
        try:
            cluster.start(2)
            cluster.wait_mesh(timeout=30)
            a = cluster[0]
            cluster.config = {"archives": [{"name": "orthanc", "adapter": "orthanc",
                                            "url": o.url}]}
            t0 = time.monotonic()
            c = cluster.add("peerc")
            wait_until(lambda: get_json(c)["crawls"][0]["finished"], 600, 0.1,
                       "crawl finished")
            crawl_s = time.monotonic() - t0
            status = get_json(c)["crawls"][0]
            wait_until(lambda: total_at(a) >= n, 600, 1.0, f"{n} instances visible at peera")
            visible_s = time.monotonic() - t0
            seen = total_at(a)
            return {"crawl": status, "crawl_s": crawl_s, "visible_s": visible_s,
                    "seen_at_a": seen}
        finally:
            cluster.stop()


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=10_000)
    args = p.parse_args()
    n = 1_000 if args.quick else args.instances
    args.cache.mkdir(parents=True, exist_ok=True)
    filled = filled_orthanc(args.cache, n)
    with common.workdir(args.keep, "pacsp2p-bench-join-") as work:
        r = run(work, filled, n)
    c = r["crawl"]
    print(table([[f"{n:,}", f"{c['done']:,}", f"{c['elapsed_s']:.2f}", f"{c['rate']:,.0f}",
                  f"{r['crawl_s']:.1f}", f"{r['visible_s']:.1f}", f"{r['seen_at_a']:,}"]],
                ["instances", "crawled", "crawl s", "crawl inst/s", "spawn->crawled s",
                 "spawn->visible at A s", "found at A"]))
    ok = c["rate"] >= 1000 and r["seen_at_a"] == n
    print(f"target crawl rate >= 1,000/s: {'met' if c['rate'] >= 1000 else 'NOT met'}; "
          f"findscu at the other peer found {r['seen_at_a']:,} of {n:,}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
