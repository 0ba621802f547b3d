"""The cases: what one hostile TCP connection sends and expects, and the seeded
``Generator`` that makes case *i* of every kind from ``random.Random(f"{seed}/{i}")``."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Sequence
from pacsp2p.testing.fuzz.values import Canary, bad_ae, bad_uid
from pacsp2p.testing.fuzz.wire import ABORT, APP_CONTEXT, CONTEXTS, CT, CX_CT, CX_ECHO, CX_FIND, CX_GET, CX_MOVE, CX_PFIND, C_CANCEL_RQ, C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, EXPLICIT, FIND_PATIENT, FIND_STUDY, GET_STUDY, IMPLICIT, INJECTED, MOVE_STUDY, MR, NO_DATA, RELEASE_RP, RELEASE_RQ, VERIFICATION, associate_rq, c_echo, c_find, c_store, c_store_rsp, command_set, context_item, data_set, element, fragments, fresh_uid, instance, item, message, p_data, pdu, pdv, user_info



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
