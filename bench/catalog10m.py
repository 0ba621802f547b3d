#!/usr/bin/env python3
"""A catalog of 10 million instances on one peer (issue 15.3): start-up, RSS, C-FIND.

The catalog is filled before the peer starts, with the product's own writer
(``pacsp2p.catalog.db.create_schema`` + ``write_facts``, in batches with the writer's
parent-row memory, as a stream of C-STOREs writes them) in a realistic shape: 20
instances per series, 4 series per study, 1-5 studies per patient (~3): 10,000,000
instances = 125,000 studies, ~42,000 patients, dates spread over ten years. Memory stays
bounded (a generator; a reservoir of 2,000 studies to draw queries from). The built
catalog is cached as the data directory of a peer under the bench cache
(``$TMPDIR/pacsp2p-bench-cache/catalog10m-<n>/``): re-runs reuse it (the peer
migrates it in place when the schema moved on). A real ``twistd -n pacsp2p`` peer then
starts on it; a pynetdicom client (TCP_NODELAY on its socket) runs, on one association,
interleaved C-FINDs of seven kinds (then DCMTK findscu repeats date and name):

  pid     STUDY, PatientID exact                   target p50 < 50 ms
  acc     STUDY, AccessionNumber exact             target p50 < 50 ms
  uid     STUDY, StudyInstanceUID                  target p50 < 50 ms
  date    STUDY, StudyDate one-week range          target p50 < 200 ms
  name    STUDY, PatientName SURNAME^G*            target p50 < 200 ms
  series  SERIES inside one study                  target p50 < 20 ms
  image   IMAGE inside one series of one study     target p50 < 20 ms

Also: start-up (spawn to C-ECHO; first start and restart after a clean stop) < 10 s, RSS
< 500 MB, the catalog SQL alone with its ``EXPLAIN QUERY PLAN``, and (``--rebuild N``)
``pacsp2p catalog rebuild`` of an embedded archive of N small instances >= 2,000/s.
``--before DIR`` instead compares cold starts with another pacsp2p (a snapshot in DIR).

    nice -n 10 .venv/bin/python bench/catalog10m.py --fill-only   # the build, once
    .venv/bin/python bench/catalog10m.py [--instances N] [--queries N] [--rebuild N]
        [--cold] [--before DIR [--pairs N]] [--rebuild N --rebuild-only]
"""
from __future__ import annotations

import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, percentile, table  # noqa: E402
from find import (GIVEN, KINDS, PEER_NAME, SURNAMES, evict, get_status,  # noqa: E402
                  run_queries, start_twice, time_sql, wait_checked)

from pynetdicom import _config as pynetdicom_config  # noqa: E402

from pacsp2p.catalog import matching, names  # noqa: E402
from pacsp2p.catalog.db import SCHEMA_VERSION, create_schema, write_facts  # noqa: E402
from pacsp2p.testing import Peer  # noqa: E402
from pacsp2p.testing.datasets import SOP_CLASSES, ExplicitVRLittleEndian  # noqa: E402
from pacsp2p.types import Query  # noqa: E402

ARCHIVE = "local"
SERIES_PER_STUDY, INSTANCES_PER_SERIES = 4, 20
ROOT_UID = "1.2.826.0.1.3680043.10.1015"
TARGETS_MS = {"pid": 50, "acc": 50, "uid": 50, "date": 200, "name": 200,
              "series": 20, "image": 20}
STUDY_KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "StudyInstanceUID"]
SERIES_KEYS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"]
LEVEL_KEYS = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": IMAGE_KEYS}


def realistic(n_instances: int, seed: int = 2026) -> Iterator[tuple[dict, dict | None]]:
    """(attributes of one instance, its study's record or None) for *n_instances*
    instances: patients of 1-5 studies, 4 series of 20 instances each per study. The
    study record (once per study, with its first instance) is what queries are drawn
    from. Deterministic; UIDs as a modality makes them (a root, a random part per study,
    counters), so their order is neither sorted nor random."""
    rng = random.Random(seed)
    ts = str(ExplicitVRLittleEndian)
    made, p, study_no = 0, 0, 0
    while made < n_instances:
        pid = f"P{p:07d}"
        patient = {"PatientID": pid,
                   "PatientName": f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}",
                   "PatientBirthDate": f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}"
                                       f"{rng.randint(1, 28):02d}",
                   "PatientSex": rng.choice("MFO")}
        for _ in range(rng.choice((1, 2, 3, 3, 4, 5))):
            if made >= n_instances:
                break
            modality = rng.choice(list(KINDS))
            date = time.strftime("%Y%m%d", time.gmtime(1420070400 + rng.randrange(3650)
                                                       * 86400))
            study_uid = f"{ROOT_UID}.{rng.randrange(10**9)}.{study_no}"
            study = {**patient, "StudyInstanceUID": study_uid, "StudyDate": date,
                     "StudyTime": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                     "AccessionNumber": f"ACC{study_no:08d}", "StudyID": str(study_no),
                     "StudyDescription": KINDS[modality],
                     "ReferringPhysicianName": "HOUSE^GREGORY", "InstitutionName": "BENCH"}
            record: dict | None = dict(study, Modality=modality)
            for s in range(SERIES_PER_STUDY):
                series_uid = f"{study_uid}.{s + 1}"
                series = {**study, "SeriesInstanceUID": series_uid, "Modality": modality,
                          "SeriesNumber": str(s + 1), "SeriesDescription":
                              f"{modality} SERIES {s + 1}", "SeriesDate": date,
                          "BodyPartExamined": "CHEST", "Manufacturer": "BENCH"}
                if record is not None:
                    record["SeriesInstanceUID"] = series_uid
                for i in range(INSTANCES_PER_SERIES):
                    if made >= n_instances:
                        break
                    made += 1
                    yield ({**series, "SOPInstanceUID": f"{series_uid}.{i + 1}",
                            "SOPClassUID": str(SOP_CLASSES[modality]),
                            "TransferSyntaxUID": ts, "InstanceNumber": str(i + 1),
                            "ContentDate": date, "ImageType": "ORIGINAL\\PRIMARY"},
                           record)
                    record = None
            study_no += 1
        p += 1


def fill(path: Path, n_instances: int, keep: int = 2000, batch_size: int = 5000,
         seed: int = 11) -> list[dict]:
    """Write *n_instances* with the product's writer into *path*; return a reservoir
    sample of *keep* study records. Progress every million instances."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA cache_size=-1000000")          # 1 GB of pages: bounded
    rng, sample, studies, batch = random.Random(seed), [], 0, []
    parents: dict = {}
    t0 = time.monotonic()
    try:
        create_schema(conn)
        for n, (attrs, record) in enumerate(realistic(n_instances), 1):
            batch.append((attrs, (attrs["SOPInstanceUID"], ARCHIVE, PEER_NAME, "0" * 64,
                                  0, n)))
            if record is not None:
                studies += 1
                if len(sample) < keep:
                    sample.append(record)
                elif rng.randrange(studies) < keep:
                    sample[rng.randrange(keep)] = record
            if len(batch) >= batch_size:
                write_facts(conn, batch, parents=parents)
                batch = []
            if n % 1_000_000 == 0:
                print(f"   {n:,} instances, {n / (time.monotonic() - t0):,.0f}/s",
                      flush=True)
        if batch:
            write_facts(conn, batch, parents=parents)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return sample


def cached_peer(cache: Path, n_instances: int) -> tuple[Peer, list[dict]]:
    """A peer whose data directory holds the filled catalog (built once, cached)."""
    base = cache / f"catalog10m-{n_instances}"
    # (no background scrub: the filled catalog has no files, so it would report every
    # copy missing, 2 log lines each, and take the CPU the queries are timed on)
    peer = Peer(base / "peer", name=PEER_NAME, startup_timeout=1800, stop_timeout=300,
                config={"cluster": {"scrub_interval": 0}})
    catalog, sample_path = peer.data_dir / "catalog.sqlite", base / "sample.json"
    if not (catalog.exists() and sample_path.exists()):
        catalog.parent.mkdir(parents=True, exist_ok=True)
        tmp = base / "catalog.filling"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        print(f"   filling a catalog of {n_instances:,} instances into {catalog} (schema "
              f"{SCHEMA_VERSION}; once, cached) ...", flush=True)
        cpu0 = time.process_time()
        with Timer() as t:
            sample = fill(tmp, n_instances)
        tmp.rename(catalog)
        sample_path.write_text(json.dumps(sample))
        print(f"   filled in {t.seconds:.0f} s ({time.process_time() - cpu0:.0f} CPU-s, "
              f"{n_instances / t.seconds:,.0f} instances/s), "
              f"{catalog.stat().st_size / 2**30:.2f} GiB", flush=True)
    conn = sqlite3.connect(catalog)
    made = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    print(f"   cached catalog {catalog}: {catalog.stat().st_size / 2**30:.2f} GiB, schema "
          f"{made} (this pacsp2p: {SCHEMA_VERSION})")
    return peer, json.loads(sample_path.read_text())


def queries(sample: list[dict], per_kind: int, seed: int = 7) -> list[tuple[str, dict]]:
    """(kind, keys with their QueryRetrieveLevel), the seven kinds interleaved, with a
    C-ECHO after each round."""
    rng = random.Random(seed)
    out: list[tuple[str, dict]] = []
    for _ in range(per_kind):
        r = rng.choice(sample)
        surname, given = r["PatientName"].split("^")
        lo = time.mktime(time.strptime(r["StudyDate"], "%Y%m%d"))
        week = (time.strftime("%Y%m%d", time.localtime(lo)) + "-" +
                time.strftime("%Y%m%d", time.localtime(lo + 6 * 86400)))
        study = r["StudyInstanceUID"]
        out += [("pid", {"PatientID": r["PatientID"]}),
                ("acc", {"AccessionNumber": rng.choice(sample)["AccessionNumber"]}),
                ("uid", {"StudyInstanceUID": study}),
                ("date", {"StudyDate": week}),
                ("name", {"PatientName": f"{surname}^{given[0]}*"}),
                ("series", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study}),
                ("image", {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                           "SeriesInstanceUID": r["SeriesInstanceUID"]}),
                ("echo", {})]
    return out


def plans(path: Path, qs: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """The ``EXPLAIN QUERY PLAN`` of the first query of each kind."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    names.register(conn)
    out: dict[str, list[str]] = {}
    try:
        for kind, keys in qs:
            if kind != "echo" and kind not in out:
                level = keys.get("QueryRetrieveLevel", "STUDY")
                match = {k: v for k, v in keys.items() if k != "QueryRetrieveLevel"}
                sql, params, _ = matching.build(Query(level, match), LEVEL_KEYS[level])
                out[kind] = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    finally:
        conn.close()
    return out


def rebuild_rate(cache: Path, n: int) -> tuple[int, float, float]:
    """``pacsp2p catalog rebuild`` of an embedded archive holding *n* small instances
    (stored once through a peer by storescu, cached): (instances, seconds, CPU-s)."""
    base = cache / f"catalog10m-rebuild-{n}"
    peer = Peer(base / "peer", name=PEER_NAME, startup_timeout=300)
    if not (base / ".stored").exists():
        from pacsp2p.testing.dcmtk import storescu
        files = common.mr_study(cache, count=n).directory
        peer.start()
        try:
            storescu(peer.port, peer.ae_title, [files], timeout=3600)
        finally:
            peer.stop()
        (base / ".stored").write_text("ok")
    argv = [str(Path(sys.executable).with_name("pacsp2p")), "catalog", "rebuild",
            "--config", str(peer.config_path)]
    for path in (peer.data_dir / "archives").rglob("*.dcm"):   # a cold disk, as after a
        evict(path)                                            # crash (these files only)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Timer() as t:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"rebuild failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    count = int(done.stdout.rsplit("catalog rebuilt:", 1)[1].split()[0])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return count, t.seconds, cpu


def _cpu(pid: int) -> float:
    """CPU-seconds (user + system) of process *pid* so far."""
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def start_pairs(peer, before: Path, n: int) -> None:
    """*n* cold starts (catalog evicted, spawn to C-ECHO, stop) of the pacsp2p in
    *before* (a snapshot put first on PYTHONPATH) and of this one, interleaved."""
    catalog = peer.data_dir / "catalog.sqlite"
    for _ in range(n):
        for code in (before, None):
            env = os.environ.pop("PYTHONPATH", None)
            if code is not None:
                os.environ["PYTHONPATH"] = str(code)
            try:
                evict(catalog)
                load = os.getloadavg()[0]
                with Timer() as t:
                    peer.start()
                peer.stop()
            finally:
                os.environ.pop("PYTHONPATH", None)
                if env is not None:
                    os.environ["PYTHONPATH"] = env
            print(f"   cold start, {code or 'this pacsp2p'}: {t.seconds:.2f} s "
                  f"(load {load:.1f})", flush=True)


def wait_counted(peer, limit: float = 900) -> dict:
    """/status ``under_replicated`` once repair's census is over (so that the stop after
    it saves the count and the restart may reuse it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        counted = get_status(peer).get("under_replicated") or {}
        if counted.get("at") is not None:
            return counted
        time.sleep(0.5)
    return {}


def findscu_ms(port: int, aec: str, qs: list[tuple[str, dict]], kinds: tuple[str, ...],
               per_kind: int = 10) -> dict[str, dict]:
    """The same study-level queries by DCMTK findscu (one process and association each,
    its start included; responses written to a temporary directory): {kind: {"ms": [...], "rows": [...]}}."""
    out: dict[str, dict] = {}
    for kind, keys in qs:
        if kind not in kinds or len(out.get(kind, {}).get("ms", ())) >= per_kind:
            continue
        args = ["-S", "-aet", "BENCHCAT", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY"]
        for kw in LEVEL_KEYS["STUDY"]:
            args += ["-k", f"{kw}={keys.get(kw, '')}"]
        with tempfile.TemporaryDirectory(prefix="findscu-") as rsp:
            t0 = time.perf_counter()
            common.run_dcmtk("findscu", *args, "-X", "-od", rsp, "127.0.0.1", port)
            d = out.setdefault(kind, {"ms": [], "rows": []})
            d["ms"].append((time.perf_counter() - t0) * 1000)
            d["rows"].append(len(os.listdir(rsp)))
    return out


def report(name: str, res: dict[str, dict], targets: bool) -> list[list[str]]:
    rows = []
    for kind in (*TARGETS_MS, "echo"):
        if kind in res:
            d = res[kind]
            p50 = percentile(d["ms"], 50)
            verdict = ""
            if targets and kind in TARGETS_MS:
                verdict = (f"{'met' if p50 < TARGETS_MS[kind] else 'MISSED'} "
                           f"(< {TARGETS_MS[kind]})")
            rows.append([name, kind, str(len(d["ms"])),
                         f"{sum(d['rows']) / len(d['rows']):.1f}", f"{p50:.2f}",
                         f"{percentile(d['ms'], 99):.2f}", verdict])
    return rows


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=10_000_000,
                   help="instances in the catalog (default 10,000,000)")
    p.add_argument("--queries", type=int, default=40, help="C-FINDs of each kind (40)")
    p.add_argument("--rebuild", type=int, default=0, metavar="N",
                   help="also time 'pacsp2p catalog rebuild' of an archive of N instances")
    p.add_argument("--rebuild-only", action="store_true",
                   help="only time the rebuild of --rebuild N (no 10M catalog)")
    p.add_argument("--cold", action="store_true",
                   help="evict the catalog file from the page cache before each start")
    p.add_argument("--fill-only", action="store_true", help="build (or find) the cache, stop")
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="only compare cold starts with the pacsp2p snapshot in DIR "
                        "(put first on PYTHONPATH), --pairs times each, interleaved")
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()
    # pynetdicom's standard handlers format every response data set for its debug log
    # (pretty_dataset: ~20 % of this client's CPU per row), read or not: off here
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    common.header(f"catalog of {args.instances:,} instances on one peer (issue 15.3)")
    if args.rebuild_only:
        n, seconds, cpu = rebuild_rate(args.cache, args.rebuild or 20_000)
        print(f"pacsp2p catalog rebuild, {n:,} instances, cold page cache: "
              f"{n / seconds:,.0f} instances/s ({seconds:.1f} s, {cpu / n * 1000:.3f} "
              f"CPU-ms/instance; target >= 2,000/s)")
        return 0
    peer, sample = cached_peer(args.cache, args.instances)
    if args.fill_only:
        return 0
    if args.before:
        start_pairs(peer, args.before, args.pairs)
        return 0
    catalog = peer.data_dir / "catalog.sqlite"
    qs = queries(sample, args.queries)
    figures: list[tuple[str, str, str, bool]] = []
    try:
        first, restart, (rss_start, checked, census) = start_twice(
            peer, catalog, args.cold, lambda: (common.rss_mb(peer.pid),
                                               wait_checked(peer, 3600), wait_counted(peer)))
        rss_restart = common.rss_mb(peer.pid)
        peer_cpu, client_cpu = _cpu(peer.pid), time.process_time()
        results = run_queries(peer.port, peer.ae_title, qs, 900, LEVEL_KEYS)
        peer_cpu = _cpu(peer.pid) - peer_cpu
        client_cpu = time.process_time() - client_cpu
        rss = common.rss_mb(peer.pid)
        wait_counted(peer)
        status = get_status(peer)
        results_dcmtk = findscu_ms(peer.port, peer.ae_title, qs, ("date", "name"))
    finally:
        peer.stop()
    figures += [("start-up, first start (spawn to C-ECHO)", f"{first:.2f} s", "< 10 s",
                 first < 10),
                ("start-up, restart after a clean stop", f"{restart:.2f} s", "< 10 s",
                 restart < 10)]
    if checked is not None:
        print(f"   integrity check in the background after the first start: over in "
              f"{checked:.1f} s")
    for label, value in (("RSS after start", rss_start), ("RSS after restart", rss_restart),
                         ("RSS after the queries", rss)):
        if value is not None:
            figures.append((label, f"{value:.0f} MB", "< 500 MB", value < 500))
    print(f"   catalog counts (/status): {status['catalog']}")
    print(f"   repair's census: {census.get('took_s')} s after the first start, "
          f"{status.get('under_replicated', {}).get('took_s')} s after the restart")
    rows_back = sum(sum(d["rows"]) for d in results.values())
    print(f"   CPU per returned C-FIND row ({rows_back:,} rows, "
          f"{sum(len(d['ms']) for d in results.values())} exchanges): peer "
          f"{peer_cpu / rows_back * 1000:.3f} ms, pynetdicom client "
          f"{client_cpu / rows_back * 1000:.3f} ms")
    sql = time_sql(catalog, qs, LEVEL_KEYS)
    print()
    rows = (report("pacsp2p C-FIND", results, True) + report("DCMTK findscu", results_dcmtk,
                                                              False) +
            report("catalog SQL", sql, False))
    print(table(rows, ["", "query", "n", "matches/query", "p50 ms", "p99 ms", "target"]))
    print()
    for kind, plan in plans(catalog, qs).items():
        print(f"   EXPLAIN QUERY PLAN {kind}:")
        for line in plan:
            print(f"      {line}")
    if args.rebuild:
        n, seconds, cpu = rebuild_rate(args.cache, args.rebuild)
        figures.append((f"pacsp2p catalog rebuild, {n:,} instances",
                        f"{n / seconds:,.0f} instances/s ({seconds:.1f} s, "
                        f"{cpu / n * 1000:.3f} CPU-ms/instance)", ">= 2,000/s",
                        n / seconds >= 2000))
    print()
    for kind in TARGETS_MS:
        if kind in results:
            p50 = percentile(results[kind]["ms"], 50)
            figures.append((f"C-FIND {kind} p50", f"{p50:.2f} ms",
                            f"< {TARGETS_MS[kind]} ms", p50 < TARGETS_MS[kind]))
    for label, value, target, met in figures:
        print(f"{label:<45} {value:<40} target {target:<12} {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
