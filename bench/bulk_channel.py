#!/usr/bin/env python3
"""The bulk channel alone: a real holder (``tests/unit/bulk_server.py``: catalog, embedded
archive, ``bulk.site`` behind the guarded mutual-TLS port) in a process of its own, and a
real ``BulkClient`` here fetching every instance of a study (``fetch``: one GET each; or
``--many``: ``fetch_many`` batches) with ``--parallel`` requests at once, ``--rounds``
times. Prints, per round, the wall clock, MB/s, the CPU-seconds and the minor page
faults per instance of each end (user + system: the holder's process, this process),
and checks every instance's data set hash against the original's. What a relayed C-MOVE
pays per instance on the bulk channel (issue 15.1), without the DICOM ends.
``--holders TREE,TREE``: one holder process per code tree (its ``PYTHONPATH``),
alternated round by round: a before/after of the serving side in one invocation.
``--read-sizes 65536,262144``: the asker's bulk connections read that many bytes per
event (``fetching.READ_SIZE``), alternated the same way (every round starts on new
connections). ``--ports bulk,read``: the holder's port asked, alternated the same way:
the Twisted bulk port (``bulk.site``) or the read port (``bulk.Reads`` on ``threadtls``;
a holder tree without one is asked on its bulk port only).

    .venv/bin/python bench/bulk_channel.py [--studies ct] [--count N] [--parallel 2]
                                           [--rounds 5] [--many] [--holders TREE,TREE]
                                           [--read-sizes N,N] [--ports bulk,read]
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

import common  # noqa: E402
import move as single  # noqa: E402
from common import median  # noqa: E402
from bulk_spawn import bulk_server  # noqa: E402

from pacsp2p.dicom.header import read_meta  # noqa: E402
from pacsp2p.dicom.part10 import examine  # noqa: E402


def cpu(pid: int) -> float:
    return single.cpu_seconds(pid)


def faults(pid: int) -> int:
    """Minor page faults of process *pid* so far (/proc/PID/stat, field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="ct")
    p.add_argument("--count", type=int, default=100, help="instances of the study served")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--many", action="store_true", help="fetch_many batches of 32")
    p.add_argument("--holders", default="",
                   help="comma-separated code trees (PYTHONPATH) of holder processes, one "
                        "each, alternated round by round (default: this tree)")
    p.add_argument("--read-sizes", default="",
                   help="comma-separated bytes per read of the asker's connections "
                        "(fetching.READ_SIZE), alternated round by round")
    p.add_argument("--ports", default="bulk,read",
                   help="the holder's ports asked, alternated round by round: bulk "
                        "(Twisted), read (threadtls)")
    args = p.parse_args()
    common.header("bulk channel alone: BulkClient <- a holder's bulk or read port (mutual TLS)")
    from twisted.internet import defer, reactor
    from twisted.python.threadpool import ThreadPool

    from pacsp2p.overlay import fetching, tls

    data = single.study(args.cache, args.studies)
    files = data.files[:args.count]
    want = {}
    for f in files:
        raw = f.read_bytes()
        want[read_meta(f).sop_instance_uid] = examine(raw)[3]
    uids = list(want)
    size = sum(f.stat().st_size for f in files)
    print(f"-- {args.studies}: {len(files)} instances, {size / 1e6:.1f} MB; "
          f"{args.parallel} at once, {args.rounds} rounds"
          f"{', batches of 32' if args.many else ''}", flush=True)
    results = []
    trees = [t or None for t in args.holders.split(",")] if args.holders else [None]
    with common.workdir(args.keep, "pacsp2p-bench-bulk-") as wd, \
            contextlib.ExitStack() as stack:
        tls_dir = wd / "tls"
        tls_dir.mkdir()
        tmp = wd / "tmp"
        tmp.mkdir()
        holders = []                    # (label, pid, member)
        for i, tree in enumerate(trees):
            env = dict(os.environ)
            if tree:
                env["PYTHONPATH"] = tree
            ports = stack.enter_context(bulk_server(wd / f"server{i}", tls_dir,
                                                    known=files, env=env))
            for which in args.ports.split(","):
                key = {"bulk": "port", "read": "read_port"}[which]
                if key in ports:
                    holders.append((f"holder {tree or 'this tree'} {which} port", ports["pid"],
                                    SimpleNamespace(name="a", host="127.0.0.1",
                                                    bulk_port=ports[key])))

        @defer.inlineCallbacks
        def run():
            pool = ThreadPool(1, 8, "bulk-io")
            pool.start()
            client = fetching.BulkClient(tls.Credentials(tls_dir, "b"), reactor, pool, tmp)
            hows = ["fetch_many" if args.many else "fetch"]
            sizes = [int(n) for n in args.read_sizes.split(",") if n] or [
                fetching.READ_SIZE]
            cases = [(h, how, n) for h in holders for how in hows for n in sizes]
            try:
                for rnd in range(len(cases) * (args.rounds + 1)):   # first ones: warm-up
                    (label, pid, member), how, fetching.READ_SIZE = cases[rnd % len(cases)]
                    for _, kept in list(client._agents.values()):  # new connections
                        yield kept.closeCachedConnections()
                    client._agents.clear()
                    todo = list(uids)
                    s0, c0, t0 = cpu(pid), time.process_time(), time.perf_counter()
                    f0 = (faults(pid), faults(os.getpid()))

                    @defer.inlineCallbacks
                    def worker():
                        while todo:
                            if args.many:
                                part = [todo.pop() for _ in range(min(32, len(todo)))]
                                got = yield client.fetch_many(
                                    member, "local", [(u, want[u]) for u in part])
                            else:
                                part = [todo.pop()]
                                got = [(yield client.fetch(member, "local", part[0],
                                                           want[part[0]]))]
                            for u, f in zip(part, got):
                                if isinstance(f, Exception) or f.sha256 != want[u]:
                                    raise RuntimeError(f"{u}: not served right: {f!r}")
                                f.close()
                    yield defer.gatherResults([worker() for _ in range(args.parallel)],
                                              consumeErrors=True)
                    wall = time.perf_counter() - t0
                    holder = (cpu(pid) - s0) * 1000 / len(uids)
                    asker = (time.process_time() - c0) * 1000 / len(uids)
                    fh, fa = ((faults(p) - f) / len(uids)
                              for p, f in zip((pid, os.getpid()), f0))
                    case = f"{label}, asker {how}" + (
                        f" reading {fetching.READ_SIZE}" if len(sizes) > 1 else "")
                    if rnd >= len(cases):
                        results.append((case, wall, holder, asker, fh, fa))
                    print(f"   round {rnd} {case}{' (warm-up)' if rnd < len(cases) else ''}: "
                          f"{wall:.3f} s {size / wall / 1e6:7.1f} MB/s  CPU ms/inst "
                          f"holder {holder:.3f}  asker {asker:.3f}  page faults/inst "
                          f"{fh:.1f} / {fa:.1f}", flush=True)
            finally:
                pool.stop()

        def go():
            d = run()
            d.addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr),
                                    results.clear()))
            d.addBoth(lambda _: reactor.stop())
        reactor.callWhenRunning(go)
        reactor.run()
    if not results:
        return 1
    print()
    for case in dict.fromkeys(r[0] for r in results):
        mine = [r for r in results if r[0] == case]
        w, h, a, fh, fa = (median([r[i] for r in mine]) for i in (1, 2, 3, 4, 5))
        print(f"{case}: median of {len(mine)}: {w:.3f} s, {size / w / 1e6:.1f} MB/s; CPU ms "
              f"per instance: holder {h:.3f}, asker {a:.3f}, sum {h + a:.3f}; minor page "
              f"faults per instance: holder {fh:.1f}, asker {fa:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
