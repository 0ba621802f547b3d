"""The ``orthanc`` adapter: an Orthanc server, spoken to through its REST API.

Config (``[[archives]]``): ``url`` (required, e.g. ``http://127.0.0.1:8042``),
``username``/``password`` (HTTP basic, optional), ``crawl_qps`` (default 200),
``timeout`` (seconds per request, default 30), ``page_studies`` (studies per crawl page,
default 16), ``storage_path`` (Orthanc's storage directory, if on this host: reported
as free space).

- store: ``POST /instances`` with the file's bytes (Orthanc keeps them as sent). Orthanc
  keeps one copy per SOP Instance UID: a UID already held is a duplicate if its data set
  hashes the same, else a conflict (reported; Orthanc keeps its first copy).
- discard: ``DELETE /instances/{id}``, if the held data set is the one to drop.
- delete (a cluster-wide delete or a rejection note): ``DELETE /instances/{id}`` of the
  copy with that data set hash, or of every Orthanc instance with that SOP Instance UID
  when the hash is not known (``POST /tools/lookup``).
- open: the Orthanc id (remembered from store/crawl, else ``POST /tools/lookup``), then
  ``GET /instances/{id}/file`` streamed into an unlinked temporary file under
  ``<data_dir>/incoming``: the bytes exactly as stored.
- send: the destination is declared in Orthanc (``PUT /modalities/{name}``), then
  ``POST /modalities/{name}/store`` with the instance ids: Orthanc sends them itself.
- crawl (the fast path): ``GET /studies?expand&since=N&limit=M`` pages through the
  studies; for each, ``/studies/{id}/instances`` (ids, file sizes) and
  ``/studies/{id}/instances-tags?simplify`` (every attribute the catalog keeps, SOP class
  included) — two requests per study, whatever its size. The transfer syntax is not in
  either (it would cost a request per instance): it is left "" and delivery copes. The
  cursor is the study offset plus the ``/changes`` sequence number when the crawl began,
  so what is added meanwhile is followed afterwards.
- changes: ``GET /changes?since=N&limit=M``, following ``NewInstance`` events.
- health: ``GET /system`` (latency) and ``/statistics`` (disk used).
- verify (a scrub): ``POST /instances/{id}/attachments/dicom/verify-md5``, Orthanc's own
  check of its file against the MD5 it recorded when it stored it (no byte crosses the
  link); when that fails or Orthanc has no MD5, ``GET /instances/{id}/file`` hashed
  against the catalog's SHA-256 decides (damaged, or missing when Orthanc's index names a
  file its storage no longer has). Orthanc's storage cache (``MaximumStorageCacheSize``,
  128 MB by default) answers both from memory for recently read files: damage on disk
  shows once they leave it.
- restore: the damaged copies (those whose MD5 check fails; the only one otherwise) are
  deleted (``DELETE /instances/{id}``) and the good file is stored again
  (``POST /instances``).

Every Orthanc id in an answer (lookup, study and instance listings, changes, a store's
answer) must be one (five groups of 8 hex digits, ``is_orthanc_id``) before it names a
resource in a URL: an answer naming ``../../..`` is not understood (``OrthancError``), a
listed instance with such an id is skipped.

All HTTP runs in this adapter's thread pool (keep-alive connections, JSON decoded
there); the reactor only waits on Deferreds. An Orthanc that stops answering is reported
down (logged once), the crawl waits for it and resumes, changes are retried later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from pacsp2p.adapters.http import HTTPError, Unreachable
from pacsp2p.adapters.interface import (IArchive, ICrawls, IDeletes, IFollows, IOpens,
                                        IRestores, ISends, IStores, IVerifies)
from pacsp2p.adapters.rest import RestArchive
from pacsp2p.attributes import STORED
from pacsp2p.dicom.header import content_hash
from pacsp2p.dicom.part10 import file_dataset_hash
from pacsp2p.types import InstanceMeta, Stored
from pacsp2p.validate import shown

log = Logger()

KNOWN_KEYS = ("name", "adapter", "site", "url", "username", "password", "crawl_qps",
              "timeout", "page_studies", "storage_path", "threads")
CACHE = 200_000            # SOP Instance UID -> Orthanc id, remembered (LRU)
CHANGES_PAGE = 1000        # /changes per request
CHANGES_PAGES = 10         # requests per changes() call at most
CONCURRENCY = 4            # studies fetched at once while crawling


class OrthancError(Exception):
    """Orthanc refused an operation (or answered what it does not say)."""


_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}\Z")


def is_orthanc_id(value) -> bool:
    """True for an Orthanc resource id (the SHA-1 of its DICOM ids, in 5 groups of 8)."""
    return isinstance(value, str) and _ORTHANC_ID.match(value) is not None


def _count(value, default: int = 0) -> int:
    """*value* (a count or size Orthanc answered) as an int >= 0, else *default*."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return n if n >= 0 else default


def orthanc_id(value, what: str) -> str:
    """*value* if it is an Orthanc id, else OrthancError naming *what* answered it."""
    if is_orthanc_id(value):
        return value
    raise OrthancError(f"{what} answered {shown(value)}, not an Orthanc id")


def catalog_attributes(tags: dict) -> dict:
    """The catalog's attributes out of a keyword -> value JSON map (strings only)."""
    out = {}
    for kw in STORED:
        value = tags.get(kw)
        if isinstance(value, str):
            value = value.strip()
            if value:
                out[kw] = value
    return out


def unlinked_copy(incoming: Path):
    """A temporary binary file under *incoming*, already unlinked (gone when closed)."""
    incoming.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=incoming, prefix="fetch-", suffix=".dcm")
    os.unlink(path)
    return os.fdopen(fd, "w+b")


class _Lru:
    """A bounded map, oldest entries dropped first; safe across the pool's threads."""

    def __init__(self, size):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            return self._d.get(key, default)

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            if len(self._d) > self.size:
                self._d.popitem(last=False)

    def pop(self, key, default=None):
        with self._lock:
            return self._d.pop(key, default)

    def clear(self):
        with self._lock:
            self._d.clear()


@implementer(IArchive, IStores, IOpens, ISends, ICrawls, IFollows, IDeletes, IVerifies,
             IRestores)
class OrthancArchive(RestArchive):
    capabilities = frozenset({"store", "open", "send", "crawl", "changes", "delete",
                              "verify", "restore"})
    kind, product = "orthanc", "Orthanc"
    max_fetches = 4             # GETs of /instances/{id}/file at once

    def __init__(self, name: str, reactor, *, url: str, username: str | None = None,
                 password: str | None = None, site: str | None = None,
                 crawl_qps: float = 200.0, timeout: float = 30.0, page_studies: int = 16,
                 storage_path: str | None = None, incoming: Path | None = None,
                 threads: int = 8):
        super().__init__(name, reactor, url=url, username=username, password=password,
                         site=site, crawl_qps=crawl_qps, timeout=timeout,
                         incoming=incoming, threads=threads)
        self.page_studies = int(page_studies)
        self.storage_path = storage_path
        self._ids = _Lru(CACHE)                  # SOP uid -> Orthanc instance id
        self._several = _Lru(10_000)             # SOP uids Orthanc keeps more than once
        self._crawl_seq: int | None = None       # /changes sequence when the crawl began
        self._total: int | None = None
        self._stopping = False

    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        opts = cls.options(cfg, settings, KNOWN_KEYS)
        return cls(cfg.name, reactor, url=opts["url"], username=opts.get("username"),
                   password=opts.get("password"), site=cfg.site,
                   crawl_qps=opts.get("crawl_qps", 200.0), timeout=opts.get("timeout", 30.0),
                   page_studies=opts.get("page_studies", 16),
                   storage_path=opts.get("storage_path"),
                   incoming=settings.data_dir / "incoming", threads=opts.get("threads", 8))

    # -- life cycle ------------------------------------------------------------------
    def _started(self, health):
        log.info("archive {archive}: Orthanc {version} at {url}",
                 archive=self.name, version=health.get("version", "?"), url=self.url)

    def stop(self):
        self._stopping = True
        super().stop()

    # -- health ----------------------------------------------------------------------
    def health(self):
        def check():
            try:
                t0 = time.monotonic()
                system = self.http.get("/system")
                latency = (time.monotonic() - t0) * 1000
                stats = self.http.get("/statistics")
            except HTTPError as e:
                self._mark(False, str(e))
                return {"up": False, "error": str(e), "latency_ms": None, "free_bytes": None}
            self._mark(True)
            free = None
            if self.storage_path:
                try:
                    free = shutil.disk_usage(self.storage_path).free
                except OSError:
                    pass
            return {"up": True, "latency_ms": round(latency, 2), "free_bytes": free,
                    "used_bytes": _count(stats.get("TotalDiskSize", 0)),
                    "instances": stats.get("CountInstances"),
                    "version": system.get("Version")}
        return self._run(check)

    # -- ids -------------------------------------------------------------------------
    def _lookup_all(self, uid: str) -> list[str]:
        """Orthanc ids of every instance with SOP Instance UID *uid* (Orthanc keeps two
        when they differ in patient/study/series: its ids hash the whole hierarchy)."""
        found = self.http.call("POST", "/tools/lookup", uid.encode(),
                               {"Content-Type": "text/plain"})
        if not isinstance(found, list):
            raise OrthancError(f"POST /tools/lookup answered {shown(found)}, not a list")
        return [orthanc_id(item.get("ID"), "POST /tools/lookup") for item in found
                if isinstance(item, dict) and item.get("Type") == "Instance"]

    def _lookup(self, uid: str) -> str:
        """Orthanc id of the instance *uid* (KeyError if Orthanc has none)."""
        oid = self._ids.get(uid)
        if oid is not None:
            return oid
        ids = self._lookup_all(uid)
        if not ids:
            raise KeyError(f"{uid} is not in Orthanc archive {self.name}")
        self._ids.put(uid, ids[0])
        return ids[0]

    def _held(self, uid: str, sha256: str) -> tuple[str | None, list[str]]:
        """(id of the copy of *uid* whose data set hashes *sha256* or None, all ids)."""
        ids = self._lookup_all(uid)
        for oid in ids:
            try:
                with self._fetch(oid) as held:
                    if file_dataset_hash(held) == sha256:
                        return oid, ids
            except HTTPError as e:
                if e.status != 404:
                    raise
        return None, ids

    def _fetch(self, oid: str):
        f = unlinked_copy(self.incoming)
        try:
            self.http.download(f"/instances/{oid}/file", f,
                               headers={"Accept": "application/dicom"})
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    # -- store -----------------------------------------------------------------------
    def store(self, received, meta):
        return self._run(self._store, Path(received), meta.sop_instance_uid)

    def _store(self, received: Path, uid: str) -> Stored:
        sha, size = content_hash(received)
        same, ids = self._held(uid, sha)
        if same is not None:
            self._ids.put(uid, same)
            return Stored(self.name, sha, size, duplicate=True)
        with open(received, "rb") as body:
            answer = self.http.call("POST", "/instances", body,
                                    {"Content-Type": "application/dicom",
                                     "Content-Length": str(received.stat().st_size)})
        status = answer.get("Status") if isinstance(answer, dict) else None
        if status not in ("Success", "AlreadyStored"):
            raise OrthancError(f"Orthanc did not store {uid}: {answer!r}"[:500])
        if not ids:
            self._ids.put(uid, orthanc_id(answer.get("ID"), "POST /instances"))
            return Stored(self.name, sha, size)
        self._several.put(uid, True)
        if status == "Success":
            log.warn("archive {archive}: {uid} received again with other bytes (another "
                     "patient/study/series): Orthanc keeps both", archive=self.name, uid=uid)
        else:
            log.warn("archive {archive}: Orthanc already holds other bytes for {uid}; it "
                     "keeps only its first copy", archive=self.name, uid=uid)
        return Stored(self.name, sha, size, conflict=True)

    def discard(self, uid: str, sha256: str):
        def remove():
            oid, _ = self._held(uid, sha256)
            if oid is None:
                return                           # not ours (or gone): keep the rest
            self.http.call("DELETE", f"/instances/{oid}")
            if self._ids.get(uid) == oid:
                self._ids.pop(uid, None)
        return self._run(remove)

    def delete(self, uid: str, sha256: str = ""):
        """``DELETE /instances/{id}`` of the copy hashing to *sha256* (of every Orthanc
        instance with SOP Instance UID *uid* if *sha256* is empty). Deferred[int]."""
        def remove() -> int:
            if sha256:
                oid, _ = self._held(uid, sha256)
                ids = [oid] if oid is not None else []
            else:
                ids = self._lookup_all(uid)
            removed = 0
            for oid in ids:
                try:
                    self.http.call("DELETE", f"/instances/{quote(oid)}")
                    removed += 1
                except HTTPError as e:
                    if e.status != 404:          # gone meanwhile: fine
                        raise
            self._ids.pop(uid, None)
            return removed
        return self._run(remove)

    # -- read ------------------------------------------------------------------------
    def open(self, uid: str, sha256: str | None = None):
        """One GET of the file when the id is known (else a lookup first); each byte
        crosses the link once. Only a UID Orthanc keeps twice (other patient/study/
        series) is chosen among its copies by the data set hash *sha256*."""
        def opener():
            oid = self._ids.get(uid)
            if oid is not None and not (sha256 and self._several.get(uid)):
                try:
                    return self._fetch(oid)
                except HTTPError as e:
                    if e.status != 404:
                        raise
                self._ids.pop(uid, None)         # deleted and stored again: a new id
            ids = self._lookup_all(uid)
            if not ids:
                raise KeyError(f"{uid} is not in Orthanc archive {self.name}")
            if len(ids) > 1:
                self._several.put(uid, True)
                if sha256:                       # the copy with those bytes
                    for oid in ids:
                        f = self._fetch(oid)
                        if file_dataset_hash(f) == sha256:
                            f.seek(0)
                            return f
                        f.close()
            self._ids.put(uid, ids[0])
            return self._fetch(ids[0])
        return self._run(opener)

    # -- scrub -----------------------------------------------------------------------
    def verify(self, items):
        """Deferred[[(uid, "ok" | "damaged" | "missing", bytes fetched)]] (see above)."""
        items = list(items)
        return self._run(lambda: [self._verify_one(uid, sha) for uid, sha in items])

    def _md5_ok(self, oid: str) -> bool | None:
        """Orthanc's own check of its file: True, False (mismatch, no MD5 kept, no file)."""
        try:
            self.http.call("POST", f"/instances/{quote(oid)}/attachments/dicom/verify-md5",
                           b"", {"Content-Type": "text/plain"})
            return True
        except HTTPError as e:
            if e.status in (400, 404, 415, 500):
                return False
            raise

    def _verify_one(self, uid: str, sha256: str) -> tuple[str, str, int]:
        ids = self._lookup_all(uid)
        if not ids:
            return uid, "missing", 0
        if len(ids) == 1 or not sha256:          # Orthanc's MD5: as it was stored
            if all(self._md5_ok(oid) for oid in ids):
                return uid, "ok", 0
            if not sha256:
                return uid, "damaged", 0
        gone, read = 0, 0                        # several versions, or a failed check:
        for oid in ids:                          # the bytes decide
            try:
                with self._fetch(oid) as f:
                    held = file_dataset_hash(f)
                    read += f.seek(0, os.SEEK_END)
            except HTTPError as e:
                if e.status not in (404, 500):
                    raise
                gone += 1                        # in Orthanc's index, not in its storage
                continue
            except Exception:                    # not a Part-10 file any more
                continue
            if held == sha256:
                return uid, "ok", read
        return uid, "missing" if gone == len(ids) else "damaged", read

    def restore(self, received, meta):
        """Store the good file again in place of the damaged copy (see above)."""
        def put_back() -> Stored:
            uid = meta.sop_instance_uid
            sha, size = content_hash(Path(received))
            ids = self._lookup_all(uid)
            bad = [oid for oid in ids if not self._md5_ok(oid)]
            if not bad and len(ids) == 1:
                bad = ids                        # the only copy, damaged (no MD5 kept)
            for oid in bad:
                try:
                    self.http.call("DELETE", f"/instances/{quote(oid)}")
                except HTTPError as e:
                    if e.status != 404:
                        raise
            self._ids.pop(uid, None)
            with open(received, "rb") as body:
                answer = self.http.call("POST", "/instances", body,
                                        {"Content-Type": "application/dicom",
                                         "Content-Length": str(Path(received).stat().st_size)})
            if not isinstance(answer, dict) or answer.get("Status") not in (
                    "Success", "AlreadyStored"):
                raise OrthancError(f"Orthanc did not store {uid} again: {answer!r}"[:500])
            self._ids.put(uid, orthanc_id(answer.get("ID"), "POST /instances"))
            return Stored(self.name, sha, size)
        return self._run(put_back)

    # -- send ------------------------------------------------------------------------
    def send(self, sop_instance_uids, destination):
        return self._run(self._send, list(sop_instance_uids), destination)

    def _send(self, uids, dest) -> dict:
        name = "pacsp2p-" + "".join(c if c.isalnum() else "_" for c in dest.ae_title)
        self.http.call("PUT", f"/modalities/{quote(name)}", _json(
            {"AET": dest.ae_title, "Host": dest.host, "Port": dest.port}),
            {"Content-Type": "application/json"})
        ids, failed_uids = {}, []
        for uid in uids:
            try:
                ids[uid] = self._lookup(uid)
            except KeyError:
                failed_uids.append(uid)

        def store(chosen):
            answer = self.http.post_json(f"/modalities/{quote(name)}/store", {
                "Resources": chosen, "Synchronous": True, "Permissive": True})
            return int(answer.get("FailedInstancesCount", 0))

        failed = store(list(ids.values())) if ids else 0
        if failed:            # which ones? Orthanc only counts them: send them one by one
            for uid, oid in ids.items():
                try:
                    bad = store([oid])
                except HTTPError:
                    bad = 1
                if bad:
                    failed_uids.append(uid)
        return {"completed": len(uids) - len(failed_uids), "failed": len(failed_uids),
                "warning": 0, "failed_uids": failed_uids}

    # -- crawl -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def crawl(self, cursor, throttle):
        offset, seq = _parse_cursor(cursor)
        try:
            if seq is None:
                yield throttle()
                seq = (yield self._run(self.http.get, "/changes?last"))["Last"]
            self._crawl_seq = seq
            if self._total is None:
                yield throttle()
                stats = yield self._run(self.http.get, "/statistics")
                self._total = _count(stats.get("CountInstances", 0))
            yield throttle()
            studies = yield self._run(self.http.get,
                                      f"/studies?expand&since={offset}"
                                      f"&limit={self.page_studies}")
            pages = yield _bounded(
                [lambda s=s: self._crawl_study(s, throttle) for s in studies], CONCURRENCY)
        except Unreachable as e:
            self._mark(False, str(e))
            yield task.deferLater(self.reactor, 2.0, lambda: None)   # wait, then again
            return [], cursor, self._total
        self._mark(True)
        items = [item for page in pages for item in page]
        if len(studies) < self.page_studies:
            return items, None, self._total
        return items, f"{offset + len(studies)}:{seq}", self._total

    @defer.inlineCallbacks
    def _crawl_study(self, study: dict, throttle):
        sid = orthanc_id(study.get("ID") if isinstance(study, dict) else study,
                         "GET /studies")
        yield throttle()
        d_list = self._run(self.http.get, f"/studies/{sid}/instances")
        yield throttle()
        d_tags = self._run(self.http.get, f"/studies/{sid}/instances-tags?simplify")
        listing, tags = yield gather([d_list, d_tags])
        return (yield self._run(self._metas, study, listing, tags))

    def _metas(self, study: dict, listing: list, tags: dict) -> list:
        parent = {**study.get("PatientMainDicomTags", {}), **study.get("MainDicomTags", {})}
        items = []
        for inst in listing:
            if not isinstance(inst, dict) or not is_orthanc_id(inst.get("ID")):
                continue                        # not an instance Orthanc could name
            t = tags.get(inst["ID"]) if isinstance(tags, dict) else None
            if not isinstance(t, dict):         # arrived between the two requests
                continue
            attrs = {**catalog_attributes(parent), **catalog_attributes(t)}
            uid, sop_class = attrs.get("SOPInstanceUID"), attrs.get("SOPClassUID")
            if not uid or not sop_class:
                continue
            self._ids.put(uid, inst["ID"])
            size = _count(inst.get("FileSize", 0))
            items.append((InstanceMeta(uid, sop_class, "", attrs, size), size))
        return items

    # -- changes ---------------------------------------------------------------------
    @defer.inlineCallbacks
    def changes(self, since, throttle):
        items = []
        try:
            if since is None:
                if self._crawl_seq is not None:
                    since = self._crawl_seq
                else:
                    yield throttle()
                    since = (yield self._run(self.http.get, "/changes?last"))["Last"]
            since = int(since)
            for _ in range(CHANGES_PAGES):
                yield throttle()
                page = yield self._run(self.http.get,
                                       f"/changes?since={since}&limit={CHANGES_PAGE}")
                new = [c["ID"] for c in page.get("Changes", ())
                       if c.get("ChangeType") == "NewInstance" and is_orthanc_id(c.get("ID"))]
                found = yield _bounded([lambda oid=oid: self._instance(oid, throttle)
                                        for oid in new], CONCURRENCY)
                items += [item for item in found if item is not None]
                since = max(since, _count(page.get("Last", since), since))
                if page.get("Done", True):
                    break
        except Unreachable as e:
            self._mark(False, str(e))
            return items, None if since is None else str(since)
        self._mark(True)
        return items, str(since)

    @defer.inlineCallbacks
    def _instance(self, oid: str, throttle):
        """(InstanceMeta, size) of the instance with Orthanc id *oid*; None if gone."""
        yield throttle()
        try:
            info, tags, meta = yield gather([
                self._run(self.http.get, f"/instances/{oid}"),
                self._run(self.http.get, f"/instances/{oid}/tags?simplify"),
                self._run(self.http.get, f"/instances/{oid}/metadata?expand")])
        except HTTPError as e:
            if e.status == 404:
                return None                      # deleted since
            raise
        attrs = catalog_attributes(tags)
        uid, sop_class = attrs.get("SOPInstanceUID"), attrs.get("SOPClassUID")
        if not uid or not sop_class:
            return None
        self._ids.put(uid, oid)
        size = _count(info.get("FileSize", 0))
        return InstanceMeta(uid, sop_class, meta.get("TransferSyntax", ""), attrs, size), size


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _parse_cursor(cursor):
    """'offset:seq' -> (offset, seq); None -> (0, None)."""
    if not cursor:
        return 0, None
    offset, _, seq = str(cursor).partition(":")
    return int(offset), (int(seq) if seq else None)


def gather(ds):
    """gatherResults that fails with the first failure itself (not a FirstError)."""
    d = defer.gatherResults(list(ds), consumeErrors=True)
    d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
    return d


def _bounded(calls, limit: int):
    """Run the Deferred-returning *calls*, at most *limit* at a time; results in order."""
    sem = defer.DeferredSemaphore(limit)
    return gather(sem.run(call) for call in calls)
