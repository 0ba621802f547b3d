"""The facade's DIMSE services: one operation per request, by command field.

``Services`` is what the acceptor (``dicom.acceptor``) calls for every request; it holds
what the operations share: the cluster API, the settings (destinations, AE title), the
thread pools that write received data sets and read stored ones, and the spare files.
"""

from __future__ import annotations

from pacsp2p.dicom import dimse
from pacsp2p.facade.find import Find
from pacsp2p.facade.get import Get
from pacsp2p.facade.move import Move
from pacsp2p.facade.operation import Echo
from pacsp2p.facade.store import Store

KINDS = {dimse.C_ECHO_RQ: Echo, dimse.C_STORE_RQ: Store, dimse.C_FIND_RQ: Find,
         dimse.C_MOVE_RQ: Move, dimse.C_GET_RQ: Get}


class Services:
    """What the facade serves; builds one operation per request."""

    def __init__(self, settings, cluster, reactor, recv_pool, send_pool, spares):
        self.settings = settings
        self.cluster = cluster
        self.reactor = reactor
        self.recv_pool, self.send_pool = recv_pool, send_pool
        self.spares = spares

    def request(self, assoc, cx, field, fields, has_data):
        kind = KINDS.get(field)
        if kind is None:
            raise LookupError(f"unsupported DIMSE command {field:#06x}")
        return kind(self, assoc, cx, fields)
