#!/usr/bin/env python3
"""Scrub benchmark: how fast a peer re-hashes its archive, against ``sha256sum`` of the
same files in the same run.

One pacsp2p peer (embedded archive, ``scrub_interval`` = 0: no background pass) holds a
data set stored through its facade (DCMTK storescu). Then, per repetition, in turns:

  sha256sum   coreutils ``sha256sum`` of every file of the archive (``xargs -0``, one
              process for all), timed end to end
  scrub       ``pacsp2p scrub --rate 0 --json``: one full pass, unthrottled; timed by the
              peer itself (the pass's ``started`` to ``finished``: the catalog walk, the
              archive's batched ``verify`` jobs, the counting) and, for the record, the
              command end to end (it polls the peer, at most once a second)

Both read the files from the page cache (they are read once before the first
repetition): what is compared is the hashing pipeline, not the disk. MB/s are of the
archive's file bytes (what both read). Data: the CT study (512x512x16-bit, ~0.5 MB per
instance; ``--count``) and a small-image MR study (64x64, ~9 KB per instance, 5000:
the per-copy overhead). Target of issue 13: scrub >= 0.8 x sha256sum.

    .venv/bin/python bench/scrub.py [--quick] [--reps N] [--count N]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.testing import Peer  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402
from pacsp2p.testing.dicomnet import archive_files  # noqa: E402

PACSP2P = Path(sys.executable).parent / "pacsp2p"


def sha256sum(files: list[Path]) -> float:
    """Seconds for coreutils sha256sum of *files* (one process)."""
    listing = b"\0".join(str(f).encode() for f in files)
    with Timer() as t:
        subprocess.run(["xargs", "-0", "sha256sum"], input=listing, check=True,
                       stdout=subprocess.DEVNULL, timeout=3600)
    return t.seconds


def scrub(peer) -> tuple[dict, float]:
    with Timer() as t:
        proc = subprocess.run([str(PACSP2P), "scrub", "--config", str(peer.config_path),
                               "--rate", "0", "--json"], capture_output=True, text=True,
                              timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"pacsp2p scrub failed: {proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout), t.seconds


def run(work: Path, data: common.DataSet, reps: int) -> dict:
    peer = Peer(work / "peer", config={"cluster": {"scrub_interval": 0}})
    peer.start()
    try:
        storescu(peer.port, peer.ae_title, [data.directory], timeout=1800)
        files = archive_files(peer.data_dir)
        if len(files) != data.count:
            raise RuntimeError(f"{len(files)} of {data.count} instances stored")
        nbytes = sum(f.stat().st_size for f in files)
        for f in files:                          # into the page cache, for both
            f.read_bytes()
        out = {"files": len(files), "bytes": nbytes, "sha": [], "scrub": [], "cli": []}
        for rep in range(reps):
            order = ("sha", "scrub") if rep % 2 == 0 else ("scrub", "sha")
            for what in order:
                if what == "sha":
                    out["sha"].append(sha256sum(files))
                else:
                    p, wall = scrub(peer)
                    if p["checked"] != len(files) or p["damaged"] or p["missing"]:
                        raise RuntimeError(f"unexpected pass: {p}")
                    out["scrub"].append(p["finished"] - p["started"])
                    out["cli"].append(wall)
            print(f"   rep {rep + 1}: sha256sum {out['sha'][-1]:6.3f} s "
                  f"{mb(nbytes) / out['sha'][-1]:7.1f} MB/s | scrub pass "
                  f"{out['scrub'][-1]:6.3f} s {mb(nbytes) / out['scrub'][-1]:7.1f} MB/s "
                  f"(command {out['cli'][-1]:.2f} s)", flush=True)
        return out
    finally:
        peer.stop()


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (5; 2 quick)")
    p.add_argument("--count", type=int, default=1000, help="CT instances (1000: ~525 MB)")
    args = p.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    common.header("scrub: one peer re-hashes its embedded archive vs sha256sum of its files")
    sets = [common.ct_study(args.cache, 200 if args.quick else args.count),
            common.mr_study(args.cache, 1000 if args.quick else 5000)]
    rows = []
    verdicts = []
    with common.workdir(args.keep, "pacsp2p-bench-scrub-") as wd:
        for data in sets:
            print(f"-- {data.name}: {data.count} instances, {mb(data.bytes):.1f} MB, "
                  f"{reps} rep(s)", flush=True)
            r = run(wd / data.name, data, reps)
            sha_s, scrub_s, cli_s = median(r["sha"]), median(r["scrub"]), median(r["cli"])
            n, nb = r["files"], r["bytes"]
            rows.append([data.name, "sha256sum", f"{n / sha_s:.0f}", f"{mb(nb) / sha_s:.1f}",
                         "1.00"])
            rows.append([data.name, "pacsp2p scrub (pass)", f"{n / scrub_s:.0f}",
                         f"{mb(nb) / scrub_s:.1f}", f"{sha_s / scrub_s:.2f}"])
            rows.append([data.name, "pacsp2p scrub (command)", f"{n / cli_s:.0f}",
                         f"{mb(nb) / cli_s:.1f}", f"{sha_s / cli_s:.2f}"])
            verdicts.append((data.name, sha_s / scrub_s))
            time.sleep(1.0)
    print()
    print(table(rows, ["data", "what (median)", "files/s", "MB/s", "x sha256sum"]))
    print()
    for name, x in verdicts:
        print(f"{name}: scrub/sha256sum = {x:.2f} "
              f"({'meets' if x >= 0.8 else 'MISSES'} target scrub >= 0.8 x sha256sum)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
