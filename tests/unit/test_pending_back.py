"""A copy whose commit the catalog failed goes back to ``pending`` in its place: before
the later copies of the same bytes. The oldest pending copy of a key owns its bytes (the
later ones found them there: duplicates, whose drop removes nothing), and ``_take``
hands a commit the oldest. Put back behind a duplicate (``_back`` appended it), the next
commit recorded the duplicate and the owner, dropped next (its writer's ``Discard``, its
TTL), removed the bytes that record names: the holder's catalog held a copy whose file
was gone. Real push port and TLS, a real embedded archive, ``ReplicaService`` and
``Catalog`` whose write SQLite refuses (``test_commit_failed.unwritable``)."""
from __future__ import annotations

import hashlib

from test_commit_failed import unwritable
from test_commit_last import embedded  # noqa: F401 (a fixture)
from test_pending_drop import _part10, push
from test_push_commits import _image
from test_push_port import UID, certs, connect  # noqa: F401 (a fixture)


def test_a_copy_put_back_keeps_its_place_before_a_duplicate(certs, embedded, tmp_path):  # noqa: F811
    reactor, catalog, svc, server = embedded
    archive = svc.archives["local"]
    sock = connect(certs, server.port)
    try:
        head, data = _part10(tmp_path)
        key = ("local", UID, hashlib.sha256(data).hexdigest())
        assert not push(sock, head, data)["duplicate"]       # writer 1: owns the file
        assert push(sock, head, data)["duplicate"]            # writer 2: the same bytes
        with unwritable(catalog):                             # writer 1's commit fails
            assert reactor.wait(svc.commit_all([list(key)])) == [None]
        seq = reactor.wait(svc.commit_all([list(key)]))[0]   # a commit of the key: kept
        assert type(seq) is int and seq > 0
        reactor.wait(svc.discard(*key))                       # the other copy discarded
        assert svc.pending == {} and not svc.more
        refs = reactor.wait(catalog.resolve(_image(UID)))
        assert [(loc.archive, loc.sha256) for loc in refs[0].locations] == [key[::2]]
        assert archive.path_for(UID).exists(), "the recorded copy's file was removed"
    finally:
        sock.close()


def test_a_copy_put_back_after_a_duplicate_was_recorded_drops_no_recorded_bytes(
        certs, embedded, tmp_path):  # noqa: F811
    """The same, in the order a race makes (the steps called in that order, not timed):
    the owner is out for its commit when a duplicate's commit takes and records that
    one; the owner's write then fails and it is put back alone; dropped next (its
    writer's ``Discard``, its TTL), it removed the bytes the duplicate's record names.
    A drop now leaves bytes that the catalog records on that archive here."""
    reactor, catalog, svc, server = embedded
    archive = svc.archives["local"]
    sock = connect(certs, server.port)
    try:
        head, data = _part10(tmp_path)
        key = ("local", UID, hashlib.sha256(data).hexdigest())
        assert not push(sock, head, data)["duplicate"]       # writer 1: owns the file
        owner = svc._take(key)                                # its commit takes it ...
        assert push(sock, head, data)["duplicate"]            # writer 2: the same bytes
        seq = reactor.wait(svc.commit_all([list(key)]))[0]   # recorded
        assert type(seq) is int and seq > 0
        svc._back(key, owner)                                 # ... and its write failed
        reactor.wait(svc.discard(*key))                       # writer 1 discards it
        assert svc.pending == {} and not svc.dropping
        refs = reactor.wait(catalog.resolve(_image(UID)))
        assert [(loc.archive, loc.sha256) for loc in refs[0].locations] == [key[::2]]
        assert archive.path_for(UID).exists(), "the recorded copy's file was removed"
    finally:
        sock.close()
