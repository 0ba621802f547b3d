"""``pacsp2p demo``: a local cluster of N peers in one command.

Creates a cluster CA and N peer configs under a directory (each peer with an embedded
archive), then runs the peers as separate ``twistd`` processes until Ctrl-C. Peer *i*
(0-based) gets facade port 11112 + 10*i (AE title PEERA, PEERB, ...), overlay port
11114 + 10*i, bulk port 11115 + 10*i and status port 11116 + 10*i, all on 127.0.0.1;
the C-MOVE destination STORESCP = 127.0.0.1:11113 is preset.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from pacsp2p.overlay import tls

BASE = 11112


def peer_names(n: int) -> list[str]:
    return [f"peer{chr(ord('a') + i)}" for i in range(n)]


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


def run(directory: Path, n: int, first: int = BASE) -> int:
    configs = write_cluster(directory, n, first)
    twistd = Path(sys.executable).parent / "twistd"
    procs = []
    for path in configs:
        log = open(path.with_suffix(".log"), "ab")
        procs.append(subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "pacsp2p", "--config", path.name],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT))
    for i, (path, proc) in enumerate(zip(configs, procs)):
        name = peer_names(n)[i]
        print(f"{name}: facade {name.upper()} at 127.0.0.1:{first + 10 * i}, "
              f"config {path}, log {path.with_suffix('.log')}, pid {proc.pid}", flush=True)
    print(f"C-MOVE destination STORESCP = 127.0.0.1:{first + 1}. Ctrl-C stops the cluster.",
          flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    reported = set()
    try:
        while not stopping and len(reported) < len(procs):
            for name, proc in zip(peer_names(n), procs):
                if proc.poll() is not None and name not in reported:
                    reported.add(name)
                    print(f"{name} exited with status {proc.returncode}; see its log",
                          flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0
