"""C-MOVE sub-operations over several associations (``[destinations] X = { ...,
associations = N }``, ``transfer.assocpool``): DCMTK movescu moves a study of 64 MR
instances from a real peer to a real DCMTK storescp.

- a ``storescp --fork`` destination with associations = 3 receives every instance,
  byte-identical, over more than one association (its log and the peer's say so);
- a destination that takes one association at a time (storescp without --fork) with
  associations = 3 still gets everything over the first, the C-MOVE answers Success
  without waiting for the associations it never accepted, and it takes a next C-MOVE;
  so does movescu's own port (``-aem MOVESCU +P port``: the requestor as destination);
- C-CANCEL of a C-MOVE over 3 associations to a slow destination: final Cancel, the
  counts exactly what arrived, nothing failed;
- a DICOM TLS destination (storescp --fork over TLS, client certificates required) with
  associations = 2: the same, each association its own TLS connection;
- an in-process pynetdicom Storage SCP that refuses a second association (A-ASSOCIATE-RJ)
  or aborts one mid-way: every instance arrives anyway, none failed, logged once;
- associations = 0, "x" or 99 stop ``twistd pacsp2p`` with the one-line config error.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.overlay import tls as ca
from pacsp2p.testing import (LOOPBACK, StoreSCP, dataset_sha256, datasets, free_port,
                             storescu)
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.peer import twistd_path

STUDY = datasets.uid("assoc-study")
N = 64
KEYS = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return datasets.make_study(tmp_path_factory.mktemp("assoc-study"), patient_id="ASSOC01",
                               StudyInstanceUID=STUDY, size=128,
                               series=(("MR", N // 2, ExplicitVRLittleEndian),
                                       ("MR", N // 2, ExplicitVRLittleEndian)))


def loaded_peer(make_peer, scp, study, n):
    peer = make_peer(destinations={"STORESCP": {"address": scp.address,
                                                "associations": n}})
    storescu(peer.port, peer.ae_title, study)
    assert len(dn.archive_files(peer.data_dir)) == N
    return peer


def moved(peer, scp, study):
    """movescu's output, once every file arrived byte-identical."""
    dn.clear(scp.directory)
    proc = dn.movescu(peer.port, peer.ae_title, "STORESCP", KEYS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "Received Final Move Response (Success)" in out, out[-2000:]
    assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)
    return out


def spread(peer, dest: str) -> list[int]:
    """The C-STOREs each association carried in the last C-MOVE to *dest* (peer log)."""
    found = re.findall(rf"C-MOVE to {dest}: {N} instances over \d+ associations? "
                       r"\(up to \d+; C-STOREs each: ([\d/]+)\)", peer.log_path.read_text())
    return [int(k) for k in found[-1].split("/")] if found else []


def until_spread(move, peer, dest: str, tries: int = 5) -> list[int]:
    """Run *move()* (a whole C-MOVE, checked complete) until more than one association
    carried some of it (the extra ones open while the first is already sending: on a
    very busy machine 64 small instances may all be gone by then), at most *tries*."""
    for _ in range(tries):
        move()
        if len(spread(peer, dest)) > 1:
            break
    return spread(peer, dest)


def test_fork_destination_receives_everything_over_several_associations(
        make_peer, tmp_path, study):
    with StoreSCP(tmp_path / "in", fork=True) as scp:
        peer = loaded_peer(make_peer, scp, study, 3)
        before = scp.log_path.read_text().count("Association Received")
        each = until_spread(lambda: moved(peer, scp, study), peer, "STORESCP")
        seen = scp.log_path.read_text().count("Association Received") - before
    assert 2 <= len(each) <= 3 and sum(each) == N, each
    assert seen >= len(each), scp.log_path.read_text()[-3000:]


def test_one_association_at_a_time_still_gets_everything(make_peer, tmp_path, study):
    with StoreSCP(tmp_path / "in", fork=False) as scp:
        peer = loaded_peer(make_peer, scp, study, 3)
        t0 = time.monotonic()
        moved(peer, scp, study)
        took = time.monotonic() - t0
        # the final response waited for none of the associations storescp never took
        # (an unanswered A-ASSOCIATE-RQ is given up after the SCU's 30 s ACSE timeout)
        assert took < 25, took
        moved(peer, scp, study)          # and storescp takes the next C-MOVE
        assert scp.process.alive
    log = peer.log_path.read_text()
    assert "C-MOVE to STORESCP: 64 instances over 1 association" in log, log[-3000:]
    assert "Traceback" not in log


def test_cancel_of_a_move_over_three_associations(make_peer, tmp_path, study):
    # every association's storescp child sleeps a second per instance: the C-CANCEL
    # always comes while most of the study is still to go, however busy the machine
    with StoreSCP(tmp_path / "in", fork=True, extra=["--sleep-during", "1"]) as scp:
        peer = loaded_peer(make_peer, scp, study, 3)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = STUDY
        responses = []
        with dn.association(peer.port, peer.ae_title, [build_context(MOVE)],
                            timeout=120) as a:
            cx = next(c for c in a.accepted_contexts if c.abstract_syntax == MOVE)
            for status, _identifier in a.send_c_move(query, "STORESCP", MOVE, msg_id=9):
                responses.append(status)
                if len(responses) == 1:
                    a.send_c_cancel(9, cx.context_id)
        final = responses[-1]
        assert final.Status == 0xFE00, hex(final.Status)
        completed = final.NumberOfCompletedSuboperations
        assert 0 < completed < N
        assert (final.NumberOfFailedSuboperations, final.NumberOfWarningSuboperations) \
            == (0, 0)
        assert final.NumberOfRemainingSuboperations == N - completed
        sent = dn.dataset_hashes(study)
        got = dn.dataset_hashes(scp.files())
        assert len(got) == completed and all(sent[u] == h for u, h in got.items())
    log = peer.log_path.read_text()
    # (over 2 or 3 unless the machine was too busy to open the others within a second)
    assert re.search(r"C-MOVE to STORESCP: 64 instances over [123] associations?", log), \
        log[-3000:]


def test_tls_destination_over_several_associations(make_peer, tmp_path, study):
    pki = tmp_path / "pki"
    ca.init_ca(pki, ca.DICOM_CA)
    for name in ("PACSP2P", "TLSSCP"):
        ca.issue(pki, name, kind="server", hosts=["127.0.0.1"])
    with StoreSCP(tmp_path / "in", ae_title="TLSSCP", fork=True,
                  extra=["+tls", pki / "TLSSCP.key", pki / "TLSSCP.crt", "+cf",
                         pki / "ca.crt", "-pw"]) as scp:
        peer = make_peer(config={
            "facade": {"tls_port": free_port(), "tls_cert": str(pki / "PACSP2P.crt"),
                       "tls_key": str(pki / "PACSP2P.key"), "tls_ca": str(pki / "ca.crt")},
            "destinations": {"TLSSCP": {"address": scp.address, "tls": True,
                                        "associations": 2}}})
        storescu(peer.port, peer.ae_title, study)

        def move():
            dn.clear(scp.directory)
            proc = dn.movescu(peer.port, peer.ae_title, "TLSSCP", KEYS)
            out = proc.stdout + proc.stderr
            assert "Received Final Move Response (Success)" in out, out[-2000:]
            assert dn.dataset_hashes(scp.files()) == dn.dataset_hashes(study)
        each = until_spread(move, peer, "TLSSCP")
    assert len(each) == 2 and sum(each) == N, (each, peer.log_path.read_text()[-3000:])


class PySCP:
    """An in-process pynetdicom Storage SCP (MR, explicit VR LE) keeping the sha256 of
    each data set it answered Success to. *on_store(event, index, n)* (index: the
    association's rank by its first C-STORE; n: its C-STOREs so far, this one included)
    may abort the association (and return True) instead."""

    def __init__(self, *, max_associations=10, on_store=None):
        self.port = free_port()
        self.got: dict[str, str] = {}
        self.counts: dict[int, int] = {}        # id(association) -> C-STOREs received
        self.order: list[int] = []              # id(association), by first C-STORE
        self.lock = threading.Lock()
        self.on_store = on_store
        self.ae = AE(ae_title="PYSCP")
        self.ae.maximum_associations = max_associations
        self.ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)

    def _store(self, event):
        key = id(event.assoc)
        with self.lock:
            if key not in self.counts:
                self.order.append(key)
            n = self.counts[key] = self.counts.get(key, 0) + 1
            index = self.order.index(key)
        if self.on_store is not None and self.on_store(event, index, n):
            return 0xA700                         # (aborted: never sent)
        with self.lock:
            self.got[event.request.AffectedSOPInstanceUID] = hashlib.sha256(
                event.request.DataSet.getvalue()).hexdigest()
        return 0x0000

    def __enter__(self):
        self.server = self.ae.start_server((LOOPBACK, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.ae.shutdown()


def move_to_pyscp(make_peer, scp, study):
    """The peer's log once movescu moved the study to *scp* (associations = 3), every
    data set received byte-identical."""
    peer = make_peer(destinations={"PYSCP": {"address": f"{LOOPBACK}:{scp.port}",
                                             "associations": 3}})
    storescu(peer.port, peer.ae_title, study)
    proc = dn.movescu(peer.port, peer.ae_title, "PYSCP", KEYS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "Received Final Move Response (Success)" in out, out[-2000:]
    assert scp.got == {dn.sop_uid(p): dataset_sha256(p) for p in study}
    return peer.log_path.read_text()


def test_a_refused_association_fails_no_sub_operation(make_peer, study):
    with PySCP(max_associations=1) as scp:
        log = move_to_pyscp(make_peer, scp, study)
    assert len(scp.counts) == 1
    assert log.count("another association could not be opened (association rejected") \
        == 2, log[-3000:]
    assert f"{N} completed, 0 failed" in log, log[-3000:]


def test_an_association_aborted_mid_way_fails_no_sub_operation(make_peer, study):
    aborted: list = []

    def slow_first_abort_second(event, index, n):
        if index == 0:
            time.sleep(0.02)        # the first association is slow: the others get work
        elif index == 1 and n == 2 and not aborted:
            aborted.append(event.request.AffectedSOPInstanceUID)
            event.assoc.abort()
            return True
        return False

    with PySCP(on_store=slow_first_abort_second) as scp:
        log = move_to_pyscp(make_peer, scp, study)
    assert len(aborted) == 1 and aborted[0] in scp.got, (aborted, scp.counts)
    assert len(scp.counts) == 3, scp.counts
    assert log.count("an association was lost") == 1, log[-3000:]
    assert f"{N} completed, 0 failed" in log, log[-3000:]


def test_movescu_own_port_gets_everything_over_one(make_peer, tmp_path, study):
    port = free_port()
    got = tmp_path / "got"
    got.mkdir()
    peer = make_peer(destinations={"MOVESCU": {"address": f"{LOOPBACK}:{port}",
                                               "associations": 2}})
    storescu(peer.port, peer.ae_title, study)
    t0 = time.monotonic()
    proc = dn.movescu(peer.port, peer.ae_title, "MOVESCU", KEYS,
                      extra=["+P", str(port), "-od", str(got)])
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "Received Final Move Response (Success)" in out, out[-2000:]
    assert dn.dataset_hashes(sorted(got.iterdir())) == dn.dataset_hashes(study)
    assert took < 25, took      # (not the 30 s ACSE timeout of the one never accepted)
    log = peer.log_path.read_text()
    assert f"C-MOVE to MOVESCU: {N} instances over 1 association" in log, log[-3000:]


@pytest.mark.parametrize("value", ["0", '"x"', "99", "true"])
def test_bad_number_of_associations_stops_start_up(tmp_path, value):
    cfg = tmp_path / "peer.toml"
    cfg.write_text(f'[peer]\nname = "bad"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[facade]\nbind = "127.0.0.1"\nport = {free_port()}\n'
                   f'[admin]\nport = {free_port()}\n[destinations]\n'
                   f'STORESCP = {{ address = "127.0.0.1:11113", '
                   f'associations = {value} }}\n')
    proc = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"{cfg}: destinations.STORESCP.associations: must be an integer 1-8, got " \
        in lines[0], lines[0]
    assert not (tmp_path / "data").exists()
