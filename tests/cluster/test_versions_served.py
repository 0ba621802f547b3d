"""A second version of an instance is never served as the first, and repair counts the
copies of the version the catalog describes.

With ``[strategies] first_copy = "local"`` a second version of an instance (same SOP
Instance UID, other bytes) sent to a peer holding no copy of the first is kept there as
a plain copy (and beside the first on a holder, a conflict). The catalog named both
versions' copies as locations of the instance: a C-GET, C-MOVE or a study's parallel
retrieval sent either version, and repair counted copies per instance, so the first
version left with one copy after a loss was not copied again (the second's plain copy
made up the count).

Real peers (twistd processes, R=2, W=2, ``repair_after`` 5 s); the second versions sent
by DCMTK storescu; retrieved with DCMTK getscu / movescu (TCP_NODELAY=1, files kept as
received) at every peer, ROUNDS times each; what arrived compared byte for byte (data set
SHA-256) with the first version sent.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pacsp2p.testing import StoreSCP
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import (get_json, members, patience, store_study,
                                     wait_replicated, wait_until)
from pacsp2p.testing.dcmtk import dataset_sha256
from pacsp2p.testing.release import release

from test_conflict_commit import send_version

N = 4
PACSP2P = Path(sys.executable).parent / "pacsp2p"
ROUNDS = 4


CONFIG = {"cluster": {"replicas": 2, "write_quorum": 2, "repair_after": 5},
          "strategies": {"first_copy": "local"}}
BEFORE_VERSIONS = "1a343bf487968816682b21bfb031996e50f88d2e"     # the last before schema 7


def second_versions(cluster, tmp_path, patient: str, peers: int = 3, started=None):
    """*peers* peers (R = W = 2, local-first, the C-MOVE destination STORESCP known), or
    those *started*; a study of N stored at the first, then a second version of each
    instance stored at a peer holding no copy of the first. (peers, study, {uid: first
    version's data set SHA-256}, {uid: peers holding the first version})."""
    if started is None:
        cluster.config = CONFIG
        started = list(cluster.start(peers))
    cluster.wait_mesh()
    study, files = store_study(started[0], tmp_path / "v1", patient, N)
    first = {dn.sop_uid(f): dataset_sha256(f) for f in files}
    rows = {r["instance"]: {x["peer"] for x in r["replicas"]}
            for r in wait_replicated(started[0], study, N)}
    for i, f in enumerate(files):
        other = next(p for p in started if p.name not in rows[dn.sop_uid(f)])
        got = send_version(other, f, tmp_path / "v2" / f"{i}.dcm", "version 2")
        assert "Success" in got, f"{other.name}: {got}"
    # every peer knows the second versions' copies: 3 locations per instance
    for p in started:
        wait_until(lambda p=p: sum(len(r["replicas"]) for r in get_json(
            p, f"where?study={study}", 30)) >= 3 * N, patience(60), 0.5,
            f"{p.name}: the second versions' copies recorded")
    return started, study, first, rows


def received(directory) -> dict:
    """{uid: data set SHA-256} of the files in *directory*."""
    return {dn.sop_uid(f): dataset_sha256(f) for f in directory.iterdir()}


def test_only_the_first_version_is_retrieved_at_every_peer(cluster, tmp_path):
    with StoreSCP(tmp_path / "scp", extra=["+B"]) as scp:
        cluster.destinations = {"STORESCP": scp.address}
        peers, study, first, _ = second_versions(cluster, tmp_path, "VERSIONSERVED")
        wrong, served = [], 0
        for r in range(ROUNDS):
            for p in peers:
                # a study's C-GET: its instances read from every source at once
                out = tmp_path / f"get-{p.name}-{r}"
                proc = dn.getscu(p.port, p.ae_title, out, {
                    "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
                got = received(out)
                assert set(got) == set(first), proc.stdout[-2000:] + proc.stderr[-2000:]
                # each instance alone
                for uid in first:
                    one = tmp_path / f"one-{p.name}-{r}-{uid[-6:]}"
                    dn.getscu(p.port, p.ae_title, one, {
                        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                        "SOPInstanceUID": uid})
                    got.update({f"{k} alone": v for k, v in received(one).items()})
                # C-MOVE of the study to STORESCP
                dn.clear(scp.directory)
                proc = dn.movescu(p.port, p.ae_title, "STORESCP", {
                    "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
                moved = {dn.sop_uid(f): dataset_sha256(f) for f in scp.files()}
                assert set(moved) == set(first), proc.stdout[-2000:] + proc.stderr[-2000:]
                got.update({f"{k} moved": v for k, v in moved.items()})
                for key, sha in got.items():
                    served += 1
                    if sha != first[key.split()[0]]:
                        wrong.append(f"{p.name} round {r}: {key}")
        assert served == ROUNDS * len(peers) * N * 3
        assert not wrong, f"{len(wrong)} of {served} retrievals sent the second version: " \
                          f"{wrong[:12]}"
        # both versions stay visible to an operator: where names every copy, its version
        rows = get_json(peers[0], f"where?study={study}", 30)
        assert all(len(r["replicas"]) == 3 for r in rows), rows
        assert all(sorted(x.get("version") for x in r["replicas"]) ==
                   ["current", "current", "other"] for r in rows), rows
        a = peers[0]
        proc = subprocess.run([str(PACSP2P), "where", "--config", str(a.config_path),
                               "--study", study], capture_output=True, text=True,
                              timeout=patience(60))
        assert proc.stdout.count("(other version)") == N, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith(
            f"{N} instances, live copies min 2 max 2"), proc.stdout
        proc = subprocess.run([str(PACSP2P), "status", "--config", str(a.config_path)],
                              capture_output=True, text=True, timeout=patience(60))
        assert f"{N} held in two versions or more" in proc.stdout, proc.stdout
        with urllib.request.urlopen(f"{a.admin_url}/console/study/{study}",
                                    timeout=patience(60)) as page:
            assert page.read().decode().count("(other version: not served)") == N


def test_repair_brings_the_first_version_back_to_two_copies(cluster, tmp_path):
    """Five peers; the first version of each instance on two (the writer's, local-first,
    and one other), the second's plain copies on one or two others. The writer killed for
    good: before, each instance still had two or more live copies (of either version)
    and nothing was copied: the first version was left on one peer. Now it is copied to a
    peer that holds neither version (five peers: there is always one)."""
    peers, study, first, rows = second_versions(cluster, tmp_path, "VERSIONREPAIR", 5)
    victim = peers[0]                 # local-first: it holds the first version of each
    assert all(victim.name in held for held in rows.values()), rows
    assert victim.kill9() == -9
    others = [p for p in peers if p is not victim]
    for p in others:
        wait_until(lambda p=p: members(p).get(victim.name) == "dead", 20, 0.2,
                   f"{p.name} sees {victim.name} dead")
    start = time.time()

    def first_version_on(peers) -> dict:
        """{uid: live peers whose archive holds the first version as the instance's file
        (not a conflicting version kept beside another one)}."""
        held = {}
        for p in peers:
            for f in dn.archive_files(p.data_dir):
                if f.name.count(".") == 1 and dataset_sha256(f) == first.get(dn.sop_uid(f)):
                    held.setdefault(dn.sop_uid(f), set()).add(p.name)
        return held
    wait_until(lambda: all(len(first_version_on(others).get(uid, ())) >= 2 for uid in first),
               patience(120), 1.0, "the first version of every instance on 2 live peers again")
    took = time.time() - start
    # where says so too (once the copies' facts reach it): two live copies of the current
    # version, the others 'other'
    def current_twice():
        rows = get_json(others[0], f"where?study={study}", 30)
        return len(rows) == N and all(sum(
            1 for x in r["replicas"] if x["available"] and x["version"] == "current") >= 2
            for r in rows)
    wait_until(current_twice, patience(60), 0.5,
               f"{others[0].name}'s where: 2 live copies of the current version ({took:.0f} s)")


def test_beside_a_peer_of_the_release_before_only_the_first_is_served(
        cluster, tmp_path, tmp_path_factory):
    """The first version stored at a peer of the release before schema 7 (its sync
    batches carry no copy stamps: its instance rows' stamps stand in); the peers of this
    release serve only the first version, at every retrieval."""
    old = release(BEFORE_VERSIONS, tmp_path_factory.mktemp("release-before-versions"))
    cluster.config = CONFIG
    c = cluster.add("peerc", twistd=old)
    a, b = cluster.add("peera"), cluster.add("peerb")
    peers, study, first, _ = second_versions(cluster, tmp_path, "VERSIONMIXED",
                                             started=[c, a, b])
    wrong, served = [], 0
    for r in range(ROUNDS):
        for p in (a, b):
            out = tmp_path / f"get-{p.name}-{r}"
            dn.getscu(p.port, p.ae_title, out, {"QueryRetrieveLevel": "STUDY",
                                                "StudyInstanceUID": study})
            got = received(out)
            assert set(got) == set(first), (p.name, sorted(got))
            served += len(got)
            wrong += [f"{p.name} round {r}: {u}" for u, sha in got.items() if sha != first[u]]
    assert not wrong, f"{len(wrong)} of {served} sent the second version: {wrong[:12]}"
