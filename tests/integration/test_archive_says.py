"""What an archive says in an error is hostile input too (docs/security.md, "What an
archive answers"): an HTTP status line and error body with terminal escapes, a bell and a
line break reach the peer's log, twistd's refusal to start and ``pacsp2p status`` only
escaped, one line each. Before (hostile input, seventeenth session) a lying Orthanc's
``500 Bad\\x1b[5m`` and body ``\\x1b]0;owned\\x07\\x1b[2J...\\r\\nforged line`` were printed as
sent: the admin's terminal title set and screen cleared, and a forged log line."""
from __future__ import annotations

import subprocess

from pacsp2p.testing import Peer
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.liar import LyingOrthanc
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.ports import free_port

SAYS = "\x1b]0;owned\x07\x1b[2J\x1b[31mthe archive says\r\nforged line: all is well"


def _refuse(h):
    body = SAYS.encode()
    h.send_response(500, "Bad\x1b[5m")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _clean(text: str) -> None:
    for c in ("\x1b", "\x07", "\r"):
        assert c not in text, repr(text[-1500:])
    assert "\nforged line" not in text, text[-1500:]


def test_an_archive_refusing_at_start_is_one_escaped_line(tmp_path):
    o = LyingOrthanc()
    o.overrides["/system"] = _refuse
    cfg = tmp_path / "peer.toml"
    cfg.write_text(f'[peer]\nname = "north"\ndata_dir = "data"\n'
                   f'[facade]\nport = {free_port()}\nbind = "127.0.0.1"\n'
                   f'[admin]\nport = {free_port()}\n'
                   f'[[archives]]\nname = "liar"\nadapter = "orthanc"\nurl = "{{url}}"\n')
    with o:
        cfg.write_text(cfg.read_text().replace("{url}", o.url))
        peer = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                               str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                              stdin=subprocess.DEVNULL, timeout=120)
    assert peer.returncode != 0, peer.stderr
    assert "cannot start: archive liar" in peer.stderr, peer.stderr
    _clean(peer.stdout + peer.stderr)
    (line,) = [x for x in peer.stderr.splitlines() if x.strip()]
    assert "HTTP 500" in line and "forged line" in line, line


def test_an_archive_going_wrong_is_shown_escaped_by_status_and_the_log(tmp_path):
    o = LyingOrthanc()
    with o, Peer(tmp_path / "peer", name="north", config={
            "archives": [{"name": "local", "adapter": "embedded"},
                         {"name": "liar", "adapter": "orthanc", "url": o.url}]}) as p:
        o.overrides["/system"] = _refuse
        wait_until(lambda: not get_json(p)["archives"]["liar"]["up"], 60, 0.5,
                   "the peer saw the archive down")
        status = subprocess.run([str(twistd_path().parent / "pacsp2p"), "status",
                                 "--config", str(p.config_path)], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "archive liar: DOWN" in status.stdout, status.stdout
        _clean(status.stdout + status.stderr)
        _clean(p.log_path.read_text())
