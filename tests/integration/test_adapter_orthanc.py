"""The ``orthanc`` adapter against a REAL Orthanc (REST API), through a real peer.

A peer whose only ``[[archives]]`` is an Orthanc: DCMTK storescu at the peer's facade
lands in Orthanc byte-identical (checked with Orthanc's own GET /instances/{id}/file);
findscu at the peer finds it; movescu from the peer returns it byte-identical; the
archive's health is up, and down (logged, no crash) once Orthanc is stopped.

Join: an Orthanc preloaded behind the cluster's back (REST upload, 500 tiny instances) is
crawled by the peer that manages it (findscu finds them all; /status "crawls" shows
done/total/rate); instances uploaded to Orthanc later are picked up through /changes in
bounded time; a peer restarted in mid-crawl resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pacsp2p.testing import Orthanc, Peer, StoreSCP, dataset_sha256, findscu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmtk import dataset_sha256_of, echo
from pacsp2p.testing.preload import tiny_corpus, upload_parallel

JOIN_N = 500
PER_STUDY = 50


def archive_block(orthanc: Orthanc, **extra) -> dict:
    return {"archives": [{"name": "pacs", "adapter": "orthanc", "url": orthanc.url, **extra}]}


def orthanc_file(orthanc: Orthanc, sop_uid: str) -> bytes:
    """The bytes Orthanc keeps for *sop_uid* (its own REST API, not the adapter)."""
    found = [r for r in orthanc.post("/tools/lookup", sop_uid.encode())
             if r["Type"] == "Instance"]
    assert len(found) == 1, f"{sop_uid} not in Orthanc: {found}"
    return orthanc.get(f"/instances/{found[0]['ID']}/file")


def crawl(peer: Peer) -> dict:
    crawls = get_json(peer)["crawls"]
    assert len(crawls) == 1, crawls
    return crawls[0]


def study_counts(peer: Peer, **keys) -> dict[str, int]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientID": "",
        "NumberOfStudyRelatedInstances": "", **keys}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {r.StudyInstanceUID: int(r.NumberOfStudyRelatedInstances) for r in rows}


# -- one peer storing into an empty Orthanc -------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return datasets.make_study(
        tmp_path_factory.mktemp("orthanc-study"), size=16, patient_id="ORTH001",
        patient_name="ORTHANC^ADAPTER", private=True,
        series=(("CT", 3, ExplicitVRLittleEndian), ("CT", 2, RLELossless),
                ("MR", 2, ImplicitVRLittleEndian)))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc-pacs")) as o:
        yield o


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    with StoreSCP(tmp_path_factory.mktemp("orthanc-scp") / "received", extra=["+B"]) as s:
        yield s


@pytest.fixture(scope="module")
def peer(tmp_path_factory, pacs, scp, study):
    p = Peer(tmp_path_factory.mktemp("orthanc-peer"), name="orth",
             destinations={"STORESCP": scp.address}, config=archive_block(pacs))
    with p:
        results = dn.store_unconverted(p.port, p.ae_title, study, extra=["-v"])
        p.store_output = "\n".join(r.stdout + r.stderr for r in results)
        yield p
    print(f"peer log: {p.log_path}")


def test_storescu_lands_in_orthanc_byte_identical(peer, pacs, study):
    out = peer.store_output
    assert out.count("Received Store Response (Success)") == len(study), out[-3000:]
    assert pacs.statistics()["CountInstances"] == len(study)
    for path in study:
        held = orthanc_file(pacs, dn.sop_uid(path))
        assert dataset_sha256_of(held) == dataset_sha256(path), path


def test_findscu_at_the_peer_finds_it(peer, study):
    counts = study_counts(peer, PatientID="ORTH001")
    assert list(counts.values()) == [len(study)]
    rows, _ = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": next(iter(counts)),
        "SOPInstanceUID": "", "SOPClassUID": ""})
    assert {r.SOPInstanceUID for r in rows} == {dn.sop_uid(p) for p in study}


def test_movescu_returns_it_byte_identical(peer, scp, study):
    study_uid = next(iter(study_counts(peer, PatientID="ORTH001")))
    proc = dn.movescu(peer.port, peer.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = dn.dataset_hashes(scp.files())
    assert got == dn.dataset_hashes(study)


def test_health_up(peer):
    h = get_json(peer)["archives"]["pacs"]
    assert h["up"] is True, h
    assert h["latency_ms"] >= 0 and h["used_bytes"] > 0


# -- join: crawling an Orthanc filled behind the cluster's back -----------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return tiny_corpus(tmp_path_factory.mktemp("join-corpus"), JOIN_N, per_study=PER_STUDY,
                       tag="ojoin")


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory, corpus):
    with Orthanc(tmp_path_factory.mktemp("orthanc-preloaded")) as o:
        assert upload_parallel(o, corpus) == JOIN_N
        yield o


def test_join_crawls_everything(tmp_path, preloaded, corpus):
    with Peer(tmp_path / "joiner", name="joiner", config=archive_block(preloaded)) as p:
        took = wait_until(lambda: crawl(p)["finished"], 60, 0.2, "crawl finished")
        c = crawl(p)
        assert c["done"] == JOIN_N and c["total"] == JOIN_N, c
        assert c["rate"] > 0 and c["error"] is None, c
        counts = study_counts(p)
        assert len(counts) == JOIN_N // PER_STUDY and sum(counts.values()) == JOIN_N
        one = dn.sop_uid(corpus[7])
        rows, _ = findscu(p.port, p.ae_title, {"QueryRetrieveLevel": "IMAGE",
                                                "StudyInstanceUID": "", "SOPInstanceUID": one,
                                                "PatientName": "", "SOPClassUID": ""})
        assert [r.SOPInstanceUID for r in rows] == [one]
        assert str(rows[0].PatientName).startswith("OJOIN^PATIENT")
        print(f"crawled {JOIN_N} instances in {took:.1f} s, crawl rate {c['rate']}/s")

        # new content behind the cluster's back: followed through /changes
        later = tiny_corpus(tmp_path / "later", 20, per_study=20, tag="olater")
        upload_parallel(preloaded, later)
        t0 = time.monotonic()
        wait_until(lambda: sum(study_counts(p, PatientID="OLATER*").values()) == 20, 40,
                   0.5, "the 20 later instances found")
        print(f"later instances found after {time.monotonic() - t0:.1f} s")
        assert "new instance(s) found" in p.log_path.read_text()
        # the crawl's progress counts the crawl; what was found later is apart (16.4)
        wait_until(lambda: crawl(p)["followed"] == 20, 20, 0.5, "followed instances counted")
        c = crawl(p)
        assert c["done"] == JOIN_N and c["total"] == JOIN_N and c["followed"] == 20, c


def test_restart_in_mid_crawl_resumes(tmp_path, preloaded):
    # slow crawl: one study per page, 4 queries per second
    cfg = archive_block(preloaded, crawl_qps=4, page_studies=1)
    p = Peer(tmp_path / "resumer", name="resumer", config=cfg)
    with p:
        wait_until(lambda: PER_STUDY <= crawl(p)["done"] < JOIN_N - 2 * PER_STUDY, 60, 0.1,
                   "crawl in progress")
        before = crawl(p)["done"]
        p.restart()
        first = crawl(p)
        assert first["done"] >= before - PER_STUDY and first["done"] > 0, (before, first)
        assert not first["finished"] or first["done"] >= JOIN_N
        wait_until(lambda: crawl(p)["finished"], 90, 0.2, "resumed crawl finished")
        c = crawl(p)
        log = p.log_path.read_text()
        assert "resuming after" in log, log[-3000:]
        assert JOIN_N <= c["done"] <= JOIN_N + PER_STUDY, c     # at most one page again
        assert sum(study_counts(p).values()) >= JOIN_N


# -- Orthanc stopped: the archive is down, the peer lives on -------------------------------

def test_orthanc_stopped_is_down_logged_no_crash(tmp_path):
    o = Orthanc(tmp_path / "doomed").start()
    try:
        with Peer(tmp_path / "survivor", name="survivor", config=archive_block(o)) as p:
            assert get_json(p)["archives"]["pacs"]["up"] is True
            o.stop()
            h = wait_until(lambda: not get_json(p, timeout=30)["archives"]["pacs"]["up"], 30,
                           0.5, "archive seen down")
            assert h >= 0
            h = get_json(p, timeout=30)["archives"]["pacs"]
            assert h["up"] is False and "refused" in h["error"], h
            assert p.alive and echo(p.port, p.ae_title)
            wait_until(lambda: "stopped answering" in p.log_path.read_text(), 20, 0.5,
                       "down logged")
            rows, proc = findscu(p.port, p.ae_title, {"QueryRetrieveLevel": "STUDY",
                                                      "StudyInstanceUID": ""})
            assert proc.returncode == 0 and rows == []
    finally:
        o.stop()


# -- the adapter's own operations, in process (reactor in a thread) ------------------------

@pytest.fixture(scope="module")
def running_reactor():
    import threading

    from twisted.internet import reactor
    if not reactor.running:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                         daemon=True, name="reactor").start()
    return reactor


def test_send_duplicate_conflict_discard(tmp_path, running_reactor, study):
    from twisted.internet.threads import blockingCallFromThread

    from pacsp2p.adapters.orthanc import OrthancArchive
    from pacsp2p.config import Destination
    from pacsp2p.dicom.header import read_meta

    reactor = running_reactor

    def call(fn, *args):
        return blockingCallFromThread(reactor, fn, *args)

    with Orthanc(tmp_path / "ops") as o, \
            StoreSCP(tmp_path / "ops-received", extra=["+B"]) as scp:
        a = OrthancArchive("ops", reactor, url=o.url, incoming=tmp_path / "incoming")
        call(a.start)
        try:
            metas = [read_meta(p) for p in study]
            stored = [call(a.store, p, m) for p, m in zip(study, metas)]
            assert not any(s.duplicate or s.conflict for s in stored)
            again = call(a.store, study[0], metas[0])
            assert again.duplicate and again.sha256 == stored[0].sha256

            # direct send: Orthanc itself C-STOREs to storescp
            dest = Destination("STORESCP", "127.0.0.1", scp.port, "direct")
            uids = [m.sop_instance_uid for m in metas] + ["1.2.3.4.404"]
            result = call(a.send, uids, dest)
            assert result == {"completed": len(study), "failed": 1, "warning": 0,
                              "failed_uids": ["1.2.3.4.404"]}, result
            assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)

            other = datasets.write(datasets.make_image(
                "CT", size=16, SOPInstanceUID=metas[0].sop_instance_uid, PatientID="OTHER"),
                tmp_path / "other.dcm")
            clash = call(a.store, other, read_meta(other))
            assert clash.conflict and not clash.duplicate
            held = len(study) + 1          # another patient: Orthanc keeps both copies
            assert o.statistics()["CountInstances"] == held
            f = call(a.open, metas[0].sop_instance_uid, clash.sha256)   # the copy named
            with f:
                assert dataset_sha256_of(f.read()) == clash.sha256

            # discard: only a copy whose data set is the one named
            call(a.discard, metas[1].sop_instance_uid, "0" * 64)
            assert o.statistics()["CountInstances"] == held
            call(a.discard, metas[1].sop_instance_uid, stored[1].sha256)
            assert o.statistics()["CountInstances"] == held - 1
            with pytest.raises(KeyError):
                call(a.open, metas[1].sop_instance_uid)
        finally:
            call(a.stop)


def test_config_errors_name_file_key_and_reason(tmp_path):
    from pacsp2p.adapters import make_archive
    from pacsp2p.config import ConfigError, from_dict

    def settings(**block):
        return from_dict({"peer": {"data_dir": str(tmp_path)}, "archives": [
            {"name": "local", "adapter": "embedded"},
            {"name": "pacs", "adapter": "orthanc", **block}]}, "site.toml", tmp_path)

    cases = [({}, "site.toml: archives[1].url: required"),
             ({"url": "ftp://x"}, "site.toml: archives[1].url: must be an http"),
             ({"url": "http://x", "crawl_qps": 0}, "archives[1].crawl_qps: must be a positive"),
             ({"url": "http://x", "colour": "red"}, "archives[1].colour: unknown key")]
    for block, message in cases:
        s = settings(**block)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_archive(s.archives[1], s, None)
