"""``pacsp2p ca`` with what an operator may mistype (fifteenth hostile-input session).

``pacsp2p ca issue DIR NAME`` wrote ``NAME.crt`` and ``NAME.key`` where NAME led: ``../x``
put a key pair beside DIR (a file path made of the input) in a certificate for a peer
named ``../x``, which no config accepts; an empty name, one past 64 characters, ``--days
-5`` or a directory that cannot be made (``ca init /proc/x``, ``--out /proc/x``) ended in a
Python traceback. Now a name is refused as the config refuses a peer name (a DICOM
node's may hold spaces), ``--days`` must be 1 to 36,500, and each refusal is one line
and exit status 1, nothing written. The real ``pacsp2p`` script.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACSP2P = Path(sys.executable).with_name("pacsp2p")


def cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), *map(str, args)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=cwd)


@pytest.fixture()
def ca(tmp_path) -> Path:
    d = tmp_path / "work" / "ca"
    d.mkdir(parents=True)
    assert cli("ca", "init", d, cwd=tmp_path).returncode == 0
    return d


def files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args", [
    ["issue", "{ca}", "../evil"],
    ["issue", "{ca}", "sub/evil"],
    ["issue", "{ca}", ""],
    ["issue", "{ca}", ".hidden"],
    ["issue", "{ca}", "x" * 65],
    ["issue", "{ca}", "a b"],                        # a peer name has no space
    ["issue", "{dicom}", "ct\n1", "--kind", "client"],
    ["issue", "{dicom}", "../ct", "--kind", "client"],
    ["issue", "{ca}", "peerx", "--days", "-5"],
    ["issue", "{ca}", "peerx", "--days", "0"],
    ["issue", "{ca}", "peerx", "--days", "99999999"],
    ["issue", "{ca}", "peerx", "--out", "/proc/pacsp2p-no"],
    ["init", "/proc/pacsp2p-no"],
], ids=lambda a: " ".join(a).replace("\n", "\\n")[:40])
def test_a_mistyped_ca_command_is_one_line_and_writes_nothing(ca, tmp_path, args):
    dicom = ca.parent / "dicom"
    assert cli("ca", "init", "--dicom", dicom, cwd=tmp_path).returncode == 0
    before = files(tmp_path)
    proc = cli("ca", *[a.format(ca=ca, dicom=dicom) for a in args], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 3, out           # (argparse: usage + error)
    assert files(tmp_path) == before, out


def test_a_dicom_node_name_may_hold_a_space(ca, tmp_path):
    dicom = tmp_path / "dicom"
    assert cli("ca", "init", "--dicom", dicom, cwd=tmp_path).returncode == 0
    proc = cli("ca", "issue", dicom, "CT 1", "--kind", "client", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (dicom / "CT 1.crt").is_file()
    proc = cli("ca", "issue", ca, "peer-1.site_a", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
