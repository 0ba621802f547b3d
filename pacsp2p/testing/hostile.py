"""A hostile DICOM client as a process of its own (for a network namespace of a test).

    python -m pacsp2p.testing.hostile --host 198.18.7.1 --port 11112 --silent 200 \\
        --status status.json --stop stop-file [--stores 10 --canary DIR --objects DIR]

- keeps *silent* TCP connections open to host:port that never send a byte; each one the
  peer closes is opened again (the lock-out attack of issue 11), at most
  *reconnect_rate* times a second and *max_reconnects* times in all;
- sends *stores* C-STOREs whose SOP Instance UIDs are path-like (absolute, or ``../``
  out of the archive, all pointing into *canary*; see ``fuzz.Canary``), one association
  each, half of them before the silent connections are opened and half while they are
  held, and records the statuses;
- writes its counts to *status* (JSON) every second and when it ends: when the file
  *stop* appears, after *duration* seconds, or on SIGTERM.

Every loop is bounded in count and time; every socket operation has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import socket
import threading
import time
from pathlib import Path

from pacsp2p.testing import fuzz


class Silent:
    """*n* connections that say nothing; reopened when the peer closes them."""

    def __init__(self, host: str, port: int, n: int, max_reconnects: int,
                 reconnect_rate: float = 200.0):
        self.host, self.port, self.n = host, port, n
        self.max_reconnects = max_reconnects
        self.pause = 1.0 / reconnect_rate if reconnect_rate > 0 else 0.0
        self.sel = selectors.DefaultSelector()
        self.open = 0
        self.opened = 0              # connects that succeeded
        self.closed_by_peer = 0
        self.connect_failures = 0
        self.max_open = 0
        self.first_all_open: float | None = None

    def _connect(self) -> bool:
        try:
            s = socket.create_connection((self.host, self.port), timeout=10)
        except OSError:
            self.connect_failures += 1
            return False
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.open += 1
        self.opened += 1
        self.max_open = max(self.max_open, self.open)
        return True

    def fill(self, deadline: float) -> None:
        """Open connections until there are *n* (bounded by reconnects and *deadline*)."""
        while self.open < self.n and time.monotonic() < deadline and \
                self.opened + self.connect_failures < self.n + self.max_reconnects:
            if not self._connect():
                time.sleep(0.05)
            elif self.opened > self.n and self.pause:
                time.sleep(self.pause)         # a reconnect: at most reconnect_rate/s
        if self.open >= self.n and self.first_all_open is None:
            self.first_all_open = time.monotonic()

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:                       # closed (or aborted) by the peer
                self.sel.unregister(s)
                s.close()
                self.open -= 1
                self.closed_by_peer += 1

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def path_stores(host: str, port: int, called: str, canary: fuzz.Canary, n: int,
                seed: int, results: list, first: int = 0) -> None:
    """C-STOREs number *first* .. *first* + *n* - 1 with path-like UIDs, one association
    each; *results* get {"uid", "outcome", "statuses", "violation"}."""
    for i in range(first, first + n):
        rng = random.Random(f"{seed}/store/{i}")
        uid = canary.uid(rng, f"ns{i}")
        case = fuzz.Case(i, "store_path_uid", wait=120.0, finals=1, must_fail=True)
        case.send(fuzz.associate_rq(called, "NSHOSTILE") + fuzz.message(
            fuzz.CX_CT, fuzz.c_store(1, fuzz.CT, uid), fuzz.instance(uid, fuzz.CT)))
        r = fuzz.send_case(host, port, case, connect_timeout=60, io_timeout=60)
        results.append({"uid": uid, "outcome": r.outcome, "statuses": r.statuses,
                        "violation": r.violation})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--called", default="PACSP2P")
    p.add_argument("--silent", type=int, default=200)
    p.add_argument("--max-reconnects", type=int, default=50_000)
    p.add_argument("--reconnect-rate", type=float, default=200.0,
                   help="reconnects per second at most (default 200)")
    p.add_argument("--stores", type=int, default=0)
    p.add_argument("--canary", type=Path)
    p.add_argument("--objects", type=Path, default=Path("/nonexistent/objects"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--stop", type=Path, required=True)
    p.add_argument("--duration", type=float, default=600.0)
    args = p.parse_args(argv)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    t0 = time.monotonic()
    end = t0 + args.duration
    silent = Silent(args.host, args.port, args.silent, args.max_reconnects,
                    args.reconnect_rate)
    canary = fuzz.Canary(args.canary, args.objects) if args.canary else None
    results: list = []
    storer = None
    before = args.stores // 2               # half before the flood, half during it
    if args.stores and canary is not None:
        storer = threading.Thread(target=path_stores, daemon=True, args=(
            args.host, args.port, args.called, canary, args.stores - before, args.seed,
            results, before))

    def write_status(final: bool = False) -> None:
        status = {
            "pid": os.getpid(), "seconds": round(time.monotonic() - t0, 1),
            "open": silent.open, "max_open": silent.max_open, "opened": silent.opened,
            "closed_by_peer": silent.closed_by_peer,
            "connect_failures": silent.connect_failures,
            "all_open_after": None if silent.first_all_open is None
            else round(silent.first_all_open - t0, 2),
            "stores": list(results), "stores_done": storer is None or not storer.is_alive(),
            "path_uids": canary.tried if canary else [], "final": final,
        }
        tmp = args.status.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, args.status)

    try:
        if storer is not None:
            path_stores(args.host, args.port, args.called, canary, before, args.seed,
                        results)
        silent.fill(min(end, time.monotonic() + 120))
        if storer is not None:
            storer.start()
        last = 0.0
        while not stopping.is_set() and time.monotonic() < end and not args.stop.exists():
            silent.poll(0.2)
            silent.fill(min(end, time.monotonic() + 1.0))
            if time.monotonic() - last >= 1.0:
                write_status()
                last = time.monotonic()
        if storer is not None:
            storer.join(timeout=max(0.0, min(120.0, end - time.monotonic())))
    finally:
        silent.close()
        write_status(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
