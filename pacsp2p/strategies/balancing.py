"""Built-in load balancing for retrievals.

- ``work-stealing`` (default): every source pulls small batches as it frees up, sized to
  what it delivers in about half a second at its measured rate — so a fast source takes
  more and a slow one never holds much. Rarest instances first (those with the fewest
  live holders), as in BitTorrent (Cohen, "Incentives build robustness in BitTorrent",
  2003). Endgame: when nothing is left unclaimed, a free source re-requests an instance
  another source is still fetching; the first copy wins.
- ``single``: one source for the whole retrieval (the one holding most of it), like a
  plain archive: the baseline for benchmarks. Instances it lacks come from their holders.
"""

from __future__ import annotations

from pacsp2p.strategies.hookspecs import hookimpl

TARGET_SECONDS = 0.5
MAX_BATCH = 16


class WorkStealing:
    name = "work-stealing"

    @hookimpl
    def pacsp2p_next_batch(self, plan, source):
        if source.rate > 0 and plan.avg_size > 0:
            n = int(source.rate * TARGET_SECONDS / plan.avg_size)
        else:
            n = 1                                   # unmeasured: start small
        n = max(1, min(MAX_BATCH, n)) - source.in_flight
        if n <= 0:
            return []
        mine = [r for r in plan.pending if source.name in plan.holders[r.sop_instance_uid]]
        if mine:
            rarity = {r.sop_instance_uid: len(plan.holders[r.sop_instance_uid]) for r in mine}
            least = min(rarity.values())
            rare = [r for r in mine if rarity[r.sop_instance_uid] == least]
            return rare[:n] if len(rare) >= n else (rare + [r for r in mine if
                                                             rarity[r.sop_instance_uid] > least])[:n]
        # endgame: help with what others are still fetching, oldest first
        for ref in plan.in_flight_refs():
            uid = ref.sop_instance_uid
            if source.name in plan.holders[uid] and source.name not in plan.in_flight[uid]:
                return [ref]
        return []


class Single:
    name = "single"

    @hookimpl
    def pacsp2p_next_batch(self, plan, source):
        chosen = plan.memo.get("single")
        if chosen is None or not plan.sources[chosen].alive:     # first call, or it died
            counts = {name: len(s.holds) for name, s in plan.sources.items() if s.alive}
            if not counts:
                return []
            chosen = plan.memo["single"] = max(sorted(counts), key=counts.get)
        out = []
        for ref in plan.pending:
            holders = plan.holders[ref.sop_instance_uid]
            owner = chosen if chosen in holders else min(holders)
            if owner == source.name:
                out.append(ref)
            if len(out) >= MAX_BATCH - source.in_flight:
                break
        return out


BUILTIN = (WorkStealing, Single)
