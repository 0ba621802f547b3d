"""Running many cases with a bounded pool of connections, bounded in time, into a
``Report``."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable
from pacsp2p.testing.fuzz.cases import Generator, Result
from pacsp2p.testing.fuzz.client import send_case



# -- running and reporting -----------------------------------------------------------------------

FAILURE_OUTCOMES = ("refused", "connect-timeout", "connect-error", "client-error")


@dataclass
class Report:
    seed: int
    planned: int
    results: list[Result] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by_time: bool = False

    @property
    def sent(self) -> int:
        return len(self.results)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def failures(self) -> list[Result]:
        """The peer refused a connection, a must-fail C-STORE got Success, a client bug."""
        return [r for r in self.results
                if r.violation or r.outcome.startswith(FAILURE_OUTCOMES)]

    def by_kind(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.results:
            out[r.kind][r.outcome.split(":")[0]] += 1
        return dict(out)

    def statuses(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.results:
            for s in r.statuses:
                out[r.kind][f"{s:#06x}" if s >= 0 else "none"] += 1
        return dict(out)

    def summary(self, max_failures: int = 20) -> str:
        lines = [f"fuzz seed {self.seed}: {self.sent} of {self.planned} inputs in "
                 f"{self.elapsed:.1f} s ({self.rate:.0f}/s)"
                 + (" (stopped by the time limit)" if self.stopped_by_time else "")]
        statuses = self.statuses()
        for kind, counts in sorted(self.by_kind().items()):
            outs = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            st = ", ".join(f"{k} {v}" for k, v in statuses.get(kind, Counter()).most_common(6))
            lines.append(f"  {kind:22} {outs}" + (f"  [statuses: {st}]" if st else ""))
        fails = self.failures()
        lines.append(f"failures: {len(fails)}")
        for r in fails[:max_failures]:
            lines.append(f"  case {r.index} ({r.kind}, {r.note[:90]}): {r.outcome} "
                         f"{r.violation} statuses {[hex(s) for s in r.statuses]}")
        return "\n".join(lines)


def run(host: str, port: int, gen: Generator, count: int, *, concurrency: int = 8,
        time_limit: float = 60.0, by_kind: bool = False,
        between_kinds: Callable[[str | None, str | None], None] | None = None,
        progress: Callable[[int], None] | None = None) -> Report:
    """Send up to *count* cases of *gen* to host:port, *concurrency* connections at a
    time, starting no new case after *time_limit* s. *by_kind*: all cases of one kind
    (in index order), then the next kind, waiting for each kind to end and calling
    ``between_kinds(previous kind, next kind)`` in between (to attribute log lines)."""
    report = Report(gen.seed, count)
    t0 = time.monotonic()
    indices = list(range(count))
    if by_kind:
        k = len(gen.kinds)
        indices.sort(key=lambda i: (i % k, i))
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fuzz") as pool:
        pending: set = set()
        current = None

        def drain(limit: int) -> None:
            while len(pending) > limit:
                done, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    report.results.append(fut.result())
                    if progress:
                        progress(len(report.results))

        for i in indices:
            if time.monotonic() - t0 > time_limit:
                report.stopped_by_time = True
                break
            kind = gen.kinds[i % len(gen.kinds)]
            if by_kind and kind != current:
                drain(0)
                if between_kinds:
                    between_kinds(current, kind)
                current = kind
            case = gen.case(i)
            pending.add(pool.submit(send_case, host, port, case))
            drain(2 * concurrency - 1)
        drain(0)
        if by_kind and between_kinds:
            between_kinds(current, None)
    report.elapsed = time.monotonic() - t0
    report.results.sort(key=lambda r: r.index)
    return report
