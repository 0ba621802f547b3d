#!/usr/bin/env python3
"""Replicated ingest benchmark: DCMTK storescu (one association, TCP_NODELAY=1) of the
300 x 512x512x16-bit CT study (~157 MB) and of 1000 small MR (64x64) into

  cluster    a 3-peer pacsp2p cluster (overlay, defaults R=2, W=2), sent to peer A:
             every instance is acknowledged once 2 copies on 2 distinct peers are durable
  single     one pacsp2p peer on its own (R=1, W=1)
  storescp   DCMTK storescp +xa (no fsync; not --quick)
  cluster-nosync  the cluster with [storage] fsync = false (what fsync costs; not --quick)

with the same storescu invocation. Every repetition gets fresh targets (a fresh cluster).
Prints, per data set, median MB/s and inst/s, and the CPU-seconds per instance: user+sys
of the peers' processes (/proc, summed over the 3 peers of a cluster) from before
storescu starts until every remote copy is recorded (peer A's catalog counts 2 copies
per instance and no hint owed; its where then lists 2 replicas of each), minus what the
same peers spend idle over as long (measured just before); and of it, what each peer's
reactor thread used (the rest: its thread pools); with ``--threads``, what each kind of
thread of each peer used (named by ``py-spy dump``; not less its idle rate): per-thread
CPU from /proc, which a sampling profile on a loaded 2-core host does not give (py-spy
counts a thread runnable but not running, and cProfile inflates Deferred-heavy code).
Targets (issue 15, item 4): cluster CPU per instance <= 2.5 x single; (issue 5): cluster
wall clock >= 0.6 x single.

    .venv/bin/python bench/ingest_cluster.py [--quick] [--reps N] [--data ct,mr]
                                             [--profile DIR] [--code a=DIR,b=DIR]
                                             [--threads] [--set-for LABEL:KEY=V]
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (Timer, code_tree, code_versions, cpu_seconds, mb, median,  # noqa: E402
                    table)

from pacsp2p.testing import Peer, StoreSCP, toml  # noqa: E402
from pacsp2p.testing.cluster import Cluster, get_json, wait_until  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402

IDLE = 2.0         # seconds of idle CPU measured before each run (subtracted)
THREADS = False    # --threads: CPU per kind of thread of each peer
EXTRA: dict = {}   # --set-for LABEL:...: the cluster config of the --code label running


def thread_seconds(pid: int, tid: int) -> float:
    """user + system CPU seconds used so far by thread *tid* of *pid*."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reactor_seconds(pid: int) -> float:
    """CPU seconds of the main thread of *pid* (a peer's reactor: its id is the pid's)."""
    return thread_seconds(pid, pid)


def task_seconds(pid: int) -> dict[int, float]:
    """{thread id: user + system CPU seconds so far} of the live threads of *pid*."""
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            out[tid] = thread_seconds(pid, tid)
        except OSError:                     # ended meanwhile
            pass
    return out


def thread_names(pid: int) -> dict[int, str]:
    """{thread id: its Python name less a trailing number} (``py-spy dump``; {} if absent):
    the pools' threads are PoolThread-<pool>-<n>."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        text = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m[1], 0): re.sub(r"^PoolThread-|-\d+$", "", m[2])
            for m in re.finditer(r'Thread (0x[0-9A-Fa-f]+|\d+) \(\w+\): "([^"]*)"', text)}


def by_kind(pid: int, before: dict, after: dict, names: dict) -> str:
    """CPU seconds each kind of thread of *pid* used between two ``task_seconds``."""
    kinds = Counter()
    for tid, spent in after.items():
        kinds["reactor" if tid == pid else names.get(tid, "?")] += spent - before.get(tid, 0)
    return " ".join(f"{k} {v:.2f}" for k, v in kinds.most_common() if v >= 0.005)


class Meter:
    """CPU of each of *pids* over a run, less its idle rate (measured for IDLE s first);
    ``reactor``: of that, what each one's reactor thread used (not less its idle rate)."""

    def __init__(self, pids):
        self.pids = list(pids)
        t0, c0 = time.monotonic(), [cpu_seconds([p]) for p in self.pids]
        time.sleep(IDLE)
        spent = time.monotonic() - t0
        self.idle = [(cpu_seconds([p]) - c) / spent for p, c in zip(self.pids, c0)]
        self.t0, self.c0 = time.monotonic(), [cpu_seconds([p]) for p in self.pids]
        self.r0 = [reactor_seconds(p) for p in self.pids]
        self.tasks0 = [task_seconds(p) for p in self.pids] if THREADS else None
        self.threads = []

    def each(self) -> list[float]:
        spent = time.monotonic() - self.t0
        return [max(0.0, cpu_seconds([p]) - c - idle * spent)
                for p, c, idle in zip(self.pids, self.c0, self.idle)]

    def used(self) -> float:
        self.last = self.each()
        self.reactor = [reactor_seconds(p) - r for p, r in zip(self.pids, self.r0)]
        if THREADS:                        # (thread ids of threads ended meanwhile: '?')
            self.threads = [by_kind(p, t0, task_seconds(p), thread_names(p))
                            for p, t0 in zip(self.pids, self.tasks0)]
        return sum(self.last)


def send(port: int, aec: str, data: common.DataSet) -> float:
    """storescu all files of *data* on one association (every response checked)."""
    with Timer() as t:
        proc = storescu(port, aec, [data.directory], aet="BENCHSCU", timeout=900,
                        extra=["-v"])
    ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")
    if ok != data.count:
        raise RuntimeError(f"{ok} of {data.count} C-STOREs succeeded\n{proc.stderr[-2000:]}")
    return t.seconds


def run_cluster(work: Path, data: common.DataSet, profile: Path | None, label: str,
                fsync: bool = True):
    config = toml.deep_merge({} if fsync else {"storage": {"fsync": False}}, EXTRA)
    cluster = Cluster(work, config=config or None)
    try:
        cluster.start(3)
        cluster.wait_mesh(timeout=30)
        a = cluster[0]
        meter = Meter(p.pid for p in cluster)
        with common.profiled_all({f"{label}-{p.name}": p.pid for p in cluster}, profile):
            seconds = send(a.port, a.ae_title, data)
            # every instance acknowledged means 2 durable copies; wait for their records
            # (polling the cheap status, not the where of 1000 instances: its CPU on
            # peer A is the bench's, not replication's), then check them
            def recorded():
                c = get_json(a, "status", 30)["catalog"]
                return c.get("locations", 0) >= 2 * data.count and c.get("hints", 1) == 0
            wait_until(recorded, 60, interval=0.2, what="peer A records 2 copies of each")
            cpu = meter.used()
        rows = get_json(a, f"where?study={data.study_uid}", 30)
        if len(rows) != data.count or any(len(r["replicas"]) < 2 for r in rows):
            raise RuntimeError(f"peer A lists {len(rows)} instances, not each with 2 copies")
        held = {p.name: common.held_instances(p) for p in cluster}
        if sum(held.values()) != 2 * data.count:
            raise RuntimeError(f"copies on disk {held}, expected {2 * data.count} in all")
        per_peer = Counter(x["peer"] for r in rows for x in r["replicas"])
        if any(len({x["peer"] for x in r["replicas"]}) < 2 for r in rows):
            raise RuntimeError("an instance has fewer than 2 replicas on distinct peers")
        where = {p.name: f"{n} copies, {cpu_p:.2f} CPU-s (reactor {r:.2f})"
                 for p, n, cpu_p, r in zip(cluster, (per_peer.get(p.name, 0) for p in cluster),
                                           meter.last, meter.reactor)}
        for p, kinds in zip(cluster, meter.threads):
            print(f"      {label} {p.name} threads: {kinds}")
        return seconds, cpu, where
    finally:
        cluster.stop()


def run_single(work: Path, data: common.DataSet, profile: Path | None, label: str):
    with Peer(work) as peer:
        meter = Meter([peer.pid])
        with common.profiled_all({f"{label}-single": peer.pid}, profile):
            seconds = send(peer.port, peer.ae_title, data)
            cpu = meter.used()
        held = common.held_instances(peer)
    if held != data.count:
        raise RuntimeError(f"peer holds {held} of {data.count} instances")
    for kinds in meter.threads:
        print(f"      {label} threads: {kinds}")
    return seconds, cpu, {"peer": held, "reactor CPU-s": round(meter.reactor[0], 2)}


def run_storescp(work: Path, data: common.DataSet, profile, label):
    with StoreSCP(work / "in", ae_title="STORESCP", log_path=work / "storescp.log") as scp:
        seconds = send(scp.port, scp.ae_title, data)
    held = common.count_files(work / "in")
    if held != data.count:
        raise RuntimeError(f"storescp wrote {held} of {data.count} files")
    return seconds, None, {"files": held}


RUNNERS = {"cluster": run_cluster, "single": run_single, "storescp": run_storescp,
           "cluster-nosync": lambda w, d, p, l: run_cluster(w, d, None, l, fsync=False)}


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions per target (3; 1 quick)")
    p.add_argument("--data", default="ct,mr", help="comma-separated: ct,mr")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record every peer during each cluster/single run into DIR")
    p.add_argument("--code", default=None,
                   help="LABEL=DIR,...: run the peers of each target from each of these "
                        "source trees (e.g. git archive snapshots), interleaved, so that "
                        "before/after ratios come from one invocation")
    p.add_argument("--set-for", action="append", default=[],
                   metavar="LABEL:section.KEY=VALUE",
                   help="a setting for the cluster peers of one --code label only (e.g. "
                        'local:strategies.first_copy=\'"local"\')')
    p.add_argument("--threads", action="store_true",
                   help="print the CPU each kind of thread of each peer used (py-spy dump)")
    args = p.parse_args()
    global THREADS, EXTRA
    THREADS = args.threads
    configs = common.label_configs(args.set_for)
    reps = args.reps or (1 if args.quick else 3)
    common.header("replicated ingest: DCMTK storescu, one association, TCP_NODELAY=1")
    print(f"   load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    makers = {"ct": common.ct_study, "mr": common.mr_study}
    datasets = [makers[d](args.cache) for d in args.data.split(",")]
    targets = [t for t in RUNNERS if not (args.quick and t in ("storescp", "cluster-nosync"))]
    versions = code_versions(args.code)
    summary = []
    with common.workdir(args.keep, "pacsp2p-bench-ingest-cluster-") as wd:
        for data in datasets:
            size = data.bytes
            print(f"-- {data.name}: {data.count} instances, {mb(size):.1f} MB, {reps} rep(s)")
            res = {(v, t): {"s": [], "cpu": []} for v, _ in versions for t in targets}
            for rep in range(reps):           # interleaved: drift hits every target alike
                for version, tree in versions:
                    for target in targets:
                        label = f"{data.name}-{version or 'this'}-{target}-{rep}"
                        EXTRA = configs.get(version, {})
                        with code_tree(tree):
                            s, cpu, where = RUNNERS[target](wd / label, data, args.profile,
                                                            label)
                        res[(version, target)]["s"].append(s)
                        if cpu is not None:
                            res[(version, target)]["cpu"].append(cpu)
                        cpus = f"{1000 * cpu / data.count:6.2f} CPU-ms/inst" if cpu else ""
                        print(f"   {version:>6s} {target:14s} rep {rep + 1}: {s:6.2f} s  "
                              f"{mb(size) / s:7.1f} MB/s  {data.count / s:6.0f} inst/s  "
                              f"{cpus}  {where}  load {os.getloadavg()[0]:.1f}", flush=True)
                        time.sleep(1.0)
            for version, _ in versions:
                single_s = median(res[(version, "single")]["s"])
                single_cpu = median(res[(version, "single")]["cpu"]) / data.count
                rows = []
                for t in targets:
                    r = res[(version, t)]
                    s = median(r["s"])
                    cpu = median(r["cpu"]) / data.count if r["cpu"] else None
                    rows.append([f"{version} {t}".strip(), f"{s:.2f}", f"{mb(size) / s:.1f}",
                                 f"{data.count / s:.0f}", f"{single_s / s:.2f}",
                                 f"{1000 * cpu:.2f}" if cpu else "-",
                                 f"{cpu / single_cpu:.2f}" if cpu else "-"])
                print()
                print(table(rows, ["target", "median s", "MB/s", "inst/s", "speed/single",
                                   "CPU ms/inst", "CPU/single"]))
                c_cpu = median(res[(version, "cluster")]["cpu"]) / data.count
                c_s = median(res[(version, "cluster")]["s"])
                summary.append(
                    f"{data.name}{' ' + version if version else ''}: cluster/single CPU per "
                    f"instance = {c_cpu / single_cpu:.2f} "
                    f"({'meets' if c_cpu <= 2.5 * single_cpu else 'MISSES'} <= 2.5)   "
                    f"cluster/single speed = {single_s / c_s:.2f} "
                    f"({'meets' if single_s / c_s >= 0.6 else 'MISSES'} >= 0.6)")
            print()
    print("\n".join(summary))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
