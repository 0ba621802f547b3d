"""The holder's end of the push port (``pushport``): a writer's copies and commits on one
mutual-TLS connection, read, kept, recorded and answered by a thread of ``push-recv``.

Frames and limits are ``pushport``'s. A connection carries, one after the other: copies
(``OPEN`` ... ``END``, answered once the copy is durable and noted pending), ``COMMIT``s
(pending copies recorded in one catalog transaction by this thread:
``ReplicaService.commits_now``) and ``COMMIT_LAST``s: the commit of the copy answered
just before on this connection, which a writer sends right behind that copy's ``END``
without waiting for its answer (pipelined), after other pending copies named as a
``COMMIT`` names them. It is recorded only if it names that copy last and the writer's
hash it carries is the hash of the bytes received (as ``Ingest._early`` checks it at
the writer); else it is refused and nothing is recorded (the copy stays pending: the
writer goes the general way). Everything read is checked before use, as the AMP
responders check it.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from twisted.logger import Logger

from pacsp2p.overlay.commands import InvalidArgument, ReplicaRefused, check_commits
from pacsp2p.overlay.threadtls import IDLE_TIMEOUT, Stopped, ThreadServer, peer_name
from pacsp2p.transfer.pushport import (ANSWER, COMMIT, COMMIT_LAST, DATA, END, HEAD, IDLE,
                                       MAX_DATA, MAX_HEAD, MAX_OPEN, MAX_PUSH, OPEN,
                                       ProtocolError, _frame, _Reader)
from pacsp2p.validate import shown

log = Logger()


class PushServer(ThreadServer):
    """The holder's push port: ``threadtls``'s mutual-TLS port (handshake timeout, at
    most *max_connections* served, a thread each), each connection served by ``serve``
    instead of as HTTP requests."""

    def __init__(self, service, reactor, context, what: str, **kw):
        super().__init__(reactor, context, None, what, name="push-recv", **kw)
        self.service = service

    def _serve(self, conn) -> None:
        if self._handshake(conn):
            serve(self.service, conn.tls, peer_name(conn.tls), self.on_reactor,
                  lambda waiting: self._waits(conn, waiting))

    def _waits(self, conn, waiting: bool) -> None:
        """*conn* waits for its next copy (or no longer): the longest waiting is closed
        when a connection needs its thread (``ThreadServer._accepted``)."""
        with self._lock:
            if waiting:
                self._idle[conn] = None
            else:
                self._idle.pop(conn, None)


def serve(service, sock, peer: str, on_reactor, waits=lambda waiting: None) -> None:
    """Thread (``push-recv``): the copies writer *peer* pushes on *sock*, one after the
    other, until it closes the connection (or waits ``IDLE_TIMEOUT`` for the next).
    *service*: the ``ReplicaService``; *on_reactor(fn, *args)*: fn's result, run in
    the reactor (``ThreadServer``); *waits(bool)*: between copies, or not."""
    reader = _Reader(sock)
    last = None                  # (archive, uid, receipt) of the copy answered just before
    try:
        while True:
            sock.settimeout(IDLE_TIMEOUT)
            waits(True)
            try:
                first = reader.frame(eof_ok=True)
            finally:
                waits(False)
            if first is None:
                return
            sock.settimeout(IDLE)
            kind, n = first
            if kind not in (OPEN, COMMIT, COMMIT_LAST) or n > MAX_OPEN:
                raise ProtocolError(f"frame {kind} of {n} bytes where a copy begins")
            payload = bytes(reader.exactly(n))
            if kind == OPEN:
                answer, last = _receive(service, reader, payload, on_reactor, peer)
            else:
                answer, last = _commit(service, payload, on_reactor,
                                       last if kind == COMMIT_LAST else False), None
            sock.sendall(_frame(ANSWER, json.dumps(answer).encode()))
    except (OSError, ProtocolError, Stopped) as e:    # ssl.SSLError, timeouts: OSError
        log.info("push port: connection from {peer} closed: {err}", peer=peer,
                 err=shown(str(e) or type(e).__name__, 200))
    finally:
        sock.close()


def _receive(service, reader, opening: bytes, on_reactor, peer: str):
    """One copy, from writer *peer*: its answer (a receipt or a refusal), and (archive,
    uid, receipt) if it is kept (pending). Raises ProtocolError/OSError if the connection
    cannot go on (the partial file removed)."""
    try:
        args = json.loads(opening)
        target, meta = service.admit(args["archive"], args["uid"], args["meta"])
    except (InvalidArgument, ReplicaRefused) as e:
        refusal = {"refused": str(e)[:300], "invalid": isinstance(e, InvalidArgument)}
    except (ValueError, TypeError, KeyError, RecursionError) as e:   # (nested too deep)
        refusal = {"refused": f"unreadable opening: {shown(str(e), 200)}"}
    else:
        refusal = None
    head = reader.payload(HEAD, MAX_HEAD)
    path = None if refusal else service.tmpdir / f"{uuid.uuid4().hex}.push"
    f, sha, size = None, hashlib.sha256(), 0
    try:
        if path is not None:
            f = open(path, "wb")
            f.write(head)
        while True:
            kind, n = reader.frame()
            if kind == END and n == 0:
                break
            size += n
            if kind != DATA or n > MAX_DATA or size > MAX_PUSH:
                raise ProtocolError(f"frame {kind} of {n} bytes in a data set of {size}")
            data = reader.exactly(n)
            if f is not None:
                f.write(data)
                sha.update(data)
        if refusal:
            return refusal, None
        f.close()
        f, written, path = None, path, None          # pushed() owns the file now
        got = service.pushed(written, target, meta, len(head), sha.hexdigest(), size,
                             on_reactor, peer)
        return got, (target.name, meta.sop_instance_uid, got)
    except (ReplicaRefused, InvalidArgument) as e:
        return {"refused": str(e)[:300], "invalid": isinstance(e, InvalidArgument)}, None
    finally:
        if f is not None:
            f.close()
        if path is not None:
            path.unlink(missing_ok=True)


def _commit(service, payload: bytes, on_reactor, last=False) -> dict:
    """A ``COMMIT``: the pending copies it names recorded in one catalog transaction
    (``ReplicaService.commits_now``, by this thread); its answer, or a refusal. A
    ``COMMIT_LAST`` (*last*: the copy answered just before, or None): the same, if
    that copy is the one named last and its bytes hash to the writer's hash named."""
    try:
        copies = check_commits(payload.decode("utf-8"))
    except (InvalidArgument, UnicodeDecodeError) as e:
        return {"refused": shown(str(e), 300), "invalid": True}
    if last is not False:
        if last is None or copies[-1][:2] != last[:2]:
            return {"refused": "a COMMIT_LAST not of the copy received just before it"}
        given = last[2]["given"] or last[2]["sha256"]
        if copies[-1][2] != given:
            return {"refused": f"{shown(last[1])}: the bytes received hash to "
                               f"{given[:12]}, the writer's to {copies[-1][2][:12]}: "
                               "not recorded"}
        copies[-1] = (*last[:2], last[2]["sha256"])     # its pending copy's key
    try:
        return service.commits_now(copies, on_reactor)
    except Stopped:
        raise
    except Exception as e:                    # (each copy's own refusal is a null seq)
        return {"refused": shown(str(e) or type(e).__name__, 300)}
