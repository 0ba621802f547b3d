"""The audit trail: one JSON line per association, per DIMSE operation, per refused
association and per admin action, in ``<data_dir>/audit.log`` (rotated by size,
``[audit] max_bytes`` and ``backups``).

Who read or wrote which patient's images, from where, and with what result. Each line
is one DICOM audit message (PS3.15 A.5, the IHE ATNA / RFC 3881 schema) written as JSON
with the schema's own element and attribute names, so that a collector turns it into the
XML message without knowing pacsp2p (docs/operations.md says how):

- ``EventIdentification``: ``EventID`` (a coded value), ``EventActionCode`` (C, R, U,
  D, E), ``EventDateTime`` (UTC, ISO 8601), ``EventOutcomeIndicator`` (0 success, 4
  minor failure, 8 serious failure, 12 major failure), ``EventTypeCode`` (coded values),
  ``EventOutcomeDescription``;
- ``ActiveParticipant``: a list, each with ``UserID`` (an AE title, a peer name, an admin
  client), ``UserIsRequestor``, ``RoleIDCode`` (coded values),
  ``NetworkAccessPointID`` and ``NetworkAccessPointTypeCode`` ("2": an IP address);
- ``AuditSourceIdentification``: ``AuditSourceID`` (the peer's name),
  ``AuditSourceTypeCode`` ("4": an application server process);
- ``ParticipantObjectIdentification``: a list (patients, studies, the query, the node
  that was refused), each with ``ParticipantObjectID``, ``ParticipantObjectTypeCode``,
  ``ParticipantObjectTypeCodeRole``, ``ParticipantObjectIDTypeCode`` (a coded value)
  and, where the schema has them, ``ParticipantObjectQuery``, ``ParticipantObjectDetail``
  (type/value pairs) and ``ParticipantObjectDescription`` (``SOPClass`` with
  ``NumberOfInstances``);
- ``pacsp2p``: what the schema has no place for, for people and greps: the DIMSE
  ``service``, the final ``status`` (hex), sub-operation ``counts``, the C-MOVE
  ``destination``, the association's ``id`` and ``duration_s``.

A coded value is ``{"csd-code": ..., "codeSystemName": "DCM", "originalText": ...}``,
the schema's attribute names.

The reactor never writes: ``AuditTrail.emit`` puts the record on a bounded queue
(``queue_size``), and one thread encodes and appends the lines (``emit_lazy`` queues a
function and its arguments instead, so that a frequent record's dicts are built in that
thread, not the reactor's: a C-STORE's), rotating the file with
``logging.handlers.RotatingFileHandler``. If the writer falls behind and the queue is
full, the record is dropped and counted (``dropped``; one log line a minute says how
many): the reactor never waits for a disk.

A base module: the facade and the admin web emit through ``emit()``, which the peer's
service points at its trail (``install``) while it runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import threading
import time
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

DEFAULT_MAX_BYTES = 50 << 20
DEFAULT_BACKUPS = 10
QUEUE_SIZE = 10000            # records waiting for the writer thread, at most
BATCH = 512                   # records written per flush at most
WINDOW = 0.05                 # s the writer waits, once woken, for more records: one
                              # wake-up (and GIL hand-over) per window, not per record
_STOP = object()

# -- coded values (PS3.15 A.5, PS3.16 CID 400-405, RFC 3881) ----------------------------


def code(value: str, text: str, system: str = "DCM") -> dict:
    return {"csd-code": value, "codeSystemName": system, "originalText": text}


EVENT_TRANSFERRED = code("110104", "DICOM Instances Transferred")
EVENT_QUERY = code("110112", "Query")
EVENT_SECURITY_ALERT = code("110113", "Security Alert")
EVENT_STUDY_DELETED = code("110105", "DICOM Study Deleted")
EVENT_APPLICATION_ACTIVITY = code("110100", "Application Activity")
TYPE_NODE_AUTHENTICATION = code("110126", "Node Authentication")
TYPE_RESTRICTED_FUNCTION = code("110129", "Use of Restricted Function")
ROLE_SOURCE = code("110153", "Source Role ID")
ROLE_DESTINATION = code("110152", "Destination Role ID")
ROLE_APPLICATION = code("110150", "Application")
ID_PATIENT = code("2", "Patient Number", "RFC-3881")
ID_STUDY = code("110180", "Study Instance UID")
ID_SOP_CLASS = code("110181", "SOP Class UID")
ID_NODE = code("110182", "Node ID")
SOURCE_SERVER = code("4", "Application Server")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


def outcome_of(status: int | None) -> int:
    """EventOutcomeIndicator of a final DIMSE status: 0 success, 4 minor failure (a
    warning, a cancel), 8 serious failure (a failure, a refusal)."""
    if status is None:
        return SERIOUS_FAILURE
    if status == 0x0000:
        return SUCCESS
    if status == 0xFE00 or status == 0x0001 or 0xB000 <= status <= 0xBFFF or \
            status in (0x0107, 0x0116):
        return MINOR_FAILURE
    return SERIOUS_FAILURE


def now_iso(when: float | None = None) -> str:
    """*when* (seconds since the epoch; default now) as the records write it."""
    t = datetime.datetime.now(datetime.timezone.utc) if when is None else \
        datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def participant(user_id: str, requestor: bool, role: dict | None = None,
                address: str | None = None, **extra) -> dict:
    """An ActiveParticipant: an AE title, a peer or a user, and where it was."""
    p = {"UserID": user_id, "UserIsRequestor": requestor}
    if role is not None:
        p["RoleIDCode"] = [role]
    if address:
        p["NetworkAccessPointID"] = address
        p["NetworkAccessPointTypeCode"] = "2"
    p.update({k: v for k, v in extra.items() if v is not None})
    return p


def patient(patient_id: str, name: str | None = None) -> dict:
    obj = {"ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": 1,
           "ParticipantObjectTypeCodeRole": 1, "ParticipantObjectIDTypeCode": ID_PATIENT}
    if name:
        obj["ParticipantObjectName"] = name
    return obj


def study(uid: str, sop_classes: dict | None = None, accession: str | None = None) -> dict:
    """A study object; *sop_classes*: {SOP Class UID: number of instances}."""
    obj = {"ParticipantObjectID": uid, "ParticipantObjectTypeCode": 2,
           "ParticipantObjectTypeCodeRole": 3, "ParticipantObjectIDTypeCode": ID_STUDY}
    if sop_classes:
        obj["SOPClass"] = [{"UID": c, "NumberOfInstances": n}
                           for c, n in sorted(sop_classes.items())]
    if accession:
        obj["Accession"] = [{"Number": accession}]
    return obj


def query_object(sop_class: str, query_b64: str, transfer_syntax: str = "") -> dict:
    """The query of a C-FIND (A.5.3.10): its SOP class, the identifier (base64)."""
    obj = {"ParticipantObjectID": sop_class, "ParticipantObjectTypeCode": 2,
           "ParticipantObjectTypeCodeRole": 3, "ParticipantObjectIDTypeCode": ID_SOP_CLASS,
           "ParticipantObjectQuery": query_b64}
    if transfer_syntax:
        obj["ParticipantObjectDetail"] = [{"type": "TransferSyntax",
                                           "value": transfer_syntax}]
    return obj


def node_object(node: str, why: str) -> dict:
    """The node a Security Alert is about (a refused association's requestor)."""
    return {"ParticipantObjectID": node, "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 13, "ParticipantObjectIDTypeCode": ID_NODE,
            "ParticipantObjectDetail": [{"type": "Alert Description", "value": why}]}


def message(event: dict, action: str, outcome: int, participants: list, source: str,
            objects: list = (), event_types: list = (), description: str = "",
            extension: dict | None = None, when: str | None = None) -> dict:
    """One audit message (see the module docstring)."""
    ev = {"EventID": event, "EventActionCode": action,
          "EventDateTime": when or now_iso(), "EventOutcomeIndicator": outcome}
    if event_types:
        ev["EventTypeCode"] = list(event_types)
    if description:
        ev["EventOutcomeDescription"] = description
    record = {"EventIdentification": ev, "ActiveParticipant": list(participants),
              "AuditSourceIdentification": {"AuditSourceID": source,
                                            "AuditSourceTypeCode": [SOURCE_SERVER]}}
    if objects:
        record["ParticipantObjectIdentification"] = list(objects)
    if extension:
        record["pacsp2p"] = extension
    return record


# -- the XML of the DICOM audit message (what a collector sends on) -------------------

_CODED_CHILDREN = ("EventID", "EventTypeCode", "RoleIDCode", "AuditSourceTypeCode",
                   "ParticipantObjectIDTypeCode")
_TEXT_CHILDREN = ("EventOutcomeDescription", "ParticipantObjectName",
                  "ParticipantObjectQuery", "ParticipantObjectDescription")


# characters XML 1.0 has no place for (C0 controls but tab, LF, CR; surrogates; FFFE/F)
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _x(value) -> str:
    """*value* as XML text: a control character (a PatientID's ESC) as U+FFFD, so that
    the collector's parser takes the message."""
    return _NOT_XML.sub("\ufffd", str(value))


def _xml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _x(value)


def _element(parent, name: str, fields: dict):
    import base64
    from xml.etree import ElementTree as ET
    el = ET.SubElement(parent, name)
    children = []
    for key, value in fields.items():
        if key in _CODED_CHILDREN:
            for coded in value if isinstance(value, list) else [value]:
                children.append((key, {k: _x(v) for k, v in coded.items()}, None))
        elif key in _TEXT_CHILDREN:
            children.append((key, {}, _x(value)))
        elif key == "ParticipantObjectDetail":
            for d in value:
                children.append((key, {"type": _x(d["type"]), "value": base64.b64encode(
                    str(d["value"]).encode()).decode("ascii")}, None))
        elif key in ("SOPClass", "Accession"):
            for item in value:
                children.append((key, {k: _x(v) for k, v in item.items()}, None))
        elif value is not None:
            el.set(key, _xml_value(value))
    order = {"EventID": 0, "EventTypeCode": 1, "EventOutcomeDescription": 2,
             "RoleIDCode": 0, "AuditSourceTypeCode": 0, "ParticipantObjectIDTypeCode": 0,
             "ParticipantObjectName": 1, "ParticipantObjectQuery": 1,
             "ParticipantObjectDetail": 2, "ParticipantObjectDescription": 3,
             "SOPClass": 4, "Accession": 5}
    for key, attrs, text in sorted(children, key=lambda c: order.get(c[0], 9)):
        child = ET.SubElement(el, key, attrs)
        if text is not None:
            child.text = text
    return el


def to_xml(record: dict) -> str:
    """The DICOM audit message (PS3.15 A.5.1, RFC 3881) of one JSON *record*: every key
    of the record is the schema's own element or attribute; ``pacsp2p`` (the extension)
    is left out; ParticipantObjectDetail values are base64, as the schema types them."""
    from xml.etree import ElementTree as ET
    root = ET.Element("AuditMessage")
    ev = record["EventIdentification"]
    _element(root, "EventIdentification", ev)
    for p in record.get("ActiveParticipant", []):
        _element(root, "ActiveParticipant", p)
    _element(root, "AuditSourceIdentification", record["AuditSourceIdentification"])
    for obj in record.get("ParticipantObjectIdentification", []):
        _element(root, "ParticipantObjectIdentification", obj)
    # one message a line, whatever a text held (a delete's reason "a\nb"): ElementTree
    # writes no line break of its own, and escapes those of attributes, not of text
    return ET.tostring(root, encoding="unicode").replace("\r", "&#13;").replace(
        "\n", "&#10;")


def main(argv=None) -> int:
    """``python -m pacsp2p.audit [FILE]``: each JSON line of FILE (default: standard
    input, e.g. ``tail -F audit.log``) as one line of DICOM audit message XML."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    src = open(args[0], encoding="utf-8") if args else sys.stdin
    bad = 0
    with src:
        for number, line in enumerate(src, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    xml = to_xml(record)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    bad += 1         # a line cut by a full disk or a crash: the next ones
                    print(f"pacsp2p.audit: line {number} is not an audit record "
                          f"({type(e).__name__}: {str(e)[:100]}); skipped",
                          file=sys.stderr, flush=True)
                    continue
                print(xml, flush=True)
    return 1 if bad else 0


# -- the writer -----------------------------------------------------------------------


class AuditTrail:
    """A bounded queue of records and the one thread that appends them to *path*."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, reactor=None, queue_size: int = QUEUE_SIZE,
                 on_drop=None):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self.reactor = reactor
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.on_drop = on_drop
        self.dropped = 0              # since start
        self.written = 0
        self._unreported = 0
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        self.error: str | None = None

    def start(self) -> None:
        """Open the file (raises OSError if it cannot be) and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=self.max_bytes, backupCount=self.backups,
            encoding="utf-8", delay=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._thread = threading.Thread(target=self._run, args=(handler,),
                                        name="pacsp2p-audit", daemon=True)
        self._thread.start()

    def emit(self, record: dict) -> None:
        """Queue *record* (from any thread; never blocks)."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._drop(1)

    def emit_lazy(self, build, *args) -> None:
        """Queue the record ``build(*args)`` makes, made in the writer thread (*args*
        must not change meanwhile: plain values)."""
        try:
            self.queue.put_nowait((build, args))
        except queue.Full:
            self._drop(1)

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:
                pass
        if self._unreported == 0 and self.reactor is not None:
            self.reactor.callLater(60.0, self._report)
        self._unreported += n

    def _report(self) -> None:
        n, self._unreported = self._unreported, 0
        if n:
            log.error("audit: {n} records dropped in the last minute: the audit log's "
                      "writer fell behind ({path}{err})", n=n, path=self.path,
                      err=f": {self.error}" if self.error else "")

    def stop(self) -> defer.Deferred:
        """Deferred fired once every queued record is written and the file closed."""
        if self._thread is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        thread, self._thread = self._thread, None
        try:
            self.queue.put(_STOP, timeout=5)
        except queue.Full:
            return defer.succeed(None)      # the daemon thread dies with the process
        if self.reactor is None:
            thread.join(10)
            return defer.succeed(None)
        return self._stopped

    def _run(self, handler) -> None:
        """The writer thread: take records, append them, flush after each batch. A
        record is ``written`` once its batch is flushed; of a batch whose write or flush
        fails (a full disk) the lines that reached the file whole are written, the rest
        ``dropped``, and the file is cut back to its last whole line (``_salvage``)."""
        stop = False
        pos = None                    # where the next line goes (tell() once per file)
        while not stop:
            try:
                batch = [self.queue.get_nowait()]
            except queue.Empty:
                batch = [self.queue.get()]
                if batch[0] is not _STOP and WINDOW:
                    time.sleep(WINDOW)     # the records that come meanwhile: one batch
            while len(batch) < BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            failed = 0
            sizes: list[int] = []     # bytes of the lines in the stream, not flushed yet
            start = None              # the file's size before them
            for record in batch:
                if record is _STOP:
                    stop = True
                    continue
                try:
                    if type(record) is tuple:          # emit_lazy's
                        build, args = record
                        record = build(*args)
                    data = json.dumps(record, separators=(",", ":"), ensure_ascii=False,
                                      default=str) + "\n"
                except Exception as e:                 # a record that cannot be made
                    failed += 1
                    self.error = str(e)[:200]
                    continue
                try:
                    if handler.stream is None:
                        handler.stream = handler._open()
                        pos = None
                    if pos is None:
                        pos = handler.stream.tell()
                    size = len(data) if data.isascii() else len(data.encode("utf-8"))
                    if self.max_bytes and pos and pos + size > self.max_bytes:
                        if sizes:
                            handler.stream.flush()     # what the rollover closes
                            self.written += len(sizes)
                            sizes = []
                        handler.doRollover()
                        pos = handler.stream.tell() if handler.stream is not None else 0
                    if not sizes:
                        start = pos
                    handler.stream.write(data)
                    pos += size
                    sizes.append(size)
                except Exception as e:
                    pos = None
                    whole = _salvage(handler, start, sizes)
                    self.written += whole
                    failed += 1 + len(sizes) - whole
                    sizes = []
                    self.error = str(e)[:200]
            if sizes:
                try:
                    handler.stream.flush()
                    self.written += len(sizes)
                except Exception as e:
                    pos = None
                    whole = _salvage(handler, start, sizes)
                    self.written += whole
                    failed += len(sizes) - whole
                    self.error = str(e)[:200]
            if failed and self.reactor is not None:
                self.reactor.callFromThread(self._drop, failed)
        try:
            handler.close()
        except Exception as e:            # e.g. a full disk: what is buffered is lost
            self.error = str(e)[:200]
            stream, handler.stream = handler.stream, None
            try:
                if stream is not None:
                    stream.close()         # the descriptor goes even if the flush fails
            except Exception:
                pass
        finally:
            if self._stopped is not None and self.reactor is not None:
                self.reactor.callFromThread(self._stopped.callback, None)


def _salvage(handler, start: int | None, sizes: list[int]) -> int:
    """After a write or flush of *handler* failed (a full disk): its stream dropped with
    what it buffered; of the lines written since the file's size was *start* (*sizes*:
    their bytes), how many reached the file whole; the file cut back to the end of the
    last of them, so that no line is left cut short."""
    stream, handler.stream = handler.stream, None
    if stream is not None:
        try:
            stream.close()             # flushes once more: on a full disk, fails
        except Exception:
            pass
    if start is None:
        return 0
    try:
        size = os.path.getsize(handler.baseFilename)
        end = start
        whole = 0
        for n in sizes:
            if end + n > size:
                break
            end, whole = end + n, whole + 1
        if size > end:
            os.truncate(handler.baseFilename, end)
        return whole
    except OSError:
        return 0


# -- the process's current trail ------------------------------------------------------

_current: AuditTrail | None = None


def install(trail: AuditTrail | None) -> None:
    """Make *trail* the one ``emit`` writes to (None: none)."""
    global _current
    _current = trail


def current() -> AuditTrail | None:
    return _current


def emit(record: dict) -> None:
    """Queue *record* on the current trail (nothing if the peer has none)."""
    trail = _current
    if trail is not None:
        trail.emit(record)


def emit_lazy(build, *args) -> None:
    """Queue the record ``build(*args)`` makes, built in the writer thread (nothing if
    the peer has no trail; a trail without ``emit_lazy`` gets the record built now)."""
    trail = _current
    if trail is None:
        return
    lazy = getattr(trail, "emit_lazy", None)
    if lazy is not None:
        lazy(build, *args)
    else:
        trail.emit(build(*args))


if __name__ == "__main__":
    raise SystemExit(main())
