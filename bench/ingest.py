#!/usr/bin/env python3
"""Ingest benchmark: DCMTK storescu (one association, TCP_NODELAY=1) into

  pacsp2p        a pacsp2p peer (embedded archive; fsync on, the default)
  pacsp2p-nosync the same with [storage] fsync = false (shows what fsync costs; not --quick)
  storescp       DCMTK storescp +xa writing to a directory on the same disk (no fsync)
  orthanc        a real Orthanc, fresh storage dir (SyncStorageArea = true, its default)

of two data sets: 300 CT 512x512x16-bit explicit VR LE (~157 MB) and 1000 small MR
(64x64). Every repetition gets a fresh target. Prints the median MB/s and instances/s, the
peer's and Orthanc's CPU-ms per instance (user+sys from /proc while storescu runs) and the ratios
pacsp2p/storescp and pacsp2p/orthanc. Target (issue 15 item 5): pacsp2p >= 1.2 x Orthanc.
``--code before=DIR,after=DIR`` runs the peer from each source tree (``git archive``
snapshots), interleaved with the others in the same invocation.

    .venv/bin/python bench/ingest.py [--quick] [--reps N] [--data ct,mr] [--profile DIR]
                                     [--code a=DIR,b=DIR]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (Timer, code_tree, code_versions, cpu_seconds, mb, median,  # noqa: E402
                    ratio, table)

from pacsp2p.testing import Orthanc, Peer, StoreSCP  # noqa: E402
from pacsp2p.testing import toml  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402


def send(port: int, aec: str, data: common.DataSet) -> float:
    """storescu all files of *data* on one association; returns seconds."""
    with Timer() as t:
        storescu(port, aec, [data.directory], aet="BENCHSCU", timeout=600)
    return t.seconds


def run_peer(work: Path, data: common.DataSet, fsync: bool, profile: Path | None,
             label: str, tree: str | None = None, extra: dict | None = None
             ) -> tuple[float, float | None, float]:
    """(seconds, RSS MB, CPU-seconds of the peer while storescu ran); *extra*: config
    deep-merged over the peer's (``--set-for``)."""
    config = toml.deep_merge({"storage": {"fsync": fsync}}, extra or {})
    with code_tree(tree), Peer(work, config=config) as peer:
        with common.profiled(peer.pid if profile else None, profile, label):
            cpu0 = cpu_seconds([peer.pid])
            seconds = send(peer.port, peer.ae_title, data)
            cpu = cpu_seconds([peer.pid]) - cpu0
        rss = common.rss_mb(peer.pid)
        held = common.held_instances(peer)
        if held != data.count:
            raise RuntimeError(f"peer holds {held} of {data.count} instances\n{peer.log_tail()}")
    return seconds, rss, cpu


def run_storescp(work: Path, data: common.DataSet) -> tuple[float, None]:
    with StoreSCP(work / "in", ae_title="STORESCP", log_path=work / "storescp.log") as scp:
        seconds = send(scp.port, scp.ae_title, data)
    held = common.count_files(work / "in")
    if held != data.count:
        raise RuntimeError(f"storescp wrote {held} of {data.count} files")
    return seconds, None


def run_orthanc(work: Path, data: common.DataSet) -> tuple[float, float | None, float]:
    """(seconds, RSS MB, CPU-seconds of Orthanc while storescu ran)."""
    with Orthanc(work) as o:
        cpu0 = cpu_seconds([o.process.pid])
        seconds = send(o.dicom_port, o.aet, data)
        cpu = cpu_seconds([o.process.pid]) - cpu0
        rss = common.rss_mb(o.process.pid)
        held = o.statistics()["CountInstances"]
    if held != data.count:
        raise RuntimeError(f"Orthanc holds {held} of {data.count} instances")
    return seconds, rss, cpu


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions per target (3; 1 quick)")
    p.add_argument("--data", default="ct,mr", help="comma-separated: ct,mr")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the peer during each pacsp2p run into DIR")
    p.add_argument("--code", default=None,
                   help="LABEL=DIR,...: run the peer from each of these source trees "
                        "(e.g. git archive snapshots), interleaved in one invocation")
    p.add_argument("--set-for", action="append", default=[],
                   metavar="LABEL:section.KEY=JSON",
                   help="a setting for the peer of one --code label only (e.g. "
                        "'after:storage.sync_directories=true')")
    args = p.parse_args()
    configs = common.label_configs(args.set_for)
    reps = args.reps or (1 if args.quick else 3)
    common.header("ingest: DCMTK storescu, one association, TCP_NODELAY=1")
    print(f"   load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    makers = {"ct": common.ct_study, "mr": common.mr_study}
    datasets = [makers[d](args.cache) for d in args.data.split(",")]
    trees = dict(code_versions(args.code))
    peers = [f"pacsp2p {v}".strip() for v in trees]
    targets = peers + (["storescp", "orthanc"] if args.quick else
                       ["pacsp2p-nosync", "storescp", "orthanc"])
    results: dict[tuple[str, str], dict] = {}
    with common.workdir(args.keep, "pacsp2p-bench-ingest-") as wd:
        for data in datasets:
            size = data.bytes
            print(f"-- {data.name}: {data.count} instances, {mb(size):.1f} MB, {reps} rep(s)")
            secs: dict[str, list] = {t: [] for t in targets}
            rsses: dict[str, list] = {t: [] for t in targets}
            cpus: dict[str, list] = {t: [] for t in targets}
            for rep in range(reps):          # interleaved: drift hits every target alike
                for target in targets:
                    w = wd / f"{data.name}-{target.replace(' ', '-')}-{rep}"
                    label = f"ingest-{data.name}-{target.replace(' ', '-')}-{rep}"
                    cpu = None
                    if target in peers:
                        tree = trees[target[len("pacsp2p"):].strip()]
                        s, rss, cpu = run_peer(w, data, True, args.profile, label, tree,
                                               configs.get(target[len("pacsp2p"):].strip()))
                    elif target == "pacsp2p-nosync":
                        s, rss, cpu = run_peer(w, data, False, None, label)
                    elif target == "storescp":
                        s, rss = run_storescp(w, data)
                    else:
                        s, rss, cpu = run_orthanc(w, data)
                    secs[target].append(s)
                    if rss:
                        rsses[target].append(rss)
                    if cpu is not None:
                        cpus[target].append(cpu)
                    per = f"{1000 * cpu / data.count:6.2f} CPU-ms/inst" if cpu else ""
                    print(f"   {target:15s} rep {rep + 1}: {s:6.2f} s  "
                          f"{mb(size) / s:7.1f} MB/s  {data.count / s:7.0f} inst/s  {per}  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            for target in targets:
                s = median(secs[target])
                results[(data.name, target)] = {
                    "s": s, "mbs": mb(size) / s, "ips": data.count / s,
                    "rss": max(rsses[target]) if rsses[target] else None,
                    "cpu": median(cpus[target]) / data.count if cpus[target] else None}
    print()
    rows = []
    for data in datasets:
        base = results[(data.name, peers[-1])]
        for target in targets:
            r = results[(data.name, target)]
            rows.append([data.name, target, f"{r['s']:.2f}", f"{r['mbs']:.1f}",
                         f"{r['ips']:.0f}", ratio(base["mbs"], r["mbs"]),
                         f"{1000 * r['cpu']:.2f}" if r["cpu"] else "-",
                         f"{r['rss']:.0f}" if r["rss"] else "-"])
    print(table(rows, ["data", "target", "median s", "MB/s", "inst/s",
                       f"{peers[-1]}/this", "CPU ms/inst", "RSS MB"]))
    print()
    for data in datasets:
        sc = results[(data.name, "storescp")]["mbs"]
        oc = results[(data.name, "orthanc")]["mbs"]
        for peer in peers:
            pc = results[(data.name, peer)]["mbs"]
            verdict = "meets" if pc >= 1.2 * oc else "MISSES"
            print(f"{data.name} {peer}: /storescp = {pc / sc:.2f}   /orthanc = {pc / oc:.2f}"
                  f"   ({verdict} target >= 1.2 x orthanc)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
