#!/usr/bin/env python3
"""C-FIND cost per match: a ~300-match study-level query and a single-match query on the
10,000-study catalog of ``bench/find.py`` (same records, same writer), pacsp2p against a
real Orthanc holding the same studies, in one run.

  wide   StudyDate range of 110 days (~300 of the 10,000 studies match)
  uid    StudyInstanceUID single value (1 match)

Clients: the pynetdicom client of ``bench/find.py`` (TCP_NODELAY, one association,
guarded against pynetdicom #875 as the tests' associations are,
latency = request to final response, p50 of N) and DCMTK ``findscu`` (one process per
query, start-up and association included; median of N; once printing every response data
set, ``-v``, once a line per response, ``-sr``), and ``wirefind.WireFind``, which
frames the request and reads the responses' command sets only (the identifiers are not
decoded: the time until the server has answered). The peer's CPU-seconds over the
pynetdicom queries are divided by the rows returned (psutil). Targets (issue 15): the
wide query in <= 0.5x Orthanc's time, single-match p50 < 10 ms.

    .venv/bin/python bench/find_wide.py [--quick] [--queries N] [--no-orthanc]
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, median, percentile, table  # noqa: E402
import find as fb  # noqa: E402
from wirefind import WireFind  # noqa: E402

from pacsp2p.dicom.requestor import guard  # noqa: E402
from pacsp2p.testing import Orthanc, Peer  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402

WIDE_DAYS = 110
CLIENTS = {"py": "pynetdicom", "dcmtk": "findscu", "dcmtk-sr": "findscu -sr", "wire": "wire"}


def make_queries(records, n: int):
    rng = random.Random(15)
    out = []
    first = time.mktime(time.strptime("20150101", "%Y%m%d"))
    for _ in range(n):
        lo = first + rng.randrange(3650 - WIDE_DAYS) * 86400
        rng_ = (time.strftime("%Y%m%d", time.localtime(lo)) + "-"
                + time.strftime("%Y%m%d", time.localtime(lo + (WIDE_DAYS - 1) * 86400)))
        out.append(("wide", {"StudyDate": rng_}))
        out.append(("uid", {"StudyInstanceUID": rng.choice(records)["StudyInstanceUID"]}))
    return out


def findscu(port: int, aec: str, keys: dict, show: bool = True) -> tuple[float, int]:
    """One findscu process: (ms, matches). *show*: every response data set printed (-v);
    else only a line per response (``-sr``, --hide-responses: the matches still counted)."""
    args = ["-v", "-S", "-aet", "BENCHFIND", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY"]
    if not show:
        args.insert(1, "-sr")
    for kw in fb.RETURN_KEYS:
        args += ["-k", f"{kw}={keys.get(kw, '')}"]
    with Timer() as t:
        r = common.run_dcmtk("findscu", *args, "127.0.0.1", port, timeout=120)
    text = "".join(x.decode("latin-1") if isinstance(x, bytes) else x
                   for x in (r.stdout or "", r.stderr or ""))
    if show:
        return t.seconds * 1000, text.count("Find Response:")
    return t.seconds * 1000, sum(1 for line in text.splitlines()
                                 if "Received Find Response" in line and "(Pending)" in line)


class _GuardedAE(fb.AE):
    """pynetdicom's AE whose associations deliver every response to its caller
    (pynetdicom #875: a response that arrives right behind another can be lost)."""

    def associate(self, *args, **kwargs):
        assoc = super().associate(*args, **kwargs)
        if assoc.is_established:
            guard(assoc)
        return assoc


fb.AE = _GuardedAE


def cpu_seconds(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run(name, port, aec, pid, qs, findscu_n):
    with_cpu = pid is not None
    c0 = cpu_seconds(pid) if with_cpu else 0.0
    res = fb.run_queries(port, aec, qs, 300)
    cpu = cpu_seconds(pid) - c0 if with_cpu else None
    rows = sum(sum(d["rows"]) for d in res.values())
    dres, qres, wres = {}, {}, {}
    for kind, keys in qs[:2 * findscu_n]:
        for show, out in ((True, dres), (False, qres)):
            ms, n = findscu(port, aec, keys, show)
            d = out.setdefault(kind, {"ms": [], "rows": []})
            d["ms"].append(ms)
            d["rows"].append(n)
    with WireFind(port, aec) as wire:
        for kind, keys in qs[:5]:                  # warm-up, not counted
            wire.find(fb.identifier(keys))
        for kind, keys in qs:
            ms, n = wire.find(fb.identifier(keys))
            d = wres.setdefault(kind, {"ms": [], "rows": []})
            d["ms"].append(ms)
            d["rows"].append(n)
    return res, dres, qres, wres, (cpu / rows * 1000 if cpu is not None and rows else None)


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=None, help="queries per kind (30; 10 quick)")
    p.add_argument("--no-orthanc", action="store_true")
    args = p.parse_args()
    n = args.queries or (10 if args.quick else 30)
    common.header("C-FIND cost per match: 10,000 studies, wide (~300 rows) and single-match")
    records = list(fb.studies(fb.N_PATIENTS))
    qs = make_queries(records, n)
    out = {}
    with common.workdir(args.keep, "pacsp2p-bench-findwide-") as wd:
        peer = Peer(wd / "peer", name=fb.PEER_NAME, startup_timeout=600)
        fb.fill_catalog(peer.data_dir / "catalog.sqlite", records)
        peer.start()
        try:
            orthanc = None
            if not args.no_orthanc:
                files = fb.tiny_files(args.cache, records)
                orthanc = Orthanc(wd / "orthanc")
                orthanc.__enter__()
                with Timer() as t:
                    storescu(orthanc.dicom_port, orthanc.aet, [files], timeout=900)
                print(f"   Orthanc loaded in {t.seconds:.1f} s (not timed)")
            try:
                for rep in range(2):       # interleaved: half the queries each turn
                    part = qs[rep * len(qs) // 2:(rep + 1) * len(qs) // 2]
                    order = ["pacsp2p", "orthanc"] if rep == 0 else ["orthanc", "pacsp2p"]
                    for name in order:
                        if name == "orthanc" and orthanc is None:
                            continue
                        port, aec, pid = ((peer.port, peer.ae_title, peer.pid)
                                          if name == "pacsp2p" else
                                          (orthanc.dicom_port, orthanc.aet, None))
                        res, dres, qres, wres, cpu = run(name, port, aec, pid, part,
                                                         max(5, n // 2))
                        o = out.setdefault(name, {**{c: {} for c in CLIENTS}, "cpu": []})
                        for src, dst in ((res, o["py"]), (dres, o["dcmtk"]),
                                         (qres, o["dcmtk-sr"]), (wres, o["wire"])):
                            for kind, d in src.items():
                                e = dst.setdefault(kind, {"ms": [], "rows": []})
                                e["ms"] += d["ms"]
                                e["rows"] += d["rows"]
                        if cpu is not None:
                            o["cpu"].append(cpu)
            finally:
                if orthanc is not None:
                    orthanc.__exit__(None, None, None)
        finally:
            peer.stop()
    print()
    rows = []
    for name, o in out.items():
        for client in CLIENTS:
            for kind in ("wide", "uid"):
                d = o[client].get(kind)
                if d:
                    rows.append([name, CLIENTS[client], kind,
                                 str(len(d["ms"])), f"{sum(d['rows']) / len(d['rows']):.1f}",
                                 f"{percentile(d['ms'], 50):.2f}",
                                 f"{percentile(d['ms'], 99):.2f}"])
    print(table(rows, ["server", "client", "query", "n", "matches/query", "p50 ms", "p99 ms"]))
    pc = out["pacsp2p"]
    if pc["cpu"]:
        print(f"\npacsp2p peer CPU per returned row (pynetdicom queries): "
              f"{median(pc['cpu']):.3f} ms")
    uid50 = percentile(pc["py"]["uid"]["ms"], 50)
    print(f"pacsp2p single-match p50 = {uid50:.2f} ms "
          f"({'meets' if uid50 < 10 else 'MISSES'} target < 10 ms)")
    if "orthanc" in out:
        for client in CLIENTS:
            a = percentile(pc[client]["wide"]["ms"], 50)
            b = percentile(out["orthanc"][client]["wide"]["ms"], 50)
            print(f"wide query ({CLIENTS[client]}): "
                  f"pacsp2p/orthanc p50 = {a / b:.2f} "
                  f"({'meets' if a / b <= 0.5 else 'MISSES'} target <= 0.5)")
        a, b = pc["py"]["wide"]["rows"], out["orthanc"]["py"]["wide"]["rows"]
        if a != b:
            print(f"   note: match counts differ (pacsp2p {sum(a)}, orthanc {sum(b)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
