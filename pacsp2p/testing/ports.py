"""Loopback ports for tests: pick a free one, wait until one accepts connections."""
from __future__ import annotations

import os
import random
import socket
import time

LOOPBACK = "127.0.0.1"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are picked below the kernel's ephemeral range: a peer restarted on its port must
# find it free, and an outgoing connection's source port (taken from that range) could
# otherwise hold it meanwhile ("Address already in use").
_LOW, _HIGH = 20000, _ephemeral_low()


def _worker_range(low: int, high: int) -> tuple[int, int]:
    """Under pytest-xdist, worker gwK of N picks in the K-th of N slices of [low, high):
    two workers never hand out the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        k, n = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    except (KeyError, ValueError):
        return low, high
    if not 0 <= k < n:
        return low, high
    step = (high - low) // n
    return low + k * step, low + (k + 1) * step


# Ports handed out recently are not handed out again: a cluster writes the configs of its
# peers (their ports picked, not yet bound) before it starts them all at once.
_RECENT_S = 300.0
_recent: dict[int, float] = {}


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return *count* distinct ports free on *host* a moment ago (bound together while
    picking), chosen at random below the ephemeral range, none handed out in the last
    five minutes by this process."""
    now = time.monotonic()
    for port in [p for p, t in _recent.items() if now - t > _RECENT_S]:
        del _recent[port]
    low, high = _worker_range(_LOW, max(_HIGH, _LOW + 1000))
    socks: list[socket.socket] = []
    try:
        for _ in range(count * 200):               # bounded: ~12,000 candidates
            if len(socks) == count:
                break
            port = random.randrange(low, high)
            if port in _recent:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        if len(socks) < count:
            raise RuntimeError(f"no {count} free ports on {host} in {low}-{high}")
        ports = [s.getsockname()[1] for s in socks]
        _recent.update((p, now) for p in ports)
        return ports
    finally:
        for s in socks:
            s.close()


def free_block(width: int, host: str = LOOPBACK) -> int:
    """A base port whose *width* ports base .. base + width - 1 were all free on *host* a
    moment ago, at random below the ephemeral range (this worker's slice under xdist);
    they count as handed out now. (Ports handed out recently are not avoided: a wide
    block would rarely miss them all, and those of finished tests are free again.)"""
    now = time.monotonic()
    low, high = _worker_range(_LOW, max(_HIGH, _LOW + 1000))
    for _ in range(200):                           # bounded
        base = random.randrange(low, high - width)
        block = range(base, base + width)
        socks: list[socket.socket] = []
        try:
            for port in block:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        _recent.update((port, now) for port in block)
        return base
    raise RuntimeError(f"no {width} free ports in a row on {host} in {low}-{high}")


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on *host* a moment ago."""
    return free_ports(1, host)[0]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0, alive=None) -> None:
    """Wait (bounded by *timeout* seconds) until host:port accepts a TCP connection.

    *alive*, if given, is a callable checked each round; when it returns False the
    wait stops early with RuntimeError (the server died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"process serving {host}:{port} exited before listening")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s")
        time.sleep(0.05)
