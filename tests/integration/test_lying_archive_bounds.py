"""A DIMSE archive that lies: what it answers is bounded, checked, and refused cleanly.

A real peer (twistd) manages a ``dimse`` archive that is a lying pynetdicom SCP
(``pacsp2p.testing.liar.LyingFindSCP``, in a thread of the test):

- its C-FIND answers Pending matches for ever: each query is cancelled past
  ``max_find_rows`` matches, the crawl pages by StudyDate down to one day and stops with
  an error naming the setting; the archive stops sending, the peer's RSS stays put and it
  still answers C-ECHO;
- it holds more studies than ``max_find_rows``: the crawl pages by StudyDate ranges and
  records every instance;
- its C-GET sends a data set larger than ``max_dataset``: the retrieval of that instance
  fails with one clear line, nothing of it stays on disk or in memory, and a normal
  instance beside it is retrieved;
- its rows carry UIDs that are not UIDs: they are skipped with one line each kind, and
  never sent back to the archive as a query key;
- it stops in the middle of a PDU and keeps the connection open: the read gives up
  after ``timeout`` seconds and that instance fails (pynetdicom's socket has no timeout:
  the reading thread, and the adapter's thread aborting the association, waited for
  ever).

A DICOMweb archive (a lying HTTP server, ``LyingOrthanc`` answering QIDO-RS) that
ignores ``offset`` and lists the same page of studies for ever: the crawl stops at the
second page with an error that says so (it asked for 100,000 pages), the study row
whose UID is a path is skipped with one warning.
"""
from __future__ import annotations

import time

from pacsp2p.testing import Peer, StoreSCP, echo, findscu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.fuzz.watch import RssPeak, rss_kib
from pacsp2p.testing.liar import LyingFindSCP, LyingOrthanc, StallingProxy

CT = "1.2.840.10008.5.1.4.1.1.2"


def archive(scp: LyingFindSCP, **extra) -> dict:
    return {"name": "pacs", "adapter": "dimse", "ae_title": scp.ae_title,
            "host": "127.0.0.1", "port": scp.port, "timeout": 10, **extra}


def crawl(p: Peer) -> dict:
    return get_json(p)["crawls"][0]


def images(p: Peer) -> list[str]:
    rows, proc = findscu(p.port, p.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SeriesInstanceUID": "",
        "SOPInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted(str(r.SOPInstanceUID) for r in rows)


def test_an_endless_find_is_cancelled_and_the_crawl_says_why(tmp_path):
    with LyingFindSCP({}, endless=True) as scp, Peer(tmp_path / "peer", name="endless", config={
            "archives": [archive(scp, max_find_rows=200)]}) as p:
        with RssPeak(p.pid) as rss:
            wait_until(lambda: "cannot page further" in (crawl(p)["error"] or ""), 180, 0.5,
                       "the crawl stopped at the bound")
        sent = scp.sent
        time.sleep(2)
        assert scp.sent == sent, "the archive still sends"
        # universal, then halved date windows down to one day: each cut after 200
        assert 200 < sent < 40 * 1000, sent
        assert "raise max_find_rows" in crawl(p)["error"]
        assert rss.peak - rss.first < 64 << 10, (rss.first, rss.peak)
        assert p.alive and echo(p.port, p.ae_title)
        log = p.log_path.read_text()
        assert log.count("more than 200 studies: crawled by StudyDate ranges") == 1, \
            log[-3000:]


def test_a_fat_match_cuts_the_find(tmp_path):
    """A match of 1 MB (a StudyDescription of a million characters): the association
    is cut past 64 KiB of it and the crawl stops naming why (before: every match was
    read whole into memory, however large, whatever their number)."""
    studies = {"1.2.3.1": (b"1 ", [("1.2.3.1.1", "1.2.3.1.1.1", CT)])}
    with LyingFindSCP(studies, fat=1 << 20) as scp, Peer(tmp_path / "peer", name="fat", config={
            "archives": [archive(scp)]}) as p:
        wait_until(lambda: crawl(p)["error"], 60, 0.5, "the crawl stopped")
        assert "C-FIND STUDY to LIAR: cut: a data set over 65536 bytes" in crawl(p)["error"]
        assert p.alive and echo(p.port, p.ae_title)


def test_more_studies_than_one_answer_are_crawled_by_date(tmp_path):
    studies = {f"1.2.3.{i}": (b"1 ", [(f"1.2.3.{i}.1", f"1.2.3.{i}.1.1", CT)],
                              f"{1995 + i % 30}{1 + i % 12:02d}{1 + i % 28:02d}")
               for i in range(1, 41)}
    with LyingFindSCP(studies) as scp, Peer(tmp_path / "peer", name="paged", config={
            "archives": [archive(scp, max_find_rows=10)]}) as p:
        wait_until(lambda: crawl(p)["finished"] or crawl(p)["error"], 180, 0.5,
                   "the crawl finished")
        assert crawl(p)["error"] is None, crawl(p)
        assert images(p) == sorted(f"1.2.3.{i}.1.1" for i in range(1, 41))
        dated = [q["StudyDate"] for q in scp.queries if "StudyDate" in q]
        assert dated and all("-" in d for d in dated), scp.queries[:5]


def _undated_crawl_ends(tmp_path, most: int, line: str, **lies) -> None:
    """40 undated studies past the bound (10) on a LyingFindSCP lying as *lies* say: the
    crawl ends without an error after fewer than *most* Patient ID C-FINDs, its log
    says *line*, and the peer still answers."""
    studies = {f"1.2.4.{i}": (b"1 ", [(f"1.2.4.{i}.1", f"1.2.4.{i}.1.1", CT)])
               for i in range(1, 41)}
    with LyingFindSCP(studies, probe_honest=True, **lies) as scp, Peer(
            tmp_path / "peer", name="trie", config={
                "archives": [archive(scp, max_find_rows=10, crawl_qps=200)]}) as p:
        wait_until(lambda: crawl(p)["finished"] or crawl(p)["error"], 180, 0.5,
                   "the crawl finished")
        assert crawl(p)["error"] is None, crawl(p)
        asked = [q["PatientID"] for q in scp.queries if "PatientID" in q]
        assert asked and len(asked) < most, len(asked)
        assert line in p.log_path.read_text()
        assert p.alive and echo(p.port, p.ae_title)


def test_an_archive_ignoring_patient_id_keys_does_not_hold_the_crawl(tmp_path):
    """An archive that answers the probe (a Patient ID no one has) but ignores every
    other Patient ID key: the trie of Patient ID prefixes is left after a few Patient
    IDs answer too many, and the crawl ends."""
    _undated_crawl_ends(tmp_path, 40, "Patient IDs answered more than the bound")


def test_an_archive_answering_every_patient_id_wildcard_too_many_does_not_hold_the_crawl(
        tmp_path):
    """An archive that answers the probe and single Patient IDs (nothing) but every
    other wildcard with all its studies: every prefix splits and none lists a study.
    The trie is left after PID_MAX splits in a row that listed nothing (a real trie
    lists rows within that many: a prefix over the bound has them below it). Before:
    the crawl walked 64-deep prefixes and their siblings for ever (not finished after
    180 s)."""
    _undated_crawl_ends(tmp_path, 300, "Patient ID prefixes in a row answered more than "
                        "the bound", exact_empty=True)


def test_an_oversized_get_is_refused_and_a_normal_one_arrives(tmp_path):
    big, small = "1.2.3.1.1.1", "1.2.3.1.1.2"
    studies = {"1.2.3.1": (b"2 ", [("1.2.3.1.1", big, CT), ("1.2.3.1.1", small, CT)])}
    with LyingFindSCP(studies, sizes={big: 48 << 20, small: 64 << 10}) as scp, \
            StoreSCP(tmp_path / "scp", extra=["+B"]) as dest, \
            Peer(tmp_path / "peer", name="oversized", destinations={"STORESCP": dest.address},
                 config={"archives": [archive(scp, max_dataset=1 << 20)]}) as p:
        wait_until(lambda: crawl(p)["finished"], 60, 0.5, "crawl finished")
        assert images(p) == [big, small]
        first = rss_kib(p.pid)
        with RssPeak(p.pid) as rss:
            proc = dn.movescu(p.port, p.ae_title, "STORESCP", {
                "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3.1",
                "SeriesInstanceUID": "1.2.3.1.1"},
                timeout=150)
        assert "Final Move Response" in proc.stderr, proc.stderr[-2000:]
        assert [dn.sop_uid(f) for f in dest.files()] == [small]
        assert rss.peak - first < 24 << 10, (first, rss.peak)
        log = p.log_path.read_text()
        assert f"C-GET of {big} from LIAR: cut: a data set over 1048576 bytes " \
               "(max_dataset 1048576)" in log, log[-3000:]
        left = [f for f in (p.data_dir / "incoming").iterdir() if f.is_file()]
        assert not left, left
        assert p.alive and echo(p.port, p.ae_title)


def test_rows_with_bad_uids_are_skipped_and_never_asked_for(tmp_path):
    studies = {"1.2.3.1": (b"1 ", [("1.2.3.1.1", "1.2.3.1.1.1", CT)]),
               "../../etc/passwd": (b"1 ", [("1.2.3.2.1", "1.2.3.2.1.1", CT)]),
               "1.2.3.3": (b"2 ", [("1.2.3.3.1", "1.2.3.3.1.1", CT),
                                   ("1.2.3.3.1", "1.2.3.abc", CT)]),
               "1.2.3.4": (b"1 ", [("x/../y", "1.2.3.4.1.1", CT)])}
    with LyingFindSCP(studies) as scp, Peer(tmp_path / "peer", name="baduids", config={
            "archives": [archive(scp)]}) as p:
        wait_until(lambda: crawl(p)["finished"], 60, 0.5, "crawl finished")
        assert images(p) == ["1.2.3.1.1.1", "1.2.3.3.1.1"]
        asked = {q.get(k) for q in scp.queries for k in ("StudyInstanceUID",
                                                         "SeriesInstanceUID")}
        assert not asked & {"../../etc/passwd", "x/../y"}, scp.queries
        log = p.log_path.read_text()
        assert log.count("1 study row(s) skipped: StudyInstanceUID is not a UID "
                         "(e.g. '../../etc/passwd')") == 1, log[-3000:]
        assert "1 series row(s) skipped: SeriesInstanceUID is not a UID (e.g. 'x/../y')" \
            in log, log[-3000:]
        assert "1 listed instance(s) not recorded" in log and "1.2.3.abc" in log
        assert p.alive and echo(p.port, p.ae_title)


def test_an_archive_stopping_mid_pdu_is_let_go(tmp_path):
    stuck, other = "1.2.3.1.1.1", "1.2.3.1.1.2"
    studies = {"1.2.3.1": (b"2 ", [("1.2.3.1.1", stuck, CT), ("1.2.3.1.1", other, CT)])}
    with LyingFindSCP(studies, sizes={stuck: 1 << 20}) as scp, \
            StallingProxy(scp.port) as proxy, \
            StoreSCP(tmp_path / "scp", extra=["+B"]) as dest, \
            Peer(tmp_path / "peer", name="stalled", destinations={"STORESCP": dest.address},
                 config={"archives": [{"name": "pacs", "adapter": "dimse",
                                       "ae_title": scp.ae_title, "host": "127.0.0.1",
                                       "port": proxy.port, "timeout": 3}]}) as p:
        wait_until(lambda: crawl(p)["finished"], 60, 0.5, "crawl finished")
        proxy.stall(200_000)
        proc = dn.movescu(p.port, p.ae_title, "STORESCP", {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2.3.1",
            "SeriesInstanceUID": "1.2.3.1.1", "SOPInstanceUID": stuck}, timeout=150)
        assert "Final Move Response" in proc.stderr, proc.stderr[-2000:]
        assert proxy.held > 0 and not dest.files()
        log = p.log_path.read_text()
        # before: the retrieval's own guard gave up on the source after 20 s, the
        # adapter's thread stayed blocked for ever
        assert f"C-GET of {stuck} from LIAR: cut: nothing received for 3 s" in log, \
            log[-3000:]
        assert p.alive and echo(p.port, p.ae_title)


def test_a_qido_service_ignoring_offset_is_not_listed_for_ever(tmp_path):
    pages = []          # the crawl's pages (an offset asked); the health probe asks none

    def studies(h):
        query = dict(p.partition("=")[::2] for p in h.path.partition("?")[2].split("&"))
        if "offset" in query:
            pages.append(query["offset"])
        rows = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]},
                 "00201208": {"vr": "IS", "Value": [1]}}
                for i in range(int(query.get("limit") or 1000))]
        rows[0] = {"0020000D": {"vr": "UI", "Value": ["../../x"]}}
        h.send_json(rows)

    with LyingOrthanc() as o:
        o.overrides["/dicom-web/studies"] = studies
        with Peer(tmp_path / "peer", name="qido", config={"archives": [
                {"name": "web", "adapter": "dicomweb", "url": f"{o.url}/dicom-web"}]}) as p:
            wait_until(lambda: "ignores offset" in (crawl(p)["error"] or ""), 120, 0.5,
                       "the crawl stopped")
            assert len(pages) <= 3, (pages, o.hits)
            log = p.log_path.read_text()
            assert log.count("1 study row(s) skipped: StudyInstanceUID is not a UID "
                             "(e.g. '../../x')") == 1, log[-3000:]
            assert p.alive and echo(p.port, p.ae_title)
