#!/usr/bin/env python3
"""False deaths under load: N real peers (default [overlay] parameters) starved of CPU or
frozen, and what their membership views make of it.

Scenarios (each bounded in time; only the processes this script starts are signalled):

- ``stop:D``   the second peer is SIGSTOPped for D seconds (a GC pause, a VM steal);
- ``chain:S``  the second peer is SIGSTOPped until the first suspects it, then the first
  is SIGSTOPped for S seconds while the second, resumed, refutes (the first holds a
  suspicion whose timer runs out while it stands still: tests/cluster/test_false_death.py);
- ``starve:S`` every peer is pinned to CPU 0 (taskset) beside ``--busy`` (3) busy loops on that CPU
  (python -c with a deadline of S seconds), then unpinned;

and, for each, counted over the peers' ``/status`` (``overlay.swim``): suspicions,
deaths declared, refutations; and, polling every member's view every ~0.1 s from this
script (on the other CPU), the seconds any peer held another dead and how long until
every view was all alive again.

    .venv/bin/python bench/false_deaths.py --peers 3 --runs stop:1,stop:2,stop:3,starve:20
    PYTHONPATH=/tmp/snap .venv/bin/python bench/false_deaths.py ...   # a snapshot's code
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (pacsp2p from a snapshot or the venv)

from pacsp2p.testing.cluster import Cluster, get_json  # noqa: E402

BUSY_LOOPS = 3              # --busy
KEYS = ("suspected", "dead", "refuted")
BUSY = "import time\nd=time.monotonic()+{s}\nwhile time.monotonic()<d: pass\n"


def swim(peers) -> dict:
    """Sum of each counter over the peers."""
    out = dict.fromkeys(KEYS, 0)
    for p in peers:
        s = get_json(p, "status", 60)["overlay"]["swim"]
        for k in KEYS:
            out[k] += s[k]
    return out


def views(peers, pool) -> dict:
    """{(observer, member): state} for every pair."""
    def one(p):
        try:
            return p.name, {m["name"]: m["state"] for m in
                            get_json(p, "status", 1.0)["overlay"]["members"]}
        except Exception:          # a stopped peer does not answer: no view
            return p.name, {}
    out = {}
    for name, seen in pool.map(one, peers):
        for m, st in seen.items():
            if st != "self":
                out[(name, m)] = st
    return out


def watch(peers, pool, until: float, dead_s: dict, seen: set) -> None:
    last = time.monotonic()
    while time.monotonic() < until:
        v = views(peers, pool)
        now = time.monotonic()
        for pair, st in v.items():
            if st == "dead":
                dead_s[pair] = dead_s.get(pair, 0.0) + (now - last)
            if st != "alive":
                seen.add((pair, st))
        last = now
        time.sleep(0.1)


def settle(peers, pool, bound: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        v = views(peers, pool)
        if len(v) == len(peers) * (len(peers) - 1) and all(s == "alive" for s in v.values()):
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("nan")


def run(cluster, what: str, pool) -> dict:
    peers = list(cluster)
    kind, arg = what.split(":")
    arg = float(arg)
    before = swim(peers)
    dead_s, seen = {}, set()
    t0 = time.monotonic()
    procs = []
    if kind == "stop":
        victim = peers[1]
        os.kill(victim.process.pid, signal.SIGSTOP)
        try:
            watch(peers, pool, t0 + arg, dead_s, seen)
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
    elif kind == "chain":
        a, victim = peers[0], peers[1]
        os.kill(victim.process.pid, signal.SIGSTOP)
        try:
            while time.monotonic() - t0 < 60 and \
                    views([a], pool).get((a.name, victim.name)) == "alive":
                time.sleep(0.02)
            os.kill(a.process.pid, signal.SIGSTOP)
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)
        try:
            watch([p for p in peers if p is not a], pool, time.monotonic() + arg, dead_s, seen)
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
    elif kind == "starve":
        for p in peers:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(p.process.pid)],
                           check=True, capture_output=True)
        procs = [subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                                   BUSY.format(s=arg)]) for _ in range(BUSY_LOOPS)]
        try:
            watch(peers, pool, t0 + arg, dead_s, seen)
        finally:
            for q in procs:
                q.wait(timeout=arg + 60)
            for p in peers:
                subprocess.run(["taskset", "-a", "-p", "-c", "0-1", str(p.process.pid)],
                               check=False, capture_output=True)
    else:
        raise SystemExit(f"unknown scenario {what}")
    watch(peers, pool, time.monotonic() + 3.0, dead_s, seen)
    settled = settle(peers, pool, 120.0)
    after = swim(peers)
    return {"run": what, **{k: after[k] - before[k] for k in KEYS},
            "dead_pairs": len(dead_s), "dead_s_max": round(max(dead_s.values(), default=0), 1),
            "dead_s_sum": round(sum(dead_s.values()), 1),
            "suspect_pairs": len({p for p, st in seen if st == "suspect"}),
            "settled_s": round(settled, 1), "load": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--runs", default="stop:1,stop:2,stop:3,starve:20")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--busy", type=int, default=3, help="busy loops on CPU 0 (starve)")
    args = ap.parse_args()
    global BUSY_LOOPS
    BUSY_LOOPS = args.busy
    import pacsp2p
    print(f"# code: {Path(pacsp2p.__file__).parent}  peers: {args.peers}", flush=True)
    root = tempfile.mkdtemp(prefix="falsedeaths-")      # kept: the peers' logs
    if True:
        cluster = Cluster(Path(root))
        try:
            cluster.start(args.peers)
            cluster.wait_mesh(timeout=120)
            time.sleep(3)
            with concurrent.futures.ThreadPoolExecutor(args.peers) as pool:
                for _ in range(args.repeat):
                    for what in args.runs.split(","):
                        print(run(cluster, what, pool), flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
