#!/usr/bin/env python3
"""Crawl benchmark: the plain ``dimse`` adapter joins an archive that already holds N instances.

Each archive is filled behind the cluster's back (storescu straight to it, not timed) with
N (default 2,000; ``--quick`` 300) tiny 8x8 CT instances, 50 per study (two series of 25):

  dcmqrscp   DCMTK dcmqrscp (its C-FIND returns no SOP Class UID: the adapter learns it
             with one C-GET probe per series)
  orthanc    Orthanc, spoken to through DIMSE only (adapter ``dimse``, not ``orthanc``)

Then a fresh single peer whose only ``[[archives]]`` is that archive through the
``dimse`` adapter (STUDY -> SERIES -> IMAGE C-FIND, one study per crawl page) is started,
``crawl_qps`` raised to 10,000 so the token bucket does not set the pace. Timed from the
peer's spawn to the crawl's ``finished`` flag in GET /status "crawls" (polled every
50 ms); checked afterwards: findscu at the peer counts all N instances. Median of
``--reps`` fresh peers (the archive is filled once).

Printed per archive: instances/s spawn->finished (start-up included), and the crawl's own
rate from /status (first page to last). Target: >= 300 instances/s for plain DIMSE.

    .venv/bin/python bench/crawl.py [--quick | --instances N] [--reps R]
                                    [--archives dcmqrscp,orthanc] [--keep]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, median, table  # noqa: E402

from pacsp2p.testing import Orthanc, Peer, findscu, storescu  # noqa: E402
from pacsp2p.testing.cluster import get_json, wait_until  # noqa: E402
from pacsp2p.testing.dcmqrscp import DcmQrScp  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK  # noqa: E402
from pacsp2p.testing.preload import tiny_corpus  # noqa: E402

PER_STUDY = 50
QPS = 10_000


def total_at(peer) -> int:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
        "NumberOfStudyRelatedInstances": ""}, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return sum(int(r.NumberOfStudyRelatedInstances or 0) for r in rows)


def start_archive(kind: str, work: Path, n: int):
    """A started, empty archive of *kind*: (server, ae_title, dicom port)."""
    if kind == "dcmqrscp":
        q = DcmQrScp(work / kind, ae_title="DCMQR", max_studies=max(1000, n // PER_STUDY + 10))
        q.start()
        return q, q.ae_title, q.port
    o = Orthanc(work / kind, aet="ORTHANC")
    o.start()
    return o, o.aet, o.dicom_port


def one_run(work: Path, ae: str, port: int, n: int) -> dict:
    block = {"name": "pacs", "adapter": "dimse", "ae_title": ae, "host": LOOPBACK,
             "port": port, "crawl_qps": QPS}
    peer = Peer(work, name="crawler", config={"archives": [block]}, startup_timeout=60)
    t0 = time.monotonic()
    try:
        peer.start()
        wait_until(lambda: get_json(peer)["crawls"][0]["finished"], 900, 0.05,
                   "crawl finished")
        spawn_s = time.monotonic() - t0
        crawl = get_json(peer)["crawls"][0]
        seen = total_at(peer)
    finally:
        peer.stop()
    if crawl["done"] != n or seen != n:
        raise RuntimeError(f"crawled {crawl['done']}, findscu counts {seen}, expected {n}; "
                           f"log {peer.log_path}")
    return {"spawn_s": spawn_s, "rate": crawl["rate"], "crawl_s": crawl["elapsed_s"]}


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=2_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--archives", default="dcmqrscp,orthanc")
    args = p.parse_args()
    n = 300 if args.quick else args.instances
    reps = 1 if args.quick else args.reps
    kinds = [k for k in args.archives.split(",") if k]
    common.header(f"crawl: dimse adapter, {n:,} instances, {PER_STUDY} per study, "
                  f"crawl_qps {QPS:,}, median of {reps}")
    args.cache.mkdir(parents=True, exist_ok=True)
    files_dir = args.cache / f"crawl-files-{n}"
    tiny_corpus(files_dir, n, per_study=PER_STUDY, tag="bcrawl")
    rows, ok = [], True
    with common.workdir(args.keep, "pacsp2p-bench-crawl-") as work:
        for kind in kinds:
            server, ae, port = start_archive(kind, work, n)
            try:
                with Timer() as t:
                    storescu(port, ae, [files_dir], timeout=1800)
                print(f"{kind}: filled with {n:,} instances by storescu in {t.seconds:.1f} s "
                      f"(not timed)", flush=True)
                runs = []
                for i in range(reps):
                    r = one_run(work / f"{kind}-peer{i}", ae, port, n)
                    print(f"  {kind} run {i + 1}: spawn->finished {r['spawn_s']:.2f} s "
                          f"({n / r['spawn_s']:,.0f}/s), crawl's own {r['rate']:,.0f}/s "
                          f"over {r['crawl_s']:.2f} s", flush=True)
                    runs.append(r)
            finally:
                server.stop()
            spawn = median([r["spawn_s"] for r in runs])
            own = median([r["rate"] for r in runs])
            ok &= n / spawn >= 300
            rows.append([kind, f"{n:,}", f"{spawn:.2f}", f"{n / spawn:,.0f}", f"{own:,.0f}",
                         "met" if n / spawn >= 300 else "NOT met"])
    print()
    print(table(rows, ["archive", "instances", "spawn->finished s", "inst/s (spawn)",
                       "inst/s (crawl's own)", ">= 300/s"]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
