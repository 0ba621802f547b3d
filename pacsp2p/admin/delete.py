"""``pacsp2p delete``: remove a study, series or instance from the whole cluster.

    pacsp2p delete --config FILE (--study UID | --series UID | --instance UID)
                   [--reason TEXT] [--json]

The running peer of FILE does it (``POST /delete`` on its admin endpoint, which allows
it only when bound to a loopback address): every copy on every archive of every peer
goes, for good — peers that are down now remove theirs when they return. An archive
that cannot delete (plain DIMSE) keeps its copy, hidden from the view, and ``pacsp2p
status`` lists it as retained by that archive. Sending the instances again afterwards
stores them again. Also the lines ``pacsp2p status`` prints about deletions.
"""

from __future__ import annotations

import json

from pacsp2p import config
from pacsp2p.admin import client

LEVELS = (("study", "STUDY", "StudyInstanceUID"), ("series", "SERIES", "SeriesInstanceUID"),
          ("instance", "IMAGE", "SOPInstanceUID"))
TIMEOUT = 300.0           # seconds: a large study's tombstones, the wait for the peers


def add_parser(sub):
    """The ``delete`` subcommand on *sub* (argparse subparsers); returns its parser."""
    p = sub.add_parser("delete", help="remove a study, series or instance from every "
                                      "archive of the cluster, for good")
    which = p.add_mutually_exclusive_group(required=True)
    for flag, _, key in LEVELS:
        which.add_argument(f"--{flag}", metavar="UID", help=key)
    p.add_argument("--reason", default="", help="why (kept with the tombstones, logged)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_delete)
    return p


def cmd_delete(args) -> int:
    settings = config.load(args.config)
    flag, level, key = next(x for x in LEVELS if getattr(args, x[0]) is not None)
    uid = getattr(args, flag)
    body = json.dumps({"level": level, "uids": [uid],
                       "reason": args.reason or "pacsp2p delete"}).encode()
    from pacsp2p.admin.progress import DeleteWatch
    with DeleteWatch(lambda what: _fetch(settings, what), level, uid):
        answer = client.call(settings, "delete", timeout=TIMEOUT, data=body, method="POST",
                             headers={"Content-Type": "application/json"})
    n = int(answer.get("deleted", 0))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif n:
        print(f"deleted {n} instance(s) of {flag} {uid} from every archive of the cluster; "
              "peers that are down remove their copies when they return")
    elif level == "IMAGE":
        print(f"instance {uid} is not in the catalog; a tombstone was written all the same "
              "(a copy the cluster learns of later goes too)")
    else:
        print(f"no instance of {flag} {uid} in the catalog: nothing deleted")
    return 0 if n else 1


def _fetch(settings, what: str):
    """GET *what* of the admin endpoint as JSON (the progress of a delete)."""
    with client.open(settings, what, timeout=10) as r:
        return json.load(r)


def status_lines(status: dict) -> list[str]:
    """What ``pacsp2p status`` says about deletions: tombstones, copies still to remove
    here, and the deleted instances archives retain because they cannot delete."""
    d = status.get("deletions") or {}
    lines = []
    if d.get("tombstones"):
        pending = d.get("purge_pending", 0)
        lines.append(f"deletions: {d['tombstones']} instance(s) deleted from the cluster "
                     f"(tombstones); {pending} cop{'y' if pending == 1 else 'ies'} on this "
                     "peer's archives still to remove")
    listed = d.get("retained_instances") or []
    for archive, n in sorted((d.get("retained") or {}).items()):
        uids = [r["instance"] for r in listed if r["archive"] == archive][:5]
        more = " ..." if n > len(uids) else ""
        lines.append(f"retained by archive {archive}: {n} deleted instance(s) it cannot "
                     f"delete, hidden from the view: {', '.join(uids)}{more}")
    return lines
