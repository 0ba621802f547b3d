"""The catalog: what the cluster holds (patient/study/series/instance attributes) and where.

A peer's local SQLite database (WAL mode; one batched writer thread, readers on their own
connections). ``attributes`` says which DICOM attributes are kept at which level,
``matching`` turns a C-FIND identifier into SQL (PS3.4 C.2.2.2), ``db`` owns the
connections and the writer.
"""

from pacsp2p.catalog.db import Catalog

__all__ = ["Catalog"]
