r"""C-FIND conformance: the same corpus in a real Orthanc and in a pacsp2p peer must
answer the same findscu queries with the same matches.

Each query runs three ways:
  * test_battery_is_not_vacuous        most queries match >= 1 entity of the corpus;
  * test_orthanc_matches_oracle[q]     Orthanc's matches == a Python oracle over the corpus;
  * test_peer_agrees_with_orthanc[q]   the peer's answers == Orthanc's answers, compared on
                                       the requested keys only, ignoring response order and
                                       trailing padding (and the order of ModalitiesInStudy
                                       values, which DICOM leaves unspecified).

Orthanc 1.10.1 behaviour observed here (the pacsp2p facade is to agree):
  * PN matching is case-insensitive (single value and wildcards; CaseSensitivePN=false,
    the Orthanc default): "doe^john" matches DOE^JOHN, "DOE*" matches Doe^Jane. It is
    plain string matching on the whole value: "DOE" does not match DOE^JOHN and
    "DOE^JOHN^^" does not match DOE^JOHN (no component-wise or trailing-^ normalization).
  * All other VRs match case-sensitively: LO "*mri*" finds nothing, CS Modality "ct"
    finds nothing, ModalitiesInStudy "pt" finds nothing.
  * Wildcards ("*", "?") work on PN, LO, SH, CS...; a lone "*" matches everything,
    including entities whose value is empty. No wildcards on DA ("2019*" -> 0 matches).
  * DA/TM ranges "A-B", "-B", "A-" inclusive; TM bounds may be shorter ("0800-1200").
    A DA list "A\B" matches either value.
  * IS matching is string-exact: SeriesNumber "02" does not match 2 (not locked in here).
  * Every response carries, besides the requested keys, SpecificCharacterSet
    (0008,0005), QueryRetrieveLevel (0008,0052) and RetrieveAETitle (0008,0054).
  * Every requested key comes back; a key with no value comes back zero-length.
    Upper-level attributes asked at a lower level are filled (e.g. PatientName, StudyDate
    at SERIES/IMAGE level); lower-level keys asked at an upper level come back empty.
  * Computed attributes: NumberOfPatientRelated{Studies,Series,Instances} at PATIENT,
    NumberOfStudyRelated{Series,Instances}, ModalitiesInStudy, SOPClassesInStudy at STUDY,
    NumberOfSeriesRelatedInstances at SERIES. Asked at any other level they come back
    zero-length. ModalitiesInStudy as a matching key (single or "MG\DX" list) matches a
    study holding ANY listed modality.
  * A lower-level key used as a MATCHING key at an upper level (Modality=PT at STUDY
    level) filters everything out: 0 matches (not locked in here; clients should use
    ModalitiesInStudy).
  * Orthanc does not enforce the hierarchical unique keys (relational queries work:
    SERIES without StudyInstanceUID, patient-root STUDY without PatientID). The battery
    supplies the higher-level unique keys everywhere except the rel_* queries, which
    document the relational behaviour.
"""
from __future__ import annotations

import re
from collections import defaultdict

import pytest

from pacsp2p.testing import Peer, Orthanc, findscu, storescu
from pacsp2p.testing.datasets import Corpus

LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
             "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
LEVELS = list(LEVEL_KEY)
UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
PN_KEYS = {"PatientName", "ReferringPhysicianName"}
DA_KEYS = {"StudyDate", "PatientBirthDate"}
TM_KEYS = {"StudyTime"}
UNORDERED = {"ModalitiesInStudy", "SOPClassesInStudy"}  # value order unspecified by DICOM
EXPECT_EMPTY = {"s_study_no_match", "s_study_pn_no_component_match", "s_study_lo_case_sensitive",
                "s_series_cs_case_sensitive"}


# -- references to corpus entities (resolved at test time) ------------------------------
class Ref:
    """A value computed from the corpus, e.g. the UID of a patient's n-th study."""

    def __init__(self, fn, label):
        self.fn, self.label = fn, label

    def __call__(self, corpus: Corpus) -> str:
        return self.fn(corpus)

    def __repr__(self):
        return self.label


def _studies_of(corpus, pid):
    return list(dict.fromkeys(r["StudyInstanceUID"] for r in corpus.records if r["PatientID"] == pid))


def _series_of(corpus, study_uid):
    return list(dict.fromkeys(r["SeriesInstanceUID"] for r in corpus.records
                              if r["StudyInstanceUID"] == study_uid))


def _sops_of(corpus, series_uid):
    return [r["SOPInstanceUID"] for r in corpus.records if r["SeriesInstanceUID"] == series_uid]


def study(pid, n):
    return Ref(lambda c: _studies_of(c, pid)[n - 1], f"study({pid},{n})")


def series(pid, n, s):
    return Ref(lambda c: _series_of(c, _studies_of(c, pid)[n - 1])[s - 1], f"series({pid},{n},{s})")


def sop(pid, n, s, i):
    return Ref(lambda c: _sops_of(c, _series_of(c, _studies_of(c, pid)[n - 1])[s - 1])[i - 1],
               f"sop({pid},{n},{s},{i})")


def uid_list(*refs):
    return Ref(lambda c: "\\".join(r(c) for r in refs), "\\".join(map(repr, refs)))


# -- the battery ------------------------------------------------------------------------
def Q(qid, model, level, **keys):
    return pytest.param((model, level, keys), id=qid)


STUDY_RET = dict(StudyInstanceUID="", PatientName="", PatientID="", StudyDate="", StudyTime="",
                 AccessionNumber="", StudyDescription="")
QUERIES = [
    # study root, STUDY level
    Q("s_study_universal", "S", "STUDY", **STUDY_RET, ReferringPhysicianName="", StudyID=""),
    Q("s_study_patientid_single", "S", "STUDY", **{**STUDY_RET, "PatientID": "PID0004"}),
    Q("s_study_pn_star", "S", "STUDY", **{**STUDY_RET, "PatientName": "DOE*"}),
    Q("s_study_pn_lowercase_single", "S", "STUDY", **{**STUDY_RET, "PatientName": "doe^john"}),
    Q("s_study_pn_question", "S", "STUDY", **{**STUDY_RET, "PatientName": "MILLER^T?M"}),
    Q("s_study_pn_space_star", "S", "STUDY", **{**STUDY_RET, "PatientName": "VAN DER*"}),
    Q("s_study_pn_inner_star", "S", "STUDY", **{**STUDY_RET, "PatientName": "*^ANNA*"}),
    Q("s_study_pn_apostrophe", "S", "STUDY", **{**STUDY_RET, "PatientName": "O'BRIEN*"}),
    Q("s_study_date_single", "S", "STUDY", **{**STUDY_RET, "StudyDate": "20190804"}),
    Q("s_study_date_range", "S", "STUDY", **{**STUDY_RET, "StudyDate": "20100101-20151231"}),
    Q("s_study_date_until", "S", "STUDY", **{**STUDY_RET, "StudyDate": "-19991231"}),
    Q("s_study_date_from", "S", "STUDY", **{**STUDY_RET, "StudyDate": "20220101-"}),
    Q("s_study_time_range", "S", "STUDY", **{**STUDY_RET, "StudyTime": "080000-120000"}),
    Q("s_study_date_and_time", "S", "STUDY",
      **{**STUDY_RET, "StudyDate": "20000101-", "StudyTime": "180000-235959"}),
    Q("s_study_accession_single", "S", "STUDY", **{**STUDY_RET, "AccessionNumber": "ACC00016"}),
    Q("s_study_accession_star", "S", "STUDY", **{**STUDY_RET, "AccessionNumber": "ACC0001*"}),
    Q("s_study_uid_list", "S", "STUDY",
      **{**STUDY_RET, "StudyInstanceUID": uid_list(study("PID0001", 1), study("PID0008", 2))}),
    Q("s_study_description_star", "S", "STUDY", **{**STUDY_RET, "StudyDescription": "*MRI*"}),
    Q("s_study_referring_single", "S", "STUDY",
      **{**STUDY_RET, "ReferringPhysicianName": "HOUSE^GREGORY"}),
    Q("s_study_studyid_single", "S", "STUDY", **{**STUDY_RET, "StudyID": "12"}),
    Q("s_study_computed_return", "S", "STUDY",
      **{**STUDY_RET, "PatientID": "PID0001", "ModalitiesInStudy": "",
         "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}),
    Q("s_study_computed_all", "S", "STUDY", StudyInstanceUID="", ModalitiesInStudy="",
      NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances=""),
    Q("s_study_modalities_match_pt", "S", "STUDY",
      **{**STUDY_RET, "ModalitiesInStudy": "PT", "NumberOfStudyRelatedInstances": ""}),
    Q("s_study_modalities_match_list", "S", "STUDY",
      **{**STUDY_RET, "ModalitiesInStudy": "MG\\DX"}),
    Q("s_study_combined", "S", "STUDY",
      **{**STUDY_RET, "PatientName": "DOE*", "ModalitiesInStudy": "CT", "StudyDate": "20200101-"}),
    Q("s_study_patient_attrs", "S", "STUDY",
      **{**STUDY_RET, "PatientSex": "F", "PatientBirthDate": "19700101-19891231"}),
    Q("s_study_no_match", "S", "STUDY", **{**STUDY_RET, "PatientID": "NOBODY"}),
    Q("s_study_pn_component_star", "S", "STUDY", **{**STUDY_RET, "PatientName": "DOE^J*"}),
    Q("s_study_pn_no_component_match", "S", "STUDY", **{**STUDY_RET, "PatientName": "DOE"}),
    Q("s_study_lo_case_sensitive", "S", "STUDY", **{**STUDY_RET, "StudyDescription": "*mri*"}),
    Q("s_study_lo_question", "S", "STUDY", **{**STUDY_RET, "StudyDescription": "PET?CT*"}),
    Q("s_study_star_matches_empty_pn", "S", "STUDY",
      **{**STUDY_RET, "ReferringPhysicianName": "*"}),
    Q("s_study_star_matches_empty_sh", "S", "STUDY", **{**STUDY_RET, "AccessionNumber": "*"}),
    Q("s_study_time_range_hhmm", "S", "STUDY", **{**STUDY_RET, "StudyTime": "0800-1200"}),
    Q("s_study_date_list", "S", "STUDY", **{**STUDY_RET, "StudyDate": "20190804\\20151016"}),
    Q("s_study_sop_classes_return", "S", "STUDY", StudyInstanceUID="", PatientID="PID0001",
      SOPClassesInStudy="", ModalitiesInStudy=""),
    # study root, SERIES level
    Q("s_series_in_study", "S", "SERIES", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID="", Modality="", SeriesNumber="", SeriesDescription="",
      NumberOfSeriesRelatedInstances=""),
    Q("s_series_modality_single", "S", "SERIES", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID="", Modality="CT", SeriesNumber=""),
    Q("s_series_number_single", "S", "SERIES", StudyInstanceUID=study("PID0009", 2),
      SeriesInstanceUID="", Modality="", SeriesNumber="2"),
    Q("s_series_description_star", "S", "SERIES", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID="", SeriesDescription="*5mm"),
    Q("s_series_uid_list", "S", "SERIES", StudyInstanceUID=study("PID0012", 2),
      SeriesInstanceUID=uid_list(series("PID0012", 2, 1), series("PID0012", 2, 3)),
      Modality="", NumberOfSeriesRelatedInstances=""),
    Q("s_series_cs_case_sensitive", "S", "SERIES", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID="", Modality="ct"),
    Q("s_series_upper_level_return", "S", "SERIES", StudyInstanceUID=study("PID0004", 2),
      SeriesInstanceUID="", PatientName="", PatientID="", StudyDate="", StudyDescription="",
      Modality=""),
    Q("rel_series_modality_pt", "S", "SERIES", SeriesInstanceUID="", Modality="PT",
      StudyInstanceUID="", NumberOfSeriesRelatedInstances=""),
    # study root, IMAGE level
    Q("s_image_in_series", "S", "IMAGE", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID=series("PID0001", 1, 3), SOPInstanceUID="", SOPClassUID="",
      InstanceNumber=""),
    Q("s_image_number_single", "S", "IMAGE", StudyInstanceUID=study("PID0004", 2),
      SeriesInstanceUID=series("PID0004", 2, 2), SOPInstanceUID="", InstanceNumber="2"),
    Q("s_image_uid_list", "S", "IMAGE", StudyInstanceUID=study("PID0008", 1),
      SeriesInstanceUID=series("PID0008", 1, 1),
      SOPInstanceUID=uid_list(sop("PID0008", 1, 1, 1), sop("PID0008", 1, 1, 4)),
      InstanceNumber=""),
    Q("s_image_upper_level_return", "S", "IMAGE", StudyInstanceUID=study("PID0012", 2),
      SeriesInstanceUID=series("PID0012", 2, 2), SOPInstanceUID="", PatientID="",
      StudyDate="", Modality="", SeriesNumber=""),
    Q("s_image_foreign_computed", "S", "IMAGE", StudyInstanceUID=study("PID0012", 2),
      SeriesInstanceUID=series("PID0012", 2, 2), SOPInstanceUID="",
      NumberOfSeriesRelatedInstances="", NumberOfStudyRelatedInstances=""),
    # patient root, PATIENT level
    Q("p_patient_universal", "P", "PATIENT", PatientID="", PatientName="", PatientBirthDate="",
      PatientSex=""),
    Q("p_patient_pn_star", "P", "PATIENT", PatientID="", PatientName="SMITH*"),
    Q("p_patient_pn_lone_star", "P", "PATIENT", PatientID="", PatientName="*",
      PatientBirthDate=""),
    Q("p_patient_computed_single", "P", "PATIENT", PatientID="PID0001", PatientName="",
      NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
      NumberOfPatientRelatedInstances=""),
    Q("p_patient_computed_all", "P", "PATIENT", PatientID="", NumberOfPatientRelatedStudies="",
      NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances=""),
    Q("p_patient_birthdate_range", "P", "PATIENT", PatientID="", PatientName="",
      PatientBirthDate="19500101-19691231"),
    Q("p_patient_sex_single", "P", "PATIENT", PatientID="", PatientName="", PatientSex="O"),
    Q("p_patient_empty_value_returned", "P", "PATIENT", PatientID="PID0009",
      PatientBirthDate="", PatientSex=""),
    Q("p_patient_id_star", "P", "PATIENT", PatientID="PID-*", PatientName=""),
    # patient root, lower levels
    Q("p_study_of_patient", "P", "STUDY", PatientID="PID0008", StudyInstanceUID="", StudyDate="",
      ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances=""),
    Q("p_study_date_until", "P", "STUDY", PatientID="PID0002", StudyInstanceUID="",
      StudyDate="-20120101", AccessionNumber=""),
    Q("rel_p_study_without_patientid", "P", "STUDY", StudyInstanceUID="", StudyDate="20190804",
      PatientID=""),
    Q("p_series_of_study", "P", "SERIES", PatientID="PID0001", StudyInstanceUID=study("PID0001", 1),
      SeriesInstanceUID="", Modality="", SeriesNumber="", NumberOfSeriesRelatedInstances=""),
    Q("p_image_of_series", "P", "IMAGE", PatientID="PID0009", StudyInstanceUID=study("PID0009", 2),
      SeriesInstanceUID=series("PID0009", 2, 3), SOPInstanceUID="", InstanceNumber=""),
]


def resolve(keys: dict, corpus: Corpus) -> dict[str, str]:
    return {k: (v(corpus) if callable(v) else v) for k, v in keys.items()}


# -- oracle: DICOM matching over the corpus in Python -----------------------------------
def entities(corpus: Corpus, level: str) -> list[dict]:
    """One dict per entity at *level*, with the attributes of it and its parents plus
    the computed attributes DICOM defines for that level."""
    key = LEVEL_KEY[level]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in corpus.records:
        groups[r[key]].append(r)
    out = []
    for rows in groups.values():
        e = dict(rows[0])
        n_series = len({r["SeriesInstanceUID"] for r in rows})
        if level == "PATIENT":
            e["NumberOfPatientRelatedStudies"] = str(len({r["StudyInstanceUID"] for r in rows}))
            e["NumberOfPatientRelatedSeries"] = str(n_series)
            e["NumberOfPatientRelatedInstances"] = str(len(rows))
        elif level == "STUDY":
            e["ModalitiesInStudy"] = tuple(sorted({r["Modality"] for r in rows}))
            e["NumberOfStudyRelatedSeries"] = str(n_series)
            e["NumberOfStudyRelatedInstances"] = str(len(rows))
        elif level == "SERIES":
            e["NumberOfSeriesRelatedInstances"] = str(len(rows))
        out.append(e)
    return out


def _matches(attr: str, query: str, value) -> bool:
    if query == "":
        return True
    if attr == "ModalitiesInStudy":
        return bool(set(query.split("\\")) & set(value))
    if attr in UID_KEYS:
        return value in query.split("\\")
    if value == "":
        return query == "*"
    if (attr in DA_KEYS or attr in TM_KEYS) and "\\" in query:
        return any(_matches(attr, q, value) for q in query.split("\\"))
    if (attr in DA_KEYS or attr in TM_KEYS) and "-" in query:
        lo, hi = query.split("-", 1)
        return (not lo or value >= lo) and (not hi or value <= hi)
    flags = re.IGNORECASE if attr in PN_KEYS else 0
    if "*" in query or "?" in query:
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in query)
        return re.fullmatch(pattern, value, flags | re.DOTALL) is not None
    return (value.lower() == query.lower()) if flags else value == query


def oracle(corpus: Corpus, level: str, keys: dict[str, str]) -> set[str]:
    """Unique keys (at *level*) of the corpus entities that *keys* match."""
    return {e[LEVEL_KEY[level]] for e in entities(corpus, level)
            if all(_matches(k, v, e.get(k, "")) for k, v in keys.items()
                   if k != "QueryRetrieveLevel")}


# -- running and normalizing findscu answers --------------------------------------------
def run_find(port: int, aec: str, model: str, level: str, keys: dict[str, str]):
    rsp, proc = findscu(port, aec, {"QueryRetrieveLevel": level, **keys}, model=model)
    assert proc.returncode == 0, f"findscu failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return rsp


def normalize(rsp, keys) -> list[tuple]:
    """Sorted rows of (keyword, values tuple) for the requested keys only."""
    rows = []
    for ds in rsp:
        row = []
        for k in sorted(keys):
            if k not in ds:
                row.append((k, "<absent>"))
                continue
            v = ds[k].value
            if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
                vals = tuple(str(x).rstrip(" \0") for x in v)
            else:
                vals = () if v in (None, "") else (str(v).rstrip(" \0"),)
            row.append((k, tuple(sorted(vals)) if k in UNORDERED else vals))
        rows.append(tuple(row))
    return sorted(rows)


# -- fixtures: the corpus loaded into both systems (once per module) --------------------
@pytest.fixture(scope="module")
def loaded_orthanc(find_corpus, tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc-find"), aet="ORTHANC") as orthanc:
        storescu(orthanc.dicom_port, orthanc.aet, [find_corpus.directory])
        assert len(orthanc.instances()) == len(find_corpus.paths)
        yield orthanc


@pytest.fixture(scope="module")
def loaded_peer(find_corpus, tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("peer-find"), name="find") as peer:
        proc = storescu(peer.port, peer.ae_title, [find_corpus.directory], check=False)
        assert proc.returncode == 0, (f"storescu to peer failed:\n{proc.stderr[-2000:]}\n"
                                      f"--- peer log:\n{peer.log_tail()}")
        yield peer


# -- tests ------------------------------------------------------------------------------
def test_battery_is_not_vacuous(find_corpus):
    counts = {p.id: len(oracle(find_corpus, p.values[0][1], resolve(p.values[0][2], find_corpus)))
              for p in QUERIES}
    assert len(QUERIES) >= 30
    empty = [qid for qid, n in counts.items() if n == 0]
    assert set(empty) == EXPECT_EMPTY, counts
    assert len({n for n in counts.values()}) > 5  # a spread of result sizes


@pytest.mark.parametrize("query", QUERIES)
def test_orthanc_matches_oracle(query, find_corpus, loaded_orthanc):
    model, level, keys = query
    keys = resolve(keys, find_corpus)
    rsp = run_find(loaded_orthanc.dicom_port, loaded_orthanc.aet, model, level, keys)
    got = [str(ds.get(LEVEL_KEY[level], "")) for ds in rsp]
    assert sorted(got) == sorted(oracle(find_corpus, level, keys))
    for ds in rsp:  # every requested key comes back (possibly empty)
        assert set(keys) <= set(ds.dir()) | {"QueryRetrieveLevel"}, sorted(set(keys) - set(ds.dir()))


@pytest.mark.parametrize("query", QUERIES)
def test_peer_agrees_with_orthanc(query, find_corpus, loaded_orthanc, loaded_peer):
    model, level, keys = query
    keys = resolve(keys, find_corpus)
    want = normalize(run_find(loaded_orthanc.dicom_port, loaded_orthanc.aet, model, level, keys), keys)
    got = normalize(run_find(loaded_peer.port, loaded_peer.ae_title, model, level, keys), keys)
    assert got == want
