#!/usr/bin/env python3
"""C-FIND benchmark: study-level query latency with 10,000 studies in the catalog.

The catalog is filled before the peer starts, with the product's own writer
(``pacsp2p.catalog.db.create_schema`` + ``write_facts``) into DATA/catalog.sqlite: 2,500
patients x 4 studies, one series and one instance per study (no pixel files; C-FIND
never opens them). A pynetdicom client then runs, on ONE association, a bounded number
of study-root STUDY-level C-FINDs of four kinds, interleaved:

  pid    PatientID exact                         (4 studies match)
  name   PatientName "SURNAME^G*" wildcard        (~1-10 studies)
  date   StudyDate one-week range "a-b"           (~20 studies)
  uid    StudyInstanceUID single value           (1 study)

each asking the usual return keys (PatientName, PatientID, StudyDate, StudyTime,
AccessionNumber, StudyDescription, ModalitiesInStudy, NumberOfStudyRelatedInstances,
StudyInstanceUID). Latency = first request byte to the final response. Baseline (by
default): a C-ECHO round-trip on the same association, interleaved with the finds: the
floor of one DIMSE exchange with this client and this server. With --with-orthanc the
same studies are also loaded into a real Orthanc (tiny 8x8 instances by DCMTK storescu,
cached files) and the same queries are timed against it. Target: p50 < 20 ms.

    .venv/bin/python bench/find.py [--quick] [--with-orthanc] [--queries N]
"""
from __future__ import annotations

import random
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, percentile, table  # noqa: E402

from pydicom.dataset import Dataset  # noqa: E402
import socket  # noqa: E402

from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification  # noqa: E402

from pacsp2p.catalog.db import create_schema, meta_attributes, write_facts  # noqa: E402
from pacsp2p.testing import Orthanc, Peer  # noqa: E402
from pacsp2p.testing.datasets import (SOP_CLASSES, ExplicitVRLittleEndian, make_image,  # noqa: E402
                                      uid, write)
from pacsp2p.testing.dcmtk import storescu  # noqa: E402
from pacsp2p.types import InstanceMeta  # noqa: E402

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


def studies(seed: int = 2026) -> list[dict[str, str]]:
    """10,000 deterministic study records (one series, one instance each)."""
    rng = random.Random(seed)
    out = []
    for p in range(N_PATIENTS):
        name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
        pid = f"FP{p:06d}"
        birth = f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        for s in range(STUDIES_PER_PATIENT):
            modality = rng.choice(list(KINDS))
            day = rng.randrange(3650)
            date = time.strftime("%Y%m%d", time.gmtime(1420070400 + day * 86400))  # 2015..
            study_uid = str(uid("find-study", pid, s))
            series_uid = str(uid("find-series", pid, s))
            out.append({
                "PatientID": pid, "PatientName": name, "PatientBirthDate": birth,
                "PatientSex": rng.choice("MFO"), "StudyInstanceUID": study_uid,
                "StudyDate": date, "StudyTime": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                "AccessionNumber": f"A{p:06d}{s}", "StudyID": str(s + 1),
                "StudyDescription": KINDS[modality], "ReferringPhysicianName": "HOUSE^GREGORY",
                "SeriesInstanceUID": series_uid, "Modality": modality, "SeriesNumber": "1",
                "SeriesDescription": f"{modality} SERIES", "SOPInstanceUID":
                    str(uid("find-sop", pid, s)), "SOPClassUID": str(SOP_CLASSES[modality]),
                "InstanceNumber": "1"})
    return out


def fill_catalog(path: Path, records: list[dict[str, str]]) -> None:
    """Write the records with the product's own catalog writer (before the peer starts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    try:
        create_schema(conn)
        for i in range(0, len(records), 1000):
            batch = []
            for n, r in enumerate(records[i:i + 1000], start=i + 1):
                meta = InstanceMeta(r["SOPInstanceUID"], r["SOPClassUID"],
                                    str(ExplicitVRLittleEndian), dict(r))
                batch.append((meta_attributes(meta), (r["SOPInstanceUID"], ARCHIVE,
                                                      PEER_NAME, "0" * 64, 0, n)))
            write_facts(conn, batch)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


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


def queries(records: list[dict[str, str]], per_kind: int, seed: int = 7) -> list[tuple[str, dict]]:
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
                             time.strftime("%Y%m%d", time.localtime(lo + 6 * 86400))}))
        out.append(("uid", {"StudyInstanceUID": r["StudyInstanceUID"]}))
        out.append(("echo", {}))
    return out


def identifier(keys: dict) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in RETURN_KEYS:
        setattr(ds, kw, keys.get(kw, ""))
    return ds


def _nodelay(event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run_queries(port: int, aec: str, qs: list[tuple[str, dict]], deadline: float
                ) -> dict[str, dict]:
    """Time every query on one association; {kind: {"ms": [...], "rows": [...]}}."""
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
                list(assoc.send_c_find(identifier(keys), StudyRootQueryRetrieveInformationModelFind))
        for kind, keys in qs:
            if not alive():
                print("   (time bound reached; stopping early)")
                break
            rows = 0
            t0 = time.perf_counter()
            if kind == "echo":
                status = assoc.send_c_echo()
                if status.Status != 0:
                    raise RuntimeError(f"C-ECHO failed: {status}")
            else:
                for status, ds in assoc.send_c_find(identifier(keys),
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
    for kind in ("pid", "name", "date", "uid", "echo"):
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
                   help="C-FINDs in total (200; 60 with --quick), spread over the 4 kinds")
    args = p.parse_args()
    total = args.queries or (60 if args.quick else 200)
    per_kind = max(1, total // 4)
    common.header("C-FIND: study level, 10,000 studies, pynetdicom client, one association")
    records = studies()
    qs = queries(records, per_kind)
    results: dict[str, dict] = {}
    with common.workdir(args.keep, "pacsp2p-bench-find-") as wd:
        peer = Peer(wd / "peer", name=PEER_NAME)
        with Timer() as t:
            fill_catalog(peer.data_dir / "catalog.sqlite", records)
        print(f"   catalog filled with {len(records)} studies in {t.seconds:.1f} s "
              "(write_facts, not timed)")
        with peer:
            results["pacsp2p"] = run_queries(peer.port, peer.ae_title, qs, 120)
            rss = common.rss_mb(peer.pid)
        print(f"   pacsp2p peer RSS after the queries: {rss:.0f} MB" if rss else "")
        if args.with_orthanc:
            files = tiny_files(args.cache, records)
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
        for kind in ("pid", "name", "date", "uid"):
            a, b = pc[kind]["rows"], oc[kind]["rows"]
            if a != b:
                print(f"   note: {kind}: match counts differ between pacsp2p and Orthanc "
                      f"(pacsp2p {sum(a)}, orthanc {sum(b)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
