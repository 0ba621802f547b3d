"""Fill an archive behind the cluster's back: many tiny instances, uploaded in parallel.

tiny_corpus(dir, n)        n small (8x8) Part-10 files, ``per_study`` instances per study
                           (two series each), deterministic UIDs; reuses files already there
upload_parallel(o, paths)  POST them to an Orthanc's REST API with several threads
"""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.uid import generate_uid

from . import datasets


def _uid(prefix: str, *parts) -> str:
    return generate_uid(entropy_srcs=[prefix, *map(str, parts)])


def tiny_corpus(directory: Path | str, n: int, *, per_study: int = 50, tag: str = "join",
                start: int = 0) -> list[Path]:
    """Write (or reuse) instances start..start+n-1 of corpus *tag* under *directory*."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    template = datasets.make_image("CT", size=8)
    paths = []
    for i in range(start, start + n):
        study_no, k = divmod(i, per_study)
        series_no = 1 + (k * 2 // per_study)
        path = directory / f"{study_no:05d}" / f"{i:07d}.dcm"
        paths.append(path)
        if path.exists():
            continue
        study = _uid(tag, "study", study_no)
        series = _uid(tag, "series", study_no, series_no)
        sop = _uid(tag, "sop", i)
        ds = template
        ds.PatientID = f"{tag.upper()}{study_no // 2:05d}"
        ds.PatientName = f"{tag.upper()}^PATIENT{study_no // 2:05d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.AccessionNumber = f"A{study_no:07d}"
        ds.StudyID = str(study_no)
        ds.StudyDescription = f"{tag} study {study_no}"
        ds.SeriesNumber = series_no
        ds.SeriesDescription = f"{tag} series {series_no}"
        ds.InstanceNumber = k + 1
        datasets.write(ds, path)
    return paths


def upload_parallel(orthanc, paths, threads: int = 8) -> int:
    """POST every file to *orthanc* (testing.Orthanc or a base URL) /instances; return how
    many Orthanc answered Success or AlreadyStored (raises on any other answer)."""
    url = getattr(orthanc, "url", orthanc)

    def one(path: Path) -> str:
        req = urllib.request.Request(f"{url}/instances", data=Path(path).read_bytes(),
                                     method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as rsp:
            status = json.load(rsp).get("Status")
        if status not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc did not store {path}: {status}")
        return status

    with ThreadPoolExecutor(threads) as pool:
        return sum(1 for _ in pool.map(one, list(paths)))
