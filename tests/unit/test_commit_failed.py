"""A holder's group commit whose catalog write fails (a full disk, a catalog that cannot
be written) puts the copies it took out of ``pending`` back, and answers each with a
null seq (the writer counts it as not recorded: its hint stays, a waited-for C-STORE
goes the general way). Before, those copies were lost from ``pending``: never recorded
by a commit sent again ("no pending copy"), nor dropped if the writer discards them,
nor recorded at ``PENDING_TTL`` for a writer declared dead -- a durable copy of an
instance the modality may have been told is stored, that nothing would ever count.
Both paths: a push port's ``COMMIT`` (``commits_now``, by the push port's thread) and a
``Commits`` over AMP (``commit_all``, in the reactor). The catalog's write fails for
real: SQLite refuses it (``PRAGMA query_only`` on the catalog's writer connection:
"attempt to write a readonly database"). Real sockets, real mutual TLS, a real
``ReplicaService``, ``Catalog`` and embedded archive (``test_commit_last``'s holder)."""
from __future__ import annotations

import contextlib
import hashlib
import sqlite3

import pytest

from pacsp2p.transfer.pushport import COMMIT, _frame
from test_commit_last import embedded  # noqa: F401 (a fixture)
from test_push_commits import _image, _in_thread, copies
from test_push_port import UID, answer, certs, connect, push  # noqa: F401 (a fixture)


@contextlib.contextmanager
def unwritable(catalog):
    """The catalog's writes refused by SQLite while in the block."""
    with catalog._lock:
        catalog._writer.execute("PRAGMA query_only = 1")
    try:
        yield
    finally:
        with catalog._lock:
            catalog._writer.execute("PRAGMA query_only = 0")


def _pending_copy(reactor, certs, server, data):  # noqa: F811
    sock = connect(certs, server.port)
    got = reactor.wait(_in_thread(reactor, push, sock, data))
    assert got["sha256"] == hashlib.sha256(data).hexdigest(), got
    return sock, ("local", UID, got["sha256"])


def test_a_push_port_commit_that_the_catalog_fails_leaves_the_copy_pending(
        certs, embedded):  # noqa: F811
    reactor, catalog, svc, server = embedded
    sock, key = _pending_copy(reactor, certs, server, b"f" * 40_000)

    def commit():
        sock.sendall(_frame(COMMIT, copies(key).encode()))
        return reactor.wait(_in_thread(reactor, answer, sock))
    try:
        with unwritable(catalog):
            assert commit() == {"seqs": [None], "prevs": [None]}   # told: not recorded
        assert key in svc.pending                                  # before: lost
        seq = commit()["seqs"][0]                                  # before: None
        assert type(seq) is int and seq > 0
        assert svc.pending == {}
        refs = reactor.wait(catalog.resolve(_image(UID)))
        assert [(loc.archive, loc.sha256) for loc in refs[0].locations] == [key[::2]]
    finally:
        sock.close()


def test_an_amp_commits_that_the_catalog_fails_leaves_the_copy_pending(
        certs, embedded):  # noqa: F811
    reactor, catalog, svc, server = embedded
    sock, key = _pending_copy(reactor, certs, server, b"g" * 30_000)
    sock.close()
    with unwritable(catalog):
        assert reactor.wait(svc.commit_all([list(key)])) == [None]
    assert key in svc.pending                                      # before: lost
    assert reactor.wait(svc.commit_all([list(key)]))[0] > 0       # before: None
    assert svc.pending == {}
    with pytest.raises(sqlite3.Error):                             # (the block was real)
        with unwritable(catalog):
            catalog._writer.execute("CREATE TABLE t (x)")


def test_a_single_commit_that_the_catalog_fails_leaves_the_copy_pending(
        certs, embedded):  # noqa: F811
    """``Commit`` (one copy: hinted hand-off, repair): the catalog's error goes to the
    writer, the copy stays pending (before: lost, its bytes kept but never recorded,
    dropped nor expired)."""
    reactor, catalog, svc, server = embedded
    sock, key = _pending_copy(reactor, certs, server, b"h" * 20_000)
    sock.close()
    with unwritable(catalog):
        with pytest.raises(sqlite3.Error):
            reactor.wait(svc.commit(*key))
    assert key in svc.pending                                      # before: lost
    assert reactor.wait(svc.commit(*key)) > 0
    assert svc.pending == {}
