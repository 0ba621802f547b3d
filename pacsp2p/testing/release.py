"""An older release of pacsp2p, made from this repository's git history, to run as a peer
(upgrade tests: a data directory written by it, a cluster with peers of two releases).

``release(commit, root)`` extracts the commit's tree (``git archive``) under *root* and
makes a small venv beside it whose ``pacsp2p`` (and twistd plugin) is that tree and whose
other packages are this venv's (the dependencies must match: check ``setup.cfg``);
returns its ``twistd``, for ``Peer(twistd=...)``. ``known(commit)`` says whether this
checkout's history holds the commit (a shallow clone may not: skip then); the
repository is this tree's, or ``$PACSP2P_REPO``.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import twisted

REPO = Path(os.environ.get("PACSP2P_REPO") or Path(__file__).resolve().parents[2])


def known(commit: str) -> bool:
    """True if *commit* is in this checkout's history."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                              capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def release(commit: str, root: Path | str) -> Path:
    """The twistd of *commit*'s pacsp2p under *root* (made once)."""
    root = Path(root)
    bindir = root / "venv" / "bin"
    twistd = bindir / "twistd"
    if twistd.exists():
        return twistd
    tree = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                          capture_output=True, timeout=300).stdout
    with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
        tar.extractall(root / "src", filter="data")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True, timeout=300)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root / "venv"),
                                                     "platbase": str(root / "venv")}))
    (site / "00release.pth").write_text(f"{root / 'src'}\n")
    deps = Path(twisted.__file__).resolve().parents[1]       # where this venv's packages are
    (site / "01deps.pth").write_text(f"{deps}\n")
    for name, code in (("twistd", "from twisted.scripts.twistd import run"),
                       ("pacsp2p", "from pacsp2p.admin.cli import main as run")):
        script = bindir / name
        script.write_text(f"#!{bindir / 'python'}\nimport sys\n{code}\nsys.exit(run())\n")
        script.chmod(0o755)
    return twistd
