"""What to look at on the peer while and after it is attacked: its RSS, its log."""

from __future__ import annotations

import re
import resource
import threading
from collections import defaultdict
from pathlib import Path



# -- what to look at on the peer --------------------------------------------------------------

def status_kib(pid: int, key: str = "VmRSS") -> int:
    """*key* (VmRSS, VmHWM, VmSize) of *pid* in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} is gone (no {key})")


rss_kib = status_kib


class Growth:
    """The RSS of *pid* now; ``mb()``: how much it has grown since, in MB."""

    def __init__(self, pid: int):
        self.pid, self.before = pid, status_kib(pid)

    def mb(self) -> float:
        return (status_kib(self.pid) - self.before) * 1024 / 1e6


def cap_address_space(pid: int, headroom: int) -> None:
    """Let *pid* map at most *headroom* bytes more than it does now (RLIMIT_AS): a peer
    that would grow by gigabytes fails its allocation instead of taking the host."""
    limit = status_kib(pid, "VmSize") * 1024 + headroom
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))


class RssPeak:
    """Context manager: samples VmRSS of *pid* every *every* s in a thread; ``peak``
    and ``first`` in KiB."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every = pid, every
        self.first = self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


_ENTRY = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", re.M)


def log_problems(data: bytes, start: int = 0) -> list[tuple[int, str]]:
    """The entries of a Twisted log (*data*, its bytes from offset *start*) that hold a
    traceback or say "Unhandled": [(offset of the entry, its text)]. An entry starts
    with a timestamp; the lines after it that do not are part of it."""
    marks = [m.start() for m in _ENTRY.finditer(data)] + [len(data)]
    if not marks or marks[0] != 0:
        marks.insert(0, 0)
    out = []
    for a, b in zip(marks, marks[1:]):
        entry = data[a:b]
        if b"Traceback" in entry or b"Unhandled" in entry:
            out.append((start + a, entry.decode("utf-8", "replace").rstrip()))
    return out


def problem_signature(block: str) -> str:
    """The last line of a traceback block that names an exception (for grouping)."""
    for line in reversed(block.splitlines()):
        s = line.strip()
        if s and ("Error" in s or "Exception" in s or s.startswith("builtins.")) \
                and not s.startswith("File "):
            return s[:200]
    return block.splitlines()[0][:200]


class LogWatch:
    """Which part of a peer's log each kind of a ``run(by_kind=True)`` wrote: pass it as
    ``between_kinds``; ``problems()`` then names the kind each traceback came with."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = self._size()
        self.windows: dict[str, list] = {}

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def __call__(self, previous: str | None, following: str | None) -> None:
        offset = self._size()
        if previous is not None:
            self.windows[previous][1] = offset
        if following is not None:
            self.windows[following] = [offset, None]

    def kind_at(self, offset: int) -> str:
        for kind, (a, b) in self.windows.items():
            if a <= offset and (b is None or offset < b):
                return kind
        return "before the run" if offset < self.start else "after the run"

    def problems(self) -> list[tuple[str, str]]:
        """[(kind, log entry)] of every traceback / 'Unhandled' since the watch began."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read()
        return [(self.kind_at(off), text) for off, text in log_problems(data, self.start)]

    def summary(self, example_lines: int = 30) -> str:
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for kind, text in self.problems():
            groups[(kind, problem_signature(text))].append(text)
        out = []
        for (kind, sig), texts in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            example = "\n".join(texts[0].splitlines()[:example_lines])
            out.append(f"--- {len(texts)} x [{kind}] {sig}\n{example}")
        return "\n".join(out)
