"""An older release of pacsp2p, made from this repository's git history, to run as a peer
(upgrade tests: a data directory written by it, a cluster with peers of two releases).

``release(commit, root)`` extracts the commit's tree (``git archive``) under *root* and
makes a small venv beside it whose ``pacsp2p`` (and twistd plugin) is that tree and whose
other packages are this venv's (the dependencies must match: check ``setup.cfg``);
returns its ``twistd``, for ``Peer(twistd=...)``. A commit this checkout's history lacks
(a shallow clone) is fetched from ``origin``; if that fails too, an error says so (never a
skip). The repository is this tree's, or ``$PACSP2P_REPO``.
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


def _git(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                          timeout=timeout, check=False)


def _have(commit: str) -> None:
    """Make sure *commit* (its full hash) is in this checkout's history."""
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0:
        return
    why = _git("fetch", "--quiet", "origin", commit).stderr.decode(errors="replace").strip()
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise RuntimeError(f"commit {commit} is not in {REPO}'s history and could not be "
                           f"fetched from origin ({why}): the upgrade tests need a full clone")


def release(commit: str, root: Path | str) -> Path:
    """The twistd of *commit*'s pacsp2p under *root* (made once)."""
    root = Path(root)
    bindir = root / "venv" / "bin"
    twistd = bindir / "twistd"
    if twistd.exists():
        return twistd
    _have(commit)
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
        # -E: a PYTHONPATH naming the tree under test (dev/test from a snapshot puts it
        # first) must not run this tree's code as the older release
        script.write_text(f"#!{bindir / 'python'} -E\nimport sys\n{code}\n"
                          "sys.exit(run())\n")
        script.chmod(0o755)
    return twistd
