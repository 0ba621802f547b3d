"""``pacsp2p demo``: a local cluster of N peers (1-64) in one command.

Creates a cluster CA and N peer configs under a directory (each peer with an embedded
archive), then runs the peers as separate ``twistd`` processes until Ctrl-C. Peer *i*
(0-based) gets facade port base + 10*i (AE title PEERA, PEERB, ..., PEERZ, PEERAA, ...),
overlay port base + 2 + 10*i, bulk port base + 3 + 10*i and status port base + 4 + 10*i,
all on 127.0.0.1; the C-MOVE destination STORESCP = 127.0.0.1:base + 1 is preset. The
base is 11112 by default.

Every port must lie below the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``):
there, peers started at once could find their ports taken by each other's outgoing
connections. Before any peer starts, each port the configs name is checked (outside the
ephemeral range, free on 127.0.0.1); one that is not stops the demo with a line saying
which port, which peer and what to change.

A peer that exits while the demo runs (it could not start, or it died) ends the demo:
its last log lines are printed, the other peers are stopped, and the demo exits with
status 1 — a cluster with a peer missing is not the demo the user asked for.
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pacsp2p import config
from pacsp2p.overlay import tls

BASE = 11112
MAX_PEERS = 64
TAIL_LINES = 20              # of a failing peer's log, printed
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class PortError(SystemExit):
    """A port of the demo cannot be used; the message says which and what to change."""


def peer_names(n: int) -> list[str]:
    """peera .. peerz, then peeraa, peerab, ...: a name per peer, also its AE title."""
    def letters(i: int) -> str:
        out = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            out = chr(ord("a") + r) + out
        return out
    return [f"peer{letters(i)}" for i in range(n)]


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default if unknown)."""
    try:
        lo, hi = (int(x) for x in path.read_text().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


@dataclass(frozen=True)
class PeerPorts:
    name: str
    config: Path
    facade: int
    overlay: int | None
    bulk: int | None
    admin: int

    def named(self):
        yield "facade.port", self.facade
        if self.overlay is not None:
            yield "overlay.port", self.overlay
            yield "overlay.bulk_port", self.bulk
        yield "admin.port", self.admin


def ports_of(configs: list[Path]) -> list[PeerPorts]:
    """The ports each config names (a config edited by hand counts as it is)."""
    out = []
    for path in configs:
        s = config.load(path)
        ov = s.overlay
        out.append(PeerPorts(s.peer.name, path, s.facade.port,
                             ov.port if ov is not None else None,
                             ov.bulk_port if ov is not None else None, s.admin.port))
    return out


def check_ports(peers: list[PeerPorts], extra: int | None = None,
                ephemeral: tuple[int, int] | None = None, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortError` unless every port is below the ephemeral range (or above
    it), unprivileged, and free on *host* now. *extra*: the STORESCP destination port,
    which must not be in the ephemeral range either (it is not bound by the demo)."""
    lo, hi = ephemeral or ephemeral_range()
    hint = (f"choose --base-port so that every port (base .. base + "
            f"{last_port(0, len(peers))}) lies in 1024-{lo - 1}")
    named = [(p, key, port) for p in peers for key, port in p.named()]
    for p, key, port in named:
        if port < 1024:
            raise PortError(f"pacsp2p: {p.name}: {key} {port} is a privileged port; {hint}")
        if lo <= port <= hi:
            raise PortError(
                f"pacsp2p: {p.name}: {key} {port} lies in the ephemeral port range "
                f"{lo}-{hi} (outgoing connections take ports there); {hint}")
    if extra is not None and lo <= extra <= hi:
        raise PortError(f"pacsp2p: the STORESCP destination port {extra} lies in the "
                        f"ephemeral port range {lo}-{hi}; {hint}")
    seen: dict[int, str] = {}
    for p, key, port in named:
        if port in seen:
            raise PortError(f"pacsp2p: {p.name}: {key} {port} is also {seen[port]} "
                            f"(see {p.config})")
        seen[port] = f"{key} of {p.name}"
    for p, key, port in named:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as twistd binds it
        try:
            s.bind((host, port))
            s.listen()
        except OSError as e:
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise PortError(f"pacsp2p: {p.name}: {key} {port} on {host} is {why} (another "
                            f"demo or program?); stop it or {hint}") from None
        finally:
            s.close()


def last_port(base: int, n: int) -> int:
    """The highest port *n* peers from *base* use (the status port of the last one)."""
    return base + 10 * (n - 1) + 4


def plan_base(n: int, base: int | None = None,
              ephemeral: tuple[int, int] | None = None) -> int:
    """The facade port of the first peer: *base* if given, else 11112 when the ports of
    all *n* peers lie below the ephemeral range, else the highest base (ending in 2, as
    11112 does) for which they do."""
    if base is not None:
        return base
    lo, _ = ephemeral or ephemeral_range()
    if last_port(BASE, n) < lo:
        return BASE
    b = lo - 1 - (last_port(0, n))
    b -= (b - 2) % 10
    if b < 1024:
        raise PortError(f"pacsp2p: {n} peers need {last_port(0, n) + 1} ports below the "
                        f"ephemeral port range (from {lo}); there are not enough above 1023")
    return b


def peer_config(i: int, n: int, tls_dir: str = "tls", first: int = BASE) -> str:
    name = peer_names(n)[i]
    base = first + 10 * i
    return f'''# pacsp2p demo cluster: peer {i + 1} of {n} ({name}).
# Start:  twistd -n --pidfile= pacsp2p --config {name}.toml

[peer]
name = "{name}"                  # must equal the common name of tls/{name}.crt
data_dir = "{name}-data"

[facade]
ae_title = "{name.upper()}"
port = {base}
bind = "127.0.0.1"

[destinations]
STORESCP = "127.0.0.1:{first + 1}"

[overlay]
port = {base + 2}                     # AMP control links (mutual TLS)
bulk_port = {base + 3}                # HTTPS bulk channel (same certificates)
bind = "127.0.0.1"
advertise = "127.0.0.1"          # the address other peers dial
seeds = ["127.0.0.1:{first + 2}"]      # any one live peer is enough to join
tls_dir = "{tls_dir}"                # ca.crt, {name}.crt, {name}.key

[admin]
port = {base + 4}
'''


def write_cluster(directory: Path, n: int, first: int = BASE) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tls_dir = directory / "tls"
    if not (tls_dir / "ca.key").exists():
        tls.init_ca(tls_dir)
    configs = []
    for i, name in enumerate(peer_names(n)):
        if not (tls_dir / f"{name}.crt").exists():
            tls.issue(tls_dir, name)
        path = directory / f"{name}.toml"
        if not path.exists():                   # a config edited by hand is kept
            path.write_text(peer_config(i, n, first=first))
        configs.append(path)
    return configs


def run(directory: Path, n: int, first: int | None = None) -> int:
    if not 1 <= n <= MAX_PEERS:
        raise SystemExit(f"pacsp2p: --peers must be 1-{MAX_PEERS}")
    first = plan_base(n, first)
    configs = write_cluster(directory, n, first)
    peers = ports_of(configs)
    check_ports(peers, extra=first + 1)
    twistd = Path(sys.executable).parent / "twistd"
    procs = []
    for path in configs:
        log = open(path.with_suffix(".log"), "ab")
        procs.append(subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "pacsp2p", "--config", path.name],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT))
    for peer, proc in zip(peers, procs):
        print(f"{peer.name}: facade {peer.name.upper()} at 127.0.0.1:{peer.facade}, "
              f"config {peer.config}, log {peer.config.with_suffix('.log')}, pid {proc.pid}",
              flush=True)
    print(f"C-MOVE destination STORESCP = 127.0.0.1:{first + 1}. Ctrl-C stops the cluster.",
          flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    # Ctrl-C stops the cluster even when this process was started with SIGINT ignored
    # (a background job of a script: Python then raises no KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    failed = None
    try:
        while not stopping and failed is None:
            for peer, proc in zip(peers, procs):
                if proc.poll() is not None:
                    failed = peer
                    _report_failure(peer, proc)
                    break
            else:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    if failed is not None and any(p.poll() is None for p in procs):
        print("stopping the other peers", flush=True)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 1 if failed is not None else 0


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last *lines* lines of *path* (read from its end, whatever its size)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return [f"(cannot read {path}: {e.strerror})"]
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def _report_failure(peer: PeerPorts, proc) -> None:
    log = peer.config.with_suffix(".log")
    print(f"{peer.name} exited with status {proc.returncode}; the last lines of {log}:",
          flush=True)
    for line in log_tail(log):
        print(f"  {line}", flush=True)
