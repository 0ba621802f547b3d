"""The ingest's one-job path (issue 15 item 5): the writing thread fsyncs while another
keeps and records the copy, the catalog row committed from that thread
(``Catalog.record_now``) with sequence numbers that never collide with the writer's
batches, and a copy whose fsync failed after it was recorded is undone, not answered
Success.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from twisted.internet import defer

from pacsp2p import config, threads, unnamed
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.catalog import db
from pacsp2p.dicom.header import read_meta
from pacsp2p.dicom.status import OUT_OF_RESOURCES, PROCESSING_FAILURE
from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import wait_until
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.transfer.onejob import OneJob
from pacsp2p.types import ArchiveInfo, InstanceMeta, Location


def fact(i: int, peer: str = "p"):
    uid = f"1.2.3.{i}"
    meta = InstanceMeta(uid, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                        {"PatientID": "P", "StudyInstanceUID": "1.2.4",
                         "SeriesInstanceUID": "1.2.5"})
    return meta, Location(uid, "local", peer, "ab" * 32, 10)


def opened(tmp_path) -> db.Catalog:
    """A catalog whose writer connection is open (no reactor: its jobs are called here)."""
    cat = db.Catalog(tmp_path / "catalog.sqlite", reactor=None, peer="p")
    vector, _ = cat._open_writer()
    cat.vector.update(vector)
    return cat


def own_seqs(cat) -> list[int]:
    return sorted(r[0] for r in cat._writer.execute(
        "SELECT seq FROM locations WHERE peer = 'p'"))


def test_record_now_numbers_follow_the_batches_even_before_the_reactor_hears(tmp_path):
    """The reactor learns of a batch's numbers after the writer thread committed it: a
    fact recorded meanwhile from another thread must not reuse them."""
    cat = opened(tmp_path)
    first = cat.record_now(*fact(1))
    seqs, _, _ = cat._write_batch([(*fact(2), (), None)], [], [])   # vector not told yet
    third = cat.record_now(*fact(3))
    assert [first, seqs[0], third] == [1, 2, 3]
    assert cat.vector.get("p", 0) == 0                 # the reactor has heard nothing
    cat.committed_now(third)
    assert cat.vector["p"] == 3
    seqs, _, _ = cat._write_batch([(*fact(4), (), None)], [], [])
    assert seqs == [4] and own_seqs(cat) == [1, 2, 3, 4]


def test_record_now_from_many_threads_gives_each_fact_its_own_number(tmp_path):
    cat = opened(tmp_path)
    got: list[int] = []

    def work(base):
        for i in range(40):
            got.append(cat.record_now(*fact(base + i)))
    ts = [threading.Thread(target=work, args=(1000 * n,)) for n in range(1, 5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(got) == list(range(1, 161))
    assert own_seqs(cat) == list(range(1, 161))
    # a catalog opened again on the file goes on after them
    again = opened(tmp_path)
    assert again.record_now(*fact(9999)) == 161


# -- OneJob: fsync failed after the record --------------------------------------------------
class SyncArchive(EmbeddedArchive):
    """The embedded archive with its pool jobs run at once; its fsync fails if told."""

    fail_fsync = False
    before_flush = None      # called in the flushing thread before its fsync

    def _run(self, fn, *args):
        return defer.maybeDeferred(fn, *args)

    def flusher(self, received, fd=None):
        flush = super().flusher(received, fd)

        def failing():
            if self.before_flush is not None:
                self.before_flush()
            flush()
            if self.fail_fsync:
                raise OSError(5, "Input/output error")
        return failing


class Catalog:
    """What OneJob asks of the catalog, remembered."""

    def __init__(self):
        self.recorded, self.forgotten, self.committed = [], [], []

    def record_now(self, meta, location):
        self.recorded.append((meta.sop_instance_uid, threading.current_thread().name))
        return len(self.recorded)

    def committed_now(self, seq):
        self.committed.append(seq)

    def forget(self, uid, archive, sha256):
        self.forgotten.append(uid)
        return defer.succeed(None)


class Reactor:
    """Runs what is called from a thread at once; its thread pools stopped by ``stop``."""

    def __init__(self):
        self.at_shutdown = []

    def callFromThread(self, fn, *args):
        fn(*args)

    def addSystemEventTrigger(self, phase, event, fn, *args):
        self.at_shutdown.append(fn)

    def stop(self):
        for fn in self.at_shutdown:
            fn()


@pytest.fixture
def reactor():
    r = Reactor()
    yield r
    r.stop()


def alone(tmp_path, reactor, fail_fsync: bool):
    a = SyncArchive("local", tmp_path / "archive", reactor=None, fsync=True)
    a._prepare()
    a.fail_fsync = fail_fsync
    settings = config.from_dict({"peer": {"name": "p"}}, "<test>", Path("."))
    ingest = Ingest(settings, {"local": a}, Catalog(), strategies=None, reactor=reactor)
    ingest.rank = lambda info: [ArchiveInfo("local", "p", alive=True, local=True)]
    return a, ingest


@pytest.fixture(params=[False, True], ids=["named", "nameless"])
def nameless(request):
    """The received file has a name in incoming, or none (``unnamed``: kept from its
    descriptor, as the facade's spares are)."""
    return request.param


def receive(tmp_path, ingest, name, nameless=False):
    """One data set through the session as the facade drives it: (session, answer)."""
    ds = datasets.make_image("MR", size=16, SOPInstanceUID=datasets.uid("onejob", name))
    path = datasets.write(ds, tmp_path / "incoming" / f"{name}.dcm")
    session = ingest.begin("", "", "", b"", None, None)
    assert isinstance(session, OneJob)
    fd = None
    if nameless:                               # the same bytes in a file with no name
        fd = unnamed.make(tmp_path / "incoming")
        assert fd is not None
        os.write(fd, path.read_bytes())
        path.unlink()

    def rest():
        meta = read_meta(path if fd is None else unnamed.source(fd))
        session.header_read(path, meta)
        return meta
    try:
        meta = session.written_then(path, rest, fd)
    finally:
        if fd is not None:
            os.close(fd)
    assert list((tmp_path / "incoming").iterdir()) == []
    return session, session.store(path, meta)


def test_the_copy_is_kept_and_recorded_while_the_writing_thread_fsyncs(tmp_path, reactor, nameless):
    a, ingest = alone(tmp_path, reactor, fail_fsync=False)
    # the keeping thread records before the fsync ends: on a busy machine the writing
    # thread could end its fsync first and take the job itself (either may, by design)
    a.before_flush = lambda: wait_until(lambda: ingest.catalog.recorded, 60,
                                        what="the keeping thread's record")
    session, answer = receive(tmp_path, ingest, "ok", nameless)
    results = []
    answer.addBoth(results.append)
    assert results and results[0].stored[0].archive == "local"
    assert len(list(a.objects.glob("*/*.dcm"))) == 1
    (uid, thread), = ingest.catalog.recorded
    assert thread != threading.current_thread().name      # kept and recorded elsewhere
    assert ingest.catalog.committed == [1] and not ingest.catalog.forgotten


def test_an_fsync_that_fails_after_the_record_undoes_it(tmp_path, reactor, nameless):
    """Before an answer: the fact is forgotten (a tombstone) and the file dropped, so a
    retry is not taken for a duplicate of bytes that were never durable."""
    a, ingest = alone(tmp_path, reactor, fail_fsync=True)
    session, answer = receive(tmp_path, ingest, "bad", nameless)
    failures = []
    answer.addErrback(failures.append)
    assert failures and failures[0].value.status == OUT_OF_RESOURCES
    assert ingest.catalog.forgotten == [session.uid]
    assert list(a.objects.glob("*/*.dcm")) == []


def test_a_copy_placement_refuses_is_never_recorded(tmp_path, reactor, nameless):
    """Built-in placement is asked in the keeping thread, before the record: a refused
    instance is findable nowhere, not even for a moment (its file dropped)."""
    a, ingest = alone(tmp_path, reactor, fail_fsync=False)
    ingest.rank = lambda info: [ArchiveInfo("local", "p", alive=False, local=True)]
    session, answer = receive(tmp_path, ingest, "refused", nameless)
    failures = []
    answer.addErrback(failures.append)
    assert failures and failures[0].value.status == PROCESSING_FAILURE
    assert ingest.catalog.recorded == [] and ingest.catalog.forgotten == []
    assert list(a.objects.glob("*/*.dcm")) == []


def test_a_keeping_job_the_pool_never_runs_is_done_by_the_writing_thread(tmp_path, reactor, nameless):
    """A stopped pool drops what it is given (Twisted's ThreadPool): the C-STORE must
    not wait for ever — the writing thread claims the job once its fsync is done."""
    a, ingest = alone(tmp_path, reactor, fail_fsync=False)
    keepers = threads.pool(reactor, "ingest-keep", 1, 4, lane=True)
    keepers.callInThread = lambda fn, *args: None          # dropped, as once stopped
    session, answer = receive(tmp_path, ingest, "dropped", nameless)
    results = []
    answer.addBoth(results.append)
    assert results and results[0].stored[0].archive == "local"
    (uid, thread), = ingest.catalog.recorded
    assert thread == threading.current_thread().name        # done here
    assert len(list(a.objects.glob("*/*.dcm"))) == 1


def test_a_stopped_keeping_pool_keeps_in_the_writing_thread(tmp_path, reactor, nameless):
    """The keeping pool stopped (the peer stopping): the writing thread keeps, records
    and fsyncs the copy itself — a file with no name through its descriptor."""
    a, ingest = alone(tmp_path, reactor, fail_fsync=False)
    keepers = threads.pool(reactor, "ingest-keep", 1, 4, lane=True)
    keepers.joined = True                                  # as once stopped
    try:
        session, answer = receive(tmp_path, ingest, "stopped", nameless)
    finally:
        keepers.joined = False
    results = []
    answer.addBoth(results.append)
    assert results and results[0].stored[0].archive == "local"
    (uid, thread), = ingest.catalog.recorded
    assert thread == threading.current_thread().name
    kept, = a.objects.glob("*/*.dcm")
    assert kept.stat().st_nlink == 1 and read_meta(kept).sop_instance_uid == uid


def test_a_duplicate_whose_fsync_fails_leaves_the_copy_acknowledged_before(tmp_path, reactor, nameless):
    """An instance stored and answered Success, sent again: the second C-STORE's fsync
    fails, so it fails — but the copy acknowledged the first time is on disk and durable:
    it must stay in the catalog (a tombstone would hide acknowledged data from every
    query and retrieval), and its file stays."""
    a, ingest = alone(tmp_path, reactor, fail_fsync=False)
    _, answer = receive(tmp_path, ingest, "twice", nameless)
    results = []
    answer.addBoth(results.append)
    assert results and results[0].stored[0].archive == "local"
    a.fail_fsync = True
    second, answer = receive(tmp_path, ingest, "twice", nameless)
    failures = []
    answer.addErrback(failures.append)
    assert failures and failures[0].value.status == OUT_OF_RESOURCES
    assert second.kept.duplicate
    assert ingest.catalog.forgotten == []
    assert len(list(a.objects.glob("*/*.dcm"))) == 1
