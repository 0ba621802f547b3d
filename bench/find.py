#!/usr/bin/env python3
"""C-FIND benchmark: study-level query latency with 10,000 studies in the catalog (or more).

The catalog is filled before the peer starts, with the product's own writer
(``pacsp2p.catalog.db.create_schema`` + ``write_facts``) into DATA/catalog.sqlite: 2,500
patients x 4 studies, one series and one instance per study (no pixel files; C-FIND
never opens them). ``--patients N`` scales it (N x 4 studies; from the 2,501st patient on,
surnames get a suffix, so a name query still matches a handful); a catalog of more than
10,000 patients is cached (``--cache``) by size and schema, with a sample of its records,
and copied in. A pynetdicom client then runs, on ONE association, a bounded number of
study-root STUDY-level C-FINDs of five kinds, interleaved:

  pid    PatientID exact                         (4 studies match)
  name   PatientName "SURNAME^G*" wildcard        (~1-10 studies)
  date   StudyDate one-week range "a-b"           (~20 studies; one day beyond 100k studies)
  uid    StudyInstanceUID single value           (1 study)
  acc    AccessionNumber exact                   (1 study)

each asking the usual return keys (PatientName, PatientID, StudyDate, StudyTime,
AccessionNumber, StudyDescription, ModalitiesInStudy, NumberOfStudyRelatedInstances,
StudyInstanceUID). Latency = first request byte to the final response. Baseline (by
default): a C-ECHO round-trip on the same association, interleaved with the finds: the
floor of one DIMSE exchange with this client and this server. With --with-orthanc the
same studies are also loaded into a real Orthanc (tiny 8x8 instances by DCMTK storescu,
cached files) and the same queries are timed against it. Target: p50 < 20 ms.

Also printed: the catalog SQL alone (the SELECT ``matching.build`` makes, run on the
peer's catalog file after the peer stopped: what indexes change), the peer's start-up
(spawn to C-ECHO, first start and a restart after a clean stop) and ``GET /status``.

    .venv/bin/python bench/find.py [--quick] [--with-orthanc] [--queries N] [--patients N]
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, percentile, table  # noqa: E402

from pydicom.dataset import Dataset  # noqa: E402
import socket  # noqa: E402

from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification  # noqa: E402

from pacsp2p.catalog import db as catalog_db  # noqa: E402
from pacsp2p.catalog import matching, names  # noqa: E402
from pacsp2p.catalog.db import create_schema, meta_attributes, write_facts  # noqa: E402
from pacsp2p.testing import Orthanc, Peer  # noqa: E402
from pacsp2p.testing.datasets import (SOP_CLASSES, ExplicitVRLittleEndian, make_image,  # noqa: E402
                                      uid, write)
from pacsp2p.testing.dcmtk import storescu  # noqa: E402
from pacsp2p.types import InstanceMeta, Query  # noqa: E402

N_PATIENTS, STUDIES_PER_PATIENT = 2500, 4
SURNAMES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES",
            "ROBINSON", "WRIGHT", "THOMPSON", "EVANS", "WALKER", "WHITE", "ROBERTS", "GREEN",
            "HALL", "WOOD", "JACKSON", "CLARKE", "MARTIN", "GARCIA", "MULLER", "SCHMIDT",
            "DUBOIS", "LAURENT", "ROSSI", "RUSSO", "SILVA", "SANTOS", "NGUYEN", "TRAN",
            "KIM", "LEE", "PARK", "CHEN", "WANG", "LI", "ZHANG", "LIU", "SATO", "SUZUKI",
            "TANAKA", "KOWALSKI", "NOVAK", "HORVAT", "JANSEN", "DEVRIES", "OLSEN", "HANSEN"]
GIVEN = ["ANNA", "BEN", "CARL", "DORA", "EVA", "FRANK", "GRETA", "HUGO", "IDA", "JON",
         "KARL", "LENA", "MAX", "NINA", "OTTO", "PIA", "QUINN", "ROSA", "SVEN", "TOM",
         "UTE", "VERA", "WALT", "XENA", "YVES", "ZOE"]
KINDS = {"CT": "CT CHEST", "MR": "MRI BRAIN", "US": "US ABDOMEN", "CR": "CR CHEST 2 VIEWS"}
RETURN_KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
               "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
               "StudyInstanceUID"]
PEER_NAME, ARCHIVE = "test", "local"


def _suffix(p: int) -> str:
    """"" for the first 2,500 patients (the default catalog), then A, B, ..., Z, AA, ..."""
    k, out = p // N_PATIENTS, ""
    while k:
        k, r = divmod(k - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def studies(n_patients: int = N_PATIENTS, seed: int = 2026) -> Iterator[dict[str, str]]:
    """n_patients x 4 deterministic study records (one series, one instance each)."""
    rng = random.Random(seed)
    for p in range(n_patients):
        name = f"{rng.choice(SURNAMES)}{_suffix(p)}^{rng.choice(GIVEN)}"
        pid = f"FP{p:06d}"
        birth = f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        for s in range(STUDIES_PER_PATIENT):
            modality = rng.choice(list(KINDS))
            day = rng.randrange(3650)
            date = time.strftime("%Y%m%d", time.gmtime(1420070400 + day * 86400))  # 2015..
            study_uid = str(uid("find-study", pid, s))
            series_uid = str(uid("find-series", pid, s))
            yield {
                "PatientID": pid, "PatientName": name, "PatientBirthDate": birth,
                "PatientSex": rng.choice("MFO"), "StudyInstanceUID": study_uid,
                "StudyDate": date, "StudyTime": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                "AccessionNumber": f"A{p:06d}{s}", "StudyID": str(s + 1),
                "StudyDescription": KINDS[modality], "ReferringPhysicianName": "HOUSE^GREGORY",
                "SeriesInstanceUID": series_uid, "Modality": modality, "SeriesNumber": "1",
                "SeriesDescription": f"{modality} SERIES", "SOPInstanceUID":
                    str(uid("find-sop", pid, s)), "SOPClassUID": str(SOP_CLASSES[modality]),
                "InstanceNumber": "1"}


def fill_catalog(path: Path, records: Iterable[dict[str, str]], keep: int = 0,
                 seed: int = 11) -> list[dict[str, str]]:
    """Write the records with the product's own catalog writer (before the peer starts);
    return a uniform sample of *keep* of them (reservoir), to draw queries from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    rng, sample, seen, batch = random.Random(seed), [], 0, []
    try:
        create_schema(conn)

        def flush():
            facts = []
            for n, r in batch:
                meta = InstanceMeta(r["SOPInstanceUID"], r["SOPClassUID"],
                                    str(ExplicitVRLittleEndian), dict(r))
                facts.append((meta_attributes(meta), (r["SOPInstanceUID"], ARCHIVE,
                                                      PEER_NAME, "0" * 64, 0, n)))
            write_facts(conn, facts)
            batch.clear()
        for r in records:
            seen += 1
            batch.append((seen, r))
            if len(sample) < keep:
                sample.append(r)
            elif keep and rng.randrange(seen) < keep:
                sample[rng.randrange(keep)] = r
            if len(batch) >= 1000:
                flush()
        if batch:
            flush()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return sample


def cached_catalog(cache: Path, n_patients: int, keep: int) -> tuple[Path, list[dict]]:
    """A filled catalog of *n_patients* (x 4 studies) and its sample, made once per size
    (filling 1M studies takes minutes; copying it, seconds) by whichever pacsp2p runs the
    bench: a newer peer migrates an older catalog at start, as it would at a site (so a
    before/after pair of runs queries the very same catalog)."""
    version = catalog_db.SCHEMA_VERSION
    base = cache / f"find-catalog-{n_patients}"
    path, sample_path = base.with_suffix(".sqlite"), base.with_suffix(".sample.json")
    if not (path.exists() and sample_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = base.with_suffix(".filling")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        print(f"   filling a catalog of {n_patients * STUDIES_PER_PATIENT} studies into "
              f"{path} (schema {version}; once, cached) ...", flush=True)
        with Timer() as t:
            sample = fill_catalog(tmp, studies(n_patients), keep)
        tmp.rename(path)
        sample_path.write_text(json.dumps(sample))
        print(f"   filled in {t.seconds:.0f} s, {path.stat().st_size / 2**30:.2f} GiB")
    conn = sqlite3.connect(path)
    made = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    print(f"   cached catalog {path}: schema {made} (this pacsp2p: {version})")
    return path, json.loads(sample_path.read_text())
def tiny_files(cache: Path, records: list[dict[str, str]]) -> Path:
    """The same studies as tiny 8x8 Part-10 files, for Orthanc (cached)."""
    directory = cache / f"find{len(records)}"
    marker = directory / ".complete"
    if not marker.exists():
        t0 = time.monotonic()
        print(f"generating {len(records)} tiny instances into {directory} ...", flush=True)
        for n, r in enumerate(records):
            attrs = {k: v for k, v in r.items() if k not in ("SOPClassUID",)}
            attrs["SeriesNumber"] = int(attrs["SeriesNumber"])
            attrs["InstanceNumber"] = int(attrs["InstanceNumber"])
            ds = make_image(r["Modality"], size=8, seed=n, **attrs)
            write(ds, directory / "files" / f"{n // 1000:02d}" / f"{n:05d}.dcm")
        marker.write_text("ok")
        print(f"  generated in {time.monotonic() - t0:.1f} s (cached)")
    return directory / "files"


def queries(records: list[dict[str, str]], per_kind: int, seed: int = 7,
            date_days: int = 6) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(per_kind):
        r = rng.choice(records)
        out.append(("pid", {"PatientID": r["PatientID"]}))
        surname, given = r["PatientName"].split("^")
        out.append(("name", {"PatientName": f"{surname}^{given[0]}*"}))
        day = time.strptime(r["StudyDate"], "%Y%m%d")
        lo = time.mktime(day)
        out.append(("date", {"StudyDate": time.strftime("%Y%m%d", time.localtime(lo)) + "-" +
                             time.strftime("%Y%m%d", time.localtime(lo + date_days * 86400))}))
        out.append(("uid", {"StudyInstanceUID": r["StudyInstanceUID"]}))
        out.append(("acc", {"AccessionNumber": rng.choice(records)["AccessionNumber"]}))
        out.append(("echo", {}))
    return out


def _level(keys: dict) -> tuple[str, dict]:
    """(QueryRetrieveLevel of a query's *keys*, STUDY if none; the other keys)."""
    return keys.get("QueryRetrieveLevel", "STUDY"), {
        k: v for k, v in keys.items() if k != "QueryRetrieveLevel"}


def time_sql(path: Path, qs: list[tuple[str, dict]], returns: dict | None = None
             ) -> dict[str, dict]:
    """The catalog's SQL alone for each query (what ``Catalog.find`` runs), warm cache;
    *returns*: {level: return keys} (default: RETURN_KEYS at STUDY level)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    names.register(conn)                       # pn_key(), as every catalog connection
    out: dict[str, dict] = {}
    try:
        for warm in (True, False):
            for kind, keys in qs:
                if kind == "echo":
                    continue
                level, match = _level(keys)
                sql, params, _ = matching.build(Query(level, match),
                                                (returns or {}).get(level, RETURN_KEYS))
                t0 = time.perf_counter()
                rows = conn.execute(sql, params).fetchall()
                if not warm:
                    d = out.setdefault(kind, {"ms": [], "rows": []})
                    d["ms"].append((time.perf_counter() - t0) * 1000)
                    d["rows"].append(len(rows))
    finally:
        conn.close()
    return out


def get_status(peer) -> dict:
    with urllib.request.urlopen(f"{peer.admin_url}/status", timeout=120) as r:
        return json.load(r)


def wait_checked(peer, limit: float = 900) -> float | None:
    """Seconds until the background integrity check is over (None: this pacsp2p checks
    at start, before the port opens, or the catalog needs no check)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        state = get_status(peer)["catalog"].get("integrity")
        if state not in ("unchecked", "checking"):
            return time.monotonic() - t0 if state is not None else None
        time.sleep(0.2)
    return None


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (this file only: a cold start without
    dropping every cache of a shared machine)."""
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def start_twice(peer, catalog: Path, cold: bool, between) -> tuple[float, float, object]:
    """Start *peer* (spawn to C-ECHO), call *between()* (e.g. wait for its background
    check, so that the stop is a clean one), stop it, start it again: (first start s,
    restart s, what *between* returned). *cold*: the catalog file is evicted from the
    page cache before each start. The caller stops the peer."""
    if cold:
        evict(catalog)
    with Timer() as t:
        peer.start()
    first = t.seconds
    result = between()
    peer.stop()
    if cold:
        evict(catalog)
    with Timer() as t:
        peer.restart()
    return first, t.seconds, result


def time_status(peer, n: int = 5) -> float:
    """Median ms of GET /status (it counted every table on each call before issue 19.3)."""
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{peer.admin_url}/status", timeout=120) as r:
            r.read()
        ms.append((time.perf_counter() - t0) * 1000)
    return percentile(ms, 50)


def identifier(keys: dict, returns: dict | None = None) -> Dataset:
    """A query's identifier at its level (``keys["QueryRetrieveLevel"]``, STUDY if none):
    that level's return keys (*returns*, else RETURN_KEYS) with the query's values."""
    level, match = _level(keys)
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for kw in (returns or {}).get(level, RETURN_KEYS):
        setattr(ds, kw, match.get(kw, ""))
    return ds


def _nodelay(event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_queries(port: int, aec: str, qs: list[tuple[str, dict]], deadline: float,
                returns: dict | None = None) -> dict[str, dict]:
    """Time every query on one association; {kind: {"ms": [...], "rows": [...]}};
    *returns* as for ``identifier``."""
    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    # a C-FIND request is two small PDUs (command, identifier): without TCP_NODELAY the
    # second waits for the server's delayed ACK (~40 ms) -- a client artefact, not the server
    assoc = ae.associate("127.0.0.1", port, ae_title=aec,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"association with {aec}@{port} not established")
    out: dict[str, dict] = {}
    alive = common.bounded(deadline)
    try:
        # warm-up (first query pays imports, SQLite page cache, ...): not counted
        for kind, keys in qs[:5]:
            if kind != "echo":
                list(assoc.send_c_find(identifier(keys, returns), StudyRootQueryRetrieveInformationModelFind))
        for kind, keys in qs:
            if not alive():
                print("   (time bound reached; stopping early)")
                break
            rows = 0
            t0 = time.perf_counter()
            if kind == "echo":
                status = assoc.send_c_echo()
                if "Status" not in status:
                    raise RuntimeError("C-ECHO: no response (association aborted or timed "
                                       "out after the previous C-FIND?)")
                if status.Status != 0:
                    raise RuntimeError(f"C-ECHO failed: {status}")
            else:
                for status, ds in assoc.send_c_find(identifier(keys, returns),
                                                    StudyRootQueryRetrieveInformationModelFind):
                    if status is None or status.Status not in (0x0000, 0xFF00, 0xFF01):
                        raise RuntimeError(f"C-FIND {keys} failed: {status}")
                    if status.Status in (0xFF00, 0xFF01):
                        rows += 1
            ms = (time.perf_counter() - t0) * 1000
            d = out.setdefault(kind, {"ms": [], "rows": []})
            d["ms"].append(ms)
            d["rows"].append(rows)
    finally:
        assoc.release()
    return out


def report(name: str, res: dict[str, dict]) -> list[list[str]]:
    rows = []
    all_find = [m for k, d in res.items() if k != "echo" for m in d["ms"]]
    for kind in ("pid", "name", "date", "uid", "acc", "echo"):
        if kind in res:
            d = res[kind]
            rows.append([name, kind, str(len(d["ms"])), f"{sum(d['rows']) / len(d['rows']):.1f}",
                         f"{percentile(d['ms'], 50):.2f}", f"{percentile(d['ms'], 99):.2f}"])
    rows.append([name, "all finds", str(len(all_find)), "",
                 f"{percentile(all_find, 50):.2f}", f"{percentile(all_find, 99):.2f}"])
    return rows


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--with-orthanc", action="store_true",
                   help="also load the studies into Orthanc and time the same queries there")
    p.add_argument("--queries", type=int, default=None,
                   help="C-FINDs in total (200; 60 with --quick), spread over the 5 kinds")
    p.add_argument("--patients", type=int, default=N_PATIENTS,
                   help=f"patients in the catalog, 4 studies each (default {N_PATIENTS})")
    p.add_argument("--cold", action="store_true",
                   help="evict the catalog file from the page cache before each start")
    args = p.parse_args()
    total = args.queries or (60 if args.quick else 200)
    per_kind = max(1, total // 5)
    n_studies = args.patients * STUDIES_PER_PATIENT
    date_days = 6 if n_studies <= 100_000 else 0
    common.header(f"C-FIND: study level, {n_studies:,} studies, pynetdicom client, "
                  "one association")
    results: dict[str, dict] = {}
    with common.workdir(args.keep, "pacsp2p-bench-find-") as wd:
        peer = Peer(wd / "peer", name=PEER_NAME, startup_timeout=1800)
        catalog = peer.data_dir / "catalog.sqlite"
        with Timer() as t:
            if args.patients <= 10_000:
                records = list(studies(args.patients))
                sample = records
                fill_catalog(catalog, records)
            else:
                records = None
                cached, sample = cached_catalog(args.cache, args.patients, 2000)
                catalog.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cached, catalog)
        print(f"   catalog of {n_studies:,} studies ready in {t.seconds:.1f} s "
              f"({catalog.stat().st_size / 2**20:.0f} MiB; write_facts, not timed)")
        qs = queries(sample, per_kind, date_days=date_days)
        try:
            first_start, restart, (status_ms, checked) = start_twice(
                peer, catalog, args.cold, lambda: (time_status(peer), wait_checked(peer)))
            results["pacsp2p"] = run_queries(peer.port, peer.ae_title, qs, 300)
            rss = common.rss_mb(peer.pid)
        finally:
            peer.stop()
        print(f"   peer start-up (spawn to C-ECHO{', catalog not cached' if args.cold else ''}"
              f"): first start {first_start:.2f} s, "
              f"restart after a clean stop {restart:.2f} s; GET /status p50 "
              f"{status_ms:.1f} ms")
        if checked is not None:
            print(f"   integrity check in the background, after the port opened: "
                  f"over {checked:.1f} s after the first start")
        print(f"   pacsp2p peer RSS after the queries: {rss:.0f} MB" if rss else "")
        sql = time_sql(catalog, qs)
        if args.with_orthanc:
            files = tiny_files(args.cache, records if records is not None
                               else list(studies(args.patients)))
            with Orthanc(wd / "orthanc") as o:
                with Timer() as t:
                    storescu(o.dicom_port, o.aet, [files], timeout=900)
                held = o.statistics()["CountStudies"]
                print(f"   Orthanc loaded with {held} studies in {t.seconds:.1f} s (not timed)")
                results["orthanc"] = run_queries(o.dicom_port, o.aet, qs, 180)
    print()
    rows = []
    for name, res in results.items():
        rows += report(name, res)
    rows += report("catalog SQL", sql)
    print(table(rows, ["server", "query", "n", "matches/query", "p50 ms", "p99 ms"]))
    print()
    pc = results["pacsp2p"]
    finds = [m for k, d in pc.items() if k != "echo" for m in d["ms"]]
    p50 = percentile(finds, 50)
    echo50 = percentile(pc["echo"]["ms"], 50)
    print(f"pacsp2p C-FIND p50 = {p50:.2f} ms, p99 = {percentile(finds, 99):.2f} ms  "
          f"({'meets' if p50 < 20 else 'MISSES'} target p50 < 20 ms)")
    print(f"ratio pacsp2p C-FIND p50 / C-ECHO p50 (same association) = {p50 / echo50:.1f}")
    if "orthanc" in results:
        oc = results["orthanc"]
        ofinds = [m for k, d in oc.items() if k != "echo" for m in d["ms"]]
        print(f"ratio pacsp2p/orthanc C-FIND p50 = {p50 / percentile(ofinds, 50):.2f}  "
              f"p99 = {percentile(finds, 99) / percentile(ofinds, 99):.2f}  (lower is faster)")
        for kind in ("pid", "name", "date", "uid", "acc"):
            a, b = pc[kind]["rows"], oc[kind]["rows"]
            if a != b:
                print(f"   note: {kind}: match counts differ between pacsp2p and Orthanc "
                      f"(pacsp2p {sum(a)}, orthanc {sum(b)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
