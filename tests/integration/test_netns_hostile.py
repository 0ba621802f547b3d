"""A hostile client on another host (issue 11): a network namespace the test creates,
joined to this one by a veth pair in 198.18.0.0/15 (the benchmarking range, RFC 2544).

From the namespace, ``python -m pacsp2p.testing.hostile`` holds 200 TCP connections to
the peer's facade that never send a byte (each one the peer closes is opened again, at
most 200 times a second) and sends C-STOREs whose SOP Instance UIDs are paths (absolute,
and ``../`` out of the archive) into a directory of the test's own. Meanwhile a
legitimate client on this host does 20 C-ECHOs (one a second) and a C-STORE: all must
succeed. Then the
instance comes back byte-identical by C-GET, no path-like UID made a file, none of the
hostile C-STOREs was answered Success, and the peer's log has no traceback.

Needs root (ip netns). Nothing depends on a short wall-clock timeout: DCMTK waits up to
120 s per step; the peer keeps its default ARTIM timer (30 s) and limits.
Only processes started here are stopped, by PID; the namespace and the veth pair are
removed afterwards whatever happened.
"""
from __future__ import annotations

import json
import random
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsp2p.testing import Peer, datasets, fuzz
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.testing.procs import Process

IP = shutil.which("ip") or "/usr/sbin/ip"
SILENT = 200
ECHOES = 20
ECHO_EVERY = 1.0                 # seconds between two legitimate C-ECHOs
HOSTILE_STORES = 10
STEP = 120                       # seconds a DCMTK client may wait for any one step


def _ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    name: str
    host_address: str            # this side of the veth pair (the peer listens here too)
    client_address: str          # the namespace's side

    def argv(self, *args) -> list[str]:
        return [IP, "netns", "exec", self.name, *map(str, args)]


@pytest.fixture
def netns():
    """A network namespace with a veth pair: 198.18.N.1/24 here, 198.18.N.2/24 there."""
    tag = secrets.token_hex(3)
    name, here, there = f"pacsp2p-{tag}", f"p2ph{tag}", f"p2pn{tag}"
    used = _ip("-4", "-o", "addr", "show").stdout
    subnet = next(n for n in random.sample(range(1, 255), 254) if f" 198.18.{n}." not in used)
    ns = Namespace(name, f"198.18.{subnet}.1", f"198.18.{subnet}.2")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", name)
        _ip("addr", "add", f"{ns.host_address}/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", name, IP, "addr", "add", f"{ns.client_address}/24", "dev", there)
        _ip("netns", "exec", name, IP, "link", "set", there, "up")
        _ip("netns", "exec", name, IP, "link", "set", "lo", "up")
        yield ns
    finally:
        _ip("link", "del", here, check=False)
        _ip("netns", "del", name, check=False)


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(what: str, predicate, timeout: float, alive=lambda: True, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if not alive():
            pytest.fail(f"gave up waiting for {what}: the process ended")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout} s")
        time.sleep(every)


def _timeouts() -> list[str]:
    return ["-to", str(STEP), "-ta", str(STEP), "-td", str(STEP)]


@pytest.mark.timeout(1200)
def test_hostile_namespace_neither_locks_out_nor_writes_outside(netns, tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    seed = random.SystemRandom().randrange(1 << 31)
    print(f"\nnamespace {netns.name}: hostile client {netns.client_address} -> "
          f"{netns.host_address}; seed {seed}")
    legit = datasets.write(datasets.make_image(
        "CT", size=64, PatientID="LEGIT001", StudyInstanceUID=datasets.uid("netns-legit"),
        SOPInstanceUID=datasets.uid("netns-legit", seed)), tmp_path / "legit.dcm")
    # 0.0.0.0: the namespace reaches the facade at host_address, this host at 127.0.0.1
    peer = Peer(tmp_path / "peer", name="netns", config={"facade": {"bind": "0.0.0.0"}})
    status_path, stop = tmp_path / "hostile.json", tmp_path / "hostile.stop"
    problems: list[str] = []
    with peer:
        objects = peer.data_dir / "archives" / "local" / "objects"
        hostile = Process(netns.argv(
            sys.executable, "-m", "pacsp2p.testing.hostile", "--host", netns.host_address,
            "--port", peer.port, "--called", peer.ae_title, "--silent", SILENT,
            "--stores", HOSTILE_STORES, "--canary", canary, "--objects", objects,
            "--seed", seed, "--status", status_path, "--stop", stop, "--duration", 900),
            tmp_path / "hostile.log", cwd=tmp_path).start()
        try:
            _wait_for(f"the hostile client to open {SILENT} connections",
                      lambda: _status(status_path).get("all_open_after") is not None,
                      timeout=300, alive=lambda: hostile.alive)
            print(f"hostile client holds its connections: {_status(status_path)['open']} "
                  f"open now")

            # the legitimate client on this host, while the flood goes on
            echoes = []
            for i in range(ECHOES):
                t0 = time.monotonic()
                proc = dcmtk("echoscu", "-aet", "LEGIT", "-aec", peer.ae_title, *_timeouts(),
                             LOOPBACK, peer.port, timeout=4 * STEP)
                echoes.append((proc.returncode, time.monotonic() - t0,
                               (proc.stdout + proc.stderr)[-300:]))
                if sum(rc != 0 for rc, _, _ in echoes) >= 3:
                    break                      # locked out: no need to wait for all 20
                time.sleep(ECHO_EVERY)         # spread over a while of steady flooding
            during = _status(status_path)
            t0 = time.monotonic()
            store = dcmtk("storescu", "-aet", "LEGIT", "-aec", peer.ae_title, *_timeouts(),
                          LOOPBACK, peer.port, legit, timeout=4 * STEP)
            store_seconds = time.monotonic() - t0
            ok = sum(rc == 0 for rc, _, _ in echoes)
            slowest = max(s for _, s, _ in echoes)
            print(f"legitimate client: {ok} of {ECHOES} C-ECHOs OK (slowest {slowest:.2f} s), "
                  f"C-STORE {'OK' if store.returncode == 0 else 'FAILED'} "
                  f"({store_seconds:.2f} s); hostile meanwhile: {during.get('open')} open, "
                  f"{during.get('opened')} opened, {during.get('closed_by_peer')} closed by "
                  f"the peer")
            if ok < ECHOES:
                bad = [tail for rc, _, tail in echoes if rc != 0]
                problems.append(f"only {ok} of {ECHOES} C-ECHOs succeeded while the hostile "
                                f"client held {SILENT} connections; first failure:\n{bad[0]}")
            if store.returncode != 0:
                problems.append(f"the legitimate C-STORE failed:\n"
                                f"{(store.stdout + store.stderr)[-1000:]}")

            _wait_for("the hostile C-STOREs", lambda: _status(status_path).get("stores_done"),
                      timeout=4 * STEP + 60, alive=lambda: hostile.alive)
        finally:
            stop.touch()
            try:
                hostile.popen.wait(60)
            except subprocess.TimeoutExpired:
                hostile.stop(timeout=10)
        final = _status(status_path)
        counts = {k: v for k, v in final.items() if k not in ("stores", "path_uids")}
        print(f"hostile client: {json.dumps(counts)}")
        stores = final.get("stores", [])
        print("hostile C-STOREs: " + ", ".join(
            f"{s['outcome']} {[hex(x) for x in s['statuses']]}" for s in stores))
        if len(stores) < HOSTILE_STORES:
            problems.append(f"only {len(stores)} of {HOSTILE_STORES} hostile C-STOREs ended")
        accepted = [s["uid"] for s in stores if 0 in s["statuses"]]
        if accepted:
            problems.append(f"{len(accepted)} C-STOREs with path-like UIDs answered Success, "
                            f"e.g. {accepted[:2]}")

        if not peer.alive:
            problems.append(f"the peer died (exit code {peer.process.returncode})")
        elif store.returncode == 0:
            got_dir = tmp_path / "got"
            dn.getscu(peer.port, peer.ae_title, got_dir,
                      {"QueryRetrieveLevel": "STUDY",
                       "StudyInstanceUID": dn.study_of([legit])}, timeout=4 * STEP)
            got = dn.dataset_hashes(p for p in got_dir.iterdir() if p.is_file())
            if got != dn.dataset_hashes([legit]):
                problems.append(f"the legitimate instance did not come back byte-identical "
                                f"by C-GET ({len(got)} instances)")
    tried = fuzz.Canary(canary, objects)
    tried.tried = list(final.get("path_uids", []))
    leaked = tried.leaked()
    if leaked:
        problems.append(f"{len(leaked)} files made outside the data directory by "
                        f"path-like UIDs: {[str(p) for p in leaked[:5]]}")
    tracebacks = fuzz.log_problems(peer.log_path.read_bytes())
    if tracebacks:
        problems.append(f"{len(tracebacks)} tracebacks / 'Unhandled' in the peer's log, "
                        f"the first:\n{tracebacks[0][1][:3000]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
