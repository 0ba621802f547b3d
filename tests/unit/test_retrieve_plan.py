"""Retrieval (pacsp2p.transfer.retrieve) with the built-in balancers, deterministically.

No sockets, no sleeps: the reactor is a ``twisted.internet.task.Clock`` the tests advance,
archives are in-memory objects whose ``open(uid, sha)`` returns a Deferred that either the
Clock (a per-archive latency) or the test itself fires. This peer is "me" with one local
archive; other peers are reached through a fake overlay whose ``fetch(location)`` opens
the same kind of in-memory archive (the seam Retrieval already has: ``overlay.fetch``,
``overlay.alive``, ``overlay.membership.on_change``).

Every file's bytes name the instance AND the peer that served it, so a test can tell
which copy a consumer got.
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock

from pacsp2p.strategies import Strategies, hookimpl
from pacsp2p.transfer import retrieve
from pacsp2p.transfer.retrieve import Retrieval, Unavailable
from pacsp2p.types import InstanceRef, Location

ME = "me"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SIZE = 100_000


# -- fakes ------------------------------------------------------------------------------

def sha_of(uid: str) -> str:
    """The catalog's hash of instance *uid* in these tests (a copy carries it: checked)."""
    return hashlib.sha256(uid.encode()).hexdigest()


class File(io.BytesIO):
    """A served instance: its bytes say which peer served which UID; hashed on its way
    in (``sha256``), as a copy from the bulk channel is."""

    def __init__(self, uid: str, peer: str):
        super().__init__(f"{uid}@{peer}".encode())
        self.uid, self.peer = uid, peer
        self.sha256 = sha_of(uid)


@dataclass
class Request:
    uid: str
    deferred: defer.Deferred
    cancelled: bool = False


class MemArchive:
    """An archive of one peer: open() -> Deferred[File], fired by the Clock after
    *latency* seconds, or left to the test when *latency* is None."""

    capabilities = frozenset({"open"})
    up = True

    def __init__(self, peer: str, clock: Clock, latency: float | None = None,
                 name: str = "local"):
        self.peer, self.clock, self.latency, self.name = peer, clock, latency, name
        self.requests: list[Request] = []
        self.errors: dict[str, Exception] = {}    # uid -> exception to fail with
        self.files: list[File] = []

    def open(self, uid: str, sha256: str | None = None) -> defer.Deferred:
        def cancel(d):
            req.cancelled = True
        req = Request(uid, defer.Deferred(canceller=cancel))
        self.requests.append(req)
        if self.latency is not None:
            self.clock.callLater(self.latency, self.answer, req)
        return req.deferred

    def answer(self, req: Request) -> File | None:
        """Fire *req* (a file, or the configured error); returns the file."""
        if req.deferred.called:
            return None
        if req.uid in self.errors:
            req.deferred.errback(self.errors[req.uid])
            return None
        f = File(req.uid, self.peer)
        self.files.append(f)
        req.deferred.callback(f)
        return f

    def fail(self, req: Request, exc: Exception) -> None:
        req.deferred.errback(exc)

    def open_requests(self) -> list[Request]:
        return [r for r in self.requests if not r.deferred.called]

    def uids(self) -> list[str]:
        return [r.uid for r in self.requests]


class FakeMembership:
    def __init__(self):
        self.on_change: list = []


@dataclass
class FakeMember:
    name: str


class FakeOverlay:
    """Other peers: alive(peer), fetch(location) -> that peer's archive.open()."""

    def __init__(self, peers: dict[str, MemArchive]):
        self.peers = peers
        self.dead: set[str] = set()
        self.membership = FakeMembership()

    def alive(self, peer: str) -> bool:
        return peer in self.peers and peer not in self.dead

    def fetch(self, location):
        return self.peers[location.peer].open(location.sop_instance_uid, location.sha256)

    def mark_dead(self, peer: str) -> None:
        self.dead.add(peer)
        for callback in list(self.membership.on_change):
            callback(FakeMember(peer), "dead")


def make_refs(n: int, holders, prefix: str = "1.2.3") -> list[InstanceRef]:
    """*n* instances; holders(i) -> the peers holding instance i."""
    refs = []
    for i in range(n):
        uid = f"{prefix}.{i + 1}"
        locs = tuple(Location(uid, "local", peer, sha_of(uid), SIZE) for peer in holders(i))
        refs.append(InstanceRef(uid, CT, EXPLICIT, SIZE, locs))
    return refs


class Prefer:
    """A selection plugin ranking replicas by their peer's place in *order*."""

    name = "prefer"

    def __init__(self, order):
        self.order = list(order)
        self.calls = 0

    @hookimpl
    def pacsp2p_rank_replicas(self, instance, locations, reader):
        self.calls += 1
        return sorted(locations, key=lambda loc: self.order.index(loc.peer))


def setup(refs, peers: dict[str, MemArchive], balancing: str = "work-stealing",
          prefer=None, **kw):
    """A Retrieval at peer "me" (its archive is peers["me"], if any); *prefer*: the
    peers in the order replica selection should rank them (default: ``nearest``)."""
    clock = next(iter(peers.values())).clock
    local = {"local": peers[ME]} if ME in peers else {}
    overlay = FakeOverlay({p: a for p, a in peers.items() if p != ME})
    plugins = [Prefer(prefer)] if prefer else []
    r = Retrieval(refs, local, ME, overlay,
                  Strategies(balancing=balancing, peer=ME, plugins=plugins),
                  reactor=clock, **kw)
    return r, overlay


class Consumer:
    """Opens refs in *order*, at most *window* at a time (like Delivery: 3); keeps what
    each open() gave (bytes) or its failure."""

    def __init__(self, retrieval, order, window: int = 3):
        self.retrieval = retrieval
        self.queue = list(order)
        self.window = window
        self.got: dict[str, bytes] = {}
        self.files: dict[str, File] = {}
        self.failed: dict[str, Exception] = {}
        self.count = len(self.queue)

    def start(self) -> "Consumer":
        for _ in range(self.window):
            self._next()
        return self

    @property
    def finished(self) -> bool:
        return len(self.got) + len(self.failed) == self.count

    def _next(self) -> None:
        if not self.queue:
            return
        ref = self.queue.pop(0)
        d = self.retrieval.open(ref)
        d.addCallbacks(self._ok, self._err, callbackArgs=(ref,), errbackArgs=(ref,))

    def _ok(self, f, ref) -> None:
        uid = ref.sop_instance_uid
        assert uid not in self.got and uid not in self.failed, f"{uid} delivered twice"
        assert not f.closed, f"{uid}: the consumer was handed a closed file"
        self.got[uid] = f.read()
        self.files[uid] = f
        f.close()
        self._next()

    def _err(self, failure, ref) -> None:
        uid = ref.sop_instance_uid
        assert uid not in self.got and uid not in self.failed, f"{uid} delivered twice"
        self.failed[uid] = failure.value
        self._next()


def run(clock: Clock, done, step: float = 0.01, limit: float = 600.0) -> float:
    """Advance the clock by *step* until done() (bounded in simulated seconds)."""
    t = 0.0
    clock.advance(0)
    while not done():
        assert t < limit, f"not done after {limit} simulated seconds"
        clock.advance(step)
        t += step
    return t


def served_by(got: dict[str, bytes]) -> dict[str, str]:
    """{uid: peer whose copy the consumer got}."""
    out = {}
    for uid, data in got.items():
        u, peer = data.decode().split("@")
        assert u == uid, f"asked for {uid}, got the bytes of {u}"
        out[uid] = peer
    return out


# -- the tests --------------------------------------------------------------------------

@pytest.mark.parametrize("balancing", ["work-stealing", "single"])
@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled 1", "shuffled 2",
                                   "all at once"])
def test_every_instance_delivered_exactly_once_in_any_consumer_order(balancing, order):
    clock = Clock()
    peers = {ME: MemArchive(ME, clock, 0.03), "peerb": MemArchive("peerb", clock, 0.05),
             "peerc": MemArchive("peerc", clock, 0.02)}
    names = sorted(peers)
    # instance i on two of the three peers (round robin), a few on one only
    refs = make_refs(90, lambda i: [names[i % 3]] if i % 15 == 0
                     else [names[i % 3], names[(i + 1) % 3]])
    r, _ = setup(refs, peers, balancing)
    sequence = list(refs)
    if order == "reversed":
        sequence.reverse()
    elif order.startswith("shuffled"):
        random.Random(int(order[-1])).shuffle(sequence)
    consumer = Consumer(r, sequence, window=len(refs) if order == "all at once" else 3)
    consumer.start()
    run(clock, lambda: consumer.finished)

    assert consumer.failed == {}
    assert set(consumer.got) == {ref.sop_instance_uid for ref in refs}
    holders = {ref.sop_instance_uid: {loc.peer for loc in ref.locations} for ref in refs}
    for uid, peer in served_by(consumer.got).items():
        assert peer in holders[uid], f"{uid} served by {peer}, not one of its holders"
    status = r.status()
    assert status["done"] == len(refs) and status["pending"] == 0
    assert sum(s["completed"] for s in status["sources"].values()) == len(refs)
    # every file a source produced was either handed out or closed (endgame losers)
    handed = {id(f) for f in consumer.files.values()}
    for archive in peers.values():
        for f in archive.files:
            assert id(f) in handed or f.closed, f"{f.uid}@{f.peer} leaked (not closed)"
    # opening the same instance twice is refused
    with pytest.raises(ValueError):
        _raise(r.open(refs[0]))


def _raise(d: defer.Deferred):
    failures = []
    d.addErrback(failures.append)
    assert failures, "a second open() of the same instance succeeded"
    failures[0].raiseException()


def test_a_fast_source_serves_more_than_a_slow_one():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock, 0.02),     # ~5 MB/s per fetch
             "peerc": MemArchive("peerc", clock, 0.40)}     # 20 times slower
    refs = make_refs(200, lambda i: ["peerb", "peerc"])
    r, _ = setup(refs, peers, "work-stealing")
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished)

    assert consumer.failed == {} and len(consumer.got) == len(refs)
    served = served_by(consumer.got)
    fast = sum(p == "peerb" for p in served.values())
    slow = sum(p == "peerc" for p in served.values())
    print(f"\nfast source served {fast}, slow source {slow}")
    assert slow > 0, "the slow source was never used (no parallelism)"
    assert fast >= 3 * slow, f"fast source served {fast}, slow one {slow}"
    src = r.plan.sources
    assert src["peerb/local"].rate > 5 * src["peerc/local"].rate > 0
    st = r.status()["sources"]
    assert st["peerb/local"]["completed"] == fast and st["peerc/local"]["completed"] == slow
    assert st["peerb/local"]["MB_per_s"] > st["peerc/local"]["MB_per_s"]


def test_endgame_duplicates_the_last_in_flight_instance_and_the_first_copy_wins():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock), "peerc": MemArchive("peerc", clock)}
    refs = make_refs(2, lambda i: ["peerb", "peerc"])
    r, _ = setup(refs, peers, "work-stealing")
    consumer = Consumer(r, refs, window=2).start()
    clock.advance(0)
    # unmeasured sources start with one instance each
    b, c = peers["peerb"], peers["peerc"]
    assert len(b.requests) == 1 and len(c.requests) == 1
    assert {b.requests[0].uid, c.requests[0].uid} == {ref.sop_instance_uid for ref in refs}

    # peerb answers first: nothing is left unclaimed, so peerb also asks for the
    # instance peerc is still fetching (endgame)
    clock.advance(0.5)
    b.answer(b.requests[0])
    clock.advance(0)
    last = c.requests[0].uid
    assert [q.uid for q in b.open_requests()] == [last], "no endgame duplicate on peerb"

    # peerb's copy arrives first and wins; peerc's late copy is closed, not handed out
    winner = b.answer(b.open_requests()[0])
    clock.advance(0)
    assert consumer.finished and consumer.failed == {}
    assert served_by(consumer.got)[last] == "peerb"
    loser = c.answer(c.requests[0])
    clock.advance(0)
    assert loser.closed, "the endgame's second copy was not closed"
    assert consumer.files[last] is winner
    assert r.status()["sources"]["peerc/local"]["completed"] == 0
    assert r.status()["done"] == 2 and r.status()["duplicates"] == 1


def test_the_endgame_waits_until_a_source_has_nothing_of_its_own_in_flight():
    """A second copy shares the helper's link with its own last fetches: at K=3 the
    sources filled every free slot with them (~24 of 300 instances fetched twice, every
    source's end slowed); a source now helps only once idle, one instance at a time."""
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock), "peerc": MemArchive("peerc", clock)}
    refs = make_refs(3, lambda i: ["peerb", "peerc"])
    r, _ = setup(refs, peers, "work-stealing", per_source=2)
    consumer = Consumer(r, refs, window=3).start()
    clock.advance(0)
    b, c = peers["peerb"], peers["peerc"]
    assert len(b.requests) == 1 and len(c.requests) == 1      # unmeasured: one each
    slow = c.requests[0].uid
    clock.advance(0.01)
    b.answer(b.requests[0])                 # measured fast: takes the last pending one
    clock.advance(0)
    own = [q.uid for q in b.open_requests()]
    assert len(own) == 1 and own[0] != slow, own
    assert slow not in b.uids(), "a source with its own fetch in flight took a second copy"
    b.answer(b.open_requests()[0])          # now idle: helps with peerc's, one at a time
    clock.advance(0)
    assert [q.uid for q in b.open_requests()] == [slow]
    b.answer(b.open_requests()[0])
    clock.advance(0)
    assert consumer.finished and consumer.failed == {} and r.status()["duplicates"] == 0
    c.answer(c.requests[0])                 # peerc's late copy: closed, counted
    clock.advance(0)
    assert r.status()["duplicates"] == 1


def test_a_source_failing_midway_hands_its_instances_to_the_other_holder():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock, 0.05), "peerc": MemArchive("peerc", clock, 0.05)}
    refs = make_refs(60, lambda i: ["peerb", "peerc"])
    r, _ = setup(refs, peers, "work-stealing")
    consumer = Consumer(r, refs).start()
    run(clock, lambda: len(consumer.got) >= 15)
    b = peers["peerb"]
    assert b.open_requests(), "peerb has nothing in flight to lose"
    served_before = sum(p == "peerb" for p in served_by(consumer.got).values())
    b.latency = None                                # from now on peerb answers nothing...
    for req in b.open_requests():                   # ...and its connection is lost
        b.fail(req, error.ConnectionLost("bulk connection lost"))
    asked_after = len(b.requests)
    run(clock, lambda: consumer.finished)

    assert consumer.failed == {}
    assert set(consumer.got) == {ref.sop_instance_uid for ref in refs}
    served = served_by(consumer.got)
    assert sum(p == "peerb" for p in served.values()) == served_before
    assert len(b.requests) == asked_after, "a dropped source was asked again"
    st = r.status()["sources"]
    assert st["peerb/local"]["alive"] is False and "lost" in st["peerb/local"]["error"]
    assert st["peerc/local"]["alive"] is True
    assert st["peerc/local"]["completed"] == len(refs) - served_before


def test_a_peer_the_overlay_marks_dead_is_dropped():
    clock = Clock()
    peers = {ME: MemArchive(ME, clock, 0.05), "peerb": MemArchive("peerb", clock, 0.05)}
    refs = make_refs(40, lambda i: [ME, "peerb"])
    r, overlay = setup(refs, peers, "work-stealing")
    consumer = Consumer(r, refs).start()
    run(clock, lambda: len(consumer.got) >= 10)
    peers["peerb"].latency = None                   # it hangs, then the overlay says dead
    overlay.mark_dead("peerb")
    asked = len(peers["peerb"].requests)
    run(clock, lambda: consumer.finished, limit=STALL_LIMIT)
    assert consumer.failed == {} and len(consumer.got) == len(refs)
    assert len(peers["peerb"].requests) == asked
    st = r.status()["sources"]["peerb/local"]
    assert st["alive"] is False and "dead" in st["error"]


STALL_LIMIT = 5.0      # simulated seconds: well before the 20 s stall timer


def test_an_instance_whose_only_holder_fails_is_unavailable_naming_its_uid():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock), "peerc": MemArchive("peerc", clock, 0.05)}
    refs = make_refs(6, lambda i: ["peerb"] if i in (1, 4) else ["peerb", "peerc"])
    only_b = {refs[1].sop_instance_uid, refs[4].sop_instance_uid}
    r, _ = setup(refs, peers, "single", prefer=["peerb", "peerc"])   # peerb ranks first
    consumer = Consumer(r, refs, window=6).start()
    clock.advance(0)
    b = peers["peerb"]
    assert b.requests, "peerb was asked for nothing"
    b.fail(b.requests[0], error.ConnectionRefusedError("refused"))
    run(clock, lambda: consumer.finished, limit=STALL_LIMIT)

    assert set(consumer.failed) == only_b
    for uid, exc in consumer.failed.items():
        assert isinstance(exc, Unavailable) and uid in str(exc)
    assert set(consumer.got) == {ref.sop_instance_uid for ref in refs} - only_b
    assert set(served_by(consumer.got).values()) == {"peerc"}
    assert r.status()["sources"]["peerb/local"]["alive"] is False


def test_a_missing_file_only_removes_that_holder_for_that_instance():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock, 0.05), "peerc": MemArchive("peerc", clock, 0.05)}
    refs = make_refs(10, lambda i: ["peerb", "peerc"] if i < 9 else ["peerb"])
    bad = refs[0].sop_instance_uid
    peers["peerb"].errors[bad] = FileNotFoundError(f"404: {bad}")
    only_b = refs[9].sop_instance_uid
    r, _ = setup(refs, peers, "single", prefer=["peerb", "peerc"])   # peerb ranks first
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished, limit=STALL_LIMIT)

    assert consumer.failed == {}
    served = served_by(consumer.got)
    assert served[bad] == "peerc"           # the other holder gave the missing one
    assert served[only_b] == "peerb"        # peerb was not dropped for it
    assert peers["peerc"].uids() == [bad]
    st = r.status()["sources"]["peerb/local"]
    assert st["alive"] is True and st["failed"] == 1 and st["completed"] == 9


def test_an_instance_missing_at_its_only_holder_is_unavailable():
    clock = Clock()
    peers = {ME: MemArchive(ME, clock, 0.05)}
    refs = make_refs(3, lambda i: [ME])
    bad = refs[1].sop_instance_uid
    peers[ME].errors[bad] = FileNotFoundError("no such file")
    r, _ = setup(refs, peers)
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished, limit=STALL_LIMIT)
    assert list(consumer.failed) == [bad]
    assert isinstance(consumer.failed[bad], Unavailable) and bad in str(consumer.failed[bad])
    assert len(consumer.got) == 2


def test_an_instance_with_no_live_holder_at_the_start_is_unavailable():
    clock = Clock()
    peers = {ME: MemArchive(ME, clock, 0.05), "peerb": MemArchive("peerb", clock, 0.05)}
    refs = make_refs(4, lambda i: ["peerb"] if i == 2 else [ME, "peerb"])
    r, overlay = setup(refs, peers)
    overlay.dead.add("peerb")
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished, limit=STALL_LIMIT)
    gone = refs[2].sop_instance_uid
    assert list(consumer.failed) == [gone] and gone in str(consumer.failed[gone])
    assert set(served_by(consumer.got).values()) == {ME}
    assert peers["peerb"].requests == []


def test_single_uses_one_source_when_it_holds_everything():
    clock = Clock()
    peers = {ME: MemArchive(ME, clock, 0.01), "peerb": MemArchive("peerb", clock, 0.01),
             "peerc": MemArchive("peerc", clock, 0.01)}
    refs = make_refs(50, lambda i: [ME, "peerb", "peerc"])
    r, _ = setup(refs, peers, "single")
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished)
    assert consumer.failed == {} and len(consumer.got) == len(refs)
    used = {p: len(a.requests) for p, a in peers.items() if a.requests}
    assert len(used) == 1, f"single balancing used several sources: {used}"
    (chosen,) = used
    assert set(served_by(consumer.got).values()) == {chosen}
    assert used[chosen] == len(refs)


def test_single_reads_each_instance_from_its_first_ranked_holder():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock, 0.01), "peerc": MemArchive("peerc", clock, 0.01)}
    # peerc holds all 30; peerb 20 of them + 5 nobody else has
    refs = make_refs(35, lambda i: ["peerb"] if i >= 30 else
                     (["peerb", "peerc"] if i < 20 else ["peerc"]))
    r, _ = setup(refs, peers, "single", prefer=["peerc", "peerb"])
    consumer = Consumer(r, refs).start()
    run(clock, lambda: consumer.finished)
    assert consumer.failed == {} and len(consumer.got) == len(refs)
    served = served_by(consumer.got)
    assert sorted(peers["peerb"].uids()) == sorted(r.sop_instance_uid for r in refs[30:])
    assert all(served[ref.sop_instance_uid] == "peerc" for ref in refs[:30])


def test_the_stall_timer_drops_a_silent_source():
    clock = Clock()
    peers = {"peerb": MemArchive("peerb", clock),           # never answers
             "peerc": MemArchive("peerc", clock, 0.05)}
    refs = make_refs(20, lambda i: ["peerb", "peerc"])
    r, _ = setup(refs, peers, "single", prefer=["peerb", "peerc"])   # peerb ranks first
    consumer = Consumer(r, refs).start()
    clock.advance(0)
    b = peers["peerb"]
    assert b.open_requests(), "peerb was asked for nothing"
    asked = list(b.requests)
    # before the stall timer, peerb is still a source
    clock.advance(retrieve.STALL_SECONDS - 1)
    assert r.plan.sources["peerb/local"].alive
    run(clock, lambda: consumer.finished, limit=retrieve.STALL_SECONDS + 10)

    assert consumer.failed == {} and len(consumer.got) == len(refs)
    assert set(served_by(consumer.got).values()) == {"peerc"}
    assert all(req.cancelled for req in asked), "the stalled fetches were not cancelled"
    assert len(b.requests) == len(asked), "a dropped source was asked again"
    st = r.status()["sources"]["peerb/local"]
    assert st["alive"] is False and f"{retrieve.STALL_SECONDS:.0f} s" in st["error"]
    assert st["completed"] == 0
