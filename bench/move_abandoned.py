#!/usr/bin/env python3
"""Connections requestors that leave their C-MOVE leave open at a slow move destination.

The destination is a socket server that reads each A-ASSOCIATE-RQ and never answers (a
busy or hung PACS); it counts the connections open at once. A raw-socket association per
C-MOVE to a lone peer (3 CTs), ``--moves`` of them one after the other, each
released (A-RELEASE-RQ, the C-MOVE not answered) once the peer's association request
has reached the destination. Printed per code tree (``--code before=DIR,after=DIR``: the
peer runs with that PYTHONPATH): connections open at the destination at the end of the
loop and at most at once, the loop's wall clock, load.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/move_abandoned.py \\
        --code before=/tmp/snapA,after=/tmp/snapB [--moves 20]
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table  # noqa: E402

from pacsp2p.testing import Peer, datasets, storescu  # noqa: E402
from pacsp2p.testing.fuzz import wire as w  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK  # noqa: E402

STUDY = datasets.uid("bench-move-abandoned")
IDENT = w.data_set({0x00080052: b"STUDY", 0x0020000D: STUDY.encode()})




class Silent:
    """Reads each association request, answers nothing; counts connections open."""

    def __init__(self, limit: int):
        self.listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.open = self.peak = self.requests = 0
        self.lock = threading.Lock()
        self.limit = limit
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        for _ in range(self.limit):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open += 1
                self.peak = max(self.peak, self.open)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(600)
        try:
            w.read_pdu(conn)
            with self.lock:
                self.requests += 1
            while conn.recv(65536):
                pass
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1


def one_run(work: Path, files, moves: int) -> dict:
    dest = Silent(moves + 8)
    with Peer(work / "peer", name="benchabandon",
              destinations={"SLOW": f"{LOOPBACK}:{dest.port}"}) as peer:
        storescu(peer.port, peer.ae_title, files)
        t0 = time.monotonic()
        for k in range(1, moves + 1):
            sock = socket.create_connection((LOOPBACK, peer.port), timeout=120)
            sock.sendall(w.associate_rq(called=peer.ae_title))
            assert w.read_pdu(sock)[0] == 0x02
            sock.sendall(w.message(w.CX_MOVE, w.c_find(1, w.MOVE_STUDY, w.C_MOVE_RQ,
                                                       dest="SLOW"), IDENT))
            deadline = time.monotonic() + 60
            while dest.requests < k and time.monotonic() < deadline:
                time.sleep(0.01)
            sock.sendall(w.RELEASE_RQ)
            for _ in range(1000):                 # Pending responses, then A-RELEASE-RP
                if w.read_pdu(sock)[0] == 0x06:
                    break
            sock.close()
        seconds = time.monotonic() - t0
        time.sleep(0.5)                       # what the peer sent meanwhile arrives
        r = {"open": dest.open, "peak": dest.peak, "s": seconds,
             "load": os.getloadavg()[0]}
    dest.listener.close()
    return r


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--code", default=None, help="before=DIR,after=DIR (PYTHONPATH of peers)")
    p.add_argument("--moves", type=int, default=20)
    args = p.parse_args()
    trees = common.code_versions(args.code)
    common.header(f"move abandoned: {args.moves} C-MOVEs released early to a silent destination,"
                  f" trees {[t for t, _ in trees]}")
    rows = []
    with common.workdir(args.keep, "pacsp2p-bench-abandon-") as work:
        series = datasets.uid("bma-series", STUDY)
        files = [datasets.write(datasets.make_image(
            "CT", size=32, seed=i, PatientID="BMA", StudyInstanceUID=STUDY,
            SeriesInstanceUID=series, InstanceNumber=i,
            SOPInstanceUID=datasets.uid("bma-sop", series, i)), work / "in" / f"{i}.dcm")
            for i in range(1, 4)]
        for label, tree in trees:
            with common.code_tree(tree):
                r = one_run(work / (label or "this"), files, args.moves)
            rows.append([label or "this", r["open"], r["peak"], f"{r['s']:.2f}",
                         f"{r['load']:.2f}"])
            print(f"  {label or 'this'}: {r['open']} open at the end, {r['peak']} at most, "
                  f"{r['s']:.2f} s (load {r['load']:.2f})", flush=True)
    print(table(rows, ["tree", "open at the end", "at most at once", "loop s", "load"]))


if __name__ == "__main__":
    main()
