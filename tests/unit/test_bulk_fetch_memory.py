"""A fetched instance up to ``fetching.MEMORY`` bytes is kept in memory, within a byte budget
(issue 14: no temporary file per instance on the requester); a larger one, or one that
arrives when the budget is spent, goes to a temporary file. Either way what is handed
over holds the same bytes and carries the data set's SHA-256 the reader checks.

A real bulk channel (tests/unit/bulk_server.py, started by bulk_spawn.py) and a real
``BulkClient`` (tests/unit/bulk_fetch.py), each in a process of its own, over mutual TLS.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bulk_spawn import bulk_server

from pacsp2p.dicom.header import read_meta
from pacsp2p.dicom.part10 import examine
from pacsp2p.overlay import bulk, fetching
from pacsp2p.testing import datasets

HERE = Path(__file__).parent
PATIENCE = 300.0              # generous: the machine may be busy


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bulkmem")
    files = [datasets.write(datasets.make_image("CT", size=size, seed=i,
                                                SOPInstanceUID=datasets.uid("bulkmem", i)),
                            root / f"{i}.dcm")
             for i, size in enumerate((64, 256, 256, 800))]     # 800x800x2: > MEMORY
    with bulk_server(root / "srv", root / "tls", files) as ports:
        yield root / "tls", ports["port"], files, root


def fetch(served, budget: int, files, many: bool = False, extra=()) -> dict:
    tls_dir, port, _, root = served
    tmp = root / f"tmp-{budget}-{many}"
    tmp.mkdir()
    uids = [read_meta(f).sop_instance_uid for f in files] + list(extra)
    out = subprocess.run([sys.executable, str(HERE / "bulk_fetch.py"), str(tls_dir),
                          str(port), str(tmp), str(budget), *(["--many"] if many else []),
                          *uids],
                         check=False, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0 and out.stdout, out.stderr
    answer = json.loads(out.stdout)
    assert list(tmp.iterdir()) == []              # every temporary file gone once closed
    answer["by_file"] = {f: answer["instances"][u] for f, u in zip(files, uids)}
    return answer


def expected(path: Path) -> dict:
    data = path.read_bytes()
    offset, _, _, sha = examine(data)
    return {"sha256": sha, "size": len(data), "data_size": len(data) - offset,
            "bytes_sha256": hashlib.sha256(data).hexdigest()}


def test_small_instances_are_kept_in_memory_a_large_one_goes_to_a_file(served):
    files = served[2]
    assert files[3].stat().st_size > fetching.MEMORY >= files[2].stat().st_size
    answer = fetch(served, fetching.MEMORY_BUDGET, files)
    for f, got in answer["by_file"].items():
        assert {k: got[k] for k in expected(f)} == expected(f), f
        assert not got["left_on_disk"]
    kinds = [answer["by_file"][f]["kind"] for f in files]
    assert kinds == ["memory", "memory", "memory", "file"]
    for f in files[:3]:                   # what a sender takes: the data set, not copied
        got = answer["by_file"][f]
        assert got["data_sha256"] == got["sha256"]
    assert answer["held"] == 0                      # every byte given back to the budget


def test_a_spent_budget_spills_to_files_with_the_same_bytes(served):
    files = served[2][:3]
    small, one = files[0].stat().st_size, files[1].stat().st_size
    answer = fetch(served, (small + one) // 2, files)   # room for the small body only
    kinds = [answer["by_file"][f]["kind"] for f in files]
    assert kinds == ["memory", "file", "file"], kinds
    for f, got in answer["by_file"].items():
        assert {k: got[k] for k in expected(f)} == expected(f), f
    assert answer["held"] == 0


def test_which_body_is_kept_in_memory_does_not_depend_on_which_arrives_first(served):
    """A body announced larger than the budget left goes to a file from its first byte,
    holding none of the budget: the small one asked last is still kept in memory."""
    small, one, two = served[2][:3]
    budget = (small.stat().st_size + one.stat().st_size) // 2 + 1    # the small one only
    answer = fetch(served, budget, [one, two, small])
    kinds = [answer["by_file"][f]["kind"] for f in (one, two, small)]
    assert kinds == ["file", "file", "memory"], kinds
    assert answer["held"] == 0


def test_a_batch_hands_over_small_instances_in_memory_and_names_the_others(served):
    files = served[2]
    answer = fetch(served, fetching.MEMORY_BUDGET, files, many=True, extra=["1.2.3.4.5"])
    for f in files[:3]:                     # byte-identical, hashed as a single fetch
        got = answer["by_file"][f]
        assert {k: got[k] for k in expected(f)} == expected(f), f
        assert got["kind"] == "memory" and got["data_sha256"] == got["sha256"]
    assert files[3].stat().st_size > bulk.BATCH_ITEM
    assert answer["by_file"][files[3]] == "Unbatched"     # too big: to be fetched alone
    assert answer["instances"]["1.2.3.4.5"] == "NotHeld"
    assert answer["held"] == 0


def frames(*parts) -> list:
    return [b"".join(bulk.FRAME.pack(status, len(body)) + body for status, body in parts)]


def test_a_batch_answer_that_is_not_the_frames_asked_is_refused():
    ok = frames((bulk.OK, b"x" * 10), (bulk.NOT_HELD, b""))
    got = fetching._split(ok, 2)
    assert got[1] == bulk.NOT_HELD and got[0].size == 10
    for bad, n in ((ok, 3), (ok, 1),                             # fewer, more than asked
                   ([ok[0] + b"\0"], 2),                         # trailing bytes
                   ([ok[0][:-1]], 2),                             # cut short
                   (frames((bulk.NOT_HELD, b"body")), 1),         # a body for no instance
                   (frames((9, b"")), 1),                         # no such status
                   ([bulk.FRAME.pack(bulk.OK, bulk.BATCH_ITEM + 1)
                     + b"\0" * (bulk.BATCH_ITEM + 1)], 1)):       # over an item's bound
        with pytest.raises(IOError):
            fetching._split(bad, n)
