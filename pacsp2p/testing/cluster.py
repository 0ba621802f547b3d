"""A cluster of real pacsp2p peers for tests: N `twistd pacsp2p` processes joined by the
overlay, with a cluster CA made under a directory.

``Cluster(root).start(3)`` -> peers peera, peerb, peerc (pacsp2p.testing.Peer, AE titles
PEERA, ...), spawned together and then awaited (``add`` starts one and waits for it).
Every port (facade, admin, overlay, bulk) is picked free; peer *i* seeds on every peer
added before it. ``members(peer)``, ``digest(peer)`` read a peer's admin
endpoint; ``wait_until`` polls with a deadline.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

from pacsp2p.overlay import tls

from . import toml
from .peer import Peer
from .ports import LOOPBACK, free_ports

HEARTBEAT = 0.5


def peer_names(n: int) -> list[str]:
    return [f"peer{chr(ord('a') + i)}" for i in range(n)]


# A test must pass on a busy machine: every wait lasts at least this long before it
# fails (a condition that holds returns at once, so patience costs nothing when green).
PATIENCE = float(os.environ.get("PACSP2P_TEST_PATIENCE", "180"))


def patience(timeout: float) -> float:
    """*timeout*, but never less than PATIENCE seconds."""
    return max(timeout, PATIENCE)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> float:
    """Poll *predicate* until truthy (bounded by ``patience(timeout)``); return the seconds
    it took."""
    timeout = patience(timeout)
    start = time.monotonic()
    deadline = start + timeout
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as e:       # a peer briefly not answering: keep polling
            last_error = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not true after {timeout}s"
                               + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def get_json(peer: Peer, what: str = "status", timeout: float = 60.0) -> dict:
    with urllib.request.urlopen(f"{peer.admin_url}/{what}", timeout=timeout) as r:
        return json.load(r)


def store_study(peer: Peer, directory: Path, patient_id: str, n: int,
                modality: str = "MR") -> tuple[str, list[Path]]:
    """*n* images of one series (32 × 32, Explicit VR Little Endian) made in *directory*
    and sent to *peer* by DCMTK storescu, each answered Success: (the study's UID, the
    files)."""
    from pydicom.uid import ExplicitVRLittleEndian

    from . import datasets, dicomnet
    from .dcmtk import storescu
    files = datasets.make_study(directory, patient_id=patient_id, size=32,
                                series=[(modality, n, ExplicitVRLittleEndian)])
    proc = storescu(peer.port, peer.ae_title, files, extra=["-v"], timeout=300)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == n, out[-3000:]
    return dicomnet.study_of(files), files


def wait_replicated(peer: Peer, study: str, n: int, timeout: float = 60.0) -> list[dict]:
    """Until *peer* knows *n* instances of *study*, each on two peers, and holds no
    hint; then its ``where`` rows of the study."""
    def settled():
        rows = get_json(peer, f"where?study={study}", 30)
        return len(rows) == n and all(len({x["peer"] for x in r["replicas"]}) == 2
                                      for r in rows) and \
            get_json(peer, "status")["catalog"].get("hints", 1) == 0
    wait_until(settled, timeout, interval=0.5, what="2 copies of each recorded, no hint left")
    return get_json(peer, f"where?study={study}", 30)


def members(peer: Peer) -> dict[str, str]:
    """{member name: state} as *peer* sees it (itself as "self")."""
    return {m["name"]: m["state"] for m in get_json(peer)["overlay"]["members"]}


def digest(peer: Peer) -> str:
    return get_json(peer, "digest")["digest"]


class Cluster:
    """Peers sharing one CA under *root*; add() more, including misfits (other CA)."""

    def __init__(self, root: Path, destinations: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None):
        """*config* is deep-merged into every peer's config (e.g. {"cluster": {...}})."""
        self.root = Path(root)
        self.config = dict(config or {})
        self.ca_dir = self.root / "ca"
        self.tls_dir = self.root / "tls"
        tls.init_ca(self.ca_dir)
        self.destinations = dict(destinations or {})
        self.peers: list[Peer] = []
        self.overlay_ports: dict[str, tuple[int, int]] = {}
        self._own: dict[str, tuple[dict, dict]] = {}     # name -> (config, [overlay] keys)

    def __getitem__(self, i: int) -> Peer:
        return self.peers[i]

    def __iter__(self):
        return iter(self.peers)

    def seed(self, peer: Peer) -> str:
        return f"{LOOPBACK}:{self.overlay_ports[peer.name][0]}"

    def add(self, name: str, *, seeds: list[str] | None = None, tls_dir: Path | None = None,
            issue: bool = True, start: bool = True, overlay: Mapping[str, Any] | None = None,
            config: Mapping[str, Any] | None = None, **peer_kw) -> Peer:
        """A peer *name* (certificate from this cluster's CA unless *tls_dir* is given),
        with *config* deep-merged into the cluster's config for this peer only.

        *seeds* default to every peer added so far. The overlay/bulk ports are picked
        free; if another process grabs one before the peer binds it, start again on
        fresh ports (bounded). With *start* False the config is written (ports picked)
        and nothing runs (``spawn()`` it, or run twistd by hand).
        """
        tls_dir = Path(tls_dir or self.tls_dir)
        if issue and tls_dir == self.tls_dir and not (tls_dir / f"{name}.crt").exists():
            tls.issue(self.ca_dir, name, out=tls_dir)
        if seeds is None:
            seeds = [self.seed(p) for p in self.peers]
        peer = Peer(self.root / name, name=name, ae_title=name.upper(),
                    destinations=self.destinations, **peer_kw)
        self._own[name] = (toml.deep_merge(self.config, config or {}),
                           {"seeds": list(seeds), "tls_dir": str(tls_dir), **(overlay or {})})
        self.peers.append(peer)
        if not start:       # config only
            self._configure(peer)
            peer.port, peer.admin_port = free_ports(2)
            peer.write_config()
            return peer
        return self._start(peer)

    def _configure(self, peer: Peer) -> None:
        """Fresh overlay/bulk ports in *peer*'s config."""
        port, bulk_port = free_ports(2)
        self.overlay_ports[peer.name] = (port, bulk_port)
        own, overlay = self._own[peer.name]
        peer.overrides = toml.deep_merge(own, {"overlay": {
            "port": port, "bulk_port": bulk_port, "bind": LOOPBACK, "advertise": LOOPBACK,
            "heartbeat": HEARTBEAT, **overlay}})

    def _start(self, peer: Peer) -> Peer:
        """Start *peer*, on fresh overlay ports again if one was taken (bounded)."""
        for attempt in range(3):
            self._configure(peer)
            try:
                return peer.start()
            except RuntimeError as e:
                if "overlay.port" not in str(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def start(self, n: int, per_peer: Mapping[str, Mapping[str, Any]] | None = None
              ) -> "Cluster":
        """Start peers peera.. (*per_peer*: {name: config} deep-merged for that peer) all
        at once: every config is written (peer *i* seeding on the peers before it), every
        twistd spawned, then each awaited. A peer that did not come up (a port another
        process took meanwhile) starts again alone on fresh ports, seeding on all the
        others (which dial its old address in vain and learn the new one from it)."""
        fresh = [self.add(name, start=False, config=(per_peer or {}).get(name))
                 for name in peer_names(n)]
        for peer in fresh:
            peer.spawn()
        for peer in fresh:
            bound, peer.startup_timeout = peer.startup_timeout, patience(peer.startup_timeout)
            try:
                peer.wait_ready()           # three at once take longer on a busy machine
            except (RuntimeError, TimeoutError):
                peer.stop()
                self._own[peer.name][1]["seeds"] = [self.seed(p) for p in self.peers
                                                    if p is not peer]
                self._start(peer)
            finally:
                peer.startup_timeout = bound
        return self

    def remove(self, peer: Peer) -> None:
        """Stop *peer* (by PID) and forget it (wait_mesh no longer expects it)."""
        peer.stop()
        print(f"peer {peer.name}: log {peer.log_path}")
        self.peers.remove(peer)

    def wait_mesh(self, peers: list[Peer] | None = None, timeout: float = 15.0) -> float:
        """Wait until each of *peers* sees all the others alive; return seconds taken."""
        peers = list(peers or self.peers)
        names = {p.name for p in peers}

        def meshed():
            for p in peers:
                seen = members(p)
                if any(seen.get(n) != "alive" for n in names - {p.name}):
                    return False
            return True

        return wait_until(meshed, timeout, what=f"full mesh of {sorted(names)}")

    def stop(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()
            print(f"peer {peer.name}: log {peer.log_path}")
