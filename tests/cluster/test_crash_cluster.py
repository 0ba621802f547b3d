"""kill -9 of a peer at several moments while a 3-peer cluster (R=2, W=2) takes a stream
of C-STOREs, restart it: every instance that got a Success answer is retrievable
byte-identical afterwards, from the peer that was killed and from another, with two
available replicas; and everything the cluster lists is retrievable (a C-MOVE of each
study ends in Success: no half-stored instance is listed).

Rounds (a bounded loop; the moments are drawn from a seeded generator and printed):
the receiving peer itself, a peer that holds replicas while the sender goes on, and the
receiving peer again right after the restart of the previous round. The sender is a
pynetdicom client sending each file's bytes, so the test knows which C-STOREs got
Success.
"""
from __future__ import annotations

import os
import random
import threading

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context

from pacsp2p.adapters.layout import relative
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until

N = 200
SUCCESS = 0x0000
SEED = int(os.environ.get("PACSP2P_CRASH_SEED", "20261206"))   # another: other moments


def send(receiver, files, kill_after: int, acked: list, failed: list, errors: list,
         reached: threading.Event) -> None:
    """C-STORE *files* to *receiver* one by one; *reached* once *kill_after* are acked."""
    try:
        with dn.association(receiver.port, receiver.ae_title,
                            [build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                            timeout=60) as assoc:
            for path in files:
                if not assoc.is_established:
                    break
                rsp = assoc.send_c_store(path)
                if "Status" not in rsp:
                    errors.append(f"{path.name}: no response")   # the receiver is gone
                    break
                if rsp.Status == SUCCESS:
                    acked.append(dn.sop_uid(path))
                    if len(acked) == kill_after:
                        reached.set()
                else:
                    failed.append(f"{path.name}: {rsp.Status:#06x}")
    except Exception as e:                                   # the receiver vanished
        errors.append(repr(e))
    finally:
        reached.set()


def available_holders(peer, study: str) -> dict[str, set[str]]:
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: {x["peer"] for x in r["replicas"] if x["available"]}
            for r in rows}


@pytest.mark.parametrize("round_no", [0, 1, 2])
def test_kill_9_at_a_random_moment_loses_no_acknowledged_instance(trio, dest, tmp_path,
                                                                   round_no):
    a, b, c = trio
    rng = random.Random(SEED + round_no)
    receiver, victim = [(a, a), (a, b), (c, c)][round_no]
    kill_after = rng.randrange(5, N - 20)
    print(f"\nround {round_no}: store at {receiver.name}, kill -9 {victim.name} after "
          f"{kill_after} acknowledged")
    files = datasets.make_study(tmp_path / "study", patient_id=f"CRASH{round_no}", size=16,
                                seed=round_no, series=[("CT", N, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    acked, failed, errors = [], [], []
    reached = threading.Event()
    sender = threading.Thread(target=send, args=(receiver, files, kill_after, acked, failed,
                                                 errors, reached), daemon=True)
    sender.start()
    assert reached.wait(300), "sender stalled"
    assert victim.kill9() == -9
    sender.join(300)
    assert not sender.is_alive(), "sender hung after the kill"
    print(f"acknowledged {len(acked)}, failed {len(failed)} {failed[:3]}, {errors[:2]}")
    assert len(acked) >= kill_after
    if victim is not receiver:               # the stream went on: only those in flight
        assert len(acked) >= N - 10, failed  # at the kill may fail

    victim.restart()
    trio.wait_mesh(timeout=60)
    acked_set = set(acked)

    def settled(at):
        held = available_holders(at, study)
        return acked_set <= set(held) and all(len(held[u]) >= 2 for u in acked_set)

    for at in (victim, b if victim is not b else a):
        # the catalog of the peer asked is the whole cluster's once sync caught up
        wait_until(lambda: settled(at), 120, interval=1.0,
                   what=f"{at.name} sees every acknowledged instance on 2 peers")
        dn.clear(dest.directory)
        proc = dn.movescu(at.port, at.ae_title, "STORESCP",
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                          timeout=300)
        assert "Final Move Response (Success)" in proc.stderr, proc.stderr[-3000:]
        got = dn.dataset_hashes(dest.files())
        missing = acked_set - set(got)
        assert not missing, f"{at.name}: {len(missing)} acknowledged not retrieved"
        assert all(got[u] == sent[u] for u in got), f"{at.name}: bytes differ"

    # what the catalogs say is what the disks hold: every available copy listed of an
    # acknowledged instance is a file in that peer's archive (a stand-in dropped after
    # the hand-off is no longer listed)
    peers = {p.name: p for p in trio}

    def listed_copies_exist():
        for at in trio:
            held = available_holders(at, study)
            for u in acked_set:
                for name in held.get(u, ()):
                    f = peers[name].data_dir / "archives" / "local" / "objects" / relative(u)
                    if not f.exists():
                        raise AssertionError(f"{at.name} lists {u} on {name}: no file")
        return True
    wait_until(listed_copies_exist, 60, interval=1.0, what="listed copies on disk")
