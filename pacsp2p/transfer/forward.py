"""Forwarding: push a C-STORE's data set to its remote replica holders while it arrives.

Without it a replicated write starts the remote copies only once the whole data set is
in, so every C-STORE costs the modality's transfer plus a second full transfer. Here, as
soon as the bytes received reach the pixel data (``header.sniff``), placement runs on
those attributes and each remote target of the first wave gets the data set pushed on
the overlay link as it arrives (``ReplicaOpen``, ``ReplicaData``..., ``ReplicaClose``):
cut-through forwarding, as in the write pipelines of chain replication (van Renesse &
Schneider, OSDI 2004) and HDFS. The remote copy is then durable about when the writer's
own copy is. Quorum, commit and hand-off are unchanged (``ingest``); each holder hashes
what it received and the writer checks that against its own hash once complete.

Memory stays bounded: while the link's send buffer is full the association is paused
(TCP back-pressure end to end; the holder pauses the link while its disk lags). A data set that cannot
be sniffed (deflated, ISO 2022 character set, header over ``SNIFF_MAX``) is placed
whole, after it is complete, and copied from the bulk channel as before.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.dicom.header import BadDataset, sniff
from pacsp2p.overlay.commands import ReplicaClose, ReplicaData, ReplicaOpen
from pacsp2p.transfer.session import StoreSession
from pacsp2p.types import InstanceInfo, InstanceMeta

log = Logger()

SNIFF_MAX = 256 << 10        # header bytes looked at before giving up on early placement
BOX = 65000                  # bytes per ReplicaData (an AMP value holds at most 65,535)

_streams = itertools.count(1)


class Push:
    """One target's copy of a data set still arriving, pushed on our overlay link to it.

    ``answer`` is a Deferred of the target's ``ReplicaOpen`` answer (the copy is
    durable); it fails if the link is lost, the target refuses, or ``abort`` is called.
    While the link's send buffer is full the association is paused.
    """

    def __init__(self, link, archive: str, uid: str, head: bytes, meta_json: str,
                 pause, resume):
        self.link, self.pause, self.resume = link, pause, resume
        self.stream = next(_streams)
        self.paused = self.closed = False
        link.pushers.add(self)
        if link.full:
            self.link_full()
        self.answer = link.callRemote(ReplicaOpen, stream=self.stream, archive=archive,
                                      uid=uid, head=head, meta=meta_json)
        self.answer.addErrback(self._failed)

    def feed(self, piece) -> None:
        if self.closed:
            return
        for i in range(0, len(piece), BOX):
            self.link.callRemote(ReplicaData, stream=self.stream,
                                 data=bytes(piece[i:i + BOX]))

    def finish(self) -> None:
        self._close(True)

    def abort(self) -> None:
        self._close(False)

    # -- the link's send buffer ----------------------------------------------------------
    def link_full(self):
        if not self.paused and not self.closed:
            self.paused = True
            self.pause()

    def link_drained(self):
        if self.paused:
            self.paused = False
            self.resume()

    def _close(self, complete: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.link.open:
            self.link.callRemote(ReplicaClose, stream=self.stream, complete=complete)
        self._detach()

    def _failed(self, failure):
        self.closed = True               # refused or link lost: send no more
        self._detach()
        return failure

    def _detach(self):
        self.link.pushers.discard(self)
        self.link_drained()


def drop_all(copies) -> None:
    """Have each Deferred[_Copy] that succeeds drop its copy (errors logged)."""
    for d in copies:
        d.addCallbacks(lambda copy: defer.maybeDeferred(copy.discard).addErrback(
            lambda f: log.warn("dropping a copy failed: {err}", err=f.getErrorMessage())),
            lambda _: None)


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
        meta_json = json.dumps(dataclasses.asdict(
            InstanceMeta(self.uid, self.sop_class, self.ts, attrs)))
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
            push = Push(link, target.name, self.uid, self.head, meta_json, self.pause,
                        self.resume)
            for piece in prefix:
                push.feed(piece)
            self.pushes.append(push)
            self.early[(target.peer, target.name)] = push.answer.addCallback(
                lambda answer, target=target: self.ingest.remote_copy(target, self.uid,
                                                                      answer))
