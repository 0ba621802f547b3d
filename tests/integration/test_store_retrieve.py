"""Store a multi-series study into a real peer with DCMTK and get it back, unchanged.

One peer (module scope) receives a CT+MR study holding Explicit VR LE, Implicit VR LE,
RLE Lossless and private-tag instances; DCMTK echoscu/storescu/findscu/movescu/getscu
and a pynetdicom client talk to it. The last test restarts the peer and finds it all.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, RLELossless)
from pynetdicom import build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from pacsp2p.testing import Peer, StoreSCP, dataset_sha256, dcmtk, findscu, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn

STUDY = datasets.uid("store-retrieve-study")
# (series number, modality, instances, transfer syntax, private tags)
SERIES = [(1, "CT", 3, ExplicitVRLittleEndian, False),
          (2, "CT", 2, RLELossless, False),
          (3, "MR", 2, ImplicitVRLittleEndian, False),
          (4, "MR", 2, ExplicitVRLittleEndian, True),
          (5, "MR", 1, ImplicitVRLittleEndian, True)]
N = sum(s[2] for s in SERIES)


def write_study(directory: Path, study_uid: str = STUDY, series=SERIES, size: int = 64,
                patient_id: str = "SR0001") -> list[Path]:
    paths = []
    for s_no, modality, count, ts, private in series:
        series_uid = datasets.uid("sr-series", study_uid, s_no)
        for i in range(1, count + 1):
            ds = datasets.make_image(
                modality, size=size, transfer_syntax=ts, private=private, seed=s_no,
                PatientName="STORE^RETRIEVE", PatientID=patient_id, StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid, SeriesNumber=s_no, InstanceNumber=i,
                SOPInstanceUID=datasets.uid("sr-sop", series_uid, i))
            paths.append(datasets.write(ds, directory / f"{s_no:02d}_{modality}" / f"{i:03d}.dcm"))
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("sr-study"))


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    """storescp writing exactly the bytes it receives (+B)."""
    with StoreSCP(tmp_path_factory.mktemp("sr-scp") / "received", extra=["+B"]) as s:
        yield s


@pytest.fixture(scope="module")
def stored_peer(tmp_path_factory, study, scp):
    """A peer that has received the study through DCMTK storescu."""
    peer = Peer(tmp_path_factory.mktemp("sr-peer"), name="sr",
                destinations={"STORESCP": scp.address})
    with peer:
        results = dn.store_unconverted(peer.port, peer.ae_title, study, extra=["-v"])
        peer.store_output = "\n".join(r.stdout + r.stderr for r in results)
        yield peer
    print(f"peer log: {peer.log_path}")


def clear(directory: Path) -> None:
    for p in list(directory.rglob("*")):
        if p.is_file():
            p.unlink()


def test_echoscu(stored_peer):
    proc = dcmtk("echoscu", "-v", "-aet", "ECHOSCU", "-aec", stored_peer.ae_title,
                 "127.0.0.1", stored_peer.port, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


def test_storescu_keeps_every_dataset_byte_identical(stored_peer, study):
    out = stored_peer.store_output
    assert out.count("Received Store Response (Success)") == N, out[-3000:]
    assert "Converting transfer syntax" not in out or all(
        a == b for a, b in re.findall(r"Converting transfer syntax: (.+?) -> (.+)", out)), \
        "storescu converted a data set: the test would not check byte identity"
    held = dn.dataset_hashes(dn.archive_files(stored_peer.data_dir))
    assert held == dn.dataset_hashes(study)
    syntaxes = {dn.transfer_syntax(p) for p in dn.archive_files(stored_peer.data_dir)}
    assert syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless}


def test_findscu_counts(stored_peer, study):
    rows, proc = findscu(stored_peer.port, stored_peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY, "PatientID": "",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""})
    assert proc.returncode == 0, proc.stderr
    assert len(rows) == 1
    assert rows[0].PatientID == "SR0001"
    assert int(rows[0].NumberOfStudyRelatedSeries) == len(SERIES)
    assert int(rows[0].NumberOfStudyRelatedInstances) == N
    assert sorted(rows[0].ModalitiesInStudy) == ["CT", "MR"]

    rows, _ = findscu(stored_peer.port, stored_peer.ae_title, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": STUDY, "SeriesInstanceUID": "",
        "SeriesNumber": "", "Modality": "", "NumberOfSeriesRelatedInstances": ""})
    got = {int(r.SeriesNumber): (r.Modality, int(r.NumberOfSeriesRelatedInstances))
           for r in rows}
    assert got == {s: (m, n) for s, m, n, _, _ in SERIES}

    rows, _ = findscu(stored_peer.port, stored_peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY,
        "SeriesInstanceUID": datasets.uid("sr-series", STUDY, 2), "SOPInstanceUID": ""})
    assert sorted(r.SOPInstanceUID for r in rows) == sorted(
        datasets.uid("sr-sop", datasets.uid("sr-series", STUDY, 2), i) for i in (1, 2))


def test_movescu_to_storescp_is_byte_identical(stored_peer, study, scp):
    clear(scp.directory)
    proc = dn.movescu(stored_peer.port, stored_peer.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "Received Final Move Response (Success)" in out, out[-2000:]
    received = scp.files()
    assert len(received) == N
    assert dn.dataset_hashes(received) == dn.dataset_hashes(study)


def test_getscu_stored_bytes_or_same_content(stored_peer, study, tmp_path):
    """getscu proposes uncompressed syntaxes (explicit first) for every storage class:
    explicit VR instances come back byte-identical; implicit VR ones converted, RLE ones
    decompressed, both with the same SOP Instance UID and the same content."""
    out = tmp_path / "get"
    proc = dn.getscu(stored_peer.port, stored_peer.ae_title, out,
                     {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    assert proc.returncode == 0, proc.stderr
    got = dn.by_sop_uid(out.iterdir())
    sent = dn.by_sop_uid(study)
    assert sorted(got) == sorted(sent), "C-GET must return the requested instances, same UIDs"
    for uid, path in sent.items():
        ts = dn.transfer_syntax(path)
        if ts == ExplicitVRLittleEndian:
            assert dataset_sha256(got[uid]) == dataset_sha256(path), path
        else:
            assert dn.transfer_syntax(got[uid]) == ExplicitVRLittleEndian
            assert dn.content_differences(path, got[uid]) == [], path


def _get_contexts():
    """C-GET plus storage contexts: each class in its stored syntax alone, and explicit."""
    cxs = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    roles = []
    for sop_class, syntaxes in ((CTImageStorage, [RLELossless, ExplicitVRLittleEndian]),
                                (MRImageStorage, [ImplicitVRLittleEndian,
                                                  ExplicitVRLittleEndian])):
        for ts in syntaxes:
            cxs.append(build_context(sop_class, [ts]))
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = sop_class, False, True
        roles.append(role)
    return cxs, roles


def _counts(status: Dataset) -> tuple:
    return tuple(status.get(k) for k in ("NumberOfRemainingSuboperations",
                                         "NumberOfCompletedSuboperations",
                                         "NumberOfFailedSuboperations",
                                         "NumberOfWarningSuboperations"))


def _check_move_pending(responses, n: int) -> None:
    """C-MOVE Pending responses are optional and rate-limited (at most ~20/s, at least
    1/s): at least one, each with counts adding up to *n*, progress never going back."""
    statuses = [s.Status for s, _ in responses]
    assert statuses[:-1] == [0xFF00] * (len(statuses) - 1) and len(statuses) >= 2, \
        [hex(s) for s in statuses]
    pend = [_counts(s) for s, _ in responses[:-1]]
    assert all(sum(p) == n for p in pend), pend
    assert all(a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2] for a, b in zip(pend, pend[1:]))


def test_pynetdicom_get_in_stored_syntax_with_exact_counts(stored_peer, study):
    received: dict[str, tuple[str, str]] = {}

    def on_store(event):
        data = event.request.DataSet.getvalue()
        received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax), hashlib.sha256(data).hexdigest())
        return 0x0000

    cxs, roles = _get_contexts()
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    with dn.association(stored_peer.port, stored_peer.ae_title, cxs, ext_neg=roles,
                        evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    statuses = [s.Status for s, _ in responses]
    assert statuses == [0xFF00] * N + [0x0000], [hex(s) for s in statuses]
    pending = [_counts(s) for s, _ in responses[:-1]]
    assert pending == [(N - k, k, 0, 0) for k in range(1, N + 1)]
    final = responses[-1][0]
    assert _counts(final)[1:] == (N, 0, 0)
    expected = {dn.sop_uid(p): (dn.transfer_syntax(p), dataset_sha256(p)) for p in study}
    assert received == expected     # every instance in its stored syntax, same bytes


def test_pynetdicom_move_with_exact_counts(stored_peer, study, scp):
    clear(scp.directory)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = STUDY
    query.SeriesInstanceUID = datasets.uid("sr-series", STUDY, 1)
    with dn.association(stored_peer.port, stored_peer.ae_title,
                        [build_context(StudyRootQueryRetrieveInformationModelMove)]) as assoc:
        responses = list(assoc.send_c_move(query, "STORESCP",
                                           StudyRootQueryRetrieveInformationModelMove))
    n = SERIES[0][2]
    assert responses[-1][0].Status == 0x0000
    _check_move_pending(responses, n)
    assert _counts(responses[-1][0])[1:] == (n, 0, 0)
    assert len(scp.files()) == n


def test_move_unreadable_instance_is_a_listed_failed_suboperation(make_peer, tmp_path):
    """An instance whose archive file vanished (disk damage) fails its sub-operation; the
    others are delivered; the final response is 0xB000 and lists the lost UID."""
    files = write_study(tmp_path / "study", study_uid=datasets.uid("sr-lost"),
                        series=[(1, "CT", 4, ExplicitVRLittleEndian, False)], size=16,
                        patient_id="SR0002")
    with StoreSCP(tmp_path / "received", extra=["+B"]) as dest:
        peer = make_peer(destinations={"STORESCP": dest.address})
        storescu(peer.port, peer.ae_title, files)
        lost = dn.sop_uid(files[2])
        [victim] = [p for p in dn.archive_files(peer.data_dir) if dn.sop_uid(p) == lost]
        victim.unlink()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = datasets.uid("sr-lost")
        with dn.association(peer.port, peer.ae_title,
                            [build_context(StudyRootQueryRetrieveInformationModelMove)]) as a:
            responses = list(a.send_c_move(query, "STORESCP",
                                           StudyRootQueryRetrieveInformationModelMove))
        final, identifier = responses[-1]
        assert final.Status == 0xB000
        assert _counts(final)[1:] == (3, 1, 0)
        failed = identifier.FailedSOPInstanceUIDList
        assert ([failed] if isinstance(failed, str) else list(failed)) == [lost]
        _check_move_pending(responses, 4)
        assert sorted(dn.by_sop_uid(dest.files())) == sorted(
            dn.sop_uid(p) for p in files if dn.sop_uid(p) != lost)


def test_cancel_of_a_move_stops_it(make_peer, tmp_path):
    """C-CANCEL during a C-MOVE of a larger study: final status Cancel (0xFE00), fewer
    than all instances delivered, and the counts say exactly what was delivered."""
    n = 150
    study_uid = datasets.uid("sr-cancel")
    files = write_study(tmp_path / "big", study_uid=study_uid, size=128, patient_id="SR0003",
                        series=[(1, "MR", n, ExplicitVRLittleEndian, False)])
    # a destination that takes a second per instance: the C-CANCEL always arrives while
    # most of the study is still to go, however busy the machine
    with StoreSCP(tmp_path / "received", extra=["+B", "--sleep-during", "1"]) as dest:
        peer = make_peer(destinations={"STORESCP": dest.address})
        storescu(peer.port, peer.ae_title, files)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        responses = []
        with dn.association(peer.port, peer.ae_title,
                            [build_context(StudyRootQueryRetrieveInformationModelMove)]) as a:
            cx = next(c for c in a.accepted_contexts
                      if c.abstract_syntax == StudyRootQueryRetrieveInformationModelMove)
            for status, identifier in a.send_c_move(
                    query, "STORESCP", StudyRootQueryRetrieveInformationModelMove, msg_id=7):
                responses.append((status, identifier))
                if len(responses) == 1:
                    a.send_c_cancel(7, cx.context_id)
        final, identifier = responses[-1]
        assert final.Status == 0xFE00, hex(final.Status)
        remaining, completed, failed, warning = _counts(final)
        assert 0 < completed < n
        assert (failed, warning) == (0, 0)
        assert remaining == n - completed
        delivered = dest.files()
        assert len(delivered) == completed < n
        sent = dn.dataset_hashes(files)
        assert all(sent[u] == h for u, h in dn.dataset_hashes(delivered).items())


def test_a_compressed_syntax_offered_with_uncompressed_ones_is_kept(stored_peer, scp,
                                                                     tmp_path):
    """storescu -xr +C proposes RLE Lossless and the uncompressed syntaxes in ONE context
    per class: the facade takes RLE, so storescu sends the dcmcrle'd file as it is (no
    decompression) and the archive keeps it; movescu brings it back byte-identical in
    RLE; a getscu proposing only uncompressed syntaxes (and one that prefers RLE: the
    facade sends on those contexts, uncompressed first) gets it decompressed, same
    content."""
    study = datasets.uid("sr-rle-study")
    series = datasets.uid("sr-rle-series", study)
    rle = []
    for i in (1, 2):
        ds = datasets.make_image("CT", size=64, seed=7, PatientID="SR0002",
                                 PatientName="RLE^KEPT", StudyInstanceUID=study,
                                 SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i,
                                 SOPInstanceUID=datasets.uid("sr-rle-sop", series, i))
        plain = datasets.write(ds, tmp_path / "plain" / f"{i}.dcm")
        rle.append(tmp_path / "rle" / f"{i}.dcm")
        rle[-1].parent.mkdir(exist_ok=True)
        dcmtk("dcmcrle", plain, rle[-1], check=True)
        assert dn.transfer_syntax(rle[-1]) == RLELossless
    proc = storescu(stored_peer.port, stored_peer.ae_title, rle, required=False,
                    extra=["-v", "-R", "-xr", "+C"])
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == 2, out[-3000:]
    assert re.findall(r"Converting transfer syntax: (.+?) -> (.+)", out) == [
        ("RLE Lossless", "RLE Lossless")] * 2, out[-3000:]
    held = {dn.sop_uid(p): p for p in dn.archive_files(stored_peer.data_dir)}
    sent = dn.dataset_hashes(rle)
    for uid, digest in sent.items():
        assert dn.transfer_syntax(held[uid]) == RLELossless
        assert dataset_sha256(held[uid]) == digest

    clear(scp.directory)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    proc = dn.movescu(stored_peer.port, stored_peer.ae_title, "STORESCP", keys)
    assert "Received Final Move Response (Success)" in proc.stdout + proc.stderr
    assert {dn.transfer_syntax(p) for p in scp.files()} == {RLELossless}
    assert dn.dataset_hashes(scp.files()) == sent

    for name, extra in (("plain", []), ("prefers-rle", ["+xr"])):
        outdir = tmp_path / f"get-{name}"
        proc = dn.getscu(stored_peer.port, stored_peer.ae_title, outdir, keys, extra=extra)
        assert proc.returncode == 0, proc.stderr
        got = dn.by_sop_uid(outdir.iterdir())
        assert sorted(got) == sorted(sent), (name, proc.stdout[-2000:])
        for uid, path in dn.by_sop_uid(rle).items():
            assert dn.transfer_syntax(got[uid]) == ExplicitVRLittleEndian, name
            assert dn.content_differences(path, got[uid]) == [], (name, path)


def test_restart_keeps_everything(stored_peer, study, scp):
    stored_peer.restart()
    rows, proc = findscu(stored_peer.port, stored_peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""},
        extra=[])
    assert proc.returncode == 0, proc.stderr
    assert sorted(r.SOPInstanceUID for r in rows) == sorted(dn.by_sop_uid(study))
    clear(scp.directory)
    proc = dn.movescu(stored_peer.port, stored_peer.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    assert proc.returncode == 0, proc.stderr
    assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)
