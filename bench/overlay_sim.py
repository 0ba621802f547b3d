#!/usr/bin/env python3
"""The overlay at 50 and 500 peers, simulated: membership (SWIM + Lifeguard) and catalog
dissemination, the product's own code on a deterministic clock (issue 18).

Every peer runs ``pacsp2p.overlay.swim.Swim`` and ``pacsp2p.overlay.dissemination``
exactly as a real peer does; only the network and the catalog are stand-ins
(``pacsp2p.testing.simnet``): messages are delayed (1-5 ms), lost at random (``--loss``,
and the 1 % / 10 % rows), cut by partitions; each peer keeps at most 32 links (opening
one costs two round trips); a catalog pull costs one round trip per 5,000 facts.
Default parameters of ``[overlay]`` (probe period 0.5 s).

Per cluster size it reports:

- converged: seconds from the last of N peers starting (each seeded with up to 3
  peers started before it, one every 20 ms) until every peer sees every other alive;
- messages per peer per second (SWIM + catalog pulls, each direction counted by its
  sender), bytes, links opened: idle, and with a trickle of writes (one new fact per
  second somewhere);
- a new fact: seconds until every peer holds it (5 trials: mean, max);
- a join: seconds until every peer sees a new peer alive (3 trials);
- a death: seconds until every peer sees a killed peer dead (first suspicion, all);
- false suspicions and false deaths of live peers over 60 s of 1 % and 10 % message loss;
- a partition into two halves for 20 s (facts written on both sides), healed: seconds
  until every peer sees every other alive and every catalog holds every fact;
- a late joiner: a new empty peer catches up with 1,000,000 facts of 20 origins (pull
  batches, seconds).

    .venv/bin/python bench/overlay_sim.py                 # 50 and 500 peers (~4 min)
    .venv/bin/python bench/overlay_sim.py --sizes 50,100,200,500 --seed 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacsp2p.testing.simnet import SimNet  # noqa: E402

SUSPECT, DEAD = "suspect", "dead"


def build(net: SimNet, n: int, rng) -> float:
    names = [f"p{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        seeds = rng.sample(names[:i], min(3, i)) if i else []
        net.add(name, seeds=seeds)
        net.run(0.02)
    return net.run_until(net.converged, 300, step=0.05)


class Watch:
    """State changes seen, to count suspicions and deaths of live peers."""

    def __init__(self, net):
        self.net = net
        self.events = []
        net.watchers.append(self.seen)

    def seen(self, t, observer, node, old, new):
        if new in (SUSPECT, DEAD):
            self.events.append((t, observer, node.name, new, self.net.peers.get(node.name)
                                is not None and self.net.peers[node.name].up))

    def false(self, since: float) -> tuple[int, int]:
        """(suspicions, deaths) of peers that were up, since *since*."""
        s = sum(1 for t, _o, _n, st, up in self.events if t >= since and up and st == SUSPECT)
        d = sum(1 for t, _o, _n, st, up in self.events if t >= since and up and st == DEAD)
        return s, d


def window(net: SimNet, seconds: float, writes_per_s: float = 0.0, rng=None) -> dict:
    """Run *seconds*; messages, bytes, links opened and pulls per live peer per second."""
    live = [p.name for p in net.live()]
    before = {k: dict(getattr(net, k)) for k in ("sent", "bytes", "opened", "pulls")}
    steps = int(seconds)
    for _ in range(steps):
        if writes_per_s:
            rng.choice(net.live()).catalog.write(1)
        net.run(seconds / steps)
    out = {}
    for k in before:
        total = sum(getattr(net, k)[n] - before[k].get(n, 0) for n in live)
        out[k] = total / len(live) / seconds
    return out


def fact_time(net: SimNet, rng) -> float:
    w = rng.choice(net.live())
    seq = w.catalog.write(1)
    return net.run_until(lambda: all(p.catalog.vector.get(w.name, 0) >= seq
                                     for p in net.live()), 60, step=0.01)


def join_time(net: SimNet, rng, name: str) -> float:
    seed = rng.choice(net.live()).name
    net.add(name, seeds=[seed])
    return net.run_until(lambda: net.all_see(name, "alive"), 60, step=0.01)


def death_time(net: SimNet, rng, watch: Watch) -> tuple[float, float]:
    victim = rng.choice(net.live()).name
    t0 = net.clock.seconds()
    net.kill(victim)
    all_dead = net.run_until(lambda: net.all_see(victim, DEAD), 120, step=0.01)
    first = min((t for t, _o, n, st, _up in watch.events if n == victim and t >= t0),
                default=t0) - t0
    return first, all_dead


def holds_all(net: SimNet) -> bool:
    live = net.live()
    top = {}
    for p in live:
        for o, s in p.catalog.vector.items():
            top[o] = max(top.get(o, 0), s)
    return all(p.catalog.vector.get(o, 0) >= s for p in live for o, s in top.items()
               if o != p.name)


def run(n: int, seed: int, quick: bool) -> dict:
    import random
    rng = random.Random(seed)
    net = SimNet(seed=seed)
    watch = Watch(net)
    r: dict = {"n": n}
    cpu = time.process_time()
    r["converged"] = build(net, n, rng)
    net.run(10)
    r["idle"] = window(net, 20 if quick else 60)
    r["load"] = window(net, 20 if quick else 60, writes_per_s=1.0, rng=rng)
    r["fact"] = [fact_time(net, rng) for _ in range(3 if quick else 5)]
    r["join"] = [join_time(net, rng, f"new{i}") for i in range(2 if quick else 3)]
    net.run(5)
    deaths = [death_time(net, rng, watch) for _ in range(2 if quick else 3)]
    r["suspected_first"] = [d[0] for d in deaths]
    r["dead_all"] = [d[1] for d in deaths]
    for loss in (0.01, 0.10):
        net.loss = loss
        t0 = net.clock.seconds()
        w = window(net, 30 if quick else 60, writes_per_s=1.0, rng=rng)
        r[f"loss{int(loss * 100)}"] = (*watch.false(t0), w["sent"])
        net.loss = 0.0
        net.run(10)
    # partition into two halves; both write; heal
    names = [p.name for p in net.live()]
    rng.shuffle(names)
    half = set(names[:len(names) // 2])
    net.partition([half, set(names) - half])
    for _ in range(20):
        for side in (half, set(names) - half):
            net.peers[rng.choice(sorted(side))].catalog.write(1)
        net.run(1)
    net.heal()
    r["partition_members"] = net.run_until(net.converged, 300, step=0.05)
    r["partition_catalog"] = net.run_until(lambda: holds_all(net), 300, step=0.05)
    # a late joiner: 1,000,000 facts of 20 origins to catch up with
    writers = rng.sample(net.live(), 20)
    for p in writers:
        p.catalog.write(50000)
    net.run_until(lambda: holds_all(net), 300, step=0.1)
    pulls_before = net.batches.get("late", 0)
    seed_peer = rng.choice(net.live()).name
    net.add("late", seeds=[seed_peer])
    late = net.peers["late"]
    target = {o: s for p in net.live() for o, s in p.catalog.vector.items()}
    r["late"] = net.run_until(lambda: all(late.catalog.vector.get(o, 0) >= s
                                          for o, s in target.items() if o != "late"),
                              300, step=0.05)
    r["late_pulls"] = net.batches.get("late", 0) - pulls_before
    r["largest"] = net.largest
    r["cpu"] = time.process_time() - cpu
    r["sim_s"] = net.clock.seconds()
    return r


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def mean_max(xs):
    xs = [x for x in xs]
    if any(x is None for x in xs):
        return "not reached"
    return f"{statistics.mean(xs):.2f} / {max(xs):.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50,500")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import platform
    print(f"== overlay simulation (SWIM + Lifeguard, epidemic catalog dissemination); "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}", flush=True)
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = run(n, args.seed, args.quick)
        results.append(r)
        print(f"\n-- {n} peers (simulated {r['sim_s']:.0f} s in {r['cpu']:.0f} CPU-s)")
        print(f"converged after the last start: {fmt(r['converged'])} s")
        for what in ("idle", "load"):
            w = r[what]
            print(f"{what:>5}: {w['sent']:.2f} messages/peer/s, {w['bytes'] / 1000:.2f} kB/peer/s, "
                  f"{w['opened']:.2f} links opened/peer/s, {w['pulls']:.2f} pulls/peer/s")
        print(f"new fact everywhere (mean / max s): {mean_max(r['fact'])}")
        print(f"join known everywhere: {mean_max(r['join'])}")
        print(f"death: first suspicion {mean_max(r['suspected_first'])}, "
              f"known everywhere {mean_max(r['dead_all'])}")
        for loss in (1, 10):
            s, d, m = r[f"loss{loss}"]
            print(f"{loss}% loss, 60 s: {s} suspicions and {d} deaths of live peers "
                  f"(observations), {m:.2f} messages/peer/s")
        print(f"partition healed: members {fmt(r['partition_members'])} s, "
              f"catalogs {fmt(r['partition_catalog'])} s")
        print(f"late joiner, 1,000,000 facts of 20 origins: {fmt(r['late'])} s, "
              f"{r['late_pulls']} requests of <= 5,000 facts; largest message {r['largest']} bytes")
    print("\n| peers | converged s | msgs/peer/s idle | with writes | links opened/peer/s "
          "| fact everywhere s (mean/max) | join s | death s (all know) "
          "| 1 % loss: false suspicions / deaths | 10 % loss | partition healed s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']} | {fmt(r['converged'])} | {r['idle']['sent']:.2f} | "
              f"{r['load']['sent']:.2f} | {r['idle']['opened']:.2f} | {mean_max(r['fact'])} | "
              f"{mean_max(r['join'])} | {mean_max(r['dead_all'])} | "
              f"{r['loss1'][0]} / {r['loss1'][1]} | {r['loss10'][0]} / {r['loss10'][1]} | "
              f"{fmt(r['partition_members'])} / {fmt(r['partition_catalog'])} |")


if __name__ == "__main__":
    main()
