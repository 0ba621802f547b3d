"""Forwarding: push a C-STORE's data set to its remote replica holders while it arrives.

Without it a replicated write starts the remote copies only once the whole data set is
in, so every C-STORE costs the modality's transfer plus a second full transfer. Here, as
soon as the bytes received reach the pixel data (``header.sniff``), placement runs on
those attributes and each remote target of the first wave gets the data set pushed as it
arrives: on its push port (``pushport``: a thread per copy in flight sends it on a stdlib
TLS socket) or, to a peer whose Hello names none (an older release), on the overlay link
(``ReplicaOpen`` with the first bytes, ``ReplicaData``..., the last with ``end``;
``ReplicaClose`` if it is abandoned):
cut-through forwarding, as in the write pipelines of chain replication (van Renesse &
Schneider, OSDI 2004) and HDFS. The remote copy is then durable about when the writer's
own copy is. Quorum, commit and hand-off are unchanged (``ingest``); each holder hashes
what it received and the writer checks that against its own hash once complete. Pushed
bytes travel in boxes of ``BOX`` bytes whatever the fragments (four AMP values of 64 KB:
one box, TLS write and dispatch per 256 KB); the writer's own copy, when placement
wants one here, is kept by the thread that wrote the file, as ``OneJob`` does (no hop
to the archive's pool).

Memory stays bounded: while the link's send buffer is full the association is paused
(TCP back-pressure end to end; the holder pauses the link while its disk lags). A data set that cannot
be sniffed (deflated, ISO 2022 character set, header over ``SNIFF_MAX``) is placed
whole, after it is complete, and copied from the bulk channel as before.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.catalog.db import stored_location
from pacsp2p.catalog.facts import STAMP, stamped
from pacsp2p.dicom.header import BadDataset, sniff
from pacsp2p.overlay.commands import (ReplicaClose, ReplicaData, ReplicaOpen,
                                      ReplicaRefused)
from pacsp2p.transfer import recorded
from pacsp2p.transfer.commits import one_recorded
from pacsp2p.transfer.session import StoreSession
from pacsp2p.types import InstanceInfo

log = Logger()

SNIFF_MAX = 256 << 10        # header bytes looked at before giving up on early placement
VALUE = 65000                # bytes per AMP value (it holds at most 65,535)
BOX = 4 * VALUE              # bytes per ReplicaData: its data, more1, more2, more3

_streams = itertools.count(1)
_counted = threading.Lock()     # (``Ingest.durable_in_thread``, counted by threads)


class Push:
    """One target's copy of a data set still arriving, pushed on our overlay link to it.

    ``answer`` is a Deferred of the target's ``ReplicaOpen`` answer (the copy is
    durable); it fails if the link is lost, the target refuses, or ``abort`` is called.
    ``ReplicaOpen`` goes with the first box of bytes (a small data set: the whole of it,
    one box). While the link's send buffer is full the association is paused.
    """

    def __init__(self, link, archive: str, uid: str, head: bytes, meta_json: str,
                 pause, resume):
        self.link, self.pause, self.resume = link, pause, resume
        self.stream = next(_streams)
        self.paused = self.closed = False
        self.buffer = bytearray()        # bytes not yet sent: less than one BOX
        self.opening = {"stream": self.stream, "archive": archive, "uid": uid,
                        "head": head, "meta": meta_json}     # sent with the first bytes
        link.pushers.add(self)
        if link.full:
            self.link_full()
        self.answer = defer.Deferred()
        self.answer.addErrback(self._failed)

    def feed(self, piece) -> None:
        """Send *piece* on, in boxes of BOX bytes: the fragments of a C-STORE (a PDV each,
        often 16 KB) are gathered first, so that a box, its TLS write and the holder's
        dispatch are paid per 256 KB, not per fragment."""
        if self.closed:
            return
        buf = self.buffer
        buf += piece
        if len(buf) < BOX:
            return
        view, end = memoryview(buf), len(buf) - len(buf) % BOX
        for i in range(0, end, BOX):
            self._send(view[i:i + BOX])
        rest = bytes(view[end:])
        view.release()
        self.buffer = bytearray(rest)

    def finish(self) -> None:
        """The data set is complete: its last bytes go in a box that says so (``end``:
        no ReplicaClose box after it)."""
        if self.closed:
            return
        data, self.buffer = self.buffer, bytearray()
        self._send(data, end=True)
        self.closed = True
        self._detach()

    def _send(self, data, end: bool = False) -> None:
        """One box of *data* (at most BOX bytes), in values of VALUE bytes; to a holder
        whose Hello did not say it takes more (``link.values`` 1: a peer of protocol 5
        before ``REPLICA_VALUES``, which drops the others), one box per value and none
        in ``ReplicaOpen``."""
        values = [bytes(data[i:i + VALUE]) for i in range(0, len(data), VALUE)] or [b""]
        boxes = [values] if self.link.values >= len(values) else [[v] for v in values]
        if self.opening is not None:
            args, self.opening = self.opening, None
            if not self.link.open:
                self.answer.errback(ReplicaRefused("the overlay link was lost"))
                return
            if self.link.values > 1:
                first = boxes.pop(0)
                args.update(end=end and not boxes, **_named(first))   # the last box ends
            self.link.callRemote(ReplicaOpen, **args).chainDeferred(self.answer)
        for i, box in enumerate(boxes, 1):
            if self.link.open:
                self.link.callRemote(ReplicaData, stream=self.stream,
                                     end=end and i == len(boxes), **_named(box))

    # -- the link's send buffer ----------------------------------------------------------
    def link_full(self):
        if not self.paused and not self.closed:
            self.paused = True
            self.pause()

    def link_drained(self):
        if self.paused:
            self.paused = False
            self.resume()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.opening is not None:          # nothing sent yet
            self.opening = None
            self.answer.errback(ReplicaRefused("the data set was abandoned"))
        elif self.link.open:
            self.link.callRemote(ReplicaClose, stream=self.stream, complete=False)
        self._detach()

    def _failed(self, failure):
        self.closed = True               # refused or link lost: send no more
        self._detach()
        return failure

    def _detach(self):
        self.link.pushers.discard(self)
        self.link_drained()


def _named(values: list) -> dict:
    """A box's values as its arguments: *data*, *more1*, ..."""
    return {"data": values[0], **{f"more{n}": v for n, v in enumerate(values[1:], 1)}}


def _drop_kept(archive, uid: str, stored) -> None:
    """Reactor: drop our own copy *stored* of *uid* again (unless it was there before:
    a duplicate or a conflict), errors logged."""
    if not (stored.duplicate or stored.conflict):
        archive.discard(uid, stored.sha256).addErrback(
            lambda f: log.warn("dropping a copy failed: {err}", err=f.getErrorMessage()))


def drop_all(copies) -> defer.Deferred:
    """Have each Deferred[_Copy] that succeeds drop its copy (errors logged); fires once
    every drop is answered (never fails)."""
    copies = list(copies)
    for d in copies:
        d.addCallbacks(lambda copy: defer.maybeDeferred(copy.discard).addErrback(
            lambda f: log.warn("dropping a copy failed: {err}", err=f.getErrorMessage())),
            lambda _: None)
    return defer.DeferredList(copies)


class Forward(StoreSession):
    """Early placement and pushes for one C-STORE (reactor side): a StoreSession.

    ``feed`` every data set fragment, then ``complete`` once it is whole, or ``abort``.
    After placement, ``ranked`` is the placement's answer and ``early`` maps each remote
    target of the first wave, ``(peer, archive)``, to its Deferred[_Copy].
    """

    def __init__(self, ingest, uid: str, sop_class: str, transfer_syntax: str, head: bytes,
                 pause, resume):
        super().__init__(ingest)
        self.uid, self.sop_class, self.ts = uid, sop_class, transfer_syntax
        self.head, self.pause, self.resume = head, pause, resume
        self.prefix: list | None = []
        self.seen = self.tried = 0
        self.ranked = self.attributes = None
        self.early: dict[tuple, defer.Deferred] = {}
        self.pushes: list[Push] = []
        self.keeper = self.flushed = None     # our archive of the first wave that keeps
        # the first wave is one archive of ours and pushes to all the others: our copy is
        # recorded by the writer thread (``seq``), Success sent by the thread that sees
        # the last part done (``durable_now``), the rest left to ``recorded.store``
        self.remotes: list = []                # its remote targets (a push each)
        self.seq = self.meta = None            # our fact, recorded in the writer thread
        self.fast = False                      # every part done and hashed as ours
        self.remote_only = False               # the first wave: pushes only
        self._left, self._given, self._then = 0, {}, None
        self._lock = threading.Lock()

    def feed(self, piece) -> None:
        if self.pushes:
            for push in self.pushes:
                push.feed(piece)
        elif self.prefix is not None:
            self.prefix.append(piece)
            self.seen += len(piece)
            if self.seen >= 2 * self.tried:      # not on every fragment: linear overall
                self.tried = self.seen
                self._sniff()

    streams = True

    def complete(self) -> None:
        if self.prefix is not None and self.ranked is None:
            self._sniff(complete=True)           # e.g. an object without pixel data
        self.prefix = None
        for push in self.pushes:
            push.finish()

    def abort(self) -> None:
        """The data set is not kept: no target keeps a copy either."""
        self.prefix = None
        for push in self.pushes:
            push.abort()
        drop_all(self.early.values())
        self.early = {}
        kept, self.kept = self.kept, None
        if kept is not None:
            _drop_kept(self.keeper, self.uid, kept)

    # -- the writer thread: our own copy kept where it was written (as ``OneJob`` does) --
    def written(self, path) -> None:
        """The file is complete: if placement put a copy on an archive of ours that can
        ``keep``, make it durable here and now (no hop to the archive's pool: pushing to
        the other holders goes on meanwhile)."""
        if self.ranked is None:
            return
        for target in self.ingest.first_wave(self.ranked):
            archive = self.ingest.archives.get(target.name)
            if target.peer == self.ingest.peer and archive is not None and \
                    {"keep", "open"} <= archive.capabilities:
                self.keeper, self.flushed = archive, archive.begin_flush(path, now=True)
                return

    def header_read(self, path, meta) -> None:
        """Its header is read: keep the file in that archive (one thread job, no hop to
        the archive's pool and back), durable before this returns. Not if the header
        reads otherwise than the first bytes did (placed again once complete, from the
        file). Raises OSError (the C-STORE then fails with Out of Resources)."""
        if self.remote_only and meta.attributes == self.attributes:
            self.meta = meta                   # (``_part_done``: our hash)
        if self.keeper is None:
            return
        if meta.attributes != self.attributes:
            self.abandon()
            return
        kept = self.keeper.keep(path, meta)
        try:
            self.keeper.made_durable(meta, kept, self.flushed)
        except OSError:
            self.ingest.reactor.callFromThread(_drop_kept, self.keeper,
                                               meta.sop_instance_uid, kept)
            raise
        self.kept = kept
        if self.remotes and not kept.conflict:
            self._record(meta, kept)

    def _record(self, meta, kept) -> None:
        """Writer thread: our copy recorded here and now, with a hint for each remote copy
        of the first wave (committed after the answer, in a group commit), as
        ``Ingest.store`` records it in the reactor; left to it if the catalog fails."""
        ingest = self.ingest
        keys = [(self.uid, t.peer, t.name) for t in self.remotes]
        ingest.committing.update(keys)         # hand-off leaves these hints alone
        try:
            self.seq = ingest.catalog.record_now(
                stamped(meta, self.stamp), stored_location(meta, kept, ingest.peer),
                [(t.peer, t.name, "", "") for t in self.remotes])
        except Exception as e:
            ingest.committing.difference_update(keys)
            log.warn("C-STORE {uid}: recording in the writer thread failed ({err}); "
                     "recorded from the reactor", uid=self.uid, err=e)
            return
        self.meta = meta

    def written_then(self, path, rest, fd=None, then=None):
        """As ``StoreSession.written_then``; *then* is called by the thread that finishes
        the last part — this one, or the ``push-send`` thread that reads the last
        pushed copy's answer (``durable_now`` is known there)."""
        self.written(path)
        result = rest()
        if then is not None:
            if self._left:
                self._then = (then, result)
                self._part_done()
            else:
                then(result)
        return result

    def _pushed(self, target, answer, committed=None) -> None:
        """``push-send`` thread: *target*'s copy is durable (pending) there — and, if
        the first wave is pushes only, recorded there by its ``COMMIT_LAST``
        (*committed*: the holder's answer)."""
        recorded = not self.remote_only or one_recorded(committed) is not None
        self._given[(target.peer, target.name)] = \
            answer.get("given") or answer.get("sha256") if recorded else None
        self._part_done()

    def _part_done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        meta = self.meta
        self.fast = (self.seq is not None or self.remote_only) and meta is not None and \
            bool(meta.sha256) and all(self._given.get((t.peer, t.name)) == meta.sha256
                                      for t in self.remotes)
        if self.fast:
            with _counted:
                self.ingest.durable_in_thread += 1
        if self._then is not None:
            then, result = self._then
            then(result)

    def durable_now(self) -> bool:
        return self.fast

    def store(self, path, meta):
        if self.seq is not None:
            return recorded.store(self, path, meta)
        if self.remote_only and self.kept is None:
            return recorded.store_remote(self, path, meta)
        return self.ingest.store(path, meta, self)

    def abandon(self) -> None:
        """Not kept here after all: let the fsync begun finish."""
        if self.flushed is not None:
            try:
                self.flushed()
            except OSError:
                pass
        self.keeper = self.flushed = None

    def _sniff(self, complete: bool = False) -> None:
        try:
            attrs = sniff(b"".join(self.prefix), self.ts, complete)
        except BadDataset:
            attrs, self.seen = None, SNIFF_MAX + 1
        if attrs is None:
            if self.seen > SNIFF_MAX:
                self.prefix = None             # placed once complete, as before
            return
        info = InstanceInfo(self.uid, self.sop_class, attrs.get("StudyInstanceUID", ""),
                            attrs.get("SeriesInstanceUID", ""), attrs.get("Modality", ""),
                            0, attrs)
        prefix, self.prefix = self.prefix, None
        meta_json = json.dumps({"sop_instance_uid": self.uid, "sop_class_uid": self.sop_class,
                                "transfer_syntax_uid": self.ts,
                                "attributes": {**attrs, STAMP: self.stamp}})
        if len(meta_json) > 60000:
            return                             # too big for an AMP value: copied later
        try:
            self.ranked = self.ingest.rank(info)
        except Exception:
            return                             # raised again, and reported, at the end
        self.attributes = attrs
        for target in self.ingest.first_wave(self.ranked):
            link = self.ingest.link_to(target.peer)
            if link is None:
                continue                       # copied the old way once complete
            if link.push_port and self.ingest.pushes is not None:   # its push port
                push = self.ingest.pushes.open(
                    target.peer, self.ingest.host_of(target.peer, link), link.push_port,
                    target.name, self.uid, self.head, meta_json, self.pause, self.resume)
            else:                              # a peer of an older release: over AMP
                push = Push(link, target.name, self.uid, self.head, meta_json, self.pause,
                            self.resume)
            for piece in prefix:
                push.feed(piece)
            self.pushes.append(push)
            self.early[(target.peer, target.name)] = push.answer.addCallback(
                lambda answer, target=target, push=push: self.ingest.remote_copy(
                    target, self.uid, answer, getattr(push, "committed", None)))
        self._arm()

    def _arm(self) -> None:
        """Reactor, placed: the first wave R copies, every one placement's choice (nothing
        owed), pushes to all its remote targets and at most one archive of ours: ``remotes``
        (``recorded`` finishes the store). With one of ours (the writer thread keeps
        the copy there) the writer thread records our copy, and the threads count the
        parts (``_part_done``)."""
        ingest = self.ingest
        wave = ingest.first_wave(self.ranked)
        remotes = [t for t in wave if t.peer != ingest.peer]
        # (a wave short of R copies goes the general way: ``Ingest._owe`` owes the rest)
        if wave != self.ranked[:ingest.replicas] or len(wave) - len(remotes) > 1 or \
                len(wave) < ingest.replicas or not remotes or \
                len(self.early) != len(remotes) or len(self.pushes) != len(remotes):
            return
        self.remotes = remotes
        if len(wave) == len(remotes):
            self.remote_only = True            # none of ours: ``recorded.store_remote``
            for push, target in zip(self.pushes, remotes):   # commits behind the copies
                link = ingest.link_to(target.peer)          # (``pushport.COMMIT_LAST``)
                push.pipelined = hasattr(push, "verdict") and link is not None and \
                    link.commit_last
            if not all(push.pipelined for push in self.pushes):
                return
        if all(hasattr(push, "in_thread") for push in self.pushes):   # push ports
            self._left = 1 + len(remotes)      # (an older holder answers over AMP)
            for push, target in zip(self.pushes, remotes):
                push.in_thread = functools.partial(self._pushed, target)
