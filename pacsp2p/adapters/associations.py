"""Pooled pynetdicom associations with one archive, for the ``dimse`` adapter.

Blocking: used from the adapter's thread pool only. A few idle associations are kept
per kind (echo, find, store of one SOP class and syntax, ...) and reused; one found
dead is replaced once.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict

from pynetdicom import AE, evt

from pacsp2p.dicom.requestor import guard

IDLE_PER_KIND = 4


class DimseError(Exception):
    """The archive refused or failed a DIMSE operation."""


def _nodelay(event) -> None:
    """TCP_NODELAY on our socket: a DIMSE request is two PDUs (command, identifier) and
    with Nagle's algorithm the second waits for the archive's delayed ACK (~40 ms per
    message: a crawl of dcmqrscp ran 4x slower)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Associations:
    """Associations from *calling_ae* to *ae_title* at *host*:*port*."""

    def __init__(self, calling_ae: str, ae_title: str, host: str, port: int,
                 timeout: float, max_pdu: int):
        self.calling_ae, self.ae_title, self.host, self.port = calling_ae, ae_title, host, port
        self.timeout, self.max_pdu = timeout, max_pdu
        self._idle: dict = defaultdict(list)   # kind -> idle associations
        self._lock = threading.Lock()

    def _ae(self) -> AE:
        ae = AE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        ae.maximum_pdu_size = self.max_pdu
        return ae

    def associate(self, contexts, roles=(), handlers=()):
        """A new association proposing *contexts* (DimseError if not established)."""
        where = f"{self.ae_title}@{self.host}:{self.port}"
        try:
            assoc = self._ae().associate(self.host, self.port, contexts=contexts,
                                         ae_title=self.ae_title, ext_neg=list(roles) or None,
                                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay),
                                                       *handlers])
        except Exception as e:
            raise DimseError(f"association with {where} failed: {e}") from e
        if not assoc.is_established:
            why = ("rejected" if assoc.is_rejected else "aborted (no presentation context "
                   "accepted?)" if assoc.is_aborted else "no answer")
            raise DimseError(f"association with {where} failed: {why}")
        guard(assoc)            # pynetdicom's reactor thread must not take our responses
        return assoc

    def _borrow(self, kind, make):
        with self._lock:
            idle = self._idle.get(kind)
            while idle:
                assoc = idle.pop()
                if assoc.is_established:
                    return assoc, True
        return make(), False

    def _give_back(self, kind, assoc):
        if not assoc.is_established:
            return
        with self._lock:
            if len(self._idle[kind]) < IDLE_PER_KIND:
                self._idle[kind].append(assoc)
                return
        assoc.release()

    def run(self, kind, make, fn):
        """fn(assoc) on a pooled association of *kind* (*make*() makes one); once more on
        a fresh one if a reused one turns out dead."""
        assoc, reused = self._borrow(kind, make)
        try:
            result = fn(assoc)
        except Exception:
            if assoc.is_established:
                assoc.abort()
            if not reused:
                raise
            assoc = make()
            try:
                result = fn(assoc)
            except Exception:
                if assoc.is_established:
                    assoc.abort()
                raise
        self._give_back(kind, assoc)
        return result

    def close(self) -> None:
        """Release every idle association."""
        with self._lock:
            idle = [a for lst in self._idle.values() for a in lst]
            self._idle.clear()
        for assoc in idle:
            try:
                assoc.release()
            except Exception:
                pass
