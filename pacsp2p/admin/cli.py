"""The ``pacsp2p`` command line: administration of a peer and its cluster.

    pacsp2p status [--config FILE] [--json]     what a running peer reports
    pacsp2p catalog rebuild [--config FILE]     rebuild the catalog from the archives
    pacsp2p check-config [--config FILE]        validate a config file

Every command reads the same TOML config as ``twistd pacsp2p`` (default: the embedded
single-peer defaults in the current directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from pacsp2p import config, lock


def _settings(args):
    return config.load(args.config)


def cmd_check_config(args) -> int:
    s = _settings(args)
    print(f"{s.source}: ok (peer {s.peer.name}, facade {s.facade.ae_title} on port "
          f"{s.facade.port}, {len(s.archives)} archive(s), data in {s.data_dir})")
    return 0


def fetch_status(settings) -> dict:
    host = "127.0.0.1" if settings.admin.bind in ("0.0.0.0", "") else settings.admin.bind
    url = f"http://{host}:{settings.admin.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"pacsp2p: no peer answers at {url} ({e}); is it running?")


def cmd_status(args) -> int:
    status = fetch_status(_settings(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"peer {status['peer']} (pacsp2p {status['version']}), facade "
          f"{status['facade']['ae_title']} on port {status['facade']['port']}")
    c = status["catalog"]
    print(f"catalog: {c['patients']} patients, {c['studies']} studies, {c['series']} series, "
          f"{c['instances']} instances, {c['locations']} replicas, {c['conflicts']} conflicts")
    for name, h in status["archives"].items():
        state = "up" if h.get("up") else f"DOWN ({h.get('error', '')})"
        free = h.get("free_bytes")
        extra = f", {free / 2**30:.1f} GiB free" if free is not None else ""
        print(f"archive {name}: {state}{extra}")
    return 0


def cmd_catalog_rebuild(args) -> int:
    from twisted.internet import reactor

    from pacsp2p.adapters import make_archive
    from pacsp2p.catalog.rebuild import rebuild

    s = _settings(args)
    try:
        held = lock.acquire(s.data_dir)
    except lock.Locked as e:
        raise SystemExit(f"pacsp2p: cannot rebuild while the peer runs: {e}")
    try:
        archives = [make_archive(a, s, reactor) for a in s.archives]
        n = rebuild(s.data_dir / "catalog.sqlite", archives, s.peer.name,
                    progress=lambda m: print(m, file=sys.stderr))
    finally:
        held.close()
    print(f"catalog rebuilt: {n} instances")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pacsp2p", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", help="TOML config file (default: embedded defaults)")
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
    for sp in (s, c, r):
        sp.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="TOML config file (default: embedded defaults)")
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except config.ConfigError as e:
        print(f"pacsp2p: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
