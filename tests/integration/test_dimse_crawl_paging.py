"""The ``dimse`` crawl of a REAL archive (DCMTK dcmqrscp, Orthanc) holding more studies
than ``max_find_rows``: every study is listed, those without a StudyDate too, and a
series of more instances than the bound is reported, not the end of the crawl.

What the two archives answer (measured, dcmqrscp 3.6.7 and Orthanc 1.10): a StudyDate
range never matches a study without StudyDate (Orthanc's ``-<date>`` matches one whose
StudyDate is present but empty); empty value matching (``""``, PS3.4 C.2.2.2.1) matches
nothing on either; a Patient ID wildcard ``<prefix>*`` is case-sensitive on both; no key
pages the instances of one series on both (InstanceNumber is single value only,
SOPInstanceUID a list, dcmqrscp ignores ContentTime).
"""
from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Orthanc, Peer, findscu, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmqrscp import DcmQrScp

BOUND = 10


def corpus(directory) -> tuple[list, set, str]:
    """(files, the SOP Instance UIDs of the listable ones, the big series' UID): 5 dated
    studies, 12 undated ones whose Patient IDs share a prefix down to 3 characters, one
    with an empty StudyDate, and one dated study whose first series holds 12 instances."""
    files, listable = [], set()

    def study(pid, seed, series=(("CT", 1, ExplicitVRLittleEndian),), date="20240115"):
        paths = datasets.make_study(directory / pid, patient_id=pid, seed=seed, size=8,
                                    series=series, StudyDate=date or "")
        for p in paths if date is None else ():
            ds = dcmread(p)
            del ds.StudyDate
            ds.save_as(p)
        files.extend(paths)
        return paths

    for i in range(5):
        listable |= {dn.sop_uid(p) for p in study(f"D{i}", i, date=f"2020010{i + 1}")}
    for i in range(1, 13):
        listable |= {dn.sop_uid(p) for p in study(f"P{i:04d}", 100 + i, date=None)}
    listable |= {dn.sop_uid(p) for p in study("Q1", 200, date="")}
    big = study("BIG", 300, series=(("CT", BOUND + 2, ExplicitVRLittleEndian),
                                   ("MR", 2, ExplicitVRLittleEndian)))
    listable |= {dn.sop_uid(p) for p in big[BOUND + 2:]}
    return files, listable, str(dcmread(big[0]).SeriesInstanceUID)


@pytest.mark.parametrize("kind", ["dcmqrscp", "orthanc"])
def test_undated_studies_and_a_big_series_on_a_large_archive(tmp_path, kind):
    files, listable, big_series = corpus(tmp_path / "in")
    server = (DcmQrScp(tmp_path / kind, ae_title="DCMQR") if kind == "dcmqrscp"
              else Orthanc(tmp_path / kind, aet="ORTHANC"))
    with server:
        ae, port = ((server.ae_title, server.port) if kind == "dcmqrscp"
                    else (server.aet, server.dicom_port))
        storescu(port, ae, files)
        with Peer(tmp_path / "peer", name="paged", config={"archives": [{
                "name": "pacs", "adapter": "dimse", "ae_title": ae, "host": "127.0.0.1",
                "port": port, "max_find_rows": BOUND, "crawl_qps": 200}]}) as p:
            def crawl():
                return get_json(p)["crawls"][0]
            wait_until(lambda: crawl()["finished"] or crawl()["error"], 240, 0.5,
                       "the crawl finished")
            assert crawl()["error"] is None, crawl()
            rows, proc = findscu(p.port, p.ae_title, {
                "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "",
                "SeriesInstanceUID": "", "SOPInstanceUID": ""})
            assert proc.returncode == 0, proc.stderr[-2000:]
            got = [str(r.SOPInstanceUID) for r in rows]
            assert sorted(got) == sorted(listable)          # each once, undated ones too
            unlisted = crawl()["unlisted"]
            assert len(unlisted) == 1 and big_series in unlisted[0], unlisted
            log = p.log_path.read_text()
            assert log.count(f"series {big_series}") == 1, log[-3000:]
