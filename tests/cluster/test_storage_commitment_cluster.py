"""Storage commitment across peers: a modality stores through one peer and asks another
for commitment at once; the second peer commits them once its catalog holds the
instances with the write quorum of readable copies (it waits up to commitment_wait for
the catalog sync), and reports on the same association."""
from __future__ import annotations

import queue

from pydicom.uid import CTImageStorage
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.testing.commitment import (COMMIT_INSTANCE, images as _images,
                                        modality_ae as _modality_ae, report as _report,
                                        request as _request)


def test_commitment_asked_of_another_peer(make_cluster):
    c = make_cluster(2, destinations={"MODALITY": f"{LOOPBACK}:9"},
                     config={"cluster": {"replicas": 2, "write_quorum": 2},
                             "facade": {"commitment_wait": 60}})
    writer, other = c[0], c[1]
    images = _images(4, "cluster")
    ae = _modality_ae()
    assoc = ae.associate(LOOPBACK, writer.port, ae_title=writer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, dn._nodelay)])
    try:
        for ds in images:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    heard: queue.Queue = queue.Queue()

    def on_report(event):
        heard.put(_report(event))
        return 0x0000, None

    refs = [(CTImageStorage, ds.SOPInstanceUID) for ds in images]
    assoc = _modality_ae().associate(LOOPBACK, other.port, ae_title=other.ae_title,
                                     evt_handlers=[(evt.EVT_CONN_OPEN, dn._nodelay),
                                                   (evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        status, _ = assoc.send_n_action(_request(refs, datasets.uid("sc-cluster-tx")), 1,
                                        StorageCommitmentPushModel, COMMIT_INSTANCE)
        assert status.Status == 0
        event_type, ds = heard.get(timeout=patience(90))
    finally:
        assoc.release()
    assert event_type == 1, ds
    assert sorted(i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence) == \
        sorted(d.SOPInstanceUID for d in images)
    assert "FailedSOPSequence" not in ds
