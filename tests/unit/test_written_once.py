"""A received file is not read back nor opened again (issue 15 item 5): while the
writing thread's ``after`` runs, the file is whole on disk and still open — its
descriptor is what the one-job path fsyncs — and a file written in one job has its bytes
at hand, from which its header is read (``read_meta(..., content=...)``), with the same
result as from the file, and the same refusals."""
from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from pacsp2p.dicom import incoming
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.testing import datasets


class InlinePool:
    """A thread pool that runs each job at once, here (``deferToThreadPool`` asks this)."""

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callInThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Reactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def _receive(tmp_path, body: bytes, pieces: int, coalesce: int):
    path = tmp_path / "in.dcm"
    path.write_bytes(b"")
    head = incoming.file_meta("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1")
    inc = incoming.Incoming(path, InlinePool(), Reactor(), head, lambda: None,
                            lambda: None, coalesce=coalesce)
    seen = {}

    def after(p, sha, size):
        fd, content = inc.written()
        seen["open"] = os.fstat(fd).st_size            # the fd is still open here
        seen["content"] = content
        seen["on_disk"] = p.read_bytes()
        return "done"
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        inc.feed(memoryview(body)[i:i + step])
    d = inc.finish(after)
    out = []
    d.addBoth(out.append)
    assert out == ["done"], out
    return head, seen, path


def _body(tmp_path) -> bytes:
    src = datasets.write(datasets.make_image("MR", size=16, SOPInstanceUID="1.2.3.4"),
                         tmp_path / "src.dcm")
    data = src.read_bytes()
    return data[read_meta(src).size - read_meta(src).data_size:]


def test_a_file_written_in_one_job_gives_its_bytes_and_open_descriptor(tmp_path):
    body = _body(tmp_path)
    head, seen, path = _receive(tmp_path, body, pieces=3, coalesce=1 << 20)
    assert seen["content"] == head + body == seen["on_disk"]
    assert seen["open"] == len(head) + len(body)


def test_a_file_written_in_several_jobs_is_read_from_disk(tmp_path):
    body = _body(tmp_path)
    head, seen, path = _receive(tmp_path, body, pieces=4, coalesce=64)
    assert seen["content"] is None
    assert seen["on_disk"] == head + body


def test_the_header_read_from_memory_is_the_header_read_from_the_file(tmp_path):
    src = datasets.write(datasets.make_image("MR", size=16, SOPInstanceUID="1.2.3.9"),
                         tmp_path / "x.dcm")
    data = src.read_bytes()
    assert read_meta(src, content=data) == read_meta(src)
    with pytest.raises(BadDataset):
        read_meta(src, content=data[:-7])               # truncated: refused alike
    with pytest.raises(BadDataset):
        read_meta(src, content=data[:100])
