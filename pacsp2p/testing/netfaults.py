"""Network faults between real peers: each peer (a twistd process) in a network namespace
of its own, the namespaces joined by a router namespace, every address in 198.18.0.0/15
(RFC 2544); loss, delay, jitter and partitions between peers by ``netem.py`` (a TUN
device in the router: this kernel has no sch_netem), bandwidth by ``tc tbf``.

    with Net(3) as net:                        # namespaces made; removed on exit
        cluster = NsCluster(tmp_path, net).start()
        net.faults([{"src": [net.addr(1)], "loss": 1.0}])   # peer 1 cannot speak
        net.faults([])                                       # healed

Peer *k* is at ``net.addr(k)`` (its facade on port 11112, overlay 11114/11115); this
namespace reaches every peer through ``198.18.<n>.0/24 via`` the router. A peer's admin
endpoint stays on its own loopback: read it with ``NsCluster.get_json`` (curl in the
namespace). Needs root. Only what is made here is removed, namespaces and all.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pacsp2p.overlay import tls

from . import toml
from .cluster import HEARTBEAT, patience, peer_names, wait_until
from .dcmtk import wait_for_echo
from .peer import SPAWNED, Peer
from .procs import Process

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
CURL = shutil.which("curl") or "/usr/bin/curl"
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"
FACADE, ADMIN, OVERLAY, BULK = 11112, 11180, 11114, 11115
TABLE = 117                     # the router's routing table "through netem"


def sh(*argv, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: {proc.stderr.strip()}")
    return proc


class Net:
    """A router namespace, *n* peer namespaces linked to it, and a link from here."""

    def __init__(self, n: int, workdir: Path):
        self.n, self.workdir = n, Path(workdir)
        self.tag = secrets.token_hex(2)
        used = sh(IP, "-4", "-o", "addr", "show").stdout
        free = [s for s in range(2, 250) if f" 198.19.{s}." not in used
                and f" 198.19.{s + 1}." not in used]
        self.subnet = random.choice(free)      # 198.19.<s>.0/24: peers; <s+1>: this side
        self.router = f"pp2p-{self.tag}-r"
        self.made: list[str] = []
        self.emulator: Process | None = None
        self.control = self.workdir / "netem.json"
        self.active = False

    # names and addresses
    def ns(self, k: int) -> str:
        return f"pp2p-{self.tag}-{k}"

    def addr(self, k: int) -> str:
        return f"198.19.{self.subnet}.{10 + k}"

    def _rif(self, k: int) -> str:         # router side of peer k's link
        return f"pf{self.tag}r{k}"

    def exec_argv(self, k: int) -> list[str]:
        return [IP, "netns", "exec", self.ns(k)]

    def __enter__(self) -> "Net":
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _make(self) -> None:
        r, s = self.router, self.subnet
        self.workdir.mkdir(parents=True, exist_ok=True)
        sh(IP, "netns", "add", r)
        self.made.append(r)
        rx = [IP, "netns", "exec", r]
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0"):
            sh(*rx, SYSCTL, "-qw", key)
        sh(*rx, IP, "link", "set", "lo", "up")
        # this namespace <-> the router: 198.19.<s+1>.1 here, .2 there
        here, there = f"pf{self.tag}h", f"pf{self.tag}x"
        sh(IP, "link", "add", here, "type", "veth", "peer", "name", there)
        self.made.append(here)
        sh(IP, "link", "set", there, "netns", r)
        sh(IP, "addr", "add", f"198.19.{s + 1}.1/24", "dev", here)
        sh(IP, "link", "set", here, "up")
        sh(*rx, IP, "addr", "add", f"198.19.{s + 1}.2/24", "dev", there)
        sh(*rx, IP, "link", "set", there, "up")
        sh(IP, "route", "add", f"198.19.{s}.0/24", "via", f"198.19.{s + 1}.2")
        # the router routes between the peers: a veth to each peer namespace
        for k in range(self.n):
            ns, rif, nif = self.ns(k), self._rif(k), f"pf{self.tag}n{k}"
            sh(IP, "netns", "add", ns)
            self.made.append(ns)
            sh(*rx, IP, "link", "add", rif, "type", "veth", "peer", "name", nif)
            sh(*rx, IP, "link", "set", nif, "netns", ns)
            nx = self.exec_argv(k)
            sh(*nx, IP, "link", "set", "lo", "up")
            sh(*nx, IP, "addr", "add", f"{self.addr(k)}/32", "dev", nif)
            sh(*nx, IP, "link", "set", nif, "up")
            sh(*nx, IP, "route", "add", f"198.19.{s}.1", "dev", nif)
            sh(*nx, IP, "route", "add", "default", "via", f"198.19.{s}.1")
            sh(*rx, IP, "link", "set", rif, "up")
            sh(*rx, IP, "addr", "add", f"198.19.{s}.1/32", "dev", rif)
            sh(*rx, IP, "route", "add", f"{self.addr(k)}/32", "dev", rif)
            sh(*rx, SYSCTL, "-qw", f"net.ipv4.conf.{rif}.rp_filter=0")
        # netem's TUN device, and its table (used only while a fault is on)
        tun = f"pf{self.tag}t"
        sh(*rx, IP, "tuntap", "add", "dev", tun, "mode", "tun")
        sh(*rx, IP, "link", "set", tun, "up")
        sh(*rx, SYSCTL, "-qw", f"net.ipv4.conf.{tun}.rp_filter=0")
        sh(*rx, IP, "route", "add", "default", "dev", tun, "table", TABLE)
        self.control.write_text(json.dumps({"rules": []}))
        self.emulator = Process([*rx, sys.executable, "-m", "pacsp2p.testing.netem",
                                 "--tun", tun, "--control", self.control,
                                 "--duration", 3600], self.workdir / "netem.log").start()

    def faults(self, rules: list[dict]) -> None:
        """Apply netem *rules* (``netem.py``) to the packets between peers; [] heals."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": rules}))
        os.replace(tmp, self.control)
        rx = [IP, "netns", "exec", self.router]
        if rules and not self.active:
            for k in range(self.n):
                sh(*rx, IP, "rule", "add", "iif", self._rif(k), "lookup", TABLE,
                   "pref", 100 + k)
            self.active = True
        elif not rules and self.active:
            time.sleep(0.5)               # what netem holds goes out first
            for k in range(self.n):
                sh(*rx, IP, "rule", "del", "pref", 100 + k, check=False)
            self.active = False

    def bandwidth(self, k: int, mbit: float | None) -> None:
        """Peer *k*'s link cut to *mbit* each way (tbf); None: as before."""
        nif = f"pf{self.tag}n{k}"
        for argv, dev in (([IP, "netns", "exec", self.router], self._rif(k)),
                          (self.exec_argv(k), nif)):
            if mbit is None:
                sh(*argv, TC, "qdisc", "del", "dev", dev, "root", check=False)
            else:
                sh(*argv, TC, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                   f"{mbit}mbit", "burst", "32kb", "latency", "400ms")

    def remove(self) -> None:
        if self.emulator is not None:
            self.emulator.stop(timeout=5)
            self.emulator = None
        for name in reversed(self.made):
            if name.startswith("pp2p-"):
                sh(IP, "netns", "del", name, check=False)
            else:
                sh(IP, "link", "del", name, check=False)
        if self.made:
            sh(IP, "route", "del", f"198.19.{self.subnet}.0/24", check=False)
        self.made.clear()


class NsPeer(Peer):
    """A peer whose twistd runs in namespace *k* of *net*; its facade reached at
    ``net.addr(k)``, its admin endpoint on the namespace's loopback."""

    def __init__(self, workdir: Path, net: Net, k: int, **kw):
        super().__init__(workdir, port=FACADE, **kw)
        self.net, self.k, self.host = net, k, net.addr(k)
        self.admin_port = ADMIN

    def spawn(self) -> "NsPeer":
        self.write_config()
        argv = [*self.net.exec_argv(self.k), self.twistd, "-n", "--pidfile=", "pacsp2p",
                "--config", self.config_path]
        self.process = Process(argv, self.log_path, cwd=self.workdir).start()
        SPAWNED[self.log_path] = self.name
        return self

    def start(self) -> "NsPeer":
        self.spawn()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_for_echo(self.port, self.ae_title, host=self.host,
                      timeout=patience(self.startup_timeout), alive=lambda: self.process.alive)

    def get_json(self, what: str = "status", timeout: float = 60.0):
        """GET /<what> from the admin endpoint (curl in the peer's namespace)."""
        proc = subprocess.run([*self.net.exec_argv(self.k), CURL, "-sfS", "--max-time",
                               str(timeout), f"http://127.0.0.1:{ADMIN}/{what}"],
                              capture_output=True, text=True, timeout=timeout + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} /{what}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    def members(self) -> dict[str, str]:
        return {m["name"]: m["state"] for m in self.get_json()["overlay"]["members"]}


class NsCluster:
    """Peers peera.. one per namespace of *net*, sharing a CA under *root*."""

    def __init__(self, root: Path, net: Net, config: dict | None = None,
                 overlay: dict | None = None):
        """*overlay*: [overlay] keys over the ones set here (e.g. a WAN's heartbeat)."""
        self.root, self.net, self.config = Path(root), net, dict(config or {})
        self.overlay = dict(overlay or {})
        self.ca_dir, self.tls_dir = self.root / "ca", self.root / "tls"
        tls.init_ca(self.ca_dir)
        self.peers: list[NsPeer] = []

    def __getitem__(self, i: int) -> NsPeer:
        return self.peers[i]

    def __iter__(self):
        return iter(self.peers)

    def start(self, per_peer: dict | None = None) -> "NsCluster":
        for k, name in enumerate(peer_names(self.net.n)):
            tls.issue(self.ca_dir, name, out=self.tls_dir)
            overlay = {"port": OVERLAY, "bulk_port": BULK, "bind": "0.0.0.0",
                       "advertise": self.net.addr(k), "heartbeat": HEARTBEAT,
                       "tls_dir": str(self.tls_dir),
                       "seeds": [f"{self.net.addr(j)}:{OVERLAY}" for j in range(k)],
                       **self.overlay}
            peer = NsPeer(self.root / name, self.net, k, name=name, ae_title=name.upper(),
                          config=toml.deep_merge(toml.deep_merge(
                              self.config, (per_peer or {}).get(name, {})),
                              {"overlay": overlay, "facade": {"bind": "0.0.0.0"}}))
            self.peers.append(peer)
        for peer in self.peers:
            peer.spawn()
        for peer in self.peers:
            peer.wait_ready()
        return self

    def wait_mesh(self, timeout: float = 30.0) -> float:
        names = {p.name for p in self.peers}

        def meshed():
            return all(all(p.members().get(n) == "alive" for n in names - {p.name})
                       for p in self.peers)
        return wait_until(meshed, timeout, interval=0.5, what="full mesh")

    def stop(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()
