"""With ``[storage] sync_directories = true`` nothing acknowledged is lost to a power cut:
before each C-STORE-RSP leaves, the instance's file, its directory AND the catalog's
write-ahead log (the commit that lists the instance) are on the disk.

A power cut cannot be made here, so the order of the system calls is watched instead:
``strace`` follows every thread of a real peer while DCMTK ``storescu`` sends a series,
and for each C-STORE-RSP (a P-DATA-TF written to the requestor's socket) an fsync or
fdatasync of ``catalog.sqlite-wal`` must have returned after the previous response went
out. With ``synchronous=NORMAL`` (the default setting) the WAL is synced only at
checkpoints, and a power cut could lose the last commits while the files survive.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time

from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import wait_until
from pacsp2p.testing.dcmtk import echo, storescu

N = 20
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_SYNC = re.compile(r"^f(?:data)?sync\((\d+)<([^>]*)>")
_RESUMED = re.compile(r"^<\.\.\. f(?:data)?sync resumed>.*= 0")
_SEND = re.compile(r"^(?:write|sendmsg|sendto|writev)\(\d+<TCP:\[127\.0\.0\.1:(\d+)->[^>]*\]>"
                   r'.*?"\\(\d)')


def events(trace: str, port: int) -> list[tuple[str, str]]:
    """(kind, detail) in the order strace saw them: ("synced", path) when a sync
    returned, ("sent", first byte) when a write to the facade's socket *port* began."""
    out, open_syncs = [], {}
    for raw in trace.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        tid, call = m.groups()
        if (s := _SYNC.match(call)):
            if call.endswith("<unfinished ...>"):
                open_syncs[tid] = s.group(2)
            elif re.search(r"= 0$", call):
                out.append(("synced", s.group(2)))
        elif _RESUMED.match(call) and tid in open_syncs:
            out.append(("synced", open_syncs.pop(tid)))
        elif (s := _SEND.match(call)) and int(s.group(1)) == port:
            out.append(("sent", s.group(2)))
    return out


def test_each_c_store_rsp_follows_a_synced_catalog_commit(make_peer, tmp_path):
    files = datasets.make_study(tmp_path / "study", patient_id="POWER01", size=16,
                                series=[("MR", N, datasets.ExplicitVRLittleEndian)])
    peer = make_peer(config={"storage": {"fsync": True, "sync_directories": True}})
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["/usr/bin/strace", "-f", "-yy", "-s", "4", "-o", str(out),
         "-e", "trace=fsync,fdatasync,write,sendmsg,sendto,writev",
         "-p", str(peer.process.pid)], stderr=subprocess.PIPE)
    try:
        # attached to every thread once a C-ECHO's answer shows in the trace
        wait_until(lambda: (echo(peer.port, peer.ae_title) and
                            out.exists() and f"127.0.0.1:{peer.port}->" in out.read_text()),
                   timeout=120, interval=0.5)
        time.sleep(0.5)
        mark = len(out.read_text().splitlines())
        storescu(peer.port, peer.ae_title, files)
    finally:
        tracer.send_signal(signal.SIGINT)         # detaches; the peer runs on
        tracer.wait(timeout=60)
    trace = "\n".join(out.read_text().splitlines()[mark:])
    seen = events(trace, peer.port)
    sends = [d for kind, d in seen if kind == "sent"]
    assert sends[:1] == ["2"], sends[:5]          # A-ASSOCIATE-AC first
    assert sends.count("4") == N, sends           # one P-DATA (C-STORE-RSP) per instance
    wal, since, covered = 0, False, 0
    for kind, detail in seen:
        if kind == "synced" and detail.endswith("catalog.sqlite-wal"):
            since = True
            wal += 1
        elif kind == "sent" and detail == "4":
            covered += since
            since = False
    assert covered == N, (f"{N - covered} of {N} C-STORE-RSPs left before the catalog's "
                          f"WAL was synced ({wal} WAL syncs in all)")
    # and the files: one fsync per instance file and one of a directory under objects/
    synced = [d for kind, d in seen if kind == "synced"]
    assert sum(p.endswith(".dcm") or "/incoming" in p or "(deleted)" in p
               for p in synced) >= N, synced
    assert any(re.search(r"/objects/[0-9a-f]{2}$", p) for p in synced), synced
