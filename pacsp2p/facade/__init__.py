"""The DICOM facade: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET for the whole cluster.

It stands on two things only: the wire code (``pacsp2p.dicom``: acceptor, DIMSE, PDUs,
identifiers) and the cluster API (``pacsp2p.cluster``, the one door). One module per
service (``store``, ``find``, ``move``, ``get``; C-ECHO in ``operation``), the dispatch
table in ``services``, the listening service in ``listener``.
"""

from pacsp2p.facade.listener import Facade

__all__ = ["Facade"]
