"""A real bulk client in a process of its own, for tests/unit/test_bulk_fetch_memory.py.

    python bulk_fetch.py TLS_DIR PORT TMPDIR BUDGET [--many | --reads R] UID...

Fetches each UID (``BulkClient.fetch``, all at once; with ``--many``, all in one
``BulkClient.fetch_many``; with ``--reads R``, ``fetch`` from the read port R by a
``readclient.ReadClient``) from archive "local" of peer "a" at 127.0.0.1:PORT as peer
"b", with a memory budget of BUDGET bytes, and prints one JSON line: per UID what was
handed over (kind, sha256, sizes, the SHA-256 of all its bytes, whether it names a file
on disk; the name of the exception for one not served), then the budget's bytes still
held and the connections the read client made.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from pacsp2p.dicom.part10 import Part10Bytes
from pacsp2p.overlay import fetching, readclient, threadtls, tls


def described(f) -> dict:
    name = getattr(f, "name", None)
    on_disk = isinstance(name, str) and os.path.exists(name)
    f.seek(0)
    whole = f.read()
    out = {"kind": "memory" if isinstance(f, Part10Bytes) else
           "file" if on_disk else type(f).__name__,
           "sha256": f.sha256, "size": f.size, "data_size": f.data_size,
           "bytes_sha256": hashlib.sha256(whole).hexdigest()}
    if isinstance(f, Part10Bytes):
        out["data_sha256"] = hashlib.sha256(f.data()).hexdigest()
    f.close()
    out["left_on_disk"] = on_disk and os.path.exists(name)
    return out


class Counted(readclient.ReadClient):
    """A read client that counts the connections it makes."""

    connections = 0

    def _connection(self, peer, flying):
        got = super()._connection(peer, flying)
        self.connections += bool(got and got[1])
        return got


@defer.inlineCallbacks
def main(tls_dir: Path, port: int, tmp: Path, budget: int, uids):
    pool = ThreadPool(1, 8, "bulk-io")
    pool.start()
    read_port, reads = 0, None
    if uids[:1] == ["--reads"]:
        read_port, uids = int(uids[1]), uids[2:]
        reads = Counted(threadtls.client_context(tls_dir, "b"), reactor, tmp,
                        fetching.NotHeld)
    client = fetching.BulkClient(tls.Credentials(tls_dir, "b"), reactor, pool, tmp, reads)
    client.budget.limit = budget
    member = SimpleNamespace(name="a", host="127.0.0.1", bulk_port=port, read_port=read_port)
    if uids and uids[0] == "--many":
        uids = uids[1:]
        got = yield client.fetch_many(member, "local", [(uid, "") for uid in uids])
    else:
        got = yield defer.DeferredList([client.fetch(member, "local", uid)
                                        for uid in uids], consumeErrors=True)
        got = [f if ok else f.value for ok, f in got]
    print(json.dumps({"instances": {uid: type(f).__name__ if isinstance(f, Exception)
                                    else described(f) for uid, f in zip(uids, got)},
                      "held": client.budget.held,
                      "connections": reads.connections if reads else 0}), flush=True)
    pool.stop()


def until_done(call):
    """Run the reactor until the Deferred that *call()* returns fires (a failure's
    traceback to stderr)."""
    def started():
        d = call()
        d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr, flush=True))
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(started)
    reactor.run()


def run(argv):
    tls_dir, port, tmp, budget, *uids = argv
    until_done(lambda: main(Path(tls_dir), int(port), Path(tmp), int(budget), uids))


if __name__ == "__main__":
    run(sys.argv[1:])
