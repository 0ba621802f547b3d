"""C-FIND (PS3.4 annex C.4.1, PS3.7 9.1.2) of the facade.

The identifier is decoded (``dicom.identifiers``) into a Query, answered by
``cluster.matches`` (the whole cluster's catalog, a page of rows at a time: bounded
memory however many match), one Pending response per row sent while the transport takes
them; a C-CANCEL is honoured between responses. Asked for Retrieve
AE Title (0008,0054), a match names the AE title this facade was called by: any peer
retrieves what the cluster holds (PS3.4 C.4.1.1.3.2, as DCMTK's dcmqrscp answers).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.identifiers import IdentifierError, check_retrieve, encode_row, to_query
from pacsp2p.dicom.status import (CANCEL, CANNOT_UNDERSTAND, DOES_NOT_MATCH, PENDING,
                                  SOP_CLASS_NOT_SUPPORTED, SUCCESS, UNABLE_TO_PROCESS)
from pacsp2p.facade.operation import Operation
from pacsp2p.validate import shown

FIND_BATCH = 16              # C-FIND responses sent per reactor turn
RETRIEVE_AE = "RetrieveAETitle"


def decode_query(op, table: dict, what: str, retrieve: bool = False):
    """(Query, requested keys) of *op*'s identifier, or None after answering a failure
    (0x0122 for a request on a presentation context of another SOP class, or whose SOP
    class is not the context's; 0xA900 for an identifier that breaks the rules — for a
    *retrieve*, one that does not name its level's unique key, ``check_retrieve`` —,
    0xC000 for one that cannot be decoded)."""
    root = table.get(op.cx.abstract_syntax)
    asked = dimse.text(op.fields, dimse.AFFECTED_SOP_CLASS)
    if root is None or asked != op.cx.abstract_syntax:
        op.warn(f"{what} refused", "{what} from {ae} of SOP class {asked} on a context for "
                "{cx}: refused", what=what, ae=op.assoc.calling_ae, asked=shown(asked, 64),
                cx=op.cx.abstract_syntax)
        op.finish(SOP_CLASS_NOT_SUPPORTED)
        return None
    try:
        decoded = to_query(op.identifier(), root)
        if retrieve:
            check_retrieve(decoded[0])
        return decoded
    except IdentifierError as e:
        op.warn(f"{what} refused", "{what} from {ae}: {err}", what=what,
                ae=op.assoc.calling_ae, err=e)
        op.finish(DOES_NOT_MATCH)
    except Exception as e:
        op.warn(f"{what} refused", "{what} from {ae}: undecodable identifier: {err}",
                what=what, ae=op.assoc.calling_ae, err=shown(str(e), 200))
        op.finish(CANNOT_UNDERSTAND)
    return None


class Find(Operation):
    """One C-FIND. Every path ends in exactly one final response: Success, Cancel, or —
    whatever goes wrong while answering (the catalog query fails, a row cannot be encoded,
    a bug) — one log line and Unable to process (0xC001), never a silent stop."""

    RSP = dimse.C_FIND_RSP

    def run(self):
        decoded = decode_query(self, contexts.QR_FIND, "C-FIND")
        if decoded is None:
            return
        self.query, self.requested = decoded
        self.sent = 0
        self.blanked: dict[str, int] = {}
        ts = self.ts
        self.syntax = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        d = defer.maybeDeferred(self.svc.cluster.matches, self.query, self.requested)
        d.addCallback(self._matched)
        d.addErrback(self._failed)

    def _matched(self, matches):
        self.matches = matches
        self._next_page()

    def _next_page(self):
        d = self.matches.next_page()
        d.addCallback(self._found)          # an error raised by _found goes to _failed too
        d.addErrback(self._failed)

    def _failed(self, failure):
        self.finish(UNABLE_TO_PROCESS, comment="the query could not be answered")
        where = ""
        if failure.frames:
            _, filename, line = failure.frames[-1][:3]
            where = f" at {filename.rsplit('/', 1)[-1]}:{line}"
        self.assoc.factory.log_limit(
            "C-FIND failure", LogLevel.error,
            "C-FIND from {ae} (message {msg_id}) failed after {n} matches: {error}: {err}"
            "{where}: answered Unable to process", ae=self.assoc.calling_ae,
            msg_id=self.msg_id, n=self.sent, error=failure.type.__name__,
            err=shown(failure.getErrorMessage()), where=where)

    def _found(self, rows):
        self.last_page = not rows
        if RETRIEVE_AE in self.requested:          # where the match can be retrieved: here
            here = self.assoc.called_ae
            rows = ({**row, RETRIEVE_AE: here} for row in rows)
        self.rows = iter(rows)
        self._send_some()

    def _send_some(self):
        """Send up to FIND_BATCH Pending responses, then go on at the next reactor turn,
        or once the transport takes more. Runs from callLater and from the association's
        resume: an exception here would reach nobody, so it ends the operation."""
        try:
            self._send_batch()
        except Exception:
            self._failed(Failure())

    def _send_batch(self):
        for _ in range(FIND_BATCH):
            if self.gone or self.finished:
                return
            if self.cancelled:
                return self.finish(CANCEL)
            row = next(self.rows, None)
            if row is None and not self.last_page:
                return self._next_page()
            if row is None:
                self._report_blanked()
                return self.finish(SUCCESS)
            data, blanked = encode_row(row, self.requested, self.query.level, self.encode,
                                       self.syntax)
            for kw in blanked:
                self.blanked[kw] = self.blanked.get(kw, 0) + 1
            self.respond(PENDING, data)
            self.sent += 1
            if self.assoc.paused:
                return self.assoc.when_writable(self._send_some)
        self.svc.reactor.callLater(0, self._send_some)

    def _report_blanked(self):
        if self.blanked:
            self.assoc.factory.log_limit(
                "C-FIND values sent empty", LogLevel.warn,
                "C-FIND from {ae}: stored values their VR cannot carry sent empty: {which}",
                ae=self.assoc.calling_ae, which=shown(", ".join(
                    f"{kw} x{n}" for kw, n in sorted(self.blanked.items())), 200))
