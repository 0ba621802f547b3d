"""The bulk channel's instance reads served on the read port: ``Reads``, the handler of a
``threadtls.ThreadServer`` (stdlib ``ssl`` in threads; HTTP/1.1 as RFC 9112 frames it).

The same requests, checks and answers as the bulk port's (``bulk``: ``GET
/instances/<archive>/<uid>?sha256=H`` and the batched ``POST /instances/<archive>``; UIDs
valid (PS3.5 §9.1), instances served by UID as the catalog places them, never a path;
fixed short error bodies), each answer written by its connection's thread in one
``sendall``. Peers advertise the port in their member info (``read_port``).
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote_to_bytes

from pacsp2p.flow import fetch_gate
from pacsp2p.overlay.bulk import (BATCH_ITEM, FRAME, WHOLE, Refused, archive_of, check_batch,
                                  check_get, frames_of, log_not_held, read_batch, read_one)


class Reads:
    """The instance reads served on the read port (``threadtls``), in its threads: the
    same checks as ``_Instances``; an archive that reads in the calling thread
    (``read_many_now``: the embedded one) is read in the connection's thread, the catalog
    asked there too (``held(now=True)``), only the archive's fetch gate taken in the
    reactor (``max_fetches``); any other archive is read as ``_Instances`` reads it
    (``on_reactor``). The answer is written by the connection's thread. Any other path:
    404."""

    def __init__(self, catalog, archives: dict):
        self.catalog, self.archives = catalog, archives
        self.server = None              # the ThreadServer (its ``on_reactor``)

    def __call__(self, request):
        path, _, query = request.target.partition(b"?")
        parts = [unquote_to_bytes(p) for p in path.split(b"/")[1:]]
        try:
            if parts[:1] != [b"instances"]:
                raise Refused(404, b"not found\n")
            if request.method == b"GET":
                return self._get(parts[1:], parse_qs(query).get(b"sha256", [b""])[0])
            if request.method == b"POST":
                name, items = check_batch(parts[1:], request.body)
                archive = archive_of(self.archives, name)
                if hasattr(archive, "read_many_now"):
                    uids = [uid for uid, _ in items]
                    frames = frames_of(uids, *self._now(archive, name, items, BATCH_ITEM))
                else:
                    frames = self.server.on_reactor(read_batch, self.catalog, archive, name,
                                                    items)
                return 200, b"application/octet-stream", [
                    part for status, body in frames
                    for part in (FRAME.pack(status, len(body)), body)]
            raise Refused(405, b"method not allowed\n")
        except Refused as r:
            return r.code, b"text/plain", r.body

    def _get(self, parts, sha):
        name, uid, sha = check_get(parts, sha)
        archive = archive_of(self.archives, name)
        try:
            if hasattr(archive, "read_many_now"):
                held, got = self._now(archive, name, [(uid, sha)], WHOLE)
                if not held:
                    raise KeyError("not in the catalog")
                got = got[0]
                if isinstance(got, BaseException):
                    raise got
                got = got[0] if isinstance(got, tuple) else got
            else:
                got = self.server.on_reactor(read_one, self.catalog, archive, name, uid, sha)
        except (KeyError, FileNotFoundError, LookupError) as e:
            log_not_held(name, uid, e)
            raise Refused(404, b"unknown instance\n") from None
        return 200, b"application/dicom", got

    def _now(self, archive, name: str, items, limit: int):
        """(held, ``read_many`` results of the held ones) of *items*, in this thread, one
        turn of the archive's fetch gate taken for them (``flow.fetch_gate``: a free one
        here, else waited for in the reactor)."""
        held = self.catalog.held(self.catalog.peer, name, [uid for uid, _ in items], True)
        asked = [(uid, sha or None) for uid, sha in items if uid in held]
        if not asked:
            return held, []
        gate = fetch_gate(archive)
        if not gate.take():                     # a free turn needs no reactor
            self.server.on_reactor(gate.acquire)
        try:
            return held, archive.read_many_now(asked, limit, examined=False)
        finally:
            gate.give(self.server.reactor)
