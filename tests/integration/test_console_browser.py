"""The web console in a real browser: Debian's headless Chromium driven by selenium
(/usr/bin/chromium, /usr/bin/chromedriver), against a real peer (a twistd process)
holding real studies that DCMTK storescu sent it.

- the study list shows every stored patient; a search by name narrows it;
- the study page lists the series and instances and where each copy lives
  (peer/archive, readable now);
- retrieving needs a login: the page says so; after logging in (the ``[admin] users``
  form) the study goes to a configured destination (DCMTK storescp), and the
  retrievals page shows it finished with its source;
- a page of another origin cannot make the logged-in browser start a retrieval (the
  cookie is SameSite=Strict, and the Origin is not the console's);
- the overview lists the peer and its archive.

Screenshots of each page are saved under the test's tmp dir; their paths are printed
and recorded as properties of the test (``record_property``). Waits poll with long
bounds (nothing depends on a short wall-clock timeout).
"""
from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from pacsp2p.admin.auth import hash_password
from pacsp2p.testing import Peer, StoreSCP, datasets, storescu
from pacsp2p.testing.browser import Screenshots, chromium, texts, wait_until

PASSWORD = "correct horse battery"


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


@pytest.fixture
def shots(tmp_path, record_property):
    return Screenshots(tmp_path / "screenshots", record_property)


def audit_extensions(peer) -> list[dict]:
    """The "extension" parts of the peer's audit records (admin actions carry theirs)."""
    path = peer.data_dir / "audit.log"
    if not path.exists():
        return []
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "action" in value and "kind" in value:
                found.append(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
    for line in path.read_text().splitlines():
        try:
            walk(json.loads(line))
        except ValueError:
            pass
    return found


class OtherSite:
    """An HTTP server on another port (another origin) with a page whose form posts to
    the console's retrieve action at once."""

    def __init__(self, directory: Path, target: str, study: str):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "index.html").write_text(
            f'<!doctype html><form id="f" method="post" action="{target}">'
            f'<input name="study" value="{study}"><input name="destination" '
            f'value="STORESCP"><input name="csrf" value="guessed"></form>'
            f'<script>document.getElementById("f").submit()</script>')
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(  # noqa: E731
            *a, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://localhost:{self.server.server_address[1]}/index.html"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_console_lists_studies_shows_copies_and_retrieves(tmp_path, browser, shots):
    jane = datasets.make_study(tmp_path / "in" / "jane", patient_name="DOE^JANE",
                               patient_id="CONS001", size=16, StudyDate="20240131",
                               AccessionNumber="ACC-JANE", StudyDescription="CT chest",
                               series=[("CT", 3, ExplicitVRLittleEndian),
                                       ("MR", 2, ExplicitVRLittleEndian)])
    richard = datasets.make_study(tmp_path / "in" / "richard", patient_name="ROE^RICHARD",
                                  patient_id="CONS002", size=16, StudyDate="20230506",
                                  AccessionNumber="ACC-ROE", seed=7,
                                  series=[("US", 2, ExplicitVRLittleEndian)])
    study = str(dcmread(jane[0], stop_before_pixels=True).StudyInstanceUID)
    sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in jane}
    with StoreSCP(tmp_path / "received") as scp, \
            Peer(tmp_path / "peer", name="console", destinations={"STORESCP": scp.address},
                 config={"admin": {"users": {"alice": hash_password(PASSWORD)}}}) as peer:
        sent = storescu(peer.port, peer.ae_title, [tmp_path / "in"])
        assert sent.returncode == 0, sent.stderr[-2000:]
        base = peer.admin_url

        # the study list: every stored patient, newest study first
        browser.get(f"{base}/console/studies")
        rows = texts(browser, "#studies tbody tr")
        assert len(rows) == 2, rows
        assert rows[0].startswith("DOE, JANE") and "CONS001" in rows[0]
        assert "2024-01-31" in rows[0] and "ACC-JANE" in rows[0] and "CT, MR" in rows[0]
        assert rows[1].startswith("ROE, RICHARD") and "2023-05-06" in rows[1]
        shots(browser, "studies")

        # a search by name (a prefix, any case) and one by modality
        box = browser.find_element(By.NAME, "name")
        box.send_keys("roe")
        box.submit()
        wait_until(lambda: "name=roe" in browser.current_url, "the search ran")
        assert [r.split("\n")[0] for r in texts(browser, "#studies tbody tr")] == \
            [texts(browser, "#studies tbody tr")[0].split("\n")[0]]
        assert texts(browser, "#studies tbody tr")[0].startswith("ROE, RICHARD")
        browser.get(f"{base}/console/studies?modality=MR")
        assert [r[:9] for r in texts(browser, "#studies tbody tr")] == ["DOE, JANE"]

        # the study page: its series, its instances and where each copy is
        browser.find_element(By.CSS_SELECTOR, "a.study").click()
        wait_until(lambda: "/console/study/" in browser.current_url, "the study page")
        assert browser.find_element(By.ID, "study-uid").text == study
        instances = browser.find_elements(By.CSS_SELECTOR, "tr.instance")
        assert len(instances) == 5
        shown = {e.find_element(By.TAG_NAME, "code").text for e in instances}
        assert shown == sops
        for row in instances:
            assert [c.text for c in row.find_elements(By.CSS_SELECTOR, ".copy.alive")] == \
                ["console/local ✓"]
        holders = texts(browser, "#holders tbody tr")
        assert holders == ["console local 5 live"], holders
        assert len(browser.find_elements(By.CSS_SELECTOR, "section.series")) == 2
        # retrieving needs a login first
        assert browser.find_elements(By.ID, "retrieve-login")
        assert not browser.find_elements(By.ID, "retrieve")
        shots(browser, "study")

        # log in (the link brings the browser back to this study)
        browser.find_element(By.LINK_TEXT, "log in").click()
        wait_until(lambda: browser.find_elements(By.ID, "password"), "the login form")
        browser.find_element(By.ID, "user-name").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys("not the password")
        browser.find_element(By.ID, "login").click()
        wait_until(lambda: "Wrong user name or password" in browser.page_source,
                   "the login refused")
        browser.find_element(By.ID, "user-name").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        wait_until(lambda: browser.find_elements(By.ID, "retrieve"), "the retrieve form")
        assert browser.find_element(By.ID, "user").text == "alice"
        assert f"/console/study/{study}" in browser.current_url

        # a page of another origin cannot make this browser retrieve
        other = OtherSite(tmp_path / "other-site", f"{base}/console/retrieve", study)
        try:
            browser.get(other.url)
            wait_until(lambda: "/console/retrieve" in browser.current_url,
                       "the other site's form posted")
            assert "Refused" in browser.page_source or "Log in" in browser.page_source
        finally:
            other.close()
        status = json.load(urllib.request.urlopen(f"{base}/status", timeout=60))
        assert status["retrievals"] == []

        # retrieve to the configured destination
        browser.get(f"{base}/console/study/{study}")
        Select(browser.find_element(By.ID, "destination")).select_by_visible_text("STORESCP")
        browser.find_element(By.ID, "retrieve-button").click()
        wait_until(lambda: browser.current_url.endswith("/console/retrievals"),
                   "the retrievals page")
        wait_until(lambda: len(scp.files()) == 5, "the study received by storescp")
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in scp.files()} == sops

        def finished():
            browser.get(f"{base}/console/retrievals")
            return "finished" in " ".join(texts(browser, "#requested tbody tr"))
        wait_until(finished, "the retrieval shown finished")
        asked = texts(browser, "#requested tbody tr")
        assert len(asked) == 1 and "STORESCP" in asked[0] and "alice" in asked[0]
        assert "5 of 5" in asked[0]
        sources = texts(browser, "section.retrieval table.sources tbody tr")
        assert len(sources) == 1 and sources[0].startswith("console/local console local")
        assert "serving 5 0" in sources[0] and "MB/s" in sources[0]
        heading = browser.find_element(By.CSS_SELECTOR, "section.retrieval h3").text
        assert "C-MOVE to STORESCP" in heading and "finished" in heading
        shots(browser, "retrievals")
        # the audit trail has who asked for which study to go where
        wait_until(lambda: any(
            x.get("action") == "retrieve" and x.get("user") == "alice" and
            x.get("level") == "STUDY" for x in audit_extensions(peer)), "the audit record")

        # the overview: this peer, its archive (adapter, up, instances, free space)
        browser.get(f"{base}/console/")
        peers = texts(browser, "#peers tbody tr")
        assert len(peers) == 1 and peers[0].startswith("console (this peer) alive")
        archives = texts(browser, "#archives tbody tr")
        assert len(archives) == 1 and archives[0].startswith("console local embedded")
        assert " up 7 " in f" {archives[0]} " and "GiB" in archives[0]
        assert "1 running" not in browser.page_source
        shots(browser, "overview")

        # log out: the retrieve form is gone again
        browser.get(f"{base}/console/study/{study}")
        browser.find_element(By.XPATH, "//button[text()='Log out']").click()
        wait_until(lambda: browser.find_elements(By.ID, "password"), "logged out")
        browser.get(f"{base}/console/study/{study}")
        assert not browser.find_elements(By.ID, "retrieve")
        assert len(richard) == 2
