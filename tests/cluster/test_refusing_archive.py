"""An archive that refuses every copy for a while (a vendor PACS answering its store with
a failure: here a real Orthanc whose Lua ``IncomingHttpRequestFilter`` answers
``POST /instances`` 403 while a flag file exists), then accepts again.

Every C-STORE of a stream at another peer is answered Success at once (the refused copy
placed elsewhere, its move back remembered as a hint); once the archive accepts again the
hinted hand-off brings its copies: every instance has two copies and no hint is left. And
the logs stay bounded: before, each refused copy wrote one line at the holder ("copy of
... not kept") and one at the writer ("copy of ... failed"), again at every hand-off
retry -- ~300 lines in 15 s for a 200-instance stream, without end while the archive
refuses. Now at most ``LogLimit``'s burst per 10 s window, then one line counting the
rest.
"""
from __future__ import annotations

import time

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import build_context

from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.orthanc import Orthanc

N = 120
BURST, WINDOW = 10, 10.0           # dicom.admission.LogLimit's defaults


def _filter(flag) -> str:
    return f"""function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == 'POST' and uri == '/instances' then
    local f = io.open("{flag}", "r")
    if f ~= nil then f:close(); return false end
  end
  return true
end
"""


def _bound(seconds: float) -> int:
    """Lines a LogLimit lets through in *seconds*: a burst per window begun."""
    return BURST * (int(seconds // WINDOW) + 2)


def test_an_archive_refusing_copies_is_routed_around_and_its_lines_are_bounded(
        cluster, tmp_path):
    flag, lua = tmp_path / "refuse", tmp_path / "filter.lua"
    lua.write_text(_filter(flag))
    with Orthanc(tmp_path / "orthanc", aet="ORTHREF",
                 config={"LuaScripts": [str(lua)]}) as orthanc:
        cluster.start(3, per_peer={"peera": {"archives": [
            {"name": "orth", "adapter": "orthanc", "url": orthanc.url}]},
            # by rendezvous alone: 2 in 3 copies to the refusing archive, not 1 in 2
            "peerb": {"strategies": {"first_copy": "placement"}}})
        cluster.wait_mesh(timeout=30)
        holder, writer = cluster[0], cluster[1]
        files = datasets.make_study(tmp_path / "study", patient_id="REFUSE01", size=32,
                                    series=[("MR", N, ExplicitVRLittleEndian)])
        flag.write_text("refuse")
        began = time.monotonic()
        statuses = []
        with dn.association(writer.port, writer.ae_title,
                            [build_context(MRImageStorage, [ExplicitVRLittleEndian])],
                            timeout=120) as assoc:
            for path in files:
                answer = assoc.send_c_store(path)
                statuses.append(answer.Status if "Status" in answer else None)
        assert statuses == [0x0000] * N, statuses
        study = dn.study_of(files)
        # the refused copies went elsewhere; some hints wait for the archive
        wait_until(lambda: get_json(writer)["catalog"]["hints"] > 0, 60,
                   what="hints for the refusing archive")
        time.sleep(3)               # hand-off retries while it still refuses
        refused_for = time.monotonic() - began
        not_kept = holder.log_path.read_text().count("not kept")
        failed = writer.log_path.read_text().count(f"to orth@{holder.name} failed")
        flag.unlink()
        # (the stand-ins' surplus copies are trimmed later by repair: not waited for)
        def handed_off():
            rows = get_json(holder, f"where?study={study}")
            return len(rows) == N and \
                all(len({x["peer"] for x in r["replicas"]}) >= 2 for r in rows) and \
                all(get_json(p)["catalog"]["hints"] == 0 for p in cluster)
        wait_until(handed_off, 120, interval=0.5, what="every hint handed off")
        rows = get_json(holder, f"where?study={study}")
        assert any(x["peer"] == holder.name for r in rows for x in r["replicas"]), \
            "the archive takes copies again once it accepts"
        print(f"refused for {refused_for:.1f} s: {not_kept} 'not kept' lines at the holder, "
              f"{failed} 'failed' at the writer")
    # before: one line per refused copy at each side (>= N/2 at the holder)
    assert not_kept <= _bound(refused_for), (not_kept, round(refused_for, 1))
    assert failed <= _bound(refused_for), (failed, round(refused_for, 1))
    assert "more copy not kept events" in holder.log_path.read_text()
