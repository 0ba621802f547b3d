"""Built-in replica selection.

``nearest`` (default) ranks the replicas of an instance for a reader:

1. the reader's own archives (no network between them and the reader);
2. archives of the reader's site (its archives' ``site`` label);
3. the rest;

and within each group, archives measured faster first (the rate retrievals of this peer
saw, remembered per archive, compared in bands of 25% so that noise does not reorder
them), then archives not measured yet, in a per-reader rendezvous order (a hash of the
reader's and the archive's names: each reader has its own order, so readers spread
over the archives, and one reader's order is the same for every instance, so
``balancing = "single"`` reads a study from one archive).

What it knows comes from the peer: ``sites`` ((peer, archive) -> site label: this peer's
archives and those other peers advertise) and ``rates`` ((peer, archive) -> bytes/s),
both filled as retrievals run (:class:`pacsp2p.strategies.Strategies`).
"""

from __future__ import annotations

import hashlib
import math

from pacsp2p.strategies.hookspecs import hookimpl

BAND = 1.25                 # rates within 25% of each other rank alike


def rendezvous(reader: str, peer: str, archive: str) -> bytes:
    return hashlib.blake2b(f"{reader}\x00{peer}\x00{archive}".encode(),
                           digest_size=8).digest()


class Nearest:
    name = "nearest"

    def __init__(self):
        self.sites: dict = {}
        self.rates: dict = {}

    def bind(self, strategies) -> None:
        """Share what the peer learns of archives (sites, measured rates)."""
        self.sites, self.rates = strategies.sites, strategies.rates

    @hookimpl
    def pacsp2p_rank_replicas(self, instance, locations, reader):
        def key(loc):
            where = (loc.peer, loc.archive)
            mine = loc.peer == reader.name
            same_site = bool(reader.site) and self.sites.get(where) == reader.site
            rate = self.rates.get(where, 0.0)
            band = -math.floor(math.log(rate, BAND)) if rate > 1 else math.inf
            return (not mine, not same_site, band, rendezvous(reader.name, *where))
        return sorted(locations, key=key)


BUILTIN = (Nearest,)
