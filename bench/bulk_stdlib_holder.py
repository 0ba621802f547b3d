#!/usr/bin/env python3
"""What a holder would spend per image if its bulk port were served by stdlib ``ssl``
sockets in threads (a sketch, NOT the product's server): each connection a thread, the
same mutual TLS (a cluster CA made here), one GET line per image, the file read whole and
written with one ``SSLSocket.sendall`` (OpenSSL encrypts and writes every 16 KB record in
C with the GIL released). The holder runs in a process of its own; this process fetches
every instance of the study with ``--parallel`` blocking clients (stdlib ``ssl`` too),
``--rounds`` times, and prints the holder's CPU (user, system) per image: the figure to
set beside ``bench/bulk_channel.py``'s holder (Twisted, pyOpenSSL over memory BIOs).
Nothing here validates input; it only measures the cost of the bytes' path.

    .venv/bin/python bench/bulk_stdlib_holder.py [--studies ct] [--parallel 2] [--rounds 5]
"""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import move as single  # noqa: E402
from common import median  # noqa: E402


def contexts(tls_dir: Path):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls_dir / "a.crt", tls_dir / "a.key")
    server.load_verify_locations(tls_dir / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(tls_dir / "b.crt", tls_dir / "b.key")
    client.load_verify_locations(tls_dir / "ca.crt")
    client.check_hostname = False
    return server, client


def serve(tls_dir: Path, files: list[str]) -> None:
    """The holder: prints its port, then serves ``GET /<index>`` until killed."""
    server, _ = contexts(tls_dir)

    def handle(conn):
        s = server.wrap_socket(conn, server_side=True)
        lines = s.makefile("rb")
        while True:
            line = lines.readline(8192)
            if not line:
                break
            while lines.readline(8192) not in (b"\r\n", b""):
                pass
            with open(files[int(line.split()[1][1:])], "rb") as f:
                data = f.read()
            s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data) + data)
        s.close()

    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def fetch(client, port: int, ids: list[int]) -> None:
    s = client.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                           server_hostname="a")
    buf = bytearray(1 << 20)
    for i in ids:
        s.sendall(b"GET /%d HTTP/1.1\r\nhost: a\r\n\r\n" % i)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        top, rest = head.split(b"\r\n\r\n", 1)
        left = int(top.split(b"content-length: ")[1].split(b"\r\n")[0]) - len(rest)
        while left > 0:
            left -= s.recv_into(buf, min(left, len(buf)))
    s.close()


def cpu(pid: int) -> tuple[float, float]:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]), sys.argv[3:])
        return 0
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="ct")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    common.header("a holder on stdlib ssl in threads (sketch) <- blocking stdlib clients")
    from pacsp2p.overlay import tls
    data = single.study(args.cache, args.studies)
    files = [str(f) for f in data.files]
    print(f"-- {args.studies}: {len(files)} instances; {args.parallel} at once, "
          f"{args.rounds} rounds", flush=True)
    with common.workdir(args.keep, "pacsp2p-bench-stdlib-") as wd:
        tls.init_ca(wd)
        tls.issue(wd, "a")
        tls.issue(wd, "b")
        holder = subprocess.Popen([sys.executable, __file__, "--serve", str(wd), *files],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(holder.stdout.readline())
            _, client = contexts(wd)
            rows = []
            for rnd in range(args.rounds + 1):              # the first: warm-up
                ids = list(range(len(files)))
                (u0, s0), t0 = cpu(holder.pid), time.perf_counter()
                workers = [threading.Thread(target=fetch, args=(client, port,
                                                                 ids[k::args.parallel]))
                           for k in range(args.parallel)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                wall = time.perf_counter() - t0
                u1, s1 = cpu(holder.pid)
                user, system = ((b - a) * 1000 / len(ids) for a, b in ((u0, u1), (s0, s1)))
                if rnd:
                    rows.append((wall, user, system))
                print(f"   round {rnd}{' (warm-up)' if not rnd else ''}: {wall:.3f} s  "
                      f"holder CPU ms/image user {user:.3f} system {system:.3f} "
                      f"(sum {user + system:.3f})", flush=True)
        finally:
            holder.kill()
            holder.wait()
    w, u, s = (median([r[i] for r in rows]) for i in range(3))
    print(f"\nmedian of {len(rows)}: {w:.3f} s; holder CPU ms per image: user {u:.3f}, "
          f"system {s:.3f}, sum {u + s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
