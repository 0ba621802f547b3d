"""The ``dicomweb`` adapter: any archive with a DICOMweb service (QIDO-RS, WADO-RS, STOW-RS).

Config (``[[archives]]``): ``url`` (required: the DICOMweb root, e.g.
``http://127.0.0.1:8042/dicom-web``), ``username``/``password`` (HTTP basic, optional),
``crawl_qps`` (default 50), ``timeout`` (seconds per request, default 30),
``page_instances`` (instances per crawl page, default 500), ``max_studies`` (studies the
crawl lists, default 1,000,000).

What the service answers is hostile: a QIDO-RS answer is read up to ``QIDO_ANSWER`` bytes
(decoded JSON takes several times its size in memory) and only the ``limit`` rows asked
are used; the study list stops at ``max_studies`` (the crawl stops with an error naming
it) or when a page repeats the one before (a service that ignores ``offset`` would be
listed for ever); a Study, Series or SOP Instance UID that is not a UID by PS3.5 §9.1 is
never put in a URL (its row is skipped, one warning per page). A WADO-RS body is
streamed into a file (at most ``http.MAX_DOWNLOAD`` bytes), its part headers within
``MAX_PART_HEAD`` bytes.

- store: the SOP Instance UID is looked up first (QIDO-RS); held already, the copy is a
  duplicate if its data set hashes the same, else a conflict (DICOMweb keeps one copy per
  UID). Otherwise STOW-RS: ``POST {url}/studies``, ``multipart/related;
  type="application/dicom"``, the file's bytes as the single part.
- open: WADO-RS ``GET {url}/studies/{s}/series/{se}/instances/{i}`` asking for
  ``transfer-syntax=*`` (the stored bytes, never transcoded); the multipart answer is
  streamed into an unlinked temporary file under ``<data_dir>/incoming``, stripped of its
  part headers and closing delimiter on the fly. The hierarchy UIDs come from the crawl or
  a QIDO-RS lookup.
- crawl: QIDO-RS ``studies`` (listed once, with their instance counts: the total), then
  each study's ``instances`` with ``includefield`` for every attribute the catalog keeps,
  paged with offset/limit. The cursor is ``study offset:instance offset``. QIDO-RS reports
  no file size nor transfer syntax: 0 and "" (delivery copes).
- discard: DICOMweb has no standard delete: logged and ignored.
- delete (a cluster-wide delete or a rejection note): only with ``delete = true``, for a
  server that accepts ``DELETE {url}/studies/{s}/series/{se}/instances/{i}`` (e.g. the
  Google Cloud Healthcare API; not Orthanc's DICOMweb plugin, nor the standard). Without
  it the archive has no ``delete`` capability: what the cluster deletes stays there,
  hidden from the view and listed as retained in ``pacsp2p status``.
- health: a QIDO-RS ping (``studies?limit=1``) with its latency.
- send, changes: absent (DICOMweb has neither a "send to AE" nor a change feed).

All HTTP runs in this adapter's thread pool; the reactor only waits on Deferreds.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

from pydicom.datadict import tag_for_keyword
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer

from pacsp2p.adapters.http import HTTPError, Unreachable
from pacsp2p.adapters.interface import IArchive, ICrawls, IDeletes, IOpens, IStores
from pacsp2p.adapters.rest import RestArchive
from pacsp2p.adapters.orthanc import _Lru, unlinked_copy
from pacsp2p.dicom.part10 import file_dataset_hash
from pacsp2p.attributes import STORED
from pacsp2p.dicom.header import content_hash
from pacsp2p.types import InstanceMeta, Stored
from pacsp2p.validate import is_uid, shown

log = Logger()

KNOWN_KEYS = ("name", "adapter", "site", "url", "username", "password", "crawl_qps",
              "timeout", "page_instances", "threads", "delete", "max_studies")
TAGS = {kw: f"{tag_for_keyword(kw):08X}" for kw in STORED}
INCLUDE = ",".join(sorted(STORED))
STUDY_PAGE = 1000
MAX_STUDIES = 1_000_000     # studies a crawl lists (``max_studies``)
QIDO_ANSWER = 16 << 20      # bytes of one QIDO-RS answer
MAX_PART_HEAD = 64 << 10    # bytes of the part headers of a WADO-RS answer
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class DicomWebError(Exception):
    """The DICOMweb service refused an operation."""


def _value_text(element: dict) -> str:
    values = element.get("Value") or []
    out = []
    for v in values:
        if isinstance(v, dict):           # PN: {"Alphabetic": ...}
            v = v.get("Alphabetic", "")
        out.append("" if v is None else str(v))
    return "\\".join(out).strip()


def json_attributes(row: dict) -> dict:
    """The catalog's attributes out of one DICOM JSON (PS3.18 F.2) object."""
    out = {}
    for kw, tag in TAGS.items():
        element = row.get(tag)
        if element:
            text = _value_text(element)
            if text:
                out[kw] = text
    return out


class _Multipart:
    """A file-like body: one multipart/related part holding the file at *path*."""

    def __init__(self, path: Path, boundary: str):
        self.path = path
        self.head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                     f"Content-Length: {path.stat().st_size}\r\n\r\n").encode()
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        self.length = len(self.head) + path.stat().st_size + len(self.tail)
        self.f = None
        self.seek(0)

    def seek(self, _pos):
        if self.f is not None:
            self.f.close()
        self.f = open(self.path, "rb")
        self.parts = [self.head, None, self.tail]

    def read(self, size=-1):
        while self.parts:
            first = self.parts[0]
            if first is None:
                chunk = self.f.read(size if size and size > 0 else 1 << 20)
                if chunk:
                    return chunk
                self.parts.pop(0)
                continue
            self.parts.pop(0)
            return first
        return b""

    def close(self):
        if self.f is not None:
            self.f.close()


def _q(uid: str) -> str:
    """*uid* as one segment of a URL path (nothing in it stays a "/")."""
    return quote(uid, safe="")


def _boundary(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"')
    return None


@implementer(IArchive, IStores, IOpens, ICrawls)
class DicomWebArchive(RestArchive):
    capabilities = frozenset({"store", "open", "crawl"})
    max_fetches = 4             # WADO-RS requests at once
    kind, product = "dicomweb", "DICOMweb"

    def __init__(self, name: str, reactor, *, url: str, username: str | None = None,
                 password: str | None = None, site: str | None = None,
                 crawl_qps: float = 50.0, timeout: float = 30.0, page_instances: int = 500,
                 incoming: Path | None = None, threads: int = 8, delete: bool = False,
                 max_studies: int = MAX_STUDIES):
        super().__init__(name, reactor, url=url, username=username, password=password,
                         site=site, crawl_qps=crawl_qps, timeout=timeout,
                         incoming=incoming, threads=threads)
        self.page_instances, self.max_studies = int(page_instances), int(max_studies)
        if delete:                            # the server accepts DELETE (not standard)
            self.capabilities = DicomWebArchive.capabilities | {"delete"}
            alsoProvides(self, IDeletes)
        self._where = _Lru(200_000)           # SOP uid -> (study uid, series uid)
        self._studies: list[tuple[str, int | None]] | None = None
        self._total: int | None = None

    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        from pacsp2p.adapters import config_where
        from pacsp2p.config import ConfigError, archive_integer
        opts = cls.options(cfg, settings, KNOWN_KEYS)
        delete = opts.get("delete", False)
        if not isinstance(delete, bool):
            raise ConfigError(f"{config_where(cfg, settings)}.delete: must be true or "
                              f"false, got {delete!r}")
        max_studies = archive_integer(opts, "max_studies", MAX_STUDIES, 1,
                                      config_where(cfg, settings))
        return cls(cfg.name, reactor, url=opts["url"], username=opts.get("username"),
                   password=opts.get("password"), site=cfg.site,
                   crawl_qps=opts.get("crawl_qps", 50.0), timeout=opts.get("timeout", 30.0),
                   page_instances=opts.get("page_instances", 500),
                   incoming=settings.data_dir / "incoming", threads=opts.get("threads", 8),
                   delete=delete, max_studies=max_studies)

    def health(self):
        def check():
            try:
                t0 = time.monotonic()
                self._qido("/studies", {"limit": 1})
                latency = (time.monotonic() - t0) * 1000
            except HTTPError as e:
                self._mark(False, str(e))
                return {"up": False, "error": str(e), "latency_ms": None, "free_bytes": None}
            self._mark(True)
            return {"up": True, "latency_ms": round(latency, 2), "free_bytes": None}
        return self._run(check)

    # -- QIDO-RS (pool threads) ------------------------------------------------------
    def _qido(self, path: str, params: dict) -> list:
        """The rows of a QIDO-RS answer (at most the ``limit`` asked)."""
        query = urlencode(params, safe=",")
        rows = self.http.get(f"{path}?{query}" if query else path,
                             headers={"Accept": "application/dicom+json"},
                             limit=QIDO_ANSWER)
        rows = rows if isinstance(rows, list) else []
        return rows[:params["limit"]] if "limit" in params else rows

    def _locate(self, uid: str) -> tuple[str, str]:
        where = self._where.get(uid)
        if where is not None:
            return where
        rows = self._qido("/instances", {"SOPInstanceUID": uid,
                                         "includefield": "StudyInstanceUID,SeriesInstanceUID"})
        for row in rows:
            attrs = json_attributes(row) if isinstance(row, dict) else {}
            where = (attrs.get("StudyInstanceUID"), attrs.get("SeriesInstanceUID"))
            if attrs.get("SOPInstanceUID", uid) == uid and all(map(is_uid, where)):
                self._where.put(uid, where)
                return where
        raise KeyError(f"{uid} is not in DICOMweb archive {self.name}")

    # -- WADO-RS ---------------------------------------------------------------------
    def _fetch(self, uid: str):
        study, series = self._locate(uid)
        path = f"/studies/{_q(study)}/series/{_q(series)}/instances/{_q(uid)}"
        rsp = self.http.open("GET", path, headers={"Accept": ACCEPT_DICOM})
        f = unlinked_copy(self.incoming)
        try:
            boundary = _boundary(rsp.getheader("Content-Type") or "")
            _strip_multipart(rsp, f, boundary)
            f.seek(0)
        except BaseException:
            f.close()
            self.http.close()
            raise
        return f

    def open(self, uid: str, sha256: str | None = None):
        return self._run(self._fetch, uid)

    # -- STOW-RS ---------------------------------------------------------------------
    def store(self, received, meta):
        return self._run(self._store, Path(received), meta)

    def _store(self, received: Path, meta) -> Stored:
        uid = meta.sop_instance_uid
        sha, size = content_hash(received)
        try:
            self._locate(uid)
        except KeyError:
            pass
        else:
            with self._fetch(uid) as held:
                same = file_dataset_hash(held) == sha
            if same:
                return Stored(self.name, sha, size, duplicate=True)
            log.warn("archive {archive}: the DICOMweb archive already holds other bytes for "
                     "{uid}; it keeps its first copy", archive=self.name, uid=uid)
            return Stored(self.name, sha, size, conflict=True)
        boundary = uuid.uuid4().hex
        body = _Multipart(received, boundary)
        try:
            answer = self.http.call("POST", "/studies", body, {
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary={boundary}',
                "Content-Length": str(body.length), "Accept": "application/dicom+json"},
                ok=(200, 202))
        finally:
            body.close()
        if not isinstance(answer, dict):
            raise DicomWebError(f"STOW-RS of {uid}: unexpected answer {answer[:200]!r}")
        failed = answer.get("00081198", {}).get("Value") or []
        stored = answer.get("00081199", {}).get("Value") or []
        if failed or not any(_value_text(item.get("00081155", {})) == uid for item in stored):
            reason = ""
            for item in failed:
                reason = _value_text(item.get("00081197", {}))     # FailureReason
            raise DicomWebError(f"STOW-RS did not store {uid}"
                                + (f" (failure reason {reason})" if reason else ""))
        study = meta.attributes.get("StudyInstanceUID")
        series = meta.attributes.get("SeriesInstanceUID")
        if study and series:
            self._where.put(uid, (study, series))
        return Stored(self.name, sha, size)

    def discard(self, uid, sha256):
        log.warn("archive {archive}: DICOMweb cannot delete {uid}; the copy stays",
                 archive=self.name, uid=uid)
        return defer.succeed(None)

    def delete(self, uid: str, sha256: str = ""):
        """``DELETE {url}/studies/{s}/series/{se}/instances/{i}`` (``delete = true``: the
        server supports it). DICOMweb keeps one copy per UID, whatever *sha256*.
        Deferred[int]."""
        def remove() -> int:
            try:
                study, series = self._locate(uid)
            except KeyError:
                return 0
            try:
                self.http.call("DELETE", f"/studies/{_q(study)}/series/{_q(series)}"
                               f"/instances/{_q(uid)}", ok=(200, 202, 204))
            except HTTPError as e:
                if e.status == 404:
                    return 0
                raise
            self._where.pop(uid, None)
            return 1
        return self._run(remove)

    # -- crawl -----------------------------------------------------------------------
    def _list_studies(self) -> list:
        studies, bad = [], []
        try:
            self._list_into(studies, bad)
        finally:
            if bad:
                log.warn("archive {archive}: {n} study row(s) skipped: StudyInstanceUID is "
                         "not a UID (e.g. {example})", archive=self.name, n=len(bad),
                         example=shown(bad[0]))
        return studies

    def _list_into(self, studies: list, bad: list) -> None:
        offset, first = 0, None
        while True:
            rows = self._qido("/studies", {"offset": offset, "limit": STUDY_PAGE,
                                           "includefield": "NumberOfStudyRelatedInstances"})
            rows = [r for r in rows if isinstance(r, dict)]
            if offset and rows and rows[0] == first:
                raise DicomWebError(f"archive {self.name}: QIDO-RS answers the same studies "
                                    f"at offset {offset} as at 0: it ignores offset")
            first = first if offset else (rows[0] if rows else None)
            for row in rows:
                s = _value_text(row.get("0020000D", {}))
                n = _value_text(row.get("00201208", {}))
                if is_uid(s):
                    studies.append((s, int(n) if n.isdigit() else None))
                else:
                    bad.append(s)
            if len(studies) > self.max_studies:
                raise DicomWebError(f"archive {self.name}: more than {self.max_studies} "
                                    f"studies listed (max_studies)")
            if len(rows) < STUDY_PAGE:
                return
            offset += len(rows)

    @defer.inlineCallbacks
    def crawl(self, cursor, throttle):
        s_off, i_off = (int(x) for x in (cursor or "0:0").split(":"))
        items = []
        try:
            if self._studies is None:
                yield throttle()
                self._studies = yield self._run(self._list_studies)
                counts = [n for _, n in self._studies]
                self._total = sum(counts) if None not in counts else None
            for _ in range(10_000):
                if s_off >= len(self._studies) or len(items) >= self.page_instances:
                    break
                study, count = self._studies[s_off]
                want = self.page_instances - len(items)
                yield throttle()
                rows = yield self._run(self._qido, f"/studies/{_q(study)}/instances",
                                       {"offset": i_off, "limit": want,
                                        "includefield": INCLUDE})
                items += yield self._run(self._metas, rows, study)
                i_off += len(rows)
                if not rows or len(rows) < want or (count is not None and i_off >= count):
                    s_off, i_off = s_off + 1, 0
        except Unreachable as e:
            self._mark(False, str(e))
            yield task.deferLater(self.reactor, 2.0, lambda: None)
            return [], cursor, self._total
        self._mark(True)
        if s_off >= len(self._studies):
            self._studies = None                 # a later crawl lists them afresh
            return items, None, self._total
        return items, f"{s_off}:{i_off}", self._total

    def _metas(self, rows: list, study: str) -> list:
        """The instances of QIDO-RS *rows*; one whose UIDs are not UIDs goes on to the
        crawler's check (and its warning), never into the map of where instances are."""
        items = []
        for row in rows:
            attrs = json_attributes(row) if isinstance(row, dict) else {}
            attrs.setdefault("StudyInstanceUID", study)
            uid, sop_class = attrs.get("SOPInstanceUID"), attrs.get("SOPClassUID")
            if not uid or not sop_class or not attrs.get("SeriesInstanceUID"):
                continue
            where = (attrs["StudyInstanceUID"], attrs["SeriesInstanceUID"])
            if is_uid(uid) and all(map(is_uid, where)):
                self._where.put(uid, where)
            items.append((InstanceMeta(uid, sop_class, "", attrs, 0), 0))
        return items


def _strip_multipart(rsp, out, boundary: str | None) -> None:
    """Copy the single part of the multipart body *rsp* into *out* (headers and the
    closing delimiter removed); a non-multipart body is copied whole."""
    if boundary is None:
        while chunk := rsp.read(1 << 20):
            out.write(chunk)
        return
    head = b""
    while True:                               # the part headers: well under 64 KiB
        chunk = rsp.read(16384)
        if not chunk:
            raise DicomWebError("WADO-RS answer ends inside the part headers")
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(head) > MAX_PART_HEAD:
            raise DicomWebError(f"WADO-RS part headers over {MAX_PART_HEAD} bytes")
    out.write(head[end + 4:])
    while chunk := rsp.read(1 << 20):
        out.write(chunk)
    # the closing "\r\n--boundary--" (maybe with a transport padding) ends the file
    size = out.tell()
    tail_len = min(size, len(boundary) + 256)
    out.seek(size - tail_len)
    tail = out.read(tail_len)
    cut = tail.rfind(b"\r\n--" + boundary.encode())
    if cut < 0:
        raise DicomWebError("WADO-RS answer has no closing multipart delimiter")
    out.truncate(size - tail_len + cut)
    out.seek(0, os.SEEK_END)
