"""An archive that lies: what it lists and what it serves is hostile input.

A real peer manages a lying Orthanc (``pacsp2p.testing.liar``: a real HTTP server that
speaks Orthanc's REST API and answers wrong things on purpose) — alone, and beside a real
Orthanc that holds the same study:

- its crawl lists SOP Instance / Study UIDs that are not UIDs ("../../etc/passwd", 86
  digits): none of them enters the catalog (C-FIND never shows them), the valid ones do,
  and a warning says so;
- asked for an instance it has (crawled: the catalog has no hash to check), it serves
  another instance, a truncated file, or the instance relabelled with another SOP
  Instance UID in its data set: the C-MOVE never delivers any of them (failed
  sub-operations, by UID); with a real Orthanc holding good copies, every instance of
  the C-MOVE and of a C-GET arrives byte-identical from there.
"""
from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Orthanc, Peer, StoreSCP, datasets, echo, findscu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.liar import LyingFindSCP, LyingOrthanc

N = 6


def relabelled(path, uid: str) -> bytes:
    """The file *path* with another SOP Instance UID in its data set (file meta kept)."""
    ds = dcmread(path)
    ds.SOPInstanceUID = uid
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("liar-files")
    study = datasets.make_study(root / "study", size=16, patient_id="LIAR001",
                                series=(("CT", N, ExplicitVRLittleEndian),))
    other = datasets.make_study(root / "other", size=16, patient_id="OTHER01",
                                series=(("CT", 1, ExplicitVRLittleEndian),))
    bad = datasets.make_study(root / "bad", size=16, patient_id="BAD001",
                              series=(("CT", 4, ExplicitVRLittleEndian),))
    return study, other, bad


def lying(files) -> LyingOrthanc:
    """A lying Orthanc holding the study: instance 0 served as another instance, 1
    truncated, 2 relabelled, 3 listed with the FileSize "abc"; three more instances
    listed with invalid UIDs, one (of another study) under an Orthanc id that is a
    path."""
    study, other, bad = files
    o = LyingOrthanc()
    for p in study:
        o.add(p)
    o.add(bad[0], {"SOPInstanceUID": "../../etc/passwd"})
    o.add(bad[1], {"SOPInstanceUID": "1.2.3." + "4" * 80})
    o.add(bad[2], {"StudyInstanceUID": "../../x", "SOPInstanceUID": "1.2.3.4.5"})
    o.add(bad[3], oid="../../../system")          # an Orthanc id that is a path
    uids = [dn.sop_uid(p) for p in study]
    o.serve_instead(uids[0], other[0].read_bytes())
    o.serve_instead(uids[1], study[1].read_bytes()[:-100])
    o.serve_instead(uids[2], relabelled(study[2], "1.2.3.999"))
    o.sizes[o.by_uid[uids[3]]] = "abc"            # a size that is not one
    return o


def wait_crawled(p: Peer, n: int) -> None:
    wait_until(lambda: all(c["finished"] for c in get_json(p)["crawls"])
               and len(get_json(p)["crawls"]) == n, 60, 0.5, "crawls finished")


def images(p: Peer) -> list[tuple[str, str]]:
    rows, proc = findscu(p.port, p.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SeriesInstanceUID": "",
        "SOPInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sorted((str(r.StudyInstanceUID), str(r.SOPInstanceUID)) for r in rows)


def test_alone_it_lists_no_invalid_uid_and_delivers_no_lie(tmp_path, files):
    study = files[0]
    with lying(files) as o, StoreSCP(tmp_path / "scp", extra=["+B"]) as scp, \
            Peer(tmp_path / "peer", name="liarpeer", destinations={"STORESCP": scp.address},
                 config={"archives": [{"name": "liar", "adapter": "orthanc",
                                       "url": o.url}]}) as p:
        wait_crawled(p, 1)
        study_uid = dn.study_of(study)
        assert images(p) == sorted((study_uid, dn.sop_uid(f)) for f in study)
        log = p.log_path.read_text()
        assert "3 listed instance(s) not recorded" in log and "../../etc/passwd" in log, \
            log[-3000:]

        proc = dn.movescu(p.port, p.ae_title, "STORESCP",
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})
        assert "Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" \
            in proc.stderr, proc.stderr[-2000:]
        # the three lies never arrive; what arrives is byte-identical (a source that
        # failed three times is dropped, so the good ones after it may fail too)
        delivered = dn.dataset_hashes(scp.files())
        for f in scp.files():
            assert str(dcmread(f, force=True).SOPInstanceUID) == f.name.split(".", 1)[1]
        assert delivered == {u: h for u, h in dn.dataset_hashes(study[3:]).items()
                             if u in delivered}
        log = p.log_path.read_text()
        assert f"{len(delivered)} completed, {N - len(delivered)} failed" in log, log[-3000:]
        for uid, why in ((dn.sop_uid(study[0]), "holds '"), (dn.sop_uid(study[1]),
                         "truncated"), (dn.sop_uid(study[2]), "holds '1.2.3.999'")):
            assert f"failed on {uid}: the copy of {uid} on liar@liarpeer" in log, log[-3000:]
        assert "truncated: an element runs past the end" in log
        assert "holds '1.2.3.999'" in log
        # the instance listed under a path-like id is not recorded: no request is ever
        # built with it
        dn.movescu(p.port, p.ae_title, "STORESCP",
                   {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": dn.study_of(files[2])})
        assert not [h for h in o.hits if ".." in h], o.hits


def test_beside_a_real_orthanc_every_instance_arrives_byte_identical(tmp_path, files):
    study = files[0]
    with Orthanc(tmp_path / "orthanc") as real, lying(files) as o, \
            StoreSCP(tmp_path / "scp", extra=["+B"]) as scp:
        for f in study:
            real.upload(f)
        with Peer(tmp_path / "peer", name="twopacs", destinations={"STORESCP": scp.address},
                  config={"archives": [
                      {"name": "liar", "adapter": "orthanc", "url": o.url},
                      {"name": "real", "adapter": "orthanc", "url": real.url}]}) as p:
            wait_crawled(p, 2)
            study_uid = dn.study_of(study)
            for _ in range(2):           # whichever replica each instance is read from
                dn.clear(scp.directory)
                proc = dn.movescu(p.port, p.ae_title, "STORESCP",
                                  {"QueryRetrieveLevel": "STUDY",
                                   "StudyInstanceUID": study_uid})
                assert proc.returncode == 0, proc.stderr[-2000:]
                assert "Final Move Response (Success)" in proc.stderr, proc.stderr[-2000:]
                assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)
            out = tmp_path / "get"
            proc = dn.getscu(p.port, p.ae_title, out, {"QueryRetrieveLevel": "STUDY",
                                                       "StudyInstanceUID": study_uid})
            assert proc.returncode == 0, proc.stderr[-2000:]
            received = [f for f in out.iterdir() if f.is_file()]
            assert dn.dataset_hashes(received) == dn.dataset_hashes(study)
            assert o.hits.get("/tools/lookup", 0) + sum(
                v for k, v in o.hits.items() if k.endswith("/file")) > 0, o.hits


def test_an_endless_answer_is_cut_and_a_trickle_lets_go(tmp_path, files):
    """/studies answers 150 MB of JSON: the peer stops reading at its bound (64 MB) and
    says so; an instance's file comes a byte a second: the peer lets the connection go
    after its timeout (3 s here: a read waits for the rest of a body of known length, up
    to 64 KB) instead of holding a thread of the archive's pool for as long as the
    archive likes."""
    study = files[0]
    o = LyingOrthanc()
    for f in study:
        o.add(f)
    o.endless("/studies", 150 << 20)
    with o, Peer(tmp_path / "peer", name="endless", config={
            "archives": [{"name": "liar", "adapter": "orthanc", "url": o.url}]}) as p:
        wait_until(lambda: (get_json(p)["crawls"][0]["error"] or "").find("longer than") >= 0,
                   120, 1.0, "the crawl stopped at the bound")
        assert o.sent["/studies"] < 100 << 20, o.sent
        assert p.alive and echo(p.port, p.ae_title)

    o = LyingOrthanc()
    for f in study:
        o.add(f)
    slow = dn.sop_uid(study[0])
    o.trickle(slow, every=1.0, at_most=90.0)
    with o, StoreSCP(tmp_path / "scp", extra=["+B"]) as scp, \
            Peer(tmp_path / "peer2", name="trickled", destinations={"STORESCP": scp.address},
                 config={"archives": [{"name": "liar", "adapter": "orthanc", "url": o.url,
                                       "timeout": 3}]}) as p:
        wait_crawled(p, 1)
        proc = dn.movescu(p.port, p.ae_title, "STORESCP",
                          {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": dn.study_of(study),
                           "SeriesInstanceUID": dcmread(study[0]).SeriesInstanceUID,
                           "SOPInstanceUID": slow}, timeout=150)
        assert "Final Move Response" in proc.stderr, proc.stderr[-2000:]
        assert not scp.files()
        wait_until(lambda: slow in o.gone, 60, 0.5, "the peer closed the trickle")
        assert o.gone[slow] < 30, o.gone
        log = p.log_path.read_text()
        assert "/file: timed out" in log or "/file: too slow" in log, log[-3000:]


def test_a_dimse_archive_counting_in_words_is_still_crawled(tmp_path):
    """A DIMSE archive whose C-FIND answers NumberOfStudyRelatedInstances "abc" for one
    study: the crawl goes on without a total (it stopped at the first page: "invalid
    literal for int()", nothing recorded, at every start) and records both studies."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    studies = {"1.2.3.1": (b"abc ", [("1.2.3.1.1", "1.2.3.1.1.1", ct)]),
               "1.2.3.2": (b"2 ", [("1.2.3.2.1", "1.2.3.2.1.1", ct),
                                   ("1.2.3.2.1", "1.2.3.2.1.2", ct)])}
    with LyingFindSCP(studies) as scp, Peer(tmp_path / "peer", name="words", config={
            "archives": [{"name": "pacs", "adapter": "dimse", "ae_title": scp.ae_title,
                          "host": "127.0.0.1", "port": scp.port}]}) as p:
        wait_crawled(p, 1)
        crawl = get_json(p)["crawls"][0]
        assert crawl["error"] is None and crawl["done"] == 3, crawl
        assert [u for _, u in images(p)] == ["1.2.3.1.1.1", "1.2.3.2.1.1", "1.2.3.2.1.2"]
