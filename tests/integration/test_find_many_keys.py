"""A C-FIND asking for every return key of the data dictionary, at a real peer
(sixteenth hostile-input session).

A 30 KB identifier of ~3,700 empty return keys (Rows, Slice Thickness, ... every public
non-sequence attribute): the catalog keeps none of most of them, and each response
carries them empty. The fast writer of response identifiers (``identifiers.
fast_identifier``) took only VRs written verbatim, so one key of another VR (US, DS,
FD, OB, ...) sent every row through pydicom, on the reactor: at 7708c2b 2.28 CPU-s for
30 matches (load 11; 50 matches took 13.9 s while a C-ECHO waited 6.1 s). Now an empty
value of any VR is written directly (byte for byte what pydicom writes:
``test_fast_identifier``): the same responses, 0.13 CPU-s. A row with a non-ASCII
value (a UTF-8 Patient Name) still went whole to pydicom: since a8f5360 pydicom writes
only its keys that have a value, the empty ones are put among them directly.
"""
from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from pydicom.datadict import DicomDictionary

from pacsp2p.testing import Peer, datasets, storescu
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.fuzz import wire as w

STUDIES = 30
CPU_PER_ROW = 0.02         # CPU-s of the peer a match may cost (before: 0.076)


def every_key() -> list[int]:
    return sorted(t for t, v in DicomDictionary.items()
                  if t >> 16 not in (0x0000, 0x0002, 0xFFFE, 0x7FE0, 0xFFFC)
                  and t >> 16 < 0x6000 and v[0] != "SQ" and " or " not in v[0])


def cpu_seconds(pid: int) -> float:
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    d = tmp_path_factory.mktemp("manykeys-files")
    for i in range(STUDIES):
        datasets.make_study(d / str(i), patient_id=f"KEYS{i:03d}", seed=i,
                            series=(("CT", 1, "1.2.840.10008.1.2.1"),))
        datasets.make_study(d / f"utf8-{i}", patient_id=f"UTF8{i:03d}", seed=100 + i,
                            series=(("CT", 1, "1.2.840.10008.1.2.1"),),
                            SpecificCharacterSet="ISO_IR 192", patient_name="Dürer^Albrecht")
    with Peer(tmp_path_factory.mktemp("manykeys"), name="manykeys") as p:
        storescu(p.port, p.ae_title, [d])
        yield p


def responses(sock) -> tuple[list[int], list[bytes]]:
    """(the statuses, the data sets) of one C-FIND, read to its final response."""
    statuses: list[int] = []
    data: list[bytes] = []
    command, dataset = b"", b""
    while not statuses or statuses[-1] in (0xFF00, 0xFF01):
        kind, body = w.read_pdu(sock, limit=1 << 26)
        assert kind == 0x04, f"PDU type {kind:#x}"
        pos = 0
        while pos < len(body):
            n = struct.unpack(">I", body[pos:pos + 4])[0]
            header, fragment = body[pos + 5], body[pos + 6:pos + 4 + n]
            pos += 4 + n
            if not header & 1:
                dataset += fragment
                if header & 2:
                    data.append(dataset)
                    dataset = b""
                continue
            command += fragment
            if header & 2:
                p = 0
                while p + 8 <= len(command):
                    g, e, length = struct.unpack("<HHI", command[p:p + 8])
                    if (g, e) == (0, 0x0900):
                        statuses.append(struct.unpack("<H", command[p + 8:p + 10])[0])
                    p += 8 + length
                command = b""
    return statuses, data


@pytest.mark.parametrize("patients", ["KEYS*", "UTF8*"])
def test_a_c_find_of_every_key_costs_little_cpu(peer, patients):
    keys = every_key()
    assert len(keys) > 3000
    elements = {t: b"" for t in keys}
    elements.update({0x00080052: b"STUDY ", 0x00100020: patients.encode() + b" "})
    identifier = b"".join(struct.pack("<HHI", t >> 16, t & 0xFFFF, len(v)) + v
                          for t, v in sorted(elements.items()))
    with socket.create_connection(("127.0.0.1", peer.port), timeout=patience(120)) as s:
        s.sendall(w.associate_rq(called=peer.ae_title,
                                 contexts=[(w.CX_FIND, w.FIND_STUDY, [w.IMPLICIT])]))
        assert w.read_pdu(s)[0] == 0x02
        before = cpu_seconds(peer.pid)
        s.sendall(w.message(w.CX_FIND, w.c_find(1), identifier))
        statuses, data = responses(s)
        used = cpu_seconds(peer.pid) - before
    assert statuses[-1] == 0x0000 and len(data) == STUDIES, [hex(x) for x in statuses[-3:]]
    assert all(len(d) > 8 * len(keys) for d in data)      # every key, empty or not
    if patients == "UTF8*":
        assert all("Dürer^Albrecht".encode() in d for d in data)
    assert used < CPU_PER_ROW * STUDIES + 0.5, f"{used:.2f} CPU-s for {STUDIES} matches"
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log
