"""The log line of a conflicting version kept: one SOP Instance UID received again with
other bytes, both kept (a conflict: nothing is lost). One ``LogLimit`` for every path
that keeps one -- a lone peer's C-STORE (``onejob``), a cluster's copy recorded at the
writer or at a holder (``replicas.record``) -- so a requestor sending one UID in a loop,
a byte changed each time, writes at most 10 lines per 10 s, then one counting the rest,
at every peer that holds a copy (not a line per C-STORE)."""
from __future__ import annotations

from twisted.logger import Logger, LogLevel

from pacsp2p.dicom.admission import shared_limit

log = Logger()


def conflict_logged(reactor, uid: str, sha256: str, archive: str) -> None:
    """Reactor: the line for a conflicting version of *uid* kept on *archive*."""
    shared_limit(log, reactor)("conflicting version", LogLevel.warn, "conflict: {uid} "
                               "received again with different bytes (sha256 {sha}); both "
                               "kept on {archive}", uid=uid, sha=sha256, archive=archive)
