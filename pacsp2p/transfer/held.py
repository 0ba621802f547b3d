"""What every retrieval of this process holds in memory, together: one shared budget.

A retrieval fetches ahead of its consumer within a window bounded by count and by bytes
(``retrieve.WINDOW_BYTES``, 16 MB). A C-GET requestor that stops reading keeps its
window until its association ends (``idle_timeout``, or 120 s without a C-STORE-RSP), so
``max_associations`` of them held 32 x 16 MB. The yardsticks hold about one instance
each: Orthanc serves at most ``DicomThreadsCount`` (4) associations and drops a silent
one after ``DicomScpTimeout`` (30 s); DCMTK's dcmqrscp forks one process an association,
``MaxAssociations`` (16) of them, each blocked on the one instance it sends.

So the instances held in memory (fetched and not opened yet, or being fetched) by all
retrievals together are bounded too: ``SHARED_BYTES``; past it a retrieval fetches
ahead only within ``FLOOR_BYTES`` of its own (and always what its consumer waits for),
so a few stalled requestors slow the others' fetch-ahead, never stop them.
"""

from __future__ import annotations

import weakref

SHARED_BYTES = 64 << 20        # every retrieval together
FLOOR_BYTES = 2 << 20          # one retrieval, whatever the others hold


class Pool:
    """The retrievals sharing one budget (weakly: a retrieval let go leaves it)."""

    def __init__(self, limit: int = SHARED_BYTES, floor: int = FLOOR_BYTES):
        self.limit, self.floor = limit, floor
        self.members: weakref.WeakSet = weakref.WeakSet()

    def held(self) -> int:
        return sum(m.in_memory for m in self.members)

    def room(self, member) -> int:
        """Bytes *member* (one with ``in_memory``) may still take in memory."""
        return max(self.limit - self.held(), self.floor - member.in_memory)


POOL = Pool()
