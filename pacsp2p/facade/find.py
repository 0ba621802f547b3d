"""C-FIND (PS3.4 annex C.4.1, PS3.7 9.1.2) of the facade.

The identifier is decoded (``dicom.identifiers``) into a Query, answered by
``cluster.find`` (the whole cluster's catalog), one Pending response per row sent while
the transport takes them; a C-CANCEL is honoured between responses.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.identifiers import IdentifierError, to_dataset, to_query
from pacsp2p.dicom.status import (CANCEL, CANNOT_UNDERSTAND, DOES_NOT_MATCH, PENDING,
                                  SUCCESS, UNABLE_TO_PROCESS)
from pacsp2p.facade.operation import Operation

log = Logger()

FIND_BATCH = 16              # C-FIND responses sent per reactor turn


def decode_query(op, table: dict, what: str):
    """(Query, requested keys) of *op*'s identifier, or None after answering a failure
    (0xA900 for an identifier that breaks the rules, 0xC000 for one that cannot be
    decoded)."""
    root = table.get(op.cx.abstract_syntax, "STUDY")
    try:
        return to_query(op.identifier(), root)
    except IdentifierError as e:
        log.warn("{what} from {ae}: {err}", what=what, ae=op.assoc.calling_ae, err=e)
        op.finish(DOES_NOT_MATCH)
    except Exception as e:
        log.warn("{what} from {ae}: undecodable identifier: {err}", what=what,
                 ae=op.assoc.calling_ae, err=str(e)[:200])
        op.finish(CANNOT_UNDERSTAND)
    return None


class Find(Operation):
    RSP = dimse.C_FIND_RSP

    def run(self):
        decoded = decode_query(self, contexts.QR_FIND, "C-FIND")
        if decoded is None:
            return
        self.query, self.requested = decoded
        d = defer.maybeDeferred(self.svc.cluster.find, self.query, self.requested)
        d.addCallbacks(self._found, self._failed)

    def _failed(self, failure):
        log.error("C-FIND failed: {err}", err=failure.getErrorMessage())
        self.finish(UNABLE_TO_PROCESS)

    def _found(self, rows):
        self.rows = iter(rows)
        self._send_some()

    def _send_some(self):
        for _ in range(FIND_BATCH):
            if self.gone or self.finished:
                return
            if self.cancelled:
                return self.finish(CANCEL)
            row = next(self.rows, None)
            if row is None:
                return self.finish(SUCCESS)
            ds = to_dataset(row, self.requested, self.query.level)
            self.respond(PENDING, self.encode(ds))
            if self.assoc.paused:
                return self.assoc.when_writable(self._send_some)
        self.svc.reactor.callLater(0, self._send_some)
