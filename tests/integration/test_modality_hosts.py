"""AE titles bound to hosts, rights per modality, the called AE title (issue 17.2).

A real peer (separate twistd process, bound to 0.0.0.0) with a hardened config:
``allow_unknown = []``, ``check_called_ae`` and ``check_modality_host`` on (the
defaults), modalities declared with their addresses and rights. A network namespace the
test creates (veth pair in 198.18.0.0/15, RFC 2544) is "another host":

- a client there claiming CT1 (declared at 127.0.0.1) is refused (A-ASSOCIATE-RJ,
  calling AE title not recognized), whatever it asks; CT1 from 127.0.0.1 is served;
- NSCT (declared at the namespace's address) is served from there and refused from here;
- a modality without a right gets 0x0124 (Refused: Not Authorized) for that operation,
  and a C-MOVE to a destination outside its ``move_to`` too;
- an AE title not declared, and a wrong called AE title, are refused.

Each refusal is one line of the peer's log. Needs root (ip netns). DCMTK waits up to
60 s per step; nothing depends on a short wall-clock timeout. The namespace and the veth
pair are removed afterwards whatever happened.
"""
from __future__ import annotations

import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsp2p.testing import Peer, StoreSCP, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk_env, dcmtk_path
from pacsp2p.testing.ports import LOOPBACK

IP = shutil.which("ip") or "/usr/sbin/ip"
STEP = ["-to", "60", "-ta", "60", "-td", "60"]
STUDY = datasets.uid("hosts-study")


def _ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    name: str
    host_address: str            # this side of the veth pair
    client_address: str          # the namespace's side


@pytest.fixture(scope="module")
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


def tool(ns: Namespace | None, name: str, *args) -> subprocess.CompletedProcess:
    """/usr/bin/<name> *args*, in the namespace *ns* (or here), output captured."""
    argv = [str(dcmtk_path(name)), *map(str, args)]
    if ns is not None:
        argv = [IP, "netns", "exec", ns.name, *argv]
    return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          env=dcmtk_env(), timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("study")
    return [datasets.write(datasets.make_image(
        "CT", size=32, seed=i, PatientID="HOST0001", StudyInstanceUID=STUDY,
        SOPInstanceUID=datasets.uid("hosts-sop", i)), d / f"{i}.dcm") for i in range(2)]


@pytest.fixture(scope="module")
def site(tmp_path_factory, netns, study):
    """(peer, where the namespace reaches it, the C-MOVE destination)."""
    root = tmp_path_factory.mktemp("hosts")
    with StoreSCP(root / "scp") as scp:
        peer = Peer(root / "peer", name="hosts", config={
            "facade": {"bind": "0.0.0.0", "allow_unknown": []},
            "destinations": {"STORESCP": scp.address, "OTHER": "127.0.0.1:9"},
            "modalities": {
                "ECHOSCU": {"host": LOOPBACK, "allow": []},       # the readiness probe
                "CT1": {"host": LOOPBACK, "allow": ["store", "find"]},
                "NSCT": {"host": netns.client_address,
                         "allow": ["store", "find", "get"]},
                "WS": {"host": "127.0.0.0/8", "allow": ["find", "move", "get"],
                       "move_to": ["STORESCP"]},
            }})
        with peer:
            yield peer, netns.host_address, scp
            print(f"peer log: {peer.log_path}")


def out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def echo(ns, address, port, aet, aec="PACSP2P"):
    return tool(ns, "echoscu", "-aet", aet, "-aec", aec, *STEP, address, port)


def store(ns, address, port, aet, files):
    return tool(ns, "storescu", "-v", "-aet", aet, "-aec", "PACSP2P", *STEP, address, port,
                *files)


def find(ns, address, port, aet):
    return tool(ns, "findscu", "-S", "-v", "-aet", aet, "-aec", "PACSP2P", *STEP,
                "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=HOST0001",
                "-k", "StudyInstanceUID", address, port)


def get(ns, address, port, aet, outdir: Path):
    outdir.mkdir(parents=True, exist_ok=True)
    return tool(ns, "getscu", "-S", "-v", "-aet", aet, "-aec", "PACSP2P", *STEP,
                "-od", outdir, "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={STUDY}", address, port)


def move(address, port, aet, dest):
    return tool(None, "movescu", "-S", "-v", "-aet", aet, "-aec", "PACSP2P", "-aem", dest,
                *STEP, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}",
                address, port)


REJECTED_CALLING = "Reason: Calling AE Title Not Recognized"


def test_an_ae_title_claimed_from_the_wrong_address_is_refused(site, netns, study, tmp_path):
    peer, there, _ = site
    before = len(peer.log_path.read_text(errors="replace"))
    attempts = {
        "C-ECHO": echo(netns, there, peer.port, "CT1"),
        "C-STORE": store(netns, there, peer.port, "CT1", study),
        "C-FIND": find(netns, there, peer.port, "CT1"),
        "C-GET": get(netns, there, peer.port, "WS", tmp_path / "got"),
        "C-ECHO from here as NSCT": echo(None, LOOPBACK, peer.port, "NSCT"),
    }
    for what, proc in attempts.items():      # getscu says only "Association Rejected"
        assert proc.returncode != 0 and "Association Rejected" in out(proc), \
            f"{what}:\n{out(proc)}"
        assert what == "C-GET" or REJECTED_CALLING in out(proc), f"{what}:\n{out(proc)}"
    assert "Found Match" not in out(attempts["C-FIND"])
    assert not list((tmp_path / "got").iterdir())
    assert dn.archive_files(peer.data_dir) == []          # nothing stored
    log = peer.log_path.read_text(errors="replace")[before:]
    assert log.count(f"CT1 is not declared at '{netns.client_address}'") == 3, log
    assert f"WS is not declared at '{netns.client_address}'" in log
    assert "NSCT is not declared at '127.0.0.1'" in log


def test_the_same_ae_titles_from_their_declared_addresses_are_served(site, netns, study,
                                                                     tmp_path):
    peer, there, _ = site
    stored = store(None, LOOPBACK, peer.port, "CT1", study[:1])
    assert stored.returncode == 0 and "Received Store Response (Success)" in out(stored), \
        out(stored)
    found = find(None, LOOPBACK, peer.port, "CT1")
    assert found.returncode == 0 and STUDY in out(found), out(found)
    # NSCT from the namespace: store, find and get
    assert echo(netns, there, peer.port, "NSCT").returncode == 0
    stored = store(netns, there, peer.port, "NSCT", study[1:])
    assert stored.returncode == 0 and "Received Store Response (Success)" in out(stored), \
        out(stored)
    found = find(netns, there, peer.port, "NSCT")
    assert found.returncode == 0 and STUDY in out(found), out(found)
    got = get(netns, there, peer.port, "NSCT", tmp_path / "got")
    assert got.returncode == 0, out(got)
    assert dn.dataset_hashes(p for p in (tmp_path / "got").iterdir()) == \
        dn.dataset_hashes(study)


def test_rights_and_move_destinations_per_modality(site, study, tmp_path):
    peer, _, scp = site
    if len(dn.archive_files(peer.data_dir)) < len(study):
        store(None, LOOPBACK, peer.port, "CT1", study)
    before = len(peer.log_path.read_text(errors="replace"))
    refused = "Unknown Status: 0x124"            # DCMTK's words for Refused: Not Authorized
    got = get(None, LOOPBACK, peer.port, "CT1", tmp_path / "ct1")       # CT1: no "get"
    assert "DIMSE status is: " + refused in out(got), out(got)     # getscu exits 0 anyway
    assert not list((tmp_path / "ct1").iterdir())
    moved = move(LOOPBACK, peer.port, "CT1", "STORESCP")               # nor "move"
    assert moved.returncode != 0 and refused in out(moved), out(moved)
    stored = store(None, LOOPBACK, peer.port, "WS", study[:1])         # WS: no "store"
    assert refused in out(stored), out(stored)
    moved = move(LOOPBACK, peer.port, "WS", "OTHER")                   # not in move_to
    assert moved.returncode != 0 and refused in out(moved), out(moved)
    assert scp.files() == []
    moved = move(LOOPBACK, peer.port, "WS", "STORESCP")                # in move_to
    assert moved.returncode == 0, out(moved)
    assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)
    log = peer.log_path.read_text(errors="replace")[before:]
    assert "C-GET from 'CT1'@127.0.0.1" in log and "C-MOVE from 'CT1'@127.0.0.1" in log
    assert "C-STORE from 'WS'@127.0.0.1" in log
    assert "C-MOVE from 'WS'@127.0.0.1:" in log and "to 'OTHER' refused" in log


def test_unknown_ae_titles_and_a_wrong_called_ae_are_refused(site, netns):
    peer, there, _ = site
    unknown = echo(None, LOOPBACK, peer.port, "NOBODY")
    assert unknown.returncode != 0 and REJECTED_CALLING in out(unknown), out(unknown)
    for ns, address in ((None, LOOPBACK), (netns, there)):
        wrong = echo(ns, address, peer.port, "CT1" if ns is None else "NSCT", aec="ANY-SCP")
        assert wrong.returncode != 0, out(wrong)
        assert "Reason: Called AE Title Not Recognized" in out(wrong), out(wrong)
    log = peer.log_path.read_text(errors="replace")
    assert "calling AE title not declared under [modalities]" in log
    assert "called AE title 'ANY-SCP' is not PACSP2P" in log
    assert "Traceback" not in log and "Unhandled" not in log
