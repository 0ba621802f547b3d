"""The plan of a running retrieval, as the load-balancing hook sees it: the instances no
source has claimed yet (``Pending``, in the order the consumer wants them), which
sources hold and rank each one, and the statistics of each source (``Source``, named
``peer/archive``; ``readable``: whether this peer can read a copy now).

Work stealing (``strategies.balancing``) asks, for one source, "the pending instances
that rank this source highest, then the rarest, then in the consumer's order". A scan of
every pending instance per question made a retrieval quadratic (2,000 instances:
~2 million steps). ``PlanView.candidates`` answers from an index kept per source, a
bucket per (rank, holders) key, each bucket an ordered set (a priority queue by bucket,
as the piece picker of BitTorrent keeps pieces by rarity: Cohen, "Incentives build
robustness in BitTorrent", 2003), so a question costs what it returns. The index is
built on first use and kept up by ``take``, ``put_front`` and ``lose``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pacsp2p.flow import DEFAULT_MAX_FETCHES
from pacsp2p.types import InstanceRef


@dataclass
class Source:
    """One source of a retrieval: one archive of one peer (this one included), and its
    statistics."""

    name: str
    peer: str = ""
    archive: str = ""
    limit: int = DEFAULT_MAX_FETCHES      # fetches at once at most (its max_fetches)
    holds: set = field(default_factory=set)
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    missing: int = 0                  # of those failed: copies not held there (any more)
    bytes: int = 0
    started: float = 0.0
    busy: float = 0.0                 # seconds with at least one fetch running
    _since: float | None = None
    _turn: int = 0                    # when it was last given work (a counter)
    alive: bool = True
    error: str = ""

    @property
    def rate(self) -> float:
        """Bytes per second while it had work (0 until something arrived)."""
        return self.bytes / self.busy if self.completed and self.busy > 0 else 0.0


def source_name(peer: str, archive: str) -> str:
    """How a source is named in plans and status: ``peer/archive``."""
    return f"{peer}/{archive}"


def readable(loc, peer: str, archives: dict, overlay) -> bool:
    """Whether this peer (*peer*, its *archives*) can read the copy *loc* now: its archive
    is ours, up and can ``open``, or its peer is alive and does not say it is down."""
    if loc.peer == peer:
        archive = archives.get(loc.archive)
        return archive is not None and "open" in archive.capabilities and bool(archive.up)
    if overlay is None or not overlay.alive(loc.peer):
        return False
    member = getattr(overlay.membership, "members", {}).get(loc.peer)
    down = getattr(member.info, "archives_down", ()) if member is not None else ()
    return loc.archive not in (down or ())


class _Ordered:
    """An ordered set of keys with O(1) add, remove and move to the front: the ones put
    in front (latest first), then the others in the order they were added."""

    __slots__ = ("front", "rest")

    def __init__(self, items=()):
        self.front: dict = {}
        self.rest: dict = dict.fromkeys(items)

    def __len__(self):
        return len(self.front) + len(self.rest)

    def __contains__(self, key):
        return key in self.rest or key in self.front

    def __iter__(self):             # (not to be changed while iterated)
        yield from reversed(self.front)
        yield from self.rest

    def add(self, key, front: bool = False):
        if front:
            self.discard(key)
            self.front[key] = None
        elif key not in self.front:
            self.rest[key] = None

    def discard(self, key) -> bool:
        return self.rest.pop(key, 0) is None or self.front.pop(key, 0) is None


class Pending:
    """The instances no source has claimed, in the order they are wanted: a sequence of
    InstanceRef with O(1) ``in``, ``remove`` and ``insert(0, ref)`` (matched by SOP
    Instance UID)."""

    def __init__(self, refs=()):
        self._refs = {r.sop_instance_uid: r for r in refs}
        self._order = _Ordered(self._refs)

    def __len__(self):
        return len(self._refs)

    def __bool__(self):
        return bool(self._refs)

    def __contains__(self, ref):
        uid = getattr(ref, "sop_instance_uid", ref)
        return uid in self._refs

    def __iter__(self):
        refs = self._refs
        return iter([refs[u] for u in self._order])

    def __getitem__(self, i):
        return list(self)[i]

    def __repr__(self):
        return f"Pending({list(self)!r})"

    def get(self, uid: str) -> InstanceRef | None:
        return self._refs.get(uid)

    def append(self, ref):
        self._refs[ref.sop_instance_uid] = ref
        self._order.add(ref.sop_instance_uid)

    def insert(self, index: int, ref):
        """Only to the front (``index`` 0), as a retrieval re-queues what is wanted now."""
        if index != 0:
            raise ValueError("Pending.insert: only at the front (index 0)")
        self._refs[ref.sop_instance_uid] = ref
        self._order.add(ref.sop_instance_uid, front=True)

    def remove(self, ref):
        uid = getattr(ref, "sop_instance_uid", ref)
        if self._refs.pop(uid, None) is None:
            raise ValueError(f"{uid} is not pending")
        self._order.discard(uid)


class PlanView:
    """What the load-balancing hook sees of a running retrieval."""

    def __init__(self, refs):
        self.refs = refs
        self.pending = Pending(refs)                     # not claimed by any source
        self.in_flight: dict[str, set] = {}               # uid -> sources fetching it
        self.done: set[str] = set()
        self.holders: dict[str, set] = {}                 # uid -> live sources holding it
        self.ranking: dict[str, list] = {}                # uid -> the same, best first
        self.where: dict[str, dict] = {}                  # uid -> source -> Location
        self.sources: dict[str, Source] = {}
        self.memo: dict = {}                              # for strategies' own state
        sizes = [r.size for r in refs if r.size]
        self.avg_size = sum(sizes) / len(sizes) if sizes else 1 << 19
        self._by_uid = None
        self._index = None        # source -> {(rank, holders): _Ordered of uids}
        self._filed: dict[str, dict] = {}                 # uid -> {source: key}

    def ranked(self, uid: str) -> list[str]:
        """The live sources of *uid*, best first (replica selection's order)."""
        return self.ranking.get(uid, [])

    def in_flight_refs(self):
        if self._by_uid is None:
            self._by_uid = {r.sop_instance_uid: r for r in self.refs}
        by_uid = self._by_uid
        return [by_uid[u] for u in self.in_flight if self.in_flight[u]]

    # -- changes (keep the index) ----------------------------------------------------------
    def take(self, ref) -> None:
        """*ref* is claimed (or failed): no longer pending."""
        if ref in self.pending:
            self.pending.remove(ref)
            self._unfile(ref.sop_instance_uid)

    def put_front(self, ref) -> None:
        """*ref* is pending again, or wanted now: first in line."""
        self.pending.insert(0, ref)
        self._file(ref.sop_instance_uid, front=True)

    def lose(self, uid: str, name: str) -> None:
        """*name* no longer serves *uid*."""
        self.holders.get(uid, set()).discard(name)
        ranking = self.ranking.get(uid)
        if ranking and name in ranking:
            ranking.remove(name)
        if self._index is not None and uid in self.pending:
            self._file(uid, front=True)       # fewer holders: rarer, keys changed

    # -- the index -------------------------------------------------------------------------
    def candidates(self, name: str):
        """The pending instances source *name* holds, best first for it: those that rank
        it highest, then the rarest (fewest live holders), then in the order wanted."""
        if self._index is None:
            self._index = {}
            for ref in self.pending:
                self._file(ref.sop_instance_uid)
        buckets = self._index.get(name)
        if not buckets:
            return
        pending = self.pending
        for key in sorted(buckets):
            for uid in buckets[key]:
                ref = pending.get(uid)
                if ref is not None:
                    yield ref

    def _file(self, uid: str, front: bool = False) -> None:
        if self._index is None:
            return
        self._unfile(uid)
        holders = self.holders.get(uid, ())
        order = self.ranking.get(uid, ())
        filed = self._filed[uid] = {}
        for name in holders:
            rank = order.index(name) if name in order else len(order)
            key = (rank, len(holders))
            buckets = self._index.setdefault(name, {})
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Ordered()
            bucket.add(uid, front)
            filed[name] = key

    def _unfile(self, uid: str) -> None:
        filed = self._filed.pop(uid, None)
        if not filed:
            return
        for name, key in filed.items():
            buckets = self._index[name]
            bucket = buckets[key]
            bucket.discard(uid)
            if not bucket:
                del buckets[key]
