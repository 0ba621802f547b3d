"""The operations front ends under hostile input (docs/benchmarks.md, "Operations front
ends under hostile input (2026-12-07)"): one real peer (a twistd process) holding studies
whose DICOM values an attacker on the hospital network chose (markup, quotes, control
characters, values as long as the peer keeps, invalid UTF-8, an unknown character
set), sent by DCMTK storescu; its admin endpoint probed over real sockets and, where layout matters, with
Debian's headless Chromium.

Every answer is an HTTP answer of the endpoint's own (never a template error, never a
traceback); every value from DICOM is shown escaped, bounded and without control
characters; a JSON write action refuses what it cannot use with 400.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from xml.etree import ElementTree

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement

from pacsp2p.admin.auth import hash_password
from pacsp2p.testing import Peer, disk, storescu
from pacsp2p.testing.cluster import wait_until
from pacsp2p.testing.datasets import make_image, uid, write
from pacsp2p.validate import VALUE_MAX

PASSWORD = "correct horse battery"
BIG = VALUE_MAX                    # characters of the longest values sent (a longer one
                                   # is refused: test_hostile_dimse)

# name -> the attributes of one single-instance study (bytes: written as they are)
HOSTILE = {
    "markup": {"PatientName": "<script>alert(1)</script>^X",
               "StudyDescription": '"><img src=x onerror=alert(2)>',
               "AccessionNumber": "'\"<b>"},
    "controls": {"PatientName": "A\x1b[31mRED\x07^B\x00C",
                 "StudyDescription": "line1\r\nline2\x0b",
                 "PatientID": "CTL\x1b[0m\x01", "AccessionNumber": "ACC\x00\x0c\x1f"},
    "big": {"PatientName": "N" * BIG, "StudyDescription": "D" * BIG, "PatientID": "P" * 300},
    "bad-utf8": {"SpecificCharacterSet": "ISO_IR 192",
                 "PatientName": b"\xff\xfe\xc3(^\xed\xa0\x80",
                 "StudyDescription": b"\xc0\xaf../\xe2\x82"},
    "iso2022": {"SpecificCharacterSet": "\\ISO 2022 IR 87",
                "PatientName": "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"},
    "unknown-charset": {"SpecificCharacterSet": "NOT A CHARSET",
                        "PatientName": b"\x80\x81\x82^Z"},
}


def study_uid(i: int) -> str:
    return str(uid("hostile-study", i))


def hostile_files(directory: Path) -> list[Path]:
    paths = []
    for i, (name, attrs) in enumerate(HOSTILE.items()):
        raw = {k: v for k, v in attrs.items() if isinstance(v, bytes)}
        plain = {k: v for k, v in attrs.items() if not isinstance(v, bytes)}
        plain.setdefault("PatientID", f"HOSTILE{i}")
        ds = make_image("CT", size=8, seed=100 + i, StudyInstanceUID=study_uid(i),
                        SeriesInstanceUID=uid("hostile-series", i),
                        SOPInstanceUID=uid("hostile-sop", i), **plain)
        for keyword, value in raw.items():
            tag = tag_for_keyword(keyword)
            ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        paths.append(write(ds, directory / f"{name}.dcm"))
    return paths


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    root = tmp_path_factory.mktemp("admin-hostile")
    files = hostile_files(root / "in")
    with Peer(root / "peer", name="hostile",
              config={"admin": {"users": {"alice": hash_password(PASSWORD)}}}) as p:
        for f in files:
            sent = storescu(p.port, p.ae_title, [f])
            assert sent.returncode == 0, (f.name, sent.stderr[-2000:])
        yield p


def get(peer, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(peer.admin_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_a_study_the_catalog_does_not_hold_is_a_404_page(peer):
    """A bookmarked study since deleted (or a made-up UID): the error page, 404 (before:
    500 and the template engine's "'shown' is undefined" as plain text)."""
    code, headers, body = get(peer, "/console/study/1.2.3.4.5")
    assert code == 404, (code, body[:300])
    assert headers["Content-Type"].startswith("text/html")
    assert b"No such study" in body and b"holds no study 1.2.3.4.5" in body
    # a path below a valid UID is answered the same way
    code, _, body = get(peer, "/console/study/1.2.3/../../x")
    assert code == 404 and b"No such study" in body


def test_dicom_values_are_shown_escaped_bounded_and_without_controls(peer, tmp_path):
    """In a real Chromium: the markup is text (no element made of it, and the page's
    CSP forbids scripts anyway); the 1024-character PatientName (64 KB before values were
    bounded) is shown as its first 256
    characters and the table stays as wide as the window (before: the studies page was
    1,384,534 px wide, every column after the name off the screen, for every study);
    control characters are shown as their pictures (before: ESC, BEL, NUL as they are)."""
    from selenium.webdriver.common.by import By

    from pacsp2p.testing.browser import chromium, texts

    code, _, page = get(peer, "/console/studies")
    assert code == 200
    text = page.decode("utf-8")
    assert not any(c in text for c in "\x00\x07\x0b\x1b\x80\x81"), "a control character"
    assert "N" * 257 not in text and "N" * 256 + "…" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    with chromium(tmp_path / "profile") as browser:
        for path in ["/console/studies"] + [f"/console/study/{study_uid(i)}"
                                            for i in range(len(HOSTILE))]:
            browser.get(peer.admin_url + path)
            assert browser.find_elements(By.CSS_SELECTOR, "main h1"), path
            width = browser.execute_script("return document.documentElement.scrollWidth")
            window = browser.execute_script("return window.innerWidth")
            assert width <= window, (path, width, window)
            assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")
        browser.get(peer.admin_url + "/console/studies")
        rows = set(texts(browser, "#studies tbody a.study"))
        assert "<script>alert(1)</script>, X" in rows
        assert "A\u241b[31mRED\u2407, B\u2400C" in rows, rows
        assert "N" * 256 + "…" in rows
        assert "Yamada, Tarou" in rows
        assert len(rows) == len(HOSTILE)


def post_json(peer, path: str, body: bytes) -> tuple[int, dict, bytes]:
    """POST *body* as the CLI does (its token from the data directory)."""
    token = (peer.data_dir / "admin.token").read_text().strip()
    req = urllib.request.Request(peer.admin_url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def strict_json(body: bytes):
    """JSON as RFC 8259 has it (no NaN, no Infinity)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize("path", ["/delete", "/scrub", "/drain"])
def test_a_json_bomb_is_a_400_not_a_traceback(peer, path):
    """1 MB of nested brackets: 400 JSON (before: 500 "Processing Failed" HTML and a
    RecursionError traceback in the log for each)."""
    for body in (b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000):
        code, headers, answer = post_json(peer, path, body)
        assert code == 400, (code, answer[:300])
        assert headers["Content-Type"] == "application/json"
        assert "nested too deep" in strict_json(answer)["error"]
    assert "RecursionError" not in peer.log_path.read_text(errors="replace")


@pytest.mark.parametrize("rate", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
def test_a_scrub_rate_that_is_no_number_is_refused(peer, rate):
    """{"rate": Infinity} (JSON as Python reads it, and 1e999): 400 (before: 200 with
    "rate": Infinity in the answer, which is not JSON, then the pass failed with an
    OverflowError traceback)."""
    code, _, answer = post_json(peer, "/scrub", b'{"rate": ' + rate + b"}")
    assert code == 400, (code, answer[:300])
    assert '"rate" must be MB/s' in strict_json(answer)["error"]
    code, _, status = get(peer, "/status")
    assert code == 200
    strict_json(status)
    assert "OverflowError" not in peer.log_path.read_text(errors="replace")


def test_a_huge_finite_scrub_rate_checks_every_copy(peer):
    """{"rate": 1e308}: a number, taken (before: the pass failed at once, 'cannot convert
    float infinity to integer' and a traceback, 0 copies checked)."""
    code, _, answer = post_json(peer, "/scrub", b'{"rate": 1e308}')
    assert code == 200, (code, answer[:300])
    ran = strict_json(answer)["pass"]

    def done():
        last = strict_json(get(peer, "/status")[2])["scrub"]["last"]
        return last if last and last.get("id") == ran else None
    wait_until(done, 120, what="the scrub pass")
    last = done()
    assert last["checked"] == len(HOSTILE), last
    assert "OverflowError" not in peer.log_path.read_text(errors="replace")


def test_the_audit_trail_of_hostile_values_converts_to_xml_a_collector_parses(peer, tmp_path):
    """The stores' audit records (PatientID and AccessionNumber with ESC, NUL, FF...)
    through ``python -m pacsp2p.audit``: every line an XML message ElementTree parses
    (before: the control characters went into the XML as they were, and a collector's
    parser refused the message: "not well-formed (invalid token)"); a line cut short
    (a full disk, a crash) is skipped with one line on stderr, not the end of the
    conversion (before: a traceback, and the lines after it never converted)."""
    trail = (peer.data_dir / "audit.log").read_text(encoding="utf-8")
    assert "CTL\\u001b[0m\\u0001" in trail         # the record holds what came
    cut = tmp_path / "audit-cut.log"
    lines = trail.splitlines()
    cut.write_text("\n".join(lines[:2] + [lines[2][:len(lines[2]) // 2]] + lines[2:]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pacsp2p.audit", str(cut)],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout.splitlines()
    assert len(out) == len(lines), (proc.stderr[-2000:], len(out), len(lines))
    for line in out:
        ElementTree.fromstring(line)
    assert proc.returncode == 1 and "line 3 is not an audit record" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "CTL\ufffd[0m\ufffd" in "".join(out)


class Impostor:
    """Another service on the admin port: a real socket answering every request with
    *answer* (bytes), in a thread."""

    def __init__(self, answer: bytes):
        import socket
        import threading
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def _http(body: bytes, code: int = 200, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (code, ctype, len(body))) + body


@pytest.mark.parametrize("answer", [
    b"\x00\x01garbage\r\n\r\n",                                  # not HTTP
    _http(b"<html>a web server</html>", ctype=b"text/html"),    # not JSON
    _http(b"[1, 2, 3]"),                                         # JSON, not an object
    _http(b'{"peer": ')[:-3] + b"100\r\n\r\n" + b'{"peer": ',     # cut short
    _http(b'{"error": "\\u001b]0;owned\\u0007\\u001b[2J' + b"x" * 5000 + b'"}', code=500),
    _http(b'{"peer": 5, "archives": [1], "catalog": 2, "overlay": "x"}'),  # wrong fields
], ids=["not-http", "html", "a-list", "cut-short", "escapes-in-a-refusal", "wrong-fields"])
def test_the_cli_facing_another_service_says_so_in_one_line(tmp_path, answer):
    """``pacsp2p status``, ``scrub``, ``delete``, ``where`` with something else on the
    admin port: one line and exit status 1 (before: a BadStatusLine, JSONDecodeError,
    TypeError or IncompleteRead traceback); a refusal's reason reaches the terminal
    without its escape sequences and bounded (before: as sent, 5 KB of it)."""
    impostor = Impostor(answer)
    try:
        cfg = tmp_path / "cli.toml"
        cfg.write_text(f'[peer]\ndata_dir = "data"\n[admin]\nport = {impostor.port}\n')
        for argv in (["status"], ["scrub"], ["delete", "--study", "1.2.3"],
                     ["where", "--study", "1.2.3"]):
            proc = subprocess.run([str(Path(sys.executable).with_name("pacsp2p")), *argv,
                                   "--config", str(cfg)], capture_output=True, text=True,
                                  timeout=300, stdin=subprocess.DEVNULL)
            lines = [line for line in (proc.stderr or proc.stdout).splitlines()
                     if line.strip()]
            assert proc.returncode == 1 and len(lines) == 1, (argv, proc.stderr[-3000:])
            assert len(lines[0]) < 800, lines[0]
            assert lines[0].startswith("pacsp2p: ") or argv[0] == "delete", lines[0]
            assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        impostor.close()


def test_an_audit_text_with_line_breaks_stays_one_xml_message_a_line(peer, tmp_path):
    """A delete whose reason holds line breaks (a careless admin's, or a forged
    "record" after them): the JSON trail keeps it one line, and the collector filter
    gives one XML message a line, the break as a character reference (before: the
    message was cut in two lines, and ``while read -r msg`` of docs/operations.md sent
    two broken messages, the second one starting with the forged text)."""
    forged = "cleanup\n<AuditMessage><EventIdentification EventActionCode=\"R\"/>\r\nx"
    code, _, answer = post_json(peer, "/delete", json.dumps(
        {"level": "IMAGE", "uids": ["1.2.3.999"], "reason": forged}).encode())
    assert code == 200, answer[:300]
    trail = peer.data_dir / "audit.log"

    def recorded():
        return [line for line in trail.read_text(encoding="utf-8").splitlines()
                if "1.2.3.999" in line]
    from pacsp2p.testing.cluster import wait_until
    wait_until(recorded, 120)
    (line,) = recorded()
    assert json.loads(line)["EventIdentification"]["EventOutcomeDescription"] == forged
    one = tmp_path / "one.log"
    one.write_text(line + "\n")
    proc = subprocess.run([sys.executable, "-m", "pacsp2p.audit", str(one)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (xml,) = proc.stdout.splitlines()
    message = ElementTree.fromstring(xml)
    assert message.find("EventIdentification/EventOutcomeDescription").text == forged


def test_records_lost_to_a_full_disk_are_counted_as_dropped(tmp_path):
    """The data directory on an 8 MB tmpfs, filled up: the C-ECHOs go on, and every
    audit record of theirs is either in audit.log or counted in
    ``pacsp2p_audit_records_dropped_total`` (before: 0 dropped while ~200 records
    vanished, 'written' counting them: they sat in the file object's buffer whose flush
    failed); once there is room again the trail goes on with whole lines."""
    from pacsp2p.testing.cluster import wait_until
    from pacsp2p.testing.dcmtk import echo

    with disk.tmpfs(tmp_path / "fs", "8m") as mnt:
        data = mnt / "data"
        trail = data / "audit.log"

        def records() -> int:
            return sum(1 for line in trail.read_bytes().splitlines() if line.strip())

        def dropped(peer) -> float:
            _, _, body = get(peer, "/metrics")
            (line,) = [x for x in body.decode().splitlines()
                       if x.startswith("pacsp2p_audit_records_dropped_total ")]
            return float(line.split()[1])
        with Peer(tmp_path / "peer", name="full",
                  config={"peer": {"data_dir": str(data)}}) as peer:
            echo(peer.port, peer.ae_title)
            seen = [-1]

            def settled():                       # the same count two polls in a row
                now, last = records(), seen[0]
                seen[0] = now
                return now >= 2 and now == last
            wait_until(settled, 120, interval=2.0)
            before = records()
            filler = disk.fill(mnt)
            for _ in range(50):                  # 2 records each: association, C-ECHO
                echo(peer.port, peer.ae_title)
            filler.unlink()
            for _ in range(5):
                echo(peer.port, peer.ae_title)
            expected = before + 2 * 55
            wait_until(lambda: records() + dropped(peer) >= expected, 120, interval=1.0)
            lost = dropped(peer)
            assert records() + lost == expected, (records(), lost, expected)
            assert lost >= 2 * 40                 # the disk was full for most of them
        for line in trail.read_bytes().splitlines():
            if line.strip():
                json.loads(line)                  # whole lines: none cut, none merged


def test_the_login_form_keeps_a_long_next_address_whole(peer):
    """A search of 300 characters (percent-encoded names) as the page to go back to
    after logging in: the form carries it whole (values from DICOM are cut at 256
    characters; the console's own links are not)."""
    from urllib.parse import quote, urlencode
    target = "/console/studies?" + urlencode({"name": "MÜLLER-LÜDENSCHEIDT^" * 5,
                                              "patient_id": "X" * 60, "from": "2024-01-01"})
    assert len(target) > 256
    code, _, body = get(peer, "/console/login?next=" + quote(target, safe=""))
    assert code == 200
    assert f'value="{target.replace("&", "&amp;")}"'.encode() in body, body[-1500:]
