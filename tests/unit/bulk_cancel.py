"""A real bulk client in a process of its own, for tests/unit/test_bulk_hostile.py.

    python bulk_cancel.py TLS_DIR PORT TMPDIR PATIENCE memory|file|end|changes|silent|batch|old

Fetches one instance (``BulkClient.fetch``) from peer "a" at 127.0.0.1:PORT as peer
"b"; once its body is arriving (bytes held in the memory budget; a temporary file under
TMPDIR; or the fetch has ended) cancels the fetch, as a retrieval does with a stalled
source (``changes``: asks ``POST /changes`` instead and waits for its end; ``silent``: the
same with a 3 s answer timeout; ``batch``: asks a batch, ``fetch_many``, and waits for its
end; ``old``: the same, then asks again, which must fail at once); then waits (at most
PATIENCE seconds) until the budget holds nothing and no temporary file is left, and
prints one JSON line: how the fetch ended, the budget's bytes still held, the temporary
files left, and the errors logged meanwhile (an exception in the reactor, an unhandled
error in a Deferred). Its reactor runs on until a line arrives on stdin (the
test checks meanwhile whether the server saw the connection closed: at exit it would).
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from bulk_fetch import until_done

from pacsp2p.overlay import fetching, tls

UID = "1.2.826.0.1.3680043.8.498.1"


@defer.inlineCallbacks
def poll(predicate, patience: float):
    deadline = time.monotonic() + patience
    while not predicate() and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.05, lambda: None)


@defer.inlineCallbacks
def main(tls_dir: Path, port: int, tmp: Path, patience: float, wait: str, logged: list):
    pool = ThreadPool(1, 4, "bulk-io")
    pool.start()
    client = fetching.BulkClient(tls.Credentials(tls_dir, "b"), reactor, pool, tmp)
    member = SimpleNamespace(name="a", host="127.0.0.1", bulk_port=port)
    if wait == "silent":
        client.answer_timeout = 3.0
    d = (client.pull_body(member, {}, 10) if wait in ("changes", "silent") else
         client.fetch_many(member, "local", [(UID, "")]) if wait in ("batch", "old") else
         client.fetch(member, "local", UID))
    outcome = []
    d.addCallbacks(lambda f: (outcome.append("handed over"),
                              getattr(f, "close", lambda: None)()),
                   lambda f: outcome.append(f.type.__name__))
    arrived = {"memory": lambda: client.budget.held > 0, "end": lambda: outcome,
               "changes": lambda: outcome, "silent": lambda: outcome,
               "batch": lambda: outcome, "old": lambda: outcome,
               "file": lambda: any(tmp.iterdir())}[wait]
    yield poll(lambda: arrived() or outcome, patience)
    arriving = {"held": client.budget.held, "files": len(list(tmp.iterdir()))}
    d.cancel()
    yield poll(lambda: client.budget.held == 0 and not any(tmp.iterdir()), patience)
    yield task.deferLater(reactor, 0.5, lambda: None)   # whatever follows the close
    gc.collect()                                        # unhandled errors in Deferreds
    again = ""
    if wait == "old":           # a peer that answered 405 is not asked a batch again
        try:
            yield client.fetch_many(member, "local", [(UID, "")])
        except Exception as e:  # noqa: BLE001 (its name is the answer)
            again = type(e).__name__
    print(json.dumps({"arriving": arriving, "outcome": outcome, "again": again,
                      "held": client.budget.held,
                      "left": sorted(p.name for p in tmp.iterdir()),
                      "logged": logged}), flush=True)
    yield threads.deferToThread(sys.stdin.readline)     # the test has looked
    pool.stop()


def run(argv):
    tls_dir, port, tmp, patience, wait = argv
    logged: list = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            failure = event.get("log_failure")
            logged.append(failure.type.__name__ if failure is not None else
                          str(event.get("log_format", ""))[:200])
    globalLogPublisher.addObserver(observe)
    until_done(lambda: main(Path(tls_dir), int(port), Path(tmp), float(patience), wait,
                            logged))


if __name__ == "__main__":
    run(sys.argv[1:])
