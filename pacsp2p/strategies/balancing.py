"""Built-in load balancing for retrievals. A source is one archive (a peer and one of its
archives); ``plan.ranked(uid)`` is the replica selection's order of an instance's live
sources (``pacsp2p_rank_replicas``), best first.

- ``work-stealing`` (default): every source pulls small batches as it frees up, sized to
  what it delivers in about half a second at its measured rate (at most its ``limit``
  of fetches at once) — so a fast source takes more and a slow one never holds much.
  The ranking is each source's preference: it first takes the instances that rank it
  highest, then, among those, the rarest (fewest live holders, as in BitTorrent: Cohen,
  "Incentives build robustness in BitTorrent", 2003), then in the order the consumer
  wants them (``plan.candidates``: an index per source, no scan of every pending
  instance). Endgame: when nothing is left unclaimed, a source with nothing of its own
  in flight re-requests an instance another source is still fetching, one at a time;
  the first copy wins. (One at a time: a source that filled its free slots with copies
  of others' instances shared its link between them and its own last fetches — at K=3
  about 24 second copies, 12 MB of the 157 MB study, slowed every source's end.)
- ``single``: every instance from its first-ranked live source, as a plain archive
  would serve it (with ``nearest``: one archive for the whole study): the benchmarks'
  baseline. If that source fails, the next one of the ranking takes over.
"""

from __future__ import annotations

import itertools

from pacsp2p.strategies.hookspecs import hookimpl

TARGET_SECONDS = 0.5
MAX_BATCH = 64          # instances in flight from one source at most (its own limit
                        # is smaller but where small instances travel in batches)


def _room(source) -> int:
    limit = getattr(source, "limit", MAX_BATCH) or MAX_BATCH
    return min(MAX_BATCH, limit) - source.in_flight


class WorkStealing:
    name = "work-stealing"

    @hookimpl
    def pacsp2p_next_batch(self, plan, source):
        if source.rate > 0 and plan.avg_size > 0:
            n = int(source.rate * TARGET_SECONDS / plan.avg_size)
        else:
            n = 1                                   # unmeasured: start small
        n = min(max(1, n) - source.in_flight, _room(source))
        if n <= 0:
            return []
        name = source.name
        mine = list(itertools.islice(plan.candidates(name), n))   # an index: O(n)
        if mine:
            return mine
        # endgame: once idle, help with what others are still fetching, oldest first
        if source.in_flight:
            return []
        for ref in plan.in_flight_refs():
            uid = ref.sop_instance_uid
            if name in plan.holders[uid] and name not in plan.in_flight[uid]:
                return [ref]
        return []


class Single:
    name = "single"

    @hookimpl
    def pacsp2p_next_batch(self, plan, source):
        room = _room(source)
        out = []
        for ref in plan.pending:
            if len(out) >= room:
                break
            order = plan.ranked(ref.sop_instance_uid)
            if order and order[0] == source.name:
                out.append(ref)
        return out


BUILTIN = (WorkStealing, Single)
