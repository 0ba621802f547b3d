"""A C-FIND client that only frames: time until a server has answered, not until a client
has decoded.

pynetdicom decodes every Pending response into a pydicom Dataset (~0.4-0.5 ms a row on
this machine, more than the peer spends to answer it) and DCMTK findscu prints each one;
both costs are the client's, the same for every server. This client sends the C-FIND-RQ
(command and identifier, implicit VR little endian, one association, TCP_NODELAY) and reads
P-DATA-TF PDUs until the final response, looking only at each response's command set
(its Status) and counting the Pending ones; the identifiers are not decoded. The time of
a query is from the request's first byte to the final response's last byte.

    with WireFind(port, called_ae) as c:
        ms, matches = c.find(dataset)
"""
from __future__ import annotations

import io
import socket
import struct
import time

from pydicom.filewriter import write_dataset
from pydicom.filebase import DicomFileLike

from pacsp2p.dicom import dimse, pdu

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PENDING = (0xFF00, 0xFF01)


def _encode(ds) -> bytes:
    """*ds* as implicit VR little endian bytes."""
    buf = io.BytesIO()
    f = DicomFileLike(buf)
    f.is_little_endian, f.is_implicit_VR = True, True
    write_dataset(f, ds)
    return buf.getvalue()


class WireFind:
    def __init__(self, port: int, called_ae: str, calling_ae: str = "BENCHWIRE",
                 host: str = "127.0.0.1", timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.msg_id = 0
        self.sock.sendall(pdu.associate_rq(called_ae, calling_ae,
                                           [(1, STUDY_ROOT_FIND, [IMPLICIT_LE])]))
        kind, body = self._pdu()
        if kind != 0x02:
            raise RuntimeError(f"association not accepted (PDU type {kind:#x})")
        self.max_pdu = 0
        pos = 68                                   # after the fixed fields of A-ASSOCIATE-AC
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
            if item == 0x21 and body[pos + 6] != 0:
                raise RuntimeError("Study Root C-FIND not accepted")
            if item == 0x50:                       # user information: maximum length
                sub = pos + 4
                while sub + 4 <= pos + 4 + length:
                    kind_, n = body[sub], struct.unpack_from(">H", body, sub + 2)[0]
                    if kind_ == 0x51:
                        self.max_pdu = struct.unpack_from(">I", body, sub + 4)[0]
                    sub += 4 + n
            pos += 4 + length
        self.max_data = (self.max_pdu - 6) if self.max_pdu else (1 << 20)

    def _recv(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed by the server")
            self.buf += chunk

    def _pdu(self) -> tuple[int, bytes]:
        self._recv(6)
        kind, _, length = pdu.PDU_HEAD.unpack_from(self.buf, 0)
        self._recv(6 + length)
        body = bytes(self.buf[6:6 + length])
        del self.buf[:6 + length]
        return kind, body

    def find(self, ds) -> tuple[float, int]:
        """(milliseconds until the final response, Pending responses counted)."""
        self.msg_id += 1
        cmd = dimse.command([(0x0002, STUDY_ROOT_FIND.encode()), (0x0100, 0x0020),
                             (0x0110, self.msg_id), (0x0700, 0), (0x0800, 0x0000)])
        parts = (pdu.frame(1, cmd, self.max_data, True, True)
                 + pdu.frame(1, _encode(ds), self.max_data, False, True))
        data = b"".join(bytes(p) for p in parts)
        matches, command = 0, bytearray()
        t0 = time.perf_counter()
        self.sock.sendall(data)
        while True:
            kind, body = self._pdu()
            if kind != 0x04:
                raise RuntimeError(f"unexpected PDU type {kind:#x} during a C-FIND")
            pos = 0
            while pos < len(body):
                length, _cid, control = pdu.PDV_HEAD.unpack_from(body, pos)
                value = body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if not control & 1:
                    continue                       # an identifier: not decoded
                command += value
                if not control & 2:
                    continue
                status = dimse.us(dimse.command_elements(bytes(command)), 0x0900, 0xFFFF)
                command.clear()
                if status in PENDING:
                    matches += 1
                    continue
                if status != 0:
                    raise RuntimeError(f"C-FIND failed: status {status:#06x}")
                return (time.perf_counter() - t0) * 1000, matches

    def close(self) -> None:
        try:
            self.sock.sendall(pdu.RELEASE_RQ)
            self._pdu()
        except (OSError, RuntimeError):
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
