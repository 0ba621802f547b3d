"""The background scrub (issue 13.3) of a real peer: a full pass every
``scrub_interval``, reading at ``scrub_rate`` (measured within 20 %), finding a damaged
copy on its own (logged with the instance UID, counted in status), and resuming where it
stopped after a restart.

One peer (a separate `twistd pacsp2p` process) alone with its embedded archive: a
damaged copy has no other replica here, so it is reported, not replaced (the cluster
tests replace them).
"""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until

N = 40                  # 256x256x16-bit: ~131 KB each, ~5.3 MB in all
RATE = 1.0              # MB/s


def scrub_status(peer) -> dict:
    return get_json(peer, timeout=30)["scrub"]


def test_background_passes_keep_their_rate_find_damage_and_resume(tmp_path):
    files = datasets.make_study(tmp_path / "study", patient_id="SCRUBBG", size=256,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    peer = Peer(tmp_path / "peer", config={"cluster": {"scrub_interval": 8,
                                                       "scrub_rate": RATE}})
    peer.start()
    try:
        storescu(peer.port, peer.ae_title, files, timeout=120)
        held = dn.by_sop_uid(dn.archive_files(peer.data_dir))
        assert len(held) == N
        uid, path = sorted(held.items())[0]
        data = bytearray(path.read_bytes())
        data[-64] ^= 0xFF
        path.write_bytes(bytes(data))
        st = scrub_status(peer)
        assert st["state"] == "idle" and st["last"] is None, st      # not before 8 s

        # the first background pass: at the rate, and it finds the damage by itself
        wait_until(lambda: scrub_status(peer)["last"] is not None, 60, 0.5,
                   "a background pass ran")
        last = scrub_status(peer)["last"]
        assert last["why"] == "background", last
        assert last["checked"] == N and last["damaged"] == 1 and last["unrepaired"] == 1
        assert last["damaged_uids"] == [uid]
        print(f"\nbackground pass: {last['bytes'] / 1e6:.2f} MB in "
              f"{last['finished'] - last['started']:.2f} s = {last['MB_per_s']} MB/s "
              f"(scrub_rate {RATE})")
        assert 0.8 * RATE <= last["MB_per_s"] <= 1.2 * RATE, last
        log = peer.log_path.read_text()
        assert f"the copy of {uid} on archive local is damaged" in log
        assert f"{uid} on archive local could not be replaced: no other replica" in log
        data[-64] ^= 0xFF                            # mended by hand
        path.write_bytes(bytes(data))

        # the next pass, stopped halfway by a restart, goes on where it was
        first = last["id"]
        wait_until(lambda: (scrub_status(peer)["pass"] or {}).get("checked", 0) >= N // 3,
                   60, 0.2, "the second pass is a third through")
        running = scrub_status(peer)["pass"]
        assert running["id"] == first + 1, running
        peer.restart()
        wait_until(lambda: (scrub_status(peer)["last"] or {}).get("id") == first + 1, 60,
                   0.5, "the second pass finished after the restart")
        second = scrub_status(peer)["last"]
        assert f"scrub: resuming pass {first + 1} (background)" in peer.log_path.read_text()
        assert second["checked"] == N and second["damaged"] == 0, second
        assert second["started"] == running["started"]
        assert scrub_status(peer)["totals"]["damaged"] == 1
    finally:
        peer.stop()
