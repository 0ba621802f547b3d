"""``pacsp2p scrub``: one full scrub pass over the running peer's archives, now.

    pacsp2p scrub --config FILE [--rate MB/s] [--json]

Every copy the peer's archives hold is re-hashed against the SHA-256 the catalog holds;
a damaged or missing copy is replaced from a good replica (``transfer.scrub``). The
running peer does it (``POST /scrub`` on its admin endpoint); this command shows its
progress (on standard error) and ends with one line::

    scrub: 1200 copies checked, 1 damaged, 1 repaired, 0 missing

It exits 0 when every copy checked is good (again), 1 when damage remains unrepaired
(no good replica, or an archive that cannot replace a copy: the instance UIDs follow,
and the peer's log says why), 2 when the pass could not run. ``--rate`` caps what the
pass reads (MB/s; default ``[cluster] scrub_rate``; 0: no limit). Also the line
``pacsp2p status`` prints about scrubbing.
"""

from __future__ import annotations

import json
import sys
import time

from pacsp2p import config
from pacsp2p.admin import client

POLL = 1.0              # seconds between two looks at the pass (after a quicker start)


def add_parser(sub):
    p = sub.add_parser("scrub", help="re-hash every copy on the peer's archives now, and "
                                     "replace damaged or missing ones")
    p.add_argument("--rate", type=float, default=None,
                   help="MB/s the pass reads at most (default: [cluster] scrub_rate; "
                        "0: no limit)")
    p.add_argument("--json", action="store_true", help="print the pass's summary as JSON")
    p.set_defaults(fn=cmd_scrub)
    return p


def _post(settings, what: str, body: dict) -> dict:
    return client.call(settings, what, data=json.dumps(body).encode(), method="POST",
                       headers={"Content-Type": "application/json"})


def get_json(settings, what: str) -> dict:
    """GET *what* of the peer's admin endpoint (SystemExit if it refuses or nobody
    answers)."""
    return client.call(settings, what)


def summary_line(p: dict) -> str:
    return (f"scrub: {p['checked']} copies checked, {p['damaged']} damaged, "
            f"{p['repaired']} repaired, {p['missing']} missing")


def cmd_scrub(args) -> int:
    from pacsp2p.admin.progress import Progress

    if args.rate is not None and not args.rate >= 0:
        raise SystemExit("pacsp2p: --rate must be MB/s (a number >= 0, 0: no limit)")
    settings = config.load(args.config)
    started = _post(settings, "scrub", {"rate": args.rate})
    pid = started["pass"]
    done, poll = None, 0.1
    with Progress(f"scrub pass {pid}", total=started.get("total") or None,
                  unit="copies") as bar:
        while done is None:
            s = get_json(settings, "status").get("scrub") or {}
            current, last = s.get("pass"), s.get("last")
            if current and current.get("id") == pid:
                bar.set(current["checked"] + current["skipped"], current.get("total") or None,
                        note=f"{current['damaged']} damaged, {current['repaired']} "
                             f"repaired, {current['missing']} missing, "
                             f"{current['MB_per_s']} MB/s")
            elif last and last.get("id") == pid:
                done = last
                bar.set(done["checked"] + done["skipped"], done.get("total") or None)
                break
            else:
                print(f"pacsp2p: scrub pass {pid} stopped before its end (the peer "
                      "restarted?); run it again", file=sys.stderr)
                return 2
            time.sleep(poll)
            poll = min(POLL, poll * 1.5)         # a small archive: answered at once
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(summary_line(done))
        if done.get("skipped"):
            print(f"scrub: {done['skipped']} copies not checked (archive down, no hash "
                  "known, or not in this pass's sample of a DIMSE archive)")
        if done.get("unrepaired"):
            uids = ", ".join(done.get("unrepaired_uids") or [])
            print(f"scrub: {done['unrepaired']} damaged or missing copies could NOT be "
                  f"repaired (see the peer's log): {uids}; the peer tries them again "
                  "(the first time in 30 s, then less often) until a good replica serves them")
    return 1 if done.get("unrepaired") else 0


def status_lines(status: dict) -> list[str]:
    """What ``pacsp2p status`` says about scrubbing (nothing before the first pass)."""
    s = status.get("scrub") or {}
    lines = []
    p = s.get("pass")
    if p:
        total = f"/{p['total']}" if p.get("total") else ""
        lines.append(f"scrub: pass {p['id']} ({p['why']}) running, {p['checked']}{total} "
                     f"copies checked, {p['damaged']} damaged, {p['repaired']} repaired, "
                     f"{p['missing']} missing, {p['MB_per_s']} MB/s")
    last = s.get("last")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["finished"]))
        unrepaired = f", {last['unrepaired']} UNREPAIRED" if last.get("unrepaired") else ""
        lines.append(f"scrub: last pass {when}: {last['checked']} copies checked, "
                     f"{last['damaged']} damaged, {last['repaired']} repaired, "
                     f"{last['missing']} missing{unrepaired}")
    found = s.get("found_by_reads") or {}
    if found.get("damaged"):
        lines.append(f"scrub: {found['damaged']} damaged copies found by retrievals "
                     f"(served from other replicas), {found['repaired']} replaced")
    if s.get("awaiting_repair"):
        lines.append(f"scrub: {s['awaiting_repair']} damaged or missing copies UNREPAIRED, "
                     "tried again until a good replica serves them")
    return lines
