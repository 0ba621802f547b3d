"""Built-in placement strategies, registered like any site plugin.

- ``rendezvous`` (default): highest random weight hashing (Thaler & Ravishankar, "Using
  name-based mappings to increase hit rates", IEEE/ACM ToN 1998). Each archive scores
  hash(SOP Instance UID, archive); the highest scores win. Every peer computes the same
  answer with no coordination, instances of one study spread evenly over all archives
  (so retrievals can read from all of them), and adding an archive moves only its fair
  share of new placements.
- ``least-used``: archives holding the fewest instances (then most free space) first.
- ``site-aware``: rendezvous order, but replicas go to distinct sites first.

The rule of distinct copies (:func:`distinct`), which ``rendezvous`` and ``least-used``
apply to their order: the copies of one instance go to distinct peers first; when there
are more copies than peers, to other archives of peers already chosen (never twice to one
archive); and among equally good candidates, to a site not chosen yet. ``site-aware``
puts distinct sites before distinct peers. A plugin overrides the rule by returning its
own order from ``pacsp2p_place`` (the instance goes to the first alive ones, in order).

:func:`local_first` is not a strategy: the ingest applies it to a new instance's order
(HDFS's first replica on the writer's node) with ``[strategies] first_copy = "auto"`` (the
default) where a built-in in :data:`LOCAL_FIRST` ranked the instance, and with
``"local"`` always.
Repair, surplus trimming and drains keep the strategy's own order, the same at every
peer (the repairer and the copies kept are "the first in placement order").
"""

from __future__ import annotations

import hashlib

from pacsp2p.strategies.hookspecs import hookimpl


def hrw_order(uid: str, archives):
    def score(a):
        return hashlib.blake2b(f"{uid}\x00{a.peer}\x00{a.name}".encode(),
                               digest_size=8).digest()
    return sorted(archives, key=score, reverse=True)


def spread(ordered, key):
    """Stable reorder: first one archive per distinct *key* value, then the rest."""
    seen, first, rest = set(), [], []
    for a in ordered:
        k = key(a)
        (rest if k in seen else first).append(a)
        seen.add(k)
    return first + rest


def _site(a) -> str:
    """*a*'s site label (an archive without one counts as a site of its own)."""
    return a.site or f"peer:{a.peer}/{a.name}"


def distinct(ordered):
    """Stable reorder of *ordered* (best first) by the rule of distinct copies: each next
    pick is the first remaining archive on a peer not picked yet, else the first one on a
    peer already picked; among those, one on a site not picked yet comes first (an
    archive without a site label counts as a site of its own)."""
    rest = [(a, _site(a)) for a in ordered]
    out, peers, sites = [], set(), set()
    while rest:                     # the first of the lowest cost; (False, False) is best:
        best, low = 0, None         # one archive per peer takes one step per pick, O(n)
        for i, (a, site) in enumerate(rest):
            cost = (a.peer in peers, site in sites)
            if low is None or cost < low:
                best, low = i, cost
                if cost == (False, False):
                    break
        a, site = rest.pop(best)
        out.append(a)
        peers.add(a.peer)
        sites.add(site)
    return out


def local_first(ordered, local, sites_first: bool = False):
    """*ordered* (placement's order, best first) with *local* first (``[strategies]
    first_copy = "local"``: an archive of the peer that received the instance), then the
    others in *ordered*'s order, those sharing *local*'s peer or site after the rest —
    the rule of distinct copies with *local* picked first (*sites_first*, as
    ``site-aware``: a distinct site before a distinct peer). One pass: O(archives)."""
    site = _site(local)
    buckets: tuple[list, list, list, list] = ([], [], [], [])
    for a in ordered:
        if (a.peer, a.name) == (local.peer, local.name):
            continue
        peer, same = a.peer == local.peer, _site(a) == site
        buckets[2 * same + peer if sites_first else 2 * peer + same].append(a)
    return [local, *buckets[0], *buckets[1], *buckets[2], *buckets[3]]


class Rendezvous:
    name = "rendezvous"

    @hookimpl
    def pacsp2p_place(self, instance, archives, replicas):
        return distinct(hrw_order(instance.sop_instance_uid, archives))


class LeastUsed:
    name = "least-used"

    @hookimpl
    def pacsp2p_place(self, instance, archives, replicas):
        ordered = sorted(archives, key=lambda a: (a.instances, -(a.free_bytes or 0), a.name))
        return distinct(ordered)


class SiteAware:
    name = "site-aware"

    @hookimpl
    def pacsp2p_place(self, instance, archives, replicas):
        by_peer = spread(hrw_order(instance.sop_instance_uid, archives), lambda a: a.peer)
        return spread(by_peer, lambda a: a.site or f"peer:{a.peer}")


BUILTIN = (Rendezvous, LeastUsed, SiteAware)
# the strategies whose promise a first copy where the instance arrives keeps (``auto``):
# an even spread (guarded by first_copy_slack) and distinct peers/sites; not least-used's
# "the emptiest first", nor a site plugin's own order
LOCAL_FIRST = frozenset({"rendezvous", "site-aware"})
