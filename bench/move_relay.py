#!/usr/bin/env python3
"""C-MOVE / C-GET in relay mode: a study whose copies are all on OTHER peers, moved by
DCMTK movescu (and fetched by getscu, ``--get``) at a peer whose own archive holds none
of it, against Orthanc's own C-MOVE of the same study to the same storescp (issue 15.1).

A 3-peer cluster of separate ``twistd`` processes on 127.0.0.1 (``pacsp2p.testing``'s
``Cluster``): ``peera`` has no archive (``archives = []``), ``peerb`` and ``peerc`` an
embedded one each (``fsync = false``); the study is stored through peera with
``replicas = write_quorum = R`` (``--replicas``, default 2: every instance on peerb AND
peerc; R=1: each on one of them), and timing starts once peera's catalog places every
instance on R archives (``GET /where``). Every C-MOVE/C-GET is checked for the count of
files; the first repetition of each also compares every file's data set bytes with the
original (``dataset_sha256``). Studies as ``bench/move.py`` (``ct``, ``mr32k``,
``mr8k``); the storescp's directory on tmpfs. Prints medians of interleaved repetitions,
the ratio orthanc/this (>= 1: at least as fast; target 1.0) and the CPU-seconds per
instance of each peer process (a, b, c) and their sum (in Orthanc's row: the peers'
CPU while Orthanc ran, i.e. what they spend idle, beside Orthanc's own): 3 peers on a
2-core host cannot show wall-clock scaling, CPU per instance is the honest figure
beside the wall clock. Each relay line also tells the instances each source served and
how many the consumer opened before they were fetched (``waited``) and the retrieval's
own span (``fetched in``: from its start to its last instance fetched).
With ``--with-single``, a lone peer holding the study in its own embedded archive
(``bench/move.py``'s single-peer case) is timed in the same sequence: what relaying
costs over reading one's own archive. ``--associations 1,2,3``: the relay C-MOVE once
per number of associations from peera to the destination (rows ``relay-aN``, as
``bench/move.py``; C-GET cannot use it: its sub-operations go on its own association). ``--direct``: also
the C-MOVE to the same storescp in ``mode = "direct"`` (row ``direct``: peerb and peerc
each send their share over their own association, no bytes through peera).
``--code before=DIR,after=DIR``: one cluster per source tree (its peers' ``PYTHONPATH``:
``git archive`` snapshots), each holding the studies, their rows (``relay@before``, ...)
interleaved with Orthanc's in every repetition: a before/after in one invocation.

    .venv/bin/python bench/move_relay.py [--quick] [--reps N] [--studies ct,mr32k,mr8k]
                                         [--get] [--replicas R] [--profile DIR]
                                         [--with-single] [--associations 1,2]
                                         [--direct] [--code LABEL=DIR,LABEL=DIR]
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import move as single  # noqa: E402
from common import Timer, code_tree, code_versions, mb, median, table  # noqa: E402

from pacsp2p.testing import Orthanc, Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.cluster import Cluster, get_json, wait_until  # noqa: E402
from pacsp2p.testing.dcmtk import dataset_sha256, storescu  # noqa: E402

DEST = single.DEST
DIRECT = f"{DEST}D"          # the same storescp, reached by the holders themselves
PEERS = ("a", "b", "c")


def placed(peer, study_uid: str, count: int, replicas: int) -> bool:
    rows = get_json(peer, f"where?study={study_uid}", timeout=60)
    return len(rows) == count and all(
        len({r["peer"] for r in row["replicas"]}) == replicas
        and all(r["peer"] != "peera" for r in row["replicas"]) for row in rows)


def retrieval(peer) -> str:
    """The newest retrieval at *peer*: instances per source, and how many the consumer
    opened before they were fetched (``waited``: the fetching was behind)."""
    try:
        r = max(get_json(peer, timeout=60)["retrievals"], key=lambda r: r["id"])
    except (ValueError, KeyError, OSError):
        return ""
    per = "/".join(str(s["completed"]) for s in r["sources"].values())
    span = ((r["finished_at"] or 0) - (r["started_at"] or 0)) if r.get("finished_at") else 0
    return (f"  [from {per}, waited {r.get('waited', '?')}, rescued {r['rescued']}, "
            f"fetched in {span:.2f} s]")


def identical(data, files: list[Path]) -> None:
    """Every received file's data set hashes as the original's (raises otherwise)."""
    want = sorted(dataset_sha256(f) for f in data.files)
    got = sorted(dataset_sha256(f) for f in files)
    if want != got:
        raise RuntimeError(f"{data.name}: received data sets differ from the originals")


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions per source (3; 1 quick)")
    p.add_argument("--studies", default="ct,mr32k,mr8k", help="comma-separated: ct,mr32k,mr8k")
    p.add_argument("--get", action="store_true", help="also C-GET at peera (getscu)")
    p.add_argument("--replicas", type=int, default=2, choices=(1, 2))
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the three peers during the first relay C-MOVE")
    p.add_argument("--with-single", action="store_true",
                   help="also C-MOVE from a lone peer holding the study (bench/move.py)")
    p.add_argument("--associations", default="1",
                   help="comma-separated numbers of associations of the relay C-MOVE "
                        "(each its own row; default 1)")
    p.add_argument("--direct", action="store_true",
                   help="also C-MOVE at peera to a destination in mode = \"direct\" (row "
                        "direct: peerb and peerc send their shares straight to the storescp)")
    p.add_argument("--code", default=None,
                   help="LABEL=DIR,...: one cluster per source tree (PYTHONPATH of its "
                        "peers), their rows interleaved in one invocation")
    args = p.parse_args()
    args.counts = single.counts_of(args.associations)
    reps = args.reps or (1 if args.quick else 3)
    common.header(f"relay C-MOVE/C-GET: study on other peers (R={args.replicas}) vs Orthanc")
    names = [n.strip() for n in args.studies.split(",") if n.strip()]
    datasets = {n: single.study(args.cache, n) for n in names}
    for n, data in datasets.items():
        print(f"-- {n}: {data.name}: {data.count} instances, {mb(data.bytes):.1f} MB")
    results = []
    shm = Path("/dev/shm")
    with common.workdir(args.keep, "pacsp2p-bench-relay-") as wd:
        dd = Path(tempfile.mkdtemp(prefix="pacsp2p-bench-dest-",
                                   dir=shm if shm.is_dir() else None))
        print(f"   {reps} rep(s); destination directory: {dd}", flush=True)
        clusters: dict[str, Cluster] = {}
        try:
            with StoreSCP(dd / "dest", ae_title=DEST, fork=True,
                          log_path=wd / "storescp.log") as scp, \
                    Orthanc(wd / "orthanc",
                            modalities={DEST: [DEST, "127.0.0.1", scp.port]}) as o:
                r = args.replicas
                for label, tree in code_versions(args.code):
                    with code_tree(tree):
                        cluster = Cluster(
                            wd / f"cluster{label}",
                            {**single.destinations(f"127.0.0.1:{scp.port}", args.counts),
                             DIRECT: {"address": f"127.0.0.1:{scp.port}", "mode": "direct"}},
                            config={"storage": {"fsync": False},
                                    "cluster": {"replicas": r, "write_quorum": r}})
                        clusters[label] = cluster
                        cluster.start(3, per_peer={"peera": {"archives": []}})
                    cluster.wait_mesh(timeout=60)
                cluster = next(iter(clusters.values()))
                if args.with_single:
                    lone = Peer(wd / "single", name="single", ae_title="SINGLE",
                                destinations={DEST: f"127.0.0.1:{scp.port}"},
                                config={"storage": {"fsync": False}}).start()
                    cluster.peers.append(lone)      # (stopped with the cluster)
                with Timer() as t:
                    for data in datasets.values():
                        for c in clusters.values():
                            storescu(c[0].port, c[0].ae_title, [data.directory], timeout=900)
                        storescu(o.dicom_port, o.aet, [data.directory], timeout=900)
                        if args.with_single:
                            storescu(lone.port, lone.ae_title, [data.directory],
                                     timeout=900)
                    for data in datasets.values():
                        for c in clusters.values():
                            wait_until(lambda d=data, a=c[0]: placed(a, d.study_uid, d.count,
                                                                     r), 300, interval=0.5,
                                       what=f"{data.name} on {r} other peers")
                print(f"   stored through peera (R={r}), placed on peerb/peerc only, and "
                      f"into Orthanc in {t.seconds:.1f} s (not timed)", flush=True)
                for sname, data in datasets.items():
                    results.append(run_study(args, reps, sname, data, scp, clusters, o, dd))
        finally:
            for c in clusters.values():
                c.stop()
            shutil.rmtree(dd, ignore_errors=True)
    report(results)
    return 0


def relay_name(n: int) -> str:
    return "relay" if n == 1 else f"relay-a{n}"


def run_study(args, reps, sname, data, scp, clusters, o, dd):
    sources, of = {}, {}          # row -> what it asks for; row -> the cluster it runs on
    for label, cluster in clusters.items():
        at = f"@{label}" if label else ""
        for n in args.counts:
            sources[relay_name(n) + at], of[relay_name(n) + at] = single.dest_ae(n), cluster
        if args.direct:
            sources["direct" + at], of["direct" + at] = DIRECT, cluster
        if args.get:
            sources["relay-get" + at], of["relay-get" + at] = "get", cluster
    sources["orthanc"] = "move"
    first = next(iter(clusters.values()))
    if args.with_single:
        sources["single"] = "move"
        lone = first.peers[3]
    times: dict[str, list[float]] = {n: [] for n in sources}
    cpu: dict[str, list[dict]] = {n: [] for n in sources}
    getdir = dd / "get"
    print(f"-- {sname}")
    for rep in range(reps):
        order = list(sources) if rep % 2 == 0 else list(reversed(sources))
        for name in order:
            cluster = of.get(name, first)
            a = cluster[0]
            pids = {k: cluster[i].pid for i, k in enumerate(PEERS)}
            single.clear(scp)
            shutil.rmtree(getdir, ignore_errors=True)
            getdir.mkdir(parents=True)
            watched = ({"orthanc": o.process.pid, **pids} if name == "orthanc" else
                       {"single": lone.pid} if name == "single" else pids)
            c0 = {k: single.cpu_seconds(pid) for k, pid in watched.items()}
            prof = args.profile if (name.startswith("relay") and "relay-get" not in name
                                    and rep == 0) else None
            with common.profiled_all({f"{sname}-{name}-{k}": pid for k, pid in pids.items()}
                                     if prof else {}, prof):
                if name == "orthanc":
                    s = single.move(o.dicom_port, o.aet, data.study_uid)
                elif name == "single":
                    s = single.move(lone.port, lone.ae_title, data.study_uid)
                elif not name.startswith("relay-get"):
                    s = single.move(a.port, a.ae_title, data.study_uid, sources[name])
                else:
                    s = single.get(a.port, a.ae_title, data.study_uid, getdir)
            cpu[name].append({k: single.cpu_seconds(pid) - c0[k]
                              for k, pid in watched.items()})
            files = (sorted(f for f in getdir.iterdir() if f.is_file())
                     if name.startswith("relay-get") else scp.files())
            if len(files) != data.count:
                raise RuntimeError(f"{name}: {len(files)} of {data.count} received\n"
                                   f"{a.log_tail(30)}")
            if rep == 0 and name not in ("orthanc", "single"):
                identical(data, files)
            times[name].append(s)
            per = "  ".join(f"{k} {v * 1000 / data.count:.3f}" for k, v in cpu[name][-1].items())
            print(f"   {name:9s} rep {rep + 1}: {s:6.2f} s  {mb(data.bytes) / s:7.1f} MB/s"
                  f"  {data.count / s:6.0f} inst/s  CPU ms/inst {per}"
                  f"{retrieval(a) if name.startswith('relay') else ''}", flush=True)
    shutil.rmtree(getdir, ignore_errors=True)
    return sname, data, times, cpu


def report(results) -> None:
    print()
    rows = []
    for sname, data, times, cpu in results:
        for n in times:
            med = median(times[n])
            keys = list(cpu[n][0])
            per = {k: median([c[k] for c in cpu[n]]) * 1000 / data.count for k in keys}
            total = median([c[n] if n in c else sum(c.values())      # orthanc: its own
                            for c in cpu[n]]) * 1000 / data.count
            rows.append([sname, n, f"{med:.2f}", f"{data.count / med:.0f}",
                         *(f"{per[k]:.3f}" if k in per else "-" for k in PEERS),
                         f"{total:.3f}", f"{median(times['orthanc']) / med:.2f}"])
    print(table(rows, ["study", "source", "median s", "inst/s", "a CPU ms/inst",
                       "b", "c", "sum (orthanc, single: its own)", "orthanc/this"]))
    print()
    for sname, data, times, cpu in results:
        for n in times:
            if n != "orthanc":
                r = median(times["orthanc"]) / median(times[n])
                print(f"{sname:6s} {n:9s} / orthanc C-MOVE = {r:.2f}   "
                      f"({'meets' if r >= 1.0 else 'MISSES'} target >= 1.0)")


if __name__ == "__main__":
    sys.exit(main())
