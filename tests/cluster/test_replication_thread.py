"""A replicated C-STORE whose copy the writer keeps is recorded by the writer thread
(issue 15 item 4): when placement's first wave is one archive of the writer's and a
push to each other holder, the thread that kept the file records it with a hint for each
pushed copy, and the thread that sees the last part done (the copy here, or a pushed
copy's answer) answers Success; the reactor only sends the pushed copies' commits and
drops the hints once they are recorded. Real peers (three twistd processes, R=2, W=2),
DCMTK storescu."""
from __future__ import annotations

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, store_study, wait_until

N = 90
SYNC = 60.0


def test_the_writer_thread_records_its_copy_and_no_hint_is_left(trio, tmp_path):
    a = trio[0]
    study, files = store_study(a, tmp_path / "s", "THREAD01", N)

    def settled():
        c = get_json(a, "status")["catalog"]
        return c.get("locations", 0) >= 2 * N and c.get("hints", 1) == 0
    wait_until(settled, SYNC, interval=0.5, what="2 copies of each recorded, no hint left")

    rows = get_json(a, f"where?study={study}", 30)
    assert len(rows) == N
    assert all(len({x["peer"] for x in r["replicas"]}) == 2 for r in rows), rows
    here = sum(1 for r in rows if any(x["peer"] == a.name for x in r["replicas"]))
    assert 0 < here < N
    # every copy of the writer's was recorded by its writer thread (its pushed copy's
    # answer and hash as expected: none went the general way)
    assert get_json(a, "status")["ingest"]["recorded_in_thread"] == here
    on_disk = {dn.sop_uid(f) for f in dn.archive_files(a.data_dir)}
    assert len(on_disk & {dn.sop_uid(p) for p in files}) == here
