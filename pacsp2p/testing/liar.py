"""A lying Orthanc for tests: a real HTTP server (``http.server`` in a thread of the test)
that answers Orthanc's REST API the way a broken or hostile archive might.

    with LyingOrthanc() as o:
        o.add(path)                       # a Part-10 file it "holds"
        o.lie("file", uid, other_bytes)   # GET /instances/{id}/file of *uid* answers these
        ... a peer with {"adapter": "orthanc", "url": o.url} ...

It serves what the ``orthanc`` adapter asks (``/system``, ``/statistics``, ``/changes``,
``/studies?expand``, ``/studies/{id}/instances``, ``/studies/{id}/instances-tags``,
``/tools/lookup``, ``/instances/{id}/file``); ``overrides`` maps a path (without the
query) to a callable ``(handler) -> None`` that answers instead (e.g. non-JSON, a huge
body, a redirect, a body that never ends). Only on 127.0.0.1; every request is counted
in ``hits``.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydicom import dcmread

from .ports import LOOPBACK


def _id(text: str) -> str:
    """An Orthanc-like id: a SHA-1 in 5 groups of 8 hex digits."""
    h = hashlib.sha1(text.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


class LyingOrthanc:
    def __init__(self):
        self.studies: dict[str, dict] = {}      # orthanc study id -> {tags, instances}
        self.files: dict[str, bytes] = {}       # orthanc instance id -> bytes served
        self.tags: dict[str, dict] = {}         # orthanc instance id -> simplified tags
        self.by_uid: dict[str, str] = {}        # SOP Instance UID -> orthanc instance id
        self.overrides: dict[str, object] = {}
        self.sizes: dict[str, object] = {}      # orthanc instance id -> FileSize listed
        self.hits: dict[str, int] = {}
        self.sent: dict[str, int] = {}          # path -> bytes of an endless answer sent
        self.gone: dict[str, float] = {}        # uid -> seconds a trickle lasted
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    # -- content ---------------------------------------------------------------------
    def add(self, path: Path | str, tags: dict | None = None, oid: str | None = None) -> str:
        """Hold the file *path*; *tags* replace what its data set says, *oid* the
        Orthanc id it is listed under (lies)."""
        data = Path(path).read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        t = {"SOPInstanceUID": str(ds.SOPInstanceUID), "SOPClassUID": str(ds.SOPClassUID),
             "StudyInstanceUID": str(ds.StudyInstanceUID),
             "SeriesInstanceUID": str(ds.SeriesInstanceUID),
             "PatientID": str(ds.get("PatientID", "")), "Modality": str(ds.Modality)}
        t.update(tags or {})
        oid = oid or _id(t["SOPInstanceUID"] + t["SeriesInstanceUID"])
        sid = _id(t["StudyInstanceUID"])
        study = self.studies.setdefault(sid, {
            "ID": sid, "MainDicomTags": {"StudyInstanceUID": t["StudyInstanceUID"]},
            "PatientMainDicomTags": {"PatientID": t["PatientID"]}, "instances": []})
        study["instances"].append(oid)
        self.files[oid], self.tags[oid] = data, t
        self.by_uid[t["SOPInstanceUID"]] = oid
        return oid

    def endless(self, path: str, total: int, ctype: str = "application/json") -> None:
        """*path* answers a chunked body of *total* bytes (a JSON string, if it ever
        ends); ``sent[path]`` counts what was written before the client went away."""
        def answer(h):
            h.send_response(200)
            h.send_header("Content-Type", ctype)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            block = b"a" * (1 << 20)
            parts = [b'["'] + [block] * (total >> 20) + [b'"]', b""]
            try:
                for part in parts:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.sent[path] = self.sent.get(path, 0) + len(part)
            except OSError:
                h.close_connection = True
        self.overrides[path] = answer

    def trickle(self, uid: str, every: float = 1.0, at_most: float = 90.0) -> None:
        """GET /instances/{id}/file of *uid* sends its headers, then a byte every
        *every* seconds for at most *at_most* seconds; ``gone[uid]`` is how many
        seconds after the headers the client closed (absent if it never did)."""
        data = self.files[self.by_uid[uid]]

        def answer(h):
            h.send_response(200)
            h.send_header("Content-Type", "application/dicom")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            t0 = time.monotonic()
            try:
                for i in range(len(data)):
                    if time.monotonic() - t0 > at_most:
                        break
                    h.wfile.write(data[i:i + 1])
                    h.wfile.flush()
                    time.sleep(every)
            except OSError:
                self.gone[uid] = time.monotonic() - t0
            h.close_connection = True
        self.overrides[f"/instances/{self.by_uid[uid]}/file"] = answer

    def serve_instead(self, uid: str, data: bytes) -> None:
        """GET /instances/{id}/file of *uid* answers *data* (another file, truncated...)."""
        self.files[self.by_uid[uid]] = data

    # -- server ----------------------------------------------------------------------
    def start(self) -> "LyingOrthanc":
        liar = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send_json(self, value, status=200):
                self.send_body(json.dumps(value).encode(), "application/json", status)

            def send_body(self, body: bytes, ctype: str, status=200):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._answer()

            def do_POST(self):
                self._answer()

            def do_PUT(self):
                self._answer()

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                liar.hits[path] = liar.hits.get(path, 0) + 1
                override = liar.overrides.get(path)
                if override is not None:
                    return override(self)
                return liar.answer(self, path, query)

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="lying-orthanc").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def answer(self, h, path: str, query: str) -> None:
        n = len(self.files)
        if path == "/system":
            return h.send_json({"Version": "1.12.1", "Name": "LIAR"})
        if path == "/statistics":
            return h.send_json({"CountInstances": n, "TotalDiskSize": "1000"})
        if path == "/changes":
            if query == "last":
                return h.send_json({"Last": 0})
            return h.send_json({"Changes": [], "Done": True, "Last": 0})
        if path == "/studies":
            q = dict(p.partition("=")[::2] for p in query.split("&"))
            since, limit = int(q.get("since") or 0), int(q.get("limit") or 100)
            studies = sorted(self.studies.values(), key=lambda s: s["ID"])
            return h.send_json([{k: v for k, v in s.items() if k != "instances"}
                                for s in studies[since:since + limit]])
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "studies" and parts[1] in self.studies:
            study = self.studies[parts[1]]
            if parts[2] == "instances":
                return h.send_json([{"ID": oid, "FileSize": self.sizes.get(
                    oid, len(self.files[oid]))} for oid in study["instances"]])
            if parts[2] == "instances-tags":
                return h.send_json({oid: self.tags[oid] for oid in study["instances"]})
        if path == "/tools/lookup":
            oid = self.by_uid.get(h.body.decode(errors="replace").strip())
            return h.send_json([{"Type": "Instance", "ID": oid}] if oid else [])
        if len(parts) == 3 and parts[0] == "instances" and parts[2] == "file":
            data = self.files.get(parts[1])
            if data is not None:
                return h.send_body(data, "application/dicom")
        return h.send_body(b"not found", "text/plain", 404)


def _in_range(date: str, key: str) -> bool:
    """StudyDate *date* matches the key *key* (a single date or a range, PS3.4
    C.2.2.2.5: a study with no date matches no range)."""
    if not key:
        return True
    if "-" not in key:
        return date == key
    if not date:
        return False
    lo, _, hi = key.partition("-")
    return (not lo or date >= lo) and (not hi or date <= hi)


class LyingFindSCP:
    """A lying DIMSE archive (pynetdicom, in a thread of the test): C-ECHO, study root
    C-FIND and C-GET over *studies* ({study uid: (count text, [(series, sop, class)])}
    or with a StudyDate third: ``(count, images, "20260101")``), the count answered raw as
    NumberOfStudyRelatedInstances (``b"abc "``: not a count). StudyDate keys match as
    ranges. Lies on demand:

    - ``endless``: every C-FIND STUDY answers Pending matches for ever (new study UIDs,
      whatever the keys); ``sent`` counts the matches sent;
    - ``sizes``: {SOP uid: bytes}: a C-GET of that instance sends a CT data set of about
      that many bytes (pixel data of zeros), 4 KiB if absent;
    - ``fat``: every C-FIND match carries a StudyDescription of that many characters;
    - ``probe_honest``: a Patient ID key starting with ``~`` matches nothing (every other
      Patient ID key is ignored, as always);
    - ``exact_empty``: a Patient ID key without ``*`` matches nothing (with
      ``probe_honest``: every other wildcard matches every study).

    ``queries`` holds the keys of every C-FIND ({keyword: text}).
    """

    def __init__(self, studies: dict, ae_title: str = "LIAR", *, endless: bool = False,
                 sizes: dict | None = None, fat: int = 0, probe_honest: bool = False,
                 exact_empty: bool = False):
        self.studies, self.ae_title = studies, ae_title
        self.probe_honest, self.exact_empty = probe_honest, exact_empty
        self.endless, self.sizes, self.fat = endless, dict(sizes or {}), fat
        self.queries: list[dict] = []
        self.sent = 0
        self._server = None
        self.port = 0

    def _find(self, event):
        from pydicom.dataelem import RawDataElement
        from pydicom.dataset import Dataset
        from pydicom.tag import Tag
        q = event.identifier
        level = q.QueryRetrieveLevel
        self.queries.append({e.keyword: str(e.value) for e in q if e.value not in ("", None)})
        pid = str(q.get("PatientID", "") or "")
        if self.probe_honest and pid.startswith("~") or \
                self.exact_empty and pid and "*" not in pid:
            return
        if self.endless and level == "STUDY":
            n = 0
            while True:
                n += 1
                ds = Dataset()
                ds.QueryRetrieveLevel, ds.StudyInstanceUID = level, f"1.2.3.9.{n}"
                ds.PatientID, ds.StudyDescription = "LIAR", "ENDLESS " * 8
                self.sent += 1
                yield 0xFF00, ds
        for study, (count, images, *date) in sorted(self.studies.items()):
            if level != "STUDY" and q.get("StudyInstanceUID") not in ("", None, study):
                continue
            date = date[0] if date else ""
            if not _in_range(date, str(q.get("StudyDate", "") or "")):
                continue
            rows = [()] if level == "STUDY" else sorted(
                {(s,) for s, _, _ in images} if level == "SERIES" else images)
            for row in rows:
                if level == "IMAGE" and q.get("SeriesInstanceUID") not in ("", None, row[0]):
                    continue
                ds = Dataset()
                ds.QueryRetrieveLevel, ds.StudyInstanceUID = level, study
                ds.PatientID, ds.StudyDate = "LIAR", date
                if self.fat:
                    ds.StudyDescription = "F" * self.fat
                if level == "STUDY":
                    ds[0x00201208] = RawDataElement(Tag(0x00201208), "IS", len(count),
                                                    count, 0, True, True)
                else:
                    ds.SeriesInstanceUID = row[0]
                if level == "IMAGE":
                    ds.SOPInstanceUID, ds.SOPClassUID = row[1], row[2]
                self.sent += 1
                yield 0xFF00, ds

    def _get(self, event):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian
        uid = str(event.identifier.get("SOPInstanceUID", ""))
        where = [(study, series, cls) for study, (_, images, *_) in self.studies.items()
                 for series, sop, cls in images if sop == uid]
        if not where:
            yield 0
            return
        study, series, cls = where[0]
        yield 1
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = cls, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality = "LIAR", "CT"
        size = self.sizes.get(uid, 4096)
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = size // 1024, 512, 16, 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(ds.Rows * 1024)
        yield 0xFF00, ds

    def start(self) -> "LyingFindSCP":
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (CTImageStorage,
                                          StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet,
                                          Verification)
        from .ports import free_port
        ae = AE(self.ae_title)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        self.port = free_port()
        self._server = ae.start_server((LOOPBACK, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_FIND, self._find),
                                                     (evt.EVT_C_GET, self._get)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class StallingProxy:
    """A TCP proxy in a thread of the test (127.0.0.1:``port`` -> *target*): a connection
    opened after ``stall(n)`` forwards *n* bytes from the server to the client and then
    nothing, and stays open (an archive that stops in the middle of a PDU); those opened
    before go on. ``held`` counts the bytes kept back."""

    def __init__(self, target_port: int):
        import socket
        self.target = (LOOPBACK, target_port)
        self._listen = socket.create_server((LOOPBACK, 0))
        self.port = self._listen.getsockname()[1]
        self._after: int | None = None
        self.held = 0
        self._socks: list = []

    def stall(self, after: int) -> None:
        self._after = after

    def _pipe(self, src, dst, left: int | None) -> None:
        try:
            while data := src.recv(65536):
                if left is not None:
                    self.held += len(data[left:])
                    data, left = data[:left], max(0, left - len(data))
                if data:
                    dst.sendall(data)
        except OSError:
            pass

    def _serve(self) -> None:
        import socket
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._socks += [client, server]
            for a, b, left in ((client, server, None), (server, client, self._after)):
                threading.Thread(target=self._pipe, args=(a, b, left), daemon=True).start()

    def __enter__(self) -> "StallingProxy":
        threading.Thread(target=self._serve, daemon=True, name="stalling-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self._listen.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
