"""Loopback ports for tests: pick a free one, wait until one accepts connections."""
from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on *host* a moment ago (bind port 0, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return *count* distinct free ports (all held open together while picking)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
