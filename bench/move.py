#!/usr/bin/env python3
"""C-MOVE benchmark: the 300-instance CT study (~157 MB) moved by DCMTK movescu from

  pacsp2p   a pacsp2p peer (embedded archive), destination [destinations] STORESCP
  orthanc   a real Orthanc, destination in DicomModalities

to one DCMTK storescp (+xa --fork, writing to a directory on the same disk). Both
archives are preloaded with DCMTK storescu before timing. Each repetition times one
movescu run (association, C-MOVE, all sub-operations, final response) and checks that
all 300 files arrived. Prints the median MB/s of each and the ratio pacsp2p/orthanc.
Target of the issue: ratio >= 0.9.

    .venv/bin/python bench/move.py [--quick] [--reps N] [--profile DIR]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.testing import Orthanc, Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.dcmtk import storescu  # noqa: E402

DEST = "STORESCP"


def move(port: int, aec: str, study_uid: str) -> float:
    with Timer() as t:
        common.run_dcmtk("movescu", "-S", "-aet", "BENCHMOVE", "-aec", aec, "-aem", DEST,
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
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the peer during each pacsp2p C-MOVE into DIR")
    p.add_argument("--dest-max-pdu", type=int, default=None,
                   help="storescp --max-pdu (DCMTK default 16384)")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    common.header("C-MOVE: DCMTK movescu -> DCMTK storescp (+xa --fork)")
    data = common.ct_study(args.cache)
    size = data.bytes
    print(f"-- {data.name}: {data.count} instances, {mb(size):.1f} MB, {reps} rep(s)")
    times: dict[str, list[float]] = {"pacsp2p": [], "orthanc": []}
    rss: dict[str, float | None] = {}
    extra = ["--max-pdu", str(args.dest_max_pdu)] if args.dest_max_pdu else []
    print(f"   destination storescp max PDU: {args.dest_max_pdu or '16384 (default)'}")
    with common.workdir(args.keep, "pacsp2p-bench-move-") as wd:
        with StoreSCP(wd / "dest", ae_title=DEST, fork=True, extra=extra,
                      log_path=wd / "storescp.log") as scp:
            dest = f"127.0.0.1:{scp.port}"
            with Peer(wd / "peer", destinations={DEST: dest}) as peer, \
                    Orthanc(wd / "orthanc", modalities={DEST: [DEST, "127.0.0.1", scp.port]}) as o:
                with Timer() as t:
                    storescu(peer.port, peer.ae_title, [data.directory], timeout=600)
                    storescu(o.dicom_port, o.aet, [data.directory], timeout=600)
                print(f"   preloaded both archives in {t.seconds:.1f} s (not timed)")
                sources = {"pacsp2p": (peer.port, peer.ae_title, peer.pid),
                           "orthanc": (o.dicom_port, o.aet, o.process.pid)}
                for rep in range(reps):
                    order = list(sources) if rep % 2 == 0 else list(reversed(sources))
                    for name in order:
                        port, aec, pid = sources[name]
                        clear(scp)
                        prof = args.profile if name == "pacsp2p" else None
                        with common.profiled(pid if prof else None, prof,
                                             f"move-{name}-{rep}"):
                            s = move(port, aec, data.study_uid)
                        got = received(scp)
                        if got != data.count:
                            raise RuntimeError(f"{name}: storescp received {got} of "
                                               f"{data.count}\n{peer.log_tail(30)}")
                        times[name].append(s)
                        print(f"   {name:8s} rep {rep + 1}: {s:6.2f} s  {mb(size) / s:7.1f} MB/s"
                              f"  {data.count / s:6.0f} inst/s", flush=True)
                    rss = {n: common.rss_mb(sources[n][2]) for n in sources}
                clear(scp)
    print()
    med = {n: median(v) for n, v in times.items()}
    rows = [[n, f"{med[n]:.2f}", f"{mb(size) / med[n]:.1f}", f"{data.count / med[n]:.0f}",
             f"{med[n] / med['pacsp2p']:.2f}" if n != "pacsp2p" else "1.00",
             f"{rss[n]:.0f}" if rss.get(n) else "-"] for n in times]
    print(table(rows, ["source", "median s", "MB/s", "inst/s", "pacsp2p/this", "RSS MB"]))
    r = med["orthanc"] / med["pacsp2p"]
    print(f"\nC-MOVE pacsp2p/orthanc = {r:.2f}   "
          f"({'meets' if r >= 0.9 else 'MISSES'} target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
