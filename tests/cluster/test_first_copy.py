"""``[strategies] first_copy`` left at its default (``"auto"``: ``"local"`` where
rendezvous ranks) with real peers: a new instance's first copy on
an archive of the peer that received it, the other copy by placement on another peer;
repair after a holder dies restores R and trims nothing; the balance guard
(``first_copy_slack``) sends copies elsewhere once the receiving archive holds more than
its share.

Three peers (separate ``twistd pacsp2p`` processes), R=2, W=2, ``repair_after`` 5 s;
studies sent by DCMTK ``storescu`` (TCP_NODELAY=1); copies read back from ``GET /where``
and from the peers' disks; peers killed with ``kill -9`` by PID.
"""
from __future__ import annotations

import time
from collections import Counter

import pytest

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import (Cluster, get_json, members, patience, store_study,
                                     wait_replicated, wait_until)

REPAIR_AFTER = 5


def config(slack: float = 1.0) -> dict:
    return {"cluster": {"replicas": 2, "write_quorum": 2, "repair_after": REPAIR_AFTER},
            "strategies": {"first_copy_slack": slack}}


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(slack: float = 1.0):
        c = Cluster(tmp_path / f"cluster{len(made)}", None, config(slack))
        made.append(c)
        c.start(3)
        c.wait_mesh(timeout=30)
        return c
    yield make
    for c in made:
        c.stop()


def holders(rows) -> dict[str, list[str]]:
    """{instance: [peer, ...]} of ``GET /where`` rows."""
    return {r["instance"]: [x["peer"] for x in r["replicas"]] for r in rows}


def live(peer, study: str) -> dict[str, set[str]]:
    rows = get_json(peer, f"where?study={study}", 30)
    return {r["instance"]: {x["peer"] for x in r["replicas"] if x["available"]}
            for r in rows}


def first(peer) -> dict:
    return get_json(peer)["ingest"]["first_copy"]


def on_disk(peer) -> set[str]:
    return {dn.sop_uid(f) for f in dn.archive_files(peer.data_dir)}


def test_every_instance_keeps_a_copy_on_the_peer_it_arrived_at(cluster, tmp_path):
    n = 40
    a, b, c = cluster()
    for writer, others in ((a, (b, c)), (b, (a, c))):
        study, files = store_study(writer, tmp_path / writer.name, f"FIRST{writer.name}", n)
        placed = holders(wait_replicated(writer, study, n))
        sent = {dn.sop_uid(f) for f in files}
        assert set(placed) == sent
        assert all(len(p) == 2 == len(set(p)) and writer.name in p
                   for p in placed.values()), placed
        assert sent <= on_disk(writer), "not every instance on the receiving peer's disk"
        # the other copies go by placement among the other peers: both take some
        second = Counter(x for p in placed.values() for x in p if x != writer.name)
        assert set(second) == {o.name for o in others} and sum(second.values()) == n, \
            second
        print(f"\n{writer.name}: second copies {dict(second)}")
    assert first(a) == {"mode": "auto", "slack": 1.0, "local": n, "guarded": 0}
    assert first(b)["local"] == n
    # nothing is surplus for repair: 2 copies each, whatever placement's own order
    for p in (a, b, c):
        wait_until(lambda p=p: get_json(p)["under_replicated"]["surplus"] == 0 and
                   get_json(p)["under_replicated"]["instances"] == 0, 30, 0.5,
                   f"{p.name}: nothing short, nothing surplus")
        assert get_json(p)["repair"]["dropped"] == 0


def test_repair_after_a_holder_dies_restores_two_copies_and_trims_none(cluster,
                                                                       tmp_path):
    n = 40
    a, b, c = cluster()
    study, files = store_study(a, tmp_path / "s", "FIRSTREP", n)
    placed = holders(wait_replicated(a, study, n))
    on_c = [u for u, p in placed.items() if c.name in p]
    assert on_c and all(a.name in p for p in placed.values())

    assert c.kill9() == -9
    for p in (a, b):
        wait_until(lambda p=p: members(p).get(c.name) == "dead", 20, 0.2,
                   f"{p.name} sees {c.name} dead")
    wait_until(lambda: all(len(x) == 2 for x in live(a, study).values()), 120, 0.5,
               "every instance has 2 live copies again")
    done = sum(get_json(p)["repair"]["done"] for p in (a, b))
    assert done == len(on_c), (done, len(on_c))
    # every instance on a and b now, a's first copies untouched
    sent = {dn.sop_uid(f) for f in files}
    assert sent <= on_disk(a) and sent <= on_disk(b)
    # and, once the copies have settled, nothing is trimmed: two live copies are R
    settle = time.monotonic() + REPAIR_AFTER + 2
    for p in (a, b):
        wait_until(lambda p=p: get_json(p)["repair"]["state"] == "idle" and
                   get_json(p)["under_replicated"]["instances"] == 0 and
                   time.monotonic() > settle, 60, 0.5, f"{p.name}: repaired, idle")
        under = get_json(p)["under_replicated"]
        assert under["surplus"] == 0, under
        assert get_json(p)["repair"]["dropped"] == 0
    assert all(x == {a.name, b.name} for x in live(a, study).values())


def test_the_balance_guard_places_by_the_strategy_once_the_archive_holds_too_many(
        cluster, tmp_path):
    """Slack 0: our archive goes first only while it holds at most the mean count of
    the alive archives (counted every 10 s). After a first study stored here it holds
    one copy of each instance, the others half as many each: the next C-STOREs are
    placed by rendezvous, so some of them keep no copy here."""
    a, _b, _c = cluster(slack=0.0)
    n = 30
    study, _ = store_study(a, tmp_path / "s0", "GUARD000", n)
    wait_replicated(a, study, n)
    assert first(a)["local"] >= 1

    rounds = 0                 # a few C-STOREs at a time until the counts are refreshed

    def guarded():
        nonlocal rounds
        rounds += 1
        store_study(a, tmp_path / f"r{rounds}", f"GUARDR{rounds:02d}", 2)
        return first(a)["guarded"] > 0
    wait_until(guarded, patience(60), 1.0, "the guard engaged")
    before = first(a)
    study, files = store_study(a, tmp_path / "s1", "GUARD001", n)
    placed = holders(wait_replicated(a, study, n))
    after = first(a)
    assert after["guarded"] - before["guarded"] == n, (before, after)
    assert after["local"] == before["local"], (before, after)
    elsewhere = [u for u, p in placed.items() if a.name not in p]
    assert all(len(set(p)) == 2 for p in placed.values()), placed
    # rendezvous puts no copy on peera for ~1/3 of them (P(none of 30) = (2/3)^30)
    assert elsewhere, placed
    assert not set(elsewhere) & on_disk(a)
    print(f"\nguarded after {rounds} round(s): {len(elsewhere)} of {n} with no copy on "
          f"{a.name}")
