"""More DICOM network helpers for tests: movescu/getscu, grouped storescu, a pynetdicom
client, content comparison of two Part-10 files, and what a peer's archive holds.

Everything talks to real processes on 127.0.0.1 (DCMTK by full path, TCP_NODELAY=1).
"""
from __future__ import annotations

import hashlib
import subprocess
import time
from contextlib import contextmanager
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from pacsp2p.dicom.requestor import guard

from .dcmtk import dataset_sha256, dcmtk, storescu
from .ports import LOOPBACK


def _keys(keys: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in keys.items():
        out += ["-k", f"{k}={v}"]
    return out


def movescu(port: int, aec: str, dest: str, keys: Mapping[str, str], *, model: str = "S",
            aet: str = "MOVESCU", extra: Sequence[str] = (),
            timeout: float = 120.0) -> subprocess.CompletedProcess:
    """/usr/bin/movescu -<model> -aem <dest> with the given keys (verbose output)."""
    return dcmtk("movescu", f"-{model}", "-v", "-aet", aet, "-aec", aec, "-aem", dest,
                 "-to", "20", "-ta", "20", "-td", "60", *_keys(keys), *extra,
                 LOOPBACK, port, timeout=timeout)


def getscu(port: int, aec: str, outdir: Path, keys: Mapping[str, str], *, model: str = "S",
           aet: str = "GETSCU", extra: Sequence[str] = (),
           timeout: float = 120.0) -> subprocess.CompletedProcess:
    """/usr/bin/getscu -<model> +B (files written exactly as received) into *outdir*."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", f"-{model}", "-v", "+B", "-aet", aet, "-aec", aec, "-od", outdir,
                 "-to", "20", "-ta", "20", "-td", "60", *_keys(keys), *extra,
                 LOOPBACK, port, timeout=timeout)


def store_unconverted(port: int, aec: str, paths: Iterable[Path], **kw) -> list:
    """Send files with storescu so that every data set travels in its own transfer syntax.

    DCMTK ``-R -xr`` proposes one [RLE] context and one [all uncompressed] context per SOP
    class; an acceptor preferring explicit VR makes storescu convert implicit VR files.
    So implicit VR files go in a second association proposed with plain ``-R`` (the
    file's own syntax first).
    """
    paths = [Path(p) for p in paths]
    implicit = [p for p in paths if transfer_syntax(p) == ImplicitVRLittleEndian]
    others = [p for p in paths if p not in implicit]
    done = []
    if others:
        done.append(storescu(port, aec, others, **dict(kw)))
    if implicit:
        extra = ["-R", *kw.pop("extra", ())]
        done.append(storescu(port, aec, implicit, required=False, extra=extra, **kw))
    return done


def transfer_syntax(path: Path | str) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sop_uid(path: Path | str) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def study_of(paths) -> str:
    """The Study Instance UID of the first of *paths*."""
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def clear(directory: Path) -> None:
    """Empty *directory* (e.g. a storescp's, between two retrievals)."""
    for p in Path(directory).iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def by_sop_uid(paths: Iterable[Path]) -> dict[str, Path]:
    """{SOPInstanceUID: path} of Part-10 files."""
    return {sop_uid(p): Path(p) for p in paths}


def dataset_hashes(paths: Iterable[Path]) -> dict[str, str]:
    """{SOPInstanceUID: sha256 of the bytes after the file meta}."""
    return {sop_uid(p): dataset_sha256(p) for p in paths}


def archive_files(data_dir: Path, archive: str = "local") -> list[Path]:
    """Every .dcm file the embedded archive *archive* of a peer holds."""
    return sorted((Path(data_dir) / "archives" / archive / "objects").glob("*/*.dcm"))


def content_differences(a: Path | str, b: Path | str) -> list[str]:
    """What differs between the data sets of two files, ignoring the file meta and the
    transfer syntax (values compared decoded; pixel data compared as decoded arrays).
    [] means the same content."""
    da, db = dcmread(a), dcmread(b)
    diffs: list[str] = []
    _compare(da, db, "", diffs)
    if "PixelData" in da or "PixelData" in db:
        import numpy as np
        try:
            pa, pb = da.pixel_array, db.pixel_array
        except Exception as e:  # a file that cannot be decoded is a difference
            return diffs + [f"pixel data: cannot decode: {e}"]
        if pa.shape != pb.shape or pa.dtype != pb.dtype or not np.array_equal(pa, pb):
            diffs.append(f"pixel data differs ({pa.shape} {pa.dtype} vs {pb.shape} {pb.dtype})")
    return diffs


def _value(elem):
    if elem.VR == "SQ":
        return None
    v = elem.value
    if isinstance(v, bytes):
        return v.rstrip(b"\x00 ")
    if isinstance(v, str):
        return v.rstrip("\x00 ")
    return v


def _compare(da: Dataset, db: Dataset, where: str, diffs: list[str]) -> None:
    tags = set(da.keys()) | set(db.keys())
    for tag in sorted(tags):
        if tag.group == 0x0002 or tag == 0x7FE00010:
            continue
        name = f"{where}{tag}"
        if tag not in da or tag not in db:
            diffs.append(f"{name}: only in {'first' if tag in da else 'second'}")
            continue
        ea, eb = da[tag], db[tag]
        if ea.VR == "SQ" and eb.VR == "SQ":
            if len(ea.value) != len(eb.value):
                diffs.append(f"{name}: {len(ea.value)} vs {len(eb.value)} items")
                continue
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                _compare(ia, ib, f"{name}[{i}].", diffs)
            continue
        if "SQ" in (ea.VR, eb.VR):
            diffs.append(f"{name}: VR {ea.VR} vs {eb.VR}")
            continue
        if _value(ea) != _value(eb):
            diffs.append(f"{name}: {ea.value!r:.60} vs {eb.value!r:.60}")


# -- a pynetdicom client ----------------------------------------------------------------

@contextmanager
def association(port: int, aec: str, contexts: Sequence, *, aet: str = "PYNETDICOM",
                evt_handlers: Sequence = (), ext_neg: Sequence = (),
                timeout: float = 30.0) -> Iterator:
    """An established pynetdicom association (released or aborted on exit)."""
    from pynetdicom import AE

    from pynetdicom import evt

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for cx in contexts:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    handlers = [(evt.EVT_CONN_OPEN, _nodelay), *evt_handlers]
    assoc = ae.associate(LOOPBACK, port, ae_title=aec, evt_handlers=handlers,
                         ext_neg=list(ext_neg) or None)
    if not assoc.is_established:
        raise AssertionError(f"association to {aec}@{LOOPBACK}:{port} not established")
    guard(assoc)                     # every response reaches the call waiting for it
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def send_request(assoc, req, context_id: int) -> list:
    """Send the DIMSE request *req* as it is (any SOP class, any data set bytes) on the
    presentation context *context_id*; the statuses of every response up to the final
    one (None: none came). pynetdicom's reactor is paused meanwhile, as its own
    send_c_*() do, so that the responses come here."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    statuses = []
    try:
        assoc.dimse.send_msg(req, context_id)
        while True:
            _, rsp = assoc.dimse.get_msg(block=True)
            statuses.append(None if rsp is None else rsp.Status)
            if rsp is None or rsp.Status not in (0xFF00, 0xFF01):
                return statuses
    finally:
        assoc._reactor_checkpoint.set()


def _nodelay(event) -> None:
    """TCP_NODELAY on the client socket (else delayed ACKs cost ~40 ms per message)."""
    import socket
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def sha256_file(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def get_study(peer, study: str, sop_class: str, syntax: str, timeout: float = 300.0):
    """(final C-GET response, its identifier, data sets received) of a STUDY-level
    C-GET of *study* by pynetdicom, *sop_class* proposed in *syntax* only (SCP role)."""
    from pynetdicom import build_context, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
    with association(peer.port, peer.ae_title, [
            build_context(GET), build_context(sop_class, [syntax])],
            ext_neg=[build_role(sop_class, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)], timeout=timeout) as assoc:
        final, identifier = list(assoc.send_c_get(query, GET))[-1]
    return final, identifier, received
