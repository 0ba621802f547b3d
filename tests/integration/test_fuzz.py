"""Hostile input against a real peer (issue 11): a seeded generator sends thousands of
malformed PDUs, DIMSE messages and data sets, then the peer must still be what it was.

The generator is ``pacsp2p.testing.fuzz`` (``bench/fuzz.py`` runs the same for 100,000
inputs). It prints its seed; the same seed makes the same inputs again::

    PACSP2P_FUZZ_SEED=1234 .venv/bin/pytest -s tests/integration/test_fuzz.py

``PACSP2P_FUZZ_COUNT`` changes the number of inputs (default 3,000). Inputs are sent kind
by kind (every kind of ``fuzz.KINDS`` gets its share, 8 connections at a time) so that a
traceback in the peer's log can be named with the kind of input that caused it.

After the run: the peer process is alive, answers C-ECHO, returns the instances stored
before the run byte-identical by C-GET, its RSS grew by less than 200 MiB (at the end and
at its peak, sampled while the inputs arrive), no path-like
UID made a file outside its data directory, no C-STORE with an invalid UID was answered
Success, and its log has no traceback and no "Unhandled".
"""
from __future__ import annotations

import os
import random

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets, fuzz, storescu, wait_for_echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.ports import LOOPBACK, free_port

SEED = int(os.environ.get("PACSP2P_FUZZ_SEED") or random.SystemRandom().randrange(1 << 31))
COUNT = int(os.environ.get("PACSP2P_FUZZ_COUNT") or 3000)
CONCURRENCY = 8
TIME_LIMIT = 75.0          # no new input after this many seconds (a failure if reached)
RSS_GROWTH_MIB = 200


def test_hostile_inputs_leave_the_peer_serving(tmp_path):
    print(f"\nfuzz seed {SEED} ({COUNT} inputs); replay with PACSP2P_FUZZ_SEED={SEED}")
    canary = tmp_path / "canary"          # where every path-like UID points
    canary.mkdir()
    nobody = free_port()                  # a C-MOVE destination nobody listens on
    peer = Peer(tmp_path / "peer", name="fuzz",
                destinations={"FUZZDEST": f"{LOOPBACK}:{nobody}"})
    with peer:
        watch = fuzz.LogWatch(peer.log_path)
        files = datasets.make_study(tmp_path / "study", size=32, patient_id="FUZZ0001",
                                    series=(("CT", 2, ExplicitVRLittleEndian),
                                            ("MR", 1, ExplicitVRLittleEndian)))
        storescu(peer.port, peer.ae_title, files)
        expected = dn.dataset_hashes(files)
        study = dn.study_of(files)
        objects = peer.data_dir / "archives" / "local" / "objects"
        fans = [p.name for p in objects.iterdir() if p.is_dir()] if objects.is_dir() else []
        gen = fuzz.Generator(SEED, called_ae=peer.ae_title, study_uid=study,
                             sop_uids=list(expected), move_dest="FUZZDEST",
                             canary=fuzz.Canary(canary, objects, fans))
        rss_before = fuzz.rss_kib(peer.pid)

        with fuzz.RssPeak(peer.pid) as rss:
            report = fuzz.run(LOOPBACK, peer.port, gen, COUNT, concurrency=CONCURRENCY,
                              time_limit=TIME_LIMIT, by_kind=True, between_kinds=watch)
        print(report.summary())

        problems: list[str] = []
        if report.sent < COUNT:
            problems.append(f"only {report.sent} of {COUNT} inputs sent in {TIME_LIMIT} s")
        for r in report.failures():
            problems.append(f"case {r.index} [{r.kind}] {r.note[:100]}: "
                            f"{r.violation or r.outcome} (statuses "
                            f"{[hex(s) for s in r.statuses]})")
        alive = peer.alive
        if not alive:
            problems.append(f"the peer died (exit code {peer.process.returncode})")
        else:
            try:
                wait_for_echo(peer.port, peer.ae_title, timeout=60,
                              alive=lambda: peer.alive)
            except (RuntimeError, TimeoutError) as e:
                problems.append(f"no C-ECHO after the run: {e}")
            got_dir = tmp_path / "got"
            proc = dn.getscu(peer.port, peer.ae_title, got_dir,
                             {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
            got = dn.dataset_hashes(p for p in got_dir.iterdir() if p.is_file())
            if {u: got.get(u) for u in expected} != expected:
                problems.append(f"C-GET after the run: {len(got)} instances, not the "
                                f"{len(expected)} stored before byte-identical:\n"
                                f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            rss_after = fuzz.rss_kib(peer.pid)
            grown = (rss_after - rss_before) / 1024
            peak = (rss.peak - rss_before) / 1024
            print(f"peer RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB "
                  f"(peak {rss.peak / 1024:.0f} MiB)")
            if grown >= RSS_GROWTH_MIB:
                problems.append(f"peer RSS grew by {grown:.0f} MiB "
                                f"({rss_before // 1024} -> {rss_after // 1024} MiB)")
            if peak >= RSS_GROWTH_MIB:
                problems.append(f"peer RSS peaked {peak:.0f} MiB above where it started "
                                f"({rss_before // 1024} -> {rss.peak // 1024} MiB) while "
                                f"the inputs arrived")
        leaked = gen.canary.leaked()
        if leaked:
            problems.append(f"{len(leaked)} files made outside the data directory by "
                            f"path-like UIDs, e.g. {[str(p) for p in leaked[:5]]}")
        log_size = peer.log_path.stat().st_size - watch.start
        print(f"peer log: {log_size / 1024:.0f} KiB for {report.sent} inputs "
              f"({log_size / max(report.sent, 1):.0f} bytes per input)")
    forged = [line for line in peer.log_path.read_bytes().splitlines()
              if line.lstrip().startswith(fuzz.INJECTED)]
    if forged:
        problems.append(f"{len(forged)} log lines forged by a line feed in an input, e.g. "
                        f"{forged[:3]}")
    found = watch.problems()
    if found:
        problems.append(f"{len(found)} tracebacks / 'Unhandled' in the peer's log "
                        f"({peer.log_path}):\n{watch.summary()}")
    if problems:
        pytest.fail(f"fuzz seed {SEED}:\n" + "\n".join(problems), pytrace=False)
