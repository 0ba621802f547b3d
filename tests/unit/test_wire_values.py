"""A batch of catalog facts from another peer (``read_changes`` -> ``check_wire`` ->
``write_wires``, what a sync pull does) whose row or fact carries a value that is not
text — a dict, a list, 10^30, 1.5, true — is refused by ``check_wire`` (the pull stops
with one warning line) before the catalog writer sees it. Before, it passed the check:
a dict, a list or 10^30 failed in the writer ("catalog write of N facts failed", a
traceback at CRITICAL); a float or true was kept as text ('1.5', '1'). Real SQLite, the
catalog's own functions; no mocks."""
from __future__ import annotations

import pytest

from pacsp2p.catalog import db, tombstones
from pacsp2p.catalog.facts import LOCATION_FIELDS, _LEVEL_SQL

UID = "1.2.826.0.1.77.1"
BAD = [{"a": 1}, ["A", "B"], 10 ** 30, 1.5, True]


@pytest.fixture
def rows(tmp_path):
    conn = db._connect(tmp_path / "origin.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    a = {"PatientID": "P1", "PatientName": "WIRE^VALUES", "StudyInstanceUID": UID + ".1",
         "SeriesInstanceUID": UID + ".2", "Modality": "CT", "SOPInstanceUID": UID,
         "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
         "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
    db.write_facts(conn, [(a, (UID, "local", "origin", "ab" * 32, 100, 1))], parents={})
    return db.read_changes(conn, "origin", 0, 10)


def test_a_batch_of_text_is_taken(rows, tmp_path):
    assert db.check_wire(rows) == 1
    conn = db._connect(tmp_path / "puller.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    db.write_wires(conn, [rows], "puller")
    assert conn.execute("SELECT PatientName FROM patients").fetchone() == ("WIRE^VALUES",)


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("where", ["PATIENT", "SERIES", "fact"])
def test_a_value_that_is_not_text_is_refused(rows, where, bad):
    if where == "fact":
        i = len(LOCATION_FIELDS) + _LEVEL_SQL["IMAGE"][0].index("SOPClassUID")
        rows[1][i] = bad
    else:
        row = next(iter(rows[0][where].values()))
        row[_LEVEL_SQL[where][0].index("PatientID" if where == "PATIENT" else
                                        "Modality")] = bad
    with pytest.raises(ValueError, match="not text"):
        db.check_wire(rows)


def test_values_over_the_bound_are_cut_to_it(rows, tmp_path):
    """A catalog from before the facade refused values over ``VALUE_MAX`` (d4a5ded) may
    serve them: a 5,000-character study description and a 3,000-character Other Patient
    IDs of several values arrive cut to 1,024 characters (the latter at a value's end),
    and every fact is still written; before, they were kept whole at every peer."""
    from pacsp2p.validate import VALUE_MAX
    study = next(iter(rows[0]["STUDY"].values()))
    study[_LEVEL_SQL["STUDY"][0].index("StudyDescription")] = "D" * 5000
    patient = next(iter(rows[0]["PATIENT"].values()))
    ids = "\\".join(f"ID{i:06d}" for i in range(330))          # 330 x 8 + 329 characters
    patient[_LEVEL_SQL["PATIENT"][0].index("OtherPatientIDs")] = ids
    rows[1][len(LOCATION_FIELDS) + _LEVEL_SQL["IMAGE"][0].index("ImageType")] = "I" * 3000
    assert db.check_wire(rows) == 1
    conn = db._connect(tmp_path / "puller.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    db.write_wires(conn, [rows], "puller")
    (description,) = conn.execute("SELECT StudyDescription FROM studies").fetchone()
    (other,) = conn.execute("SELECT OtherPatientIDs FROM patients").fetchone()
    (image_type,) = conn.execute("SELECT ImageType FROM instances").fetchone()
    assert description == "D" * VALUE_MAX and image_type == "I" * VALUE_MAX
    assert len(other) <= VALUE_MAX and ids.startswith(other + "\\")
    assert conn.execute("SELECT PatientName FROM patients").fetchone() == ("WIRE^VALUES",)
