#!/usr/bin/env python3
"""In process: what the ``dimse`` adapter's C-GET costs with and without the bounded reads
(``associations.Bounds``) and the spooled data set (pynetdicom's chunked receive).

A DCMTK dcmqrscp holds the cached CT study (200 x 512x512x16-bit); ``DimseArchive._get``
reads every instance, three rounds of four variants (data set in memory or spooled;
pynetdicom's 4 KB socket reads or ours); printed: CPU seconds of every thread of this
process per instance (``time.process_time``), sorted, and the median.

    flock /tmp/pacsp2p-bench.lock .venv/bin/python bench/dimse_get_micro.py
"""
import sys, time, os
from pathlib import Path
import tempfile
from pacsp2p.testing import storescu
from pacsp2p.testing.dcmqrscp import DcmQrScp
from pacsp2p.adapters import dimse, associations
from pynetdicom import _config
import pydicom
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
ct = common.ct_study(Path("/tmp/pacsp2p-bench-cache"), 200)
work = Path(tempfile.mkdtemp())
q = DcmQrScp(work / "q", ae_title="DCMQR", max_studies=100); q.start()
storescu(q.port, q.ae_title, [ct.directory], timeout=600)
metas = []
for f in ct.files:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    metas.append((str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID)))
inc = work / "inc"; inc.mkdir()
orig_opened = associations._opened
def plain_opened(event, bounds, spool):
    event.assoc.pacsp2p_bounds = bounds
    import threading; threading.current_thread().pacsp2p_spool = spool
def run(label, chunked, bounded):
    _config.STORE_RECV_CHUNKED_DATASET = chunked
    associations._opened = orig_opened if bounded else plain_opened
    a = dimse.DimseArchive("x", None, ae_title="DCMQR", host="127.0.0.1", port=q.port, incoming=inc)
    a._get(*metas[0]).close()
    t = time.process_time(); w = time.monotonic()
    for m in metas:
        a._get(*m).close()
    cpu = (time.process_time() - t) / len(metas) * 1000
    a._assocs.close()
    return cpu, time.monotonic() - w
associations.spool_received()
res = {}
for rep in range(3):
    for label, ch, b in (("memory,unbounded", False, False), ("memory,bounded", False, True), ("spool,unbounded", True, False), ("spool,bounded", True, True)):
        res.setdefault(label, []).append(run(label, ch, b))
for k, v in res.items():
    cpus = sorted(x[0] for x in v)
    print(f"{k:20s} CPU ms/instance {cpus}  median {cpus[1]:.2f}")
q.stop()
print("load", os.getloadavg()[0])
