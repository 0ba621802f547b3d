"""Bad input to a real peer: corrupt data sets, mismatched classes, strangers, unknown
destinations, broken configs, unusable data directories and a full archive disk.

Whatever goes wrong, the peer answers with a DICOM failure status (or refuses to start
with one line saying why) and what it held before stays retrievable byte-identical.
"""
from __future__ import annotations

import io
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         RLELossless, UltrasoundImageStorage)
from pynetdicom import _config, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from pydicom.dataset import Dataset

from pacsp2p.testing import dcmtk, echo, findscu, storescu
from pacsp2p.testing import datasets, free_port
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing import disk
from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.testing.dcmtk import _meta_end
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.plugins import BOOM_MESSAGE, boom_plugin

STUDY = datasets.uid("bad-input-study")


def good_files(directory: Path, n: int = 3, size: int = 16) -> list[Path]:
    return [datasets.write(datasets.make_image(
        "CT", size=size, StudyInstanceUID=STUDY, PatientID="BAD001",
        SeriesInstanceUID=datasets.uid("bad-series"), InstanceNumber=i,
        SOPInstanceUID=datasets.uid("bad-good", i)), directory / f"good{i}.dcm")
        for i in range(1, n + 1)]


def assert_intact(peer, files: list[Path], tmp: Path) -> None:
    """*files* are still findable and come back byte-identical through C-GET."""
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr
    assert sorted(r.SOPInstanceUID for r in rows) == sorted(dn.by_sop_uid(files))
    out = tmp / f"get-{time.monotonic_ns()}"
    proc = dn.getscu(peer.port, peer.ae_title, out,
                     {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    assert proc.returncode == 0, proc.stderr
    assert dn.dataset_hashes(out.iterdir()) == dn.dataset_hashes(files)


@pytest.fixture
def chunked_send():
    """pynetdicom sends a file's raw bytes (no decoding) while the fixture is active."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before


def _truncations(tmp: Path) -> dict[str, Path]:
    """Part-10 files cut in the middle of an element: a header string, the native pixel
    data, a fragment of RLE pixel data."""
    out = {}
    for name, ts, cut_at in (("header", ExplicitVRLittleEndian, b"PACSP2P SYNTHETIC"),
                             ("pixels", ExplicitVRLittleEndian, None),
                             ("rle", RLELossless, None)):
        ds = datasets.make_image("CT", size=32, transfer_syntax=ts, StudyInstanceUID=STUDY,
                                 PatientID="BAD001", SOPInstanceUID=datasets.uid("cut", name))
        whole = datasets.write(ds, tmp / f"whole-{name}.dcm").read_bytes()
        cut = whole.index(cut_at) + 5 if cut_at else len(whole) - 300
        path = tmp / f"cut-{name}.dcm"
        path.write_bytes(whole[:cut])
        out[name] = path
    return out


def test_truncated_datasets_are_refused_and_old_ones_kept(make_peer, tmp_path, chunked_send):
    files = good_files(tmp_path)
    peer = make_peer()
    storescu(peer.port, peer.ae_title, files)
    cuts = _truncations(tmp_path)
    statuses = {}
    with dn.association(peer.port, peer.ae_title, [
            build_context(CTImageStorage, [ExplicitVRLittleEndian]),
            build_context(CTImageStorage, [RLELossless])]) as assoc:
        for name, path in cuts.items():
            status = assoc.send_c_store(path)
            statuses[name] = status.Status if "Status" in status else None
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in statuses.values()), \
        {k: hex(v) if v is not None else v for k, v in statuses.items()}
    held = {f"{dn.sop_uid(p)}.dcm" for p in dn.archive_files(peer.data_dir)}
    assert held == {f"{dn.sop_uid(p)}.dcm" for p in files}
    assert list((peer.data_dir / "archives" / "local" / "tmp").iterdir()) == []
    assert_intact(peer, files, tmp_path)


def test_dataset_of_another_class_than_the_request_is_refused(make_peer, tmp_path,
                                                              chunked_send):
    peer = make_peer()
    files = good_files(tmp_path, n=1)
    storescu(peer.port, peer.ae_title, files)
    # the file meta says CT (so the request is a CT C-STORE), the data set is an MR image
    mr = datasets.make_image("MR", size=16, StudyInstanceUID=STUDY, PatientID="BAD001",
                             SOPInstanceUID=datasets.uid("bad-mr"))
    mr.file_meta.MediaStorageSOPClassUID = CTImageStorage
    liar = tmp_path / "liar.dcm"
    mr.preamble = b"\0" * 128
    dcmwrite(liar, mr, enforce_file_format=False)
    assert dcmread(liar).file_meta.MediaStorageSOPClassUID == CTImageStorage
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, [ExplicitVRLittleEndian]),
                         build_context(MRImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        status = assoc.send_c_store(liar)
        assert status.Status == 0xA900
        # a C-STORE request for MR sent on the CT presentation context
        ct_cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
        req = C_STORE()
        req.MessageID = 9
        req.AffectedSOPClassUID = MRImageStorage
        req.AffectedSOPInstanceUID = mr.SOPInstanceUID
        req.Priority = 2
        raw = liar.read_bytes()
        req.DataSet = io.BytesIO(raw[_meta_end(raw):])
        assoc._reactor_checkpoint.clear()    # pause the association's reactor, as
        while not assoc._is_paused:           # pynetdicom's own send_c_*() do, so that
            time.sleep(0.001)                 # it does not take the response
        try:
            assoc.dimse.send_msg(req, ct_cx.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0122
    held = {f"{dn.sop_uid(p)}.dcm" for p in dn.archive_files(peer.data_dir)}
    assert held == {f"{dn.sop_uid(files[0])}.dcm"}
    assert_intact(peer, files, tmp_path)


def test_unknown_calling_ae_is_rejected_and_logged(make_peer):
    peer = make_peer(allowed_calling_aes=["GOODSCU", "ECHOSCU"])  # ECHOSCU: readiness probe
    ok = dcmtk("echoscu", "-aet", "GOODSCU", "-aec", peer.ae_title, "127.0.0.1", peer.port,
               timeout=20)
    assert ok.returncode == 0, ok.stderr
    bad = dcmtk("echoscu", "-v", "-aet", "STRANGER", "-aec", peer.ae_title, "127.0.0.1",
                peer.port, timeout=20)
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout + bad.stderr
    wait_until(lambda: any("STRANGER" in l for l in peer.log_path.read_text().splitlines()),
               10, 0.1, "the rejection of STRANGER logged")
    lines = [l for l in peer.log_path.read_text().splitlines() if "STRANGER" in l]
    assert any("rejected" in l and "not allowed" in l for l in lines), peer.log_tail()


def test_unknown_move_destination(make_peer, tmp_path):
    peer = make_peer()
    files = good_files(tmp_path, n=1)
    storescu(peer.port, peer.ae_title, files)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    with dn.association(peer.port, peer.ae_title,
                        [build_context(StudyRootQueryRetrieveInformationModelMove)]) as a:
        responses = list(a.send_c_move(query, "NOWHERE",
                                       StudyRootQueryRetrieveInformationModelMove))
    assert [s.Status for s, _ in responses] == [0xA801]
    proc = dn.movescu(peer.port, peer.ae_title, "NOWHERE",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY})
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in \
        proc.stdout + proc.stderr
    assert "to unknown destination 'NOWHERE'" in peer.log_path.read_text()


# -- refusing to start ---------------------------------------------------------------

def run_twistd(config_path: Path, timeout: float = 20) -> tuple[subprocess.CompletedProcess, float]:
    """Run a peer that is expected to refuse to start; a hang is a failure (bounded by
    patience(timeout): a busy machine takes long to start Python, never forever)."""
    timeout = patience(timeout)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                               str(config_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=config_path.parent,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:   # subprocess.run killed it (by its PID)
        pytest.fail(f"the peer did not exit within {timeout}s; stdout tail:\n"
                    f"{(e.stdout or b'').decode(errors='replace')[-1500:]}")
    return proc, time.monotonic() - t0


def _config_text(data_dir: Path, extra: str) -> str:
    return (f'[peer]\nname = "bad"\ndata_dir = "{data_dir}"\n'
            f'[facade]\nbind = "127.0.0.1"\n{extra}\n')


@pytest.mark.parametrize("extra, key, reason", [
    (f"port = {free_port()}\nprot = 4242", "facade.prot", "unknown key"),
    ('port = "eleven"', "facade.port", "must be an integer 1-65535"),
    ("port = 70000", "facade.port", "must be an integer 1-65535"),
    (f"port = {free_port()}\nallowed_calling_aes = \"ANY\"", "facade.allowed_calling_aes",
     "must be a list of AE titles"),
    (f"port = {free_port()}\n[storage]\nfsync = \"yes\"", "storage.fsync", "must be true or false"),
    (f"port = {free_port()}\n[destinations]\nSTORESCP = \"localhost\"", "destinations.STORESCP",
     'must be "host:port"'),
    (f"port = {free_port()}\nidle_timeout = nan", "facade.idle_timeout", "got nan"),
    (f"port = {free_port()}\nartim_timeout = inf", "facade.artim_timeout", "got inf"),
    (f"port = {free_port()}\n[[archives]]\nname = \"../../outside\"", "archives[0].name",
     "must be 1-64 letters"),
], ids=["unknown-key", "port-type", "port-range", "list-type", "bool-type", "destination",
        "nan", "inf", "archive-name-path"])
def test_bad_config_exits_with_one_line(tmp_path, extra, key, reason):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(_config_text(tmp_path / "data", extra))
    proc, took = run_twistd(cfg)
    assert proc.returncode != 0
    assert took < patience(15)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(cfg) in lines[0] and f"{key}:" in lines[0] and reason in lines[0], lines[0]
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("key", ["admin.port", "overlay.bulk_port"])
def test_a_port_in_use_stops_the_peer_naming_its_key(tmp_path, key):
    """A port another process holds: one line naming the key and the port (the admin
    port gave twistd's 40-line traceback; the bulk port was called overlay.port)."""
    from pacsp2p.overlay import tls
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    ports = {"admin.port": free_port(), "overlay.port": free_port(),
             "overlay.bulk_port": free_port(), key: busy}
    tls.init_ca(tmp_path / "ca")
    tls.issue(tmp_path / "ca", "bad", out=tmp_path / "tls")
    cfg = tmp_path / "peer.toml"
    cfg.write_text(_config_text(tmp_path / "data", f"port = {free_port()}") +
                   f"[admin]\nport = {ports['admin.port']}\n"
                   f"[overlay]\nport = {ports['overlay.port']}\n"
                   f"bulk_port = {ports['overlay.bulk_port']}\nbind = \"127.0.0.1\"\n"
                   f"tls_dir = \"{tmp_path / 'tls'}\"\n")
    try:
        proc, took = run_twistd(cfg, timeout=15)
    finally:
        taken.close()
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr + proc.stdout[-2000:]
    assert f"cannot start: {key} {busy}:" in lines[0] and "in use" in lines[0], lines[0]


def test_data_dir_that_cannot_be_created_stops_the_peer(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "peer.toml"
    cfg.write_text(_config_text(blocker / "data", f"port = {free_port()}") +
                   f"[admin]\nport = {free_port()}\n")
    proc, took = run_twistd(cfg, timeout=15)
    assert proc.returncode != 0
    assert took < patience(15)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr + proc.stdout[-2000:]
    # the key named (ac554fe; before: "cannot start: [Errno 20] Not a directory: ...")
    assert f"peer.data_dir: {blocker / 'data'}: not a directory" in lines[0], lines[0]
    assert f"({blocker} is a file)" in lines[0], lines[0]


# -- a full disk -----------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs mounted for this test (unmounted after)."""
    with disk.tmpfs(tmp_path / "small-fs", "2m") as mnt:
        yield mnt


_fill = disk.fill


def test_full_archive_disk_answers_out_of_resources(make_peer, tmp_path, small_fs):
    files = good_files(tmp_path, n=3)
    peer = make_peer(config={"archives": [{"name": "local", "adapter": "embedded",
                                           "path": str(small_fs / "archive")}]})
    storescu(peer.port, peer.ae_title, files)
    _fill(small_fs)
    new = datasets.write(datasets.make_image(
        "CT", size=128, StudyInstanceUID=STUDY, PatientID="BAD001",
        SOPInstanceUID=datasets.uid("no-room")), tmp_path / "no-room.dcm")
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        status = assoc.send_c_store(dcmread(new))
    assert 0xA700 <= status.Status <= 0xA7FF, hex(status.Status)
    held = sorted(small_fs.glob("archive/objects/*/*.dcm"))
    assert {dn.sop_uid(p) for p in held} == {dn.sop_uid(p) for p in files}
    assert dn.dataset_hashes(held) == dn.dataset_hashes(files)
    assert list((small_fs / "archive" / "tmp").iterdir()) == []
    assert_intact(peer, files, tmp_path)


def test_full_data_dir_refuses_the_instance_and_keeps_serving(tmp_path, small_fs):
    """The whole data directory (incoming included) on a full disk: the sender gets no
    Success, the peer stays up and what it held is intact."""
    from pacsp2p.testing import Peer
    files = good_files(tmp_path, n=2)
    with Peer(small_fs / "peer", name="full") as peer:
        storescu(peer.port, peer.ae_title, files)
        _fill(small_fs)
        new = datasets.write(datasets.make_image(
            "CT", size=128, StudyInstanceUID=STUDY, PatientID="BAD001",
            SOPInstanceUID=datasets.uid("no-room-2")), tmp_path / "no-room.dcm")
        proc = storescu(peer.port, peer.ae_title, [new], check=False, extra=["-v"])
        assert proc.returncode != 0
        assert "Received Store Response (Success)" not in proc.stdout + proc.stderr
        assert echo(peer.port, peer.ae_title)
        (small_fs / "filler").unlink()
        assert_intact(peer, files, tmp_path)


@pytest.mark.parametrize("block, says", [
    ('adapter = "nosuch"', "unknown adapter 'nosuch'"),
    ('adapter = "orthanc"\nurl = "http://127.0.0.1:{port}"', "does not answer"),
    ('adapter = "dicomweb"\nurl = "http://127.0.0.1:{port}/dicom-web"', "does not answer"),
], ids=["unknown-adapter", "orthanc-unreachable", "dicomweb-unreachable"])
def test_archive_that_cannot_be_used_stops_the_peer_naming_it(tmp_path, block, says):
    cfg = tmp_path / "peer.toml"
    cfg.write_text(_config_text(tmp_path / "data", f"port = {free_port()}") +
                   f"[admin]\nport = {free_port()}\n"
                   f'[[archives]]\nname = "north-pacs"\n{block.format(port=free_port())}\n')
    proc, took = run_twistd(cfg, timeout=30)
    assert proc.returncode != 0
    assert took < patience(30)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr + proc.stdout[-2000:]
    assert "north-pacs" in lines[0] and says in lines[0], lines[0]


def test_placement_plugin_that_raises_on_a_peer_alone_stores_nothing(make_peer, tmp_path):
    """Alone, the thread that writes a data set also keeps it (one job); a placement
    plugin that raises afterwards still gets Processing Failure, and the kept file is
    dropped: nothing findable, nothing left in the archive, other instances unaffected."""
    plugin = boom_plugin(tmp_path)
    peer = make_peer(config={"strategies": {"plugins": [str(plugin)]}})
    files = good_files(tmp_path)
    storescu(peer.port, peer.ae_title, files)
    us = datasets.write(datasets.make_image(
        "US", size=16, StudyInstanceUID=STUDY, PatientID="BAD001",
        SOPInstanceUID=datasets.uid("bad-us")), tmp_path / "us.dcm")
    with dn.association(peer.port, peer.ae_title,
                        [build_context(UltrasoundImageStorage, [ExplicitVRLittleEndian])]) as a:
        rsp = a.send_c_store(us)
    assert rsp.Status == 0x0110, hex(rsp.Status)
    log = peer.log_path.read_text(errors="replace")
    assert BOOM_MESSAGE in log
    wait_until(lambda: len(dn.archive_files(peer.data_dir)) == len(files), 10, 0.1,
               "the kept file of the refused instance dropped")
    assert {dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)} == \
        {dn.sop_uid(p) for p in files}
    assert_intact(peer, files, tmp_path)
