"""DICOM TLS on the facade (issue 17): a real peer (separate twistd process) with a TLS
port beside its plain one, certificates made by ``pacsp2p ca`` (a DICOM CA of its own).

- DCMTK's own TLS (storescu, findscu, echoscu ``+tls KEY CERT +cf CA``) and pynetdicom's
  ``tls_args`` (C-GET, C-MOVE: Debian's movescu and getscu have no TLS options) with a
  client certificate of the configured CA: everything works, byte-identical;
- no client certificate, one from another CA (same name), an expired one: the handshake
  fails, nothing is stored, the peer logs why in words;
- TLS 1.1 and a CBC cipher suite are refused (BCP 195), TLS 1.2 with an AEAD suite works;
- C-MOVE to a destination with ``tls = true`` (DCMTK storescp over TLS requiring client
  certificates) arrives byte-identical; one whose certificate is not from our CA is
  never sent to;
- ``tls_only``: no plain port at all.

Nothing depends on a short wall-clock timeout: DCMTK waits up to 60 s per step.
"""
from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.overlay import tls as ca
from pacsp2p.testing import LOOPBACK, Peer, StoreSCP, dataset_sha256, datasets, free_port
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk, findscu, storescu

STUDY = datasets.uid("tls-study")
N = 3
STEP = ["-to", "60", "-ta", "60", "-td", "60"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ca.init_ca(root / "dicom", ca.DICOM_CA)
    ca.issue(root / "dicom", "PACSP2P", kind="server", hosts=["127.0.0.1"])
    ca.issue(root / "dicom", "CT1", kind="client")
    ca.issue(root / "dicom", "TLSSCP", kind="server", hosts=["127.0.0.1"])
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    ca.issue(root / "dicom", "OLD", kind="client", days=1, not_before=past)
    ca.init_ca(root / "foreign", ca.DICOM_CA)          # same name, another key
    ca.issue(root / "foreign", "CT1", kind="client")
    ca.issue(root / "foreign", "TLSSCP", kind="server", hosts=["127.0.0.1"])
    return root


def tls_args(pki: Path, who: str = "CT1", where: str = "dicom") -> list[str]:
    """DCMTK's TLS options: our key and certificate, the CA that signed the peer's."""
    d = pki / where
    return ["+tls", d / f"{who}.key", d / f"{who}.crt", "+cf", pki / "dicom" / "ca.crt",
            "-pw"]


def context(pki: Path, who: str | None = "CT1", where: str = "dicom") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "dicom" / "ca.crt"))
    if who is not None:
        ctx.load_cert_chain(pki / where / f"{who}.crt", pki / where / f"{who}.key")
    return ctx


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("study")
    return [datasets.write(datasets.make_image(
        "CT", size=64, seed=i, PatientID="TLS0001", PatientName="SECURE^ONE",
        StudyInstanceUID=STUDY, SeriesInstanceUID=datasets.uid("tls-series"),
        SOPInstanceUID=datasets.uid("tls-sop", i), InstanceNumber=i), d / f"{i}.dcm")
        for i in range(1, N + 1)]


@pytest.fixture(scope="module")
def scp(tmp_path_factory, pki):
    """A C-MOVE destination over TLS (DCMTK storescp, client certificates required)."""
    d = pki / "dicom"
    with StoreSCP(tmp_path_factory.mktemp("tlsscp") / "in", ae_title="TLSSCP",
                  extra=["+tls", d / "TLSSCP.key", d / "TLSSCP.crt", "+cf", d / "ca.crt",
                         "-pw"]) as s:
        yield s


@pytest.fixture(scope="module")
def rogue(tmp_path_factory, pki):
    """A TLS destination whose certificate is from another CA."""
    d = pki / "foreign"
    with StoreSCP(tmp_path_factory.mktemp("rogue") / "in", ae_title="ROGUE",
                  extra=["+tls", d / "TLSSCP.key", d / "TLSSCP.crt", "+cf",
                         pki / "dicom" / "ca.crt", "-pw"]) as s:
        yield s


def facade_tls(pki: Path, tls_port: int, **more) -> dict:
    d = pki / "dicom"
    return {"tls_port": tls_port, "tls_cert": str(d / "PACSP2P.crt"),
            "tls_key": str(d / "PACSP2P.key"), "tls_ca": str(d / "ca.crt"), **more}


@pytest.fixture(scope="module")
def peer(tmp_path_factory, pki, scp, rogue):
    tls_port = free_port()
    p = Peer(tmp_path_factory.mktemp("tlspeer"), name="tls", config={
        "facade": facade_tls(pki, tls_port),
        "destinations": {"TLSSCP": {"address": scp.address, "tls": True},
                         "ROGUE": {"address": rogue.address, "tls": True}}})
    p.tls_port = tls_port
    with p:
        yield p
        print(f"peer log: {p.log_path}")


def log_of(peer) -> str:
    return peer.log_path.read_text(errors="replace")


# -- a certificate of the configured CA: everything works ---------------------------------

def test_dcmtk_store_find_echo_over_tls(peer, pki, study):
    echo = dcmtk("echoscu", "-aet", "CT1", "-aec", peer.ae_title, *STEP, *tls_args(pki),
                 LOOPBACK, peer.tls_port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    stored = storescu(peer.tls_port, peer.ae_title, study, aet="CT1", extra=tls_args(pki),
                      check=False)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert len(dn.archive_files(peer.data_dir)) == N
    found, proc = findscu(peer.tls_port, peer.ae_title,
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                           "PatientID": "TLS0001", "NumberOfStudyRelatedInstances": ""},
                          aet="CT1", extra=tls_args(pki))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in found] == \
        [(STUDY, N)]


def _association(peer, pki, contexts, who="CT1", where="dicom", roles=(), handlers=()):
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for cx in contexts:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    assoc = ae.associate(LOOPBACK, peer.tls_port, ae_title=peer.ae_title,
                         tls_args=(context(pki, who, where), "127.0.0.1"),
                         ext_neg=list(roles) or None, evt_handlers=list(handlers))
    return ae, assoc


def test_pynetdicom_get_and_move_over_tls(peer, pki, study, scp):
    if not dn.archive_files(peer.data_dir):
        storescu(peer.tls_port, peer.ae_title, study, aet="CT1", extra=tls_args(pki))
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = dataset_sha256_of(event)
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    ae, assoc = _association(peer, pki, [build_context(GET), build_context(MOVE), build_context(
        CTImageStorage, [ExplicitVRLittleEndian])], roles=[role],
        handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        assert assoc.is_established
        get = list(assoc.send_c_get(query, GET))
        move = list(assoc.send_c_move(query, "TLSSCP", MOVE))
    finally:
        assoc.release()
        ae.shutdown()
    assert get[-1][0].Status == 0x0000, hex(get[-1][0].Status)
    assert received == {dn.sop_uid(p): dataset_sha256(p) for p in study}
    assert move[-1][0].Status == 0x0000, hex(move[-1][0].Status)
    assert move[-1][0].NumberOfCompletedSuboperations == N
    got = dn.by_sop_uid(scp.files())
    assert {u: dataset_sha256(p) for u, p in got.items()} == \
        {dn.sop_uid(p): dataset_sha256(p) for p in study}


def dataset_sha256_of(event) -> str:
    import hashlib
    return hashlib.sha256(event.request.DataSet.getvalue()).hexdigest()


def test_move_to_a_tls_destination_outside_our_ca_sends_nothing(peer, pki, study, rogue):
    if not dn.archive_files(peer.data_dir):
        storescu(peer.tls_port, peer.ae_title, study, aet="CT1", extra=tls_args(pki))
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    ae, assoc = _association(peer, pki, [build_context(MOVE)])
    try:
        move = list(assoc.send_c_move(query, "ROGUE", MOVE))
    finally:
        assoc.release()
        ae.shutdown()
    assert move[-1][0].Status == 0xA801, hex(move[-1][0].Status)  # destination unreachable
    assert rogue.files() == []


# -- no certificate, a foreign one, an expired one: refused --------------------------------

def test_clients_without_a_valid_certificate_are_refused(peer, pki, tmp_path):
    other = datasets.write(datasets.make_image(
        "CT", size=16, PatientID="TLSBAD", StudyInstanceUID=datasets.uid("tls-bad"),
        SOPInstanceUID=datasets.uid("tls-bad", 1)), tmp_path / "bad.dcm")
    before = len(log_of(peer))
    attempts = {
        "no certificate": ["+tla", "+cf", pki / "dicom" / "ca.crt"],
        "foreign CA": tls_args(pki, "CT1", "foreign"),
        "expired": tls_args(pki, "OLD"),
    }
    for what, args in attempts.items():
        proc = storescu(peer.tls_port, peer.ae_title, [other], aet="CT1", extra=args,
                        check=False)
        assert proc.returncode != 0, f"{what}: {proc.stdout + proc.stderr}"
        found, proc = findscu(peer.tls_port, peer.ae_title,
                              {"QueryRetrieveLevel": "PATIENT", "PatientID": "*"},
                              model="P", aet="CT1", extra=args)
        assert proc.returncode != 0 and found == [], what
    # pynetdicom without a client certificate: no association
    ae, assoc = _association(peer, pki, [build_context(Verification)], who=None)
    try:
        assert not assoc.is_established
    finally:
        ae.shutdown()
    # a plain client on the TLS port: nothing either
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.network_timeout = 60
    ae.add_requested_context(Verification)
    plain = ae.associate(LOOPBACK, peer.tls_port, ae_title=peer.ae_title)
    assert not plain.is_established
    ae.shutdown()
    assert dn.sop_uid(other) not in {dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)}
    log = log_of(peer)[before:]
    assert "no client certificate" in log
    assert "certificate not signed by the configured CA" in log
    assert "certificate expired" in log
    assert "Traceback" not in log


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    with socket.create_connection((LOOPBACK, port), timeout=60) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return f"ok {s.version()} {s.cipher()[0]}"
        except (ssl.SSLError, ConnectionResetError, OSError) as e:
            return f"refused: {e}"


def test_bcp195_old_protocols_and_weak_ciphers_are_refused(peer, pki):
    good = context(pki)
    assert _handshake(peer.tls_port, good).startswith("ok TLSv1.3"), "TLS 1.3 works"
    tls12 = context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    result = _handshake(peer.tls_port, tls12)
    assert result.startswith("ok TLSv1.2") and ("GCM" in result or "CHACHA" in result), result
    old = context(pki)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")          # let the client offer what it may
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert _handshake(peer.tls_port, old).startswith("refused"), "TLS 1.1 must be refused"
    cbc = context(pki)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256")
    assert _handshake(peer.tls_port, cbc).startswith("refused"), "CBC suites must be refused"


# -- TLS only ----------------------------------------------------------------------------------

class TlsOnlyPeer(Peer):
    """A peer whose readiness is a C-ECHO over TLS (it has no plain port)."""

    pki: Path
    tls_port: int

    def wait_ready(self) -> None:
        import time
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.process.alive:
                raise RuntimeError("the peer exited")
            proc = dcmtk("echoscu", "-aet", "CT1", "-aec", self.ae_title, *STEP,
                         *tls_args(self.pki), LOOPBACK, self.tls_port)
            if proc.returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError("no C-ECHO over TLS")


def test_tls_only_serves_no_plain_port(tmp_path, pki):
    tls_port = free_port()
    p = TlsOnlyPeer(tmp_path / "only", name="tlsonly",
                    config={"facade": facade_tls(pki, tls_port, tls_only=True)})
    p.pki, p.tls_port = pki, tls_port
    with p:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, p.port), timeout=60).close()
        echo = dcmtk("echoscu", "-aet", "CT1", "-aec", p.ae_title, *STEP, *tls_args(pki),
                     LOOPBACK, tls_port)
        assert echo.returncode == 0
        assert "(DICOM TLS)" in log_of(p)
