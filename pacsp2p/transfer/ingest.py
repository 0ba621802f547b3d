"""Ingest: keep a received instance on R archives of distinct peers, then acknowledge.

1. The placement strategy ranks every archive of the cluster for this instance — as soon
   as its first bytes are in (``forward``), else once it is complete; one of our archives
   first while it holds no more than its share (``_local_first``: HDFS's first replica on
   the writer's node) where a built-in strategy ranked it (``[strategies] first_copy``).
2. The first R alive ones get a copy in parallel (local: the archive's atomic write;
   remote: pushed on the overlay link while the data set arrives (``forward``), or
   fetched by the peer from our bulk channel once complete (``replicas``)); one that
   fails is replaced by the next in rank.
3. If at least ``write_quorum`` copies are durable they are committed (recorded in the
   catalogs) and the facade answers Success — remote records may finish after the
   answer, each covered by a hint recorded with our own copy, and go to each holder in
   batches (``commits``: group commit); otherwise every copy is dropped and the C-STORE
   fails with 0xA700: the modality keeps its copy and retries.
   A peer alone with one archive that can ``keep`` does all of it in the thread that
   wrote the data set (``OneJob``). A second copy here of a file the writer thread kept
   in one of our archives (more copies than live peers) reads it back (``_Source``).
4. A preferred archive that was down or failed is owed a copy (a hint, kept locally):
   hinted hand-off (Dynamo, DeCandia et al., SOSP 2007) makes it when its peer and it
   are back (``_up``), then the stand-in that took the copy meanwhile drops its own (a
   tombstone fact tells the cluster). A copy owed to no archive in particular (the
   writer knew too few archives) is made as soon as placement finds one.

Retrying the same instance is idempotent: same UID and bytes is a duplicate, same UID
and other bytes is a conflict — both kept, logged and counted in ``pacsp2p status``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pacsp2p.catalog.facts import new_stamp, stamped
from pacsp2p.dicom.admission import shared_limit
from pacsp2p.dicom.incoming import receive_pool, remove, spool
from pacsp2p.dicom.status import OUT_OF_RESOURCES, PROCESSING_FAILURE
from pacsp2p.overlay.commands import Commit, Discard, Drop, Replicate
from pacsp2p.overlay.swimparts import DEAD
from pacsp2p.strategies import StrategyError
from pacsp2p.strategies.placement import LOCAL_FIRST, local_first
from pacsp2p.tally import Tally
from pacsp2p.transfer.commits import GroupCommits, one_recorded
from pacsp2p.transfer.forward import Forward, drop_all
from pacsp2p.transfer.onejob import OneJob, unrecorded
from pacsp2p.transfer.pushport import Pushes
from pacsp2p.transfer.recorded import as_recorded
from pacsp2p.transfer.durable import check_given, copy_in, record
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.transfer.session import Plain, StoreSession
from pacsp2p.types import (ArchiveInfo, InstanceInfo, Location, Query, Stored, StoreError,
                           StoreResult)

log = Logger()



class _Copy:
    """A durable, not yet recorded, copy on one archive: ``commit(meta, hints, later)``
    records it (*later*: nothing waits for it; a remote one goes in a group commit)."""

    def __init__(self, target: ArchiveInfo, stored, commit, discard):
        self.target, self.stored, self.commit, self.discard = target, stored, commit, discard


class _Offer:
    """The received file offered on our bulk channel to the peers that fetch a copy:
    published (a one-time token, the header as JSON) only when one is asked to."""

    def __init__(self, offers: dict, received, meta, opener=None):
        self.offers, self.received, self.meta = offers, received, meta
        self.opener = opener or (lambda: deferToThread(open, self.received, "rb"))
        self.token = self.meta_json = None

    def publish(self) -> tuple[str, str]:
        if self.token is None:
            self.token = secrets.token_urlsafe(16)
            self.offers[self.token] = self.opener
            self.meta_json = json.dumps(dataclasses.asdict(self.meta))
        return self.token, self.meta_json

    def withdraw(self) -> None:
        if self.token is not None:
            self.offers.pop(self.token, None)


class _Source:
    """What a copy on one of our archives is made from: the received file, or, once the
    writer thread kept it in one of our archives (which took the file: ``Forward``), a
    spool of that kept copy read back (*opener*), made in ``incoming`` the first time
    another archive of ours wants a copy (placement puts two copies on one peer when
    copies outnumber live peers), hashed again by the archive that takes it and removed
    once the copies are placed (``release``)."""

    def __init__(self, received, opener=None, reactor=None):
        self.received, self.opener, self.reactor = Path(received), opener, reactor
        self.spooled = None                    # Deferred[Path], once one was wanted

    def path(self) -> defer.Deferred:
        if self.opener is None:
            return defer.succeed(self.received)
        if self.spooled is None:
            self.spooled = defer.maybeDeferred(self.opener).addCallback(
                lambda f: deferToThreadPool(self.reactor, receive_pool(self.reactor),
                                            spool, f, self.received.parent))
        d = defer.Deferred()

        def fire(result):
            (d.errback if isinstance(result, Failure) else d.callback)(result)
            return result
        self.spooled.addBoth(fire)
        return d

    def release(self) -> None:
        if self.spooled is not None:
            self.spooled.addCallbacks(lambda p: remove(receive_pool(self.reactor), p),
                                      lambda _: None)


class Ingest:
    def __init__(self, settings, archives: dict, catalog, strategies, overlay=None,
                 reactor=None):
        self.peer, self.site = settings.peer.name, None
        self.replicas, self.quorum = settings.cluster.replicas, settings.cluster.write_quorum
        self.archives = {n: a for n, a in archives.items() if "store" in a.capabilities}
        self.catalog, self.strategies, self.overlay = catalog, strategies, overlay
        self.reactor = reactor
        self.tmpdir = Path(settings.data_dir) / "incoming"
        # token -> opener, served on our bulk channel's /incoming
        self.offers: dict[str, object] = overlay.offers if overlay is not None else {}
        self.counts: dict = {}
        # copies made: on our own archives, pushed while arriving, fetched once complete
        self.copies = {"local": 0, "pushed": 0, "fetched": 0}
        self.recorded_in_thread = 0       # replicated stores recorded so (``recorded``)
        self.commits_behind = 0           # pushed copies recorded by a COMMIT_LAST
        self.durable_in_thread = 0        # C-STOREs a thread found done (``Forward``)
        # [strategies] first_copy: instances ranked with one of our archives first, and
        # those the balance guard left in placement's order (``_local_first``)
        self.first_copy, self.slack = (settings.strategies.first_copy,
                                       settings.strategies.first_copy_slack)
        self.first = {"local": 0, "guarded": 0}
        self.committing: set[tuple] = set()      # (uid, peer, archive) commits running
        self.drain_here: set[str] = set()         # our archives being drained (drain.py)
        # the remote commits a write does not wait for, sent per holder in batches
        self.group = GroupCommits(overlay, reactor, push=self._push_commits) \
            if overlay is not None else None
        # the writer's connections to the holders' push ports (``pushport``)
        self.pushes = Pushes(settings.overlay.tls_dir, self.peer, reactor) \
            if overlay is not None and settings.overlay is not None else None
        self._loops = []

    def start(self):
        if self.overlay is None:
            return
        if self.pushes is not None:     # a holder declared dead: its copies placed again
            self.overlay.membership.on_change.append(
                lambda member, state: state == DEAD and self.pushes.cut(member.name))
        for fn, every in ((self._refresh_counts, 10.0), (self.hand_off, 3.0)):
            loop = task.LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(every, now=True).addErrback(
                lambda f: log.failure("ingest background task failed", f))
            self._loops.append(loop)

    def stop(self):
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.group is not None:
            self.group.stop()
        if self.pushes is not None:
            self.pushes.stop()

    @defer.inlineCallbacks
    def _refresh_counts(self):
        self.counts = yield self.catalog.archive_counts()

    # -- the cluster's archives ------------------------------------------------------
    def draining(self) -> set[tuple]:
        """(peer, archive) being drained (``transfer.drain``; this peer's, and those other
        peers' member records name): placement sends nothing there."""
        out = {(self.peer, name) for name in self.drain_here}
        if self.overlay is not None:
            for m in self.overlay.membership.members.values():
                out |= {(m.name, name) for name in getattr(m.info, "draining", None) or ()}
        return out

    def candidates(self, draining: bool = False) -> list[ArchiveInfo]:
        """The archives placement may choose from: not those being drained (unless
        *draining*: every archive, e.g. to list them)."""
        out = [ArchiveInfo(name, self.peer, a.site, a.up, True,
                           self.counts.get((self.peer, name), 0))
               for name, a in self.archives.items()
               if draining or name not in self.drain_here]
        if self.overlay is not None:
            for m in self.overlay.membership.members.values():
                down = set(getattr(m.info, "archives_down", ()) or ())
                drained = () if draining else getattr(m.info, "draining", None) or ()
                for name, site, *_ in m.info.archives:
                    if name in drained:
                        continue
                    out.append(ArchiveInfo(name, m.name, site,
                                           m.state == "alive" and name not in down, False,
                                           self.counts.get((m.name, name), 0)))
        return out

    def rank(self, info: InstanceInfo) -> list[ArchiveInfo]:
        """Every archive of the cluster, best first, for a new instance *info* (raises
        StrategyError); one of ours first with ``first_copy = "local"``, and with
        ``"auto"`` (the default) where a built-in of ``placement.LOCAL_FIRST`` ranked it."""
        ranked, by = self.strategies.place_named(info, self.candidates(), self.replicas)
        local = self.first_copy == "local" or (
            self.first_copy == "auto" and by in LOCAL_FIRST)
        return self._local_first(ranked) if local else ranked

    def _local_first(self, ranked: list[ArchiveInfo]) -> list[ArchiveInfo]:
        """*ranked* with the first of our alive archives in it that holds at most
        (1 + slack) x the mean count of the alive candidates put first, the others after
        it by the rule of distinct copies (``placement.local_first``); if none of ours
        does (the balance guard: every modality sends here), *ranked* as it is. Only a
        new instance's copies go so: repair and trimming keep placement's own order."""
        alive = [a for a in ranked if a.alive]
        mine = [a for a in alive if a.peer == self.peer]
        if not mine:
            return ranked
        limit = sum(a.instances for a in alive) / len(alive) * (1 + self.slack)
        local = next((a for a in mine if a.instances <= limit), None)
        self.first["guarded" if local is None else "local"] += 1
        return ranked if local is None else local_first(
            ranked, local, getattr(self.strategies, "placement", "") == "site-aware")

    def first_wave(self, ranked) -> list[ArchiveInfo]:
        return [r for r in ranked if r.alive][:self.replicas]

    def begin(self, uid, sop_class, transfer_syntax, head, pause, resume) -> StoreSession:
        """For a C-STORE starting: a Forward (remote holders get the data set as it
        arrives), a OneJob (alone, with one archive that can ``keep``), or a Plain."""
        if self.overlay is not None:
            return Forward(self, uid, sop_class, transfer_syntax, head, pause, resume)
        if len(self.archives) == 1 and self.replicas == 1 and self.quorum <= 1:
            archive = next(iter(self.archives.values()))
            if "keep" in archive.capabilities:
                return OneJob(self, archive)
        return Plain(self)

    # -- store -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def store(self, received, meta, session=None):
        """Keep the received file on R archives (see the module docstring); *session*,
        the StoreSession ``begin`` made for it, if any."""
        forward = session if isinstance(session, Forward) else None
        a = meta.attributes
        info = InstanceInfo(meta.sop_instance_uid, meta.sop_class_uid,
                            a.get("StudyInstanceUID", ""), a.get("SeriesInstanceUID", ""),
                            a.get("Modality", ""), meta.size, a)
        early = {}
        if forward is not None and forward.ranked is not None:
            ranked, early, forward.early = forward.ranked, forward.early, {}
            if forward.attributes != a:        # read on from the first bytes: not the same
                # dropped before they are copied again: a holder would take the pushed
                # copy, with the first bytes' attributes, for the new one's commit
                yield drop_all(early.values())
                early = {}
        else:
            try:
                ranked = self.rank(info)
            except StrategyError as e:
                log.error("C-STORE {uid}: {err}", uid=meta.sop_instance_uid, err=e)
                raise StoreError(PROCESSING_FAILURE, str(e))
        # what every holder records its rows with (the pushes of a Forward carry it)
        meta = stamped(meta, getattr(session, "stamp", 0) or new_stamp())
        opener = None
        if forward is not None and forward.kept is not None:   # kept by the writer thread
            archive, kept = forward.keeper, forward.kept
            target = next(t for t in ranked if (t.peer, t.name) == (self.peer, archive.name))
            copy = self._local_copy(target, archive, meta, kept, defer.succeed(None))
            if forward.seq is not None:        # and recorded there (``recorded``)
                copy = as_recorded(copy, self.catalog, archive, meta, kept)
            early[(self.peer, archive.name)] = defer.succeed(copy)
            opener = lambda: archive.open(meta.sop_instance_uid, kept.sha256)  # noqa: E731
        offer = _Offer(self.offers, received, meta, opener)
        source = _Source(received, opener, self.reactor)
        try:
            copies = yield self._place(ranked, source, meta, offer, early)
        finally:
            offer.withdraw()
            source.release()
        if len(copies) < self.quorum:
            yield defer.DeferredList([defer.maybeDeferred(c.discard) for c in copies],
                                     consumeErrors=True)
            alive = sum(1 for r in ranked if r.alive)
            raise StoreError(OUT_OF_RESOURCES,
                             f"{meta.sop_instance_uid}: {len(copies)} of the {self.quorum} "
                             f"copies required could be made ({alive} archive(s) alive)")
        # Remote copies are durable already: their commits (records) need not delay the
        # answer, provided a local copy is recorded here — a C-FIND or C-MOVE at this
        # facade right after the C-STORE must find the instance — together with a hint
        # for each remote commit still running: should this peer die before one is done,
        # hinted hand-off redoes it (the holder drops a copy never committed).
        local = [c for c in copies if c.target.peer == self.peer]
        later = [c for c in copies if c.target.peer != self.peer] if local else []
        now = [c for c in copies if c not in later]
        owed = [(c.target.peer, c.target.name, "", "") for c in later]
        results = yield defer.DeferredList(
            [defer.maybeDeferred(c.commit, meta, owed) for c in now], consumeErrors=True)
        kept = [c for c, (ok, _) in zip(now, results) if ok]
        for c, (ok, err) in zip(now, results):
            if not ok:
                self._commit_failed(err, c, meta.sop_instance_uid)
        if not kept or len(kept) + len(later) < self.quorum:
            raise StoreError(OUT_OF_RESOURCES, f"{meta.sop_instance_uid}: copies made but "
                                               f"only {len(kept)} could be recorded")
        for c in later:
            key = (meta.sop_instance_uid, c.target.peer, c.target.name)
            self.committing.add(key)                 # hand-off leaves these alone
            d = defer.maybeDeferred(c.commit, meta, (), True)    # in a group commit
            d.addCallback(lambda _, key=key: self.catalog.drop_hint(*key))
            d.addErrback(self._commit_failed, c, meta.sop_instance_uid, owed=True)
            d.addBoth(lambda _, key=key: self.committing.discard(key))
        kept += later
        if self.overlay is not None:
            yield self._owe(meta.sop_instance_uid, ranked, kept)
        return StoreResult(meta.sop_instance_uid, tuple(c.stored for c in kept))

    def _commit_failed(self, failure, copy, uid, owed=False):
        """A durable copy could not be recorded. One committed after the answer (*owed*:
        its hint stays, so hinted hand-off redoes the copy — a duplicate there — and
        records it) is a warning: nothing is lost, a holder that died mid-stream says
        so for each copy in flight."""
        (log.warn if owed else log.error)(
            "commit of {uid} on {archive}@{peer} failed: {err}{then}", uid=uid,
            archive=copy.target.name, peer=copy.target.peer, err=failure.getErrorMessage(),
            then="; its hint stays: hinted hand-off makes the copy again" if owed else "")

    def _owe(self, uid, ranked, kept):
        """Hints for the copies this write could not put where placement wanted them."""
        placed = [(c.target.peer, c.target.name) for c in kept]
        wanted = [(r.peer, r.name) for r in ranked[:self.replicas]]
        owed = [w for w in wanted if w not in placed]
        standins = [p for p in placed if p not in wanted]
        hints = [(peer, archive, *(standins[i] if i < len(standins) else ("", "")))
                 for i, (peer, archive) in enumerate(owed)]
        # copies owed to no archive in particular: the cluster knew too few archives
        short = self.replicas - len(placed) - len(owed)
        hints += [("*", str(n), "", "") for n in range(max(0, short))]
        return self.catalog.add_hints(uid, hints) if hints else defer.succeed(None)

    @defer.inlineCallbacks
    def _place(self, ranked, source, meta, offer, early):
        alive = [r for r in ranked if r.alive]
        copies, i = [], 0
        while len(copies) < self.replicas and i < len(alive):
            wave = alive[i:i + self.replicas - len(copies)]
            i += len(wave)
            results = yield defer.DeferredList(
                [self._early(early.pop((t.peer, t.name)), t, meta) if (t.peer, t.name) in early
                 else self._copy(t, source, meta, offer) for t in wave],
                consumeErrors=True)
            for target, (ok, value) in zip(wave, results):
                if ok:
                    copies.append(value)
                else:
                    shared_limit(log, self.reactor)(     # a target refusing every copy
                        "copy failed", LogLevel.warn,
                        "copy of {uid} to {archive}@{peer} failed: {err}",
                        uid=meta.sop_instance_uid, archive=target.name, peer=target.peer,
                        err=value.getErrorMessage())
        drop_all(early.values())               # targets no longer wanted
        return copies

    def _early(self, d, target, meta):
        """The copy pushed while the data set arrived: check it holds the same bytes
        (else drop it)."""
        def check(copy):
            if meta.sha256 and copy.stored.given_sha256 != meta.sha256:
                drop_all([defer.succeed(copy)])
                raise StoreError(PROCESSING_FAILURE,
                                 f"{meta.sop_instance_uid}: the copy on {target.name}@"
                                 f"{target.peer} hashes to {copy.stored.given_sha256[:12]}, "
                                 f"received {meta.sha256[:12]}")
            self.copies["local" if target.peer == self.peer else "pushed"] += 1
            return copy
        return d.addCallback(check)

    def _copy(self, target: ArchiveInfo, source, meta, offer) -> defer.Deferred:
        kind = "local" if target.peer == self.peer else "fetched"
        d = source.path().addCallback(lambda path: self._copy_local(
            target, path, meta, source.opener is not None)) if kind == "local" else \
            self.copy_remote(target, meta.sop_instance_uid, *offer.publish())

        def count(copy):
            self.copies[kind] += 1
            return copy
        return d.addCallback(count)

    @defer.inlineCallbacks
    def _copy_local(self, target, received, meta, read_back: bool = False):
        """Deferred[_Copy] on our archive *target*; *read_back*: *received* holds our
        kept copy read back (hashed again and checked)."""
        archive = self.archives[target.name]
        given = dataclasses.replace(meta, sha256="") if read_back else meta
        unsynced = "store_unsynced" in archive.capabilities   # recorded while it fsyncs
        stored = yield (archive.store_unsynced if unsynced else archive.store)(received,
                                                                              given)
        if read_back:
            yield check_given(archive, meta.sop_instance_uid, stored, meta.sha256,
                              lambda why: StoreError(PROCESSING_FAILURE, why), "received")
        synced = archive.sync(meta.sop_instance_uid, stored) if unsynced else \
            defer.succeed(None)
        return self._local_copy(target, archive, meta, stored, synced)

    def _local_copy(self, target, archive, meta, stored, synced) -> _Copy:
        """The _Copy of *stored* on our *archive*, durable once *synced* fires."""
        fresh = not (stored.duplicate or stored.conflict)

        def commit(meta, hints=(), later=False):
            recorded = record(self.catalog, meta, stored, self.peer, hints)
            recorded.addErrback(unrecorded, archive, meta, stored)
            return defer.gatherResults([recorded, synced], consumeErrors=True)
        synced.addErrback(lambda f: log.error("fsync of {uid} failed: {err}",
                                              uid=meta.sop_instance_uid,
                                              err=f.getErrorMessage()) or f)
        return _Copy(target, stored, commit=commit,
                     discard=lambda: archive.discard(meta.sop_instance_uid, stored.sha256)
                     if fresh else None)

    def _push_commits(self, peer: str, copies: str):
        """A ``Commits`` to *peer* on its push port (``pushport.COMMIT``), or None if
        it takes none there (an older release; no push port): then over AMP."""
        link = self.link_to(peer) if self.pushes is not None else None
        if link is None or not link.push_commits:
            return None
        return self.pushes.commit(peer, self.host_of(peer, link), link.push_port, copies)

    def link_to(self, peer: str):
        """Our open overlay link to *peer*, or None."""
        member = self.overlay.membership.members.get(peer)
        link = member.link if member is not None else None
        return link if link is not None and link.open else None

    def host_of(self, peer: str, link) -> str:
        """The address of *peer*'s ports (as its bulk channel is reached)."""
        member = self.overlay.membership.members.get(peer)
        return (member.host if member is not None else "") or link.address.host

    def copy_remote(self, target, uid, token, meta_json):
        """Deferred[_Copy]: *target*'s peer keeps a pending copy of the offer *token*."""
        d = self.overlay.membership.call(target.peer, Replicate, archive=target.name,
                                         uid=uid, sha256="", token=token, meta=meta_json)
        return d.addCallback(lambda answer: self.remote_copy(target, uid, answer))

    def remote_copy(self, target, uid, answer, committed=None) -> _Copy:
        """The _Copy of a pending copy *target*'s peer made (its Replicate answer);
        *committed*: the holder's answer to its commit sent behind the copy
        (``pushport.COMMIT_LAST``), if one was: its record, else committed as before."""
        m = self.overlay.membership
        sha = answer["sha256"]                    # hashed there while it stored the bytes
        args = {"archive": target.name, "uid": uid, "sha256": sha}
        behind = [one_recorded(committed)]

        def commit(meta, hints=(), later=False):
            # waited for (no copy of ours): at once, with what is queued for that peer
            def learn(done):
                location = Location(uid, target.name, target.peer, sha, answer["size"])
                if not self.catalog.learn(target.peer, done["seq"], meta, location,
                                          done.get("prev")):
                    self.overlay.sync_from(target.peer)  # not the next one: pull in order
            done, behind[0] = behind[0], None
            if done is None:
                return self.group.commit(target.peer, **args, now=not later).addCallback(
                    learn)
            self.commits_behind += 1
            return defer.maybeDeferred(learn, done)

        stored = Stored(target.name, sha, answer["size"], answer["duplicate"],
                        answer["conflict"], answer.get("given") or "")
        return _Copy(target, stored, commit=commit,
                     discard=lambda: m.call(target.peer, Discard, **args))

    # -- hinted hand-off -------------------------------------------------------------
    @defer.inlineCallbacks
    def hand_off(self):
        """Make the copies owed to archives whose peers are back (moving a stand-in's copy
        back: once the owed copy is made, the stand-in drops its own), and the copies owed
        to no archive in particular as soon as one can take them."""
        hints = yield self.catalog.hints()
        tally = Tally()                 # one log line for the batch, not one per instance
        try:
            for uid, peer, archive, via_peer, via_archive in hints:
                if peer != "*" and not self._up(peer, archive) or \
                        (uid, peer, archive) in self.committing:
                    continue                    # not back yet: its peer or archive down
                try:
                    done = yield self._hand_off_one(uid, peer, archive, via_peer,
                                                    via_archive, tally)
                except Exception as e:
                    tally.add(f"failed to {archive}@{peer}", uid, str(e))
                    continue
                if done:
                    yield self.catalog.drop_hint(uid, peer, archive)
        finally:
            if tally:
                failed = any(k.startswith("failed") for k in tally.counts)
                (log.warn if failed else log.info)(
                    "hinted hand-off: {summary}", summary=tally.summary())

    def _up(self, peer: str, archive: str) -> bool:
        """*archive* of *peer* may take an owed copy (up; its peer alive, not saying it down:
        a hung one held every hint behind it its timeout, one by one)."""
        if peer == self.peer:
            return getattr(self.archives.get(archive), "up", True)
        m = self.overlay.membership.members.get(peer)
        return m is not None and self.overlay.alive(peer) and \
            archive not in (m.info.archives_down or ())

    @defer.inlineCallbacks
    def _hand_off_one(self, uid, peer, archive, via_peer, via_archive, tally):
        refs = yield self.catalog.resolve(Query("IMAGE", {"SOPInstanceUID": uid}))
        if not refs:
            return True                                 # nothing left to copy
        ref = refs[0]
        have = {(loc.peer, loc.archive) for loc in ref.locations}
        if (peer, archive) in self.draining() or \
                peer == self.peer and archive not in self.archives:
            peer = "*"                      # owed to an archive being drained, or gone
        if peer == "*":
            if len(have) >= self.replicas:
                return True                             # it got its copies meanwhile
            target = yield self._any_target(ref, have)
            if target is None:
                return False                            # still no archive to take it
            peer, archive = target
        if (peer, archive) not in have:
            yield (self._copy_here if peer == self.peer else self._copy_to)(ref, peer,
                                                                           archive)
            have.add((peer, archive))
            tally.add(f"copied to {archive}@{peer}", uid)
        if via_peer and (via_peer, via_archive) in have and len(have) - 1 >= self.replicas:
            yield self._drop_standin(uid, via_peer, via_archive, ref)
            tally.add(f"stand-in copies dropped from {via_archive}@{via_peer}", uid)
        return True

    def _any_target(self, ref, have):
        info = InstanceInfo(ref.sop_instance_uid, ref.sop_class_uid, "", "", "", ref.size)
        ranked = self.strategies.place(info, self.candidates(), self.replicas)
        for t in ranked:
            if t.alive and (t.peer, t.name) not in have and t.peer != self.peer:
                return defer.succeed((t.peer, t.name))
        return defer.succeed(None)

    @defer.inlineCallbacks
    def _drop_standin(self, uid, peer, archive, ref):
        sha = next((loc.sha256 for loc in ref.locations
                    if (loc.peer, loc.archive) == (peer, archive)), "")
        if peer == self.peer:
            yield self.archives[archive].discard(uid, sha)
            yield self.catalog.forget(uid, archive, sha)
        else:
            yield self.overlay.membership.call(peer, Drop, archive=archive, uid=uid,
                                               sha256=sha)
            self.overlay.sync_from(peer)

    @defer.inlineCallbacks
    def _copy_here(self, ref, peer, archive):
        """Copy an instance the cluster holds to our own archive *archive* (the bytes as
        a retrieval reads them: checked against the catalog there)."""
        source = Retrieval([ref], self.archives, self.peer, self.overlay, reactor=self.reactor)
        try:
            f = yield source.open(ref)
        finally:
            source.cancel()
        yield copy_in(f, self.archives[archive], ref.sop_instance_uid, "",
                      self.tmpdir, self.catalog, self.peer)

    @defer.inlineCallbacks
    def _copy_to(self, ref, peer, archive):
        """Copy an instance the cluster holds to archive *archive* of another peer."""
        source = Retrieval([ref], self.archives, self.peer, self.overlay, reactor=self.reactor)
        token = secrets.token_urlsafe(16)
        self.offers[token] = lambda: source.open(ref)
        try:
            m = self.overlay.membership
            answer = yield m.call(peer, Replicate, archive=archive, uid=ref.sop_instance_uid,
                                  sha256="", token=token)
            yield m.call(peer, Commit, archive=archive, uid=ref.sop_instance_uid,
                         sha256=answer["sha256"])
            self.overlay.sync_from(peer)
        finally:
            self.offers.pop(token, None)
            source.cancel()
