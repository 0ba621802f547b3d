"""Sending one case: the bounded client that runs its steps and reads the answers (and
answers a C-GET's C-STORE sub-operations)."""

from __future__ import annotations

import socket
import struct
import time
from pacsp2p.testing.fuzz import wire
from pacsp2p.testing.fuzz.cases import Case, Result
from pacsp2p.testing.fuzz.wire import C_STORE_RQ, NO_DATA, PENDING, RELEASE_RQ, c_store_rsp, message

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"    # (raw_store)



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
    except ConnectionResetError:
        # accepted, then aborted before this thread saw its connect complete: what the
        # peer does to a connection over its bounds (max_per_address, max_associations)
        # on a loaded host; a reset after the connect returned is "reset" too
        res.outcome = "reset"
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


def raw_store(host: str, port: int, called: str, sop: str, data: bytes,
              calling: str = "RAWSTORE", syntax: str = wire.EXPLICIT) -> list:
    """The statuses of one C-STORE (CT Image Storage, in *syntax*: Explicit VR Little
    Endian) of *data*, a data set's bytes sent exactly as given, on an association of
    its own."""
    case = Case(0, "raw store", wait=60)
    case.send(wire.associate_rq(called=called, calling=calling,
                                contexts=[(1, CT_IMAGE, [syntax])]))
    case.steps.append(("recv", 30))
    case.send(wire.message(1, wire.c_store(1, CT_IMAGE, sop), data))
    return send_case(host, port, case, io_timeout=60).statuses
