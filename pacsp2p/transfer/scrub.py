"""Scrub: re-hash every copy this peer's archives hold against the SHA-256 the catalog
holds for it, and replace a damaged or missing copy with a good replica's bytes.

Bit rot, a bad sector, a file truncated by a crash or removed by hand: replication only
protects an instance if the copies are checked before they are needed. Each peer scrubs
its own archives' copies (the catalog's locations of this peer), as Ceph's deep scrub
and Tahoe-LAFS's verifier do, in one of three ways, the cheapest an archive offers:

- ``verify`` capability (the embedded archive; Orthanc, which checks its own MD5 and
  falls back to its file): the archive hashes its copies where they lie, a batch per
  job of its threads, one read per file;
- otherwise, ``open``: the copy is read through the adapter (a DICOMweb archive's
  WADO-RS) and hashed in the ``verify`` thread pool;
- an archive read over plain DIMSE (``scrub_by_sample``: every read is a C-GET through
  the archive's own DIMSE stack) is checked on a sample only — ``[cluster]
  scrub_sample`` of its copies each pass, chosen afresh each pass — at a tenth of the
  rate.

The data set (the bytes after the File Meta Information) is what the catalog's hash
covers (``dicom.part10.file_dataset_hash``, as the embedded archive computes it when it
stores). A copy whose bytes hash otherwise is *damaged*, one the archive no longer holds
is *missing*: both are logged with the instance UID, counted in status, and replaced at
once from a good replica (this peer's other archives, or another peer over the bulk
channel: ``transfer.retrieve``, which checks each replica's hash in turn) through the
archive's ``restore`` (the embedded archive renames the good file over the damaged one;
the copy's hash is the catalog's again, or, from a replica kept in another transfer
syntax when none has its bytes, the catalog takes its hash). The replica's whole
Part-10 file is taken, so a copy made by the cluster comes back byte-identical. An
archive that cannot ``restore`` (plain DIMSE), or an instance with no good replica, is
*unrepaired*: logged as an error, listed in status, and ``pacsp2p scrub`` exits non-zero,
then tried again with backoff (``transfer.unrepaired``); a DIMSE archive's bad copy is made
again elsewhere from a good replica and forgotten here (``on_unrestorable``:
``recheck.Recheck.unrestorable``; the file stays in the archive).

When. In the background a full pass starts every ``[cluster] scrub_interval`` s (from
the start of the previous one, on demand or not; the first ``scrub_interval`` after the
peer's first start), reading at most ``scrub_rate`` MB/s (a pacing token bucket), and
resumes where it stopped after a restart (its cursor, the catalog's sequence number, is
saved every few seconds). On demand, ``run()`` (``pacsp2p scrub``; ``transfer.recheck``)
starts a full pass at once (by default at ``scrub_rate``), stopping a background one. A
retrieval that finds a damaged copy here (``transfer.verify``) has it checked (against
this catalog's hash, not the one told) and replaced at once (``suspect``); another peer
that finds one tells it (``CheckCopy``)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p import threads
from pacsp2p.catalog import scrub as sql
from pacsp2p.catalog.db import stored_location
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.dicom.incoming import remove, spool
from pacsp2p.dicom.part10 import file_dataset_hash
from pacsp2p.flow import open_gated
from pacsp2p.transfer.repair import Throttle
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.transfer.unrepaired import Unrepaired
from pacsp2p.transfer.verify import Damaged, checked, is_sha256
from pacsp2p.types import Location, Query

log = Logger()

TICK = 5.0              # seconds between two looks at whether a pass is due
CHUNK = 2000            # copies read from the catalog per step
BATCH_BYTES = 16 << 20  # bytes one verify job of an archive hashes at most
BATCH_MAX = 1000        # copies per verify job at most
BATCH_SECONDS = 0.2     # a throttled pass's batch: what the rate allows in this time
SAVE_EVERY = 5.0        # seconds between two saves of a running pass
SAMPLED_SLOWER = 10.0   # an archive checked by sample reads at scrub_rate / this
LISTED = 20             # damaged/unrepaired instance UIDs listed per pass
_KEY = "scrub"
_COUNTS = ("checked", "bytes", "damaged", "missing", "repaired", "unrepaired", "skipped")


@dataclasses.dataclass
class Pass:
    """One pass over this peer's copies (what status shows, and what is saved)."""

    id: int
    why: str                     # "background", "on demand"
    rate: float                  # MB/s, 0: no limit
    started: float
    cursor: int = 0              # the catalog sequence number reached
    total: int = 0               # copies this peer held when the pass started
    checked: int = 0
    bytes: int = 0
    damaged: int = 0
    missing: int = 0
    repaired: int = 0
    unrepaired: int = 0
    skipped: int = 0             # not checked: archive down, no hash known, not sampled
    finished: float | None = None
    stopped: bool = False
    damaged_uids: list = dataclasses.field(default_factory=list)
    unrepaired_uids: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("stopped")
        end = self.finished or time.time()
        d["MB_per_s"] = round(self.bytes / max(1e-3, end - self.started) / 1e6, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Pass":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Scrub:
    def __init__(self, settings, catalog, archives: dict, strategies, overlay, reactor):
        c = settings.cluster
        self.peer = settings.peer.name
        self.rate = c.scrub_rate
        self.interval = c.scrub_interval
        self.sample = c.scrub_sample
        self.catalog, self.archives, self.strategies = catalog, archives, strategies
        self.overlay, self.reactor = overlay, reactor
        self.tmpdir = Path(settings.data_dir) / "incoming"
        self.running = False
        self.current: Pass | None = None
        self.last: dict | None = None            # the last pass that finished
        self.epoch: float | None = None          # first start: background passes count from it
        self.last_started: float | None = None   # start of the latest full pass
        self.totals = {k: 0 for k in _COUNTS}    # over every pass, kept in the catalog
        self.found_by_reads = {"damaged": 0, "repaired": 0}     # retrievals' reports
        self._ids = 0
        self._loop = None
        self._walking: defer.Deferred | None = None
        self._saved_at = 0.0
        self._suspects: dict[tuple, Location] = {}       # (uid, archive) -> copy to check
        self._checking = False
        self._checkpoint: dict | None = None
        self._mending: dict[tuple, list] = {}     # (uid, archive) -> who waits
        self.on_unrestorable = lambda c, sha: defer.succeed(False)    # (transfer.recheck)
        self.later = Unrepaired(self)            # copies not replaced: tried again

    # -- life cycle ------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self):
        self.running = True
        try:
            state = yield self.catalog.read(lambda conn: sql.load_state(conn, _KEY))
        except Exception as e:
            log.warn("scrub: cannot read its saved state: {err}", err=e)
            state = {}
        self.epoch = state.get("epoch") or time.time()
        self.last_started = state.get("last_started")
        self.last = state.get("last")
        self._ids = int(state.get("ids", 0))
        self.totals.update({k: v for k, v in (state.get("totals") or {}).items()
                            if k in self.totals})
        self.later.restore(state.get("unrepaired"))     # tried again after FIRST s
        unfinished = state.get("current")
        if unfinished and self.running:
            p = Pass.from_dict(unfinished)
            log.info("scrub: resuming pass {id} ({why}) after {n} copies checked",
                     id=p.id, why=p.why, n=p.checked)
            self._begin(p)
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(TICK, now=False).addErrback(
            lambda f: log.failure("scrub loop failed", f))
        yield self._save(force=True)

    @defer.inlineCallbacks
    def stop(self):
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.current is not None:
            self.current.stopped = True
        if self._walking is not None:
            try:
                yield self._walking        # it saves itself, to resume at the next start
            except Exception:
                pass
        else:
            yield self._save(force=True)

    def tick(self):
        if self.running:
            self.later.tick()
        if not self.running or self.current is not None or not self.interval:
            return
        due = (self.last_started or self.epoch or time.time()) + self.interval
        if time.time() >= due:
            self._ids += 1
            self.last_started = time.time()
            self._begin(Pass(self._ids, "background", self.rate, time.time()))

    # -- on demand -------------------------------------------------------------------
    @defer.inlineCallbacks
    def run(self, rate: float | None = None):
        """Start a full pass now (``pacsp2p scrub``): {"pass": id, ...}. A pass on demand
        already running is joined; a background one is stopped first."""
        if rate is not None and not (isinstance(rate, (int, float)) and rate >= 0):
            raise ValueError(f"rate must be MB/s (a number >= 0, 0: no limit), got {rate!r}")
        p = self.current
        if p is not None and p.why == "on demand" and not p.stopped:
            return {"pass": p.id, "joined": True, **p.as_dict()}
        if p is not None:
            log.info("scrub: background pass {id} stopped for a pass on demand", id=p.id)
            p.stopped = True
            yield self._walking
        self._ids += 1
        self.last_started = time.time()          # a full pass: the next one is due later
        p = Pass(self._ids, "on demand", self.rate if rate is None else float(rate),
                 time.time())
        self._begin(p)
        return {"pass": p.id, "joined": False, **p.as_dict()}

    def _begin(self, p: Pass):
        self.current = p
        self._checkpoint = p.as_dict()          # what a restart resumes from
        d = self._walking = self._pass(p)
        d.addErrback(lambda f: log.failure("scrub pass {id} failed", f, id=p.id))

    # -- one pass --------------------------------------------------------------------
    @defer.inlineCallbacks
    def _pass(self, p: Pass):
        if not p.total:
            p.total = yield self.catalog.read(lambda conn: sql.count_copies(conn, self.peer))
        if not p.checked:
            limit = f"{p.rate:g} MB/s" if p.rate else "no limit"
            log.info("scrub: pass {id} ({why}) started: {n} copies on this peer's "
                     "archives, {limit}", id=p.id, why=p.why, n=p.total, limit=limit)
        full = Throttle(self.reactor, p.rate * 1e6)
        sampled = Throttle(self.reactor, p.rate * 1e6 / SAMPLED_SLOWER)
        try:
            while not p.stopped and self.running:
                rows = yield self.catalog.read(
                    lambda conn, a=p.cursor: sql.own_copies(conn, self.peer, a, CHUNK))
                if not rows:
                    break
                yield self._check_rows(p, rows, full, sampled)
                if p.stopped:
                    break
                p.cursor = rows[-1].seq
                self._checkpoint = p.as_dict()      # counters that match the cursor
                self._save()                        # (the walk does not wait for it)
        finally:
            yield self._ended(p)

    @defer.inlineCallbacks
    def _ended(self, p: Pass):
        if self.current is p:
            self.current = None
        self._walking = None
        if p.stopped or not self.running:
            # stopped with the peer: resumed at the next start (a background pass);
            # stopped for a pass on demand: dropped
            yield self._save(force=True, unfinished=p if not self.running else None)
            return
        p.finished = time.time()
        self.last = p.as_dict()
        took = p.finished - p.started
        log.info("scrub: pass {id} done in {took:.0f} s: {n} copies checked ({mb:.1f} MB, "
                 "{rate} MB/s), {d} damaged, {r} repaired, {m} missing, {u} unrepaired, "
                 "{s} skipped", id=p.id, took=took, n=p.checked, mb=p.bytes / 1e6,
                 rate=self.last["MB_per_s"], d=p.damaged, r=p.repaired, m=p.missing,
                 u=p.unrepaired, s=p.skipped)
        yield self._save(force=True)

    @defer.inlineCallbacks
    def _check_rows(self, p: Pass, rows: list[sql.Copy], full, sampled):
        """Check one chunk of copies, archive by archive, in batches. A copy the catalog
        has no hash for (crawled from a vendor archive) is checked only by an archive
        that can ``verify`` on its own terms (Orthanc: its MD5)."""
        groups: dict[str, list] = {}
        for c in rows:
            sha = c.sha256 if is_sha256(c.sha256) else ""
            groups.setdefault(c.archive, []).append((c, sha))
        for name, items in groups.items():
            archive = self.archives.get(name)
            if archive is None or not getattr(archive, "up", True):
                p.skipped += len(items)                  # gone from the config, or down
                continue
            caps = getattr(archive, "capabilities", ())
            by_sample = bool(getattr(archive, "scrub_by_sample", False))
            todo = []
            own_terms = "verify" in caps and not by_sample
            for c, sha in items:
                if (not sha and not own_terms) or (by_sample and not self._sampled(p, c.uid)):
                    p.skipped += 1
                else:
                    todo.append((c, sha))
            throttle = sampled if by_sample else full
            if "verify" in caps and not by_sample:
                # a batch is what the rate allows in a fifth of a second (the pace is
                # kept batch by batch), 16 MB at most
                most = BATCH_BYTES if not p.rate else \
                    max(1, int(min(BATCH_BYTES, p.rate * 1e6 * BATCH_SECONDS)))
                # unthrottled (on demand, --rate 0): two jobs of the archive's threads
                # at once, the next batch hashed while this one's results are counted
                depth = 1 if p.rate else 2
                pending: collections.deque = collections.deque()
                for batch in _batches(todo, most):
                    if p.stopped:
                        break
                    yield throttle.wait(sum(max(0, c.size) for c, _ in batch))
                    pending.append((batch, self._verify(archive, batch)))
                    if len(pending) >= depth:
                        done, d = pending.popleft()
                        yield self._verified(p, name, done, (yield d))
                while pending:
                    done, d = pending.popleft()
                    yield self._verified(p, name, done, (yield d))
            elif "open" in caps:
                for c, sha in todo:
                    if p.stopped:
                        return
                    yield throttle.wait(max(0, c.size))
                    state, read = yield self._read_and_hash(archive, c, sha)
                    if state == "skipped":
                        p.skipped += 1
                    else:
                        yield self._count(p, c, sha, state, read)
            else:
                p.skipped += len(todo)

    @staticmethod
    def _verify(archive, batch) -> defer.Deferred:
        """Deferred[results of ``archive.verify`` for *batch*, or the failure's text]."""
        d = defer.maybeDeferred(archive.verify, [(c.uid, sha) for c, sha in batch])
        d.addErrback(lambda f: f.getErrorMessage())
        return d

    def _verified(self, p: Pass, name: str, batch, results):
        """Count what one verify job found; replace what is damaged or missing."""
        if isinstance(results, str):
            log.warn("scrub: archive {archive} could not verify {n} copies: {err}",
                     archive=name, n=len(batch), err=results)
            p.skipped += len(batch)
            return defer.succeed(None)
        bad = []
        for (c, sha), (_, state, read) in zip(batch, results):
            read = read or max(0, c.size)           # (checked where it lies)
            if state == "ok":                       # (the common case, inline)
                p.checked += 1
                p.bytes += read
                self.totals["checked"] += 1
                self.totals["bytes"] += read
            else:
                bad.append((c, sha, state, read))
        if not bad:
            return defer.succeed(None)
        return self._count_bad(p, bad)

    @defer.inlineCallbacks
    def _count_bad(self, p: Pass, bad):
        for c, sha, state, read in bad:
            yield self._count(p, c, sha, state, read)

    def _sampled(self, p: Pass, uid: str) -> bool:
        h = hashlib.sha256(f"{p.id}:{p.started}:{uid}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64 < self.sample

    @defer.inlineCallbacks
    def _read_and_hash(self, archive, c: sql.Copy, sha: str):
        """(state, bytes read) of one copy read through the adapter."""
        try:
            f = yield open_gated(archive, c.uid, sha)
        except (KeyError, FileNotFoundError):
            return "missing", 0
        except Exception as e:
            log.warn("scrub: cannot read {uid} from {archive}: {err}", uid=c.uid,
                     archive=archive.name, err=e)
            return "skipped", 0
        loc = Location(c.uid, c.archive, self.peer, sha, c.size)
        try:
            f = yield checked(f, loc, self.reactor)
        except Damaged:
            return "damaged", max(0, c.size)
        f.close()
        return "ok", max(0, c.size)

    @defer.inlineCallbacks
    def _count(self, p: Pass | None, c: sql.Copy, sha: str, state: str, read: int):
        """Count one copy checked; replace it if it is damaged or missing."""
        counts = [self.totals] + ([vars(p)] if p is not None else [])
        for d in counts:
            d["checked"] += 1
            d["bytes"] += read
        if state == "ok":
            return
        what = "damaged" if state == "damaged" else "missing"
        for d in counts:
            d[what] += 1
        if p is not None and len(p.damaged_uids) < LISTED:
            p.damaged_uids.append(c.uid)
        if state == "damaged":
            log.error("scrub: the copy of {uid} on archive {archive} is damaged: its data "
                      "set does not hash to the catalog's SHA-256 {sha}", uid=c.uid,
                      archive=c.archive, sha=sha[:16])
        else:
            log.error("scrub: the copy of {uid} on archive {archive} is missing", uid=c.uid,
                      archive=c.archive)
        source = yield self.mend(c, sha)
        if source:
            for d in counts:
                d["repaired"] += 1
            self.later.discard(c)
        else:
            for d in counts:
                d["unrepaired"] += 1
            if p is not None and len(p.unrepaired_uids) < LISTED:
                p.unrepaired_uids.append(c.uid)
            self.later.add(c, sha)
        return source

    # -- replacing a copy ------------------------------------------------------------
    @defer.inlineCallbacks
    def mend(self, c: sql.Copy, sha: str):
        """Replace this peer's copy *c* (damaged or missing) with a good replica's bytes:
        the source's name, or None (logged) when it could not be replaced."""
        key = (c.uid, c.archive)
        running = self._mending.get(key)
        if running is not None:                 # already being replaced: its outcome
            waiter = defer.Deferred()
            running.append(waiter)
            source = yield waiter
            return source
        self._mending[key] = waiting = []
        source = None
        try:
            source = yield self._mend(c, sha)
            log.warn("scrub: {uid} on archive {archive} replaced from {source}: it hashes "
                     "to the catalog's SHA-256 again", uid=c.uid, archive=c.archive,
                     source=source)
        except Exception as e:
            log.error("scrub: {uid} on archive {archive} could not be replaced: {err}",
                      uid=c.uid, archive=c.archive, err=e)
        finally:
            del self._mending[key]
            for waiter in waiting:
                waiter.callback(source)
        return source

    @defer.inlineCallbacks
    def _mend(self, c: sql.Copy, sha: str) -> str:
        archive = self.archives[c.archive]
        if "restore" not in getattr(archive, "capabilities", ()):
            gone = yield self.on_unrestorable(c, sha)
            raise ValueError(f"archive {c.archive} cannot replace a copy ("
                             f"{getattr(archive, 'adapter', type(archive).__name__)}: no "
                             "'restore'); replace it with the archive's own tools" +
                             ("; made again elsewhere, forgotten here" if gone else ""))
        refs = yield self.catalog.resolve(Query("IMAGE", {"SOPInstanceUID": c.uid}))
        if not refs:
            raise ValueError("the instance is no longer in the catalog")
        ref = refs[0]
        # replicas with the copy's hash (or none), else any whose own hash is known (the
        # retrieval checks it; another syntax's: ``adapters.syntaxes`` converted it)
        others = [loc for loc in ref.locations
                  if (loc.peer, loc.archive) != (self.peer, c.archive)]
        others = tuple(loc for loc in others if sha and loc.sha256 in (sha, "")) or \
            tuple(loc for loc in others if is_sha256(loc.sha256))
        if not others:
            raise ValueError("no other replica")
        ref = dataclasses.replace(ref, locations=others)
        source = Retrieval([ref], self.archives, self.peer, self.overlay, self.strategies,
                           self.reactor)
        f = yield source.open(ref)
        served = next((s.name for s in source.plan.sources.values() if s.completed),
                      "another replica")
        pool = threads.pool(self.reactor, "verify", 1, 4)
        path = yield deferToThreadPool(self.reactor, pool, spool, f, self.tmpdir)
        try:
            got = yield deferToThreadPool(self.reactor, pool, _file_hash, path)
            if not got or sha and got != sha and got not in {o.sha256 for o in others}:
                raise Damaged(f"the replica from {served} hashes to {got[:12]}")
            meta = yield deferToThreadPool(self.reactor, pool, read_meta, path)
            if meta.sop_instance_uid != c.uid:
                raise Damaged(f"the replica from {served} holds {meta.sop_instance_uid}")
            stored = yield archive.restore(path, meta)
        finally:
            remove(pool, path)
        if sha and stored.sha256 != got:
            raise Damaged(f"the restored copy hashes to {stored.sha256[:12]}")
        if sha and got != sha:          # another syntax's bytes: the copy's hash is theirs
            meta = dataclasses.replace(meta, transfer_syntax_uid=ref.transfer_syntax_uid)
            yield self.catalog.record(meta, stored_location(meta, stored, self.peer))
        return served

    # -- copies that retrievals found damaged ----------------------------------------
    def suspect(self, loc: Location) -> None:
        """A retrieval (here or on another peer: ``CheckCopy``) found the copy *loc*
        damaged: check it now and replace it if it is (this peer's copies only)."""
        if loc.peer != self.peer:
            self._tell(loc)
            return
        if loc.archive not in self.archives or not is_sha256(loc.sha256):
            return
        self._suspects.setdefault((loc.sop_instance_uid, loc.archive), loc)
        if not self._checking:
            self._check_suspects().addErrback(
                lambda f: log.failure("scrub: checking a damaged copy failed", f))

    def _tell(self, loc: Location) -> None:
        services = getattr(getattr(self.overlay, "membership", None), "services", None)
        if services is None or not hasattr(services, "tell_damaged"):
            return
        d = services.tell_damaged(loc)
        d.addErrback(lambda f: log.info("scrub: could not tell {peer} its copy of {uid} is "
                                        "damaged: {err}", peer=loc.peer,
                                        uid=loc.sop_instance_uid, err=f.getErrorMessage()))

    @defer.inlineCallbacks
    def _check_suspects(self):
        self._checking = True
        try:
            while self._suspects and self.running:
                _, loc = self._suspects.popitem()
                archive = self.archives[loc.archive]
                if (c := (yield self.catalog.read(sql.own_copy(self.peer, loc)))) is None:
                    continue
                state, read = yield self.check_copy(archive, c)
                if state in ("damaged", "missing"):
                    self.found_by_reads["damaged"] += 1
                    source = yield self._count(None, c, c.sha256, state, read)
                    if source:
                        self.found_by_reads["repaired"] += 1
                    yield self._save(force=True)
        finally:
            self._checking = False

    @defer.inlineCallbacks
    def check_copy(self, archive, c: sql.Copy):
        """(state, bytes read) of this peer's copy *c* on *archive*, checked now."""
        if "verify" not in archive.capabilities:
            return (yield self._read_and_hash(archive, c, c.sha256))
        try:
            [(_, state, read)] = yield archive.verify([(c.uid, c.sha256)])
        except Exception as e:
            log.warn("scrub: cannot check {uid}: {err}", uid=c.uid, err=e)
            return "skipped", 0
        return state, read

    # -- state -----------------------------------------------------------------------
    def _save(self, force: bool = False, unfinished=None):
        now = time.time()
        if not force and now - self._saved_at < SAVE_EVERY:
            return defer.succeed(None)
        self._saved_at = now
        current = self.current or unfinished
        resume = None
        if current is not None and current.finished is None and current.why == "background":
            resume = self._checkpoint           # (the copies after its cursor: again)
        state = {"epoch": self.epoch, "last_started": self.last_started, "last": self.last,
                 "ids": self._ids, "totals": dict(self.totals), "current": resume,
                 "unrepaired": self.later.saved()}
        d = self.catalog.write(lambda conn: sql.save_state(conn, _KEY, state))
        d.addErrback(lambda f: log.warn("scrub: cannot save its state: {err}",
                                        err=f.getErrorMessage()))
        return d

    def status(self) -> dict:
        p = self.current
        due = None
        if self.interval:
            due = (self.last_started or self.epoch or time.time()) + self.interval
        return {"state": "scrubbing" if p is not None else ("idle" if self.running else "off"),
                "interval_s": self.interval or None, "limit_MB_s": self.rate or None,
                "sample": self.sample, "next_at": due if p is None else None,
                "pass": p.as_dict() if p is not None else None, "last": self.last,
                "totals": dict(self.totals), "found_by_reads": dict(self.found_by_reads),
                "awaiting_repair": len(self.later)}


def _batches(items, most: int = BATCH_BYTES):
    batch, size = [], 0
    for c, sha in items:
        batch.append((c, sha))
        size += max(0, c.size)
        if size >= most or len(batch) >= BATCH_MAX:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _file_hash(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return file_dataset_hash(f)
    except (BadDataset, Exception):
        return ""

