"""The ``dimse`` crawl learns the SOP class of a series of a class beyond pynetdicom's 120
default storage contexts from a REAL DCMTK dcmqrscp (whose C-FIND does not return
SOPClassUID): its probe C-GET proposes every class the facade accepts
(``contexts.STORAGE_ORDER``, 184), 127 per association. Before, it proposed the 120
defaults only, dcmqrscp could send nothing, and the instance was never listed.
"""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.dicom.contexts import MAX_CONTEXTS, STORAGE_ORDER
from pacsp2p.testing import Peer, datasets, findscu, storescu
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmqrscp import DcmQrScp

DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.73"          # Patient Radiation Dose SR


def test_a_class_beyond_the_defaults_is_learnt_from_dcmqrscp(tmp_path):
    assert STORAGE_ORDER.index(DOSE_SR) >= MAX_CONTEXTS - 1      # the second association
    study = datasets.uid("probe-study")
    ct = datasets.make_image("CT", size=8, seed=1, StudyInstanceUID=study,
                             SeriesInstanceUID=datasets.uid("probe-ct"))
    dose = datasets.make_image("CT", size=8, seed=2, StudyInstanceUID=study,
                               SeriesInstanceUID=datasets.uid("probe-dose"),
                               transfer_syntax=ExplicitVRLittleEndian)
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = DOSE_SR
    files = [datasets.write(ct, tmp_path / "in" / "ct.dcm"),
             datasets.write(dose, tmp_path / "in" / "dose.dcm")]
    with DcmQrScp(tmp_path / "dcmqrscp", ae_title="DCMQR") as q:
        storescu(q.port, q.ae_title, files)
        with Peer(tmp_path / "peer", name="prober", config={"archives": [{
                "name": "pacs", "adapter": "dimse", "ae_title": q.ae_title,
                "host": "127.0.0.1", "port": q.port, "crawl_qps": 200}]}) as p:
            def crawl():
                return get_json(p)["crawls"][0]
            wait_until(lambda: crawl()["finished"] or crawl()["error"], 240, 0.5,
                       "the crawl finished")
            rows, proc = findscu(p.port, p.ae_title, {
                "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                "SeriesInstanceUID": "", "SOPInstanceUID": "", "SOPClassUID": ""})
            assert proc.returncode == 0, proc.stderr[-2000:]
            got = {str(r.SOPInstanceUID): str(r.SOPClassUID) for r in rows}
            assert got == {str(ct.SOPInstanceUID): str(ct.SOPClassUID),
                           str(dose.SOPInstanceUID): DOSE_SR}, (got, crawl())
