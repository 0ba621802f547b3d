#!/usr/bin/env python3
"""Fuzz benchmark: the hostile inputs of ``pacsp2p.testing.fuzz`` (the generator of
tests/integration/test_fuzz.py) against one real peer, many more of them.

Starts a peer (embedded archive), stores a small study, sends *count* inputs (default
100,000; no new input after --time-limit seconds), 8 connections at a time, kinds mixed
(``--by-kind``: one kind after the other, so that log lines can be named by kind), then
checks what the test checks and prints:

  inputs/s, counts per kind and outcome, RSS of the peer (start, peak, end), log bytes
  per input, failures (refused connections, must-fail C-STOREs answered Success),
  C-ECHO and C-GET after the run, files made by path-like UIDs, tracebacks in the log.

    .venv/bin/python bench/fuzz.py [--count N] [--seed S] [--time-limit S] [--by-kind]
                                   [--kinds k1,k2] [--concurrency N] [--keep]

Exit status 1 if any check failed.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from pacsp2p.testing import Peer, datasets, fuzz, storescu, wait_for_echo  # noqa: E402
from pacsp2p.testing import dicomnet as dn  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK, free_port  # noqa: E402


def main() -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="start no new input after this many seconds (default 1800)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--by-kind", action="store_true", help="one kind after the other")
    p.add_argument("--kinds", default="", help="comma-separated subset of " +
                   ",".join(fuzz.KINDS))
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    kinds = tuple(k for k in args.kinds.split(",") if k) or fuzz.KINDS
    print(f"fuzz seed {seed}, {args.count} inputs, {args.concurrency} at a time, "
          f"kinds {'in turn' if args.by_kind else 'mixed'}")
    failed: list[str] = []
    with common.workdir(args.keep, prefix="pacsp2p-fuzz-") as work:
        canary = work / "canary"
        canary.mkdir()
        with Peer(work / "peer", name="fuzz",
                  destinations={"FUZZDEST": f"{LOOPBACK}:{free_port()}"}) as peer:
            watch = fuzz.LogWatch(peer.log_path)
            files = datasets.make_study(work / "study", size=32, patient_id="FUZZ0001",
                                        series=(("CT", 2, ExplicitVRLittleEndian),
                                                ("MR", 1, ExplicitVRLittleEndian)))
            storescu(peer.port, peer.ae_title, files)
            expected = dn.dataset_hashes(files)
            study = dn.study_of(files)
            objects = peer.data_dir / "archives" / "local" / "objects"
            fans = [d.name for d in objects.iterdir() if d.is_dir()] \
                if objects.is_dir() else []
            gen = fuzz.Generator(seed, called_ae=peer.ae_title, study_uid=study,
                                 sop_uids=list(expected), move_dest="FUZZDEST",
                                 canary=fuzz.Canary(canary, objects, fans), kinds=kinds)
            last = [time.monotonic()]

            def progress(n: int) -> None:
                if time.monotonic() - last[0] >= 30:
                    last[0] = time.monotonic()
                    print(f"  ... {n} inputs, peer RSS {fuzz.rss_kib(peer.pid) / 1024:.0f} MiB",
                          flush=True)

            with fuzz.RssPeak(peer.pid) as rss:
                report = fuzz.run(LOOPBACK, peer.port, gen, args.count,
                                  concurrency=args.concurrency, time_limit=args.time_limit,
                                  by_kind=args.by_kind,
                                  between_kinds=watch if args.by_kind else None,
                                  progress=progress)
            print(report.summary(max_failures=40))
            failed += [f"case {r.index} [{r.kind}]: {r.violation or r.outcome}"
                       for r in report.failures()]
            if not peer.alive:
                failed.append("the peer died")
            else:
                try:
                    wait_for_echo(peer.port, peer.ae_title, timeout=60, alive=lambda: peer.alive)
                    print("C-ECHO after the run: OK")
                except (RuntimeError, TimeoutError) as e:
                    failed.append(f"no C-ECHO after the run: {e}")
                got_dir = work / "got"
                dn.getscu(peer.port, peer.ae_title, got_dir,
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
                got = dn.dataset_hashes(f for f in got_dir.iterdir() if f.is_file())
                same = sum(got.get(u) == h for u, h in expected.items())
                print(f"C-GET after the run: {same} of {len(expected)} instances "
                      f"byte-identical")
                if same != len(expected):
                    failed.append("instances stored before the run not byte-identical")
                end = fuzz.rss_kib(peer.pid)
                print(f"peer RSS: {rss.first / 1024:.0f} MiB at the start, peak "
                      f"{rss.peak / 1024:.0f} MiB, {end / 1024:.0f} MiB at the end")
            log_bytes = peer.log_path.stat().st_size - watch.start
            print(f"peer log: {log_bytes / 1024:.0f} KiB "
                  f"({log_bytes / max(report.sent, 1):.0f} bytes per input)")
        leaked = gen.canary.leaked()
        print(f"files made by {len(gen.canary.tried)} path-like UIDs: {len(leaked)}")
        if leaked:
            failed.append(f"{len(leaked)} files outside the data directory, e.g. {leaked[:3]}")
        forged = [line for line in peer.log_path.read_bytes().splitlines()
                  if line.lstrip().startswith(fuzz.INJECTED)]
        print(f"log lines forged by a line feed in an input: {len(forged)}")
        if forged:
            failed.append(f"{len(forged)} forged log lines, e.g. {forged[:2]}")
        problems = watch.problems()
        print(f"tracebacks / 'Unhandled' in the peer's log: {len(problems)}")
        if problems:
            print(watch.summary(example_lines=40))
            failed.append(f"{len(problems)} tracebacks in the log")
    print(f"\nfuzz seed {seed}: {report.sent} inputs, {report.rate:.0f} inputs/s, "
          f"{len(report.failures())} failed inputs; "
          + ("all checks passed" if not failed else f"{len(failed)} problems:"))
    for line in failed[:50]:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
