"""``[overlay] push_port``: a fixed port (for a firewall between sites) is the one the
peer listens on for pushed copies; -1 (none) has writers push to it over the overlay link
(AMP), as to an older peer. Either way every copy reaches its holder byte-identical.
Two real twistd peers, R=2 (each instance on both), DCMTK storescu and getscu."""
from __future__ import annotations

import socket

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until
from pacsp2p.testing.ports import free_port


def test_a_fixed_push_port_and_none_both_replicate(tmp_path):
    fixed = free_port()
    c = Cluster(tmp_path / "c", config={"cluster": {"replicas": 2}})
    try:
        a = c.add("peera", overlay={"push_port": fixed})
        b = c.add("peerb", overlay={"push_port": -1})
        wait_until(lambda: members(a).get("peerb") == "alive" and
                   members(b).get("peera") == "alive", 120, 0.2, "both alive")
        with socket.create_connection(("127.0.0.1", fixed), timeout=60):
            pass                                  # peera listens on the port it was given
        for writer, holder, pid in ((b, a, "PUSHFIX1"), (a, b, "PUSHNONE")):
            files = datasets.make_study(tmp_path / pid, patient_id=pid, size=64,
                                        series=[("MR", 6, "1.2.840.10008.1.2.1")])
            before = get_json(writer, "status")["ingest"]["copies"]["pushed"]
            proc = storescu(writer.port, writer.ae_title, files, timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            after = get_json(writer, "status")["ingest"]["copies"]["pushed"]
            assert after - before == len(files), (pid, before, after)   # all pushed
            sent = dn.dataset_hashes(files)
            study = dn.study_of(files)
            # the holder records its copies in a group commit sent after the Success (the
            # writer keeps the first copy: first_copy = "auto"): a C-GET at once found none
            wait_until(lambda: sum(any(x["peer"] == holder.name for x in r["replicas"])
                                   for r in get_json(holder, f"where?study={study}"))
                       == len(files), 60, 0.2, f"{pid}: the holder's copies recorded")
            got = holder.data_dir / "got" / pid
            proc = dn.getscu(holder.port, holder.ae_title, got, {
                "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert dn.dataset_hashes(sorted(got.iterdir())) == sent, pid
            held = dn.by_sop_uid(dn.archive_files(holder.data_dir))
            assert set(sent) <= set(held), pid   # on the holder's own archive
    finally:
        c.stop()
