#!/usr/bin/env python3
"""Every archive a source (issue 14): C-MOVE of one CT study (300 x 512x512x16-bit,
~157 MB) through ONE pacsp2p peer managing K = 1, 2, 3 Orthanc archives, each Orthanc in
its own network namespace behind its own 200 Mbit/s link, all holding the same study,

  peer K=k        movescu -> the peer (archives orthanc1..k, balancing "work-stealing")
                  -> storescp; the peer reads over the Orthancs' REST API (GET .../file)
  orthanc         the same C-MOVE straight from orthanc1 (its own DICOM C-MOVE SCP,
                  C-STORE over its 200 Mbit/s link to the same storescp): the baseline

Set-up (root only; every namespace and veth is made here and removed on exit, Ctrl-C too;
test hosts in 198.18.0.0/15 only):

  - three namespaces ``pp2p-<pid>-s<k>`` (veth: ns 198.18.k.2/24, root 198.18.k.1/24),
    ``tc tbf`` at 200 Mbit/s on both ends' egress (measured with a plain TCP stream first),
    each running ``/usr/sbin/Orthanc`` (``TCP_NODELAY=1``) with REST on 198.18.k.2:8042
    and DICOM on 198.18.k.2:4242; the study is uploaded to each over REST before the
    links are shaped (the paper's setting: archives that already hold it);
  - in the root namespace: a DCMTK ``storescp +xa --fork`` (the C-MOVE destination of
    both Orthanc, at 198.18.1.1, and of the peer, at 127.0.0.1) and, for each K, a fresh
    peer (new data directory) whose ``[[archives]]`` are orthanc1..K (adapter
    ``orthanc``, default ``max_fetches`` 4): it crawls them, so the catalog has K replicas
    of every instance (checked with ``GET /where``) before any C-MOVE is timed.

Each repetition times DCMTK ``movescu`` (association, C-MOVE, all sub-operations, final
response), checks that 300 files arrived and, the first time for each case, that every
data set is byte-identical to the original. The requester's CPU (the peer process,
utime + stime from /proc) is recorded for each C-MOVE through the peer.

Targets: peer / orthanc >= 0.97 (K=1), >= 1.9 (K=2), >= 2.8 (K=3).

    sudo .venv/bin/python bench/retrieve_archives.py [--quick] [--reps N] [--profile DIR]
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402
from retrieve_parallel import (Net, check_received, clear, cpu_seconds,  # noqa: E402
                               get_json, measure_link, sop_of, wait_until)

from pacsp2p.testing import Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.dcmtk import dataset_sha256  # noqa: E402
from pacsp2p.testing.orthanc import ORTHANC_BIN  # noqa: E402
from pacsp2p.testing.preload import upload_parallel  # noqa: E402
from pacsp2p.testing.procs import Process  # noqa: E402

DEST = "STORESCP"
RATE = 200
TARGETS = {1: 0.97, 2: 1.9, 3: 2.8}
HTTP, DICOM = 8042, 4242


class NsOrthanc:
    """Orthanc inside namespace k, REST and DICOM on the namespace's address."""

    def __init__(self, workdir: Path, net: Net, k: int, dest_port: int):
        self.workdir, self.net, self.k = Path(workdir), net, k
        self.addr = net.ns_addr(k)
        self.aet = f"ORTHANC{k}"
        self.dest_port = dest_port
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{HTTP}"

    def start(self) -> "NsOrthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": self.aet, "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "StorageCompression": False,
            "Plugins": [], "HttpServerEnabled": True, "HttpPort": HTTP,
            "RemoteAccessAllowed": True, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": DICOM,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowEcho": True, "DicomScuTimeout": 60,
            "DicomAssociationCloseDelay": 0,
            # the destination as seen from this namespace: the root side of link k
            "DicomModalities": {DEST: [DEST, self.net.root_addr(self.k), self.dest_port]},
            "StableAge": 1, "SaveJobs": False, "HttpThreadsCount": 50,
            "LimitFindResults": 0, "LimitFindInstances": 0,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=1))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = Process([*self.net.exec_argv(self.k), ORTHANC_BIN, path],
                               self.workdir / "orthanc.log", env=env).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2):
                    return self
            except OSError:
                if not self.process.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc {self.k} did not start:\n"
                                       f"{self.process.log_tail(30)}") from None
                time.sleep(0.2)

    def count(self) -> int:
        with urllib.request.urlopen(f"{self.url}/statistics", timeout=10) as r:
            return json.load(r)["CountInstances"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)


def movescu(host: str, port: int, aec: str, study_uid: str) -> float:
    with Timer() as t:
        common.run_dcmtk("movescu", "-S", "-aet", "BENCHMOVE", "-aec", aec, "-aem", DEST,
                         "-to", "20", "-ta", "20", "-td", "300",
                         "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={study_uid}", host, port, timeout=900)
    return t.seconds


def sources_of(peer: Peer) -> str:
    try:
        rs = get_json(f"{peer.admin_url}/status")["retrievals"]
    except Exception:
        return "?"
    if not rs:
        return "-"
    return " ".join(f"{s['archive']}:{s['completed']}@{s['MB_per_s']}"
                    for _, s in sorted(rs[-1]["sources"].items()))


def run(args, net: Net, wd: Path) -> int:
    count = args.count or (60 if args.quick else common.CT_COUNT)
    reps = args.reps or (1 if args.quick else 3)
    data = common._cached_study(args.cache, f"ct{count}x{common.CT_SIZE}-ra", modality="CT",
                                count=count, size=common.CT_SIZE, patient_id="BENCHRA")
    size = data.bytes
    expected = {sop_of(f): dataset_sha256(f) for f in data.files}
    print(f"-- study: {count} x CT 512x512x16-bit, {mb(size):.1f} MB; {reps} rep(s)")

    orthancs: list[NsOrthanc] = []
    peers: list[Peer] = []
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    spread: dict[str, str] = {}
    try:
        with StoreSCP(wd / "dest", ae_title=DEST, fork=True,
                      log_path=wd / "storescp.log") as scp:
            for k in (1, 2, 3):
                net.add(k)
                orthancs.append(NsOrthanc(wd / f"orthanc{k}", net, k, scp.port).start())
            for o in orthancs:                       # before shaping: not timed
                with Timer() as t:
                    upload_parallel(o.url, data.files, threads=4)
                assert o.count() == count, f"orthanc{o.k} holds {o.count()} instances"
                print(f"   orthanc{o.k}: {count} instances uploaded over REST in "
                      f"{t.seconds:.1f} s (not timed)", flush=True)
            for k in (1, 2, 3):
                net.shape(k, RATE)
                print(f"   link {k}: shaped {RATE} Mbit/s, measured "
                      f"{measure_link(net, k):.0f} Mbit/s (TCP, ns -> root)", flush=True)

            def verify(label):
                check_received(scp, expected, label)

            def timed(label, mover, pid=None, verify_now=False, peer=None):
                clear(scp)
                before = cpu_seconds(pid)
                prof = args.profile if (args.profile and pid and not results.get(label)) \
                    else None
                with common.profiled(pid if prof else None, prof, label):
                    s = mover()
                used = cpu_seconds(pid) - before if pid else None
                got = len(scp.files())
                if got != count:
                    raise RuntimeError(f"{label}: storescp received {got} of {count}")
                if verify_now:
                    verify(label)
                results.setdefault(label, []).append(s)
                if used is not None:
                    cpu.setdefault(label, []).append(used)
                srcs = sources_of(peer) if peer is not None else ""
                if peer is not None:
                    spread[label] = srcs
                print(f"   {label:9s} {s:6.2f} s {mb(size) / s:6.1f} MB/s"
                      + (f"  requester CPU {used:5.2f} s ({100 * used / s:3.0f}%)"
                         if used is not None else "")
                      + (f"  sources {srcs}" if srcs else "")
                      + ("  bytes identical" if verify_now else ""), flush=True)

            o1 = orthancs[0]

            def straight():
                return movescu(o1.addr, DICOM, o1.aet, data.study_uid)

            for k in args.ks:
                peer = Peer(wd / f"peer{k}", name=f"north{k}", ae_title="NORTH",
                            destinations={DEST: f"127.0.0.1:{scp.port}"},
                            # K copies kept: each Orthanc's copy is one (with fewer,
                            # repair would drop the surplus copies from the catalog)
                            config={"storage": {"fsync": False},
                                    "cluster": {"replicas": k, "write_quorum": 1},
                                    "strategies": {"balancing": "work-stealing"},
                                    "archives": [{"name": f"orthanc{j}", "adapter": "orthanc",
                                                  "url": orthancs[j - 1].url}
                                                 for j in range(1, k + 1)]})
                peers.append(peer)
                peer.start()

                def crawled(peer=peer, k=k):
                    rows = get_json(f"{peer.admin_url}/where?study={data.study_uid}")
                    return len(rows) == count and all(len(r["replicas"]) == k for r in rows)
                wait_until(crawled, 300, f"peer K={k} crawled the study on {k} archive(s)")
                print(f"   peer K={k}: catalog holds {count} instances x {k} replicas "
                      f"(crawled)", flush=True)

                def through(peer=peer):
                    return movescu("127.0.0.1", peer.port, peer.ae_title, data.study_uid)
                label = f"peer K={k}"
                for rep in range(reps):
                    pair = [("orthanc", straight, None, None), (label, through, peer.pid, peer)]
                    if rep % 2:
                        pair.reverse()
                    for lab, mover, pid, p in pair:
                        timed(lab, mover, pid, verify_now=(lab not in results), peer=p)
                peer.stop()
                print(flush=True)
    finally:
        for p in peers:
            p.stop()
        for o in orthancs:
            o.stop()

    base = median(results["orthanc"])
    rows, verdicts = [], []
    for k in args.ks:
        label = f"peer K={k}"
        s = median(results[label])
        speed = base / s
        ok = speed >= TARGETS[k]
        verdicts.append(ok)
        c = median(cpu[label])
        rows.append([label, f"{mb(size) / base:.1f}", f"{mb(size) / s:.1f}", f"{speed:.2f}",
                     f">= {TARGETS[k]}", "meets" if ok else "MISSES",
                     f"{c:.2f} s ({100 * c / s:.0f}%)", spread.get(label, "")])
    print(table(rows, ["case", "orthanc MB/s", "peer MB/s", "speed-up", "target", "",
                       "requester CPU", "per archive (last run)"]))
    print(f"\n(orthanc: movescu straight to orthanc1 over its {RATE} Mbit/s link, median of "
          f"{len(results['orthanc'])}; peer: medians of {reps}; {mb(size):.1f} MB per C-MOVE)")
    return 0 if all(verdicts) else 1


def main() -> int:
    global RATE
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (3; 1 with --quick)")
    p.add_argument("--count", type=int, default=None,
                   help="instances in the study (300; 60 with --quick)")
    p.add_argument("--rate", type=int, default=RATE, help=f"Mbit/s of every link ({RATE})")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                   help="which K to run (1 2 3)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the peer during its first C-MOVE of each K")
    args = p.parse_args()
    RATE = args.rate
    if os.geteuid() != 0:
        print("needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    common.header("every archive a source: movescu -> ONE peer -> K Orthanc archives "
                  f"({RATE} Mbit/s links, network namespaces) -> storescp")
    net = Net()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with common.workdir(args.keep, "pacsp2p-bench-rarch-") as wd:
            return run(args, net, wd)
    finally:
        net.remove()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
