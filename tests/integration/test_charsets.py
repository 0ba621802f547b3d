r"""C-FIND across character sets: the same data sets in a real Orthanc and in a pacsp2p peer
(stored by DCMTK's storescu), the same queries encoded in many Specific Character Sets,
the same matches (issue 17.3).

The data (``pacsp2p.testing.charsets.PATIENTS``): names with accents and Scandinavian
letters in ISO_IR 100 and ISO_IR 192, Latin-1 bytes with no Specific Character Set,
Japanese in ISO 2022 IR 87 and IR 13 + IR 87 (romaji, ideographic and phonetic groups),
Korean in ISO 2022 IR 149, Chinese in GB18030, Cyrillic in ISO_IR 144, Greek, Turkish
and Croatian letters in UTF-8, and a decomposed (NFD) name.

What Orthanc 1.10.1 (default ``CaseSensitivePN: false``) does, observed here, and what
the peer does the same way:

* Data and queries meet by their decoded text, whatever either's character set: a query
  in GB18030 finds Japanese names stored in UTF-8, one in ISO 2022 IR 87 Korean hanja
  stored in ISO 2022 IR 149.
* Person names match without regard to case, letter by letter, accents kept:
  "MÜLLER*" finds Müller and müller, not MULLER; "ß" stays "ß" (STRASSE* misses
  Straße, STRAßE* finds it); "ᾳ" is "ᾼ", "ǆ" is "Ǆ"; nothing is normalized otherwise
  (NFD "Mu\u0308ller" is not NFC "Müller"). Other VRs are case-sensitive.
* ``*`` works on characters in every script; plain string matching on the whole PN value
  with its "=" groups ("山田*" misses "Yamada^Tarou=山田^...").

Where Orthanc 1.10.1 answers otherwise, the peer follows DICOM and the issue
(``DIVERGENCES``, each checked against both):

* ``?`` never matches a non-ASCII character in Orthanc ("M?LLER*" misses Müller,
  "Pulm?n" misses Pulmón, "*=?^민수" misses 김^민수): its index of identifiers keeps
  ASCII only and its regular expressions run on UTF-8 bytes. The peer: ``?`` is one
  character (PS3.4 C.2.2.2.4).
* A PatientName letter whose upper case is ASCII (ı, ſ) is dropped by Orthanc's ASCII
  identifier index, so "YILDIZ*" misses "yıldız" (though "YıLDıZ*" finds it). The peer
  finds it both ways.
* ReferringPhysicianName (not an Orthanc identifier) is compared by SQLite's ASCII-only
  lower(): "PÉREZ^INÉS" misses "Pérez^Inés". The peer matches every PN without regard
  to case.
* Orthanc mis-decodes ISO 2022 IR 13 + IR 87 data sets written as PS3.5 H.3.2 does
  (ESC ( J back to JIS X 0201): their kanji and kana become ASCII garbage, so "*山田*"
  misses that patient (a query in the same character set is mis-decoded alike, and
  matches). The peer decodes it (pydicom).
* Orthanc answers in its DefaultEncoding (Latin1) whatever the query's character set,
  losing kanji, hangul and combining marks. The peer answers ISO_IR 192 when a value is
  not ASCII (``test_responses_carry_a_character_set_that_encodes_them``).
"""
from __future__ import annotations

import pytest

from pacsp2p.testing import Orthanc, Peer, findscu, storescu
from pacsp2p.testing import charsets as cs
from pacsp2p.testing.charsets import CYRILLIC, GB, JIS, JIS13, KS, LATIN1, UTF8

ALL = [e.pid for e in cs.PATIENTS]
LEVELS = ("PATIENT", "STUDY", "SERIES")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Orthanc, peer), both holding every data set of ``charsets.PATIENTS``."""
    work = tmp_path_factory.mktemp("charsets")
    paths = cs.write_all(work / "files")
    orthanc = Orthanc(work / "orthanc").start()
    try:
        peer = Peer(work / "peer").start()
        try:
            storescu(orthanc.dicom_port, orthanc.aet, paths)
            storescu(peer.port, peer.ae_title, paths)
            yield orthanc, peer
        finally:
            peer.stop()
    finally:
        orthanc.stop()


def both(servers, level, keys, charset):
    orthanc, peer = servers
    return (cs.matched(orthanc.dicom_port, orthanc.aet, level, keys, charset),
            cs.matched(peer.port, peer.ae_title, level, keys, charset))


def keys_of(level, pids):
    return {cs.unique_key(level, p) for p in pids}


# -- person names, at patient, study and series level -----------------------------------
def N(qid, value, charset, *expected):
    return pytest.param(value, charset, expected, id=qid)


NAME_QUERIES = [
    N("latin1_exact_upper", "MÜLLER^JÜRGEN", LATIN1, "L1-MUELLER"),
    N("utf8_exact_lower", "müller^jürgen", UTF8, "L1-MUELLER"),
    N("no_charset_exact_latin1_bytes", "Müller^Jürgen", None, "L1-MUELLER"),
    N("utf8_prefix_accent", "MÜLLER*", UTF8, "L1-MUELLER", "L1-MUELLER-LC"),
    N("latin1_prefix_lower", "mü*", LATIN1, "L1-MUELLER", "L1-MUELLER-LC"),
    N("utf8_inner_accent", "*ÜLLER*", UTF8, "L1-MUELLER", "L1-MUELLER-LC"),
    N("ascii_inner", "*ller*", UTF8, "L1-MUELLER", "L1-MUELLER-LC", "NONE-MULLER",
      "U8-NFD-MULLER"),
    N("ascii_is_not_accented", "MULLER*", UTF8, "NONE-MULLER"),
    N("scandinavian_exact", "STRØM^BJØRN", UTF8, "U8-STROM"),
    N("scandinavian_suffix", "*ØRN", UTF8, "U8-STROM"),
    N("scandinavian_latin1_lower_prefix", "ærø*", LATIN1, "L1-AEROSKOBING"),
    N("scandinavian_latin1_exact_upper", "ÅKESSON^SÖREN", LATIN1, "U8-AKESSON-LC"),
    N("no_charset_prefix", "öberg*", None, "NONE-OBERG"),
    N("spanish_exact_upper", "GÓMEZ^JOSÉ", UTF8, "U8-GOMEZ"),
    N("sharp_s_stays", "STRAßE*", UTF8, "U8-STRASSE"),
    N("sharp_s_is_not_ss", "STRASSE*", UTF8),
    N("nfd_matches_nfd", "MU\u0308LLER*", UTF8, "U8-NFD-MULLER"),
    N("nfc_is_not_nfd", "Müller^Jörg", UTF8),
    N("jis_exact", "Yamada^Tarou=山田^太郎=やまだ^たろう", JIS, "JIS-YAMADA-T"),
    N("utf8_exact_jis_data", "Yamada^Tarou=山田^太郎=やまだ^たろう", UTF8, "JIS-YAMADA-T"),
    N("jis_exact_romaji_upper", "YAMADA^TAROU=山田^太郎=やまだ^たろう", JIS, "JIS-YAMADA-T"),
    N("jis_romaji_prefix_lower", "yamada*", JIS, "JIS-YAMADA-T", "U8-YAMADA-H"),
    N("jis_ideographic_group", "*=山田^花子=*", JIS, "U8-YAMADA-H"),
    N("utf8_phonetic_group", "*やまだ^はなこ", UTF8, "U8-YAMADA-H"),
    N("gb18030_kanji_of_utf8_data", "*花子*", GB, "U8-YAMADA-H"),
    N("ideographs_not_first", "山田*", JIS),
    N("jis13_half_width_katakana", "*ﾔﾏﾀﾞ*", JIS13, "JIS13-YAMADA-T"),
    N("utf8_half_width_katakana_prefix", "ﾔﾏﾀﾞ^ﾀﾛｳ*", UTF8, "JIS13-YAMADA-T"),
    N("jis13_exact", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", JIS13, "JIS13-YAMADA-T"),
    N("ks_exact", "Hong^Gildong=洪^吉洞=홍^길동", KS, "KS-HONG"),
    N("utf8_exact_ks_data", "Hong^Gildong=洪^吉洞=홍^길동", UTF8, "KS-HONG"),
    N("ks_exact_romaji_upper", "HONG^GILDONG=洪^吉洞=홍^길동", KS, "KS-HONG"),
    N("ks_hangul_suffix", "*홍^길동", KS, "KS-HONG"),
    N("ks_hangul_of_utf8_data", "*김*", KS, "U8-KIM"),
    N("ks_hanja_group", "*=金^民洙=*", KS, "U8-KIM"),
    N("jis_kanji_of_ks_data", "*洪^吉洞*", JIS, "KS-HONG"),
    N("gb18030_exact", "Wang^XiaoDong=王^小东", GB, "GB-WANG"),
    N("gb18030_suffix", "*小东", GB, "GB-WANG"),
    N("utf8_hanzi_of_gb18030_data", "*王*", UTF8, "GB-WANG"),
    N("utf8_exact_upper_gb18030_data", "WANG^XIAODONG=王^小东", UTF8, "GB-WANG"),
    N("cyrillic_exact_upper", "ИВАНОВ^ПЁТР", UTF8, "CY-IVANOV"),
    N("cyrillic_in_ir144", "иванов*", CYRILLIC, "CY-IVANOV"),
    N("greek_upper_accent", "ΣΟΦΊΑ*", UTF8, "U8-SOFIA"),
    N("greek_ypogegrammeni", "*ᾳΔΗΣ", UTF8, "U8-SOFIA"),
    N("digraph_dz", "ǄOKIĆ*", UTF8, "U8-DZOKIC"),
    N("digraph_titlecase_lj", "*ǈUBICA", UTF8, "U8-DZOKIC"),
    N("dotless_i_spelled_alike", "YıLDıZ*", UTF8, "U8-YILDIZ"),
    N("universal", "*", UTF8, *ALL),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("value, charset, expected", NAME_QUERIES)
def test_person_names_match_as_in_orthanc(servers, level, value, charset, expected):
    in_orthanc, in_peer = both(servers, level, {"PatientName": value}, charset)
    assert in_peer == in_orthanc
    assert in_peer == keys_of(level, expected)


# -- other attributes (case-sensitive) --------------------------------------------------
def K(qid, level, keyword, value, charset, *expected):
    return pytest.param(level, {keyword: value}, charset, expected, id=qid)


OTHER_QUERIES = [
    K("lo_exact", "STUDY", "StudyDescription", "Schädel nativ", UTF8, "L1-MUELLER"),
    K("lo_inner", "STUDY", "StudyDescription", "*ädel*", LATIN1, "L1-MUELLER",
      "L1-MUELLER-LC"),
    K("lo_case_sensitive", "STUDY", "StudyDescription", "SCHÄDEL NATIV", UTF8),
    K("lo_no_charset", "STUDY", "StudyDescription", "Bäcken", None, "NONE-OBERG"),
    K("lo_jis", "STUDY", "StudyDescription", "頭部", JIS, "U8-YAMADA-H"),
    K("lo_gb18030", "STUDY", "StudyDescription", "胸部", GB, "GB-WANG"),
    K("lo_ks_suffix", "STUDY", "StudyDescription", "*부", KS, "U8-KIM"),
    K("series_lo_exact", "SERIES", "SeriesDescription", "Pulmón", UTF8, "U8-GOMEZ"),
    K("series_lo_case_sensitive", "SERIES", "SeriesDescription", "PULMÓN", UTF8),
    K("series_lo_jis_prefix", "SERIES", "SeriesDescription", "軸*", JIS, "U8-YAMADA-H"),
    K("series_lo_prefix", "SERIES", "SeriesDescription", "Kort*", UTF8, "U8-STROM"),
    K("referring_exact_lower", "STUDY", "ReferringPhysicianName", "pérez^inés", UTF8,
      "U8-GOMEZ"),
    K("referring_suffix", "STUDY", "ReferringPhysicianName", "*ÅSA", UTF8, "U8-STROM"),
    K("referring_suffix_latin1", "STUDY", "ReferringPhysicianName", "*ÄRZTIN", LATIN1,
      "L1-MUELLER"),
]


@pytest.mark.parametrize("level, keys, charset, expected", OTHER_QUERIES)
def test_other_attributes_match_as_in_orthanc(servers, level, keys, charset, expected):
    in_orthanc, in_peer = both(servers, level, keys, charset)
    assert in_peer == in_orthanc
    assert in_peer == keys_of(level, expected)


# -- a client that encodes its own bytes: DCMTK's findscu ---------------------------------
RAW_QUERIES = [
    pytest.param("PATIENT", [b"SpecificCharacterSet=ISO_IR 100",
                             "PatientName=MÜ*".encode("latin-1")],
                 ("L1-MUELLER", "L1-MUELLER-LC"), id="latin1"),
    pytest.param("STUDY", ["PatientName=*ØRN".encode("latin-1")], ("U8-STROM",),
                 id="no_charset_latin1"),
    pytest.param("SERIES", [b"SpecificCharacterSet=ISO_IR 192",
                            "PatientName=*やまだ^はなこ".encode()],
                 ("U8-YAMADA-H",), id="utf8"),
    pytest.param("STUDY", [b"SpecificCharacterSet=\\ISO 2022 IR 149",
                           b"PatientName=*=\x1b$)C\xb1\xe8^\xb9\xce\xbc\xf6*"],     # 김^민수
                 ("U8-KIM",), id="iso2022_ir149"),
    pytest.param("PATIENT", [b"SpecificCharacterSet=\\ISO 2022 IR 87",
                             "PatientName=*山田^花子*".encode("iso2022_jp")],
                 ("U8-YAMADA-H",), id="iso2022_ir87"),
]


@pytest.mark.parametrize("level, keys, expected", RAW_QUERIES)
def test_findscu_with_its_own_bytes(servers, level, keys, expected):
    orthanc, peer = servers
    in_orthanc = cs.findscu_raw(orthanc.dicom_port, orthanc.aet, level, keys)
    in_peer = cs.findscu_raw(peer.port, peer.ae_title, level, keys)
    assert in_peer == in_orthanc == keys_of(level, expected)


# -- where Orthanc 1.10.1 answers otherwise (see the module docstring) --------------------
def D(qid, level, keyword, value, charset, orthanc, peer):
    return pytest.param(level, {keyword: value}, charset, orthanc, peer, id=qid)


DIVERGENCES = [
    D("question_mark_on_accent", "PATIENT", "PatientName", "M?LLER*", UTF8,
      ["NONE-MULLER"], ["NONE-MULLER", "L1-MUELLER", "L1-MUELLER-LC"]),
    D("question_mark_on_accent_series", "SERIES", "PatientName", "G?MEZ*", UTF8,
      [], ["U8-GOMEZ"]),
    D("question_mark_on_hangul", "STUDY", "PatientName", "*=?^민수", KS, [], ["U8-KIM"]),
    D("question_mark_on_kanji", "PATIENT", "PatientName", "*山田^?子*", UTF8,
      [], ["U8-YAMADA-H"]),
    D("question_mark_on_lo", "SERIES", "SeriesDescription", "Pulm?n", UTF8,
      [], ["U8-GOMEZ"]),
    D("question_mark_on_lo_kanji", "STUDY", "StudyDescription", "頭?", JIS,
      [], ["U8-YAMADA-H"]),
    D("dotless_i_upper_case_is_ascii", "STUDY", "PatientName", "YILDIZ*", UTF8,
      [], ["U8-YILDIZ"]),
    D("long_s_upper_case_is_ascii", "PATIENT", "PatientName", "*^SEYMA", UTF8,
      [], ["U8-YILDIZ"]),
    D("referring_accent_case", "STUDY", "ReferringPhysicianName", "PÉREZ^INÉS", UTF8,
      [], ["U8-GOMEZ"]),
    D("referring_accent_case_lower", "STUDY", "ReferringPhysicianName", "größe^ärztin",
      UTF8, [], ["L1-MUELLER"]),
    D("jis13_data_kanji", "PATIENT", "PatientName", "*山田*", JIS,
      ["JIS-YAMADA-T", "U8-YAMADA-H"], ["JIS-YAMADA-T", "JIS13-YAMADA-T", "U8-YAMADA-H"]),
    D("jis13_data_kana_utf8", "SERIES", "PatientName", "*やまだ^たろう", UTF8,
      ["JIS-YAMADA-T"], ["JIS-YAMADA-T", "JIS13-YAMADA-T"]),
]


@pytest.mark.parametrize("level, keys, charset, orthanc, peer", DIVERGENCES)
def test_where_orthanc_differs_the_peer_matches_characters(servers, level, keys, charset,
                                                          orthanc, peer):
    in_orthanc, in_peer = both(servers, level, keys, charset)
    assert in_orthanc == keys_of(level, orthanc), "Orthanc's answer changed"
    assert in_peer == keys_of(level, peer)


def test_orthanc_misreads_only_the_jis13_data_set(servers):
    """Evidence for ``jis13_data_*``: what Orthanc's REST API says it stored."""
    orthanc, _ = servers
    stored = {p["MainDicomTags"]["PatientID"]: p["MainDicomTags"]["PatientName"]
              for p in orthanc.get("/patients?expand")}
    wrong = {pid for pid, name in stored.items() if name != cs.BY_PID[pid].name}
    assert wrong == {"JIS13-YAMADA-T"}
    assert stored["JIS13-YAMADA-T"].startswith("ﾔﾏﾀﾞ^ﾀﾛｳ=")        # its IR 13 part is right


# -- responses ----------------------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_responses_carry_a_character_set_that_encodes_them(servers, level):
    """Every value comes back as stored, in the Specific Character Set the response names:
    ISO_IR 192 when a value is not ASCII, none otherwise (asked by findscu in ISO 2022
    IR 87; the response files hold the bytes as sent)."""
    _, peer = servers
    returns = {"PATIENT": ("PatientName",),
               "STUDY": ("PatientName", "StudyDescription", "ReferringPhysicianName"),
               "SERIES": ("PatientName", "SeriesDescription")}[level]
    keys = [f"QueryRetrieveLevel={level}", "SpecificCharacterSet=\\ISO 2022 IR 87",
            f"{cs.LEVEL_KEY[level]}=", "PatientName=*", *(f"{kw}=" for kw in returns[1:])]
    answers, proc = findscu(peer.port, peer.ae_title, keys,
                            model="P" if level == "PATIENT" else "S")
    assert proc.returncode == 0, proc.stderr
    assert len(answers) == len(cs.PATIENTS)
    for ds in answers:
        raw = {kw: ds.get_item(kw).value or b"" for kw in returns}    # bytes as sent
        entry = cs.BY_PID[cs.pid_of(level, str(ds[cs.LEVEL_KEY[level]].value))]
        wanted = {"PatientName": entry.name, "StudyDescription": entry.study,
                  "SeriesDescription": entry.series,
                  "ReferringPhysicianName": entry.referring}
        texts = {kw: wanted[kw] for kw in returns}
        if all(t.isascii() for t in texts.values()):
            assert "SpecificCharacterSet" not in ds, entry.pid
        else:
            assert ds.SpecificCharacterSet == "ISO_IR 192", entry.pid
        for kw, text in texts.items():
            assert raw[kw].rstrip(b" ").decode("utf-8") == text, (entry.pid, kw)
            assert str(ds[kw].value) == text, (entry.pid, kw)
