"""Hostile inputs for a DICOM facade: a seeded generator and a bounded runner.

Used by ``tests/integration/test_fuzz.py`` (a few thousand inputs) and ``bench/fuzz.py``
(100,000). Everything here is written from the standards (PS3.8 upper layer, PS3.7
DIMSE, PS3.5 data sets in implicit VR little endian) with ``struct``, so that it can say
what no DICOM toolkit says on purpose, and it does not depend on the product's code.

- :class:`Generator` ``(seed, ...)`` makes :class:`Case` number *i* from
  ``random.Random(f"{seed}/{i}")`` alone: any case can be made again from the seed and
  its index, whatever ran before it or beside it. :data:`KINDS` lists the kinds; case *i*
  is of kind ``KINDS[i % len(KINDS)]`` unless a kind is asked for.
- A case is one TCP connection: steps (send bytes, read one PDU, sleep) and an ending
  (read the answers for a bounded time, close, or reset). While it reads, a case answers
  the C-STORE sub-operations of a C-GET like a storage SCP would (or, hostile, with a
  wrong message ID or not at all).
- :func:`run` sends cases with a bounded pool of connections (default 8 at a time),
  bounded in count and in time (every socket operation has a timeout), and returns a
  :class:`Report`: counts per kind and outcome, DIMSE statuses seen, failures (the peer
  refused a connection, a C-STORE that had to fail was answered Success, a bug here).
- :class:`Canary` makes path-like UIDs (absolute, and ``../`` climbing out of the
  archive's fan-out directory) that all point into one directory of the test's own, and
  says afterwards which of the files they name exist.

Traffic goes only where :func:`run` is pointed (the tests: 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

# -- UIDs ----------------------------------------------------------------------------------
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
FIND_STUDY = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_STUDY = "1.2.840.10008.5.1.4.1.2.2.2"
GET_STUDY = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_PATIENT = "1.2.840.10008.5.1.4.1.2.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"

# the contexts of a well-formed association (all implicit VR little endian)
CX_ECHO, CX_CT, CX_FIND, CX_MOVE, CX_GET, CX_PFIND, CX_MR = 1, 3, 5, 7, 9, 11, 13
CONTEXTS = [(CX_ECHO, VERIFICATION, [IMPLICIT]), (CX_CT, CT, [IMPLICIT]),
            (CX_FIND, FIND_STUDY, [IMPLICIT]), (CX_MOVE, MOVE_STUDY, [IMPLICIT]),
            (CX_GET, GET_STUDY, [IMPLICIT]), (CX_PFIND, FIND_PATIENT, [IMPLICIT]),
            (CX_MR, MR, [IMPLICIT])]

# DIMSE
C_STORE_RQ, C_STORE_RSP, C_GET_RQ, C_FIND_RQ = 0x0001, 0x8001, 0x0010, 0x0020
C_MOVE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0021, 0x0030, 0x0FFF
NO_DATA = 0x0101
PENDING = (0xFF00, 0xFF01)

# put after a line feed into AE titles, UIDs, destinations and identifiers: a log line
# that starts with it was forged by an input
INJECTED = b"FUZZ-INJECTED"

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


# -- encoders (PS3.8 9.3, PS3.7 6.3.1, PS3.5 7.1.3) ---------------------------------------

def item(item_type: int, payload: bytes, length: int | None = None) -> bytes:
    """A variable item (type, reserved, 2-byte length); *length* may lie."""
    n = len(payload) if length is None else length
    return struct.pack(">BBH", item_type, 0, n & 0xFFFF) + payload


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU (type, reserved, 4-byte length); *length* may lie."""
    n = len(body) if length is None else length
    return struct.pack(">BBI", pdu_type & 0xFF, 0, n & 0xFFFFFFFF) + body


def ae16(title) -> bytes:
    """An AE title field: 16 bytes, space padded; any bytes allowed."""
    raw = title.encode("latin-1") if isinstance(title, str) else bytes(title)
    return raw[:16].ljust(16, b" ")


def context_item(cid: int, abstract, syntaxes: Sequence, item_type: int = 0x20) -> bytes:
    """A presentation context item; *abstract* None leaves out the abstract syntax."""
    sub = b"" if abstract is None else item(0x30, _b(abstract))
    sub += b"".join(item(0x40, _b(ts)) for ts in syntaxes)
    return item(item_type, bytes((cid & 0xFF, 0, 0, 0)) + sub)


def role_item(uid: str, scu: int = 0, scp: int = 1) -> bytes:
    raw = _b(uid)
    return item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp)))


def user_info(max_pdu: int | None = 0, extra: bytes = b"") -> bytes:
    sub = b"" if max_pdu is None else item(0x51, struct.pack(">I", max_pdu & 0xFFFFFFFF))
    sub += item(0x52, b"1.2.826.0.1.3680043.10.1406.99") + item(0x55, b"PACSP2P_FUZZ")
    return item(0x50, sub + extra)


def associate_rq(called="PACSP2P", calling="FUZZSCU", contexts=None, *, max_pdu=0,
                 roles: Sequence[str] = (), items: bytes | None = None,
                 version: int = 1, length: int | None = None) -> bytes:
    """A-ASSOCIATE-RQ. *items* replaces all variable items (application context,
    presentation contexts, user information) when given."""
    if items is None:
        cxs = CONTEXTS if contexts is None else contexts
        items = item(0x10, APP_CONTEXT.encode()) + b"".join(
            context_item(cid, a, ts) for cid, a, ts in cxs) + user_info(
            max_pdu, b"".join(role_item(r) for r in roles))
    body = struct.pack(">HH", version, 0) + ae16(called) + ae16(calling) + bytes(32) + items
    return pdu(0x01, body, length)


def pdv(cid: int, data: bytes, command: bool, last: bool, length: int | None = None,
        control: int | None = None) -> bytes:
    ctl = ((1 if command else 0) | (2 if last else 0)) if control is None else control
    n = len(data) + 2 if length is None else length
    return struct.pack(">IBB", n & 0xFFFFFFFF, cid & 0xFF, ctl & 0xFF) + data


def p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    return pdu(0x04, b"".join(pdvs), length)


def fragments(cid: int, data: bytes, size: int, command: bool, last: bool = True) -> bytes:
    """*data* as P-DATA-TF PDUs of at most *size* data bytes each (one PDV each)."""
    size = max(1, size)
    out, pos = [], 0
    while True:
        end = min(pos + size, len(data))
        out.append(p_data(pdv(cid, data[pos:end], command, last and end == len(data))))
        pos = end
        if pos >= len(data):
            return b"".join(out)


def element(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    """An implicit VR little endian element; *length* may lie (0xFFFFFFFF: undefined)."""
    n = len(value) if length is None else length
    return struct.pack("<HHI", group, elem, n & 0xFFFFFFFF) + value


def _pad(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def _b(value) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def command_set(fields: Sequence[tuple[int, object]], group_length: int | None = None) -> bytes:
    """A command set (group 0000) from (element, value): int is US, str/bytes padded."""
    body = b""
    for elem, value in fields:
        raw = struct.pack("<H", value & 0xFFFF) if isinstance(value, int) else _pad(_b(value))
        body += element(0, elem, raw)
    n = len(body) if group_length is None else group_length
    return element(0, 0, struct.pack("<I", n & 0xFFFFFFFF)) + body


def c_echo(msg_id: int, sop_class=VERIFICATION) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_ECHO_RQ), (0x0110, msg_id),
                        (0x0800, NO_DATA)])


def c_store(msg_id: int, sop_class, sop_instance) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_STORE_RQ), (0x0110, msg_id),
                        (0x0700, 0), (0x0800, 0), (0x1000, sop_instance)])


def c_find(msg_id: int, sop_class=FIND_STUDY, field_: int = C_FIND_RQ,
           dest=None, data_set_type: int = 0) -> bytes:
    fields = [(0x0002, sop_class), (0x0100, field_), (0x0110, msg_id)]
    if dest is not None:
        fields.append((0x0600, _pad(_b(dest), b" ")))
    fields += [(0x0700, 0), (0x0800, data_set_type)]
    return command_set(fields)


def c_store_rsp(msg_id: int, sop_class, sop_instance, status: int = 0) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_STORE_RSP), (0x0120, msg_id),
                        (0x0800, NO_DATA), (0x0900, status), (0x1000, sop_instance)])


def message(cid: int, command: bytes, data: bytes | None = None, size: int = 16384) -> bytes:
    """A whole DIMSE message: the command set, then its data set, fragmented."""
    out = fragments(cid, command, size, True)
    if data is not None:
        out += fragments(cid, data, size, False)
    return out


TEXT_VR_PAD = {0x00080016: b"\0", 0x00080018: b"\0", 0x0020000D: b"\0", 0x0020000E: b"\0",
               0x00080052: b" "}


def data_set(elements: dict[int, bytes]) -> bytes:
    """Implicit VR little endian data set from {tag: raw value} (sorted, padded)."""
    out = []
    for tag in sorted(elements):
        value = _b(elements[tag])
        out.append(element(tag >> 16, tag & 0xFFFF,
                           _pad(value, TEXT_VR_PAD.get(tag, b"\0" if _is_uid(tag) else b" "))))
    return b"".join(out)


def _is_uid(tag: int) -> bool:
    return tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00200052)


def instance(sop_instance, sop_class=CT, study="1.2.3", series="1.2.3.4",
             patient_id=b"FUZZ001", extra: dict | None = None) -> bytes:
    """A tiny 'image' data set (no pixel data) with the attributes a catalog reads."""
    els = {0x00080016: _b(sop_class), 0x00080018: _b(sop_instance),
           0x00080020: b"20240115", 0x00080060: b"CT", 0x00100010: b"FUZZ^PATIENT",
           0x00100020: _b(patient_id), 0x0020000D: _b(study), 0x0020000E: _b(series),
           0x00200013: b"1"}
    els.update(extra or {})
    return data_set(els)


def fresh_uid(rng: random.Random) -> str:
    """A valid UID nobody else uses (2.25 + a random integer, PS3.5 B.2)."""
    return f"2.25.{rng.getrandbits(96) + 1}"


# -- path-like UIDs ------------------------------------------------------------------------

class Canary:
    """Path-like UIDs that all point into *directory* (of the test's own, outside the
    peer's data directory): absolute ones, and relative ones climbing out of
    ``objects_dir/<fan>/`` with ``../``; the relative ones end so that the
    sha1(uid)[:2] fan-out directory the embedded archive used to pick exists (an
    attacker's move: ``../`` resolves only through a directory that exists).
    ``tried`` lists every UID made; ``leaked()`` the files that exist where they point."""

    def __init__(self, directory: Path, objects_dir: Path, fans: Iterable[str] = ()):
        self.directory = Path(directory)
        self.objects_dir = Path(objects_dir)
        self.fans = sorted(set(fans))
        self.tried: list[str] = []
        self._lock = threading.Lock()

    def uid(self, rng: random.Random, tag: str) -> str:
        name = f"{tag}-{rng.getrandbits(32):08x}"
        form = rng.randrange(4)
        if form == 0:
            uid = f"{self.directory}/{name}"
        elif form == 1:                                    # a subdirectory: mkdir'ed?
            uid = f"{self.directory}/sub-{rng.randrange(4)}/{name}"
        else:
            base = self.objects_dir / "00"
            rel = os.path.relpath(self.directory, base)
            if form == 3:                                  # from the root: ../../../..
                rel = "../" * (len(base.parts) + rng.randrange(3)) + str(self.directory)[1:]
            uid = f"{rel}/{name}"
            if self.fans:
                for k in range(4096):
                    cand = f"{uid}{k}"
                    if hashlib.sha1(cand.encode()).hexdigest()[:2] in self.fans:
                        uid = cand
                        break
        with self._lock:
            self.tried.append(uid)
        return uid

    def targets(self) -> list[Path]:
        """Where the tried UIDs point: the path itself and with ``.dcm``."""
        out = []
        base = self.objects_dir / "00"
        for uid in self.tried:
            where = Path(uid) if uid.startswith("/") else Path(os.path.normpath(base / uid))
            out += [where, where.with_name(where.name + ".dcm")]
        return out

    def leaked(self) -> list[Path]:
        """Files that exist at the targets, or anywhere under the directory."""
        found = {p for p in self.targets() if p.exists() or p.is_symlink()}
        if self.directory.exists():
            found |= {p for p in self.directory.rglob("*") if not p.is_dir()}
        return sorted(found)


# -- hostile values --------------------------------------------------------------------------

def bad_uid(rng: random.Random, canary: Canary | None = None) -> bytes:
    """A UID that breaks PS3.5 9.1 (bytes as they go on the wire)."""
    choice = rng.randrange(17)
    if choice == 16:
        return b"1.2\n" + INJECTED + b" 1.2"
    if choice == 0:
        return b"1.2.3." + bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 9)))
    if choice == 1:
        return "1.2.٣.٤".encode("utf-8")
    if choice == 2:
        return b"1." + b"2" * 63                              # 65 characters
    if choice == 3:
        return b"1.2." + b"3" * rng.randrange(61, 400)        # longer
    if choice == 4:
        return b"1.02.3"                                      # leading zero
    if choice == 5:
        return rng.choice([b"", b" ", b"  ", b"\0\0"])
    if choice == 6:
        return b"1.2. 3"
    if choice == 7:
        return rng.choice([b"1..2", b".1.2", b"1.2.", b"1.2.3a", b"abc", b"-1.2", b"1,2"])
    if choice == 8:
        return b"1.2\x003.4"
    if choice == 9:
        return b"1.2\r\n3\x01\x1b[2J"
    if choice == 10:
        return b"%2F..%2F..%2Fetc%2Fpasswd"
    if choice == 11:
        return b"1.2.3\\4.5"
    if choice == 12:
        return b"1.2." + b"9" * rng.randrange(2, 20) + b"." * rng.randrange(1, 4)
    if choice == 13 and canary is not None:
        return canary.uid(rng, "bad").encode()
    if choice == 14:
        return b"1.2.3" * rng.randrange(50, 2000)             # a few KiB
    return b".." if canary is None else canary.uid(rng, "dots").encode()


def bad_ae(rng: random.Random) -> bytes:
    choice = rng.randrange(10)
    return [
        bytes(rng.randrange(0x80, 0x100) for _ in range(16)),
        b"\0" * 16,
        b" " * 16,
        b"A\\B",
        "ÄRZTE-ÜBERWEISER".encode("utf-8")[:16],
        b"\x01\x02\x1b[31m",
        b"../../etc/passwd",
        bytes(rng.randrange(256) for _ in range(16)),
        b"",
        b"X\n" + INJECTED,
    ][choice]


# -- cases -----------------------------------------------------------------------------------

@dataclass
class Case:
    """One connection: *steps* ("send", bytes) / ("repeat", (bytes, times)) /
    ("recv", seconds) / ("sleep", seconds),
    then *end*: "read" (answers for up to *wait* s, until *finals* final responses or the
    peer ends the association), "close" or "rst"."""

    index: int
    kind: str
    steps: list = field(default_factory=list)
    end: str = "read"
    wait: float = 5.0
    finals: int = 1
    must_fail: bool = False          # a C-STORE that must not be answered Success
    store_replies: str = "ok"        # C-STOREs of a C-GET: "ok", "fail", "wrong-id", "none"
    note: str = ""

    def send(self, data: bytes) -> "Case":
        self.steps.append(("send", data))
        return self


@dataclass
class Result:
    index: int
    kind: str
    outcome: str
    statuses: list = field(default_factory=list)
    violation: str = ""
    local_port: int = 0
    seconds: float = 0.0
    note: str = ""


KINDS = (
    "random_bytes", "truncated_pdu", "oversized_pdu", "assoc_absurd_items",
    "assoc_no_abstract", "assoc_many_contexts", "assoc_bad_ae", "pdata_wrong_context",
    "pdata_bad_pdv_length", "command_no_end", "command_oversized", "dimse_bad_uid",
    "store_uid_mismatch", "store_path_uid", "find_bad_identifier", "move_bad_identifier",
    "get_bad_identifier", "early_hangup", "max_pdu_tiny", "dimse_weird",
    "association_games",
)


class Generator:
    """Case *i* of a seeded run (see the module docstring).

    *study_uid* and *sop_uids*: instances the peer holds (retrievals that match);
    *move_dest*: a C-MOVE destination the peer knows; *canary*: where path-like UIDs
    point. *scale* (0-1] shrinks the largest inputs."""

    def __init__(self, seed: int, *, called_ae: str = "PACSP2P", study_uid: str = "1.2.3",
                 sop_uids: Sequence[str] = (), move_dest: str = "FUZZDEST",
                 canary: Canary | None = None, kinds: Sequence[str] = KINDS,
                 scale: float = 1.0):
        self.seed = seed
        self.called = called_ae
        self.study = study_uid
        self.sops = list(sop_uids) or ["1.2.3.4.5"]
        self.dest = move_dest
        self.canary = canary
        self.kinds = tuple(kinds)
        self.scale = scale
        for k in self.kinds:
            if not hasattr(self, f"_{k}"):
                raise ValueError(f"unknown kind {k!r}")

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{index}")

    def case(self, index: int, kind: str | None = None) -> Case:
        rng = self.rng(index)
        kind = kind or self.kinds[index % len(self.kinds)]
        case = Case(index, kind)
        getattr(self, f"_{kind}")(rng, case)
        return case

    # -- helpers -------------------------------------------------------------------------
    def _size(self, rng, sizes: Sequence[int]) -> int:
        return max(1, int(rng.choice(sizes) * self.scale))

    def _rq(self, rng, **kw) -> bytes:
        if not kw:
            if not hasattr(self, "_plain_rq"):
                self._plain_rq = associate_rq(self.called, "FUZZSCU")
            return self._plain_rq
        kw.setdefault("called", self.called)
        kw.setdefault("calling", "FUZZSCU")
        return associate_rq(**kw)

    def _identifier(self, rng, level="STUDY", extra: dict | None = None) -> bytes:
        els = {0x00080052: level.encode() if isinstance(level, str) else level,
               0x0020000D: self.study.encode(), 0x00100020: b"", 0x00100010: b"",
               0x00080020: b"", 0x00080061: b""}
        els.update(extra or {})
        return data_set(els)

    def _hostile_identifier(self, rng) -> tuple[bytes | None, str]:
        """(identifier bytes or None for 'no data set', what it is)."""
        good = self._identifier(rng)
        choice = rng.randrange(14)
        if choice == 0:
            return good[:rng.randrange(1, len(good))], "truncated"
        if choice == 1:                                           # a length past the end
            return data_set({0x00080052: b"STUDY"}) + element(
                0x0010, 0x0010, b"DOE", rng.choice([0x7FFFFFFF, 0xFFFFFFFE, 0x10000])), \
                "absurd length"
        if choice == 2:                                           # undefined length, not SQ
            return data_set({0x00080052: b"STUDY"}) + element(0x0010, 0x0010, b"DOE*",
                                                              0xFFFFFFFF), "undefined length"
        if choice == 3:
            n = self._size(rng, [1 << 10, 64 << 10, 1 << 20])
            return self._identifier(rng, extra={0x00100010: b"A" * n}), f"value of {n} bytes"
        if choice == 4:
            return self._identifier(rng, rng.choice(
                [b"", b"FOO", b"../", "ÉTUDE".encode("utf-8"), b"S" * 1000, b"IMAGE\\STUDY",
                 b"STUDY\r\n" + INJECTED])), \
                "absurd level"
        if choice == 5:
            n = self._size(rng, [100, 2000, 10000])
            uids = b"\\".join(b"1.2.%d" % i for i in range(n))
            return self._identifier(rng, extra={0x0020000D: uids}), f"{n} UIDs"
        if choice == 6:
            return self._identifier(rng, extra={0x0020000D: bad_uid(rng, self.canary)}), "bad UID"
        if choice == 7:
            return self._identifier(rng, extra={0x00100010: b"*" * self._size(rng, [10, 5000]),
                                            0x0020000D: b""}), "wildcards"
        if choice == 8:
            return self._identifier(rng, extra={0x00080020: rng.choice(
                [b"-", b"20240101-2023", b"99999999", b"2024-01-01", b"--", b"\xff\xfe"])}), \
                "bad date range"
        if choice == 9:                                           # nested sequences
            depth = rng.choice([10, 200, 2000])
            inner = b""
            for _ in range(depth):
                inner = element(0x0040, 0x0275, element(0xFFFE, 0xE000, inner, 0xFFFFFFFF)
                                + element(0xFFFE, 0xE00D, b"") + element(0xFFFE, 0xE0DD, b""),
                                0xFFFFFFFF)
            return data_set({0x00080052: b"STUDY"}) + inner, f"{depth} nested sequences"
        if choice == 10:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))), "random"
        if choice == 11:
            return None, "no identifier"
        if choice == 12:
            return b"", "empty identifier"
        return self._identifier(rng, rng.choice(["PATIENT", "SERIES", "IMAGE"]), extra={
            0x0020000E: bad_uid(rng, self.canary), 0x00080018: bad_uid(rng, self.canary)}), \
            "bad series/instance UIDs"

    def _store_messages(self, rng, cid, cls, cmd_uid, ds_uid, msg_id=1, **kw) -> bytes:
        return message(cid, c_store(msg_id, cls, cmd_uid),
                       instance(ds_uid, cls, **kw), rng.choice([16384, 1000, 128]))

    # -- the kinds -------------------------------------------------------------------------
    def _random_bytes(self, rng, case):
        n = rng.choice([0, 1, 5, 6, 7, 10, 64, 1000, 8000])
        data = bytearray(rng.randbytes(n))
        if data and rng.random() < 0.5:
            data[0] = rng.randrange(1, 8)
        if rng.random() < 0.3:                      # after a good A-ASSOCIATE-RQ
            data = bytearray(self._rq(rng)) + data
        case.send(bytes(data))
        case.end, case.wait, case.finals = "read", 0.3, 0
        case.note = f"{n} bytes"

    def _full_session(self, rng) -> bytes:
        what = rng.randrange(4)
        rq = self._rq(rng)
        if what == 0:
            return rq + message(CX_ECHO, c_echo(1)) + RELEASE_RQ
        if what == 1:
            uid = fresh_uid(rng)
            return rq + self._store_messages(rng, CX_CT, CT, uid, uid, study=self.study) \
                + RELEASE_RQ
        if what == 2:
            return rq + message(CX_FIND, c_find(1), self._identifier(rng)) + RELEASE_RQ
        return self._rq(rng, roles=[CT, MR]) + message(
            CX_GET, c_find(1, GET_STUDY, C_GET_RQ), self._identifier(rng)) + RELEASE_RQ

    def _truncated_pdu(self, rng, case):
        data = self._full_session(rng)
        cut = rng.randrange(1, len(data))
        case.send(data[:cut])
        case.end = rng.choice(["close", "rst", "read"])
        case.wait, case.finals = 0.2, 9
        case.note = f"cut at {cut}/{len(data)}"

    def _oversized_pdu(self, rng, case):
        pdu_type = rng.choice([1, 1, 2, 3, 4, 4, 5, 6, 7, 0, 9, 0xFF])
        length = rng.choice([0xFFFFFFFF, 0x80000000, (1 << 20) + 1, 1 << 24, 1 << 20])
        prefix = self._rq(rng) if rng.random() < 0.5 else b""
        body_n = self._size(rng, [0, 100, 4096, 65536, 1 << 20])
        body = bytes(rng.randbytes(body_n))
        if pdu_type == 4 and body_n >= 6:                # P-DATA holding a huge PDV
            body = pdv(CX_ECHO, body[6:], True, False, length - 4)
        case.send(prefix + pdu(pdu_type, body, length))
        case.end, case.wait, case.finals = "read", 0.5, 9
        case.note = f"type {pdu_type:#x} length {length:#x}, {body_n} bytes sent"

    def _assoc_absurd_items(self, rng, case):
        good_items = [item(0x10, APP_CONTEXT.encode())] + [
            context_item(cid, a, ts) for cid, a, ts in CONTEXTS] + [user_info(0)]
        choice = rng.randrange(10)
        items = list(good_items)
        i = rng.randrange(len(items))
        if choice == 0:                                        # an item's length lies
            raw = items[i]
            items[i] = raw[:2] + struct.pack(">H", rng.choice(
                [0, 1, 0xFFFF, max(0, len(raw) - 4 - rng.randrange(1, 5)),
                 len(raw) - 4 + rng.randrange(1, 50)]) & 0xFFFF) + raw[4:]
            note = f"item {i} length lies"
        elif choice == 1:                                      # the PDU length lies
            body_len = sum(map(len, items)) + 68
            case.send(associate_rq(self.called, items=b"".join(items), length=rng.choice(
                [0, 1, 67, 68, body_len - 1, body_len + 1, body_len + 100])))
            case.send(message(CX_ECHO, c_echo(1)))
            case.wait, case.finals = 1.0, 1
            case.note = "PDU length lies"
            return
        elif choice == 2:
            items = [it for it in items if it[0] != 0x10]
            note = "no application context"
        elif choice == 3:
            items.insert(rng.randrange(len(items)), item(rng.choice([0x99, 0x00, 0x21, 0xFF]),
                                                         rng.randbytes(rng.randrange(0, 300))))
            note = "unknown item"
        elif choice == 4:                                      # user info sub-items
            sub = rng.choice([item(0x51, b""), item(0x51, b"\0\0"),
                              item(0x52, b"9" * 300), item(0x55, b"\xff" * 40),
                              item(0x53, b"\xff\xff"), item(0x56, b"\0\x05" + b"1.2"),
                              item(0x58, b"\x01\x00" + struct.pack(">H", 0xFFFF) + b"u"),
                              item(0x54, b"\xff\xff" + b"1.2"), item(0x57, b"")])
            items[-1] = user_info(0, sub)
            note = "bad user information sub-item"
        elif choice == 5:
            items = items[:-1]
            note = "no user information"
        elif choice == 6:
            items[0] = item(0x10, rng.choice([b"", b"1.2.3", b"\xff" * 70, b"9" * 5000]))
            note = "odd application context"
        elif choice == 7:
            items = [items[0], item(0x20, b""), item(0x20, b"\x01"), items[-1]]
            note = "empty presentation context items"
        elif choice == 8:
            items = [items[-1]] + items[:-1]
            note = "items out of order"
        else:
            items[-1] = item(0x50, b"", rng.choice([0xFFFF, 100]))
            note = "user information length lies"
        case.send(associate_rq(self.called, items=b"".join(items),
                               version=rng.choice([1, 1, 1, 0, 2, 0xFFFF])))
        case.send(message(CX_ECHO, c_echo(1)))
        case.wait, case.finals, case.note = 2.0, 1, note

    def _assoc_no_abstract(self, rng, case):
        cxs = [context_item(CX_ECHO, VERIFICATION, [IMPLICIT])] if rng.random() < 0.5 else []
        bad = rng.randrange(7)
        for k in range(rng.randrange(1, 4)):
            cid = rng.choice([3, 5, 7, 9, 1, 0, 2, 255])
            cxs.append([
                context_item(cid, None, [IMPLICIT]),
                context_item(cid, b"", [IMPLICIT]),
                context_item(cid, CT, []),
                context_item(cid, CT, [b""]),
                item(0x20, bytes((cid, 0, 0, 0)) + item(0x30, CT.encode()) * 2
                     + item(0x40, IMPLICIT.encode())),
                context_item(cid, bad_uid(rng, self.canary), [IMPLICIT]),
                context_item(cid, CT, [bad_uid(rng, self.canary)]),
            ][bad])
        items = item(0x10, APP_CONTEXT.encode()) + b"".join(cxs) + user_info(0)
        case.send(associate_rq(self.called, items=items))
        case.send(message(CX_ECHO, c_echo(1)))
        case.wait, case.finals, case.note = 2.0, 1, f"variant {bad}"

    def _assoc_many_contexts(self, rng, case):
        n = self._size(rng, [100, 127, 128, 129, 200, 256, 600, 2000])
        pool = [VERIFICATION, CT, MR, FIND_STUDY, GET_STUDY, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.7"]
        unique = rng.random() < 0.5             # distinct odd IDs 3..255: at most 127
        if unique:
            n = min(n, 127)
        cxs = []
        for k in range(n - 1):
            cid = 2 * k + 3 if unique else rng.choice([2 * k + 1, rng.randrange(256), 1])
            syntaxes = rng.sample([IMPLICIT, EXPLICIT, "1.2.840.10008.1.2.2",
                                   "1.2.840.10008.1.2.5", "9.9.9"], rng.randrange(1, 5))
            cxs.append((cid & 0xFF, rng.choice(pool), syntaxes))
        roles = [CT] * rng.choice([0, 1, 50]) if rng.random() < 0.3 else ()
        case.send(self._rq(rng, contexts=[(CX_ECHO, VERIFICATION, [IMPLICIT])] + cxs,
                           roles=roles))
        case.send(message(CX_ECHO, c_echo(1)))
        case.wait, case.finals = 3.0, 1
        case.note = f"{n} contexts ({'distinct' if unique else 'any'} IDs)"

    def _assoc_bad_ae(self, rng, case):
        called = bad_ae(rng) if rng.random() < 0.6 else self.called
        calling = bad_ae(rng) if rng.random() < 0.8 else "FUZZSCU"
        case.send(self._rq(rng, called=called, calling=calling))
        case.send(message(CX_ECHO, c_echo(1)) + (RELEASE_RQ if rng.random() < 0.5 else b""))
        case.wait, case.finals = 2.0, 1
        case.note = f"called {called!r} calling {calling!r}"

    def _pdata_wrong_context(self, rng, case):
        choice = rng.randrange(4)
        wrong = rng.choice([0, 2, 4, 15, 99, 127, 255])
        if choice == 0:
            body = message(wrong, c_echo(1))
        elif choice == 1:                 # command right, data set on another context
            uid = fresh_uid(rng)
            body = message(CX_CT, c_store(1, CT, uid)) + fragments(
                wrong, instance(uid, study=self.study), 16384, False)
        elif choice == 2:                 # command fragments on two contexts
            cmd = c_echo(1)
            body = p_data(pdv(CX_ECHO, cmd[:10], True, False)) + p_data(
                pdv(wrong, cmd[10:], True, True))
        else:                             # a C-STORE on the echo context
            uid = fresh_uid(rng)
            body = self._store_messages(rng, CX_ECHO, CT, uid, uid, study=self.study)
            case.must_fail = True
        case.send(self._rq(rng) + body)
        case.wait, case.finals, case.note = 2.0, 1, f"variant {choice}, context {wrong}"

    def _pdata_bad_pdv_length(self, rng, case):
        cmd = c_echo(1)
        choice = rng.randrange(7)
        if choice == 0:
            body = pdu(0x04, b"", rng.choice([0, 1, 5]))
        elif choice == 1:
            body = p_data(pdv(CX_ECHO, cmd, True, True, rng.choice([0, 1])))
        elif choice == 2:                              # PDV longer than its PDU
            body = p_data(pdv(CX_ECHO, cmd, True, True, len(cmd) + 2 + rng.randrange(1, 5000)))
        elif choice == 3:                              # second PDV overflows
            body = p_data(pdv(CX_ECHO, cmd[:8], True, False),
                          pdv(CX_ECHO, cmd[8:], True, True, 0x7FFFFFFF))
        elif choice == 4:                              # PDU says more than is sent
            body = p_data(pdv(CX_ECHO, cmd, True, True), length=len(cmd) + 6 + 1000)
        elif choice == 5:                              # PDV shorter than its data
            body = p_data(pdv(CX_ECHO, cmd, True, True, len(cmd) - 4))
        else:                                          # control byte with every bit set
            body = p_data(pdv(CX_ECHO, cmd, True, True, control=rng.choice([0xFF, 0xFC, 0x04])))
        case.send(self._rq(rng) + body)
        case.wait, case.finals, case.note = 0.5, 1, f"variant {choice}"

    def _command_no_end(self, rng, case):
        total = self._size(rng, [1 << 10, 60 << 10, 70 << 10, 256 << 10, 1 << 20])
        if rng.random() < 0.03:      # the 2 GiB association of issue 11, smaller
            total = self._size(rng, [256 << 20])
            piece = p_data(pdv(CX_ECHO, bytes(65536), True, False))
            case.send(self._rq(rng) + fragments(CX_ECHO, c_echo(1), 1000, True, last=False))
            case.steps.append(("repeat", (piece, total // 65536)))
            case.end, case.wait, case.finals = rng.choice(["close", "read"]), 0.3, 1
            case.note = f"{total} bytes in 65536-byte fragments"
            return
        size = rng.choice([16, 1000, 16384, 65536]) if total <= (70 << 10) else \
            rng.choice([1000, 16384, 65536])
        head = c_echo(1)
        filler = head + bytes(total)
        case.send(self._rq(rng) + fragments(CX_ECHO, filler, size, True, last=False))
        case.end = rng.choice(["close", "rst", "read"])
        case.wait, case.finals, case.note = 0.3, 1, f"{total} bytes in {size}-byte fragments"

    def _command_oversized(self, rng, case):
        total = self._size(rng, [65 << 10, 65 << 10, 100 << 10, 256 << 10, 1 << 20])
        choice = rng.randrange(3)
        if choice == 0:                      # a C-ECHO with a huge extra element
            cmd = c_echo(1) + element(0, 0x5555, bytes(total))
        elif choice == 1:                    # many tiny elements
            block = b"".join(element(0, 0x4000 + k, b"\0\0") for k in range(256))
            cmd = c_echo(1) + block * max(1, total // len(block))
        else:                                # group length says 4 GiB
            cmd = command_set([(0x0002, VERIFICATION), (0x0100, C_ECHO_RQ), (0x0110, 1),
                               (0x0800, NO_DATA)], group_length=0xFFFFFFF0) + bytes(total)
        case.send(self._rq(rng) + fragments(CX_ECHO, cmd, rng.choice([16384, 65536, 1 << 20]),
                                            True))
        case.wait, case.finals, case.note = 3.0, 1, f"variant {choice}, {len(cmd)} bytes"

    def _dimse_bad_uid(self, rng, case):
        bad = bad_uid(rng, self.canary)
        choice = rng.randrange(5)
        if choice == 0:
            body = message(CX_ECHO, c_echo(1, bad))
        elif choice == 1:                     # the same bad UID in the data set
            body = self._store_messages(rng, CX_CT, CT, bad, bad, study=self.study)
            case.must_fail = True
        elif choice == 2:                     # a valid data set
            body = self._store_messages(rng, CX_CT, CT, bad, fresh_uid(rng), study=self.study)
            case.must_fail = True
        elif choice == 3:
            uid = fresh_uid(rng)
            body = self._store_messages(rng, CX_CT, bad, uid, uid, study=self.study)
            case.must_fail = True
        else:
            body = message(CX_FIND, c_find(1, bad), self._identifier(rng))
        case.send(self._rq(rng) + body)
        case.wait, case.finals, case.note = 5.0, 1, f"variant {choice}: {bad[:70]!r}"

    def _store_uid_mismatch(self, rng, case):
        uid = fresh_uid(rng)
        choice = rng.randrange(6)
        kw = {"study": self.study}
        ds_uid, cls = uid, CT
        if choice == 0:
            ds_uid = fresh_uid(rng)
        elif choice == 1:
            ds_uid = bad_uid(rng, self.canary)
        elif choice == 2:
            cls = MR                                  # data set's class differs
        elif choice == 3:
            kw["study"] = bad_uid(rng, self.canary)
        elif choice == 4:
            kw["series"] = bad_uid(rng, self.canary)
        else:
            kw["extra"] = {0x00080016: b""}           # no SOP class in the data set
        if choice == 2:
            data = message(CX_CT, c_store(1, CT, uid), instance(uid, MR, **kw))
        else:
            data = self._store_messages(rng, CX_CT, cls, uid, ds_uid, **kw)
        case.send(self._rq(rng) + data)
        case.must_fail = True
        case.wait, case.finals, case.note = 5.0, 1, f"variant {choice}"

    def _store_path_uid(self, rng, case):
        tag = f"c{case.index}"
        uid = self.canary.uid(rng, tag) if self.canary else "../../../../tmp/pacsp2p-fuzz"
        kw = {"study": self.study}
        if rng.random() < 0.3:
            kw["study"] = self.canary.uid(rng, tag + "st") if self.canary else "../st"
        if rng.random() < 0.3:
            kw["series"] = self.canary.uid(rng, tag + "se") if self.canary else "../se"
        case.send(self._rq(rng) + self._store_messages(rng, CX_CT, CT, uid, uid, **kw))
        case.must_fail = True
        case.wait, case.finals, case.note = 5.0, 1, uid

    def _qr(self, rng, case, cid, cls, field_, dest=None):
        ident, what = self._hostile_identifier(rng)
        roles = [CT, MR] if field_ == C_GET_RQ and rng.random() < 0.7 else ()
        cmd = c_find(1, cls, field_, dest, NO_DATA if ident is None else 0)
        case.send(self._rq(rng, roles=roles) + message(cid, cmd, ident))
        case.store_replies = rng.choice(["ok", "ok", "fail", "wrong-id", "none"])
        case.wait, case.finals = 5.0, 1
        case.note = what + (f", destination {dest!r}" if dest is not None else "")

    def _find_bad_identifier(self, rng, case):
        cid, cls = rng.choice([(CX_FIND, FIND_STUDY), (CX_PFIND, FIND_PATIENT)])
        self._qr(rng, case, cid, cls, C_FIND_RQ)

    def _move_bad_identifier(self, rng, case):
        dest = rng.choice([self.dest, self.dest, "NOWHERE", b"\xff\xfe\xfd", b"",
                           b"../../x", b"A" * 64, b"\0", b"X\n" + INJECTED])
        self._qr(rng, case, CX_MOVE, MOVE_STUDY, C_MOVE_RQ, dest)

    def _get_bad_identifier(self, rng, case):
        self._qr(rng, case, CX_GET, GET_STUDY, C_GET_RQ)

    def _early_hangup(self, rng, case):
        what = rng.randrange(5)
        roles = [CT, MR] if what == 3 else ()
        rq = self._rq(rng, roles=roles)
        if what == 0:
            msg = message(CX_ECHO, c_echo(1))
        elif what == 1:
            uid = fresh_uid(rng)
            msg = self._store_messages(rng, CX_CT, CT, uid, uid, study=self.study)
        elif what == 2:
            msg = message(CX_FIND, c_find(1), self._identifier(rng, extra={0x00100010: b"*"}))
        elif what == 3:
            msg = message(CX_GET, c_find(1, GET_STUDY, C_GET_RQ), self._identifier(rng))
        else:
            msg = message(CX_MOVE, c_find(1, MOVE_STUDY, C_MOVE_RQ, self.dest),
                          self._identifier(rng))
        stage = rng.randrange(8)
        if stage == 0:
            pass                                          # connect, then hang up
        elif stage == 1:
            case.send(rq[:rng.randrange(1, len(rq))])
        elif stage == 2:
            case.send(rq)
        elif stage == 3:
            case.send(rq)
            case.steps.append(("recv", 5.0))
        elif stage == 4:
            case.send(rq + msg[:rng.randrange(1, min(len(msg), 200))])
        elif stage == 5:
            case.send(rq + msg[:rng.randrange(1, len(msg))])
        elif stage == 6:
            case.send(rq + msg)
        else:
            case.send(rq + msg)
            case.steps.append(("recv", 5.0))
            case.steps.append(("recv", rng.choice([0.0, 0.01, 0.1])))
        if rng.random() < 0.2:
            case.steps.append(("sleep", rng.choice([0.001, 0.01, 0.05])))
        case.end = rng.choice(["close", "rst"])
        case.note = f"session {what}, stage {stage}"

    def _max_pdu_tiny(self, rng, case):
        max_pdu = rng.choice([7, 7, 7, 1, 2, 6, 8, 12, 100, 4095, 4096])
        what = rng.randrange(3)
        if what == 0:
            rq = self._rq(rng, max_pdu=max_pdu)
            msg = message(CX_ECHO, c_echo(1))
        elif what == 1:
            rq = self._rq(rng, max_pdu=max_pdu)
            msg = message(CX_FIND, c_find(1), self._identifier(rng))
        else:
            rq = self._rq(rng, max_pdu=max_pdu, roles=[CT, MR])
            msg = message(CX_GET, c_find(1, GET_STUDY, C_GET_RQ), self._identifier(rng))
        case.send(rq + msg)
        case.wait, case.finals = 10.0, 1
        case.note = f"max PDU {max_pdu}, session {what}"

    def _dimse_weird(self, rng, case):
        choice = rng.randrange(9)
        finals = 1
        if choice == 0:
            body = message(CX_ECHO, command_set([(0x0002, VERIFICATION), (0x0100, rng.choice(
                [0x1234, 0x0140, 0x8030, 0x0000, 0xFFFF])), (0x0110, 1), (0x0800, NO_DATA)]))
        elif choice == 1:
            body = message(CX_CT, c_store_rsp(rng.randrange(65536), CT, "1.2.3"))
        elif choice == 2:
            body = message(CX_FIND, command_set([(0x0100, C_CANCEL_RQ), (0x0120, 77),
                                                 (0x0800, NO_DATA)])) + \
                message(CX_ECHO, c_echo(2))
        elif choice == 3:
            body = message(CX_ECHO, command_set([(0x0002, VERIFICATION), (0x0110, 1)]))
        elif choice == 4:                     # element length past the end
            body = message(CX_ECHO, c_echo(1) + element(0, 0x1000, b"1.2", 5000))
        elif choice == 5:                     # a data set announced, then a command
            body = message(CX_ECHO, c_find(1, VERIFICATION, C_ECHO_RQ)) + \
                message(CX_ECHO, c_echo(2))
        elif choice == 6:                     # a C-ECHO with a data set
            body = message(CX_ECHO, c_find(1, VERIFICATION, C_ECHO_RQ),
                           instance("1.2.3", study=self.study))
        elif choice == 7:                     # many requests pipelined, same message ID
            n = rng.choice([2, 10, 100])
            body = b"".join(message(CX_ECHO, c_echo(1)) for _ in range(n))
            finals = n
        else:                                 # odd-length values, US of 1 byte
            body = message(CX_ECHO, element(0, 0, struct.pack("<I", 30)) + element(
                0, 0x0002, b"1.2.840.10008.1.1") + element(0, 0x0100, b"\x30") +
                element(0, 0x0110, b"\x01\x00") + element(0, 0x0800, b"\x01\x01"))
        case.send(self._rq(rng) + body)
        case.wait, case.finals, case.note = 1.0, finals, f"variant {choice}"

    def _association_games(self, rng, case):
        choice = rng.randrange(9)
        rq = self._rq(rng)
        data = [
            RELEASE_RQ,                                    # release before association
            rq + rq,                                       # associate twice
            rq + message(CX_ECHO, c_echo(1))[:20] + ABORT,  # abort mid-command
            RELEASE_RP,
            pdu(0x02, rq[6:]),                             # an A-ASSOCIATE-AC to us
            message(CX_ECHO, c_echo(1)),                   # P-DATA before association
            pdu(rng.randrange(8, 256), rng.randbytes(rng.randrange(0, 64))),
            rq + RELEASE_RQ + message(CX_ECHO, c_echo(1)),  # data after release
            rq + ABORT + rq,
        ][choice]
        case.send(data)
        case.wait, case.finals, case.note = 1.0, 1, f"variant {choice}"


# -- sending -----------------------------------------------------------------------------------

class _Reader:
    """Reads PDUs from the peer; answers C-STORE sub-operations; counts final responses."""

    def __init__(self, sock: socket.socket, case: Case, limit: int = 64 << 20):
        self.sock, self.case, self.limit = sock, case, limit
        self.buf = bytearray()
        self.pos = 0
        self.total = 0
        self.cmd = bytearray()
        self.store = None              # (cid, msg_id, class, instance) awaiting its data
        self.finals = 0
        self.statuses: list[int] = []
        self.end = ""                  # "rejected", "aborted", "released", "closed"

    def read(self, seconds: float, finals: int | None, one_pdu: bool = False) -> str:
        deadline = time.monotonic() + seconds
        while True:
            got = self._parse(one_pdu)
            if self.end:
                return self.end
            if got and one_pdu:
                return "pdu"
            if finals and self.finals >= finals:
                return "answered"
            left = deadline - time.monotonic()
            if left <= 0:
                return "stalled"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 18)
            except socket.timeout:
                return "stalled"
            if not data:
                self.end = "answered" if finals and self.finals >= finals else "closed"
                return self.end
            self.total += len(data)
            if self.total > self.limit:
                return "flood"
            self.buf += data

    def _parse(self, one_pdu: bool) -> bool:
        seen = False
        buf = self.buf
        while len(buf) - self.pos >= 6 and not self.end:
            pdu_type, _, length = struct.unpack_from(">BBI", buf, self.pos)
            if len(buf) - self.pos - 6 < length:
                break
            body = bytes(buf[self.pos + 6:self.pos + 6 + length])
            self.pos += 6 + length
            seen = True
            if pdu_type == 0x03:
                self.end = "rejected"
            elif pdu_type == 0x07:
                self.end = "aborted"
            elif pdu_type == 0x06:
                self.end = "released"
            elif pdu_type == 0x04:
                self._p_data(body)
            if one_pdu:
                break
        if self.pos > (1 << 16) or self.pos == len(buf):
            del buf[:self.pos]
            self.pos = 0
        return seen

    def _p_data(self, body: bytes) -> None:
        pos = 0
        while pos + 6 <= len(body):
            length, cid, control = struct.unpack_from(">IBB", body, pos)
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 1:
                self.cmd += data
                if control & 2:
                    self._command(cid, bytes(self.cmd))
                    self.cmd = bytearray()
            elif control & 2 and self.store is not None:
                self._answer_store()

    def _command(self, cid: int, raw: bytes) -> None:
        fields = elements(raw)
        field_ = us(fields, 0x0100)
        if field_ == C_STORE_RQ:
            self.store = (cid, us(fields, 0x0110), fields.get(0x0002, b"").rstrip(b"\0"),
                          fields.get(0x1000, b"").rstrip(b"\0"))
            if us(fields, 0x0800, NO_DATA) == NO_DATA:
                self._answer_store()
            return
        if field_ & 0x8000:
            status = us(fields, 0x0900, -1)
            self.statuses.append(status)
            if status not in PENDING:
                self.finals += 1

    def _answer_store(self) -> None:
        cid, msg_id, cls, inst = self.store
        self.store = None
        how = self.case.store_replies
        if how == "none":
            return
        status = 0xA700 if how == "fail" else 0
        if how == "wrong-id":
            msg_id = (msg_id + 1) & 0xFFFF
        try:
            self.sock.sendall(message(cid, c_store_rsp(msg_id, cls, inst, status)))
        except OSError:
            pass


def elements(raw: bytes) -> dict[int, bytes]:
    """{element: value} of a command set (implicit VR little endian, group 0000)."""
    out, pos = {}, 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group == 0:
            out[elem] = raw[pos:pos + length]
        pos += length
    return out


def us(fields: dict, elem: int, default: int = 0) -> int:
    raw = fields.get(elem)
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else default


def send_case(host: str, port: int, case: Case, *, connect_timeout: float = 10.0,
              io_timeout: float = 10.0) -> Result:
    """Run one case on a new connection; never raises (the outcome says what happened)."""
    t0 = time.monotonic()
    res = Result(case.index, case.kind, "", note=case.note)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except ConnectionRefusedError:
        res.outcome = "refused"
        return res
    except socket.timeout:
        res.outcome = "connect-timeout"
        return res
    except OSError as e:
        res.outcome = f"connect-error:{type(e).__name__}"
        return res
    reader = _Reader(sock, case)
    try:
        res.local_port = sock.getsockname()[1]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outcome = ""
        for step, arg in case.steps:
            if step == "send":
                sock.settimeout(io_timeout)
                sock.sendall(arg)
            elif step == "recv":
                outcome = reader.read(arg, None, one_pdu=True)
                if outcome not in ("pdu", "stalled"):
                    break
            elif step == "repeat":
                data, times = arg
                sock.settimeout(io_timeout)
                for _ in range(times):
                    sock.sendall(data)
            elif step == "sleep":
                time.sleep(arg)
        if case.end == "read" and not reader.end:
            outcome = reader.read(case.wait, case.finals)
            if outcome == "answered" and rng_release(case):
                try:
                    sock.sendall(RELEASE_RQ)
                except OSError:
                    pass
        elif case.end in ("close", "rst"):
            outcome = reader.end or case.end
        res.outcome = outcome or reader.end or "sent"
    except socket.timeout:
        res.outcome = "send-timeout"         # the peer stopped reading (may be right)
    except (ConnectionResetError, BrokenPipeError):
        res.outcome = reader.end or "reset"
    except OSError as e:
        res.outcome = f"os-error:{type(e).__name__}"
    except Exception as e:                   # a bug here, not in the peer
        res.outcome = f"client-error:{type(e).__name__}: {e}"
    finally:
        try:
            if case.end == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass
    res.statuses = reader.statuses
    if case.must_fail and 0x0000 in reader.statuses:
        res.violation = "a C-STORE that had to fail was answered Success"
    res.seconds = time.monotonic() - t0
    return res


def rng_release(case: Case) -> bool:
    return case.index % 2 == 0


# -- running and reporting -----------------------------------------------------------------------

FAILURE_OUTCOMES = ("refused", "connect-timeout", "connect-error", "client-error")


@dataclass
class Report:
    seed: int
    planned: int
    results: list[Result] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by_time: bool = False

    @property
    def sent(self) -> int:
        return len(self.results)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def failures(self) -> list[Result]:
        """The peer refused a connection, a must-fail C-STORE got Success, a client bug."""
        return [r for r in self.results
                if r.violation or r.outcome.startswith(FAILURE_OUTCOMES)]

    def by_kind(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.results:
            out[r.kind][r.outcome.split(":")[0]] += 1
        return dict(out)

    def statuses(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.results:
            for s in r.statuses:
                out[r.kind][f"{s:#06x}" if s >= 0 else "none"] += 1
        return dict(out)

    def summary(self, max_failures: int = 20) -> str:
        lines = [f"fuzz seed {self.seed}: {self.sent} of {self.planned} inputs in "
                 f"{self.elapsed:.1f} s ({self.rate:.0f}/s)"
                 + (" (stopped by the time limit)" if self.stopped_by_time else "")]
        statuses = self.statuses()
        for kind, counts in sorted(self.by_kind().items()):
            outs = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            st = ", ".join(f"{k} {v}" for k, v in statuses.get(kind, Counter()).most_common(6))
            lines.append(f"  {kind:22} {outs}" + (f"  [statuses: {st}]" if st else ""))
        fails = self.failures()
        lines.append(f"failures: {len(fails)}")
        for r in fails[:max_failures]:
            lines.append(f"  case {r.index} ({r.kind}, {r.note[:90]}): {r.outcome} "
                         f"{r.violation} statuses {[hex(s) for s in r.statuses]}")
        return "\n".join(lines)


def run(host: str, port: int, gen: Generator, count: int, *, concurrency: int = 8,
        time_limit: float = 60.0, by_kind: bool = False,
        between_kinds: Callable[[str | None, str | None], None] | None = None,
        progress: Callable[[int], None] | None = None) -> Report:
    """Send up to *count* cases of *gen* to host:port, *concurrency* connections at a
    time, starting no new case after *time_limit* s. *by_kind*: all cases of one kind
    (in index order), then the next kind, waiting for each kind to end and calling
    ``between_kinds(previous kind, next kind)`` in between (to attribute log lines)."""
    report = Report(gen.seed, count)
    t0 = time.monotonic()
    indices = list(range(count))
    if by_kind:
        k = len(gen.kinds)
        indices.sort(key=lambda i: (i % k, i))
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fuzz") as pool:
        pending: set = set()
        current = None

        def drain(limit: int) -> None:
            while len(pending) > limit:
                done, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    report.results.append(fut.result())
                    if progress:
                        progress(len(report.results))

        for i in indices:
            if time.monotonic() - t0 > time_limit:
                report.stopped_by_time = True
                break
            kind = gen.kinds[i % len(gen.kinds)]
            if by_kind and kind != current:
                drain(0)
                if between_kinds:
                    between_kinds(current, kind)
                current = kind
            case = gen.case(i)
            pending.add(pool.submit(send_case, host, port, case))
            drain(2 * concurrency - 1)
        drain(0)
        if by_kind and between_kinds:
            between_kinds(current, None)
    report.elapsed = time.monotonic() - t0
    report.results.sort(key=lambda r: r.index)
    return report


# -- what to look at on the peer --------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class RssPeak:
    """Context manager: samples VmRSS of *pid* every *every* s in a thread; ``peak``
    and ``first`` in KiB."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every = pid, every
        self.first = self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


_ENTRY = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", re.M)


def log_problems(data: bytes, start: int = 0) -> list[tuple[int, str]]:
    """The entries of a Twisted log (*data*, its bytes from offset *start*) that hold a
    traceback or say "Unhandled": [(offset of the entry, its text)]. An entry starts
    with a timestamp; the lines after it that do not are part of it."""
    marks = [m.start() for m in _ENTRY.finditer(data)] + [len(data)]
    if not marks or marks[0] != 0:
        marks.insert(0, 0)
    out = []
    for a, b in zip(marks, marks[1:]):
        entry = data[a:b]
        if b"Traceback" in entry or b"Unhandled" in entry:
            out.append((start + a, entry.decode("utf-8", "replace").rstrip()))
    return out


def problem_signature(block: str) -> str:
    """The last line of a traceback block that names an exception (for grouping)."""
    for line in reversed(block.splitlines()):
        s = line.strip()
        if s and ("Error" in s or "Exception" in s or s.startswith("builtins.")) \
                and not s.startswith("File "):
            return s[:200]
    return block.splitlines()[0][:200]


class LogWatch:
    """Which part of a peer's log each kind of a ``run(by_kind=True)`` wrote: pass it as
    ``between_kinds``; ``problems()`` then names the kind each traceback came with."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = self._size()
        self.windows: dict[str, list] = {}

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def __call__(self, previous: str | None, following: str | None) -> None:
        offset = self._size()
        if previous is not None:
            self.windows[previous][1] = offset
        if following is not None:
            self.windows[following] = [offset, None]

    def kind_at(self, offset: int) -> str:
        for kind, (a, b) in self.windows.items():
            if a <= offset and (b is None or offset < b):
                return kind
        return "before the run" if offset < self.start else "after the run"

    def problems(self) -> list[tuple[str, str]]:
        """[(kind, log entry)] of every traceback / 'Unhandled' since the watch began."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read()
        return [(self.kind_at(off), text) for off, text in log_problems(data, self.start)]

    def summary(self, example_lines: int = 30) -> str:
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for kind, text in self.problems():
            groups[(kind, problem_signature(text))].append(text)
        out = []
        for (kind, sig), texts in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            example = "\n".join(texts[0].splitlines()[:example_lines])
            out.append(f"--- {len(texts)} x [{kind}] {sig}\n{example}")
        return "\n".join(out)
