"""Character sets in C-FIND (issue 17.3), below the network: the person-name key
(``catalog.names.pn_key``, Orthanc's ToUpperCaseWithAccents), decoding of stored data
sets and of query identifiers in every character set, matching on the catalog with the
name index, and the catalog's migration to that index. The same against a real Orthanc:
tests/integration/test_charsets.py."""
from __future__ import annotations

import ctypes
import ctypes.util
import sqlite3
from io import BytesIO

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import decode
from twisted.logger import formatEvent, globalLogPublisher

from pacsp2p.catalog import db, matching, names, schema
from pacsp2p.dicom.header import file_meta, read_meta, sniff
from pacsp2p.dicom.identifiers import to_dataset, to_query
from pacsp2p.testing import charsets as cs
from pacsp2p.types import Query

pn_key = names.pn_key


# -- the key ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key", [
    ("Doe^John", "DOE^JOHN"),
    ("müller^jürgen", "MÜLLER^JÜRGEN"),
    ("strøm^bjørn=ærø", "STRØM^BJØRN=ÆRØ"),
    ("Straße^Weiß", "STRAßE^WEIß"),             # ß has no one-letter upper case: kept
    ("ﬁnn", "ﬁNN"),                             # nor has the ligature ﬁ
    ("σοφία^ᾳδης", "ΣΟΦΊΑ^ᾼΔΗΣ"),               # ᾳ: the simple mapping ᾼ, not "ΑΙ"
    ("ǆokić^ǅ^ǉ", "ǄOKIĆ^Ǆ^Ǉ"),                  # digraphs, title case too
    ("yıldız^ſeyma", "YILDIZ^SEYMA"),            # dotless i, long s: ASCII upper case
    ("иванов^пётр", "ИВАНОВ^ПЁТР"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "YAMADA^TAROU=山田^太郎=やまだ^たろう"),
    ("ﾔﾏﾀﾞ^ﾀﾛｳ=홍^길동=ａｂｃ", "ﾔﾏﾀﾞ^ﾀﾛｳ=홍^길동=ＡＢＣ"),
    ("Mu\u0308ller", "MU\u0308LLER"),            # decomposed stays decomposed
    ("", ""),
])
def test_pn_key(text, key):
    assert pn_key(text) == key
    assert pn_key(key) == key                    # idempotent
    assert len(pn_key(text)) == len(text)        # one character for one


def test_pn_key_leaves_what_is_not_text():
    assert pn_key(None) is None and pn_key(42) == 42 and pn_key(b"x") == b"x"


def _towupper():
    """glibc's towupper_l in a UTF-8 locale, as Orthanc's std::toupper on wchar_t."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.newlocale.restype = ctypes.c_void_p
    libc.newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    libc.towupper_l.restype = ctypes.c_uint32
    libc.towupper_l.argtypes = [ctypes.c_uint32, ctypes.c_void_p]
    for name in (b"en_US.UTF-8", b"C.UTF-8"):        # Orthanc's default locale first
        loc = libc.newlocale(1 << 0, name, None)     # LC_CTYPE_MASK (LC_CTYPE = 0)
        if loc:
            return lambda cp: libc.towupper_l(cp, loc)
    raise AssertionError("no UTF-8 locale (en_US.UTF-8, C.UTF-8) to compare with")


def test_pn_key_is_the_c_librarys_upper_case_on_every_character():
    """Orthanc's Toolbox::ToUpperCaseWithAccents makes each character upper case with
    std::toupper (glibc towupper) in en_US.UTF-8: the same mapping, code point by code
    point (glibc 2.36 and Python's Unicode 14 agree on all 1,112,064)."""
    towupper = _towupper()
    differ = [hex(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF
              and pn_key(chr(cp)) != chr(towupper(cp))]
    assert not differ, differ[:20]


# -- decoding: stored data sets and queries -------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return dict(zip((e.pid for e in cs.PATIENTS),
                    cs.write_all(tmp_path_factory.mktemp("charsets"))))


@pytest.mark.parametrize("entry", cs.PATIENTS, ids=lambda e: e.pid)
def test_stored_data_sets_are_decoded_text(files, entry):
    attrs = read_meta(files[entry.pid]).attributes
    assert attrs["PatientName"] == entry.name
    assert attrs["StudyDescription"] == entry.study
    assert attrs["SeriesDescription"] == entry.series
    assert attrs["ReferringPhysicianName"] == entry.referring
    raw = files[entry.pid].read_bytes()
    offset, ts = file_meta(raw)
    try:
        early = sniff(raw[offset:], ts, complete=True)
    except ValueError:                   # ISO 2022 and others: read whole (read_meta)
        return
    assert early == attrs


def encoded_identifier(level, keys, charset) -> BytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, cs.identifier(level, keys, charset))
    return BytesIO(fp.getvalue())


@pytest.mark.parametrize("charset, text", [
    (cs.UTF8, "*Müller^Jürgen=山田^花子=김^민수*"), (cs.LATIN1, "MÜLLER*^ØRN?"),
    (None, "öberg*"), (cs.JIS, "*山田^?子=やまだ*"), (cs.JIS13, "ﾔﾏﾀﾞ^ﾀﾛｳ=山田*"),
    (cs.KS, "Hong*=洪^吉洞=홍^?동"), (cs.GB, "*王^小东"), (cs.CYRILLIC, "иванов?*"),
], ids=["utf8", "latin1", "none", "jis", "jis13", "ks", "gb18030", "ir144"])
def test_queries_are_decoded_text_whatever_their_character_set(charset, text):
    ident = decode(encoded_identifier("STUDY", {"PatientName": text,
                                                "StudyDescription": text}, charset),
                   True, True)
    query, requested = to_query(ident, "STUDY")
    assert query.keys["PatientName"] == text
    assert query.keys["StudyDescription"] == text
    assert "SpecificCharacterSet" not in requested


# -- matching on the catalog ------------------------------------------------------------------
@pytest.fixture
def catalog(files):
    conn = db._connect(":memory:")
    schema.create_schema(conn)
    facts = [(db.meta_attributes(read_meta(path)), (read_meta(path).sop_instance_uid,
                                                    "local", "p", "0" * 64, 10, n + 1))
             for n, path in enumerate(files.values())]
    db.write_facts(conn, facts)
    yield conn
    conn.close()


def matches(conn, level, keys) -> set[str]:
    key = cs.LEVEL_KEY[level]
    sql, params, selected = matching.build(Query(level, keys), [key])
    return {r[selected.index(key)] for r in conn.execute(sql, params)}


NAME_MATCHES = [
    ({"PatientName": "MÜLLER*"}, {"L1-MUELLER", "L1-MUELLER-LC"}),
    ({"PatientName": "müller^jürgen"}, {"L1-MUELLER"}),
    ({"PatientName": "M?LLER*"}, {"L1-MUELLER", "L1-MUELLER-LC", "NONE-MULLER"}),
    ({"PatientName": "*ØRN"}, {"U8-STROM"}),
    ({"PatientName": "YILDIZ*"}, {"U8-YILDIZ"}),
    ({"PatientName": "*=山田^?子=*"}, {"U8-YAMADA-H"}),
    ({"PatientName": "*山田*"}, {"JIS-YAMADA-T", "JIS13-YAMADA-T", "U8-YAMADA-H"}),
    ({"PatientName": "*=?^민수"}, {"U8-KIM"}),
    ({"PatientName": "STRASSE*"}, set()),
    ({"PatientName": "Müller^Jörg"}, set()),                     # NFC query, NFD data
]
STUDY_MATCHES = [
    ({"StudyDescription": "T?rax"}, {"U8-GOMEZ"}),
    ({"StudyDescription": "TÓRAX"}, set()),                      # LO: case-sensitive
    ({"ReferringPhysicianName": "PÉREZ^INÉS"}, {"U8-GOMEZ"}),
]


@pytest.mark.parametrize("level, keys, expected", [
    (level, keys, expected) for level in cs.LEVEL_KEY for keys, expected in NAME_MATCHES
] + [(level, keys, expected) for level in ("STUDY", "SERIES")
     for keys, expected in STUDY_MATCHES])
def test_matching_on_decoded_text(catalog, level, keys, expected):
    assert matches(catalog, level, keys) == {cs.unique_key(level, p) for p in expected}


@pytest.mark.parametrize("value, plan", [
    ("MÜLLER*", "USING INDEX idx_patients_PatientName_key (<expr>>? AND <expr><?)"),
    ("müller^jürgen", "USING INDEX idx_patients_PatientName_key (<expr>=?)"),
    ("やまだ*", "USING INDEX idx_patients_PatientName_key (<expr>>? AND <expr><?)"),
])
def test_non_ascii_names_use_the_index(catalog, value, plan):
    sql, params, _ = matching.build(Query("STUDY", {"PatientName": value}),
                                    ["StudyInstanceUID"])
    lines = [r[3] for r in catalog.execute("EXPLAIN QUERY PLAN " + sql, params)]
    assert any(plan in line for line in lines), lines


def test_responses_say_utf8_when_they_hold_more_than_ascii():
    ds = to_dataset({"PatientName": "Hong^Gildong=洪^吉洞=홍^길동"}, ["PatientName"], "PATIENT")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in to_dataset({"PatientName": "DOE^JOHN"},
                                                    ["PatientName"], "PATIENT")


# -- the catalog's index: migration, Unicode tables, connections ------------------------------
@pytest.fixture
def logged():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


def _index_names(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def test_a_schema_2_catalog_gets_the_name_key_index(tmp_path, catalog):
    path = tmp_path / "catalog.sqlite"
    catalog.execute(f"VACUUM INTO '{path}'")
    old = db._connect(path)                                 # as schema 2 left it
    old.execute(f"DROP INDEX {schema.NAME_INDEX}")
    old.execute("CREATE INDEX idx_patients_upper_PatientName ON patients (upper(PatientName))")
    old.execute("DELETE FROM catalog_meta WHERE key = 'unicode'")
    old.execute("PRAGMA user_version=2")
    assert matches(old, "PATIENT", {"PatientName": "MÜLLER*"}) == {"L1-MUELLER",
                                                                   "L1-MUELLER-LC"}
    old.close()
    conn = db._connect(path)
    schema.create_schema(conn, path)                          # what a start does
    assert schema.NAME_INDEX in _index_names(conn)
    assert "idx_patients_upper_PatientName" not in _index_names(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION >= 3
    assert conn.execute("SELECT value FROM catalog_meta WHERE key = 'unicode'").fetchone() \
        == (names.UNICODE_VERSION,)
    assert matches(conn, "SERIES", {"PatientName": "*ÆRØ*"}) == {
        cs.series_uid("L1-AEROSKOBING")}
    conn.close()


def test_keys_made_with_other_unicode_tables_are_made_again(tmp_path, logged):
    path = tmp_path / "catalog.sqlite"
    conn = db._connect(path)
    schema.create_schema(conn, path)
    conn.create_function(names.SQL_FUNCTION, 1, lambda s: s, deterministic=True)  # stale
    db.write_facts(conn, [({"PatientID": "P1", "PatientName": "ærø^åse",
                            "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4",
                            "SOPInstanceUID": "1.2.3.4.5", "SOPClassUID": "1.2"},
                           ("1.2.3.4.5", "local", "p", "0" * 64, 1, 1))])
    conn.close()
    conn = db._connect(path)
    assert matches(conn, "PATIENT", {"PatientName": "ÆRØ*"}) == set()   # filed wrongly
    schema.create_schema(conn, path)                          # same Unicode: nothing done
    assert matches(conn, "PATIENT", {"PatientName": "ÆRØ*"}) == set()
    conn.execute("UPDATE catalog_meta SET value = '13.0.0' WHERE key = 'unicode'")
    schema.create_schema(conn, path)
    assert matches(conn, "PATIENT", {"PatientName": "ÆRØ*"}) == {"P1"}
    assert any("Unicode 13.0.0 -> " in line and "rebuilt" in line for line in logged())
    conn.close()


def test_a_connection_without_the_key_may_read_but_not_write_patients(tmp_path):
    path = tmp_path / "catalog.sqlite"
    conn = db._connect(path)
    schema.create_schema(conn, path)
    conn.close()
    plain = sqlite3.connect(path)                                # e.g. the sqlite3 shell
    assert plain.execute("SELECT count(*) FROM patients").fetchone() == (0,)
    with pytest.raises(sqlite3.OperationalError, match="pn_key"):
        plain.execute("INSERT INTO patients (PatientID, PatientName) VALUES ('x', 'y')")
    plain.close()
