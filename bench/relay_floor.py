#!/usr/bin/env python3
"""The floor of a relayed CT image on this host: what its unavoidable steps cost in CPU,
each done with as little Python as stdlib allows (a sketch, NOT the product), measured
per thread (``time.thread_time``: user + system of that thread, the kernel's loopback
work included where the kernel charges it to the sender) over every image of the study:

- ``read``: the holder reads the stored file (page cache) into a reused buffer;
- ``tls send``: the holder writes it on mutual TLS 1.3 (the cluster CA's certificates,
  as the read port: one ``SSLSocket.sendall``, OpenSSL encrypting in C);
- ``tls recv``: the asker reads it (``recv_into`` a reused buffer, one call per record);
- ``sha256``: the asker hashes the data set against the catalog (it must);
- ``tcp send``: the asker sends it to the destination (plain TCP, one ``sendall``; the
  destination here a thread that reads and drops it).

The product's DICOM framing, HTTP heads, retrieval bookkeeping and C-STORE round trips
are not here. ``read`` + ``tcp send`` is what a lone archive (Orthanc, a lone peer) must
spend per image; all five is what a relay must, split over the holder and the asker.

    .venv/bin/python bench/relay_floor.py [--studies ct] [--rounds 5]
"""
from __future__ import annotations

import hashlib
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import move as single  # noqa: E402
from bulk_stdlib_holder import contexts  # noqa: E402
from common import median  # noqa: E402

SIZE = 1 << 20


def pair(server_ctx=None, client_ctx=None):
    """A connected (sender, receiver) pair on loopback, TLS if contexts are given."""
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if server_ctx is None:
        return a, b
    box = []
    t = threading.Thread(target=lambda: box.append(server_ctx.wrap_socket(a, server_side=True)))
    t.start()
    rb = client_ctx.wrap_socket(b, server_hostname="a")
    t.join()
    return box[0], rb


def drain(sock, sizes, out: dict, key: str, buf=None) -> None:
    """Thread: read len(sizes) messages of those sizes into a reused buffer."""
    buf = buf or bytearray(SIZE)
    t0 = time.thread_time()
    view = memoryview(buf)
    for n in sizes:
        got = 0
        while got < n:
            got += sock.recv_into(view[got:n])
    out[key] = time.thread_time() - t0


def one_round(files, server_ctx, client_ctx) -> dict:
    out: dict = {}
    sizes = [f.stat().st_size for f in files]
    buf = bytearray(SIZE)
    # holder: read + tls send; asker: tls recv (timed in their own threads)
    tx, rx = pair(server_ctx, client_ctx)
    recv_buf = bytearray(SIZE)
    reader = threading.Thread(target=drain, args=(rx, sizes, out, "tls recv", recv_buf))
    reader.start()
    t_read = t_send = 0.0
    view = memoryview(buf)
    for f, n in zip(files, sizes):
        t0 = time.thread_time()
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(view[:n])
        t1 = time.thread_time()
        tx.sendall(view[:n])
        t_read, t_send = t_read + t1 - t0, t_send + time.thread_time() - t1
    reader.join()
    out["read"], out["tls send"] = t_read, t_send
    tx.close()
    rx.close()
    # asker: sha256 of each image, then plain TCP to a destination that drops it
    t0 = time.thread_time()
    for n in sizes:
        hashlib.sha256(view[:n]).hexdigest()
    out["sha256"] = time.thread_time() - t0
    tx, rx = pair()
    sink = threading.Thread(target=drain, args=(rx, sizes, out, "dest recv"))
    sink.start()
    t0 = time.thread_time()
    for n in sizes:
        tx.sendall(view[:n])
    out["tcp send"] = time.thread_time() - t0
    sink.join()
    tx.close()
    rx.close()
    return {k: v * 1000 / len(files) for k, v in out.items()}


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="ct")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    common.header("the floor of a relayed image: its unavoidable steps, per thread")
    from pacsp2p.overlay import tls
    data = single.study(args.cache, args.studies)
    files = list(data.files)
    print(f"-- {args.studies}: {len(files)} instances, {args.rounds} rounds", flush=True)
    with common.workdir(args.keep, "pacsp2p-bench-floor-") as wd:
        tls.init_ca(wd)
        tls.issue(wd, "a")
        tls.issue(wd, "b")
        server_ctx, client_ctx = contexts(wd)
        rounds = []
        for rnd in range(args.rounds + 1):          # the first: warm-up
            r = one_round(files, server_ctx, client_ctx)
            print(f"   round {rnd}{' (warm-up)' if not rnd else ''}: " + "  ".join(
                f"{k} {v:.3f}" for k, v in r.items()), flush=True)
            if rnd:
                rounds.append(r)
    m = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    lone = m["read"] + m["tcp send"]
    holder = m["read"] + m["tls send"]
    asker = m["tls recv"] + m["sha256"] + m["tcp send"]
    print(f"\nCPU ms per image, medians of {len(rounds)}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in m.items()))
    print(f"a lone archive (read + tcp send): {lone:.3f}; a relay: holder {holder:.3f} + "
          f"asker {asker:.3f} = {holder + asker:.3f} ({(holder + asker) / lone:.2f} x the "
          f"lone archive's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
