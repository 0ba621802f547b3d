"""Hostile DIMSE requests from real clients (pynetdicom, DCMTK) against one real peer,
where the fuzzer (``test_fuzz.py``) does not look: each test names what broke before.

- A C-STORE whose catalog attribute (Patient Name, ...) is longer than
  ``validate.VALUE_MAX`` (1024) characters is refused 0xC000 and not kept. Before it was
  kept: a 70 MB Patient Name (implicit VR) grew the catalog by 440 MB, and in a cluster
  every sync answer of its peer was past the 64 MB bound, so the other peers' catalog
  sync from it stopped for good (``sync from peera stopped: an answer over 67108864
  bytes`` every 3 s). 1024 characters are still kept.
- A C-FIND with a list of 1,000 values or more (a RIS asking for 2,000 accession numbers)
  finds what it names; before, 0xC001 (SQLite: 'Expression tree is too large').
- A C-GET or C-MOVE of more instances than a response can count is refused once 65,536
  are read (``matching.first_column``); before, all were resolved first, with their
  locations: memory grew with the catalog.
- A C-FIND of every instance of a large catalog is answered a page of 500 rows at a time
  (``catalog.findpages``); before, every match was built first: +115 MB for 300,000.
- A flood of refused requests writes at most 10 log lines a kind per 10 s; before, a
  line each (1,000 a second from one association).
"""
from __future__ import annotations

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pydicom.dataset import Dataset
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from pacsp2p.catalog import db, tombstones
from pacsp2p.testing import Peer, datasets, findscu, fuzz
from pacsp2p.testing import dicomnet as dn
from pacsp2p.validate import VALUE_MAX


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("hostile-dimse"), name="hostile") as p:
        yield p


def store(peer, ds) -> int:
    """The status of one C-STORE of *ds* (pynetdicom, implicit VR little endian)."""
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, ImplicitVRLittleEndian)]) as assoc:
        return assoc.send_c_store(ds).Status


def patient_names(peer, patient_id: str) -> list[str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": patient_id, "PatientName": ""},
        model="P")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [str(r.PatientName) for r in rows]


@pytest.mark.parametrize("length, kept", [(VALUE_MAX, True), (VALUE_MAX + 1, False),
                                          (200_000, False)])
def test_a_catalog_value_past_its_bound_is_refused_and_not_kept(peer, length, kept):
    patient = f"LONG{length}"
    ds = datasets.make_image("CT", size=8, seed=length, PatientID=patient,
                             PatientName="N" * length,
                             transfer_syntax=ImplicitVRLittleEndian)
    status = store(peer, ds)
    assert status == (0x0000 if kept else 0xC000)
    assert patient_names(peer, patient) == (["N" * length] if kept else [])
    held = [dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)]
    assert (ds.SOPInstanceUID in held) == kept


def test_a_valid_instance_with_many_values_is_kept_its_catalog_value_clipped(peer):
    """Other Patient IDs is LO, VM 1-n: 80 IDs of 15 characters (1,279 with the
    backslashes) is valid DICOM; so is a Patient Name of 3 component groups. Before, the
    first was refused 0xC000 (a modality's queue stuck on it for good): now both are
    kept byte for byte, the catalog keeping the whole values that fit ``VALUE_MAX``."""
    ids = [f"HOSPITAL{i:03d}-ABCD" for i in range(80)]
    ds = datasets.make_image("CT", size=8, seed=99, PatientID="MANYIDS",
                             PatientName="Yamada^Tarou=" + "\u5c71\u7530^\u592a\u90ce=" +
                             "\u3084\u307e\u3060^\u305f\u308d\u3046",
                             OtherPatientIDs=ids, transfer_syntax=ImplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 192"
    assert len("\\".join(ids)) > VALUE_MAX
    assert store(peer, ds) == 0x0000
    held = [dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)]
    assert ds.SOPInstanceUID in held
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": "MANYIDS", "PatientName": "",
        "0010,1000": ""}, model="P")       # Other Patient IDs (retired: DCMTK's name)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = rows
    kept = list(row.OtherPatientIDs)
    assert kept == ids[:len(kept)] and len("\\".join(kept)) <= VALUE_MAX
    assert len(kept) == (VALUE_MAX + 1) // (len(ids[0]) + 1)


@pytest.mark.parametrize("key, values", [
    ("AccessionNumber", [f"ACC{i}" for i in range(2000)]),            # a RIS prefetch
    ("PatientName", [f"NOBODY{i}*" for i in range(1500)] + ["LIST^*"]),
    ("StudyDate", [f"2001{i % 12 + 1:02d}01-2001{i % 12 + 1:02d}02" for i in range(1200)]
     + ["20240115"])])
def test_a_list_of_thousands_of_values_is_matched(peer, key, values):
    """Before: a list of 1,000 values or more was a chain of ORs SQLite refused ('Expression
    tree is too large (maximum depth 1000)'): 0xC001, nothing found."""
    ds = datasets.make_image("CT", size=8, seed=7, PatientID="LIST1",
                             PatientName="LIST^ONE", AccessionNumber="ACC1999",
                             transfer_syntax=ImplicitVRLittleEndian)
    assert store(peer, ds) == 0x0000
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", key: "\\".join(values), "PatientID": "LIST1",
        "StudyInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [str(r.StudyInstanceUID) for r in rows] == [ds.StudyInstanceUID]


def many_instances(root, n: int):
    """A data directory under *root* whose catalog holds *n* instances of patient MANY
    (500 a study), written with the product's own writer; *root*."""
    (root / "data").mkdir(parents=True)
    conn = db._connect(root / "data" / "catalog.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    for start in range(0, n, 10_000):
        facts = []
        for i in range(start, min(n, start + 10_000)):
            uid, study = f"1.2.77.{i}", f"1.2.77.0.{i // 500}"
            facts.append(({"PatientID": "MANY", "PatientName": "MANY^ONE",
                           "StudyInstanceUID": study, "SeriesInstanceUID": study + ".1",
                           "Modality": "CT", "SOPInstanceUID": uid,
                           "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                           "TransferSyntaxUID": "1.2.840.10008.1.2.1"},
                          (uid, "local", "many", f"{i:064x}", 1000, i + 1)))
        db.write_facts(conn, facts)
    conn.commit()
    conn.close()
    return root


def test_a_cfind_of_every_instance_is_answered_in_bounded_memory(tmp_path):
    """A C-FIND of every instance (IMAGE level, SOP Instance UID asked) of a catalog of
    120,000: every match answered, and the peer's RSS grows by less than 20 MB while it
    answers. Before, every match was built as a dict before the first response: +115 MB
    for 300,000, ~4 GB for ten million, from any modality, with one request."""
    n = 120_000
    root = many_instances(tmp_path / "many", n)
    with Peer(root, name="many", config={"cluster": {"scrub_interval": 0}}) as p:
        ident = fuzz.wire.data_set({0x00080052: b"IMAGE", 0x00100020: b"MANY",
                                    0x00080018: b""})
        case = fuzz.Case(0, "every", wait=600.0)
        case.send(fuzz.associate_rq(p.ae_title) + fuzz.message(
            fuzz.wire.CX_FIND, fuzz.wire.c_find(1), ident))
        with fuzz.RssPeak(p.pid) as rss:
            statuses = fuzz.send_case("127.0.0.1", p.port, case, io_timeout=600).statuses
        grown = (rss.peak - rss.first) / 1024
        assert "Traceback" not in p.log_path.read_text(errors="replace")
    assert sum(s in (0xFF00, 0xFF01) for s in statuses) == n, statuses[-3:]
    assert statuses[-1] == 0x0000
    assert grown < 20, f"the peer's RSS grew {grown:.0f} MB while it answered"


def test_a_retrieval_of_more_than_a_response_can_count_is_refused_unread(tmp_path):
    """A C-GET and a C-MOVE matching 70,000 instances (a response counts at most 65,535):
    0xC416 and 0xA701, as before, but now once 65,536 UIDs are read, none of their
    locations: before, every match was resolved first (the peer's RSS grew 280 MB for
    300,000, 66 MB for 70,000; with millions, without bound)."""
    n = 70_000
    root = many_instances(tmp_path / "many", n)
    with Peer(root, name="many", destinations={"STORESCP": "127.0.0.1:9"},
              config={"cluster": {"scrub_interval": 0}}) as p:
        rss = fuzz.rss_kib(p.pid)
        ident = fuzz.wire.data_set({0x00080052: b"PATIENT", 0x00100020: b"MANY"})
        statuses = []
        for cid, sop_class, field, dest in [
                (fuzz.wire.CX_GET, fuzz.wire.GET_STUDY, fuzz.wire.C_GET_RQ, None),
                (fuzz.wire.CX_MOVE, fuzz.wire.MOVE_STUDY, fuzz.wire.C_MOVE_RQ, "STORESCP")]:
            case = fuzz.Case(0, "many", wait=120.0)
            case.send(fuzz.associate_rq(p.ae_title, roles=[fuzz.CT]) + fuzz.message(
                cid, fuzz.wire.c_find(1, sop_class, field, dest), ident))
            statuses += fuzz.send_case("127.0.0.1", p.port, case, io_timeout=120).statuses
        grown = (fuzz.rss_kib(p.pid) - rss) / 1024
    assert statuses == [0xC416, 0xA701]
    assert grown < 30, f"the peer's RSS grew {grown:.0f} MB"


@pytest.mark.parametrize("key, value, status", [
    ("StudyDate", "20240115-20240115-20240116", 0xA900),
    ("StudyTime", "0800-0900-1000", 0xA900),
    ("StudyDate", "20240101\\19990101-20000101-20010101", 0xA900),
    ("StudyDate", "20240115-20240116", 0x0000),            # a range: served as before
    ("StudyDate", "-20240116", 0x0000)])
def test_a_range_of_three_parts_is_refused(peer, key, value, status):
    """A date or time range is <value1>-<value2> (PS3.4 C.2.2.2.5); one of three parts is
    refused 0xA900 (before: matched from its first part to the string of the other two,
    a silent answer to a question nobody asked)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    setattr(ds, key, value)
    with dn.association(peer.port, peer.ae_title, [build_context(FIND)]) as assoc:
        got = [s.Status for s, _ in assoc.send_c_find(ds, FIND)]
    assert got[-1] == status, [hex(s) for s in got]


def test_a_flood_of_refused_requests_writes_a_bounded_log(peer):
    """500 C-STOREs of an invalid UID and 500 C-MOVEs to an unknown destination on one
    association: each refused, at most 10 log lines a kind per 10 s (docs/security.md,
    "Logging"). Before: a line each, 1,000 lines (90 KB) a second from one association."""
    n = 500
    before = peer.log_path.read_bytes().count(b"\n")
    ident = fuzz.wire.data_set({0x00080052: b"STUDY", 0x0020000D: b"1.2.3"})
    statuses = []
    for one in (lambda i: fuzz.message(fuzz.CX_CT, fuzz.c_store(i, fuzz.CT, "1.2.03"),
                                       fuzz.instance("1.2.03")),
                lambda i: fuzz.message(fuzz.wire.CX_MOVE, fuzz.wire.c_find(
                    i, fuzz.wire.MOVE_STUDY, fuzz.wire.C_MOVE_RQ, "NOWHERE"), ident)):
        case = fuzz.Case(0, "flood", wait=120.0, finals=n)
        case.send(fuzz.associate_rq(peer.ae_title))
        for k in range(1, n + 1, 10):             # 10 at a time: at most 16 may wait
            case.send(b"".join(one(i) for i in range(k, k + 10)))
            case.steps.append(("sleep", 0.01))
        statuses += fuzz.send_case("127.0.0.1", peer.port, case, io_timeout=120).statuses
    assert statuses == [0xC000] * n + [0xA801] * n
    added = peer.log_path.read_bytes().count(b"\n") - before
    assert added <= 60, f"{added} log lines for {2 * n} refused requests"
