#!/usr/bin/env python3
"""Memory a lone peer holds for C-GET requestors that stop reading.

Each requestor is a raw socket with a small receive buffer: it asks a C-GET of a study
of CTs of 512 KB, takes the first C-STORE-RQ's command and then reads nothing more
(its TCP window full), keeping the association open. Printed per code tree (``--code
before=DIR,after=DIR``: the peer runs with that PYTHONPATH): the peer's RSS before the
C-GETs and once every retrieval fetches nothing more, the instances fetched and not
sent, the load; then the requestors close.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/get_stalled.py \\
        --code before=/tmp/snapA,after=/tmp/snapB [--clients 8] [--count 80]
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import table  # noqa: E402

from pacsp2p.testing import Peer, datasets, storescu  # noqa: E402
from pacsp2p.testing.cluster import get_json  # noqa: E402
from pacsp2p.testing.fuzz import wire as w  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK  # noqa: E402


def stalled_get(peer, study: str, i: int = 0) -> socket.socket:
    """Requestor *i*, from 127.0.2.<i+1> (one address each: the peer takes at most
    ``max_per_address``, 16, from one)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    sock.bind((f"127.0.2.{i % 250 + 1}", 0))
    sock.connect((LOOPBACK, peer.port))
    sock.sendall(w.associate_rq(contexts=[(1, w.GET_STUDY, [w.IMPLICIT]),
                                          (3, w.CT, [w.EXPLICIT])], roles=[w.CT]))
    assert w.read_pdu(sock)[0] == 0x02
    ident = w.data_set({0x00080052: b"STUDY", 0x0020000D: study.encode()})
    sock.sendall(w.message(1, w.c_find(1, w.GET_STUDY, w.C_GET_RQ), ident))
    assert w.read_pdu(sock)[0] == 0x04          # the first C-STORE-RQ; nothing more read
    return sock


def settled(peer, ids) -> int | None:
    """Instances fetched by the retrievals *ids* once none fetches any more, else None."""
    rs = [r for r in get_json(peer)["retrievals"] if r["id"] in ids]
    if len(rs) < len(ids) or any(s["in_flight"] for r in rs for s in r["sources"].values()):
        return None
    return sum(r["done"] for r in rs)


def one_run(work: Path, directory: Path, study: str, clients: int) -> dict:
    with Peer(work / "peer", name="benchstalled") as peer:
        storescu(peer.port, peer.ae_title, [directory], timeout=600)
        time.sleep(2)
        rss0 = common.rss_mb(peer.pid)
        before = {r["id"] for r in get_json(peer)["retrievals"]}
        socks = [stalled_get(peer, study, i) for i in range(clients)]
        try:
            deadline, last, same = time.monotonic() + 110, None, 0
            while time.monotonic() < deadline and same < 3:
                ids = {r["id"] for r in get_json(peer)["retrievals"]} - before
                n = settled(peer, ids) if len(ids) == clients else None
                same = same + 1 if n is not None and n == last else 0
                last = n
                time.sleep(1)
            rss1 = common.rss_mb(peer.pid)
            r = {"rss0": rss0, "rss1": rss1, "fetched": last, "load": os.getloadavg()[0]}
        finally:
            for s in socks:
                s.close()
    return r


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--code", default=None, help="before=DIR,after=DIR (PYTHONPATH of peers)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--count", type=int, default=80, help="CTs of 512 KB in the study")
    args = p.parse_args()
    trees = common.code_versions(args.code)
    common.header(f"get stalled: {args.clients} C-GET requestors that stop reading, a study "
                  f"of {args.count} CTs of 512 KB, trees {[t for t, _ in trees]}")
    rows = []
    with common.workdir(args.keep, "pacsp2p-bench-stalled-") as work:
        paths = datasets.make_study(work / "in", patient_id="BSTALLED", size=512,
                                    series=(("CT", args.count, "1.2.840.10008.1.2.1"),))
        from pydicom import dcmread
        study = str(dcmread(paths[0]).StudyInstanceUID)
        for label, tree in trees:
            with common.code_tree(tree):
                r = one_run(work / (label or "this"), work / "in", study, args.clients)
            grown = r["rss1"] - r["rss0"]
            rows.append([label or "this", f"{r['rss0']:.0f}", f"{r['rss1']:.0f}",
                         f"{grown:.0f}", r["fetched"], f"{r['load']:.2f}"])
            print(f"  {label or 'this'}: RSS {r['rss0']:.0f} -> {r['rss1']:.0f} MB "
                  f"(+{grown:.0f}), {r['fetched']} instances fetched for {args.clients} "
                  f"stalled C-GETs (load {r['load']:.2f})", flush=True)
    print(table(rows, ["tree", "RSS before MB", "RSS stalled MB", "grown MB",
                       "fetched", "load"]))


if __name__ == "__main__":
    main()
