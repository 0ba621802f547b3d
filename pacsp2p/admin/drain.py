"""``pacsp2p drain``: move every copy off a peer (or one archive) before removing it.

    pacsp2p drain --config FILE --peer NAME [--archive NAME] [--stop] [--stalled S] [--json]
    pacsp2p drain --config FILE --archive NAME          (an archive of FILE's peer)

The running peer of FILE asks the peer that holds the copies (itself, or another over
the overlay) to drain (``transfer.drain``): from then on placement sends nothing new
there, on every peer, and each copy moves to archives placement chooses; a copy is
dropped only once the instance has its ``replicas`` copies elsewhere. Progress (on
standard error) counts the copies FILE's peer still sees there; the command ends with
``... safe to remove`` (exit 0) once none is left, or exits 1 when some instance has no
other archive to go to (``blocked``; the drain goes on in the background) or when
moves keep failing (a full disk: nothing moved for ``--stalled`` seconds, 100 unless
said, the last error said), 2 when the draining peer dies first. ``--stop`` ends a drain: placement may use the archives again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from urllib.parse import urlencode

from pacsp2p import config
from pacsp2p.admin.scrub import _post, get_json

POLL = 1.0
STALLED = 100.0     # seconds without a copy moved, with moves failing: say so and exit 1


def _seconds(text: str) -> float:
    """A positive number of seconds up to a day, or argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not math.isfinite(value) or not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be 1 to 86400 seconds, not {text[:40]}")
    return value


def add_parser(sub):
    p = sub.add_parser("drain", help="move every copy off a peer or archive before it is "
                                     "removed; placement sends nothing new there")
    p.add_argument("--peer", help="the peer to drain (default: the config's own peer)")
    p.add_argument("--archive", help="only this archive of the peer")
    p.add_argument("--stop", action="store_true",
                   help="stop draining: placement may use the archive(s) again")
    p.add_argument("--stalled", type=_seconds, default=STALLED, metavar="SECONDS",
                   help="with moves failing and no copy moved for this long, say NOT "
                        f"safe and exit 1 (default {STALLED:.0f})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_drain)
    return p


def cmd_drain(args) -> int:
    from pacsp2p.admin.progress import Progress

    if not args.peer and not args.archive:
        raise SystemExit("pacsp2p: drain what? --peer NAME and/or --archive NAME")
    settings = config.load(args.config)
    peer = args.peer or settings.peer.name
    answer = _post(settings, "drain", {"peer": peer, "archive": args.archive,
                                       "stop": args.stop})
    names = answer.get("archives") or []
    what = (f"archive{'s' if len(names) != 1 else ''} {', '.join(names)} of peer {peer}"
            if args.archive else f"peer {peer} (archives {', '.join(names)})")
    if args.stop:
        print(f"drain of {what} stopped: placement may use them again "
              f"({answer.get('copies', 0)} copies there)")
        return 0
    total = int(answer.get("copies") or 0)
    query = urlencode({k: v for k, v in (("peer", peer), ("archive", args.archive)) if v})
    print(f"draining {what}: {total} copies to move; placement sends nothing new there",
          file=sys.stderr)
    seen, advertised = None, False
    last, since = None, time.monotonic()
    with Progress(f"draining {peer}", total=total or None, unit="copies") as bar:
        while True:
            seen = get_json(settings, f"drain?{query}")
            remaining = int(seen.get("remaining") or 0)
            states = seen.get("states") or {}
            if seen.get("alive") is False:
                print(f"pacsp2p: peer {peer} died during the drain: {remaining} copies "
                      "were still there (repair makes them again after repair_after)",
                      file=sys.stderr)
                return 2
            if not states:
                if advertised:
                    print(f"pacsp2p: peer {peer} no longer drains {what} (stopped?)",
                          file=sys.stderr)
                    return 2
                time.sleep(POLL)            # its member record has not arrived yet
                continue
            advertised = True
            total = max(total, remaining)
            bar.set(total - remaining, total or None,
                    note=", ".join(f"{n} {s}" for n, s in sorted(states.items())))
            if remaining == 0 and all(s == "drained" for s in states.values()):
                break
            if remaining != last:
                last, since = remaining, time.monotonic()
            stats = seen.get("stats") or {}
            if stats.get("failed") and time.monotonic() - since >= args.stalled:
                print(f"pacsp2p: NOT safe to remove {what}: {remaining} copies not moved for "
                      f"{args.stalled:.0f} s, {stats['failed']} moves failed (last: "
                      f"{stats.get('last_error')}); the drain goes on in the background",
                      file=sys.stderr)
                return 1
            if any(s == "blocked" for s in states.values()):
                print(f"pacsp2p: NOT safe to remove {what}: {remaining} copies have no "
                      "other archive to go to (every other live archive holds them or "
                      "takes no copies); the drain goes on in the background",
                      file=sys.stderr)
                return 1
            time.sleep(POLL)
    if args.json:
        print(json.dumps(seen, indent=2))
    else:
        print(f"drained {what}: {total} copies moved to other archives; safe to remove")
    return 0


def status_lines(status: dict) -> list[str]:
    """What ``pacsp2p status`` says about drains (this peer's, and others' it knows)."""
    d = status.get("drain") or {}
    lines = []
    here = d.get("here")
    if here:
        states = ", ".join(f"{n} {s}" for n, s in sorted(here["states"].items()))
        left = here.get("remaining")
        left = f", {left} copies left" if left is not None else ""
        lines.append(f"drain: {states}; {here['moved']} copies moved "
                     f"({here['bytes'] / 1e6:.1f} MB), {here['dropped']} dropped as "
                     f"surplus, {here['failed']} failures{left}")
    for peer, info in sorted((d.get("peers") or {}).items()):
        states = ", ".join(f"{n} {s}" for n, s in sorted(info["states"].items()))
        lines.append(f"drain of peer {peer} ({info['state']}): {states}")
    return lines
