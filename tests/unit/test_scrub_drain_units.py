"""Scrub and drain (issue 13.3, 13.4), the parts that need no process: the config keys,
the embedded archive's ``verify`` and ``restore``, the check a retrieval makes before it
serves a copy (and its failover), the admin actions' arguments, and placement leaving
out what is being drained.

The cluster tests (tests/cluster/test_scrub.py, test_drain.py) run the real thing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pacsp2p import config
from pacsp2p.admin.actions import _Drain, _Scrub
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.dicom.header import content_hash, read_meta
from pacsp2p.overlay.commands import InvalidArgument, check_archive_names
from pacsp2p.strategies import Strategies, hookimpl
from pacsp2p.testing import datasets
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.transfer import verify
from pacsp2p.transfer.verify import Damaged, Mislabelled, checked
from pacsp2p.types import InstanceRef, Location

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def cluster_settings(**keys):
    return config.from_dict({"cluster": keys}, "t.toml", Path(".")).cluster


# -- config --------------------------------------------------------------------------

def test_scrub_keys_have_defaults_and_are_checked():
    c = cluster_settings()
    assert (c.scrub_rate, c.scrub_interval, c.scrub_sample) == (20.0, 604800.0, 0.01)
    c = cluster_settings(scrub_rate=0, scrub_interval=0, scrub_sample=1)
    assert (c.scrub_rate, c.scrub_interval, c.scrub_sample) == (0.0, 0.0, 1.0)
    for key, value, says in (("scrub_rate", -1, "MB/s"), ("scrub_interval", -5, "seconds"),
                             ("scrub_sample", 0, "fraction"), ("scrub_sample", 1.5,
                                                                 "fraction"),
                             ("scrub_rate", "fast", "MB/s")):
        with pytest.raises(config.ConfigError) as e:
            cluster_settings(**{key: value})
        assert f"cluster.{key}" in str(e.value) and says in str(e.value), str(e.value)


# -- the embedded archive ------------------------------------------------------------

@pytest.fixture
def held(tmp_path):
    """An embedded archive (its jobs run at once, no thread) holding 3 instances."""
    a = EmbeddedArchive("local", tmp_path / "archive", reactor=None, fsync=False)
    a._prepare()
    a._run = lambda fn, *args: defer.maybeDeferred(fn, *args)
    files = datasets.make_study(tmp_path / "in", patient_id="UNIT", size=32,
                                series=[("CT", 3, EXPLICIT)])
    out = {}
    for f in files:
        meta = read_meta(f)
        stored = a._store(f, meta.sop_instance_uid)
        out[meta.sop_instance_uid] = (stored.sha256, f)
    return a, out


def result(d):
    got = []
    d.addBoth(got.append)
    assert got, "not fired at once"
    if hasattr(got[0], "raiseException"):
        got[0].raiseException()
    return got[0]


def test_verify_tells_good_damaged_and_missing_copies(held):
    a, copies = held
    (u1, (s1, _)), (u2, (s2, _)), (u3, (s3, _)) = sorted(copies.items())
    assert [x[1] for x in result(a.verify([(u, s) for u, (s, _) in copies.items()]))] == \
        ["ok"] * 3
    p = a.path_for(u1)
    data = bytearray(p.read_bytes())
    data[-10] ^= 1
    p.write_bytes(bytes(data))
    a.path_for(u2).unlink()
    p3 = a.path_for(u3)
    p3.write_bytes(b"\0" * 200)                       # no longer a Part-10 file
    got = result(a.verify([(u1, s1), (u2, s2), (u3, s3)]))
    assert [(u, state) for u, state, _ in got] == [(u1, "damaged"), (u2, "missing"),
                                                  (u3, "damaged")]
    assert got[0][2] > 0                              # bytes read


def test_restore_puts_the_good_bytes_back_in_place(held, tmp_path):
    a, copies = held
    uid, (sha, original) = sorted(copies.items())[0]
    good = original.read_bytes()
    p = a.path_for(uid)
    p.write_bytes(good[:-10] + b"XXXXXXXXXX")
    spool = tmp_path / "spool.dcm"
    spool.write_bytes(good)
    stored = result(a.restore(spool, read_meta(spool)))
    assert stored.sha256 == sha and p.read_bytes() == good
    assert not any(a.tmp.iterdir()), "a temporary file left behind"
    p.unlink()                                        # missing: put back the same way
    result(a.restore(spool, read_meta(spool)))
    assert p.read_bytes() == good and content_hash(p)[0] == sha


# -- the check before serving, and failover ------------------------------------------

class Hashed(io.BytesIO):
    """A fetched file that was hashed on its way in (as the bulk channel's are)."""

    def __init__(self, data: bytes, sha256: str):
        super().__init__(data)
        self.sha256 = sha256


def test_checked_passes_a_good_copy_and_refuses_a_damaged_one():
    good = "a" * 64
    loc = Location("1.2.3", "local", "p", good, 10)
    f = Hashed(b"x", good)
    assert result(checked(f, loc, Clock())) is f
    bad = Hashed(b"x", "b" * 64)
    with pytest.raises(Damaged) as e:
        result(checked(bad, loc, Clock()))
    assert bad.closed and "1.2.3" in str(e.value) and "local@p" in str(e.value)
    # a copy the catalog has no hash for is served if it is a whole Part-10 file of
    # that instance (file meta and data set), refused otherwise (tests/integration/
    # test_lying_archive.py: an archive serving another instance, a truncated or a
    # relabelled one)
    unhashed = dataclasses.replace(loc, sha256="")
    with pytest.raises(Mislabelled):
        result(checked(io.BytesIO(b"x"), unhashed, Clock()))


def test_checked_serves_an_unhashed_copy_only_whole_and_under_its_uid(tmp_path):
    path = datasets.write(datasets.make_image("CT", size=16, SOPInstanceUID="1.2.3.4"),
                          tmp_path / "a.dcm")
    data = path.read_bytes()
    loc = Location("1.2.3.4", "pacs", "p", "", len(data))
    f = io.BytesIO(data)
    assert result(checked(f, loc, Clock())) is f and f.tell() == 0
    with open(path, "rb") as f:      # a file: walked over a memory map (in a thread)
        assert verify._named(f, loc) is f
    for bad, says in ((data[:-10], "truncated"), (data, "holds '1.2.3.4'")):
        other = dataclasses.replace(loc, sop_instance_uid="1.2.3.5") \
            if says.startswith("holds") else loc
        f = io.BytesIO(bad)
        with pytest.raises(Mislabelled) as e:
            result(checked(f, other, Clock()))
        assert says in str(e.value) and f.closed
    head, uid, tail = data.rpartition(b"1.2.3.4\0")      # the data set's, not the meta's
    relabelled = head + b"1.2.3.6\0" + tail
    assert relabelled.count(b"1.2.3.4\0") == 1
    with pytest.raises(Mislabelled) as e:
        result(checked(io.BytesIO(relabelled), loc, Clock()))
    assert "holds '1.2.3.6'" in str(e.value)


class Archive:
    capabilities = frozenset({"open"})
    up = True

    def __init__(self, name, data: bytes, sha: str):
        self.name, self.data, self.sha = name, data, sha
        self.asked = 0

    def open(self, uid, sha256=None):
        self.asked += 1
        return defer.succeed(Hashed(self.data, self.sha))


class BadFirst:
    name = "bad-first"

    @hookimpl
    def pacsp2p_rank_replicas(self, instance, locations, reader):
        return sorted(locations, key=lambda loc: loc.archive != "bad")


def test_a_retrieval_fails_over_a_damaged_copy_and_reports_it():
    data = b"the right bytes"
    sha = hashlib.sha256(data).hexdigest()
    bad, good = Archive("bad", b"rot", "0" * 64), Archive("good", data, sha)
    uid = "1.2.3.4"
    ref = InstanceRef(uid, CT, EXPLICIT, 15, (Location(uid, "bad", "me", sha, 15),
                                              Location(uid, "good", "me", sha, 15)))
    r = Retrieval([ref], {"bad": bad, "good": good}, "me", None,
                  Strategies(peer="me", plugins=[BadFirst()]), reactor=Clock())
    reported = []
    r.on_damaged = reported.append
    f = result(r.open(ref))
    assert f.read() == data
    assert bad.asked == 1 and good.asked == 1
    assert [(loc.archive, loc.sop_instance_uid) for loc in reported] == [("bad", uid)]
    assert r.status()["sources"]["me/bad"]["alive"], "a damaged copy is not a dead source"


# -- the admin actions' arguments ----------------------------------------------------

def test_action_arguments_are_checked():
    s, d = _Scrub(None, None), _Drain(None, None)
    assert s.parse({}) == {"rate": None} and s.parse({"rate": 0}) == {"rate": 0}
    for bad in ({"rate": -1}, {"rate": "x"}, {"rate": True}):
        with pytest.raises(ValueError):
            s.parse(bad)
    assert d.parse({"peer": "peerc"}) == {"peer": "peerc", "archive": None, "stop": False}
    for bad in ({"peer": 3}, {"archive": "x" * 300}, {"stop": "yes"}, {"peer": "a\nb"}):
        with pytest.raises(ValueError):
            d.parse(bad)
    assert check_archive_names('["local", "spare"]') == ["local", "spare"]
    for bad in ('"local"', '[1]', '["' + "x" * 300 + '"]', "not json", "[" + ",".join(
            ['"a"'] * 65) + "]"):
        with pytest.raises(InvalidArgument):
            check_archive_names(bad)


# -- placement leaves out what is being drained --------------------------------------

@dataclasses.dataclass
class Info:
    name: str
    archives: list
    archives_down: list = dataclasses.field(default_factory=list)
    draining: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Member:
    name: str
    info: Info
    state: str = "alive"


class Overlay:
    def __init__(self, members):
        self.membership = type("M", (), {"members": {m.name: m for m in members}})()
        self.offers = {}


def test_candidates_leave_out_draining_archives_here_and_on_other_peers(tmp_path):
    settings = config.from_dict({"peer": {"name": "me", "data_dir": str(tmp_path)},
                                 "cluster": {"replicas": 2}}, "t.toml", tmp_path)
    mine = {n: type("A", (), {"site": None, "up": True, "capabilities": {"store"}})()
            for n in ("local", "spare")}
    b = Member("b", Info("b", [["local", None], ["spare", None]],
                         draining={"spare": "draining"}))
    c = Member("c", Info("c", [["local", None]], draining={"local": "drained"}))
    ingest = Ingest(settings, mine, None, None, Overlay([b, c]), Clock())
    every = {(a.peer, a.name) for a in ingest.candidates()}
    assert every == {("me", "local"), ("me", "spare"), ("b", "local")}
    ingest.drain_here = {"spare"}
    assert {(a.peer, a.name) for a in ingest.candidates()} == {("me", "local"),
                                                                ("b", "local")}
    assert ingest.draining() == {("me", "spare"), ("b", "spare"), ("c", "local")}
    assert len(ingest.candidates(draining=True)) == 5         # (to list every archive)
