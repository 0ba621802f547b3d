"""The facade's DIMSE services: one operation per request, by command field.

``Services`` is what the acceptor (``dicom.acceptor``) calls for every request; it holds
what the operations share: the cluster API, the settings (destinations, AE title), the
thread pools that write received data sets and read stored ones, the spare files, and
the ``policy`` (``facade.policy``): a C-STORE, C-FIND, C-MOVE or C-GET the association
(or a storage commitment N-ACTION: the store right)
has no right to is answered 0x0124 (Refused: Not Authorized) by ``NotAuthorized``, its
data set discarded.
"""

from __future__ import annotations

from pacsp2p.dicom import dimse
from pacsp2p.facade.commit import Commit
from pacsp2p.facade.find import Find
from pacsp2p.facade.get import Get
from pacsp2p.facade.move import Move
from pacsp2p.facade.operation import Echo, NotAuthorized
from pacsp2p.facade.store import Store

KINDS = {dimse.C_ECHO_RQ: Echo, dimse.C_STORE_RQ: Store, dimse.C_FIND_RQ: Find,
         dimse.C_MOVE_RQ: Move, dimse.C_GET_RQ: Get, dimse.N_ACTION_RQ: Commit}
RIGHT = {dimse.C_STORE_RQ: "store", dimse.N_ACTION_RQ: "store", dimse.C_FIND_RQ: "find",
         dimse.C_MOVE_RQ: "move", dimse.C_GET_RQ: "get"}


class Services:
    """What the facade serves; builds one operation per request."""

    def __init__(self, settings, cluster, reactor, recv_pool, send_pool, spares,
                 policy=None, observer=None):
        self.settings = settings
        self.policy = policy
        self.observer = observer      # facade.observe.Observer: audit and metrics
        self.cluster = cluster
        self.reactor = reactor
        self.recv_pool, self.send_pool = recv_pool, send_pool
        self.spares = spares
        self.series_seen: dict[str, str] = {}   # series -> its study, lately checked
        self.commitments: set = set()           # storage commitment reports waiting

    def request(self, assoc, cx, field, fields, has_data):
        kind = KINDS.get(field)
        if kind is None:
            raise LookupError(f"unsupported DIMSE command {field:#06x}")
        right = RIGHT.get(field)
        if right is not None and self.policy is not None and \
                not self.policy.permits(assoc, right):
            return NotAuthorized(self, assoc, cx, fields, field | 0x8000, right)
        return kind(self, assoc, cx, fields)
