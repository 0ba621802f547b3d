#!/usr/bin/env python3
"""CPU per call of named functions inside each peer of a bench run, without a profiler.

A sampling profile on this loaded 2-core host mixes up threads that wait with threads
that run (py-spy) and cProfile inflates Deferred-heavy, builtin-heavy code 2-5 times, so
neither says what one call costs. This writes a ``sitecustomize.py`` into a source tree
(a ``git archive`` snapshot, never the main checkout) that, in every ``twistd``
process started from it, wraps the functions named in ``TARGETS`` (or ``--target
module:Qual.name``) with ``time.thread_time`` counters once ``pacsp2p.service`` is
imported, and writes every second, per peer, ``DIR/<run>-<peer>.txt``: total CPU-ms,
calls and CPU-µs per call of each, slowest first. Nested functions are counted in
each (the totals overlap); the wrapper costs ~1-2 µs a call. Then run a bench with
``--code label=TREE``::

    d=/tmp/snap-x; mkdir -p $d && git archive HEAD | tar -x -C $d && ln -s $PWD/.venv $d/.venv
    .venv/bin/python bench/calltimes.py $d --out /tmp/calls
    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/ingest_cluster.py --quick \\
        --reps 1 --data mr --code x=$d
    head -40 /tmp/calls/*.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path

TARGETS = [   # (module, function or Class.method): the replicated write's path
    # the writer's reactor
    ("pacsp2p.dicom.acceptor", "Association.dataReceived"),
    ("pacsp2p.facade.store", "Store.__init__"), ("pacsp2p.facade.store", "Store._received"),
    ("pacsp2p.facade.store", "Store._stored"), ("pacsp2p.facade.operation", "Operation.finish"),
    ("pacsp2p.transfer.forward", "Forward._sniff"), ("pacsp2p.transfer.forward", "sniff"),
    ("pacsp2p.transfer.ingest", "Ingest.rank"), ("pacsp2p.transfer.ingest", "Ingest.candidates"),
    ("pacsp2p.strategies", "Strategies.place"), ("pacsp2p.transfer.pushport", "Pushes.open"),
    ("pacsp2p.transfer.pushport", "ThreadPush.done"),
    ("pacsp2p.transfer.pushport", "ThreadPush._hand"),
    ("pacsp2p.transfer.ingest", "Ingest.remote_copy"), ("pacsp2p.transfer.recorded", "store"),
    ("pacsp2p.transfer.recorded", "store_remote"), ("pacsp2p.transfer.recorded", "_finish"),
    ("pacsp2p.transfer.recorded", "_commit_remote"),
    ("pacsp2p.transfer.commits", "GroupCommits._answered"),
    ("pacsp2p.transfer.commits", "GroupCommits.behind"), ("pacsp2p.catalog.db", "Catalog.learn"),
    ("pacsp2p.catalog.db", "Catalog.committed_now"),
    ("pacsp2p.overlay.dissemination", "Dissemination.changed"),
    ("pacsp2p.overlay.sync", "AntiEntropy.pull"),
    # the writer's threads
    ("pacsp2p.dicom.incoming", "_write"), ("pacsp2p.facade.store", "Store._header"),
    ("pacsp2p.facade.store", "Store._answer"), ("pacsp2p.transfer.forward", "Forward.written"),
    ("pacsp2p.transfer.forward", "Forward.header_read"),
    ("pacsp2p.transfer.forward", "Forward._record"),
    ("pacsp2p.transfer.forward", "Forward._pushed"), ("pacsp2p.transfer.pushport", "_Sender._send"),
    ("pacsp2p.transfer.onejob", "OneJob.written_then"),
    ("pacsp2p.catalog.db", "Catalog.record_now"), ("pacsp2p.catalog.db", "Catalog._write_batch"),
    ("pacsp2p.adapters.embedded", "EmbeddedArchive.keep"),
    ("pacsp2p.adapters.embedded", "EmbeddedArchive.begin_flush"),
    # a holder's push port
    ("pacsp2p.transfer.pushrecv", "_receive"), ("pacsp2p.transfer.pushrecv", "_commit"),
    ("pacsp2p.transfer.replicas", "ReplicaService.admit"),
    ("pacsp2p.transfer.replicas", "ReplicaService.pushed"),
    ("pacsp2p.transfer.replicas", "ReplicaService.commits_now"),
    ("pacsp2p.catalog.db", "Catalog.record_all_now"),
]

SITE = '''\
# written by bench/calltimes.py: CPU per call of named functions (this tree only)
import functools, importlib, importlib.util, os, sys, threading, time
if "twistd" in os.path.basename(sys.argv[0]):
    _OUT, _TARGETS, _acc = {out!r}, {targets!r}, {{}}
    _cfg = [a for a in sys.argv if a.endswith(".toml")]
    _tag = "-".join(_cfg[0].split("/")[-3:-1]) if _cfg else str(os.getpid())

    def _wrap(key, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                e = _acc.setdefault(key, [0, 0.0])
                e[0] += 1
                e[1] += time.thread_time() - t
        return timed

    def _patch():
        for mod, name in _TARGETS:
            try:
                m = importlib.import_module(mod)
                if "." not in name:
                    setattr(m, name, _wrap(name, getattr(m, name)))
                    continue
                cls, meth = name.split(".")
                c = getattr(m, cls)
                o = c.__dict__[meth]
                setattr(c, meth, staticmethod(_wrap(name, o.__func__))
                        if isinstance(o, staticmethod) else _wrap(name, o))
            except Exception as e:
                print(f"calltimes: {{mod}}:{{name}} not timed: {{e}}", file=sys.__stderr__)

    def _dump():
        while True:
            time.sleep(1.0)
            rows = sorted(_acc.items(), key=lambda kv: -kv[1][1])
            with open(os.path.join(_OUT, _tag + ".txt"), "w") as f:
                for k, (n, s) in rows:
                    f.write(f"{{s * 1000:9.1f}} ms {{n:7d}} calls "
                            f"{{s / n * 1e6:8.1f}} us  {{k}}\\n")

    class _Hook:
        def find_spec(self, name, path, target=None):
            if name != "pacsp2p.service":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                _patch()
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
    threading.Thread(target=_dump, daemon=True, name="calltimes").start()
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree", type=Path, help="a source tree (a git archive snapshot)")
    p.add_argument("--out", type=Path, required=True, help="where the tables are written")
    p.add_argument("--target", action="append", default=[],
                   help="module:function or module:Class.method (more than TARGETS)")
    args = p.parse_args()
    if (args.tree / ".git").exists():
        raise SystemExit(f"{args.tree} is a checkout: give a snapshot (git archive)")
    args.out.mkdir(parents=True, exist_ok=True)
    targets = TARGETS + [tuple(t.split(":", 1)) for t in args.target]
    (args.tree / "sitecustomize.py").write_text(
        SITE.format(out=str(args.out.resolve()), targets=targets))
    print(f"{args.tree}/sitecustomize.py: {len(targets)} functions timed, tables in {args.out}")


if __name__ == "__main__":
    main()
