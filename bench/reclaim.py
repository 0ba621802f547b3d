#!/usr/bin/env python3
"""What mending a restored catalog costs (``overlay/reclaim.py``), in CPU seconds per fact.

In one process, real SQLite catalogs written with the product's own functions (no
network: the answer bytes go from ``sync.serve`` to ``sync.AntiEntropy.pull`` directly):

- **pull-back**: peerc's catalog restored from a backup taken before it issued N facts
  that peera holds; peerc pulls them back (``pull(own=...)``: only its own origin, in
  the gap). Compared with an ordinary pull of N facts of another origin by a new peer
  (same catalog sizes, same code path but for ``own``): the ratio should be ~1.
- **probe at an ordinary restart**: nothing was lost; peerc asks peera for its facts in
  the gap (one request per member learned of), peera holding N facts of peerc's new
  epoch above it: CPU per request on both sides (bounded: ``read_changes ... upto``).
- **re-issue** (only when a vector shows facts above the counter): ``facts.renumber`` of
  N facts, against writing N new facts (``write_facts``).

    .venv/bin/python bench/reclaim.py [--facts N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer

from pacsp2p.catalog import db, tombstones
from pacsp2p.overlay import sync


class Catalog:
    """The catalog methods sync uses, synchronous, over one SQLite file."""

    def __init__(self, path: Path, peer: str):
        self.peer, self.conn = peer, db._connect(path)
        db.create_schema(self.conn)
        tombstones.create_schema(self.conn)
        self.vector = db.vector(self.conn)

    def store(self, origin: str, seqs, study: str) -> None:
        rows = []
        for seq in seqs:
            uid = f"{study}.{seq}"
            attrs = {"PatientID": "P" + study[-3:], "PatientName": "DOE^JANE",
                     "StudyInstanceUID": study, "SeriesInstanceUID": study + ".1",
                     "Modality": "CT", "SOPInstanceUID": uid, "InstanceNumber": str(seq),
                     "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                     "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
            rows.append((attrs, (uid, "local", origin, "ab" * 32, 9076, seq)))
        for i in range(0, len(rows), 5000):
            db.write_facts(self.conn, rows[i:i + 5000])
        self.vector[origin] = max(self.vector.get(origin, 0), max(seqs))

    def changes_of(self, wanted, limit):
        return defer.succeed(db.read_changes_of(self.conn, wanted, limit))

    def apply_all(self, parts):
        tops = [(origin, db.check_wire(rows)) for origin, rows in parts]
        db.write_wires(self.conn, [rows for _, rows in parts], self.peer)
        for origin, top in tops:
            self.vector[origin] = max(self.vector.get(origin, 0), top)
        return defer.succeed(None)


class Bulk:
    def __init__(self, other: Catalog, asker: str):
        self.other, self.asker, self.requests = other, asker, 0

    def pull_body(self, member, vector, limit, own=0):
        self.requests += 1
        return sync.serve(self.other, vector, self.asker, limit, own)


class Member:
    def __init__(self, name):
        self.name = name


def done(d):
    out = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=20000)
    n = ap.parse_args().facts
    tmp = Path(tempfile.mkdtemp(prefix="bench-reclaim-"))
    base, epoch = 1000, int(time.time() * 1000)
    a = Catalog(tmp / "a.sqlite", "peera")          # the cluster's view
    a.store("peerc", range(1, base + 1), "1.2.9.100")
    a.store("peerc", range(base + 1, base + n + 1), "1.2.9.101")    # lost by peerc
    a.store("peerb", range(1, n + 1), "1.2.9.102")
    rows = []

    # pull-back of the n facts peerc lost, vs an ordinary pull of n facts of peerb
    c = Catalog(tmp / "c.sqlite", "peerc")           # restored: up to base only
    c.store("peerc", range(1, base + 1), "1.2.9.100")
    c.store("peerb", range(1, n + 1), "1.2.9.102")   # (peerb: same size as below)
    ae, t0 = sync.AntiEntropy(c, Bulk(a, "peerc")), cpu()
    done(ae.pull(Member("peera"), own=(base, epoch)))
    back = cpu() - t0
    assert ae.own_got == base + n and ae.pulled == n, (ae.own_got, ae.pulled)
    d = Catalog(tmp / "d.sqlite", "peerd")           # a new peer: peerc's n + peerb's n
    d.store("peerc", range(1, base + n + 1), "1.2.9.10x")
    ae, t0 = sync.AntiEntropy(d, Bulk(a, "peerd")), cpu()
    done(ae.pull(Member("peera")))
    ordinary = cpu() - t0
    assert ae.pulled == n, ae.pulled
    rows.append(("pull-back of the lost facts (own)", n, back, ordinary))

    # the probe at an ordinary restart: nothing in the gap, n facts above it at peera
    a.store("peerc", range(epoch + 1, epoch + n + 1), "1.2.9.103")   # peerc's new epoch
    e = Catalog(tmp / "e.sqlite", "peerc")
    e.store("peerc", range(1, base + n + 1), "1.2.9.101")             # lost nothing
    probes, t0 = 200, cpu()
    for _ in range(probes):
        ae = sync.AntiEntropy(e, Bulk(a, "peerc"))
        done(ae.pull(Member("peera"), own=(base + n, epoch)))
        assert ae.own_got == 0
    probe = (cpu() - t0) / probes
    print(f"probe at an ordinary restart: {probe * 1e3:.3f} ms CPU per member asked "
          f"(both sides; peera holding {n} facts of peerc's new epoch)")

    # re-issue n facts (a mend) vs writing n new ones
    t0 = cpu()
    c.store("peerc", range(epoch + 1, epoch + n + 1), "1.2.9.104")
    write = cpu() - t0
    t0 = cpu()
    got = db.renumber(c.conn, "peerc", epoch, None, epoch + n + 1 + (1 << 24))
    reissue = cpu() - t0
    assert got[0] == n, got
    rows.append(("re-issue (renumber) vs write_facts", n, reissue, write))

    print(f"{'':40} {'facts':>7} {'CPU s':>7} {'us/fact':>8} {'baseline s':>10} "
          f"{'ratio':>6}")
    for what, k, s, b in rows:
        print(f"{what:40} {k:7d} {s:7.3f} {s / k * 1e6:8.1f} {b:10.3f} {s / b:6.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
