"""kill -9 a peer in the middle of a 300-instance C-STORE stream, restart it, and check
that every acknowledged instance survived whole and nothing half-written is left.

The sender is a pynetdicom client sending each file's raw bytes, so the test knows
exactly which instances got a Success response and which bytes they were.
"""
from __future__ import annotations

import sqlite3
import threading

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import _config, build_context

from pacsp2p.dicom.header import content_hash, read_meta
from pacsp2p.testing import StoreSCP, dataset_sha256, findscu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn

N = 300
KILL_AFTER = 120          # acknowledged instances before the peer is killed
STUDY = datasets.uid("crash-study")


@pytest.fixture
def chunked_send():
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def test_kill_9_during_store_loses_no_acknowledged_instance(make_peer, tmp_path,
                                                            chunked_send):
    files = datasets.make_study(tmp_path / "study", patient_id="CRASH01", size=16,
                                StudyInstanceUID=STUDY,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    sent = {dn.sop_uid(p): dataset_sha256(p) for p in files}
    assert len(sent) == N
    with StoreSCP(tmp_path / "received", extra=["+B"]) as dest:
        peer = make_peer(destinations={"STORESCP": dest.address})
        acked: list[str] = []
        errors: list[str] = []
        enough = threading.Event()

        def send_all():
            try:
                with dn.association(peer.port, peer.ae_title,
                                    [build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                                    timeout=120) as assoc:
                    for path in files:
                        if not assoc.is_established:
                            break
                        status = assoc.send_c_store(path)
                        if "Status" not in status:
                            # no response: the peer is gone. pynetdicom may still say
                            # is_established (its reactor thread runs late), and a next
                            # send_c_store would wait out the whole DIMSE timeout (120 s)
                            errors.append(f"{path.name}: no response")
                            break
                        if status.Status == 0x0000:
                            acked.append(dn.sop_uid(path))
                            if len(acked) == KILL_AFTER:
                                enough.set()
                        else:
                            errors.append(f"{path.name}: {status.get('Status')}")
            except Exception as e:           # the peer vanished under the sender
                errors.append(repr(e))
            finally:
                enough.set()

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        assert enough.wait(300), "sender stalled"
        assert peer.kill9() == -9             # SIGKILL by PID, mid-stream
        sender.join(300)
        assert not sender.is_alive()
        assert KILL_AFTER <= len(acked) < N, f"{len(acked)} acknowledged"

        archive = peer.data_dir / "archives" / "local"
        peer.restart()                        # same port, same data directory

        # every acknowledged instance is findable ...
        rows, proc = findscu(peer.port, peer.ae_title, {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""})
        assert proc.returncode == 0, proc.stderr
        found = {r.SOPInstanceUID for r in rows}
        assert set(acked) <= found
        assert found <= set(sent)

        # ... and retrievable byte-identical (all of what the catalog lists, in fact)
        proc = dn.movescu(peer.port, peer.ae_title, "STORESCP",
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY},
                          timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Received Final Move Response (Success)" in proc.stdout + proc.stderr
        got = dn.dataset_hashes(dest.files())
        assert set(got) == found
        assert all(got[uid] == sent[uid] for uid in got)

    # nothing half-written: every archive file parses and holds the bytes sent, every
    # catalog location has its file with the catalog's hash, the temp directory is empty
    held = dn.archive_files(peer.data_dir)
    with sqlite3.connect(f"file:{peer.data_dir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        catalog = dict(db.execute(
            "SELECT SOPInstanceUID, sha256 FROM locations WHERE archive = 'local'"))
    assert set(catalog) == found
    on_disk = {}
    for path in held:
        meta = read_meta(path)                # raises on a truncated or corrupt file
        dcmread(path).PixelData               # and pydicom reads it all
        on_disk[meta.sop_instance_uid] = content_hash(path)[0]
    # a file linked into place just before the kill may not be in the catalog yet (an
    # unacknowledged instance); every catalog entry must have its whole file
    assert set(catalog) <= set(on_disk)
    assert all(on_disk[uid] == catalog[uid] for uid in catalog)
    assert all(on_disk[uid] == sent[uid] for uid in on_disk)
    assert list((archive / "tmp").iterdir()) == []
    assert list((peer.data_dir / "incoming").iterdir()) == []
