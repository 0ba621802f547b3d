"""Small instances read in batches (issue 15.1): the plan's per-source index, the embedded
archive's ``read_many``, and a retrieval over an archive with that capability.

``PlanView.candidates`` must answer what the scan of every pending instance answered
(rank, then rarity, then the order wanted), and keep answering it as instances are
claimed, re-queued and lose holders. ``read_many`` is run on real Part-10 files; the
retrieval's batch path runs on a ``Clock`` with an archive whose batches the test
answers, so the hash check and the failover of a damaged, missing or larger copy are
seen one by one.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock

from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.dicom.header import read_meta
from pacsp2p.dicom.part10 import Part10Bytes, examine
from pacsp2p.strategies import Strategies
from pacsp2p.testing import datasets
from pacsp2p.transfer.plan import PlanView, Source
from pacsp2p.overlay.fetching import Unbatched
from pacsp2p.transfer.retrieve import Retrieval, Unavailable
from pacsp2p.types import InstanceRef, Location

ME = "me"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"


# -- the plan's index ---------------------------------------------------------------------

def plan_of(holders: dict[str, list[str]]) -> PlanView:
    """uid -> its sources, best first."""
    refs = [InstanceRef(uid, MR, EXPLICIT, 1000, ()) for uid in holders]
    plan = PlanView(refs)
    plan.holders = {uid: set(names) for uid, names in holders.items()}
    plan.ranking = {uid: list(names) for uid, names in holders.items()}
    return plan


def scanned(plan: PlanView, name: str) -> list[str]:
    """What the old scan of every pending instance gave: (rank, holders, order)."""
    mine = []
    for i, r in enumerate(plan.pending):
        uid = r.sop_instance_uid
        if name in plan.holders[uid]:
            order = plan.ranked(uid)
            mine.append(((order.index(name), len(plan.holders[uid]), i), uid))
    return [uid for _, uid in sorted(mine)]


def uids(refs) -> list[str]:
    return [r.sop_instance_uid for r in refs]


def test_candidates_rank_then_rarity_then_order_as_the_scan_did():
    plan = plan_of({"1": ["a", "b"], "2": ["b", "a"], "3": ["a"], "4": ["b"],
                    "5": ["a", "b", "c"], "6": ["a", "c"], "7": ["c", "a"]})
    for name in "abc":
        assert uids(plan.candidates(name)) == scanned(plan, name)
    assert uids(plan.candidates("a")) == ["3", "1", "6", "5", "2", "7"]
    assert list(plan.candidates("nobody")) == []


def test_candidates_follow_claims_requeues_and_lost_holders():
    plan = plan_of({str(i): (["a", "b"] if i % 2 else ["b", "a"]) for i in range(1, 9)})
    first = uids(plan.candidates("a"))
    ref = plan.pending.get(first[0])
    plan.take(ref)                                    # claimed: gone for every source
    assert first[0] not in uids(plan.candidates("a"))
    assert first[0] not in uids(plan.candidates("b"))
    plan.put_front(ref)                               # back, first in line
    assert uids(plan.candidates("a"))[0] == first[0]
    assert uids(plan.pending)[0] == first[0]
    plan.lose("2", "b")                               # "2" now held by "a" alone: rarest
    assert uids(plan.candidates("a"))[0] == "2"
    assert "2" not in uids(plan.candidates("b"))
    for name in "ab":
        assert sorted(uids(plan.candidates(name))) == sorted(scanned(plan, name))


def test_pending_is_a_sequence_with_a_front():
    plan = plan_of({str(i): ["a"] for i in range(5)})
    pending = plan.pending
    assert uids(pending) == ["0", "1", "2", "3", "4"] and len(pending) == 5
    pending.insert(0, pending.get("3"))
    pending.insert(0, pending.get("1"))
    assert uids(pending) == ["1", "3", "0", "2", "4"] and pending[0].sop_instance_uid == "1"
    pending.remove(pending.get("3"))
    assert "3" not in pending and uids(pending) == ["1", "0", "2", "4"]


def test_work_stealing_batch_comes_from_the_index():
    plan = plan_of({str(i): ["a"] for i in range(2000)})
    src = Source("a", limit=8)
    src.completed, src.bytes, src.busy = 10, 10_000_000, 1.0     # fast: a full batch
    plan.sources = {"a": src}
    batch = Strategies().next_batch(plan, src)
    assert uids(batch) == [str(i) for i in range(8)]


# -- the embedded archive's read_many -----------------------------------------------------

def stored(archive: EmbeddedArchive, tmp_path: Path, name: str, size: int) -> tuple:
    ds = datasets.make_image("MR", size=size, seed=len(name),
                             SOPInstanceUID=datasets.uid("batch", name))
    path = datasets.write(ds, tmp_path / "in" / f"{name}.dcm")
    body = path.read_bytes()
    meta = read_meta(path)
    target = archive.path_for(meta.sop_instance_uid)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    return meta.sop_instance_uid, body


def test_read_many_reads_small_files_whole_and_hashes_their_data_sets(tmp_path):
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor=None)
    archive._prepare()
    small, small_body = stored(archive, tmp_path, "small", 16)
    large, large_body = stored(archive, tmp_path, "large", 128)
    missing = datasets.uid("batch", "missing")
    limit = len(small_body) + 100
    assert len(large_body) > limit
    got = [archive._read_one(uid, None, limit) for uid in (small, large, missing)]
    data, meta = got[0]
    assert data == small_body and meta == examine(small_body)
    offset, ts, media_uid, digest = meta
    assert media_uid == small and ts == EXPLICIT
    assert digest == hashlib.sha256(small_body[offset:]).hexdigest()
    with got[1] as f:                                  # larger: the open file
        assert f.read() == large_body
    assert isinstance(got[2], FileNotFoundError)
    archive.path_for(small).write_bytes(b"not DICOM")
    assert archive._read_one(small, None, limit) == (b"not DICOM", None)


# -- a retrieval over an archive that reads in batches ------------------------------------

class BatchArchive:
    """``read_many`` answered by the test (``answer``); every batch is recorded."""

    capabilities = frozenset({"open", "read_many"})
    up = True
    max_fetches = 8

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.batches: list[tuple[list, defer.Deferred]] = []
        self.damaged: set[str] = set()

    def read_many(self, items, limit):
        d = defer.Deferred()
        self.batches.append(([uid for uid, _ in items], d))
        return d

    def open(self, uid, sha256=None):
        raise AssertionError("a batch archive is read with read_many")

    def answer(self, i: int):
        uids_, d = self.batches[i]
        out = []
        for uid in uids_:
            body = self.files.get(uid)
            if body is None:
                out.append(FileNotFoundError(uid))
            elif uid in self.damaged:
                out.append((body, examine(body)[:3] + ("0" * 64,)))
            elif uid.endswith(".9"):                  # "larger than the limit": a file
                f = io.BytesIO(body)
                f.sha256 = examine(body)[3]          # (hashed already, as the bulk
                out.append(f)                         # channel's files are: no thread)
            else:
                out.append((body, examine(body)))
        d.callback(out)


def study(n: int):
    files, refs = {}, []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.10.1406.15.{i}"
        ds = datasets.make_image("MR", size=8, seed=i, SOPInstanceUID=uid)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        body = buf.getvalue()
        files[uid] = body
        sha = examine(body)[3]
        refs.append(InstanceRef(uid, MR, EXPLICIT, len(body),
                                (Location(uid, "local", ME, sha, len(body)),)))
    return files, refs


def test_a_batch_is_one_job_and_each_copy_is_checked():
    files, refs = study(10)
    archive = BatchArchive(files)
    archive.damaged.add(refs[2].sop_instance_uid)
    del archive.files[refs[3].sop_instance_uid]
    clock = Clock()
    damaged = []
    r = Retrieval(refs, {"local": archive}, ME, reactor=clock)
    r.on_damaged = damaged.append
    opened = [r.open(ref) for ref in refs]
    for _ in range(100):
        waiting = [i for i, (_, d) in enumerate(archive.batches) if not d.called]
        if not waiting:
            break
        clock.advance(0.01)                           # (so a rate is measured)
        for i in waiting:
            archive.answer(i)
        clock.advance(0)
    # a batch holds several instances: fewer jobs than instances
    assert len(archive.batches) < len(refs)
    assert max(len(u) for u, _ in archive.batches) > 1
    results = []
    for d in opened:
        d.addBoth(results.append)
    for ref, got in zip(refs, results):
        uid = ref.sop_instance_uid
        if uid in (refs[2].sop_instance_uid, refs[3].sop_instance_uid):
            assert got.check(Unavailable), got          # its only copy: damaged, missing
        elif uid.endswith(".9"):                        # larger: hashed on its own
            assert got.read() == files[uid]
        else:
            assert isinstance(got, Part10Bytes) and got.getvalue() == files[uid]
            assert got.media_uid == uid and got.data() == files[uid][got.offset:]
    assert [loc.sop_instance_uid for loc in damaged] == [refs[2].sop_instance_uid]
    assert r.status()["done"] == len(refs) - 2


class BatchPeers:
    """Other peers' archives over a bulk channel that serves batches (``fetch_many``,
    answered by the test) unless the peer is *old* (every batch: Unbatched, as a 405
    makes it); a single ``fetch`` answers at once. Copies arrive hashed, as
    ``BulkClient`` hands them over."""

    def __init__(self, files: dict[str, bytes], old=()):
        self.files, self.old = files, set(old)
        self.batches: list[tuple[list, defer.Deferred]] = []
        self.alone: list[str] = []
        self.membership = type("M", (), {"on_change": [], "members": {}})()

    def alive(self, peer):
        return True

    def _copy(self, uid):
        body = self.files[uid]
        offset, ts, media, sha = examine(body)
        f = Part10Bytes(body, offset, ts, media)
        f.sha256 = "0" * 64 if uid.endswith(".3") else sha      # .3: a damaged copy
        return f

    def fetch_many(self, locations):
        if locations[0].peer in self.old:
            return defer.fail(Unbatched("serves no batches"))
        d = defer.Deferred()
        self.batches.append(([loc.sop_instance_uid for loc in locations], d))
        return d

    def answer(self, i: int):
        uids_, d = self.batches[i]
        d.callback([Unbatched("alone") if uid.endswith(".5") else self._copy(uid)
                    for uid in uids_])

    def fetch(self, location):
        self.alone.append(location.sop_instance_uid)
        return defer.succeed(self._copy(location.sop_instance_uid))


def remote(refs, peer: str):
    return [InstanceRef(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax_uid, r.size,
                        (r.locations[0].__class__(r.sop_instance_uid, "local", peer,
                                                  r.locations[0].sha256, r.size),))
            for r in refs]


def run_remote(refs, peers: BatchPeers):
    clock = Clock()
    damaged = []
    r = Retrieval(refs, {}, ME, peers, reactor=clock)
    r.on_damaged = damaged.append
    opened = [r.open(ref) for ref in refs]
    for _ in range(200):
        waiting = [i for i, (_, d) in enumerate(peers.batches) if not d.called]
        if not waiting and all(d.called for d in opened):
            break
        clock.advance(0.01)
        for i in waiting:
            peers.answer(i)
        clock.advance(0)
    results = []
    for d in opened:
        d.addBoth(results.append)
    return r, results, damaged


def test_another_peers_small_instances_come_in_batches_each_copy_checked():
    files, refs = study(40)
    peers = BatchPeers(files)
    r, results, damaged = run_remote(remote(refs, "peerb"), peers)
    assert len(peers.batches) < len(refs) / 4            # many to a request
    assert max(len(u) for u, _ in peers.batches) >= 16
    for ref, got in zip(refs, results):
        uid = ref.sop_instance_uid
        if uid.endswith(".3"):
            assert got.check(Unavailable), got               # damaged, no other copy
        else:
            assert isinstance(got, Part10Bytes) and got.getvalue() == files[uid]
    assert sorted(peers.alone) == sorted(u for u in files if u.endswith(".5"))
    assert [loc.sop_instance_uid for loc in damaged] == [refs[3].sop_instance_uid]
    assert r.status()["waited"] >= 1 and r.status()["done"] == len(refs) - 1


def test_a_peer_that_serves_no_batches_is_read_one_instance_at_a_time():
    files, refs = study(12)
    peers = BatchPeers(files, old={"peerb"})
    r, results, _ = run_remote(remote(refs, "peerb"), peers)
    assert peers.batches == [] and sorted(peers.alone) == sorted(files)
    ok = [got for ref, got in zip(refs, results) if not ref.sop_instance_uid.endswith(".3")]
    assert all(isinstance(g, Part10Bytes) for g in ok)
    assert r.status()["sources"]["peerb/local"]["alive"]      # not dropped for it


def test_a_failing_archive_is_dropped_after_three_failed_jobs():
    files, refs = study(6)
    archive = BatchArchive(files)
    clock = Clock()
    r = Retrieval(refs, {"local": archive}, ME, reactor=clock)
    opened = [r.open(ref) for ref in refs]
    for _ in range(20):
        waiting = [d for _, d in archive.batches if not d.called]
        if not waiting:
            break
        for d in waiting:
            d.errback(OSError("disk gone"))          # the whole job fails
        clock.advance(0)
    got = []
    for o in opened:
        o.addBoth(got.append)
    assert len(got) == len(refs)
    assert all(g.check(Unavailable) for g in got)     # the only holder: no failover
    assert not r.plan.sources[f"{ME}/local"].alive   # dropped after 3 failures
    asked = sum(len(u) for u, _ in archive.batches)
    assert len(archive.batches) == 3 and asked < len(refs)     # the rest never read


def test_damaged_is_reported_as_such():
    files, refs = study(1)
    archive = BatchArchive(files)
    archive.damaged.add(refs[0].sop_instance_uid)
    clock = Clock()
    r = Retrieval(refs, {"local": archive}, ME, reactor=clock)
    seen = []
    r.on_damaged = seen.append
    d = r.open(refs[0])
    archive.answer(0)
    clock.advance(0)
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(Unavailable)
    assert "hashes to 000000000000" in failures[0].getErrorMessage()
    assert [loc.sop_instance_uid for loc in seen] == [refs[0].sop_instance_uid]


# -- the C-STORE-RQ of each sub-operation, from parts kept per SOP class -----------------

def test_c_store_rq_from_kept_parts_is_what_the_generic_encoder_makes():
    from pacsp2p.dicom import dimse

    def generic(msg_id, sop_class, uid, ae=None, ae_msg=None):
        fields = [(dimse.AFFECTED_SOP_CLASS, sop_class.encode()),
                  (dimse.COMMAND_FIELD, dimse.C_STORE_RQ), (dimse.MESSAGE_ID, msg_id),
                  (dimse.PRIORITY, 0), (dimse.DATA_SET_TYPE, 0),
                  (dimse.AFFECTED_SOP_INSTANCE, uid.encode())]
        if ae:
            title = ae.encode()[:16]
            fields += [(dimse.ORIGINATOR_AE, title + b" " * (len(title) % 2)),
                       (dimse.ORIGINATOR_MSG_ID, ae_msg or 0)]
        return dimse.command(fields)

    for args in [(1, MR, "1.2.3.4"), (0xFFFF, MR, "1.2.3.45", "MOVESCU", 7),
                 (3, "1.2", "1.23", "ODD", None), (9, MR, "1.2.3", "A" * 20, 0xFFFF)]:
        assert dimse.c_store_rq(*args) == generic(*args)
        fields = dimse.command_elements(dimse.c_store_rq(*args))
        assert dimse.us(fields, dimse.MESSAGE_ID) == args[0]
        assert dimse.text(fields, dimse.AFFECTED_SOP_INSTANCE) == args[2]
