"""The web console of a peer in a cluster, in Debian's headless Chromium: two real peers
(twistd processes, overlay over mutual TLS, two copies of every instance), a study sent
to one of them by DCMTK storescu.

- the overview lists both peers alive (with a probe round trip) and both archives with the instances
  they hold; the study page shows each instance's two copies, both readable;
- once the other peer is stopped, the overview shows it dead and the study page shows
  its copies as not readable, and how many instances are short of copies.

Screenshots under the test's tmp dir (paths printed and recorded).
"""
from __future__ import annotations

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from selenium.webdriver.common.by import By

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing.browser import Screenshots, chromium, texts, wait_until
from pacsp2p.testing.cluster import get_json, members


def test_console_shows_peers_and_where_copies_live(make_cluster, tmp_path,
                                                    record_property):
    cluster = make_cluster(2)
    a, b = cluster[0], cluster[1]
    files = datasets.make_study(tmp_path / "in", patient_name="CLUSTER^CARL",
                                patient_id="CLU001", size=16,
                                series=[("CT", 4, ExplicitVRLittleEndian)])
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(a.port, a.ae_title, files).returncode == 0
    for peer in (a, b):
        wait_until(lambda p=peer: get_json(p)["catalog"]["locations"] == 8,
                   f"both copies known to {peer.name}")
    shot = Screenshots(tmp_path / "screenshots", record_property)
    with chromium(tmp_path / "chromium-profile") as browser:
        def overview():
            browser.get(f"{a.admin_url}/console/")
            return {r.split()[0]: r for r in texts(browser, "#peers tbody tr")}, \
                texts(browser, "#archives tbody tr")

        def counted():
            peers, archives = overview()
            return len(archives) == 2 and all(" 4 " in f" {r} " for r in archives) and \
                (peers, archives)
        peers, archives = wait_until(counted, "both archives counted")
        assert peers[a.name].startswith(f"{a.name} (this peer) alive")
        assert peers[b.name].startswith(f"{b.name} alive")
        rtt = peers[b.name].split()[2]       # ms of the last probe answered, or "—"
        assert rtt == "—" or float(rtt) >= 0.0
        assert sorted(r.split()[0] for r in archives) == [a.name, b.name]
        assert all(" up " in r for r in archives)
        shot(browser, "cluster-overview")

        browser.get(f"{a.admin_url}/console/study/{study}")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.instance")
        assert len(rows) == 4
        for row in rows:
            assert sorted(c.text for c in row.find_elements(By.CSS_SELECTOR, ".copy.alive")) \
                == [f"{a.name}/local ✓", f"{b.name}/local ✓"]
        assert sorted(texts(browser, "#holders tbody tr")) == [
            f"{a.name} local 4 live", f"{b.name} local 4 live"]
        shot(browser, "cluster-study")

        b.stop()
        wait_until(lambda: members(a).get(b.name) == "dead", f"{b.name} dead to {a.name}")
        peers, _ = overview()
        assert peers[b.name].startswith(f"{b.name} dead")
        browser.get(f"{a.admin_url}/console/study/{study}")
        for row in browser.find_elements(By.CSS_SELECTOR, "tr.instance"):
            assert [c.text for c in row.find_elements(By.CSS_SELECTOR, ".copy.alive")] == \
                [f"{a.name}/local ✓"]
            assert [c.text for c in row.find_elements(By.CSS_SELECTOR, ".copy.dead")] == \
                [f"{b.name}/local ✗"]
        assert sorted(texts(browser, "#holders tbody tr")) == [
            f"{a.name} local 4 live", f"{b.name} local 4 not live"]
        facts = " ".join(texts(browser, ".facts div"))
        assert "FEWER THAN 2 LIVE COPIES\n4" in facts.upper() or \
            "fewer than 2 live copies\n4" in facts
        shot(browser, "cluster-study-peer-dead")
