"""The ``dimse`` adapter: any PACS archive, spoken to through DIMSE only.

Works with every archive that is a C-STORE / C-FIND / C-GET / C-MOVE / C-ECHO SCP
(DCMTK dcmqrscp, Orthanc, dcm4chee, a vendor PACS). Every operation runs pynetdicom in
this adapter's own thread pool; the reactor only waits on Deferreds.

- store: C-STORE of the received file's data set bytes unchanged (pynetdicom sends a file
  path without decoding it), proposing the file's own transfer syntax; an archive that
  does not accept it (a compressed one) gets it decompressed, as dcmsend does
  (``syntaxes``: the copy's hash is then of what the archive holds). An instance the
  archive holds already (an IMAGE-level C-FIND, then a C-GET to compare the bytes, or
  its conversion's) is not sent again: a duplicate, or a conflict (the archive keeps
  its copy).
- open: C-GET at IMAGE level (study root, with the Study and Series Instance UIDs: archives
  such as dcmqrscp only answer hierarchical requests). The SOP class and the hierarchy come
  from what the crawl saw, the catalog (``Catalog.hierarchy``, handed to the adapter as
  ``hierarchy``), or an IMAGE-level C-FIND, in that order. The
  instance is received as the encoded bytes the archive sent (never decoded) into an
  unlinked temporary file under ``<data_dir>/incoming``. One presentation context is
  proposed per transfer syntax, so the archive sends the syntax it keeps.
- send: C-MOVE of a UID list to a destination AE the archive knows.
- crawl, changes: study root C-FIND, one study per page, paged by StudyDate ranges on a
  large archive (``dimse_crawl``).
- discard: impossible over DIMSE; logged and ignored.
- health: C-ECHO with its latency.
- scrub: by sample only (``scrub_by_sample``): ``[cluster] scrub_sample`` of the copies
  per pass, read by C-GET at a tenth of ``scrub_rate``; a damaged copy cannot be
  replaced over DIMSE (no ``restore``): it is reported.

Associations are pooled per kind (a few idle ones are kept and reused; a stale one is
replaced once). What the archive sends is bounded (``associations.Bounds``: PDU, command
and data set sizes, bytes per operation, read timeouts): a C-FIND answers at most
``max_find_rows`` matches (``[[archives]]``, default 20,000; past it C-CANCEL, the
association aborted, ``TooManyMatches``) and ``FIND_BYTES``; a C-GET receives one data set
of at most ``max_dataset`` bytes (default 4 GiB) into a file under ``incoming`` as it
arrives, never in memory; a C-GET or C-MOVE answers at most ``MAX_PENDING`` Pending
responses (and 4 per instance moved). Past a bound the operation fails naming it
(``Refused``: this answer is refused, the archive itself is not taken for gone); the
association is aborted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)
from pydicom.filereader import read_file_meta_info
from pynetdicom import build_context, build_role, evt
from pynetdicom import sop_class as sc
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pacsp2p.adapters import syntaxes
from pacsp2p.adapters.associations import (MAX_IDENTIFIER, Associations, DimseError,
                                           Refused, drop_partial, spool_received,
                                           spool_released)
from pacsp2p.adapters.dimse_crawl import DimseCrawl, TooManyMatches
from pacsp2p.adapters.interface import IArchive, ICrawls, IFollows, IOpens, ISends, IStores
from pacsp2p.adapters.orthanc import _Lru, unlinked_copy
from pacsp2p.dicom.contexts import MAX_CONTEXTS, STORAGE_ORDER
from pacsp2p.dicom.part10 import file_dataset_hash
from pacsp2p.dicom.header import _text, content_hash
from pacsp2p.types import Stored
from pacsp2p.validate import is_uid

log = Logger()

# proposed one per presentation context when receiving (C-GET): the archive picks the one
# its file is in, so what arrives is byte-identical to what it keeps
GET_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1,
                JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLSLossless,
                JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
                DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)

KNOWN_KEYS = ("name", "adapter", "site", "ae_title", "host", "port", "calling_ae", "fetch",
              "crawl_qps", "timeout", "max_pdu", "max_find_rows", "max_dataset")
MAX_FIND_ROWS = 20_000     # matches of one C-FIND (default of ``max_find_rows``)
MAX_DATASET = 4 << 30      # bytes of one data set a C-GET receives (``max_dataset``)
FIND_BYTES = 64 << 20      # bytes of one C-FIND's answer
GET_SLACK = 16 << 20       # bytes a C-GET may receive besides its data set
MAX_PENDING = 1000         # Pending responses of a C-GET (a C-MOVE: and 4 per instance)
MAX_MOVE_IDENTIFIER = 1 << 20  # bytes of a C-MOVE response's identifier (failed UIDs)
REMEMBERED = 200_000       # instances whose place is kept (and studies whose count)
MAX_TIMEOUT = 3600         # seconds: ``timeout`` (association, message, socket read)


def _attrs(ds: Dataset, keywords) -> dict:
    """{keyword: text} of those of *keywords* that *ds* holds a value for (a value that
    does not decode is left out)."""
    out = {}
    for kw in keywords:
        try:
            text = _text(ds[kw]) if kw in ds else ""
        except Exception:
            continue
        if text:
            out[kw] = text
    return out


def _spooled(event, incoming: Path):
    """The data set of a received C-STORE as an open, unlinked Part-10 file at 0."""
    path = getattr(event.request, "_dataset_path", None)
    if path is None:            # not spooled (STORE_RECV_CHUNKED_DATASET off)
        f = unlinked_copy(incoming)
        f.write(event.encoded_dataset(include_meta=True))
        f.seek(0)
        return f
    event.request._dataset_file.close()
    f = open(path, "rb")
    os.unlink(path)
    return f


def _discard(event) -> None:
    """Remove the spooled file of a received C-STORE refused."""
    path = getattr(event.request, "_dataset_path", None)
    if path is not None:
        event.request._dataset_file.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _dispatch_store(event):
    sink = getattr(event.assoc, "pacsp2p_sink", None)
    if sink is None:
        _discard(event)
        return 0xA700
    return sink(event)


class Unreadable(KeyError):
    """The archive lists the instance (its C-GET was matched) but failed to send it, and
    no C-STORE sub-operation of it arrived: dcmqrscp whose file was removed behind its
    back (0xA702). A ``KeyError``, so a scrub counts the copy *missing* (and has it made
    again elsewhere), as for an instance the archive no longer lists."""


def _failed_alone(final) -> bool:
    """Whether a C-GET's final response says its one sub-operation failed, none done."""
    try:
        return final is not None and final.Status != 0x0000 and \
            int(getattr(final, "NumberOfFailedSuboperations", 0) or 0) >= 1 and \
            not int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
    except (TypeError, ValueError):
        return False


@implementer(IArchive, IStores, IOpens, ISends, ICrawls, IFollows)
class DimseArchive(DimseCrawl):
    capabilities = frozenset({"store", "open", "send", "crawl", "changes"})
    scrub_by_sample = True      # every read is a C-GET: a scrub checks a sample, slower
    max_fetches = 2             # C-GET associations at once (a PACS limits them)

    def __init__(self, name: str, reactor, *, ae_title: str, host: str, port: int,
                 calling_ae: str = "PACSP2P", site: str | None = None, fetch: str = "get",
                 crawl_qps: float = 50.0, timeout: float = 30.0, max_pdu: int = 0,
                 incoming: Path | None = None, threads: int = 8, hierarchy=None,
                 max_find_rows: int = MAX_FIND_ROWS, max_dataset: int = MAX_DATASET):
        """*hierarchy*: ``uid -> Deferred[(study, series, sop class, syntax) | None]``
        (the catalog's ``hierarchy``), or None."""
        self.name, self.site, self.reactor = name, site, reactor
        self.ae_title, self.host, self.port = ae_title, host, int(port)
        self.calling_ae, self.fetch, self.timeout = calling_ae, fetch, float(timeout)
        self.crawl_qps, self.max_pdu = float(crawl_qps), int(max_pdu)
        self.incoming = Path(incoming) if incoming else Path(tempfile.gettempdir())
        self.hierarchy = hierarchy
        self.max_find_rows, self.max_dataset = int(max_find_rows), int(max_dataset)
        self.up = True
        self._pool = ThreadPool(1, threads, f"archive-{name}")
        self._assocs = Associations(calling_ae, ae_title, host, self.port, self.timeout,
                                    self.max_pdu, self.incoming)
        self._associate, self._with_assoc = self._assocs.associate, self._assocs.run
        self._where = _Lru(REMEMBERED)         # SOP uid -> (study, series, class, syntax)
        self._seen_counts = _Lru(REMEMBERED)   # study -> instances known (changes)

    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        from pacsp2p.config import ConfigError, archive_integer, check_ae, check_host
        opts = dict(cfg.options)
        where = f"{settings.source}: archives.{cfg.name}"
        for key in opts:
            if key not in KNOWN_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key for adapter 'dimse' "
                                  f"(known: {', '.join(KNOWN_KEYS)})")
        for key in ("ae_title", "host", "port"):
            if key not in opts:
                raise ConfigError(f"{where}.{key}: required by adapter 'dimse'")
        opts.setdefault("calling_ae", settings.facade.ae_title)
        for key in ("ae_title", "calling_ae", "host"):  # a list, 17 characters: "ok", no start
            fail = lambda r, k=key: ConfigError(f"{where}.{k}: {r}"[:300])  # noqa: E731
            if not isinstance(opts[key], str) or key == "host" and "/" in opts[key]:
                raise fail(f"must be {'a host' if key == 'host' else 'an AE title'}, "
                           f"got {opts[key]!r}")
            opts[key] = (check_host if key == "host" else check_ae)(opts[key], fail)
        if type(opts["port"]) is not int or not 0 < opts["port"] < 65536:
            raise ConfigError(f"{where}.port: must be a TCP port number")
        fetch = opts.get("fetch", "get")
        if fetch != "get":
            raise ConfigError(f"{where}.fetch: only \"get\" is supported (got {fetch!r})")
        for key in ("crawl_qps", "timeout"):            # nan, true
            if key in opts and (type(opts[key]) not in (int, float)
                                or not 0 < opts[key] < float("inf")):
                raise ConfigError(f"{where}.{key}: must be a positive number, "
                                  f"got {opts[key]!r}"[:300])
        if type(pdu := opts.get("max_pdu", 0)) is not int or pdu and not 4096 <= pdu <= 2**31:
            raise ConfigError(f"{where}.max_pdu: must be 0 or 4096..2^31, got {pdu!r}"[:300])
        if opts.get("timeout", 30.0) > MAX_TIMEOUT:
            raise ConfigError(f"{where}.timeout: must be at most {MAX_TIMEOUT} seconds, "
                              f"got {opts['timeout']!r}")
        max_rows = archive_integer(opts, "max_find_rows", MAX_FIND_ROWS, 10, where)
        max_dataset = archive_integer(opts, "max_dataset", MAX_DATASET, 1024, where)
        return cls(cfg.name, reactor, ae_title=opts["ae_title"], host=opts["host"],
                   port=opts["port"], site=cfg.site,
                   calling_ae=opts["calling_ae"],
                   fetch=fetch, crawl_qps=opts.get("crawl_qps", 50.0),
                   timeout=opts.get("timeout", 30.0), max_pdu=opts.get("max_pdu", 0),
                   incoming=settings.data_dir / "incoming",
                   hierarchy=catalog.hierarchy if catalog is not None else None,
                   max_find_rows=max_rows, max_dataset=max_dataset)

    def __repr__(self):
        return f"<dimse archive {self.name}: {self.ae_title}@{self.host}:{self.port}>"

    def _run(self, fn, *args):
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        spool_received()
        self._pool.start()
        self.incoming.mkdir(parents=True, exist_ok=True)
        d = self.health()

        def check(h):
            if not h.get("up"):
                raise DimseError(f"{self.ae_title}@{self.host}:{self.port} does not answer "
                                 f"C-ECHO: {h.get('error', 'no answer')}")
        return d.addCallback(check)

    def stop(self):
        d = self._run(self._assocs.close)
        d.addBoth(lambda _: self._pool.stop())
        d.addBoth(lambda _: spool_released())
        return d

    # -- health ----------------------------------------------------------------------
    def health(self):
        return self._run(self._echo)

    def _echo(self) -> dict:
        t0 = time.monotonic()
        try:
            def echo(assoc):
                status = assoc.send_c_echo()
                if not status or status.Status != 0:
                    raise DimseError("C-ECHO failed")
            self._with_assoc("echo", lambda: self._associate(
                [build_context(sc.Verification)]), echo)
        except Exception as e:
            return {"up": False, "error": str(e) or type(e).__name__}
        return {"up": True, "latency_ms": round((time.monotonic() - t0) * 1000, 2),
                "free_bytes": None}

    # -- store -----------------------------------------------------------------------
    def store(self, received, meta):
        return self._run(self._store, Path(received), meta)

    def _store(self, received: Path, meta) -> Stored:
        sha, size = content_hash(received)
        ts = str(read_file_meta_info(received).TransferSyntaxUID)
        sop_class, uid = meta.sop_class_uid, meta.sop_instance_uid
        held = self._held_hash(meta, received, ts)
        if held is not None:           # kept as it is: the archive would overwrite it
            held, converted = held     # converted: ours as the archive would hold it
            same = held in (sha, converted)
            if not same:
                log.warn("archive {archive}: {ae} already holds other bytes for {uid}; it "
                         "keeps its copy", archive=self.name, ae=self.ae_title, uid=uid)
            return Stored(self.name, held if same else sha, size, duplicate=same,
                          conflict=not same, given=sha if same and held != sha else "")
        kind = ("store", sop_class, ts)
        make = lambda: self._associate(syntaxes.proposed(sop_class, ts))  # noqa: E731
        target = self._with_assoc(kind, make,
                                  lambda assoc: syntaxes.accepted(assoc, sop_class, ts))
        if target is None:
            raise DimseError(f"{self.ae_title} accepts {sop_class} neither in {ts} nor "
                             "uncompressed")
        given, path, f = "", received, None
        if target != ts:               # as dcmsend: decompressed, content and UIDs kept
            try:
                f, converted, size = syntaxes.converted(received, sop_class, uid, target,
                                                        self.incoming, self.max_dataset)
            except syntaxes.NotConverted as e:
                raise DimseError(f"{self.ae_title} does not accept {uid} in "
                                 f"{UID(ts).name}: {e} (max_dataset)") from None
            given, sha, path = sha, converted, Path(f.name)

        def send(assoc):
            status = assoc.send_c_store(path)
            if not status or "Status" not in status:
                raise DimseError(f"no C-STORE response from {self.ae_title}")
            return status.Status

        try:
            status = self._with_assoc(kind, make, send)
        finally:
            if f is not None:
                f.close()
        if status not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise DimseError(f"{self.ae_title} refused {uid}: C-STORE status 0x{status:04X}")
        a = meta.attributes
        if a.get("StudyInstanceUID") and a.get("SeriesInstanceUID"):
            self._where.put(uid, (a["StudyInstanceUID"], a["SeriesInstanceUID"], sop_class,
                                  target))
        return Stored(self.name, sha, size, given=given)

    def _held_hash(self, meta, received: Path, ts: str) -> tuple[str, str] | None:
        """(data set hash of the copy of *meta*'s instance the archive holds, hash of
        *received* converted to that copy's syntax if it is another uncompressed one, or
        ""), or None if it holds none (or cannot send it). C-FIND, then C-GET."""
        uid, a = meta.sop_instance_uid, meta.attributes
        study, series = a.get("StudyInstanceUID"), a.get("SeriesInstanceUID")
        if not (study and series):
            return None
        rows = self._find("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series,
                                    "SOPInstanceUID": uid}, ())
        if not any(str(r.get("SOPInstanceUID", "")) == uid for r in rows):
            return None
        try:
            with self._get(uid, study, series, meta.sop_class_uid) as f:
                return file_dataset_hash(f), syntaxes.held_is_converted(
                    f, received, ts, self.max_dataset) or ""
        except (DimseError, Refused):
            return None

    def discard(self, uid, sha256):
        log.warn("archive {archive}: cannot delete {uid} over DIMSE; the copy stays "
                 "(it is not recorded in the catalog)", archive=self.name, uid=uid)
        return defer.succeed(None)

    # -- find (pool threads) -----------------------------------------------------------
    def _find(self, level: str, keys: dict, returns) -> list[dict]:
        """The matches of a study root C-FIND at *level*: {keyword: text} of *returns*
        and *keys*; TooManyMatches past ``max_find_rows`` (cancelled)."""
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for kw in returns:
            setattr(ds, kw, "")
        for kw, value in keys.items():
            setattr(ds, kw, value)
        model = sc.StudyRootQueryRetrieveInformationModelFind
        wanted = list(dict.fromkeys([*returns, *keys]))
        what = f"archive {self.name}: C-FIND {level} to {self.ae_title}"

        def query(assoc):
            bounds = assoc.pacsp2p_bounds
            bounds.operation(MAX_IDENTIFIER, FIND_BYTES)
            rows = []
            for status, ident in assoc.send_c_find(ds, model):
                if not status or "Status" not in status:
                    if bounds.why:
                        raise Refused(f"{what}: cut: {bounds.why}")
                    raise DimseError(f"{what}: no response")
                if status.Status in (0xFF00, 0xFF01):
                    if ident is not None:
                        rows.append(_attrs(ident, wanted))
                    if len(rows) > self.max_find_rows:
                        try:
                            assoc.send_c_cancel(1, query_model=model)
                        except Exception:
                            pass
                        raise TooManyMatches(f"{what}: more than {self.max_find_rows} "
                                             f"matches (max_find_rows): cancelled")
                elif status.Status != 0x0000:
                    raise DimseError(f"{what} failed: status 0x{status.Status:04X}")
            return rows

        return self._with_assoc("find", lambda: self._associate([build_context(model)]),
                                query)

    def _find_d(self, level, keys, returns):
        return self._run(self._find, level, keys, returns)

    # -- open: C-GET -------------------------------------------------------------------
    def open(self, uid: str, sha256: str | None = None):
        d = self._locate(uid)
        d.addCallback(self._get_twice, uid)
        return d

    def _get_twice(self, where, uid: str):
        """C-GET of *uid*; "listed but not sent" (``Unreadable``) only if a second C-GET
        agrees: one may be a passing fault of the archive (out of resources), and a copy
        counted missing is made again elsewhere and forgotten here."""
        d = self._run(self._get, uid, *where)
        d.addErrback(lambda f: f.trap(Unreadable) and self._run(self._get, uid, *where))
        return d

    @defer.inlineCallbacks
    def _locate(self, uid):
        where = self._where.get(uid)
        if where is None and self.hierarchy is not None:
            where = yield self.hierarchy(uid)
        if where is None:
            rows = yield self._find_d("IMAGE", {"SOPInstanceUID": uid},
                                      ["StudyInstanceUID", "SeriesInstanceUID",
                                       "SOPClassUID"])
            for r in rows:
                study, series = r.get("StudyInstanceUID"), r.get("SeriesInstanceUID")
                sop_class = r.get("SOPClassUID")
                if is_uid(study) and is_uid(series) and is_uid(sop_class):
                    where = (study, series, sop_class, "")
        if where is None:
            raise KeyError(f"archive {self.name}: {uid} not found")
        self._where.put(uid, where)
        return where

    def _get(self, uid: str, study: str, series: str, sop_class: str, ts: str = ""):
        """The instance *uid* by C-GET: an open, unlinked Part-10 file (the data set
        bytes as received, never decoded), at most ``max_dataset`` bytes."""
        got = {}
        what = f"archive {self.name}: C-GET of {uid} from {self.ae_title}"

        def on_store(event):
            got["sent"] = True
            if event.request.AffectedSOPInstanceUID != uid or "f" in got:
                _discard(event)
                return 0xA700 if "f" in got else 0xC000
            try:
                got["f"] = _spooled(event, self.incoming)
            except OSError:
                _discard(event)
                return 0xA700
            return 0x0000

        model = sc.StudyRootQueryRetrieveInformationModelGet
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID, ident.SeriesInstanceUID = study, series
        ident.SOPInstanceUID = uid

        def make():
            # the syntax it is kept in when known (a compressed one: or uncompressed, as
            # this adapter converted it for an archive refusing it), else one per syntax
            plain = syntaxes.UNCOMPRESSED_LE
            kept = [ts] if ts in plain else [ts, *plain]
            cxs = [build_context(model)] + [build_context(sop_class, [t])
                                            for t in (kept if ts else GET_SYNTAXES)]
            return self._associate(cxs, [build_role(sop_class, scp_role=True)],
                                   [(evt.EVT_C_STORE, _dispatch_store)])

        def get(assoc):
            assoc.pacsp2p_sink = on_store      # this call's receiver on a pooled association
            try:
                return self._retrieve(assoc, assoc.send_c_get(ident, model), what,
                                      MAX_PENDING)
            finally:
                assoc.pacsp2p_sink = None

        try:
            final = self._with_assoc(("get", sop_class, ts), make, get)
        except Exception:
            if "f" in got:
                got["f"].close()
            raise
        if "f" not in got:
            code = f"0x{final.Status:04X}" if final is not None else "none"
            if "sent" not in got and _failed_alone(final):
                raise Unreadable(f"{what}: listed but not sent (status {code}, a failed "
                                 "sub-operation): its file is missing or unreadable")
            raise DimseError(f"{what} returned no instance (status {code})")
        return got["f"]

    def _retrieve(self, assoc, responses, what: str, most: int):
        """The final response of a C-GET; Refused past *most* responses or a bound of
        what the association may receive (a data set spooled half way is removed)."""
        bounds = assoc.pacsp2p_bounds
        bounds.operation(self.max_dataset, self.max_dataset + GET_SLACK)
        final, n = None, 0
        try:
            for status, _ in responses:
                if not status or "Status" not in status:
                    if bounds.why:
                        raise Refused(f"{what}: cut: {bounds.why} (max_dataset "
                                      f"{self.max_dataset})")
                    raise DimseError(f"{what}: no response")
                final, n = status, n + 1
                if n > most:
                    raise Refused(f"{what}: more than {most} responses")
        except BaseException:
            if assoc.is_established:
                assoc.abort()           # its reader stops before the file is removed
            drop_partial(assoc)
            raise
        return final

    def _probe_class(self, study: str, series: str, uid: str) -> str:
        """SOP Class UID of one instance, from a C-GET proposing every storage class the
        facade accepts (``contexts.STORAGE_ORDER``): the 127 first in one association,
        the others in a second one if the archive sent nothing on the first."""
        step = MAX_CONTEXTS - 1                   # (one context for the C-GET itself)
        for i in range(0, len(STORAGE_ORDER), step):
            try:
                return self._probe_with(STORAGE_ORDER[i:i + step], study, series, uid)
            except (DimseError, Refused):
                if i + step >= len(STORAGE_ORDER):
                    raise

    def _probe_with(self, classes, study: str, series: str, uid: str) -> str:
        got = {}

        def on_store(event):
            got["class"] = str(event.request.AffectedSOPClassUID)
            _discard(event)
            return 0x0000

        model = sc.StudyRootQueryRetrieveInformationModelGet
        cxs = [build_context(model)] + [build_context(c) for c in classes]
        assoc = self._associate(cxs, [build_role(c, scp_role=True) for c in classes],
                                [(evt.EVT_C_STORE, on_store)])
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID, ident.SeriesInstanceUID = study, series
        ident.SOPInstanceUID = uid
        try:
            self._retrieve(assoc, assoc.send_c_get(ident, model),
                           f"archive {self.name}: C-GET of {uid}", MAX_PENDING)
        except (DimseError, Refused):
            if "class" not in got:
                raise
        finally:
            if assoc.is_established:
                assoc.release()
        if "class" not in got:
            raise DimseError(f"archive {self.name}: cannot learn the SOP class of {uid} "
                             f"(C-FIND does not return it and C-GET sent nothing)")
        return got["class"]

    # -- send: C-MOVE ------------------------------------------------------------------
    def send(self, sop_instance_uids, destination):
        d = defer.gatherResults([self._locate(u) for u in sop_instance_uids],
                                consumeErrors=True)
        d.addCallback(lambda wheres: self._run(self._move, list(sop_instance_uids), wheres,
                                               destination.ae_title))
        return d

    def _move(self, uids, wheres, dest_ae):
        model = sc.StudyRootQueryRetrieveInformationModelMove
        by_series = defaultdict(list)
        for uid, (study, series, *_) in zip(uids, wheres):
            by_series[(study, series)].append(uid)
        total = {"completed": 0, "failed": 0, "warning": 0, "failed_uids": []}
        for (study, series), group in by_series.items():
            ident = Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID, ident.SeriesInstanceUID = study, series
            ident.SOPInstanceUID = group if len(group) > 1 else group[0]

            def move(assoc, group=group, ident=ident):
                assoc.pacsp2p_bounds.operation(MAX_MOVE_IDENTIFIER, None)
                final, most = None, 4 * len(group) + MAX_PENDING
                for n, (status, _) in enumerate(assoc.send_c_move(ident, dest_ae, model)):
                    if n >= most:
                        raise Refused(f"archive {self.name}: C-MOVE to {dest_ae}: more "
                                      f"than {most} responses")
                    if status and "Status" in status:
                        final = status
                return final

            final = self._with_assoc("move", lambda: self._associate(
                [build_context(model)]), move)
            if final is None or final.Status not in (0x0000, 0xB000):
                total["failed_uids"] += group
            done = int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0) \
                if final is not None else 0
            if final is not None and final.Status == 0x0000 and not done:
                done = len(group)
            total["completed"] += done
            total["failed"] += len(group) - done
            total["warning"] += int(getattr(final, "NumberOfWarningSuboperations", 0)
                                    or 0) if final is not None else 0
        return total
