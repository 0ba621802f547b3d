"""Files a config names that are not regular files (eleventh hostile-input session):
``pacsp2p check-config`` and ``twistd pacsp2p`` refuse each with one line naming the key,
the file and why, and return at once.

Before, a TLS file named as ``/dev/zero`` was read until memory ran out (2.6 GB in 2 s,
then a MemoryError traceback; here the children's address space is capped at 1 GB so the
host is spared), one named as a FIFO (or a config that is one) blocked both for ever,
waiting for a writer; an overlay ``tls_dir`` whose ``ca.crt`` is a link to either did the
same.
"""
from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from pacsp2p.overlay import tls as ca
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.ports import free_port

CAP = 1 << 30             # address space of the refused children


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _both(cfg: Path, cwd: Path) -> list:
    """The stderr lines of check-config and of twistd with *cfg*, each refused."""
    out = []
    for argv in ([str(twistd_path().parent / "pacsp2p"), "check-config", "--config", str(cfg)],
                 [str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config", str(cfg)]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120,
                              stdin=subprocess.DEVNULL, preexec_fn=_capped)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        out.append([line for line in proc.stderr.splitlines() if line.strip()])
    return out


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.pem"
    os.mkfifo(path)
    return path


def _config(tmp_path: Path, more: str, facade: str = "") -> Path:
    cfg = tmp_path / "peer.toml"
    cfg.write_text(f'[peer]\nname = "north"\ndata_dir = "data"\n[facade]\nport = {free_port()}\n'
                   f'{facade}[admin]\nport = {free_port()}\n{more}')
    return cfg


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_facade_tls_file_that_is_not_a_regular_file_is_one_line(tmp_path, fifo, special):
    path = fifo if special == "fifo" else Path(special)
    cfg = _config(tmp_path, "", facade=f'tls_port = {free_port()}\ntls_cert = "{path}"\n'
                  f'tls_key = "{path}"\ntls_ca = "{path}"\n')
    for lines in _both(cfg, tmp_path):
        assert lines == [f"pacsp2p: {cfg}: facade.tls_cert: {path}: cannot read the "
                         f"certificate (not a regular file)"], lines
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_an_overlay_ca_that_is_not_a_regular_file_is_one_line(tmp_path, fifo, special):
    tls_dir = tmp_path / "tls"
    ca.init_ca(tls_dir)
    ca.issue(tls_dir, "north")
    (tls_dir / "ca.crt").unlink()
    (tls_dir / "ca.crt").symlink_to(fifo if special == "fifo" else special)
    cfg = _config(tmp_path, f'[overlay]\ntls_dir = "{tls_dir}"\n')
    for lines in _both(cfg, tmp_path):
        assert len(lines) == 1 and lines[0].startswith(f"pacsp2p: {cfg}: overlay.tls_dir: "), lines
        assert "not a regular file" in lines[0], lines


def test_a_config_that_is_a_fifo_is_one_line(tmp_path, fifo):
    for lines in _both(fifo, tmp_path):
        assert lines == [f"pacsp2p: {fifo}: cannot read config: not a regular file"], lines


def test_a_strategy_plugin_that_is_a_fifo_is_one_line(tmp_path):
    """Before, the import waited for the FIFO's writer for ever."""
    fifo = tmp_path / "site_rules.py"
    os.mkfifo(fifo)
    cfg = _config(tmp_path, f'[strategies]\nplugins = ["{fifo}"]\n')
    for lines in _both(cfg, tmp_path):
        assert lines == [f"pacsp2p: {cfg}: strategies.plugins[0]: {fifo}: cannot load: "
                         f"ImportError: {fifo} is not a regular file"], lines


def test_a_data_dir_under_a_file_is_one_line_naming_its_key(tmp_path):
    """Before, check-config said ok and twistd 'cannot start: [Errno 20] Not a
    directory: ...' without the key."""
    (tmp_path / "afile").write_text("")
    cfg = _config(tmp_path, "")
    cfg.write_text(cfg.read_text().replace('data_dir = "data"', 'data_dir = "afile/data"'))
    data = tmp_path / "afile" / "data"
    for lines in _both(cfg, tmp_path):
        assert lines == [f"pacsp2p: {cfg}: peer.data_dir: {data}: not a directory "
                         f"({tmp_path / 'afile'} is a file)"], lines


def test_a_data_dir_that_cannot_be_made_names_its_key(tmp_path):
    """sysfs refuses mkdir even to root (EPERM), as a read-only file system would
    (EROFS): before, 'cannot start: [Errno 1] Operation not permitted: ...'."""
    cfg = _config(tmp_path, "")
    cfg.write_text(cfg.read_text().replace('data_dir = "data"',
                                           'data_dir = "/sys/pacsp2p-cannot-be-here"'))
    proc = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"pacsp2p: {cfg}: peer.data_dir: /sys/pacsp2p-cannot-be-here: on the "
                     "kernel's sysfs filesystem, where no file can be kept"], lines  # preflight
