"""C-FIND identifiers with absurd wildcard patterns, against a real peer (thirteenth
hostile-input session).

SQLite refuses a GLOB pattern longer than 50,000 bytes ("LIKE or GLOB pattern too
complex"): a C-FIND whose Patient Name (or Study Description, ...) was 30,000 times
``*?`` was answered 0xC001 "Unable to process", with an error line naming the SQLite
exception. Now a pattern's runs of ``*`` are one (the same pattern) and one needing more
characters than the catalog keeps (``validate.VALUE_MAX``, 1024) matches nothing, as it
could not match anything: answered Success with no match. Patterns of 10,000 ``*`` or
``?`` were answered at once before and are (no back-tracking blow-up in SQLite's GLOB).

A list of values (PS3.4 C.2.2.2.2) was one OR term a value, which SQLite plans in time
growing much faster than their number: 65,000 accession numbers (a 450 KB identifier)
held a catalog reader and a core for minutes (100,000: still running after 300 s, 108
CPU-s), 8,000 date ranges 8.5 s, 100,000 names with a wildcard 0xC001 ("too many SQL
variables"). Now the values matched by equality are one ``IN`` (65,000 in under a
second), and an identifier of more than 65,536 values, or 2,000 wildcards and ranges,
is refused 0xA900 (``identifiers.MAX_VALUES``, ``MAX_PATTERNS``).
"""
from __future__ import annotations

import os

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from pacsp2p.testing import Peer, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("identifiers"), name="identifiers") as p:
        ds = datasets.make_image("CT", size=8, seed=1, PatientID="WILD1",
                                 PatientName="WILD^CARD", StudyDescription="HEAD CT",
                                 AccessionNumber="A64999",
                                 transfer_syntax=ImplicitVRLittleEndian)
        with dn.association(p.port, p.ae_title,
                            [build_context(CTImageStorage, ImplicitVRLittleEndian)]) as a:
            assert a.send_c_store(ds).Status == 0
        p.study = ds.StudyInstanceUID
        yield p


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find(peer, **keys) -> tuple[list[int], list[str]]:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", ""
    for key, value in keys.items():
        setattr(ds, key, value)
    statuses, studies = [], []
    with dn.association(peer.port, peer.ae_title, [build_context(FIND)],
                        timeout=patience(120)) as a:
        for status, identifier in a.send_c_find(ds, FIND):
            statuses.append(status.Status)
            if identifier is not None and status.Status in (0xFF00, 0xFF01):
                studies.append(str(identifier.StudyInstanceUID))
    return statuses, studies


@pytest.mark.parametrize("key, pattern, found", [
    ("PatientName", "*?" * 30000, False),                 # 60 KB: past SQLite's bound
    ("StudyDescription", "*H" * 30000, False),
    ("PatientName", "*" * 60000 + "CARD", True),          # the same as *CARD
    ("PatientName", "W" + "*" * 60000 + "?", True),
    ("PatientName", "?" * 1025, False),                   # no value is that long
    ("PatientName", "*" * 10000 + "D", True),
    ("PatientName", "?" * 10000, False)])
def test_a_long_wildcard_pattern_is_answered(peer, key, pattern, found):
    statuses, studies = find(peer, PatientID="WILD1", **{key: pattern})
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert studies == ([peer.study] if found else [])
    log = peer.log_path.read_text(errors="replace")
    assert "too complex" not in log and "Traceback" not in log


@pytest.mark.parametrize("level", ["S" * 500_000, "STUDY\\" * 100_000 + "X"])
def test_an_absurd_query_level_is_refused_with_a_short_log_line(peer, level):
    """A QueryRetrieveLevel of 500,000 characters was refused (0xA900) with all of it in
    the log line (repr, no bound): 10 such C-FINDs a window wrote 5 MB; now it is shown
    cut to 80 characters (``validate.shown``), as every other value a requestor chose."""
    before = peer.log_path.stat().st_size
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = level, ""
    with dn.association(peer.port, peer.ae_title, [build_context(FIND)], timeout=120) as a:
        statuses = [status.Status for status, _ in a.send_c_find(ds, FIND)]
    assert statuses == [0xA900]
    with open(peer.log_path, "rb") as f:
        f.seek(before)
        grown = f.read()
    assert b"QueryRetrieveLevel" in grown
    assert max(len(line) for line in grown.splitlines()) < 1000, len(grown)


def test_a_list_of_65000_values_is_matched_in_a_second(peer):
    before = cpu_seconds(peer.pid)
    statuses, studies = find(peer, AccessionNumber="\\".join(f"A{i}" for i in range(65000)))
    used = cpu_seconds(peer.pid) - before
    assert statuses[-1] == 0x0000 and studies == [peer.study]
    assert used < 10, f"{used:.1f} CPU-s"


@pytest.mark.parametrize("key, values", [
    ("StudyDate", ["20200101-20200102"] * 8000),
    ("PatientName", [f"A{i}*" for i in range(100_000)]),
    ("AccessionNumber", [f"A{i}" for i in range(70_000)])])
def test_an_identifier_of_too_many_patterns_or_values_is_refused_at_once(peer, key, values):
    before = cpu_seconds(peer.pid)
    statuses, _ = find(peer, **{key: "\\".join(values)})
    used = cpu_seconds(peer.pid) - before
    assert statuses == [0xA900], [hex(s) for s in statuses]
    assert used < 3, f"{used:.1f} CPU-s"
