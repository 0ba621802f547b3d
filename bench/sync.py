#!/usr/bin/env python3
"""Catalog sync benchmark: a NEW empty peer pulls 1,000,000 facts by anti-entropy.

A source peer ``peera`` starts with a catalog of N instance facts (default 1,000,000:
10,000 studies x 5 series x 20 instances over 2,500 patients, realistic attribute
strings) written beforehand with the product's own writer (``create_schema`` +
``write_facts``) into DATA/catalog.sqlite; generating it is not timed (cached in
``--cache`` between runs). Then a new, empty peer ``peerb`` seeded with peera starts
(real ``twistd pacsp2p`` processes, overlay on 127.0.0.1 with mutual TLS). Timed: from
the moment B's process is spawned until B's ``/status`` shows overlay.vector.peera == N
(every fact of peera applied). B's RSS is sampled every 0.2 s (psutil): peak RSS and
growth over B's idle baseline (the same peer config started with no seeds, settled, and
stopped before the run). At the end the catalog digests (``GET /digest``) of A and B
must be equal, and B's instance count must be N.

Baseline, same run, same facts: a raw local copy in this process, no network and no
peer: ``read_changes`` from A's catalog in batches of 5,000 -> ``facts_from_wire`` ->
``write_facts`` into a fresh catalog. The sync rate is printed as a ratio of it.

Targets: >= 50,000 facts/s and RSS growth < 300 MB.

    .venv/bin/python bench/sync.py [--quick | --facts N] [--profile DIR] [--keep]
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, bounded, ratio, table  # noqa: E402

from pacsp2p.catalog.db import (_connect, create_schema, facts_from_wire,  # noqa: E402
                                read_changes, write_facts)
from pacsp2p.overlay import tls  # noqa: E402
from pacsp2p.overlay.sync import BATCH  # noqa: E402
from pacsp2p.testing import LOOPBACK, Peer, free_ports  # noqa: E402

SOURCE, TARGET, ARCHIVE = "peera", "peerb", "local"
SERIES_PER_STUDY, INSTANCES_PER_SERIES, STUDIES_PER_PATIENT = 5, 20, 4
ROOT_UID = "1.2.826.0.1.3680043.8.498"
SURNAMES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES",
            "MULLER", "SCHMIDT", "DUBOIS", "LAURENT", "ROSSI", "SILVA", "NGUYEN", "KIM",
            "CHEN", "WANG", "SATO", "TANAKA", "KOWALSKI", "NOVAK", "JANSEN", "HANSEN"]
GIVEN = ["ANNA", "BEN", "CARL", "DORA", "EVA", "FRANK", "GRETA", "HUGO", "IDA", "JON",
         "LENA", "MAX", "NINA", "OTTO", "PIA", "ROSA", "SVEN", "TOM", "VERA", "ZOE"]
KINDS = [("CT", "1.2.840.10008.5.1.4.1.1.2", "CT CHEST ABDOMEN PELVIS W CONTRAST", "CHEST"),
         ("MR", "1.2.840.10008.5.1.4.1.1.4", "MRI BRAIN WITHOUT CONTRAST", "HEAD"),
         ("CR", "1.2.840.10008.5.1.4.1.1.1", "CR CHEST 2 VIEWS", "CHEST"),
         ("US", "1.2.840.10008.5.1.4.1.1.6.1", "US ABDOMEN COMPLETE", "ABDOMEN")]
MANUFACTURERS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems", "TOSHIBA"]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# -- the source catalog (generated once, cached) --------------------------------------

def facts(n: int):
    """*n* deterministic facts (attrs, location) in batches of 5,000, numbered 1..n."""
    per_study = SERIES_PER_STUDY * INSTANCES_PER_SERIES
    batch, seq = [], 0
    for study in range((n + per_study - 1) // per_study):
        p = study // STUDIES_PER_PATIENT
        modality, sop_class, description, body = KINDS[study % len(KINDS)]
        day = (study * 7919) % 3650
        date = time.strftime("%Y%m%d", time.gmtime(1420070400 + day * 86400))
        study_uid = f"{ROOT_UID}.1.{20150101 + p}.{study}.{study * 7 % 1000}"
        patient = {
            "PatientID": f"PID{p:08d}",
            "PatientName": f"{SURNAMES[p % len(SURNAMES)]}^{GIVEN[(p // 7) % len(GIVEN)]}",
            "PatientBirthDate": f"{1930 + p % 90}{1 + p % 12:02d}{1 + p % 28:02d}",
            "PatientSex": "MF"[p % 2], "IssuerOfPatientID": "HOSPITAL-A",
            "StudyInstanceUID": study_uid, "StudyDate": date,
            "StudyTime": f"{7 + study % 12:02d}{study % 60:02d}{(study * 13) % 60:02d}.{study % 1000:03d}",
            "AccessionNumber": f"ACC{study:010d}", "StudyID": str(1 + study % 9999),
            "StudyDescription": description, "ReferringPhysicianName": "HOUSE^GREGORY^^DR",
            "PatientAge": f"{(study % 90) + 1:03d}Y", "InstitutionName": "GENERAL HOSPITAL A",
        }
        for se in range(SERIES_PER_STUDY):
            series_uid = f"{study_uid}.{se + 1}.{(study * 31 + se) % 100000}"
            series = dict(patient, SeriesInstanceUID=series_uid, Modality=modality,
                          SeriesNumber=str(se + 1), SeriesDescription=f"{description} S{se + 1}",
                          SeriesDate=date, SeriesTime=patient["StudyTime"],
                          BodyPartExamined=body, ProtocolName=f"{modality} PROTOCOL {se + 1}",
                          StationName=f"{modality}STATION{study % 5}",
                          Manufacturer=MANUFACTURERS[study % len(MANUFACTURERS)])
            for i in range(INSTANCES_PER_SERIES):
                if seq == n:
                    break
                seq += 1
                sop_uid = f"{series_uid}.{i + 1}.{seq}"
                attrs = dict(series, SOPInstanceUID=sop_uid, SOPClassUID=sop_class,
                             InstanceNumber=str(i + 1), ContentDate=date,
                             ContentTime=patient["StudyTime"], AcquisitionNumber="1",
                             NumberOfFrames="1", ImageType="ORIGINAL\\PRIMARY\\AXIAL",
                             TransferSyntaxUID=EXPLICIT_LE)
                sha = hashlib.sha256(sop_uid.encode()).hexdigest()
                batch.append((attrs, (sop_uid, ARCHIVE, SOURCE, sha, 524288 + seq % 4096, seq)))
                if len(batch) == 5000:
                    yield batch
                    batch = []
    if batch:
        yield batch


def schema_tag() -> str:
    """A short hash of the current catalog schema (a cached catalog must match it)."""
    conn = sqlite3.connect(":memory:")
    create_schema(conn)
    sql = "\n".join(r[0] for r in conn.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"))
    conn.close()
    return hashlib.sha256(sql.encode()).hexdigest()[:8]


def source_catalog(cache: Path, n: int) -> Path:
    """The cached source catalog of *n* facts (generated once with write_facts)."""
    directory = cache / f"sync{n}-{schema_tag()}"
    path, marker = directory / "catalog.sqlite", directory / ".complete"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        print(f"generating a catalog of {n:,} facts into {path} ...", flush=True)
        t0 = time.monotonic()
        conn = _connect(path)
        try:
            create_schema(conn)
            for batch in facts(n):
                write_facts(conn, batch)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        marker.write_text(str(n))
        print(f"  generated in {time.monotonic() - t0:.1f} s (cached for next runs)", flush=True)
    return path


# -- measuring --------------------------------------------------------------------------

def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class RssSampler(threading.Thread):
    """Sample the RSS (and CPU) of ``peer.pid`` every *every* s, from its spawn on."""

    def __init__(self, peer: Peer, every: float = 0.2, limit: float = 1800.0):
        super().__init__(daemon=True)
        self.peer, self.every, self.limit = peer, every, limit
        self.samples: list[tuple[float, float]] = []   # (monotonic time, rss MB)
        self.cpu_seconds = 0.0
        self._halt = threading.Event()

    def run(self):
        import psutil
        more = bounded(self.limit)
        proc = None
        while more() and not self._halt.is_set():
            if proc is None and self.peer.pid is not None:
                try:
                    proc = psutil.Process(self.peer.pid)
                except psutil.Error:
                    return
            if proc is not None:
                try:
                    with proc.oneshot():
                        rss = proc.memory_info().rss / 1e6
                        t = proc.cpu_times()
                    self.cpu_seconds = t.user + t.system
                    self.samples.append((time.monotonic(), rss))
                except psutil.Error:
                    return
            self._halt.wait(self.every if proc is not None else 0.01)

    def stop(self):
        self._halt.set()
        self.join(5)

    @property
    def peak(self) -> float:
        return max((r for _, r in self.samples), default=float("nan"))


class LogWatch:
    """Follow a peer's log for its "synced ... ORIGIN a -> N" lines."""

    def __init__(self, path: Path):
        self.path, self.offset, self.best = path, 0, 0

    def synced(self, origin: str) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.best
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            # "synced N facts from P: O a -> b, ..." (older: "synced facts of O from P:
            # sequence a -> b", a line an origin)
            m = re.search(rf"(?:synced facts of {re.escape(origin)} from \S+: sequence|"
                          rf"synced \d+ facts from \S+: (?:.*, )?{re.escape(origin)}) "
                          rf"\d+ -> (\d+)", line)
            if m:
                self.best = max(self.best, int(m.group(1)))
        return self.best


def overlay_config(tls_dir: Path, name: str, seeds: list[str]) -> tuple[dict, int]:
    port, bulk = free_ports(2)
    return {"overlay": {"port": port, "bulk_port": bulk, "bind": LOOPBACK,
                        "advertise": LOOPBACK, "seeds": seeds, "tls_dir": str(tls_dir),
                        "heartbeat": 0.5}}, port


def idle_baseline(work: Path, tls_dir: Path, settle: float = 3.0) -> float:
    """RSS (MB) of an empty peerb with the same config but no seeds, once settled."""
    cfg, _ = overlay_config(tls_dir, TARGET, [])
    peer = Peer(work / "b-idle", name=TARGET, ae_title="PEERB", config=cfg)
    sampler = RssSampler(peer)
    sampler.start()
    with peer:
        time.sleep(settle)
        get_json(peer.admin_url + "/status")
        time.sleep(0.5)
    sampler.stop()
    tail = [r for _, r in sampler.samples[-5:]]
    return sorted(tail)[len(tail) // 2]


def local_copy(source_db: Path, target_db: Path, n: int) -> float:
    """Seconds for read_changes (batches) -> facts_from_wire -> write_facts, in process."""
    src = _connect(source_db)
    dst = _connect(target_db)
    try:
        create_schema(dst)
        after, copied = 0, 0
        with Timer() as t:
            while True:
                rows = read_changes(src, SOURCE, after, BATCH)
                if not rows:
                    break
                write_facts(dst, facts_from_wire(rows))
                after = rows[-1][0]
                copied += len(rows) - 1          # rows[0]: the batch's parent rows
        if copied != n:
            raise RuntimeError(f"local copy moved {copied} facts, expected {n}")
        return t.seconds
    finally:
        src.close()
        dst.close()


# -- the run ------------------------------------------------------------------------------

def main() -> int:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--facts", type=int, default=1_000_000, help="facts in the source catalog")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record peer B during the sync into this directory")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many s")
    args = p.parse_args()
    n = 100_000 if args.quick and args.facts == 1_000_000 else args.facts
    common.header(f"catalog sync: new peer pulls {n:,} facts from one peer")
    source_db = source_catalog(args.cache, n)

    with common.workdir(args.keep, prefix="pacsp2p-bench-sync-") as work:
        tls_dir = work / "tls"
        tls.init_ca(tls_dir)
        for name in (SOURCE, TARGET):
            tls.issue(tls_dir, name)
        baseline_rss = idle_baseline(work, tls_dir)
        print(f"peer B idle RSS (no seeds, settled): {baseline_rss:.0f} MB", flush=True)

        a_cfg, a_port = overlay_config(tls_dir, SOURCE, [])
        a = Peer(work / "a", name=SOURCE, ae_title="PEERA", config=a_cfg,
                 startup_timeout=300)
        (a.data_dir).mkdir(parents=True)
        shutil.copy(source_db, a.data_dir / "catalog.sqlite")
        b_cfg, _ = overlay_config(tls_dir, TARGET, [f"{LOOPBACK}:{a_port}"])
        b = Peer(work / "b", name=TARGET, ae_title="PEERB", config=b_cfg)
        timeline: list[tuple[float, int]] = []
        with a:
            print(f"peer A up (pid {a.pid}), {n:,} facts in its catalog", flush=True)
            sampler = RssSampler(b)
            sampler.start()
            a_proc = psutil.Process(a.pid)
            a_cpu0 = sum(a_proc.cpu_times()[:2])
            t0 = time.monotonic()
            spy = None
            try:
                b.start()
                t_ready = time.monotonic()
                if args.profile:
                    spy = start_spy(b.pid, args.profile)
                more = bounded(args.timeout)
                held, log, next_poll = 0, LogWatch(b.log_path), 0.0
                while more():
                    # done when B logs "synced facts of peera ... -> N" (cheap, exact
                    # time); /status (which counts every table) only once a second
                    logged = log.synced(SOURCE)
                    now = time.monotonic()
                    if logged >= n or now >= next_poll:
                        status = get_json(b.admin_url + "/status")
                        held = status.get("overlay", {}).get("vector", {}).get(SOURCE, 0)
                        timeline.append((now - t0, held))
                        next_poll = now + 1.0
                        if held >= n:
                            break
                    time.sleep(0.05)
                t_done = timeline[-1][0] + t0 if held >= n else time.monotonic()
                a_cpu = sum(a_proc.cpu_times()[:2]) - a_cpu0
                if spy:
                    stop_spy(spy, args.profile)
                sampler.stop()
                if held < n:
                    print(f"FAILED: B holds {held:,} of {n:,} facts after {args.timeout:.0f} s")
                    print(b.log_tail(30))
                    return 1
                counts = status["catalog"]
                pulled = status["overlay"].get("facts_pulled")
                time.sleep(0.5)
                da = get_json(a.admin_url + "/digest", timeout=600)
                db_ = get_json(b.admin_url + "/digest", timeout=600)
                final = get_json(b.admin_url + "/status")["catalog"]
            finally:
                sampler.stop()
                b.stop()
        print("peers stopped; raw local copy baseline ...", flush=True)
        local_s = local_copy(a.data_dir / "catalog.sqlite", work / "copy.sqlite", n)

    sync_s = t_done - t0
    first = next((t for t, h in timeline if h > 0), None)
    rate, local_rate = n / sync_s, n / local_s
    growth = sampler.peak - baseline_rss
    print()
    print(table([
        ["sync: B spawn -> all facts applied", f"{sync_s:.1f}", f"{rate:,.0f}"],
        ["  of which B start-up (spawn -> C-ECHO)", f"{t_ready - t0:.1f}", ""],
        ["  first fact -> last (steady pull)", f"{sync_s - first:.1f}" if first else "?",
         f"{(n - min(h for _, h in timeline if h > 0)) / (sync_s - first):,.0f}"
         if first else ""],
        ["baseline: raw local copy, in process", f"{local_s:.1f}", f"{local_rate:,.0f}"],
    ], ["", "s", "facts/s"]))
    print()
    print(f"sync rate / local copy rate: {ratio(rate, local_rate)}")
    print(f"B RSS: idle {baseline_rss:.0f} MB, peak {sampler.peak:.0f} MB, "
          f"growth {growth:.0f} MB; B CPU {sampler.cpu_seconds:.1f} s "
          f"({100 * sampler.cpu_seconds / sync_s:.0f}% of one core); A CPU {a_cpu:.1f} s "
          f"({100 * a_cpu / sync_s:.0f}%); load average {os.getloadavg()[0]:.2f}")
    print(f"B catalog: {counts}  facts_pulled={pulled}")
    same = da["digest"] == db_["digest"] and final["instances"] == n
    print(f"digest A {da['digest'][:16]}…  B {db_['digest'][:16]}…  "
          f"{'EQUAL' if same else 'DIFFERENT'}")
    ok_rate, ok_rss = rate >= 50_000, growth < 300
    print(f"target >= 50,000 facts/s: {'met' if ok_rate else 'MISSED'} ({rate:,.0f}); "
          f"target RSS growth < 300 MB: {'met' if ok_rss else 'MISSED'} ({growth:.0f} MB)")
    return 0 if same else 1


def start_spy(pid: int, out: Path):
    import subprocess
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--threads",
                             "--rate", "100", "--duration", "600", "--output",
                             str(out / "sync-b.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_spy(proc, out: Path):
    import subprocess
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    target = out / "sync-b.txt"
    print(f"   profile of B: {target}")
    if target.exists():
        for line in common.summarize_profile(target, top=20):
            print("     " + line)


if __name__ == "__main__":
    sys.exit(main())
