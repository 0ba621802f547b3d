#!/usr/bin/env python3
"""C-MOVE / C-GET benchmark: a study moved by DCMTK movescu from

  pacsp2p       a pacsp2p peer (embedded archive), destination [destinations] STORESCP
  orthanc       a real Orthanc, destination in DicomModalities
  pacsp2p-get   (--get) the same study fetched from the peer by DCMTK getscu (C-GET)

to one DCMTK storescp (+xa --fork; its directory on tmpfs, /dev/shm, when there is one).
Studies (--studies, default all): ``ct`` 300 CT 512x512 (~157 MB), ``mr32k`` 1000 MR
128x128 (32 KB each), ``mr8k`` 2000 MR 64x64 (8 KB each). Both archives are preloaded
with DCMTK storescu before timing. Each repetition times one movescu run (association,
C-MOVE, all sub-operations, final response) and checks that every file arrived; the
sources' order alternates. Prints the median seconds, MB/s, instances/s and the peer's
CPU-seconds per instance (psutil) of the serving process (the peer; Orthanc for its own
C-MOVE) and the ratio orthanc/pacsp2p (>= 1: pacsp2p
is at least as fast). Target (issue 15): >= 1.0 for every study, C-MOVE and C-GET.
``--associations 1,2,3``: the peer's C-MOVE once per number of associations to the
destination (``[destinations] STORESCPn = { ..., associations = n }``, the same
storescp), all in the same interleaved sequence (rows ``pacsp2p-aN``; C-GET cannot use
it: its sub-operations go on the C-GET's own association).

``--code before=DIR,after=DIR``: one peer per tree (a ``git archive`` snapshot, run by
PYTHONPATH), every row once per label (``pacsp2p[before]``, ...), all interleaved.

    .venv/bin/python bench/move.py [--quick] [--reps N] [--studies ct,mr32k,mr8k] [--get]
                                   [--associations 1,2] [--profile DIR]
                                   [--code before=DIR,after=DIR]
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.testing import Orthanc, Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402

DEST = "STORESCP"


def cpu_seconds(pid: int) -> float:
    try:
        import psutil
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:
        return float("nan")


STUDIES = {  # name: (modality, count, size)
    "ct": ("CT", common.CT_COUNT, common.CT_SIZE),
    "mr32k": ("MR", 1000, 128),
    "mr8k": ("MR", 2000, 64),
}


def study(cache: Path, name: str):
    if name == "ct":
        return common.ct_study(cache)
    modality, count, size = STUDIES[name]
    return common._cached_study(cache, f"{modality.lower()}{count}x{size}",
                                modality=modality, count=count, size=size,
                                patient_id=f"BENCH{name.upper()}")


def get(port: int, aec: str, study_uid: str, out: Path) -> float:
    with Timer() as t:
        common.run_dcmtk("getscu", "-S", "-aet", "BENCHGET", "-aec", aec,
                         "-to", "20", "-ta", "20", "-td", "120", "-od", str(out),
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                         "127.0.0.1", port, timeout=600)
    return t.seconds


def dest_ae(n: int) -> str:
    """The [destinations] entry (the same storescp) sent to over *n* associations."""
    return DEST if n == 1 else f"{DEST}{n}"


def destinations(address: str, counts) -> dict:
    return {dest_ae(n): address if n == 1 else {"address": address, "associations": n}
            for n in counts}


def counts_of(text: str) -> list[int]:
    counts = sorted({int(n) for n in text.split(",") if n.strip()})
    if not counts or not all(1 <= n <= 8 for n in counts):
        raise SystemExit(f"--associations: numbers 1-8, got {text!r}")
    return counts


def source_name(n: int, label: str = "") -> str:
    name = "pacsp2p" if n == 1 else f"pacsp2p-a{n}"
    return f"{name}[{label}]" if label else name


def move(port: int, aec: str, study_uid: str, dest: str = DEST) -> float:
    with Timer() as t:
        common.run_dcmtk("movescu", "-S", "-aet", "BENCHMOVE", "-aec", aec, "-aem", dest,
                         "-to", "20", "-ta", "20", "-td", "120",
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                         "127.0.0.1", port, timeout=600)
    return t.seconds


def received(scp: StoreSCP) -> int:
    return len(scp.files())


def clear(scp: StoreSCP) -> None:
    for f in scp.files():
        f.unlink()


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions per source (3; 1 quick)")
    p.add_argument("--studies", default="ct,mr32k,mr8k", help="comma-separated: ct,mr32k,mr8k")
    p.add_argument("--get", action="store_true", help="also C-GET from the peer (getscu)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the peer during each pacsp2p C-MOVE into DIR")
    p.add_argument("--dest-max-pdu", type=int, default=None,
                   help="storescp --max-pdu (DCMTK default 16384)")
    p.add_argument("--associations", default="1",
                   help="comma-separated numbers of associations the peer's C-MOVE uses "
                        "(each its own row; default 1)")
    p.add_argument("--code", default=None,
                   help="label=DIR,...: one peer per tree (PYTHONPATH), rows per label")
    args = p.parse_args()
    args.counts = counts_of(args.associations)
    reps = args.reps or (1 if args.quick else 3)
    common.header("C-MOVE: DCMTK movescu -> DCMTK storescp (+xa --fork)")
    names = [n.strip() for n in args.studies.split(",") if n.strip()]
    datasets = {n: study(args.cache, n) for n in names}
    for n, data in datasets.items():
        print(f"-- {n}: {data.name}: {data.count} instances, {mb(data.bytes):.1f} MB")
    print(f"   {reps} rep(s); destination storescp max PDU: "
          f"{args.dest_max_pdu or '16384 (default)'}")
    extra = ["--max-pdu", str(args.dest_max_pdu)] if args.dest_max_pdu else []
    shm = Path("/dev/shm")
    dest_root = shm if shm.is_dir() else None
    results = []
    with common.workdir(args.keep, "pacsp2p-bench-move-") as wd, \
            common.workdir(False, "pacsp2p-bench-move-dest-") as dd:
        if dest_root is not None:       # the destination on tmpfs
            dd = Path(tempfile.mkdtemp(prefix="pacsp2p-bench-dest-", dir=dest_root))
        print(f"   destination directory: {dd}")
        try:
            with StoreSCP(dd / "dest", ae_title=DEST, fork=True, extra=extra,
                          log_path=wd / "storescp.log") as scp:
                dest = f"127.0.0.1:{scp.port}"
                with contextlib.ExitStack() as stack:
                    peers = {}
                    for label, tree in common.code_versions(args.code):
                        with common.code_tree(tree):
                            peers[label] = stack.enter_context(Peer(
                                wd / f"peer{label}",
                                destinations=destinations(dest, args.counts)))
                        print(f"   peer {label or '(this checkout)'}: {tree or '.'}")
                    o = stack.enter_context(Orthanc(
                        wd / "orthanc", modalities={DEST: [DEST, "127.0.0.1", scp.port]}))
                    with Timer() as t:
                        for data in datasets.values():
                            for peer in peers.values():
                                storescu(peer.port, peer.ae_title, [data.directory],
                                         timeout=600)
                            storescu(o.dicom_port, o.aet, [data.directory], timeout=600)
                    print(f"   preloaded the archives in {t.seconds:.1f} s (not timed)")
                    for sname, data in datasets.items():
                        results.append(run_study(args, reps, sname, data, scp, peers, o,
                                                 dd))
                    clear(scp)
        finally:
            if dest_root is not None:
                shutil.rmtree(dd, ignore_errors=True)
    print()
    rows = []
    for sname, data, times, cpu in results:
        med = {n: median(v) for n, v in times.items()}
        for n in times:
            c = median(cpu[n]) if cpu.get(n) else None
            rows.append([sname, n, f"{med[n]:.2f}", f"{mb(data.bytes) / med[n]:.1f}",
                         f"{data.count / med[n]:.0f}",
                         f"{c * 1000 / data.count:.3f}" if c is not None else "-",
                         f"{med['orthanc'] / med[n]:.2f}"])
    print(table(rows, ["study", "source", "median s", "MB/s", "inst/s",
                       "server CPU ms/inst", "orthanc/this"]))
    print()
    for sname, data, times, cpu in results:
        for n in times:
            if n == "orthanc":
                continue
            r = median(times["orthanc"]) / median(times[n])
            print(f"{sname:6s} {n:20s} / orthanc C-MOVE = {r:.2f}   "
                  f"({'meets' if r >= 1.0 else 'MISSES'} target >= 1.0)")
    return 0


def run_study(args, reps, sname, data, scp, peers, o, dd):
    sources = {}
    for label, peer in peers.items():
        for n in args.counts:
            sources[source_name(n, label)] = (peer.port, peer.ae_title, peer.pid, dest_ae(n))
        if args.get:
            sources[f"pacsp2p-get[{label}]" if label else "pacsp2p-get"] = (
                peer.port, peer.ae_title, peer.pid, None)
    sources["orthanc"] = (o.dicom_port, o.aet, o.process.pid, DEST)
    peer = next(iter(peers.values()))
    times: dict[str, list[float]] = {n: [] for n in sources}
    cpu: dict[str, list[float]] = {n: [] for n in sources}     # Orthanc's too
    getdir = dd / "get"
    size = data.bytes
    print(f"-- {sname}")
    for rep in range(reps):
        order = list(sources) if rep % 2 == 0 else list(reversed(sources))
        for name in order:
            port, aec, pid, dest = sources[name]
            clear(scp)
            shutil.rmtree(getdir, ignore_errors=True)
            getdir.mkdir(parents=True)
            prof = args.profile if name != "orthanc" else None
            c0 = cpu_seconds(pid)
            with common.profiled(pid if prof else None, prof, f"{sname}-{name}-{rep}"):
                if dest is None:
                    s = get(port, aec, data.study_uid, getdir)
                else:
                    s = move(port, aec, data.study_uid, dest)
            if name in cpu:
                cpu[name].append(cpu_seconds(pid) - c0)
            got = (sum(1 for f in getdir.iterdir() if f.is_file())
                   if dest is None else received(scp))
            if got != data.count:
                raise RuntimeError(f"{name}: {got} of {data.count} received\n"
                                   f"{peer.log_tail(30)}")
            times[name].append(s)
            extra = f"  server CPU {cpu[name][-1] * 1000 / data.count:.3f} ms/inst"
            print(f"   {name:20s} rep {rep + 1}: {s:6.2f} s  {mb(size) / s:7.1f} MB/s"
                  f"  {data.count / s:6.0f} inst/s{extra}", flush=True)
    shutil.rmtree(getdir, ignore_errors=True)
    return sname, data, times, cpu


if __name__ == "__main__":
    sys.exit(main())
