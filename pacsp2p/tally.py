"""One log line for a batch of per-instance events (hinted hand-off, relayed C-MOVE
conversions, failed sub-operations), not one line per instance: a thousand instances
handed off make one line saying how many went where, with one example of each failure.
"""

from __future__ import annotations

from collections import Counter

from pacsp2p.validate import shown


class Tally:
    """Counts of events by kind (a short phrase: "copied to local@peerb"), with the
    first instance and error of each kind as an example."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, tuple[str, str]] = {}

    def add(self, kind: str, uid: str = "", error: str = "") -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, (uid, error))

    def __bool__(self) -> bool:
        return bool(self.counts)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self, examples: bool = True) -> str:
        """'12 copied to local@peerb, 2 failed to local@peerc (e.g. 1.2.3: refused)'."""
        parts = []
        for kind, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            uid, error = self.examples[kind]
            eg = ""
            if examples and error:
                eg = f" (e.g. {uid[:80]}: {shown(error, 200)})" if uid else \
                    f" ({shown(error, 200)})"
            parts.append(f"{n} {kind}{eg}")
        return ", ".join(parts)
