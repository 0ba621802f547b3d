"""The ``pacsp2p`` command line: administration of a peer and its cluster.

    pacsp2p status [--config FILE] [--json]     what a running peer reports
    pacsp2p catalog rebuild [--config FILE]     rebuild the catalog from the archives
    pacsp2p check-config [--config FILE]        validate a config file
    pacsp2p peers [--config FILE]               the cluster members a peer sees
    pacsp2p where [--config FILE] (--study UID | --instance UID) [--json]
    pacsp2p delete [--config FILE] (--study UID | --series UID | --instance UID)
                                                remove from every archive, for good
    pacsp2p scrub [--config FILE] [--rate MB/s]  re-hash every copy, mend damaged ones
    pacsp2p drain [--config FILE] (--peer NAME | --archive NAME) [--stop]
                                                move every copy off, then "safe to remove"
    pacsp2p ca init [--dicom] DIR | ca issue DIR NAME [--kind peer|server|client]
                                                certificate authorities (cluster, DICOM)
    pacsp2p demo --peers 3 --dir DIR            a local cluster in one command
    pacsp2p admin hash-password [USER]          an [admin] users password hash
    pacsp2p --version

Every command reads the same TOML config as ``twistd pacsp2p`` (default: the embedded
single-peer defaults in the current directory).
"""

from __future__ import annotations

import argparse
import json
import sys

from pacsp2p import __version__, config, lock
from pacsp2p.admin import human
from pacsp2p.validate import shown


def _settings(args):
    return config.load(args.config)


def cmd_check_config(args) -> int:
    """Everything ``twistd pacsp2p`` checks before it starts (``pacsp2p.preflight``),
    refused with the same one-line message."""
    from pacsp2p import preflight
    from pacsp2p.overlay.tls import TLSError

    s = _settings(args)
    try:
        checked = preflight.check(s)
    except TLSError as e:
        print(f"pacsp2p: {e}", file=sys.stderr)
        return 2
    st = checked["strategies"]
    plugins = f", plugins {', '.join(st['plugins'])}" if st["plugins"] else ""
    print(f"{s.source}: ok (peer {s.peer.name}, facade {s.facade.ae_title} on port "
          f"{s.facade.port}, {len(s.archives)} archive(s), data in {s.data_dir}; "
          f"strategies {st['placement']}/{st['selection']}/{st['balancing']}{plugins})")
    return 0


def fetch_status(settings, what: str = "status") -> dict:
    from pacsp2p.admin import client          # HTTPS, the token (admin/client.py)
    return client.call(settings, what, timeout=10,
                       shape=list if what.startswith("where") else dict)


def cmd_status(args) -> int:
    status = fetch_status(_settings(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"peer {status['peer']} (pacsp2p {status['version']}), facade "
          f"{status['facade']['ae_title']} on port {status['facade']['port']}")
    c = status["catalog"]
    print(f"catalog: {c['patients']} patients, {c['studies']} studies, {c['series']} series, "
          f"{c['instances']} instances, {c['locations']} replicas, {c['conflicts']} conflicts"
          + (f", {c['versions']} held in two versions or more" if c.get("versions") else ""))
    integrity = c.get("integrity", "ok")
    if integrity.startswith("damaged"):
        print(f"catalog integrity: DAMAGED ({integrity.partition(': ')[2]}); stop the peer "
              "and run 'pacsp2p catalog rebuild'")
    elif not integrity.startswith("ok"):
        print(f"catalog integrity: {integrity}")
    for name, h in status["archives"].items():
        state = "up" if h.get("up") else f"DOWN ({h.get('error', '')})"
        free = h.get("free_bytes")
        extra = f", {human.size(free)} free" if free is not None else ""
        print(f"archive {name}: {state}{extra}")
    if c.get("hints"):
        print(f"hinted hand-off: {c['hints']} copies owed to archives that are down")
    copies = status.get("ingest", {}).get("copies")
    if copies and any(copies.values()):
        print(f"copies made since start: {copies['local']} on this peer's archives, "
              f"{copies['pushed']} pushed to other peers as they arrived, "
              f"{copies['fetched']} fetched by other peers once complete")
    overlay = status.get("overlay")
    if overlay:
        states = [m["state"] for m in overlay["members"] if m["state"] != "self"]
        print(f"cluster: {len(states) + 1} peers, {states.count('alive') + 1} alive; "
              f"{overlay.get('facts_pulled', 0)} facts pulled by anti-entropy")
    under = status.get("under_replicated")
    if under:
        print(under_replicated_line(under))
    repair = status.get("repair")
    if repair and (repair["state"] != "idle" or repair["done"] or repair["dropped"]):
        print(repair_line(repair))
    for cr in status.get("crawls", []):
        total = f"/{cr['total']}" if cr.get("total") else ""
        eta = f", ETA {human.duration(cr['eta_s'])}" if cr.get("eta_s") else ""
        state = "done" if cr.get("finished") else ("STOPPED: " + cr["error"] if
                                                   cr.get("error") else "crawling")
        took = f" in {human.duration(cr['elapsed_s'])}" if cr.get("finished") and \
            cr.get("elapsed_s") else ""
        later = f"; {cr['followed']} new found since" if cr.get("followed") else ""
        print(f"crawl of {cr['archive']}: {state}, {cr['done']}{total} instances, "
              f"{cr['rate']}/s{eta}{took}{later}")
    for r in status.get("retrievals", []):
        srcs = ", ".join(f"{n} {s['completed']} ({s['MB_per_s']} MB/s)"
                         + ("" if s["alive"] else " DROPPED")
                         for n, s in r["sources"].items())
        print(f"retrieval {r['id']}: {r['done']}/{r['instances']} instances; sources: {srcs}")
    from pacsp2p.admin import delete
    for line in delete.status_lines(status):   # tombstones, copies archives retain
        print(line)
    from pacsp2p.admin import drain, scrub
    for line in scrub.status_lines(status) + drain.status_lines(status):
        print(line)
    if status.get("sources"):                  # measured read rate per archive
        print("read rates: " + ", ".join(f"{n} {s['MB_per_s']} MB/s"
                                         for n, s in status["sources"].items()))
    return 0


def under_replicated_line(u: dict) -> str:
    if u.get("instances") is None:
        return "under-replicated: not counted yet"
    age = f", counted {human.ago(u['at'])}" if u.get("at") else ""
    surplus = f", {u['surplus']} with surplus copies" if u.get("surplus") else ""
    return (f"under-replicated: {u['instances']} instances with fewer than "
            f"{u['replicas']} live copies, {u['unavailable']} with none{surplus}{age}")


def repair_line(r: dict) -> str:
    limit = f"{r['limit_MB_s']:g} MB/s" if r.get("limit_MB_s") else "no limit"
    line = (f"repair: {r['state']}, {r['done']} copies made ({r['bytes'] / 1e6:.1f} MB), "
            f"{r['remaining']} instances remaining, {r['rate']} MB/s (limit {limit}); "
            f"{r['dropped']} surplus copies dropped, {r['failed']} failures")
    if r.get("state") == "idle" and r.get("finished"):
        line += f"; last run finished {human.when(r['finished'])}"
    elif r.get("started"):
        line += f"; started {human.when(r['started'])}"
    waiting = r.get("waiting") or []
    if waiting:
        line += "; waiting for " + ", ".join(
            f"{w['what']} (repair in {human.duration(w['repair_in_s'])})" for w in waiting)
    return line


def cmd_catalog_digest(args) -> int:
    d = fetch_status(_settings(args), "digest")
    print(d["digest"] if not args.json else json.dumps(d, indent=2))
    return 0


def cmd_catalog_rebuild(args) -> int:
    from twisted.internet import reactor

    from pacsp2p.adapters import make_archive
    from pacsp2p.catalog.rebuild import rebuild

    from pacsp2p.admin.progress import Progress

    s = _settings(args)
    if not s.data_dir.is_dir():         # (a mistyped or missing --config: nothing made)
        raise SystemExit(f"pacsp2p: no data directory {s.data_dir} to rebuild the catalog "
                         "of; give the peer's --config")
    try:
        held = lock.acquire(s.data_dir)
    except lock.Locked as e:
        raise SystemExit(f"pacsp2p: cannot rebuild while the peer runs: {e}")
    path = s.data_dir / "catalog.sqlite"
    print(f"rebuilding {path} (peer {s.peer.name}) from {len(s.archives)} archive(s)")
    try:
        archives = [make_archive(a, s, reactor) for a in s.archives]
        with Progress("rebuilding the catalog", unit="instances") as bar:
            n = rebuild(path, archives, s.peer.name, progress=bar.message, count=bar.set)
    finally:
        held.close()
    print(f"catalog rebuilt: {n} instances in {path}")
    return 0


def cmd_peers(args) -> int:
    status = fetch_status(_settings(args))
    overlay = status.get("overlay")
    if overlay is None:
        print(f"peer {status['peer']} runs on its own (no [overlay] in its config)")
        return 0
    if args.json:
        print(json.dumps(overlay["members"], indent=2))
        return 0
    print(f"{'NAME':<16} {'STATE':<8} {'ADDRESS':<22} {'FACADE':<24} {'RTT ms':<7} SINCE")
    for m in overlay["members"]:
        since = human.when(m["since"]) if m.get("since") else ""
        rtt = m.get("rtt_ms")
        print(f"{m['name']:<16} {m['state']:<8} {m['address']:<22} {m['facade']:<24} "
              f"{'' if rtt is None else rtt:<7} {since}".rstrip())
    return 0


def cmd_where(args) -> int:
    from urllib.parse import urlencode
    what = "where?" + urlencode({"study": args.study} if args.study is not None else
                                {"instance": args.instance})
    rows = fetch_status(_settings(args), what)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no such study {args.study} in the catalog" if args.study else
              f"no such instance {args.instance} in the catalog")
        return 1
    for row in rows:
        reps = ", ".join(f"{r['archive']}@{r['peer']}" + ("" if r["available"] else " (DOWN)")
                         + (" (other version)" if r.get("version") == "other" else "")
                         for r in row["replicas"])
        print(f"{row['instance']}  {len(row['replicas'])} replica(s): {reps}")
    print(where_summary(rows, _settings(args).cluster.replicas))
    return 0


def where_summary(rows: list, replicas: int) -> str:
    """One line: instances, the fewest and most live copies, how many lack some."""
    live = [sum(1 for r in row["replicas"] if r["available"] and r.get("version") != "other")
            for row in rows]
    short = sum(1 for n in live if n < replicas)
    return (f"{len(rows)} instances, live copies min {min(live)} max {max(live)} "
            f"(replicas {replicas}); {short} under-replicated, "
            f"{sum(1 for n in live if n == 0)} unavailable")


def cmd_ca(args) -> int:
    from pacsp2p.overlay import tls
    try:
        if args.action == "init":
            path = tls.init_ca(args.dir, tls.DICOM_CA if args.dicom else tls.CLUSTER_CA)
            what = "DICOM CA (for the facade and modalities)" if args.dicom else "cluster CA"
            print(f"{what} created: {path} (keep {args.dir}/ca.key secret)")
        else:
            crt, key = tls.issue(args.dir, args.name, days=args.days, out=args.out,
                                 kind=args.kind, hosts=args.host or ())
            print(f"issued {crt} and {key} for {args.kind} {args.name}")
    except tls.TLSError as e:
        raise SystemExit(f"pacsp2p: {e}")
    except OSError as e:                 # a directory that cannot be made or written
        raise SystemExit(f"pacsp2p: {e.filename}: {e.strerror}")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from pacsp2p.admin import demo
    if not 1 <= args.peers <= demo.MAX_PEERS:
        raise SystemExit(f"pacsp2p: --peers must be 1-{demo.MAX_PEERS}")
    return demo.run(Path(args.dir).resolve(), args.peers, args.base_port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pacsp2p", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", help="TOML config file (default: embedded defaults)")
    p.add_argument("--version", action="version", version=f"pacsp2p {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="what a running peer reports")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    c = sub.add_parser("check-config", help="validate a config file")
    c.set_defaults(fn=cmd_check_config)
    cat = sub.add_parser("catalog", help="catalog maintenance")
    catsub = cat.add_subparsers(dest="action", required=True)
    r = catsub.add_parser("rebuild", help="rebuild the catalog from the archives")
    r.set_defaults(fn=cmd_catalog_rebuild)
    dg = catsub.add_parser("digest", help="a running peer's catalog hash (equal = in sync)")
    dg.add_argument("--json", action="store_true")
    dg.set_defaults(fn=cmd_catalog_digest)
    pe = sub.add_parser("peers", help="the cluster members a running peer sees")
    pe.add_argument("--json", action="store_true")
    pe.set_defaults(fn=cmd_peers)
    wh = sub.add_parser("where", help="the replicas of a study's instances")
    which = wh.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="StudyInstanceUID")
    which.add_argument("--instance", help="SOPInstanceUID")
    wh.add_argument("--json", action="store_true")
    wh.set_defaults(fn=cmd_where)
    ca = sub.add_parser("ca", help="the cluster's certificate authority")
    casub = ca.add_subparsers(dest="action", required=True)
    ci = casub.add_parser("init", help="create a CA in DIR (ca.crt, ca.key)")
    ci.add_argument("dir")
    ci.add_argument("--dicom", action="store_true",
                    help="a CA for DICOM TLS (facade, modalities), not the cluster's")
    ci.set_defaults(fn=cmd_ca)
    cs = casub.add_parser("issue", help="issue NAME.crt/NAME.key for a peer or DICOM node")
    cs.add_argument("dir")
    cs.add_argument("name")
    cs.add_argument("--kind", choices=("peer", "server", "client"), default="peer",
                    help="peer: an overlay member (cluster CA); server: a facade or a TLS "
                         "C-MOVE destination; client: a modality that only sends and "
                         "queries (server and client need a DICOM CA: ca init --dicom)")
    cs.add_argument("--host", action="append",
                    help="an address or DNS name of the holder (repeatable)")
    cs.add_argument("--days", type=int, default=825)
    cs.add_argument("--out", help="write the peer's files here (default: DIR)")
    cs.set_defaults(fn=cmd_ca)
    de = sub.add_parser("demo", help="run a local cluster until Ctrl-C")
    de.add_argument("--peers", type=int, default=3, help="how many peers (1-64)")
    de.add_argument("--dir", default="pacsp2p-demo")
    de.add_argument("--base-port", type=int, default=None,
                    help="facade port of the first peer; peer i uses base + 10*i .. +4 "
                         "(default 11112, or lower if the ports would reach the "
                         "ephemeral range)")
    de.set_defaults(fn=cmd_demo)
    from pacsp2p.admin import delete
    dl = delete.add_parser(sub)
    from pacsp2p.admin import auth
    auth.add_parser(sub)                       # admin hash-password
    from pacsp2p.admin import drain, scrub
    sc, dr = scrub.add_parser(sub), drain.add_parser(sub)   # scrub, drain
    for sp in (s, c, r, pe, dg, wh, dl, sc, dr):
        sp.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="TOML config file (default: embedded defaults)")
    args = p.parse_args(argv)
    from pacsp2p.admin import client
    del client.ANSWERED[:]
    try:
        return args.fn(args)
    except config.ConfigError as e:
        print(f"pacsp2p: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        if not client.ANSWERED:
            raise
        # an answer of the right kind whose fields are not (another version, a hostile
        # service on the port): one line, not a traceback
        print(f"pacsp2p: the answer to {client.ANSWERED[-1].split('?')[0]} is not what "
              f"pacsp2p {__version__} reads ({type(e).__name__}: {shown(str(e), 100)}); "
              "is the peer of another version?", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
