"""DIMSE messages from P-DATA (PS3.8 9.3.5 and annex E, PS3.7 6.3): the part of an
association that turns PDV fragments into command sets and data sets, and requests into
operations of the services, one at a time in arrival order.

``Messages`` is a mixin of ``acceptor.Association``: command fragments are gathered (at
most ``MAX_COMMAND`` bytes), data set fragments go to the message's sink as they arrive
(an identifier: ``MemorySink``, bounded; a C-STORE: the facade's file writer, bounded by
``max_dataset``), tiny fragments are gathered first (``SMALL``/``GATHER``) so a sink
never holds an object per handful of bytes, and at most ``MAX_QUEUED`` requests wait.
C-CANCEL and the C-STORE-RSPs of C-GET sub-operations reach the request they belong to;
the N-EVENT-REPORT-RSP to a storage commitment report is read and dropped.
"""

from __future__ import annotations

from pacsp2p.dicom import dimse
from pacsp2p.validate import shown

SMALL = 4096                 # data fragments shorter than this are gathered ...
GATHER = 64 << 10            # ... up to this many bytes before the sink gets them
MAX_COMMAND = 64 << 10       # largest command set
MAX_IDENTIFIER = 1 << 20     # largest in-memory data set (identifiers)
MAX_QUEUED = 16              # requests received and not yet answered, per association


class MemorySink:
    """A small data set (identifier) gathered in memory; *limit*: its own bound in bytes
    (a storage commitment request's 10,000 UID pairs), else the acceptor's
    ``max_identifier``."""

    def __init__(self, limit: int | None = None):
        self.data = bytearray()
        self.limit = limit

    def feed(self, piece) -> None:
        self.data += piece
        if len(self.data) > (self.limit or MAX_IDENTIFIER):
            raise ValueError(f"data set larger than {self.limit or MAX_IDENTIFIER} bytes")


class DiscardSink:
    """Where the data set of a refused request goes: nowhere."""

    def feed(self, piece) -> None:
        """Drop *piece*."""


class Messages:
    """Mixin: needs ``_pdv``, ``_cmd``, ``_cmd_cx``, ``_data``, ``_ops``, ``accepted``,
    ``factory`` (``services``, ``max_identifier``, ``max_dataset``) and ``_fail``,
    ``_over_limit`` of the association."""

    def _fragment(self, piece, end_of_pdv: bool) -> None:
        cid, control = self._pdv
        last = end_of_pdv and control & 2
        if control & 1:                                  # command
            if self._data is not None:
                self._fail("a command fragment inside a data set")
            if self._cmd_cx is not None and self._cmd_cx != cid:
                self._fail("command fragments on two presentation contexts")
            if len(self._cmd) + len(piece) > MAX_COMMAND:
                self._over_limit(f"command set larger than {MAX_COMMAND} bytes")
            self._cmd_cx = cid
            self._cmd += piece
            if last:
                data, self._cmd = bytes(self._cmd), bytearray()
                self._cmd_cx = None
                self._command(cid, data)
            return
        if self._data is None or self._data[0] != cid:
            self._fail("a data set fragment without its command")
        _, sink, op = self._data
        self._data_size += len(piece)
        if self._data_size > self._data_limit:
            self._over_limit(f"data set larger than {self._data_limit} bytes")
        try:
            self._feed(sink, piece, last)
        except ValueError as e:
            self._over_limit(shown(str(e)))
        if last:
            self._data = None
            if op is not None:
                op.data_complete(sink)
                self._enqueue(op)

    def _feed(self, sink, piece, last) -> None:
        """Give *piece* to *sink*; pieces under ``SMALL`` bytes (tiny PDVs, or the ends of
        reads) are gathered first, so that a sink that queues pieces never holds an
        object per handful of bytes."""
        if len(piece) < SMALL:
            self._small += piece
            if len(self._small) < GATHER and not last:
                return
            piece, self._small = self._small, bytearray()
        elif self._small:
            small, self._small = self._small, bytearray()
            sink.feed(small)
        if piece:
            sink.feed(piece)

    def _command(self, cid: int, data: bytes) -> None:
        cx = self.accepted.get(cid)
        if cx is None:
            self._fail(f"a message on presentation context {cid}, not accepted", 6)
        fields = dimse.command_elements(data)
        field = dimse.us(fields, dimse.COMMAND_FIELD)
        has_data = dimse.us(fields, dimse.DATA_SET_TYPE, dimse.NO_DATA_SET) != \
            dimse.NO_DATA_SET
        op = None
        if field == dimse.C_CANCEL_RQ:
            target = dimse.us(fields, dimse.RESPONDED_TO)
            for o in list(self._ops):    # a cancel may end *o* at once (done(): popped)
                if o.msg_id == target:
                    o.cancel()
        elif field == dimse.N_EVENT_REPORT_RSP:
            pass                # a storage commitment report heard: nothing waits for it
        elif field == dimse.C_STORE_RSP:
            head = self._ops[0] if self._ops else None
            if head is None or not head.store_response(fields):
                self._fail("an unexpected C-STORE-RSP")
        else:
            if len(self._ops) >= MAX_QUEUED:
                self._over_limit(f"more than {MAX_QUEUED} requests waiting")
            try:
                op = self.factory.services.request(self, cx, field, fields, has_data)
            except LookupError as e:
                self._fail(shown(str(e)))
        if has_data:
            sink = op.sink if op is not None else DiscardSink()
            small = op is None or isinstance(sink, MemorySink)
            self._data = (cid, sink, op)
            self._data_size = 0
            self._small = bytearray()
            self._data_limit = (getattr(sink, "limit", None) or self.factory.max_identifier) \
                if small else self.factory.max_dataset
        elif op is not None:
            op.data_complete(None)
            self._enqueue(op)

    def _enqueue(self, op) -> None:
        self._ops.append(op)
        if len(self._ops) == 1:
            op.start()

    def done(self, op) -> None:
        """*op* sent its final response: start the next request."""
        if self._ops and self._ops[0] is op:
            self._ops.popleft()
            if self._ops:
                self._ops[0].start()
