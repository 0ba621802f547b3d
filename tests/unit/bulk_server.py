"""A real bulk channel in a process of its own, for tests/unit/test_bulk_paths.py.

    python bulk_server.py ROOT TLS_DIR TIMEOUT LIMIT KNOWN.dcm... -- UNCATALOGUED.dcm...

Starts a catalog and an embedded archive under ROOT, stores the KNOWN files in both and
the UNCATALOGUED ones in the archive only, serves the bulk channel of peer "a" on a
guarded mutual-TLS port on 127.0.0.1 (handshake TIMEOUT seconds, LIMIT pending) and its
instance reads on a read port (``threadtls``, the same bounds), prints ``{"port": N,
"read_port": R, "status": S}`` and runs until killed; ``GET /status`` on a plain TCP port
(S) reports the handshake guards' counters, the bulk port's and under ``"read"`` the read
port's (after a garbage collection: a Deferred that failed unhandled is reported on
stderr by then).
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server

from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.catalog.db import Catalog, stored_location
from pacsp2p.dicom.header import read_meta
from pacsp2p.overlay import bulk, reads, threadtls, tls


class Status(resource.Resource):
    isLeaf = True

    def __init__(self, guard, read_guard):
        super().__init__()
        self.guard, self.read_guard = guard, read_guard

    def render_GET(self, request):
        gc.collect()
        return json.dumps({**counters(self.guard), "read": counters(self.read_guard)}).encode()


def counters(g) -> dict:
    return {"pending": g.pending, "expired": g.expired, "evicted": g.evicted}


@defer.inlineCallbacks
def main(root: Path, tls_dir: Path, timeout: float, limit: int, known, uncatalogued):
    catalog = Catalog(root / "catalog.sqlite", reactor, peer="a")
    yield catalog.start()
    archive = EmbeddedArchive("local", root / "archive", reactor, fsync=False)
    yield archive.start()
    for path in known + uncatalogued:
        meta = read_meta(path)
        stored = yield archive.store(path, meta)
        if path in known:
            yield catalog.record(meta, stored_location(meta, stored, "a"))
    pool = ThreadPool(1, 2, "bulk-io")
    pool.start()
    site = bulk.site(catalog, {"local": archive}, pool, reactor, {})
    port = tls.listen(reactor, 0, site, tls.Credentials(tls_dir, "a").options(),
                      "127.0.0.1", "bulk port", timeout, limit)
    handler = reads.Reads(catalog, {"local": archive})
    read_port = threadtls.ThreadServer(
        reactor, threadtls.server_context(tls_dir, "a"), handler, "read port",
        handshake_timeout=timeout, max_pending=limit, max_body=bulk.MAX_BATCH_BODY)
    handler.server = read_port
    read_port.listen(0, "127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", read_port.stopListening)
    status = reactor.listenTCP(0, server.Site(Status(port.guard, read_port.guard)),
                               interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port, "read_port": read_port.port,
                      "status": status.getHost().port}), flush=True)


def run(argv):
    root, tls_dir, timeout, limit, *files = argv
    cut = files.index("--") if "--" in files else len(files)
    known = [Path(f) for f in files[:cut]]
    uncatalogued = [Path(f) for f in files[cut + 1:]]

    def started():
        d = main(Path(root), Path(tls_dir), float(timeout), int(limit), known, uncatalogued)
        d.addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr, flush=True),
                                reactor.stop()))
    reactor.callWhenRunning(started)
    reactor.run()


if __name__ == "__main__":
    run(sys.argv[1:])
