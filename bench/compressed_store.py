#!/usr/bin/env python3
"""A compressed syntax kept as sent: what it costs and saves the peer.

Two fresh peers (embedded archive) receive the same CT study (--count x 512x512,
default 100): ``rle`` as RLE Lossless files (made by DCMTK dcmcrle) sent with
``storescu -xr +C`` (RLE and the uncompressed syntaxes in ONE context: the facade keeps
RLE, ``[facade] keep_compressed``), ``plain`` as the explicit VR files (``storescu -R``).
Then each study is retrieved --reps times, interleaved: C-MOVE to a DCMTK storescp
(stored bytes, as they are) and C-GET by a DCMTK getscu that proposes only uncompressed
syntaxes (the ``rle`` peer decompresses every instance). Prints, per peer and operation,
the median wall seconds and the peer's CPU-seconds per instance (/proc), the bytes its
archive holds, and the ratios rle/plain.

``--archive dcmqrscp``: each peer's only archive is a DCMTK dcmqrscp with its default
config (no compressed syntax accepted) behind the dimse adapter, which then sends each
RLE instance decompressed (``adapters.syntaxes``); ``again`` stores the study a second
time (duplicates: the adapter C-GETs the held copy and, for ``rle``, converts the
instance to compare).

    .venv/bin/python bench/compressed_store.py [--quick] [--count N] [--reps N]
        [--archive embedded|dcmqrscp]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Timer, median, table  # noqa: E402

from pacsp2p.testing import Peer, StoreSCP  # noqa: E402
from pacsp2p.testing import dicomnet as dn  # noqa: E402
from pacsp2p.testing.dcmqrscp import DcmQrScp  # noqa: E402
from pacsp2p.testing.dcmtk import dcmtk, storescu  # noqa: E402
from pacsp2p.testing.ports import LOOPBACK  # noqa: E402

DEST = "STORESCP"


def rle_copies(study: common.DataSet, cache: Path) -> list[Path]:
    """dcmcrle'd copies of *study*'s files (cached beside it)."""
    out = cache / f"{study.name}-rle"
    marker = out / ".complete"
    files = [out / f.name for f in study.files]
    if not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(study.files, files):
            dcmtk("dcmcrle", src, dst, check=True, timeout=120)
        marker.write_text("")
    return files


def timed(peer: Peer, fn) -> tuple[float, float]:
    """(wall seconds, peer CPU-seconds) of fn()."""
    cpu0 = common.cpu_seconds([peer.process.pid])
    with Timer() as t:
        fn()
    return t.seconds, common.cpu_seconds([peer.process.pid]) - cpu0


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=None, help="CT instances (100; 30 quick)")
    p.add_argument("--reps", type=int, default=None, help="retrievals per peer (3; 1 quick)")
    p.add_argument("--archive", choices=("embedded", "dcmqrscp"), default="embedded",
                   help="each peer's archive (embedded; dcmqrscp: default config, DIMSE)")
    args = p.parse_args()
    count = args.count or (30 if args.quick else 100)
    reps = args.reps or (1 if args.quick else 3)
    common.header(f"compressed syntax kept as sent: {count} CT 512x512, {reps} reps, "
                  f"archive {args.archive}")
    study = common.ct_study(args.cache, count)
    sent = {"rle": rle_copies(study, args.cache), "plain": study.files}
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid}
    rows, results = [], {}
    with common.workdir(args.keep) as work, \
            StoreSCP(work / "scp", extra=["+B"]) as scp:
        peers = {name: Peer(work / name, name=name, ae_title=name.upper(),
                            destinations={DEST: scp.address}) for name in sent}
        qr = {name: DcmQrScp(work / f"{name}-qr") for name in sent} \
            if args.archive == "dcmqrscp" else {}
        for name, peer in peers.items():
            if name in qr:
                qr[name].start()
                peer.overrides = {"archives": [{
                    "name": "qr", "adapter": "dimse", "ae_title": qr[name].ae_title,
                    "host": LOOPBACK, "port": qr[name].port}]}
            peer.start()
        try:
            for name, peer in peers.items():
                extra = ["-xr", "+C"] if name == "rle" else ["-R"]
                for op in ("store", "again") if qr else ("store",):
                    wall, cpu = timed(peer, lambda: storescu(
                        peer.port, peer.ae_title, sent[name], required=False, extra=extra,
                        timeout=1200))
                    results[(name, op)] = [(wall, cpu)]
                held = qr[name].files() if qr else dn.archive_files(peer.data_dir)
                syntaxes = {dn.transfer_syntax(f) for f in held[:3]}
                results[(name, "bytes")] = sum(f.stat().st_size for f in held)
                print(f"{name}: stored {len(held)} in {results[(name, 'store')][0][0]:.1f}"
                      f" s, held as {syntaxes}",
                      flush=True)
                assert len(held) == count
            for rep in range(reps):
                for name, peer in peers.items():
                    for op in ("move", "get"):
                        for f in scp.files():
                            f.unlink()
                        out = work / f"get-{name}-{rep}"

                        def run(op=op, peer=peer, out=out):
                            if op == "move":
                                proc = dn.movescu(peer.port, peer.ae_title, DEST, keys,
                                                  extra=["-S"], timeout=1200)
                                got = len(scp.files())
                            else:
                                proc = dn.getscu(peer.port, peer.ae_title, out, keys,
                                                 timeout=1200)
                                got = len(list(out.iterdir()))
                            assert proc.returncode == 0 and got == count, (op, got)
                        results.setdefault((name, op), []).append(timed(peer, run))
        finally:
            for peer in peers.values():
                peer.stop()
            for server in qr.values():
                server.stop()
    for op in ("store", "again", "move", "get") if qr else ("store", "move", "get"):
        per = {}
        for name in sent:
            wall = median([w for w, _ in results[(name, op)]])
            cpu = median([c for _, c in results[(name, op)]])
            per[name] = (wall, cpu)
            rows.append([op, name, f"{wall:.2f}", f"{cpu / count * 1000:.1f}"])
        rows.append([op, "rle/plain", f"{per['rle'][0] / per['plain'][0]:.2f}",
                     f"{per['rle'][1] / per['plain'][1]:.2f}"])
    print(table(rows, ["operation", "peer", "wall s (median)", "peer CPU ms/instance"]))
    print(f"archive bytes: rle {results[('rle', 'bytes')]:,}, plain "
          f"{results[('plain', 'bytes')]:,} "
          f"(rle/plain {results[('rle', 'bytes')] / results[('plain', 'bytes')]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
