#!/usr/bin/env python3
"""Parallel retrieval from replicas (Ribeiro, Costa & Oliveira 2012): C-MOVE of one CT
study (300 x 512x512x16-bit, ~157 MB) held by K = 1, 2, 3 archives, each behind its own
200 Mbit/s link, through

  work-stealing   a requester peer (no archive) with [strategies] balancing = "work-stealing"
  single          a requester peer (no archive) with balancing = "single" (one source,
                  like a plain archive: the baseline)

Set-up (root only; every namespace and veth is made here and removed on exit, Ctrl-C too):

  - three source peers ``src1..src3``, each ``twistd -n --pidfile= pacsp2p`` inside its own
    network namespace ``pp2p-<pid>-s<k>`` with an embedded archive, reachable from the root
    namespace over a veth pair (ns side 198.18.k.2/24, root side 198.18.k.1/24) shaped with
    ``tc tbf`` to 200 Mbit/s on both ends' egress; measured with a plain TCP stream first.
  - in the root namespace: the requesters and a storing peer (``archives = []``), overlay
    bound to 198.18.1.1 (the namespaces route 198.18.0.0/15 to their veth; the root
    namespace forwards between these veths only, ``net.ipv4.conf.<veth>.forwarding``, so
    sources reach each other over both their shaped links), facades on 127.0.0.1; the
    C-MOVE destination is a DCMTK ``storescp +xa --fork`` on 127.0.0.1.
  - three variants of the study (other Study/Series/SOP UIDs) are stored through the
    storing peer with ``[cluster] replicas = write_quorum = K`` while exactly K sources run
    (src1; then src1+src2; then all three), so variant K ends with every instance on the
    same K source archives (checked with ``GET /where?study=``).

Each repetition times DCMTK ``movescu`` (association, C-MOVE, all sub-operations, final
response) from each requester, checks all files arrived and their data set bytes
(``dataset_sha256``). Mixed case: the K=2 variant with src2's link re-shaped to 50 Mbit/s:
work stealing over 200+50 vs single (src1, the 200 Mbit/s link alone).

Targets: work-stealing / single >= 0.95 (K=1), >= 1.8 (K=2), >= 2.8 (K=3, issue 14); mixed > 1.0.

    sudo .venv/bin/python bench/retrieve_parallel.py [--quick] [--reps N] [--profile DIR]
                                                     [--cases K=3,mixed]
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, mb, median, table  # noqa: E402

from pacsp2p.overlay import tls  # noqa: E402
from pacsp2p.testing import Peer, StoreSCP  # noqa: E402
from pacsp2p.testing.dcmtk import dataset_sha256, storescu, wait_for_echo  # noqa: E402
from pacsp2p.testing.peer import twistd_path  # noqa: E402
from pacsp2p.testing.ports import free_ports  # noqa: E402
from pacsp2p.testing.procs import Process  # noqa: E402

DEST = "STORESCP"
RATE = 200              # Mbit/s of every source link
SLOW = 50               # Mbit/s of the slow link in the mixed case
ROOT_ADDR = "198.18.1.1"  # the root peers' overlay address (root side of link 1)
TARGETS = {1: 0.95, 2: 1.8, 3: 2.8}           # K=3: issue 14 (was 2.6)
CASES = ("K=1", "K=2", "K=3", "mixed")
IP, TC = shutil.which("ip") or "/usr/sbin/ip", shutil.which("tc") or "/usr/sbin/tc"
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"


def sh(*argv, check=True, timeout=30) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {proc.stderr.strip()}")
    return proc


# -- the network: namespaces, veth pairs, shaping ------------------------------------

class Net:
    """Namespaces pp2p-<pid>-s<k> and veths pp<pid>r<k>/pp<pid>n<k>, made and removed here."""

    def __init__(self):
        self.pid = os.getpid()
        self.namespaces: list[str] = []
        self.veths: list[str] = []

    def ns(self, k: int) -> str:
        return f"pp2p-{self.pid}-s{k}"

    def root_if(self, k: int) -> str:
        return f"pp{self.pid}r{k}"

    def ns_if(self, k: int) -> str:
        return f"pp{self.pid}n{k}"

    @staticmethod
    def ns_addr(k: int) -> str:
        return f"198.18.{k}.2"

    @staticmethod
    def root_addr(k: int) -> str:
        return f"198.18.{k}.1"

    def add(self, k: int) -> None:
        ns, r, n = self.ns(k), self.root_if(k), self.ns_if(k)
        sh(IP, "netns", "add", ns)
        self.namespaces.append(ns)
        sh(IP, "link", "add", r, "type", "veth", "peer", "name", n)
        self.veths.append(r)
        sh(IP, "link", "set", n, "netns", ns)
        sh(IP, "addr", "add", f"{self.root_addr(k)}/24", "dev", r)
        sh(IP, "link", "set", r, "up")
        # forward between this bench's own links only (the input device's setting decides;
        # the host's net.ipv4.ip_forward is left alone): sources reach each other through
        # the root namespace, over both their shaped links, as SWIM needs (every member
        # probes every other in turn; with no path between two sources each would suspect
        # the other and membership would flap)
        sh(SYSCTL, "-qw", f"net.ipv4.conf.{r}.forwarding=1")
        for cmd in (["link", "set", "lo", "up"],
                    ["addr", "add", f"{self.ns_addr(k)}/24", "dev", n],
                    ["link", "set", n, "up"],
                    ["route", "add", "198.18.0.0/15", "via", self.root_addr(k)]):
            sh(IP, "netns", "exec", ns, IP, *cmd)

    def shape(self, k: int, mbit: int) -> None:
        """tbf at *mbit* on both ends' egress of link *k* (replaces any earlier shaping)."""
        burst = max(64, mbit * 1000 // 8 // 250 * 2)          # kbytes: >= 2 ticks at HZ=250
        spec = ["root", "tbf", "rate", f"{mbit}mbit", "burst", f"{burst}kb",
                "latency", "50ms"]
        sh(TC, "qdisc", "replace", "dev", self.root_if(k), *spec)
        sh(IP, "netns", "exec", self.ns(k), TC, "qdisc", "replace", "dev", self.ns_if(k),
           *spec)

    def exec_argv(self, k: int) -> list[str]:
        return [IP, "netns", "exec", self.ns(k)]

    def remove(self) -> None:
        for ns in reversed(self.namespaces):
            sh(IP, "netns", "del", ns, check=False)
        for r in reversed(self.veths):          # gone with its peer end; make sure
            if sh(IP, "link", "show", r, check=False).returncode == 0:
                sh(IP, "link", "del", r, check=False)
        self.namespaces.clear()
        self.veths.clear()


def measure_link(net: Net, k: int, nbytes: int = 12_000_000) -> float:
    """Mbit/s of a plain TCP stream from namespace k to the root side (bounded)."""
    port = 5201
    server = ("import socket,sys\n"
              "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
              f"s.bind(('{net.ns_addr(k)}',{port}));s.listen(1);s.settimeout(20)\n"
              "c,_=s.accept();b=bytes(1<<16)\n"
              f"n={nbytes}\n"
              "while n>0:\n c.sendall(b[:min(n,len(b))]);n-=min(n,len(b))\n"
              "c.close()\n")
    proc = subprocess.Popen([*net.exec_argv(k), sys.executable, "-c", server],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = socket.create_connection((net.ns_addr(k), port), timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        got, t0 = 0, time.perf_counter()
        c.settimeout(20)
        with c:
            while got < nbytes:
                data = c.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        seconds = time.perf_counter() - t0
        return got * 8 / seconds / 1e6
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- peers ---------------------------------------------------------------------------

class NsPeer(Peer):
    """A source peer: twistd inside namespace k, every endpoint on its ns address."""

    def __init__(self, workdir: Path, net: Net, k: int, **kw):
        super().__init__(workdir, name=f"src{k}", ae_title=f"SRC{k}", port=11112, **kw)
        self.net, self.k = net, k
        self.admin_port = 11180


    def start(self) -> "NsPeer":
        self._fixed_port = True
        self.write_config()
        argv = [*self.net.exec_argv(self.k), twistd_path(), "-n", "--pidfile=", "pacsp2p",
                "--config", self.config_path]
        self.process = Process(argv, self.log_path, cwd=self.workdir).start()
        try:
            wait_for_echo(self.port, self.ae_title, host=self.net.ns_addr(self.k),
                          timeout=self.startup_timeout, alive=lambda: self.process.alive)
        except (RuntimeError, TimeoutError) as exc:
            self.process.stop(timeout=self.stop_timeout)
            raise RuntimeError(f"source {self.name} did not start: {exc}\n"
                               f"{self.process.log_tail(40)}") from None
        return self


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def alive_members(peer: Peer) -> set[str]:
    status = get_json(f"{peer.admin_url}/status")
    return {m["name"] for m in status["overlay"]["members"] if m["state"] == "alive"}


def wait_until(pred, timeout: float, what: str, interval: float = 0.25) -> float:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception as e:           # a peer briefly busy: keep polling (bounded)
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not true after {timeout:.0f} s" + (f" ({last!r})" if last
                                                                     else ""))


def placement(peer: Peer, study: str) -> tuple[int, list[int], set[tuple[str, str]]]:
    """(instances, replica counts per instance, distinct (peer, archive)) per /where."""
    rows = get_json(f"{peer.admin_url}/where?study={study}")
    where = {(r["peer"], r["archive"]) for row in rows for r in row["replicas"]}
    return len(rows), [len(row["replicas"]) for row in rows], where


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of *pid* (seconds), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# -- data ----------------------------------------------------------------------------

def variants(cache: Path, count: int) -> dict[int, common.DataSet]:
    """Variant K of the CT study: same pixels and sizes, its own Study/Series/SOP UIDs."""
    return {k: common._cached_study(cache, f"ct{count}x{common.CT_SIZE}-rp{k}",
                                    modality="CT", count=count, size=common.CT_SIZE,
                                    patient_id=f"BENCHRP{k}")
            for k in (1, 2, 3)}


def sop_of(path: Path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
               .SOPInstanceUID)


# -- the run -------------------------------------------------------------------------

def move(port: int, aec: str, study_uid: str) -> float:
    with Timer() as t:
        common.run_dcmtk("movescu", "-S", "-aet", "BENCHMOVE", "-aec", aec, "-aem", DEST,
                         "-to", "20", "-ta", "20", "-td", "300",
                         "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={study_uid}",
                         "127.0.0.1", port, timeout=900)
    return t.seconds


def clear(scp: StoreSCP) -> None:
    for f in scp.files():
        f.unlink()


def check_received(scp: StoreSCP, expected: dict[str, str], label: str) -> None:
    """Every instance arrived, data set bytes identical (sha256 after the file meta)."""
    files = scp.files()
    got = {}
    for f in files:
        uid = f.name.split(".", 1)[1] if "." in f.name else f.name
        got[uid] = dataset_sha256(f)
    missing = set(expected) - set(got)
    differ = [u for u in expected if u in got and got[u] != expected[u]]
    if missing or differ or len(files) != len(expected):
        raise RuntimeError(f"{label}: storescp received {len(files)} of {len(expected)} "
                           f"files, {len(missing)} missing, {len(differ)} with other bytes")


def retrieval_sources(peer: Peer) -> str:
    """Per-source completed/MB/s of the peer's latest retrieval (from /status)."""
    try:
        rs = get_json(f"{peer.admin_url}/status")["retrievals"]
    except Exception:
        return "?"
    if not rs:
        return "-"
    last = rs[-1]
    span = (f" fetched in {last['finished_at'] - last['started_at']:.2f} s"
            if last.get("finished_at") and last.get("started_at") else "")
    return " ".join(f"{n}:{s['completed']}@{s['MB_per_s']}"
                    for n, s in sorted(last["sources"].items())) + \
        (f" rescued {last['rescued']}" if last.get("rescued") else "") + \
        (f" {last['duplicates']} second copies" if last.get("duplicates") else "") + span


def run(args, net: Net, wd: Path) -> int:
    count = args.count or (60 if args.quick else common.CT_COUNT)
    reps = args.reps or (1 if args.quick else 3)
    wanted = set(args.cases.split(","))
    if not wanted <= set(CASES):
        raise SystemExit(f"--cases: choose among {', '.join(CASES)}")
    needed = {int(c[2:]) for c in wanted if c.startswith("K=")} | \
        ({2} if "mixed" in wanted else set())       # the variants to store
    data = variants(args.cache, count)
    size = data[1].bytes
    print(f"-- study: {count} x CT 512x512x16-bit, {mb(size):.1f} MB per variant; "
          f"{reps} rep(s)")
    expected = {}
    for k, ds in data.items():
        expected[k] = {sop_of(f): dataset_sha256(f) for f in ds.files}

    ca, tls_dir = wd / "ca", wd / "tls"
    tls.init_ca(ca)
    names = ["src1", "src2", "src3", "storer", "reqws", "reqsingle"]
    for name in names:
        tls.issue(ca, name, out=tls_dir)

    for k in (1, 2, 3):
        net.add(k)
        net.shape(k, RATE)
    for k in (1, 2, 3):
        rate = measure_link(net, k)
        print(f"   link {k}: shaped {RATE} Mbit/s, measured {rate:.0f} Mbit/s (TCP, ns -> root)")

    root_ports = {n: free_ports(2, host=ROOT_ADDR) for n in ("storer", "reqws", "reqsingle")}
    root_seed = {n: [f"{net.root_addr(k)}:{root_ports[n][0]}" for k in (1, 2, 3)]
                 for n in root_ports}
    overlay_common = {"tls_dir": str(tls_dir), "heartbeat": 0.5}

    sources: dict[int, NsPeer] = {}
    peers: list[Peer] = []

    def start_source(k: int) -> NsPeer:
        a = net.ns_addr(k)
        p = NsPeer(wd / f"src{k}", net, k, config={
            # the admin endpoint stays on loopback (the namespace's own): never read here
            "facade": {"bind": a}, "admin": {"bind": "127.0.0.1"},
            "storage": {"fsync": False},
            # the holders' repair keeps `replicas` copies per instance and drops surplus
            # ones: at the default 2, variant 3's third copies went while the bench ran
            # (single then read 191 + 109 instances from two sources)
            "cluster": {"replicas": 3},
            "overlay": {**overlay_common, "port": 11114, "bulk_port": 11115, "bind": a,
                        "advertise": a,
                        # the root peers as seen from this namespace
                        "seeds": [f"{net.root_addr(k)}:{root_ports[n][0]}"
                                  for n in root_ports]}})
        peers.append(p)
        sources[k] = p
        return p.start()

    def root_peer(name: str, ae: str, extra: dict, destinations=None) -> Peer:
        port, bulk = root_ports[name]
        p = Peer(wd / name, name=name, ae_title=ae, destinations=destinations or {},
                 config={"archives": [],
                         "overlay": {**overlay_common, "port": port, "bulk_port": bulk,
                                     "bind": ROOT_ADDR, "advertise": ROOT_ADDR,
                                     "seeds": [f"{net.ns_addr(k)}:11114" for k in (1, 2, 3)]},
                         **extra})
        peers.append(p)
        return p

    try:
        # -- store variant K while exactly sources 1..K run, with R = quorum = K ----------
        storer = None
        for k in (1, 2, 3):
            start_source(k)
            if k not in needed:
                continue
            cfg = {"cluster": {"replicas": k, "write_quorum": k}}
            if storer is None:
                storer = root_peer("storer", "STORER", cfg).start()
            else:
                storer.overrides.update(cfg)
                storer.restart()
            want = {f"src{j}" for j in range(1, k + 1)}
            wait_until(lambda: want <= alive_members(storer), 60,
                       f"storer sees {sorted(want)} alive")
            with Timer() as t:
                storescu(storer.port, storer.ae_title, [data[k].directory], timeout=900)
            print(f"   variant {k}: stored {count} instances with R={k} on {sorted(want)} "
                  f"in {t.seconds:.1f} s (not timed)", flush=True)

        with StoreSCP(wd / "dest", ae_title=DEST, fork=True,
                      log_path=wd / "storescp.log") as scp:
            dests = {DEST: f"127.0.0.1:{scp.port}"}
            reqs = {"work-stealing": root_peer("reqws", "REQWS", {
                        "strategies": {"balancing": "work-stealing"}}, dests).start(),
                    "single": root_peer("reqsingle", "REQSINGLE", {
                        "strategies": {"balancing": "single"}}, dests).start()}
            allsrc = {"src1", "src2", "src3"}
            for label, req in reqs.items():
                wait_until(lambda: allsrc <= alive_members(req), 60,
                           f"{label} requester sees all sources alive")
            # every requester knows each variant on exactly K archives, K per instance
            for k in sorted(needed):
                for label, req in reqs.items():
                    def placed(req=req, k=k):
                        n, per, where = placement(req, data[k].study_uid)
                        return n == count and set(per) == {k} and len(where) == k
                    wait_until(placed, 120, f"{label}: variant {k} on {k} archives")
                n, per, where = placement(reqs["single"], data[k].study_uid)
                print(f"   variant {k}: {n} instances x {k} replicas on "
                      f"{', '.join(f'{p}/{a}' for p, a in sorted(where))}")
            storer.stop()                          # not needed any more: spare its CPU
            print(flush=True)

            results: dict[str, dict[str, list[float]]] = {}
            cpu: dict[str, dict[str, list[float]]] = {}

            def timed(case: str, k: int, label: str, rep: int, verify: bool):
                req = reqs[label]
                clear(scp)
                pids = {"req": req.pid, **{f"src{j}": sources[j].pid for j in sources}}
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                prof = args.profile if (args.profile and rep == 0) else None
                with common.profiled(req.pid if prof else None, prof,
                                     f"{case}-{label}"):
                    s = move(req.port, req.ae_title, data[k].study_uid)
                used = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
                got = len(scp.files())
                if got != count:
                    raise RuntimeError(f"{case} {label}: storescp received {got} of {count}"
                                       f"\n{req.log_tail(30)}")
                if verify:
                    check_received(scp, expected[k], f"{case} {label}")
                results.setdefault(case, {}).setdefault(label, []).append(s)
                cpu.setdefault(case, {}).setdefault(label, []).append(used["req"] / s)
                srcs = retrieval_sources(req)
                print(f"   {case:7s} {label:13s} rep {rep + 1}: {s:6.2f} s "
                      f"{mb(size) / s:6.1f} MB/s  requester CPU {100 * used['req'] / s:3.0f}% "
                      f"({used['req']:.2f} s)"
                      f"  sources {srcs} (CPU "
                      + " ".join(f"{100 * used[n] / s:.0f}%" for n in sorted(used) if n != "req")
                      + f"){'  bytes identical' if verify else ''}",
                      flush=True)

            cases = [(f"K={k}", k) for k in (1, 2, 3) if f"K={k}" in wanted]
            for case, k in cases:
                for rep in range(reps):
                    order = list(reqs) if rep % 2 == 0 else list(reversed(reqs))
                    for label in order:
                        timed(case, k, label, rep, verify=(rep == 0))
            # mixed: variant 2 (src1 + src2) with src2's link at 50 Mbit/s
            if "mixed" in wanted:
                net.shape(2, SLOW)
                print(f"   link 2 re-shaped to {SLOW} Mbit/s: measured "
                      f"{measure_link(net, 2, 4_000_000):.0f} Mbit/s", flush=True)
                try:
                    for rep in range(reps):
                        order = list(reqs) if rep % 2 == 0 else list(reversed(reqs))
                        for label in order:
                            timed("mixed", 2, label, rep, verify=(rep == 0))
                finally:
                    net.shape(2, RATE)
            clear(scp)
    finally:
        for p in reversed(peers):
            p.stop()
        if args.keep:
            print("   peer logs: " + ", ".join(str(p.log_path) for p in peers))

    print()
    rows = []
    verdicts = []
    for case in list(results):
        ws, single = median(results[case]["work-stealing"]), median(results[case]["single"])
        speed = single / ws
        target = TARGETS.get(int(case[2:])) if case.startswith("K=") else 1.0
        ok = speed >= target if case.startswith("K=") else speed > target
        verdicts.append(ok)
        rows.append([case, f"{mb(size) / single:.1f}", f"{mb(size) / ws:.1f}",
                     f"{speed:.2f}", (">= " if case.startswith("K=") else "> ") + f"{target}",
                     "meets" if ok else "MISSES",
                     f"{100 * median(cpu[case]['work-stealing']):.0f}%"])
    print(table(rows, ["case", "single MB/s", "work-stealing MB/s", "speed-up", "target",
                       "", "req CPU (ws)"]))
    print(f"\n(mixed: src1 at {RATE} Mbit/s + src2 at {SLOW} Mbit/s; single = src1 alone; "
          f"medians of {reps}; {mb(size):.1f} MB per C-MOVE)")
    return 0 if all(verdicts) else 1


def main() -> int:
    global RATE
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (3; 1 with --quick)")
    p.add_argument("--count", type=int, default=None,
                   help="instances in the study (300; 60 with --quick)")
    p.add_argument("--rate", type=int, default=RATE,
                   help=f"Mbit/s of every source link ({RATE}); e.g. 2000 to find the "
                        "requester's own ceiling")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy record the requester during the first run of each case")
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated cases to run (each against single), e.g. K=3; "
                        "only the variants they read are stored (default: all)")
    args = p.parse_args()
    RATE = args.rate
    if os.geteuid() != 0:
        print("needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    common.header("parallel retrieval: movescu -> requester peer -> K source peers "
                  f"({RATE} Mbit/s links, network namespaces) -> storescp")
    net = Net()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with common.workdir(args.keep, "pacsp2p-bench-rpar-") as wd:
            return run(args, net, wd)
    finally:
        net.remove()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
