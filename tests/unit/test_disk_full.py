"""A full disk, piece by piece (issue 11): the partial file of a C-STORE is dropped without
an error escaping its thread, the catalog re-raises SQLite's own error (not "cannot
rollback - no transaction is active"), and a copy the catalog could not record does not
stay in the archive. The whole story against a real peer on a small tmpfs is in
tests/integration/test_hostile_peer.py.
"""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from pacsp2p import config
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.catalog import db
from pacsp2p.dicom import incoming
from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import datasets
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.transfer.onejob import OneJob
from pacsp2p.types import ArchiveInfo, InstanceMeta

FULL = "database or disk is full"


@pytest.fixture
def logged():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


# -- incoming: the partial file ------------------------------------------------------------
class FullDiskFile:
    """An open file whose buffered bytes cannot be written any more."""

    def __init__(self):
        self.closes = 0

    def close(self):
        self.closes += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_discarding_a_partial_file_on_a_full_disk_does_not_raise(tmp_path, logged):
    """Before: the OSError of close() escaped _discard (an unhandled error in the pool)."""
    incoming._discard_failed.last = -1e9               # a fresh report window
    states = []
    for i in range(3):
        path = tmp_path / f"partial{i}.dcm"
        path.write_bytes(b"x" * 10)
        state = incoming._File(path, b"")
        state.f = FullDiskFile()
        states.append(state)
        incoming._discard(state)                       # must not raise
        assert not path.exists()
        assert state.f is None
    lines = [x for x in logged() if "partial received file" in x]
    assert len(lines) == 1                             # logged once, not once per file
    assert "No space left on device" in lines[0]


# -- the catalog: SQLite's own error, not the ROLLBACK's -------------------------------------
def facts(n: int, big: int = 2000):
    out = []
    for i in range(n):
        meta = InstanceMeta(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            {"PatientID": f"P{i}", "PatientName": "x" * big,
                             "StudyInstanceUID": f"1.2.4.{i}",
                             "SeriesInstanceUID": f"1.2.5.{i}"})
        out.append((db.meta_attributes(meta), (f"1.2.3.{i}", "local", "p", "0" * 64, 10, i + 1)))
    return out


def test_a_full_database_raises_its_own_error(tmp_path):
    """Before: SQLite rolled back by itself on SQLITE_FULL, the explicit ROLLBACK failed
    and its "cannot rollback - no transaction is active" replaced the real error."""
    conn = db._connect(tmp_path / "catalog.sqlite")
    db.create_schema(conn)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 4}")
    with pytest.raises(sqlite3.OperationalError, match=FULL):
        db.write_facts(conn, facts(200))
    assert not conn.in_transaction
    conn.execute(f"PRAGMA max_page_count = {pages + 1000}")
    db.write_facts(conn, facts(3, big=10))             # usable again once there is room
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 3


def test_rollback_still_rolls_back_an_open_transaction(tmp_path):
    conn = db._connect(tmp_path / "catalog.sqlite")
    db.create_schema(conn)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO hints (SOPInstanceUID, peer, archive, created, via_peer, "
                 "via_archive) VALUES ('1.2', 'p', 'a', '', '', '')")
    db.rollback(conn)
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM hints").fetchone()[0] == 0


# -- a copy kept but not recorded ------------------------------------------------------------
class SyncArchive(EmbeddedArchive):
    """The embedded archive with its thread-pool jobs run at once (no reactor)."""

    def _run(self, fn, *args):
        return defer.maybeDeferred(fn, *args)


class FullCatalog:
    def __init__(self):
        self.recorded = []

    def record(self, meta, location, hints=(), then=None):
        return defer.fail(sqlite3.OperationalError(FULL))

    def record_now(self, meta, location):              # the one-job path (a thread)
        raise sqlite3.OperationalError(FULL)


class Reactor:
    def callFromThread(self, fn, *args):
        fn(*args)


def ingest_alone(archive) -> Ingest:
    settings = config.from_dict({"peer": {"name": "p"}}, "<test>", Path("."))
    ingest = Ingest(settings, {"local": archive}, FullCatalog(), strategies=None,
                    reactor=Reactor())
    ingest.rank = lambda info: [ArchiveInfo("local", "p", alive=True, local=True)]
    return ingest


def received(tmp_path: Path, name: str) -> Path:
    ds = datasets.make_image("CT", size=16, SOPInstanceUID=datasets.uid("full", name))
    return datasets.write(ds, tmp_path / "incoming" / f"{name}.dcm")


def objects(a: EmbeddedArchive) -> list[Path]:
    return sorted(a.objects.glob("*/*.dcm"))


def test_one_job_copy_not_recorded_is_removed(tmp_path, logged):
    """Before: a C-STORE whose catalog record failed left its file in the embedded archive
    with no catalog row until the modality retried."""
    a = SyncArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    a._prepare()
    session = ingest_alone(a).begin("", "", "", b"", None, None)
    assert isinstance(session, OneJob)
    path = received(tmp_path, "one")
    session.written(path)
    meta = read_meta(path)
    session.header_read(path, meta)
    assert session.kept is not None
    failures = []
    session.store(path, meta).addErrback(failures.append)
    assert failures and failures[0].check(sqlite3.OperationalError)
    assert objects(a) == []                            # the kept file is gone
    assert any("could not record the copy" in x for x in logged())


def test_one_job_duplicate_not_recorded_stays(tmp_path):
    """A copy that was there before (same bytes) is not this C-STORE's to remove."""
    a = SyncArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    a._prepare()
    first = received(tmp_path, "dup")
    a.keep(first, read_meta(first))
    again = received(tmp_path, "dup")
    session = ingest_alone(a).begin("", "", "", b"", None, None)
    session.written(again)
    meta = read_meta(again)
    session.header_read(again, meta)
    assert session.kept.duplicate
    failures = []
    session.store(again, meta).addErrback(failures.append)
    assert failures and failures[0].check(sqlite3.OperationalError)
    assert len(objects(a)) == 1


def test_failure_is_answered_only_once_the_file_is_gone(tmp_path):
    """A retry must not find the file while it is being removed."""
    a = SyncArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    a._prepare()
    removing = defer.Deferred()
    real_discard = a.discard
    a.discard = lambda uid, sha: removing.addCallback(lambda _: real_discard(uid, sha))
    session = ingest_alone(a).begin("", "", "", b"", None, None)
    path = received(tmp_path, "slow")
    session.written(path)
    meta = read_meta(path)
    session.header_read(path, meta)
    answered = session.store(path, meta)
    assert not answered.called
    removing.callback(None)
    assert answered.called
    answered.addErrback(lambda f: None)
    assert objects(a) == []


def test_plain_path_copy_not_recorded_is_removed(tmp_path):
    """The same on the path without the one-job shortcut (``Ingest._copy_local``)."""
    a = SyncArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    a._prepare()
    ingest = ingest_alone(a)
    path = received(tmp_path, "plain")
    meta = read_meta(path)
    copy = ingest._copy_local(ArchiveInfo("local", "p"), path, meta).result
    assert len(objects(a)) == 1
    failures = []
    copy.commit(meta).addErrback(failures.append)
    assert failures
    assert objects(a) == []
