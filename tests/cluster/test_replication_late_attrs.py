"""A data set whose catalog attribute comes after its pixel data (elements out of tag
order: a hostile or broken sender) is placed on the attributes read from its first
bytes (``header.sniff`` stops at the pixel data), but the writer reads the whole file
(``read_meta``): the two differ. The general way (``Ingest.store``) and the writer's own
copy (``Forward.header_read``) then drop the pushed copies and copy the file again with
the attributes read whole; a C-STORE whose first wave is pushes only
(``recorded.store_remote``, its commits behind the copies' END: ``COMMIT_LAST``) had the
holders record the pushed copies with the attributes of the first bytes while the writer
learned those same facts with its own: the catalogs of the cluster disagreed for ever
on those instances (a C-FIND at the writer and at a holder answered differently).
Real peers (three twistd processes, R=2, W=2), the C-STOREs sent as their bytes are."""
from __future__ import annotations

import io

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_STORE

from pacsp2p.testing import datasets, findscu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import wait_replicated, wait_until

N = 12
SYNC = 60.0


def late_instances(study: str) -> dict[str, tuple[str, bytes]]:
    """{SOP Instance UID: (its Acquisition Number, the data set's bytes with that
    attribute after the pixel data)}."""
    series = datasets.uid("late-series", study)
    out = {}
    for i in range(N):
        ds = datasets.make_image("MR", size=8, seed=i, PatientID="LATEATTR",
                                 StudyInstanceUID=study, SeriesInstanceUID=series,
                                 SOPInstanceUID=datasets.uid("late", study, i),
                                 InstanceNumber=i + 1)
        if "AcquisitionNumber" in ds:
            del ds.AcquisitionNumber
        late = Dataset()
        late.AcquisitionNumber = str(100 + i)
        out[ds.SOPInstanceUID] = (late.AcquisitionNumber,
                                  datasets.explicit_le(ds) + datasets.explicit_le(late))
    return out


def store(peer, uid: str, data: bytes) -> list:
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = MRImageStorage, uid
    req.DataSet = io.BytesIO(data)
    with dn.association(peer.port, peer.ae_title,
                        [build_context(MRImageStorage, [ExplicitVRLittleEndian])],
                        timeout=120) as assoc:
        return dn.send_request(assoc, req, assoc.accepted_contexts[0].context_id)


def acquisition_numbers(peer, study: str) -> dict[str, str]:
    found, _ = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": "",
        "AcquisitionNumber": ""})
    return {str(d.SOPInstanceUID): str(d.get("AcquisitionNumber", "")) for d in found}


def test_pushes_only_copies_of_a_data_set_read_otherwise_are_not_recorded_as_sniffed(
        trio):
    a = trio[0]
    study = datasets.uid("late-attrs-study")
    sent = late_instances(study)
    for uid, (_, data) in sent.items():
        assert store(a, uid, data) == [0], uid

    rows = wait_replicated(a, study, N, SYNC)
    remote_only = sum(1 for r in rows if all(x["peer"] != a.name for x in r["replicas"]))
    assert 0 < remote_only < N
    wanted = {uid: number for uid, (number, _) in sent.items()}
    for peer in trio:
        wait_until(lambda: len(acquisition_numbers(peer, study)) == N, SYNC, interval=0.5,
                   what=f"{peer.name} knows every instance")
        # before: the holders of the pushes-only copies had no Acquisition Number for
        # them (read from the first bytes), the writer had it
        assert acquisition_numbers(peer, study) == wanted, peer.name
