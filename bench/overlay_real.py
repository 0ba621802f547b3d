#!/usr/bin/env python3
"""The overlay with N real peers on this host (issue 18): membership convergence, idle
CPU per peer, overlay links, and 1,000 instances stored at one peer until every peer
counts them.

For each N (default 3, 6, 10, 16): a cluster CA and N peer configs
(``pacsp2p.testing.cluster``: embedded archive, overlay on 127.0.0.1 with mutual TLS,
default ``[overlay]`` parameters, each peer seeded with the first two peers), then N
``twistd pacsp2p`` processes spawned at once. Measured:

- **converged**: seconds from the moment every peer's admin endpoint answers until every
  peer sees every other alive (and, in brackets, from spawning the first process);
- **idle CPU per peer**: CPU time of each peer process over 30 s after 10 s of rest, as a
  percentage of one core (mean and max over the peers);
- **links**: established TCP connections between peers on overlay (AMP) ports and on bulk
  (HTTPS) ports, each counted once, in the idle window;
- **1,000 instances**: storescu sends 1,000 small instances (one series, 64x64) on one
  association to the first peer; seconds from its start until every peer's catalog counts
  1,000 instances (the catalog file of each peer that does not yet is read every 0.1 s
  by this process, read-only: the count its triggers keep, what ``/status`` shows; until
  2026-12-08 each such peer was asked ``GET /status`` every 0.1 s, ``--status-poll``:
  at 32 peers ~310 requests a second of ~1.5 CPU-ms each at the peers and ~1 ms in this
  process, on the 2 cores the cluster runs on, all in the spread after the store; all
  asked at once, the time its answer came kept: asked one after the other, a round of 32
  status requests took up to a second on a busy host, ``--serial-poll``); the catalog pull requests all
  peers made meanwhile (the writer's, and those it served), the ends of stream told and when the writer told
  its own, and the CPU time of all peers over that span (the writer's, and the others'
  mean and max); the writer's mean C-STORE operation time and quorum wait (its
  ``/metrics`` histograms).

    .venv/bin/python bench/overlay_real.py                  # N = 3, 6, 10, 16
    .venv/bin/python bench/overlay_real.py --sizes 3,32 --keep
    .venv/bin/python bench/overlay_real.py --sizes 16 --profile DIR   # py-spy: writer, one other
    .venv/bin/python bench/overlay_real.py --sizes 3,32 --code before=/tmp/a,after=/tmp/b

``--code LABEL=DIR,...`` runs the peers from each source tree (``git archive``
snapshots) in turn for each N (N=3 before, N=3 after, N=32 before, ...), so that
before/after ratios come from one invocation on a machine whose load drifts.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import ingest_cluster  # noqa: E402  (CPU by thread: task_seconds, thread_names)

from pacsp2p.testing import datasets, storescu, toml  # noqa: E402
from pacsp2p.testing.cluster import Cluster, peer_names  # noqa: E402
from pacsp2p.testing.peer import twistd_path  # noqa: E402
from pacsp2p.testing.procs import Process  # noqa: E402


OVERLAY: dict = {}          # deep-merged into every peer's config (--set overlay.KEY=V)
PER_LABEL: dict = {}        # --set-for LABEL:section.KEY=V: for one --code label's peers
PROFILE: Path | None = None  # --profile DIR: py-spy of the writer and one other peer
IDLE = 30.0                 # --idle: seconds of the idle CPU window (after 10 s of rest)
POOL = None                 # threads asking every waiting peer at once (not --serial-poll)
THREADS = False             # --threads: CPU by kind of thread, the writer's and the others'


def status(peer, timeout=30.0) -> dict:
    with urllib.request.urlopen(f"{peer.admin_url}/status", timeout=timeout) as r:
        return json.load(r)


def latencies(peer) -> dict:
    """{name: (sum, count)} of the C-STORE operation and quorum-wait histograms."""
    want = {'pacsp2p_dimse_operation_seconds_{}{{service="C-STORE"}}': "op",
            "pacsp2p_store_quorum_wait_seconds_{}": "quorum"}
    out = {}
    try:
        with urllib.request.urlopen(f"{peer.admin_url}/metrics", timeout=30) as r:
            lines = r.read().decode().splitlines()
    except OSError:
        return out
    values = dict(line.rsplit(" ", 1) for line in lines if line and line[0] != "#")
    for pattern, name in want.items():
        try:
            out[name] = (float(values[pattern.format("sum")]),
                         float(values[pattern.format("count")]))
        except (KeyError, ValueError):
            pass
    return out


def poll(predicate, limit: float, interval: float = 0.1):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if predicate():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(interval)
    return None


def cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def links(peers, ports: set, bulk_ports: set) -> tuple[int, int]:
    amp = bulk = 0
    for p in peers:
        try:
            conns = psutil.Process(p.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
                continue
            if c.raddr.port in ports:
                amp += 1                    # counted at the dialling end only
            elif c.raddr.port in bulk_ports:
                bulk += 1
    return amp, bulk


def counted_in_file(peer, conns: dict) -> int:
    """The instances *peer*'s catalog counts, read from its catalog file (a read-only
    connection of this process, kept: the ``catalog_counts`` row its triggers keep, what
    ``/status`` shows as ``catalog.instances``) -- the peer spends nothing on it."""
    conn = conns.get(peer.name)
    try:
        if conn is None:
            path = peer.data_dir / "catalog.sqlite"
            conn = conns[peer.name] = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                      timeout=30, check_same_thread=False)
        row = conn.execute("SELECT n FROM catalog_counts WHERE name = 'instances'").fetchone()
    except sqlite3.Error:              # (not there yet, busy): not counted this time
        conn = conns.pop(peer.name, None)
        if conn is not None:
            conn.close()
        return 0
    return row[0] if row else 0


def run(n: int, root: Path, files, extra=None, by_status: bool = False) -> dict:
    """One cluster of *n* peers under *root* (its py-spy profiles under PROFILE/root's name),
    *extra* deep-merged into their config; *by_status*: whether they count all is asked
    of each (``/status``) rather than read in its catalog file."""
    cluster = Cluster(root / f"n{n}", config=toml.deep_merge(OVERLAY, extra or {}))
    names = peer_names(n) if n <= 26 else [f"peer{i:02d}" for i in range(n)]
    peers = []
    for i, name in enumerate(names):
        seeds = [cluster.seed(p) for p in peers[:2]]
        peers.append(cluster.add(name, seeds=seeds, start=False))
    r = {"n": n, "poll": "status" if by_status else "catalog"}
    files_read: dict = {}           # peer name -> a read-only connection to its catalog
    try:
        t_spawn = time.monotonic()
        for p in peers:
            spawn(p)

        def all_up():
            for p in peers:
                if not p.process.alive:     # a port taken meanwhile (issue 19.9): again
                    spawn(p)
            return all(_answers(p) for p in peers)
        up = poll(all_up, 600, 0.2)
        if up is None:
            raise RuntimeError("peers did not all start")
        t_up = time.monotonic()

        def meshed():
            for p in peers:
                if not p.process.alive:     # answered, then lost a port race: again
                    spawn(p)
            for p in peers:
                seen = {m["name"]: m["state"] for m in status(p)["overlay"]["members"]}
                if sum(1 for nm in names if nm != p.name and seen.get(nm) == "alive") < n - 1:
                    return False
            return True
        took = poll(meshed, 300, 0.1)
        r["up"], r["converged"] = t_up - t_spawn, took
        r["from_spawn"] = (time.monotonic() - t_spawn) if took is not None else None
        time.sleep(min(10, IDLE))
        pids = [p.process.pid for p in peers]
        ports = {cluster.overlay_ports[p.name][0] for p in peers}
        bulk_ports = {cluster.overlay_ports[p.name][1] for p in peers}
        per = []
        before = {pid: cpu([pid]) for pid in pids}
        t0 = time.monotonic()
        time.sleep(IDLE)
        dt = time.monotonic() - t0
        for pid in pids:
            per.append((cpu([pid]) - before[pid]) / max(dt, 1e-3) * 100)
        r["idle_cpu"] = (sum(per) / len(per), max(per))
        r["links"] = links(peers, ports, bulk_ports)
        # 1,000 instances at the first peer
        sums0 = _dissemination(peers)
        cpu0 = cpu(pids)
        lat0 = latencies(peers[0])
        each0 = {pid: cpu([pid]) for pid in pids}
        tasks0 = {pid: ingest_cluster.task_seconds(pid) for pid in pids} if THREADS else {}
        restarts0 = [_wal_restarts(p) for p in peers]
        ingest0 = status(peers[0]).get("ingest", {})
        t0 = time.monotonic()
        spied = {"writer": pids[0], "second": pids[1], "middle": pids[n // 2],
                 "other": pids[-1]} if PROFILE is not None and n > 3 else \
            {"writer": pids[0], "other": pids[-1]} if PROFILE is not None else {}
        with common.profiled_all(spied, PROFILE / root.name / f"n{n}" if PROFILE is not None
                                 else None):
            proc = storescu(peers[0].port, peers[0].ae_title, files, timeout=600)
            stored = time.monotonic() - t0
            stored_at = time.time()
            ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")

            waiting = list(peers)         # a peer that counted them all is not asked again
            when = []                     # seconds after the store when each counted all

            def ask(p):                   # (the time its answer came)
                if by_status:
                    return status(p)["catalog"].get("instances", 0), time.monotonic()
                return counted_in_file(p, files_read), time.monotonic()

            def counted():
                # each waiting peer's catalog file read (~0.1 ms each, the peer not asked);
                # --status-poll: every waiting peer asked at once (--serial-poll: one after
                # the other, so a round of 32 requests took up to a second on a busy host,
                # and a peer was seen counting only at the end of its round)
                if not by_status:
                    answers = [ask(p) for p in waiting]
                elif POOL is not None:
                    answers = list(POOL.map(ask, waiting))
                else:
                    answers = [(ask(p)[0], time.monotonic()) for p in waiting]
                    answers = [(n, answers[-1][1]) for n, _ in answers]
                left = []
                for p, (n, at) in zip(waiting, answers):
                    if n < len(files):
                        left.append(p)
                    else:
                        when.append(at - t0 - stored)
                waiting[:] = left
                return not waiting
            done = poll(counted, 900, 0.1)
        r["store"] = stored
        r["counted_after"] = sorted(when)     # (0.1 s polls) per peer, after the store
        told = status(peers[0])["overlay"].get("dissemination", {}).get("end_told_at")
        r["writer_end_after"] = told - stored_at if told else None
        lat = latencies(peers[0])
        for name, (total, count) in lat.items():       # mean ms per C-STORE at the writer
            t0_, c0_ = lat0.get(name, (0.0, 0.0))
            r[f"{name}_ms"] = 1000 * (total - t0_) / (count - c0_) if count > c0_ else None
        r["counted"] = stored + max(when) if done is not None else None
        # the writer's copies by kind (local: a C-STORE that kept one here), first copies
        ingest = status(peers[0]).get("ingest", {})
        r["writer_copies"] = {k: v - ingest0.get("copies", {}).get(k, 0)
                              for k, v in ingest.get("copies", {}).items()}
        f0 = ingest0.get("first_copy") or {}
        r["first_copy"] = {k: v - f0.get(k, 0) if isinstance(v, int) else v
                           for k, v in (ingest.get("first_copy") or {}).items()}
        r["store_cpu"] = cpu(pids) - cpu0
        # WAL restarts (each follows a completed checkpoint: an fsync of the WAL and one
        # of the database) over the store and the spread, the writer's and the others'
        restarts = [b - a for a, b in zip(restarts0, (_wal_restarts(p) for p in peers))]
        r["wal_restarts"] = (restarts[0], sum(restarts[1:]))
        each = sorted((cpu([pid]) - each0[pid] for pid in pids[1:]), reverse=True)
        r["store_cpu_writer"] = cpu([pids[0]]) - each0[pids[0]]
        if THREADS:
            r["threads_writer"], r["threads_others"] = _kinds(pids[0], tasks0[pids[0]]), {}
            for pid in pids[1:]:
                for kind, spent in _kinds(pid, tasks0[pid]).items():
                    r["threads_others"][kind] = r["threads_others"].get(kind, 0.0) + spent
        r["store_cpu_others"] = (sum(each) / len(each), each[0]) if each else (0, 0)
        sums = _dissemination(peers)
        r["requests"] = sums["requests"] - sums0["requests"]
        r["ends_told"] = sums["ends_told"] - sums0["ends_told"]
        r["writer_requests"] = sums["writer"] - sums0["writer"]
        r["writer_served"] = sums["served"] - sums0["served"] \
            if None not in (sums["served"], sums0["served"]) else None
        r["stored_ok"] = ok
        r["rss"] = sum(psutil.Process(pid).memory_info().rss for pid in pids) / n / 1e6
    finally:
        for conn in files_read.values():
            conn.close()
        for p in reversed(peers):
            if p.process is not None:
                p.process.stop(timeout=20)
    return r


def _wal_restarts(peer) -> int:
    """The checkpoint sequence number in the header of *peer*'s catalog WAL: raised each
    time the WAL restarts after a checkpoint copied it all back (0 if unreadable)."""
    try:
        with open(peer.data_dir / "catalog.sqlite-wal", "rb") as f:
            head = f.read(16)
    except OSError:
        return 0
    return int.from_bytes(head[12:16], "big") if len(head) == 16 else 0


def _kinds(pid: int, before: dict) -> dict:
    """{kind of thread: CPU-s} *pid*'s threads used since *before* (``task_seconds``)."""
    after, names = ingest_cluster.task_seconds(pid), ingest_cluster.thread_names(pid)
    kinds: dict = {}
    for tid, spent in after.items():
        kind = "reactor" if tid == pid else names.get(tid, "?")
        kinds[kind] = kinds.get(kind, 0.0) + spent - before.get(tid, 0.0)
    return {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
            if v >= 0.005}


def _dissemination(peers) -> dict:
    """Pull requests made by all peers and by the writer, those the writer served (None:
    code that does not count them), ends of stream told (all)."""
    out = {"requests": 0, "ends_told": 0, "writer": 0, "served": None}
    for i, p in enumerate(peers):
        d = status(p)["overlay"].get("dissemination", {})
        out["requests"] += d.get("requests", 0)
        out["ends_told"] += d.get("ends_told", 0)
        if i == 0:
            out["writer"], out["served"] = d.get("requests", 0), d.get("served")
    return out


def spawn(peer) -> None:
    """Start *peer*'s twistd (a peer that could not listen is started again on the same
    ports once the port is free: other peers' configs name them as seeds)."""
    argv = [twistd_path(), "-n", "--pidfile=", "pacsp2p", "--config", peer.config_path]
    peer.process = Process(argv, peer.log_path, cwd=peer.workdir).start()


def _answers(peer) -> bool:
    try:
        status(peer, timeout=2)
        return True
    except (OSError, ValueError):
        return False


def main():
    ap = common.parser(__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="3,6,10,16")
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], metavar="overlay.KEY=VALUE",
                    help="an [overlay] setting for every peer (e.g. overlay.max_links=8)")
    ap.add_argument("--set-for", action="append", default=[],
                    metavar="LABEL:section.KEY=VALUE",
                    help="a setting for the peers of one --code label only (e.g. "
                         'local:strategies.first_copy=\'"local"\')')
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy the writer and three others while the 1,000 spread")
    ap.add_argument("--code", default=None, metavar="LABEL=DIR,...",
                    help="run the peers from each of these source trees in turn, per N")
    ap.add_argument("--idle", type=float, default=30.0, metavar="SECONDS",
                    help="idle CPU window (30; shorter for repeated store runs)")
    ap.add_argument("--serial-poll", action="store_true",
                    help="ask the peers whether they count all one after the other (as "
                         "before 2026-12-07: a round of 32 took up to ~1 s)")
    ap.add_argument("--status-poll", action="append", default=[], metavar="LABEL",
                    help="the peers of this --code label ('all': every label) are asked "
                         "whether they count all (GET /status, each waiting peer every "
                         "0.1 s, as before 2026-12-08) instead of their catalog files being "
                         "read by this process: at 32 peers ~310 requests a second of "
                         "~1.5 CPU-ms each at the peers, on the host being measured")
    ap.add_argument("--threads", action="store_true",
                    help="CPU-s by kind of thread over the store and the spread: the "
                         "writer's, and the other peers' summed (py-spy dump names them)")
    args = ap.parse_args()
    global PROFILE, IDLE, POOL, THREADS
    PROFILE, IDLE, THREADS = args.profile, args.idle, args.threads
    if not args.serial_poll:
        POOL = concurrent.futures.ThreadPoolExecutor(32)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        OVERLAY.setdefault(section, {})[name] = json.loads(value)
    PER_LABEL.update(common.label_configs(args.set_for))
    common.header("overlay with real peers (issue 18)")
    files = datasets.make_study(args.cache / f"overlay-real-{args.instances}",
                                patient_id="OVLREAL", size=64, seed=18,
                                series=[("CT", args.instances, datasets.ExplicitVRLittleEndian)])
    rows = []
    versions = [tuple(v.split("=", 1)) for v in args.code.split(",")] if args.code else \
        [("", None)]
    original = os.environ.get("PYTHONPATH")
    with common.workdir(args.keep, "pacsp2p-overlay-real-") as root:
        for n, (label, tree) in ((int(x), v) for x in args.sizes.split(",") for v in versions):
            if tree is not None:
                os.environ["PYTHONPATH"] = tree
            load = os.getloadavg()[0]
            try:
                r = run(n, root / (label or "this"), files, PER_LABEL.get(label),
                        by_status=bool({"all", label} & set(args.status_poll)))
            finally:
                if original is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = original
            r["code"], r["load"] = label, (load, os.getloadavg()[0])
            print(json.dumps(r), flush=True)
            if THREADS:
                print(f"  {label} {n} WAL restarts (writer, others): {r['wal_restarts']}")
                print(f"  {label} {n} writer threads: {r['threads_writer']}")
                print(f"  {label} {n} the other peers' threads, summed: "
                      f"{dict(sorted(r['threads_others'].items(), key=lambda kv: -kv[1]))}",
                      flush=True)
            ms = [r.get("op_ms"), r.get("quorum_ms")]
            rows.append([f"{label} {n}".strip(),
                         f"{r['converged']:.1f}" if r["converged"] is not None else "-",
                         f"{r['from_spawn']:.1f}" if r.get("from_spawn") else "-",
                         f"{r['idle_cpu'][0]:.2f} / {r['idle_cpu'][1]:.2f}",
                         f"{r['links'][0]} + {r['links'][1]}",
                         f"{r['store']:.1f}",
                         f"{r['counted']:.1f}" if r["counted"] is not None else "-",
                         " / ".join(f"{x:.1f}" if x is not None else "-" for x in ms),
                         f"{r['requests']} ({r['writer_requests']} / "
                         f"{'-' if r['writer_served'] is None else r['writer_served']})",
                         r["ends_told"],
                         f"{r['store_cpu']:.1f}",
                         f"{r['store_cpu_writer']:.1f}",
                         "{:.1f} / {:.1f}".format(*r["store_cpu_others"]), f"{r['rss']:.0f}",
                         "{local} / {pushed}".format(**{"local": 0, "pushed": 0,
                                                        **r["writer_copies"]}),
                         "{local} / {guarded}".format(**r["first_copy"])
                         if "local" in r["first_copy"] else "-",
                         "{:.1f} -> {:.1f}".format(*r["load"])])
    print()
    print(common.table(rows, ["peers", "converged s", "(from spawn)", "idle CPU % mean/max",
                              "links AMP + bulk", "store s", "all count 1000 s",
                              "writer C-STORE / quorum ms",
                              "pull requests (writer's made / served)", "ends told",
                              "cluster CPU-s", "writer CPU-s",
                              "other peers CPU-s mean/max", "RSS MB/peer",
                              "writer's copies local / pushed",
                              "first copy local / guarded", "load"]))


if __name__ == "__main__":
    main()
