"""Every version of an instance is brought back to ``replicas`` copies after a loss, not
only the current one (``catalog.copies``: each version counted apart): a second version
was acknowledged (Success), so the loss of its holder must not lose it.

Real peers (five twistd processes, R=2, W=2, ``first_copy = "local"``, ``repair_after``
5 s); a study of N MR stored at the first peer, then a second version of each instance
(ImageComments changed) sent by DCMTK storescu to two peers holding no copy of the
first (a plain copy at each). One of those two killed for good: before, repair counted
the first version's copies only (two, live: nothing to do) and the second version was
left on one peer; now it is copied from there to a peer holding neither version.
"""
from __future__ import annotations

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import (get_json, members, patience, store_study,
                                     wait_replicated, wait_until)
from pacsp2p.testing.dcmtk import dataset_sha256

from test_conflict_commit import send_version
from test_versions_served import CONFIG, N


def test_a_second_version_that_lost_a_copy_is_copied_again(cluster, tmp_path):
    cluster.config = CONFIG
    peers = list(cluster.start(5))
    cluster.wait_mesh(timeout=patience(60))
    study, files = store_study(peers[0], tmp_path / "v1", "VERSIONREPAIR2", N)
    held = {r["instance"]: {x["peer"] for x in r["replicas"]}
            for r in wait_replicated(peers[0], study, N)}
    second, senders = {}, {}
    for i, f in enumerate(files):
        uid = dn.sop_uid(f)
        outside = [p for p in peers if p.name not in held[uid]]
        out = tmp_path / "v2" / f"{i}.dcm"
        for p in outside[:2]:                    # the same bytes to two of them
            got = send_version(p, f, out, "version 2")
            assert "Success" in got, f"{p.name}: {got}"
        second[uid], senders[uid] = dataset_sha256(out), [p.name for p in outside[:2]]

    def holders(of: dict, among) -> dict:
        """{uid: names of *among* whose archive holds version *of*[uid] as the
        instance's file (not a conflicting version kept beside another)}."""
        out: dict = {}
        for p in among:
            for f in dn.archive_files(p.data_dir):
                if f.name.count(".") == 1 and dataset_sha256(f) == of.get(dn.sop_uid(f)):
                    out.setdefault(dn.sop_uid(f), set()).add(p.name)
        return out
    wait_until(lambda: all(len(holders(second, peers).get(u, ())) >= 2 for u in second),
               patience(60), 0.5, "the second version of each on two peers")
    # the peer that received the second version of most instances first, killed
    victim = max(peers, key=lambda p: sum(s[0] == p.name for s in senders.values()))
    assert victim.kill9() == -9
    others = [p for p in peers if p is not victim]
    for p in others:
        wait_until(lambda p=p: members(p).get(victim.name) == "dead", 20, 0.2,
                   f"{p.name} sees {victim.name} dead")
    wait_until(lambda: all(len(holders(second, others).get(u, ())) >= 2 for u in second),
               patience(120), 1.0, "the second version of every instance on 2 live peers")
    first = {dn.sop_uid(f): dataset_sha256(f) for f in files}
    assert all(len(holders(first, others).get(u, ())) >= 2 for u in first)
    rows = get_json(others[0], f"where?study={study}", 30)
    assert len(rows) == N


def test_a_second_version_whose_located_copy_is_lost_is_copied_from_its_conflict(
        cluster, tmp_path):
    """A second version received once is one plain copy (a location: the peer it was
    sent to) and one copy beside the first version on a holder (a conflict: a file of
    that archive, no location). Its plain copy's peer killed: before, no located copy
    was left and nothing was copied (the version only in the holder's conflict file);
    now the holder copies it from its conflict file to peers holding neither version."""
    cluster.config = CONFIG
    peers = list(cluster.start(5))
    cluster.wait_mesh(timeout=patience(60))
    n = 2 * N
    study, files = store_study(peers[0], tmp_path / "v1", "VERSIONCONFLICT", n)
    held = {r["instance"]: {x["peer"] for x in r["replicas"]}
            for r in wait_replicated(peers[0], study, n)}
    second, sender = {}, {}
    for i, f in enumerate(files):
        uid = dn.sop_uid(f)
        out = tmp_path / "v2" / f"{i}.dcm"
        p = next(p for p in peers if p.name not in held[uid])
        got = send_version(p, f, out, "version 2")
        assert "Success" in got, f"{p.name}: {got}"
        second[uid], sender[uid] = dataset_sha256(out), p.name
    for p in peers:                # every peer knows the second versions' located copies
        wait_until(lambda p=p: sum(len(r["replicas"]) for r in get_json(
            p, f"where?study={study}", 30)) >= 3 * n, patience(60), 0.5,
            f"{p.name}: the second versions' copies recorded")

    def plain(among) -> dict:
        """{uid: names of *among* whose archive holds the second version as the
        instance's file (not kept beside another version)}."""
        out: dict = {}
        for p in among:
            for f in dn.archive_files(p.data_dir):
                if f.name.count(".") == 1 and dataset_sha256(f) == second.get(dn.sop_uid(f)):
                    out.setdefault(dn.sop_uid(f), set()).add(p.name)
        return out
    # the instances whose second version's other copy went beside the first (placement
    # chose a holder of the first): one plain copy each, at its sender
    alone = [u for u, names in plain(peers).items() if names == {sender[u]}]
    assert alone, "every second version's other copy went to a peer without the first"
    victim = max(peers, key=lambda p: sum(sender[u] == p.name for u in alone))
    alone = [u for u in alone if sender[u] == victim.name]
    assert victim.kill9() == -9
    others = [p for p in peers if p is not victim]
    for p in others:
        wait_until(lambda p=p: members(p).get(victim.name) == "dead", 20, 0.2,
                   f"{p.name} sees {victim.name} dead")
    wait_until(lambda: all(len(plain(others).get(u, ())) >= 2 for u in alone),
               patience(120), 1.0, f"the second version of {len(alone)} instance(s) whose "
               "located copy was lost, on 2 live peers again (from the conflict copy)")
