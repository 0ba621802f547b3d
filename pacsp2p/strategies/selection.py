"""Built-in replica selection: this peer's own archives first, then the same site, then
the rest in a per-instance rendezvous order (so readers spread their load)."""

from __future__ import annotations

import hashlib

from pacsp2p.strategies.hookspecs import hookimpl


class Nearest:
    name = "nearest"

    def __init__(self, sites: dict[str, str | None] | None = None):
        self.sites = sites or {}

    @hookimpl
    def pacsp2p_rank_replicas(self, instance, locations, reader):
        def key(loc):
            local = loc.peer != reader.name
            same_site = not (reader.site and self.sites.get(loc.peer) == reader.site)
            h = hashlib.blake2b(f"{instance.sop_instance_uid}{loc.peer}".encode(),
                                digest_size=4).digest()
            return (local, same_site, h)
        return sorted(locations, key=key)


BUILTIN = (Nearest,)
