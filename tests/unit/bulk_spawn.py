"""A real bulk channel of peer "a" in a process of its own (tests/unit/bulk_server.py),
for the tests that speak to it: mutual TLS with a cluster CA made here (peers "a" and
"b"), handshake timeout and pending-handshake limit as given."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from pacsp2p.overlay import tls

SERVER = Path(__file__).with_name("bulk_server.py")


@contextlib.contextmanager
def bulk_server(root: Path, tls_dir: Path, known=(), uncatalogued=(), timeout: float = 600,
                limit: int = 64, env=None):
    """Yields ``{"port": N, "status": M, "pid": P}`` while the server runs (killed at
    exit)."""
    if not (tls_dir / "ca.crt").exists():
        tls.init_ca(tls_dir)
        tls.issue(tls_dir, "a")
        tls.issue(tls_dir, "b")
    proc = subprocess.Popen([sys.executable, str(SERVER), str(root), str(tls_dir),
                             str(timeout), str(limit), *map(str, known), "--",
                             *map(str, uncatalogued)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bulk server did not start: {proc.stderr.read()}")
        yield {**json.loads(line), "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()
