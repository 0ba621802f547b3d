"""A C-STORE whose SOP Instance UID is a path never becomes a file outside the data
directory (issue 11, item 1).

A real peer (twistd, embedded archive) and a real pynetdicom client that C-STOREs data
sets whose SOP Instance UID — in the command set AND in the data set — is an absolute
path, a climb with ``../``, a UID with a path inside, 65 characters, a component with a
leading zero, or not ASCII. Each gets a failure status; none of the places such a UID
would have named exists afterwards, nothing outside the data directory was created, the
catalog has no row for it (C-FIND finds nothing), and the peer still answers C-ECHO and
still stores a good instance.
"""
from __future__ import annotations

import hashlib
import io
import time
import uuid
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from pydicom.uid import UID

from pacsp2p.testing import findscu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn

STUDY = datasets.uid("hostile-paths-study")
SUCCESS = 0x0000


def hostile_uids(scratch: Path) -> dict[str, str]:
    return {"absolute": f"{scratch}/x", "climb": "../../x", "inside": "1.2.3/../../x",
            "long": "1." + "2" * 63, "leading-zero": "1.02.3", "non-ascii": "1.2.\u00e93"}


def places(uid: str, data_dir: Path) -> list[Path]:
    """Where an archive that joined the UID into a path would have written it: the
    older layout's fan-out directory under every level of the data directory."""
    fan = hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:2]
    bases = [data_dir / "archives" / "local" / "objects" / fan, data_dir, data_dir.parent,
             Path("/")]
    out = []
    for base in bases:
        for suffix in (".dcm", ""):
            try:
                out.append((base / f"{uid}{suffix}").resolve())
            except (OSError, ValueError):
                pass
    return out


def dataset_bytes(uid: str) -> bytes:
    """An Explicit VR Little Endian CT data set (no file meta) whose SOP Instance UID is
    *uid*, byte for byte (pydicom writes UI values as given)."""
    ds = datasets.make_image("CT", size=8, StudyInstanceUID=STUDY, PatientID="HOSTILE1")
    ds.SOPInstanceUID = UID("1.2.3")
    del ds.file_meta            # else written too: group 0002 in a data set is refused
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=False, little_endian=True, implicit_vr=False)
    raw = buf.getvalue()
    # replace the (0008,0018) UI element by one holding the hostile UID, padded to even
    value = uid.encode("latin-1")
    value += b"\0" * (len(value) % 2)
    tag = b"\x08\x00\x18\x00UI"
    at = raw.index(tag + (6).to_bytes(2, "little") + b"1.2.3\0")
    return raw[:at] + tag + len(value).to_bytes(2, "little") + value + raw[at + 14:]


def send_store(assoc, uid: str, body: bytes, msg_id: int) -> int | None:
    """C-STORE *body* with *uid* as the Affected SOP Instance UID, bypassing pynetdicom's
    own checks (it refuses UIDs longer than 64 characters); None: no answer."""
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = CTImageStorage
    req._affected_sop_instance_uid = UID(uid)     # as sent, however hostile
    req.Priority = 2
    req.DataSet = io.BytesIO(body)
    assoc._reactor_checkpoint.clear()              # pause the association's reactor, as
    while not assoc._is_paused:                    # pynetdicom's own send_c_*() do
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return None if rsp is None else rsp.Status


def everything_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")} if directory.exists() else set()


@pytest.mark.parametrize("kind", list(hostile_uids(Path("/tmp"))))
def test_a_uid_that_is_a_path_creates_no_file(make_peer, tmp_path, kind):
    scratch = Path("/tmp") / f"pacsp2p-hostile-{uuid.uuid4().hex}"
    uid = hostile_uids(scratch)[kind]
    peer = make_peer()
    # the directories an older, path-joining archive would have climbed out of exist
    # (the issue: "climbs out with ../ once the fan-out directories exist")
    objects = peer.data_dir / "archives" / "local" / "objects"
    old_fan = objects / hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()[:2]
    old_fan.mkdir(parents=True, exist_ok=True)
    if "/" in uid and not uid.startswith("/"):
        (old_fan / uid.split("/")[0]).mkdir(exist_ok=True)
    outside_before = everything_under(peer.workdir.parent) - everything_under(peer.data_dir)
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        status = send_store(assoc, uid, dataset_bytes(uid), 1)
    assert status is not None and status != SUCCESS and not 0xB000 <= status <= 0xBFFF, \
        f"{kind}: answered {status if status is None else hex(status)}"
    for place in places(uid, peer.data_dir):
        assert not place.exists(), f"{kind}: {place} was created"
    assert not scratch.exists(), f"{kind}: {scratch} was created"
    outside_after = everything_under(peer.workdir.parent) - everything_under(peer.data_dir)
    new = {p for p in outside_after - outside_before if peer.log_path not in (p,)}
    assert not {p for p in new if p.suffix == ".dcm" or p.name == "x"}, new
    assert not [p for p in dn.archive_files(peer.data_dir)]
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr
    assert rows == [], f"{kind}: the catalog has a row"
    with dn.association(peer.port, peer.ae_title, [build_context(Verification)]) as assoc:
        assert assoc.send_c_echo().Status == SUCCESS
    good = datasets.uid("hostile-good", kind)
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert send_store(assoc, good, dataset_bytes(good), 2) == SUCCESS
    assert [dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)] == [good]
    log = peer.log_path.read_text(errors="replace")
    assert "Unhandled" not in log and "Traceback" not in log
