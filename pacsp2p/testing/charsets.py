"""Data sets and queries in many Specific Character Sets, for C-FIND tests against Orthanc.

``PATIENTS``      one patient each (one study, one series, one 8x8 image), the names and
                  descriptions written in the entry's character set (None: no Specific
                  Character Set, the bytes Latin-1, as Orthanc's DefaultEncoding reads)
``write_all()``   the files, deterministic UIDs (``study_uid(pid)``, ``series_uid(pid)``)
``find()``        a C-FIND by pynetdicom, the identifier encoded in a given character set
``findscu_raw()`` a C-FIND by DCMTK's findscu with raw bytes as keys (no re-encoding)
"""
from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from .datasets import make_image, uid, write
from .dcmtk import dcmtk_env, dcmtk_path
from .ports import LOOPBACK

LATIN1, UTF8, GB = "ISO_IR 100", "ISO_IR 192", "GB18030"
JIS = ["", "ISO 2022 IR 87"]                     # ASCII + JIS X 0208 (kanji, kana)
JIS13 = ["ISO 2022 IR 13", "ISO 2022 IR 87"]     # + JIS X 0201 (half-width katakana)
KS = ["", "ISO 2022 IR 149"]                     # ASCII + KS X 1001 (hangul, hanja)
CYRILLIC = "ISO_IR 144"
LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
             "SERIES": "SeriesInstanceUID"}


@dataclass(frozen=True)
class Entry:
    pid: str
    charset: str | list | None         # SpecificCharacterSet as written; None: absent
    name: str                          # PatientName
    study: str = ""                    # StudyDescription
    series: str = ""                   # SeriesDescription
    referring: str = ""                # ReferringPhysicianName


PATIENTS = [
    Entry("L1-MUELLER", LATIN1, "Müller^Jürgen", "Schädel nativ", "Axial Weichteil",
          "Größe^Ärztin"),
    Entry("L1-MUELLER-LC", LATIN1, "müller^anna", "schädel", "axial"),
    Entry("U8-GOMEZ", UTF8, "Gómez^José", "Tórax", "Pulmón", "Pérez^Inés"),
    Entry("U8-STROM", UTF8, "Strøm^Bjørn", "Hjerte", "Kortakse", "Ødegård^Åsa"),
    Entry("L1-AEROSKOBING", LATIN1, "Ærøskøbing^Åse", "Lunge", "Aksial"),
    Entry("U8-AKESSON-LC", UTF8, "åkesson^sören", "hjärta", "kort axel"),
    Entry("NONE-OBERG", None, "Öberg^Lars", "Bäcken", "Koronal"),
    Entry("NONE-MULLER", None, "MULLER^JURGEN", "SCHADEL", "AXIAL"),
    Entry("JIS-YAMADA-T", JIS, "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    Entry("JIS13-YAMADA-T", JIS13, "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    Entry("U8-YAMADA-H", UTF8, "Yamada^Hanako=山田^花子=やまだ^はなこ", "頭部", "軸位"),
    Entry("KS-HONG", KS, "Hong^Gildong=洪^吉洞=홍^길동"),
    Entry("U8-KIM", UTF8, "Kim^Minsu=金^民洙=김^민수", "흉부"),
    Entry("GB-WANG", GB, "Wang^XiaoDong=王^小东", "胸部"),
    Entry("U8-NFD-MULLER", UTF8, "Mu\u0308ller^Jo\u0308rg"),       # decomposed: u + U+0308
    Entry("U8-STRASSE", UTF8, "Straße^Weiß"),
    Entry("CY-IVANOV", CYRILLIC, "иванов^пётр"),
    Entry("U8-SOFIA", UTF8, "σοφία^ᾳδης"),
    Entry("U8-YILDIZ", UTF8, "yıldız^ſeyma"),
    Entry("U8-DZOKIC", UTF8, "ǆokić^ǉubica"),
]
BY_PID = {e.pid: e for e in PATIENTS}


def study_uid(pid: str) -> str:
    return str(uid("charset-study", pid))


def series_uid(pid: str) -> str:
    return str(uid("charset-series", pid))


def unique_key(level: str, pid: str) -> str:
    """The level's unique key of patient *pid*'s (only) entity at *level*."""
    return {"PATIENT": pid, "STUDY": study_uid(pid), "SERIES": series_uid(pid)}[level]


def pid_of(level: str, key: str) -> str:
    """The patient whose entity at *level* has the unique key *key*."""
    return next(e.pid for e in PATIENTS if unique_key(level, e.pid) == key)


def write_all(directory: Path | str) -> list[Path]:
    directory = Path(directory)
    paths = []
    for e in PATIENTS:
        ds = make_image("CT", size=8, PatientName=e.name, PatientID=e.pid,
                        StudyInstanceUID=study_uid(e.pid), SeriesInstanceUID=series_uid(e.pid),
                        SOPInstanceUID=uid("charset-sop", e.pid), StudyDescription=e.study,
                        SeriesDescription=e.series, ReferringPhysicianName=e.referring,
                        AccessionNumber=e.pid[-16:])
        if e.charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = e.charset
        paths.append(write(ds, directory / f"{e.pid}.dcm"))
    return paths


def identifier(level: str, keys: Mapping[str, str], charset, returns=()) -> Dataset:
    """A query identifier asking for *keys* (and *returns*, empty), to be encoded in
    *charset* (None: no Specific Character Set)."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for kw in (LEVEL_KEY[level], *returns):
        setattr(ds, kw, "")
    for kw, value in keys.items():
        setattr(ds, kw, value)
    return ds


def find(port: int, aec: str, level: str, keys: Mapping[str, str], charset=None,
         returns: Sequence[str] = ()) -> list[Dataset]:
    """The matches of one C-FIND (pynetdicom; patient root at PATIENT level, else study
    root), the identifier encoded in *charset*; raises on a failure status."""
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    from .dicomnet import association
    model = (PatientRootQueryRetrieveInformationModelFind if level == "PATIENT" else
             StudyRootQueryRetrieveInformationModelFind)
    out = []
    with association(port, aec, [build_context(model)], aet="CHARSETS") as assoc:
        for status, ident in assoc.send_c_find(identifier(level, keys, charset, returns),
                                               model):
            code = status.get("Status") if status is not None else None
            if code in (0xFF00, 0xFF01):
                out.append(ident)
            elif code != 0x0000:
                raise AssertionError(f"C-FIND {level} {keys} in {charset} to {aec}: "
                                     f"status {code if code is None else hex(code)}")
    return out


def matched(port: int, aec: str, level: str, keys: Mapping[str, str], charset=None) -> set:
    """The level's unique keys of the matches of one C-FIND (``find``)."""
    return {str(ds.get(LEVEL_KEY[level], "")) for ds in find(port, aec, level, keys, charset)}


def findscu_raw(port: int, aec: str, level: str, keys: Sequence[bytes]) -> set:
    """The level's unique keys of the matches of one C-FIND by /usr/bin/findscu, whose
    ``-k`` arguments are *keys* as raw bytes (e.g. ``b"PatientName=M\\xfcller*"``): what
    a client encoding its own query sends."""
    model = "-P" if level == "PATIENT" else "-S"
    argv: list[bytes | str] = [str(dcmtk_path("findscu")), model, "-aet", "FINDSCU",
                               "-aec", aec, "-X", "-k", f"QueryRetrieveLevel={level}",
                               "-k", f"{LEVEL_KEY[level]}="]
    for key in keys:
        argv += ["-k", key]
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        argv += ["-od", out, LOOPBACK, str(port)]
        proc = subprocess.run(argv, check=False, capture_output=True, env=dcmtk_env(),
                              stdin=subprocess.DEVNULL, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"findscu failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return {str(dcmread(p).get(LEVEL_KEY[level], ""))
                for p in sorted(Path(out).glob("rsp*.dcm"))}
