"""A userspace stand-in for ``tc qdisc ... netem`` (this kernel has no sch_netem): loss,
delay with jitter, and partitions, applied to the IPv4 packets a TUN device hands us.

Run inside the router namespace of ``netfaults.Net``: the packets a peer sends are routed
to the TUN device (``ip rule iif <veth> lookup <table>``) only while a fault is on; this
process reads each one, drops it or holds it, and writes it back to the device, where the
kernel routes it on to its destination. What to do is read from a JSON control file
(re-read when it changes): ``{"rules": [{"src": [addr...], "dst": [addr...], "loss":
0.05, "delay": 0.2, "jitter": 0.02}]}``, the first rule whose src and dst lists hold the
packet's addresses applies (an absent list matches any address); no rule: passed at once.
A flow's packets keep their order under jitter (as netem with rate does). Bounded: at
most ``MAX_HELD`` packets held at once (more are dropped, as a full queue would).

    python -m pacsp2p.testing.netem --tun NAME --control FILE [--duration S]
"""
from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import socket
import struct
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_HELD = 20000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Rules:
    def __init__(self, path: str):
        self.path, self.mtime, self.rules = path, None, []

    def reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.mtime:
            return
        self.mtime = mtime
        try:
            rules = json.load(open(self.path)).get("rules", [])
        except ValueError:
            return                              # written half: the next look takes it
        self.rules = [({socket.inet_aton(a) for a in r["src"]} if "src" in r else None,
                       {socket.inet_aton(a) for a in r["dst"]} if "dst" in r else None,
                       float(r.get("loss", 0)), float(r.get("delay", 0)),
                       float(r.get("jitter", 0))) for r in rules]

    def match(self, src: bytes, dst: bytes):
        for s, d, loss, delay, jitter in self.rules:
            if (s is None or src in s) and (d is None or dst in d):
                return loss, delay, jitter
        return None


def run(tun: str, control: str, duration: float) -> None:
    fd = open_tun(tun)
    rules = Rules(control)
    held: list = []                 # (due, n, packet)
    last_due: dict = {}             # (src, dst) -> due of its last packet held
    n = 0
    end = time.monotonic() + duration
    next_reload = 0.0
    counts = {"passed": 0, "dropped": 0, "held": 0}
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_reload:
            rules.reload()
            next_reload = now + 0.05
        wait = 0.05 if not held else max(0.0, min(0.05, held[0][0] - now))
        ready, _, _ = select.select([fd], [], [], wait)
        now = time.monotonic()
        if ready:
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue
                src, dst = packet[12:16], packet[16:20]
                rule = rules.match(src, dst)
                if rule is None:
                    os.write(fd, packet)
                    counts["passed"] += 1
                    continue
                loss, delay, jitter = rule
                if (loss and random.random() < loss) or len(held) >= MAX_HELD:
                    counts["dropped"] += 1
                    continue
                if not delay and not jitter:
                    os.write(fd, packet)
                    counts["passed"] += 1
                    continue
                due = now + max(0.0, delay + random.uniform(-jitter, jitter))
                due = max(due, last_due.get((src, dst), 0.0))    # keep a flow's order
                last_due[(src, dst)] = due
                n += 1
                heapq.heappush(held, (due, n, packet))
                counts["held"] += 1
        while held and held[0][0] <= now:
            try:
                os.write(fd, heapq.heappop(held)[2])
            except OSError:
                pass
        if len(last_due) > 4096:
            last_due = {k: v for k, v in last_due.items() if v > now}
    print(json.dumps(counts), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tun", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--duration", type=float, default=3600.0)
    a = p.parse_args(argv)
    run(a.tun, a.control, a.duration)


if __name__ == "__main__":
    main()
