"""The receiving side of a replicated write: keep, then record or drop, a copy.

Two phases, so that an instance is recorded nowhere unless the write quorum is met:
``replicate`` fetches the bytes from the writing peer's bulk channel — or the push port
(``pushport``: ``admit``, ``pushed``, in its threads) or, from an older writer,
``open_stream`` takes them as the writer pushes them while its C-STORE arrives
(``stream_data``, ``close_stream``) — and makes them durable on an archive (pending, not
in the catalog); ``commit`` records the copy as a location fact of this peer
(``commit_all``: several in one catalog batch, a group commit); ``discard`` drops it.
A pending copy neither committed nor discarded within ``PENDING_TTL`` seconds is
dropped if its writer is alive (its commit or discard was lost: the writer has its own
record and hints, and hinted hand-off makes the copy again), but recorded if its writer
was declared dead: the writer may have answered Success and been lost for good before its
group commit reached us, and this copy may then be the only one left. Two pending copies
of the same bytes on one archive (a C-STORE sent twice at once, hinted hand-off redoing
a copy whose group commit is on its way) are two, each taken by its own commit or
discard; the bytes go only with the last of them, never while recorded here. A pushed
data set is written as it comes (``Incoming``) and hashed on the way; an archive that can
``keep`` takes it, durable, in the thread job that closes the file.

Deleted instances stay deleted (``delete``): a copy of a copy (``replicate`` without the
writer's header: hinted hand-off, repair) of an instance deleted here is refused, and a
copy made before this peer learned of its deletion is dropped, not committed (a late
push). It also answers ``drain`` (``transfer.drain``) and ``check_copy``
(``transfer.scrub``) for this peer's copies.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pacsp2p import clock
from pacsp2p.catalog import tombstones
from pacsp2p.catalog.db import stored_location
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.dicom.incoming import Incoming, Spares, receive_pool, remove
from pacsp2p.config import Destination
from pacsp2p.overlay.commands import (CheckCopy, DrainRefused, InvalidArgument,
                                      ReplicaRefused, as_refusal, check, check_meta,
                                      receipt)
from pacsp2p.transfer.delete import copy_allowed, pushed_before
from pacsp2p.overlay.threadtls import server_context
from pacsp2p.transfer.direct import send_for
from pacsp2p.transfer.durable import check_given, record
from pacsp2p.transfer.pushrecv import PushServer
from pacsp2p.types import InstanceMeta, Location
from pacsp2p.validate import shown

log = Logger()

PENDING_TTL = 600.0
COALESCE = 1 << 20      # a pushed data set is written in jobs of 1 MB (most: one job)
PUSH_CONNECTIONS = 64   # push port connections served at once (a thread each)
_NAMED = ("SELECT 1 FROM locations WHERE SOPInstanceUID = ? AND peer = ? AND archive = ? "
          "AND sha256 = ? AND ifnull(size, -1) >= 0")      # a live copy recorded here


class _Stream:
    def __init__(self, incoming, done, after):
        self.incoming, self.done, self.after = incoming, done, after


def _keeper(archive, meta, head_size):
    """For an archive that can ``keep``: what the thread that wrote a pushed data set
    does once the file is closed — keep it in the archive and make it durable there and
    then (one thread job per copy, no hop back and forth), returning (meta, stored)."""
    def keep(path, sha, data_size):
        full = dataclasses.replace(meta, sha256=sha, data_size=data_size,
                                   size=head_size + data_size)
        flushed = archive.begin_flush(path, now=True)      # durable when it returns
        stored = archive.keep(path, full)
        archive.made_durable(full, stored, flushed)
        return full, stored
    return keep


class ReplicaService:
    def __init__(self, peer: str, archives: dict, catalog, overlay, reactor):
        self.peer, self.archives, self.catalog = peer, archives, catalog
        self.overlay, self.reactor = overlay, reactor
        self.pending: dict[tuple, tuple] = {}      # (archive, uid, sha256) -> the first
        self.more: dict[tuple, list] = {}          # ... -> the others of those bytes
        self.lock = threading.Lock()               # both: push-port threads note copies
        self.dropping: dict[tuple, int] = {}       # keys whose bytes a drop is removing
        self.streams: dict[tuple, _Stream] = {}    # (link, stream id) -> data set arriving
        self.spares = self.push_server = self.tmpdir = None
        self.drainer = None          # transfer.drain.Drain, set by the cluster
        self.scrubber = None         # transfer.scrub.Scrub, set by the cluster
        self._janitor = task.LoopingCall(self._expire)
        self._janitor.clock = reactor

    def start(self):
        self._janitor.start(60, now=False)
        self.tmpdir = Path(self.overlay.bulk.tmpdir)
        self.spares = Spares(self.tmpdir, self.reactor, keep=8)
        o = self.overlay.o        # pushed copies' bytes: our push port, told in our Hello
        if o.push_port < 0:       # none: writers push to us over AMP, as to older peers
            return
        server = PushServer(
            self, self.reactor, server_context(o.tls_dir, self.peer), "push port",
            max_connections=PUSH_CONNECTIONS, handshake_timeout=o.handshake_timeout)
        try:                      # a fixed port taken: one line naming the key, as read_port
            self.push_server = server.listen(o.push_port, o.bind)
        except OSError as e:
            raise RuntimeError(f"overlay.push_port {o.push_port}: {e}") from e
        self.overlay.membership.push_port = self.push_server.port

    def stop(self):
        if self._janitor.running:
            self._janitor.stop()
        if self.push_server is not None:
            self.push_server.stopListening()
        if self.spares is not None:
            self.spares.stop()
        for key in list(self.streams):
            self._end_stream(key, complete=False)

    # -- pushed copies ---------------------------------------------------------------------
    def admit(self, archive: str, uid: str, meta_json: str):
        """(archive, InstanceMeta) for a pushed copy of *uid* to *archive*, all checked
        (any thread: reads only); raises InvalidArgument or ReplicaRefused."""
        check(uid=uid, archive=archive)
        target = self.archives.get(archive)
        if target is None or "store" not in target.capabilities:
            raise ReplicaRefused(f"peer {self.peer} has no writable archive {archive!r}")
        if self._draining(archive):
            raise ReplicaRefused(f"archive {archive} of peer {self.peer} is being drained: "
                                 "it takes no new copy")
        try:
            return target, InstanceMeta(**check_meta(json.loads(meta_json), uid))
        except (ValueError, TypeError) as e:
            raise ReplicaRefused(f"{uid}: unreadable header: {e}") from e

    def open_stream(self, link, stream: int, archive: str, uid: str, head: bytes,
                    meta_json: str):
        try:
            target, meta = self.admit(archive, uid, meta_json)
        except (InvalidArgument, ReplicaRefused) as e:
            return defer.fail(e)
        writer = link.peer_name
        incoming = Incoming(self.spares.take(), receive_pool(self.reactor), self.reactor,
                            head, link.pause_reading, link.resume_reading, coalesce=COALESCE)
        if "keep" in target.capabilities:       # kept by the thread that writes it
            after = _keeper(target, meta, len(head))
        else:
            after = lambda path, sha, size: (path, sha, size)   # noqa: E731
        s = self.streams[(link, stream)] = _Stream(incoming, defer.Deferred(), after)
        d = s.done.addCallback(self._stored_stream, target, uid, meta, len(head), writer)
        return d.addErrback(as_refusal, uid)

    def pushed(self, path, target, meta, head_size: int, sha: str, data_size: int,
               on_reactor, writer: str = "") -> dict:
        """Thread (``pushport``): the pushed copy written to *path* (then owned here)
        kept in *target* — by this thread if it can ``keep``, else by its ``store`` in
        the reactor (*on_reactor(fn, *args)* runs fn there) — and noted pending, here
        (no reactor turn per copy), before the writer (peer *writer*) can have its
        receipt. Raises ReplicaRefused."""
        uid = meta.sop_instance_uid
        try:
            if "keep" in target.capabilities:
                meta, stored = _keeper(target, meta, head_size)(path, sha, data_size)
            else:
                stored = on_reactor(self._stored_stream, (path, sha, data_size), target,
                                    uid, meta, head_size, None)
                meta = dataclasses.replace(meta, sha256=sha, data_size=data_size,
                                           size=head_size + data_size)
        except Exception as e:
            Path(path).unlink(missing_ok=True)
            raise ReplicaRefused(f"{uid}: {shown(str(e), 300)}") from e
        self._note((target.name, uid, stored.sha256), meta, stored, writer)
        return receipt(stored)

    def _note(self, key, meta, stored, writer: str) -> None:
        """Any thread: a pending copy (meta, stored) of *key*, made now for *writer*."""
        self._put(key, (meta, stored, self.reactor.seconds(), writer))

    def stream_data(self, link, stream: int, data: bytes) -> None:
        s = self.streams.get((link, stream))
        if s is not None:
            s.incoming.feed(data)

    def close_stream(self, link, stream: int, complete: bool) -> None:
        self._end_stream((link, stream), complete)

    def link_lost(self, link) -> None:
        for key in [k for k in self.streams if k[0] is link]:
            self._end_stream(key, complete=False)

    def _end_stream(self, key, complete: bool) -> None:
        s = self.streams.pop(key, None)
        if s is None:
            return
        if complete:
            s.incoming.finish(s.after).chainDeferred(s.done)
        else:
            s.incoming.discard()
            s.done.errback(ReplicaRefused(f"peer {self.peer}: the sender abandoned the "
                                          "data set"))

    @defer.inlineCallbacks
    def _stored_stream(self, written, target, uid, meta, head_size, writer):
        """The copy *written* kept in *target*; noted pending for peer *writer* (None:
        the caller notes it)."""
        if len(written) == 2:                   # kept already (``_keeper``)
            meta, stored = written
        else:
            path, sha, data_size = written
            meta = dataclasses.replace(meta, sha256=sha, data_size=data_size,
                                       size=head_size + data_size)
            try:
                stored = yield target.store(path, meta)
            finally:
                remove(receive_pool(self.reactor), path)
        if writer is not None:
            self._note((target.name, uid, stored.sha256), meta, stored, writer)
        return stored

    @defer.inlineCallbacks
    def replicate(self, sender: str, archive: str, uid: str, sha256: str, token: str,
                  meta_json: str | None = None):
        target = self.archives.get(archive)
        if target is None or "store" not in target.capabilities:
            raise ReplicaRefused(f"peer {self.peer} has no writable archive {archive!r}")
        if self._draining(archive):
            raise ReplicaRefused(f"archive {archive} of peer {self.peer} is being drained: "
                                 "it takes no new copy")
        member = self.overlay.membership.members.get(sender)
        if member is None:
            raise ReplicaRefused(f"peer {self.peer} does not know peer {sender!r}")
        if not meta_json and not (yield copy_allowed(self.catalog, uid)):
            raise ReplicaRefused(f"{uid} was deleted from the cluster: no copy of an old "
                                 "copy is kept")
        f = yield self.overlay.bulk.fetch_offer(member, token)
        try:
            path = Path(f.name)
            if meta_json and f.sha256:      # the sender parsed the header; we hashed
                meta = InstanceMeta(**check_meta(json.loads(meta_json), uid))
                if meta.sha256 and meta.sha256 != f.sha256:
                    raise ReplicaRefused(f"{uid}: the bytes received hash to "
                                         f"{f.sha256[:12]}, the sender's to "
                                         f"{meta.sha256[:12]}")
                meta = dataclasses.replace(meta, sha256=f.sha256, data_size=f.data_size,
                                           size=f.size)
            else:
                try:
                    meta = yield deferToThreadPool(self.reactor, self.overlay.pool,
                                                   read_meta, path)
                except BadDataset as e:
                    raise ReplicaRefused(f"{uid}: {e}") from e
            if meta.sop_instance_uid != uid:
                raise ReplicaRefused(f"offered {uid} but the bytes are {meta.sop_instance_uid}")
            stored = yield target.store(path, meta)
        finally:
            f.close()
        yield check_given(target, uid, stored, sha256, ReplicaRefused, "announced")
        self._note((archive, uid, stored.sha256), meta, stored, sender)
        return stored

    def _put(self, key, entry, first: bool = False) -> None:
        """One more pending copy *entry* (meta, stored, since, writer) of *key* (any
        thread), after the others (*first*: before). Raises ReplicaRefused for bytes there
        already (a duplicate) while a drop of *key* removes them (they would be named)."""
        with self.lock:
            if key in self.dropping and (entry[1].duplicate or entry[1].conflict):
                raise ReplicaRefused(f"{key[1]}: those bytes are being removed from "
                                     f"{key[0]} here; not kept")
            if key in self.pending and first:
                self.more.setdefault(key, []).insert(0, self.pending.pop(key))
            elif key in self.pending:
                self.more.setdefault(key, []).append(entry)
            self.pending.setdefault(key, entry)

    def _take(self, key, before: float | None = None, drop=lambda entry: False):
        """The oldest pending copy of *key* taken out (None if there is none, or if it
        was noted at *before* or later). One to be dropped (*drop(entry)*) hands the
        bytes it put there to the next copy of them (then it owns none). Looked at, taken
        and handed over under one lock: a push port's ``COMMIT`` may take either copy in
        between, and the next one, recorded, named bytes the drop then removed."""
        with self.lock:
            entry = self.pending.get(key)
            if entry is None or (before is not None and entry[2] >= before):
                return None
            del self.pending[key]
            others = self.more.get(key)
            if others:
                self.pending[key] = others.pop(0)
                if not others:
                    del self.more[key]
            if key in self.pending and drop(entry) and not (entry[1].duplicate or
                                                            entry[1].conflict):
                self.pending[key] = _owning(self.pending[key])
                entry = (entry[0], dataclasses.replace(entry[1], duplicate=True),
                         *entry[2:])
        return entry

    def commit(self, archive: str, uid: str, sha256: str):
        """``Commit``: Deferred[seq] of the pending copy recorded; ReplicaRefused if there
        is none, or if it was deleted since (then dropped); else the catalog's error,
        the copy pending again (``_back``), as a group commit's."""
        key = (archive, uid, sha256)
        entry = self._take(key)

        def failed(failure):
            if entry is not None and not failure.check(ReplicaRefused):
                self._back(key, entry)
            return failure
        return self._checked(key, entry).addCallback(self._record).addErrback(failed)

    def commits(self, copies):
        """``Commits`` (an AMP box, or a push port's ``COMMIT``): ``commit_all``, then
        Deferred[{"seqs": [...], "prevs": [...]}] (``Catalog.previous`` of each)."""
        return self.commit_all(copies).addCallback(lambda seqs: {
            "seqs": seqs, "prevs": [self.catalog.previous(q) if q else None for q in seqs]})

    def commit_all(self, copies):
        """``Commits``: record the pending copies *copies* [(archive, uid, sha256)] in
        one catalog batch (group commit); Deferred[[seq, or None if refused]]."""
        return self._commit_taken([(tuple(c), self._take(tuple(c))) for c in copies])

    def _commit_taken(self, taken):
        """``commit_all`` of the entries [(key, entry or None)] taken out of ``pending``."""
        def recorded(entries):
            with self.catalog.batch():
                done = [self._record(e).addErrback(self._not_kept, key, e) if e is not None
                        else defer.succeed(None) for e, (key, _) in zip(entries, taken)]
            return defer.gatherResults(done)
        return defer.gatherResults([self._checked(key, e).addErrback(self._not_kept, key, e)
                                    for key, e in taken]).addCallback(recorded)

    def commits_now(self, copies, on_reactor) -> dict:
        """Thread (``pushport``: a ``COMMIT``): ``commits``, the pending copies recorded
        by this thread in one transaction on the catalog writer's connection
        (``Catalog.record_all_now``, under its lock), not handed to the reactor, then to
        the writer thread and back twice; the reactor is told after (``committed_now``,
        not waited for). A copy of a conflict, or one made before a deletion learned
        since, goes through the reactor as before (*on_reactor(fn, *args)*)."""
        taken = [(tuple(c), self._take(tuple(c))) for c in copies]
        seqs: list = [None] * len(taken)
        fast = [i for i, (_, e) in enumerate(taken) if e is not None and not e[1].conflict
                and tombstones.no_news_since(clock.monotonic(self.reactor, e[2]))]
        late: set = set()

        def then(uid, since):
            def check(conn, seq):
                if tombstones.late_copy(conn, self.peer, uid, since):
                    late.add(seq)
            return check
        try:
            written = self.catalog.record_all_now([
                (meta, stored_location(meta, stored, self.peer),
                 then(meta.sop_instance_uid, clock.monotonic(self.reactor, since)))
                for meta, stored, since, _ in (taken[i][1] for i in fast)]) if fast else []
        except (sqlite3.Error, OSError) as e:     # (rolled back) pending again, refused
            log.error("catalog write of {n} commits failed: {err}", n=len(fast), err=e)
            for i in fast:
                self._back(*taken[i])
            written = [None] * len(fast)
        if any(written):
            self.reactor.callFromThread(self.catalog.committed_now,
                                        max(q for q in written if q), len(written))
        for i, seq in zip(fast, written):
            if seq in late:
                _refused(Failure(ReplicaRefused(f"{taken[i][0][1]} was deleted from the "
                                                "cluster after this copy was made: removed "
                                                "again")), taken[i][0])
            else:
                seqs[i] = seq
        for key, e in taken:
            if e is None:
                _refused(Failure(ReplicaRefused(f"no pending copy of {key[1]} on {key[0]}")),
                         key)
        slow = [i for i, (_, e) in enumerate(taken) if e is not None and i not in fast]
        if slow:
            for i, seq in zip(slow, on_reactor(self._commit_taken, [taken[i] for i in slow])):
                seqs[i] = seq
        return {"seqs": seqs, "prevs": [self.catalog.previous(q) if q else None for q in seqs]}

    @defer.inlineCallbacks
    def _checked(self, key, entry):
        """*entry*, taken out of ``pending`` for *key*: ReplicaRefused if it is None, or
        if it was deleted since it was made (then dropped)."""
        archive, uid, sha256 = key
        if entry is None:
            raise ReplicaRefused(f"no pending copy of {uid} on {archive}")
        meta, stored, since, _ = entry
        if (yield pushed_before(self.catalog, uid, clock.monotonic(self.reactor, since))):
            yield self._drop((archive, uid, sha256), entry)
            raise ReplicaRefused(f"{uid} was deleted from the cluster after this copy "
                                 "was made: not kept")
        return entry

    def _record(self, entry):
        """Deferred[seq, 0 for a conflict]: the pending copy *entry* (meta, stored, since,
        writer) recorded; ReplicaRefused if a deletion of it learned after *since* slipped
        in between ``_checked``'s check and this record (``tombstones.late_copy``, in
        the writer's transaction: the copy is then removed at once, as R2 does)."""
        meta, stored, since, _ = entry
        late, since = [], clock.monotonic(self.reactor, since)

        def check(conn, seq):
            if tombstones.late_copy(conn, self.peer, meta.sop_instance_uid, since):
                late.append(seq)

        def recorded(seq):
            if late:
                raise ReplicaRefused(f"{meta.sop_instance_uid} was deleted from the cluster "
                                     "after this copy was made: removed again")
            return seq or 0
        return record(self.catalog, meta, stored, self.peer, then=check).addCallback(recorded)

    def discard(self, archive: str, uid: str, sha256: str):
        key = (archive, uid, sha256)
        entry = self._take(key, drop=lambda entry: True)
        return defer.succeed(None) if entry is None else self._drop(key, entry)

    def _drop(self, key, entry):
        """Drop the pending copy *entry* of *key*, taken out: its bytes, if it put them
        there — unless another pending copy of them waits (then that one owns them) or
        the catalog records them here (one committed while this one was out: ``_back``)."""
        stored = entry[1]
        if stored.duplicate or stored.conflict:
            return defer.succeed(None)       # those bytes were there before: keep them
        with self.lock:
            if key in self.pending:
                self.pending[key] = _owning(self.pending[key])
                return defer.succeed(None)
            self.dropping[key] = self.dropping.get(key, 0) + 1   # (``_put``)
        archive, uid, sha256 = key
        named = self.catalog.read(lambda conn: conn.execute(_NAMED, (
            uid, self.peer, archive, sha256)).fetchone())
        return named.addCallback(lambda kept: None if kept else self.archives[archive]
                                 .discard(uid, sha256)).addBoth(self._dropped, key)

    def _dropped(self, result, key):
        with self.lock:
            self.dropping[key] -= 1
            if not self.dropping[key]:
                del self.dropping[key]
        return result

    @defer.inlineCallbacks
    def drop(self, archive: str, uid: str, sha256: str):
        """Remove a stand-in copy after hinted hand-off, and tell the cluster (tombstone)."""
        target = self.archives.get(archive)
        if target is None:
            raise ReplicaRefused(f"peer {self.peer} has no archive {archive!r}")
        yield target.discard(uid, sha256)
        yield self.catalog.forget(uid, archive, sha256)

    # -- drain and scrub -------------------------------------------------------------------
    def _draining(self, archive: str) -> bool:
        return self.drainer is not None and archive in self.drainer.state

    def drain(self, sender: str, names: list, stop: bool):
        """Another peer asks us to drain *names* (``pacsp2p drain`` run there)."""
        if self.drainer is None:
            return defer.fail(DrainRefused(f"peer {self.peer} cannot drain"))
        log.info("drain of {names} asked by peer {sender}", names=", ".join(names) or "all",
                 sender=sender)
        def refused(failure):
            failure.trap(ValueError)                  # DrainError: no such archive
            raise DrainRefused(str(failure.value)[:300])
        return self.drainer.begin(names, stop).addErrback(refused)

    def check_copy(self, sender: str, archive: str, uid: str, sha256: str) -> None:
        """*sender* read a damaged copy of ours: the scrub checks it (not taken on trust)."""
        if self.scrubber is not None and archive in self.archives:
            log.warn("peer {sender} read a damaged copy of {uid} on archive {archive}: "
                     "checking it", sender=sender, uid=uid, archive=archive)
            self.scrubber.suspect(Location(uid, archive, self.peer, sha256, 0))

    def tell_damaged(self, loc):
        """Tell the peer holding *loc* that its copy read back damaged. Deferred."""
        return defer.maybeDeferred(self.overlay.membership.call, loc.peer, CheckCopy,
                                   archive=loc.archive, uid=loc.sop_instance_uid,
                                   sha256=loc.sha256)

    def send_to(self, ae_title, host, port, calling_ae, originator_ae, originator_msg_id,
                uids, associations=1):
        """Direct delivery: send what our archives hold of *uids* to the destination
        (over up to *associations* associations)."""
        return send_for(self.catalog, self.archives, self.peer,
                        Destination(ae_title, host, port, associations=associations),
                        calling_ae, originator_ae,
                        originator_msg_id, uids, self.reactor)

    def _expire(self):
        """Every pending copy made before this peer learned of its instance's deletion
        dropped (``_deleted``), then every one older than ``PENDING_TTL``: dropped if its
        writer is alive, recorded if it was declared dead (the module's docstring)."""
        self._deleted().addErrback(lambda f: log.failure("pending copies of deleted "
                                                         "instances", f))
        before = self.reactor.seconds() - PENDING_TTL
        alive = lambda entry: self.overlay.membership.alive(entry[3])   # noqa: E731
        with self.lock:
            keys = list(self.pending)
        for key in keys:
            # the others of a key are in the order they came: every one too old goes
            old, dead = [], []
            while (entry := self._take(key, before, alive)) is not None:
                (old if alive(entry) else dead).append(entry)
            for entry in old:
                log.warn("dropping copy of {uid} on {archive}: its writer {writer} "
                         "neither committed nor discarded it", uid=key[1],
                         archive=key[0], writer=shown(str(entry[3])))
                self._drop(key, entry)
            for entry in dead:
                writer = entry[3]
                log.warn("recording copy of {uid} on {archive}: its writer {writer} was "
                         "declared dead before it committed (its Success may have gone "
                         "out)", uid=key[1], archive=key[0], writer=shown(str(writer)))
                self._checked(key, entry).addCallback(self._record).addErrback(
                    self._not_kept, key, entry)

    @defer.inlineCallbacks
    def _deleted(self):
        """Drop the pending copies made before this peer learned of their instance's
        deletion: a commit would refuse them (``_checked``), and their writer may send
        none (killed at once after its C-STOREs: the files stayed ``PENDING_TTL``)."""
        with self.lock:
            firsts = [(k, e[2]) for k, e in self.pending.items()
                      if not tombstones.no_news_since(clock.monotonic(self.reactor, e[2]))]
        for key, since in firsts:
            if (yield pushed_before(self.catalog, key[1], clock.monotonic(self.reactor,
                                                                          since))):
                entry = self._take(key, since + 1e-6, lambda entry: True)
                if entry is not None:
                    yield self._drop(key, entry)

    def _not_kept(self, failure, key, entry) -> None:
        """A copy taken out of ``pending`` not recorded: logged (None); a refusal (a
        deletion: dropped) stays so, else (the catalog failed) it is pending (``_back``)."""
        _refused(failure, key)
        if not failure.check(ReplicaRefused):
            self._back(key, entry)

    def _back(self, key, entry) -> None:
        """*entry*, taken out of ``pending`` but not recorded (the catalog failed), put
        back first, its place (it owns the bytes later copies found there): the next
        commit, a discard or ``PENDING_TTL`` takes it, as any other."""
        try:
            self._put(key, entry, first=True)
        except ReplicaRefused:          # its bytes are being removed: nothing to keep
            pass


def _owning(entry):
    """The pending copy *entry* (meta, stored, since, writer) as the owner of the bytes
    it names (not a duplicate: dropped, it removes them), as ``_drop`` hands them over."""
    return (entry[0], dataclasses.replace(entry[1], duplicate=False, conflict=False),
            *entry[2:])


def _refused(failure, copy):
    """A copy of a ``Commits`` not recorded: logged; None (its writer's hint stays)."""
    log.warn("commit of {uid} on {archive} refused: {err}", uid=shown(copy[1]),
             archive=copy[0], err=shown(failure.getErrorMessage(), 300))
