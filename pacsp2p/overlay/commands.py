"""Every AMP command peers exchange, declared in one place (as Twisted does).

``PROTOCOL`` is the overlay protocol's version. ``Hello`` carries it both ways; a peer
that speaks another major version is told so in plain words and the link is closed,
so mixed-version clusters fail loudly rather than subtly.

Arguments are hostile until checked, even from a peer with a cluster certificate:
responders call ``check`` (UIDs by PS3.5 §9.1, hashes, names) first, and an argument that
fails answers ``InvalidArgument`` (declared by every command that carries a UID, so the
link stays up) before anything reaches an archive or the catalog.
"""

import json
import re

from twisted.logger import Logger, LogLevel
from twisted.protocols import amp

from pacsp2p.catalog.facts import STAMP, MAX_STAMP
from pacsp2p.config import MAX_LINKS
from pacsp2p.dicom.admission import shared_limit
from pacsp2p.validate import is_ae_title, is_uid, long_value, shown

log = Logger()

MAX_NAME = 255            # characters of an archive name or a token
MAX_UIDS = 10000          # UIDs in one SendTo
_SHA256 = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)

PROTOCOL = 5          # 2: catalog facts travel with their parents once per batch
                      # 3: a C-STORE's data set is pushed to replica holders as it arrives
                      # 4: SWIM membership (no heartbeats), batched catalog pulls
                      # 5: a pushed data set starts with ReplicaOpen's *data* and ends
                      #    with its last box (``end``);
                      #    the commits a writer need not wait for go in ``Commits`` boxes
MAX_VECTOR_ORIGINS = 1000   # origins asked for in one Vector
MAX_COMMITS = 256           # copies committed by one Commits (its JSON < 64 KiB)


class IncompatibleProtocol(Exception):
    """The other peer speaks an overlay protocol version we do not."""


class NameInUse(Exception):
    """Another live process holds the name the other peer's Hello claims (at another
    address): the link is not used (``overlay.merge``: one name, one process)."""


class Hello(amp.Command):
    """First command on every link: who I am, how to reach me, whom I know."""

    arguments = [(b"name", amp.Unicode()), (b"protocol", amp.Integer()),
                 (b"software", amp.Unicode()), (b"info", amp.Unicode())]
    response = [(b"name", amp.Unicode()), (b"protocol", amp.Integer()),
                (b"software", amp.Unicode()), (b"info", amp.Unicode())]
    errors = {IncompatibleProtocol: b"INCOMPATIBLE_PROTOCOL", NameInUse: b"NAME_IN_USE"}


class ReplicaRefused(Exception):
    """The peer could not keep the copy (archive unknown, full, bytes not as announced)."""


class InvalidArgument(Exception):
    """An argument failed validation (a UID, a hash, a name, an AE title): nothing done."""


def _refuse(what: str, value) -> None:
    log.warn("overlay: refused a command: invalid {what} {value}", what=what,
             value=shown(value))
    raise InvalidArgument(f"invalid {what}: {shown(value)}")


def check(uid=None, sha256=None, archive=None, token=None) -> None:
    """Raise InvalidArgument unless each argument given is valid: *uid* by PS3.5 §9.1,
    *sha256* empty or 64 lowercase hex digits, *archive* and *token* short names."""
    if uid is not None and not is_uid(uid):
        _refuse("SOP Instance UID", uid)
    if sha256 is not None and sha256 and not _SHA256.match(sha256):
        _refuse("sha256", sha256)
    for what, name in (("archive name", archive), ("token", token)):
        if name is not None and not (0 < len(name) <= MAX_NAME and name.isprintable()):
            _refuse(what, name)


def check_meta(meta, uid: str) -> dict:
    """*meta* (InstanceMeta fields, from JSON) if it describes *uid* with valid UIDs."""
    if not isinstance(meta, dict) or meta.get("sop_instance_uid") != uid:
        _refuse("header (not of this SOP Instance UID)", str(meta)[:80])
    for key in ("sop_class_uid", "transfer_syntax_uid"):
        if not is_uid(meta.get(key)):
            _refuse(key, meta.get(key))
    attributes = meta.get("attributes") or {}
    if not isinstance(attributes, dict):
        _refuse("attributes", attributes)
    if attributes.get("SOPInstanceUID", uid) != uid:
        _refuse("SOPInstanceUID attribute", attributes.get("SOPInstanceUID"))
    stamp = attributes.get(STAMP, 0)          # its receipt (the catalog's LWW stamp)
    if type(stamp) is not int or not 0 <= stamp < MAX_STAMP:
        _refuse("stamp", str(stamp))
    values = {k: v for k, v in attributes.items() if k != STAMP}
    why = long_value(values)          # text of at most VALUE_MAX, as the facade keeps
    if why:
        _refuse("attribute", why)
    attributes.update(values)         # (a value of several past the bound: clipped)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        value = attributes.get(key)
        if value and not is_uid(value):
            _refuse(key, value)
    return meta


def check_send_id(send_id: int) -> int:
    """The id of a cancellable SendTo: a non-negative 63-bit number."""
    if not 0 <= send_id < 1 << 63:
        _refuse("send id", str(send_id))
    return send_id


def check_send_to(ae_title, host, port, calling_ae, originator_ae, uids: str,
                  associations=None, send_id=None) -> list:
    """The UIDs of a SendTo (JSON list), each valid, its AE titles, address and number
    of associations sane."""
    if associations is not None and not 1 <= associations <= MAX_LINKS:
        _refuse("number of associations", str(associations))
    if send_id is not None:
        check_send_id(send_id)
    for what, ae in (("AE title", ae_title), ("calling AE title", calling_ae)):
        if not is_ae_title(ae):
            _refuse(what, ae)
    if originator_ae and not is_ae_title(originator_ae):
        _refuse("originator AE title", originator_ae)
    if not (0 < len(host) <= MAX_NAME and host.isprintable()) or not 0 < port < 65536:
        _refuse("address", f"{host}:{port}")
    try:
        found = json.loads(uids)
    except ValueError:
        found = None
    if not isinstance(found, list) or len(found) > MAX_UIDS:
        _refuse("list of UIDs", uids)
    for uid in found:
        if not is_uid(uid):
            _refuse("SOP Instance UID", uid)
    return found


def check_origins(origins: str) -> list:
    """The peer names of a Vector (JSON list), each a short printable name."""
    try:
        found = json.loads(origins)
    except ValueError:
        found = None
    if not isinstance(found, list) or len(found) > MAX_VECTOR_ORIGINS:
        _refuse("list of peer names", origins)
    for name in found:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or \
                not name.isprintable():
            _refuse("peer name", name)
    return found


def receipt(s) -> dict:
    """The answer to ``Replicate``/``ReplicaOpen`` (and a push port's) for the ``Stored``
    *s*."""
    return {"duplicate": s.duplicate, "conflict": s.conflict, "size": s.size,
            "sha256": s.sha256, "given": s.given}


def as_refusal(failure, uid: str):
    """Errback for responders: any error becomes ReplicaRefused (an error AMP was not told
    of would close the whole link, and every transfer on it). Its line goes through a
    LogLimit: an archive refusing every copy (and each hand-off retry) is no log flood."""
    if failure.check(ReplicaRefused, InvalidArgument):
        return failure
    shared_limit(log)("copy not kept", LogLevel.warn, "copy of {uid} not kept: {err}",
                      uid=shown(uid), err=shown(failure.getErrorMessage(), 300))
    raise ReplicaRefused(f"{shown(uid)}: {failure.getErrorMessage()[:300]}")


class Swim(amp.Command):
    """One message of the membership protocol (``swim.py``: ping, ack, ping request,
    nack, gossip, a part of a full state), JSON of at most ``swim.MAX_MESSAGE`` bytes
    (below AMP's 65,535 per value). Never answered, like a datagram: what is lost is
    made up by the protocol. Checked by ``Swim.receive`` (size, shape, every field)."""

    arguments = [(b"msg", amp.String())]
    response = []
    requiresAnswer = False


class Vector(amp.Command):
    """How far this peer holds the catalog logs of *origins* (JSON list of at most
    ``MAX_VECTOR_ORIGINS`` peer names): JSON {origin: highest sequence held}. A
    deleting peer asks it to know when every peer has its tombstones."""

    arguments = [(b"origins", amp.Unicode())]
    response = [(b"vector", amp.Unicode())]
    errors = {InvalidArgument: b"INVALID_ARGUMENT"}


class Replicate(amp.Command):
    """Phase 1 of a replicated write: keep a durable copy on your archive *archive*.

    Fetch the bytes from the sender's bulk channel at ``/incoming/<token>``, store them,
    check they hash to *sha256* (when given), and hold the copy as pending (not yet in
    the catalog). *meta* is the instance's header as the sender read it (JSON of
    InstanceMeta), so the receiver need not parse the file again. The answer's *sha256*
    is of what the archive holds; *given*, if set, of the bytes fetched (the archive
    keeps a conversion: ``adapters.syntaxes``).
    """

    arguments = [(b"archive", amp.Unicode()), (b"uid", amp.Unicode()),
                 (b"sha256", amp.Unicode()), (b"token", amp.Unicode()),
                 (b"meta", amp.Unicode(optional=True))]
    response = [(b"duplicate", amp.Boolean()), (b"conflict", amp.Boolean()),
                (b"size", amp.Integer()), (b"sha256", amp.Unicode()),
                (b"given", amp.Unicode(optional=True))]   # ``Stored.given``
    errors = {InvalidArgument: b"INVALID_ARGUMENT", ReplicaRefused: b"REPLICA_REFUSED"}


_MORE = [(b"more1", amp.String(optional=True)), (b"more2", amp.String(optional=True)),
         (b"more3", amp.String(optional=True))]     # bytes that follow *data* in one box
# values (*data*, *more1*..*more3*) a pushed box may carry, ReplicaOpen's first bytes
# included, as a peer's Hello info says (``replica_values``). Peers of protocol 5 that do
# not say it (before these values) drop all but ReplicaData's *data*: they get one value
# a box and none in ReplicaOpen (``transfer.forward.Push``).
REPLICA_VALUES = 4


class ReplicaOpen(amp.Command):
    """Phase 1, pushed: keep a durable copy of the data set that follows on this link.

    The sender is receiving it from a modality right now; it sends it on: *data* (and
    *more1*..*more3*, as ``ReplicaData`` has them) its first bytes, then ``ReplicaData``
    boxes of stream *stream*, the last with *end* (*end* here: these are all of it, the
    data set is complete; a data set abandoned ends with ``ReplicaClose``). *head* is the Part-10 preamble and File Meta
    Information, *meta* the header the sender read from the first bytes (JSON of
    InstanceMeta, without hash or size: the receiver hashes what it gets). Answered,
    like ``Replicate``, once the copy is durable (pending).
    """

    arguments = [(b"stream", amp.Integer()), (b"archive", amp.Unicode()),
                 (b"uid", amp.Unicode()), (b"head", amp.String()),
                 (b"meta", amp.Unicode()), (b"data", amp.String(optional=True)),
                 (b"end", amp.Boolean(optional=True))] + _MORE
    response = Replicate.response
    errors = {InvalidArgument: b"INVALID_ARGUMENT", ReplicaRefused: b"REPLICA_REFUSED"}


class ReplicaData(amp.Command):
    """Bytes of a pushed data set: *data*, then *more1*..*more3* (up to 4 values of at
    most 64 KiB in one box); with *end*, the last ones: the data set is complete (no
    ``ReplicaClose`` follows). Not answered: the sender stops while the link's send
    buffer is full (TCP back-pressure)."""

    arguments = [(b"stream", amp.Integer()), (b"data", amp.String()),
                 (b"end", amp.Boolean(optional=True))] + _MORE
    response = []
    requiresAnswer = False


class ReplicaClose(amp.Command):
    """The pushed data set is abandoned (*complete* false; true: complete, as a last
    ``ReplicaData`` with *end* says)."""

    arguments = [(b"stream", amp.Integer()), (b"complete", amp.Boolean())]
    response = []
    requiresAnswer = False


class Commit(amp.Command):
    """Phase 2: the write quorum is met; record your pending copy in your catalog."""

    arguments = [(b"archive", amp.Unicode()), (b"uid", amp.Unicode()),
                 (b"sha256", amp.Unicode())]
    response = [(b"seq", amp.Integer())]
    errors = {InvalidArgument: b"INVALID_ARGUMENT", ReplicaRefused: b"REPLICA_REFUSED"}


def check_commits(copies: str) -> list:
    """The copies of a ``Commits`` (JSON list of at most ``MAX_COMMITS`` [archive, uid,
    sha256]), each checked as ``check`` does."""
    try:
        found = json.loads(copies)
    except (ValueError, RecursionError):      # nested past the decoder's depth
        found = None
    if not isinstance(found, list) or not 0 < len(found) <= MAX_COMMITS:
        _refuse("list of copies", copies)
    for item in found:
        if not (isinstance(item, list) and len(item) == 3 and
                all(isinstance(x, str) for x in item)):
            _refuse("copy", item)
        check(uid=item[1], sha256=item[2], archive=item[0])
    return [tuple(item) for item in found]


class Commits(amp.Command):
    """Phase 2 of several writes whose writer does not wait for it (it recorded a copy
    of its own, with a hint for each of these): record these pending copies, *copies* a
    JSON list of [archive, uid, sha256], in one catalog transaction (group commit).
    Answer: *seqs*, a JSON list, for each copy its fact's sequence number as ``Commit``
    answers it, or null if it was refused (its hint stays: hinted hand-off redoes it);
    *prevs* (absent from older peers), for each the number of the holder's fact before
    it (``Catalog.previous``), or null: the writer learns it in order after a restart."""

    arguments = [(b"copies", amp.Unicode())]
    response = [(b"seqs", amp.Unicode()), (b"prevs", amp.Unicode(optional=True))]
    errors = {InvalidArgument: b"INVALID_ARGUMENT"}


class Discard(amp.Command):
    """Phase 2, the other way: the quorum was not met; drop your pending copy."""

    arguments = [(b"archive", amp.Unicode()), (b"uid", amp.Unicode()),
                 (b"sha256", amp.Unicode())]
    response = []
    errors = {InvalidArgument: b"INVALID_ARGUMENT", ReplicaRefused: b"REPLICA_REFUSED"}


class SendTo(amp.Command):
    """Direct delivery: send these instances from your own archives to a DICOM destination
    yourself (C-STORE sub-operations of a C-MOVE the asking peer received)."""

    arguments = [(b"ae_title", amp.Unicode()), (b"host", amp.Unicode()),
                 (b"port", amp.Integer()), (b"calling_ae", amp.Unicode()),
                 (b"originator_ae", amp.Unicode()), (b"originator_msg_id", amp.Integer()),
                 (b"uids", amp.Unicode()),
                 (b"associations", amp.Integer(optional=True)),   # absent: 1 (older peers)
                 (b"send_id", amp.Integer(optional=True))]   # absent: not cancellable
    response = [(b"completed", amp.Integer()), (b"failed", amp.Integer()),
                (b"warning", amp.Integer()), (b"failed_uids", amp.Unicode())]
    errors = {InvalidArgument: b"INVALID_ARGUMENT"}


class CancelSend(amp.Command):
    """Stop the SendTo this link's other end asked with *send_id* (its C-MOVE ended: the
    requestor left or cancelled): what is queued is not sent, the answer gives the
    counts so far. An unknown *send_id* (it ended already) is ignored."""

    arguments = [(b"send_id", amp.Integer())]
    response = []
    errors = {InvalidArgument: b"INVALID_ARGUMENT"}


class Drop(amp.Command):
    """Hinted hand-off done: drop your stand-in copy (the instance has its R copies)."""

    arguments = [(b"archive", amp.Unicode()), (b"uid", amp.Unicode()),
                 (b"sha256", amp.Unicode())]
    response = []
    errors = {InvalidArgument: b"INVALID_ARGUMENT", ReplicaRefused: b"REPLICA_REFUSED"}


class DrainRefused(Exception):
    """The drain asked for cannot be done (no such archive here)."""


def check_archive_names(names: str) -> list:
    """The archive names of a ``Drain`` (a JSON list of short names, at most 64)."""
    try:
        found = json.loads(names)
    except ValueError:
        found = None
    if not isinstance(found, list) or len(found) > 64:
        _refuse("list of archive names", names)
    for name in found:
        if not isinstance(name, str):
            _refuse("archive name", name)
        check(archive=name)
    return found


class Drain(amp.Command):
    """Drain your archives *archives* (a JSON list; empty: all of them): move every copy
    they hold to other archives, and take no new ones (``transfer.drain``); with *stop*,
    stop draining them. Answered at once with the archives and the copies they hold."""

    arguments = [(b"archives", amp.Unicode()), (b"stop", amp.Boolean())]
    response = [(b"archives", amp.Unicode()), (b"copies", amp.Integer())]
    errors = {InvalidArgument: b"INVALID_ARGUMENT", DrainRefused: b"DRAIN_REFUSED"}


class CheckCopy(amp.Command):
    """Your copy of *uid* on *archive* did not hash to *sha256* when I read it: check it
    and replace it if it is damaged (``transfer.scrub``). Not answered."""

    arguments = [(b"archive", amp.Unicode()), (b"uid", amp.Unicode()),
                 (b"sha256", amp.Unicode())]
    response = []
    requiresAnswer = False
