"""Sequences nested hundreds deep, stored by a real client, then retrieved in another
transfer syntax from one real peer (eleventh hostile-input session).

A C-STORE of a few KB whose Content Sequence nests 300 deep (defined lengths, valid
DICOM) is kept as sent, as any other. A C-GET proposing only the other uncompressed
syntax makes the peer re-encode it (``part10.convert``: pydicom). Before, that grew the
peer by gigabytes a second (19 GB in 60 s, then the kernel's OOM killer; here it stops at
the address-space limit the test sets so the host is spared); now the sub-operation
fails at once (``nesting.MAX_DEPTH``), the rest of the C-GET is delivered, the peer stays
small and answers. 100 deep is still re-encoded and delivered.
"""
from __future__ import annotations

import resource
import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from pacsp2p.dicom.nesting import MAX_DEPTH
from pacsp2p.testing import Peer, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk

STUDY = datasets.uid("nesting-study")
HEADROOM = 3 << 30        # address space the peer may take past its size at start


def nested(depth: int) -> bytes:
    """(0040,A730) Content Sequences, one item each, *depth* deep, defined lengths
    (implicit VR little endian)."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HHI", 0x0040, 0xA730, len(item)) + item
    return inner


def deep_file(directory: Path, depth: int) -> Path:
    ds = datasets.make_image("CT", size=8, seed=depth, PatientID="NEST", PatientName="NEST",
                             StudyInstanceUID=STUDY, SOPInstanceUID=datasets.uid("nest", depth),
                             SeriesInstanceUID=datasets.uid("nesting-series"),
                             InstanceNumber=depth, transfer_syntax=ImplicitVRLittleEndian)
    path = datasets.write(ds, directory / f"{depth}.dcm")
    data = path.read_bytes()
    pixels = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    path.write_bytes(data[:pixels] + nested(depth) + data[pixels:])
    return path


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} is gone (no {key})")


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("nesting"), name="nesting") as p:
        limit = status_kib(p.pid, "VmSize") * 1024 + HEADROOM
        resource.prlimit(p.pid, resource.RLIMIT_AS, (limit, limit))
        yield p


def test_a_deeply_nested_instance_fails_its_sub_operation_not_the_peer(peer, tmp_path):
    files = [deep_file(tmp_path, MAX_DEPTH), deep_file(tmp_path, 300)]
    storescu(peer.port, peer.ae_title, files)           # DCMTK keeps them, defined lengths
    held = {dn.sop_uid(p): dn.transfer_syntax(p) for p in dn.archive_files(peer.data_dir)}
    assert set(held) == {dn.sop_uid(p) for p in files}
    stored = set(held.values())
    assert len(stored) == 1
    other = (ExplicitVRLittleEndian if stored == {ImplicitVRLittleEndian}
             else ImplicitVRLittleEndian)

    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    before = status_kib(peer.pid, "VmHWM")
    with dn.association(peer.port, peer.ae_title,
                        [build_context(GET), build_context(CTImageStorage, [other])],
                        ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)],
                        timeout=300) as assoc:
        final = list(assoc.send_c_get(query, GET))[-1][0]
    grown = status_kib(peer.pid, "VmHWM") - before
    assert grown < 300 * 1024, f"the peer grew by {grown} KiB"
    assert final.Status == 0xB000, hex(final.Status)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert received == [datasets.uid("nest", MAX_DEPTH)]
    answered = dcmtk("echoscu", "-aec", peer.ae_title, "-to", "60", "-ta", "60", "-td", "60",
                     "127.0.0.1", peer.port)
    assert answered.returncode == 0, answered.stderr
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log
