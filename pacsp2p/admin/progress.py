"""Progress of long CLI work (``catalog rebuild``, ``delete`` of a big study): a progress
bar (tqdm) when standard error is a terminal, plain lines otherwise — one every
``EVERY`` seconds and one at the end — so a log file or a cron mail reads well.

    with Progress("rebuilding the catalog", unit="instances") as p:
        p.update(500)                 # or p.set(done, total)
"""

from __future__ import annotations

import os
import sys
import threading
import time

EVERY = 5.0                   # seconds between two plain progress lines


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "instances",
                 stream=None, tty: bool | None = None, every: float = EVERY):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self.done = 0
        self.t0 = time.monotonic()
        self._last = self.t0
        self._bar = None
        self._lock = threading.Lock()
        self._printed = False
        if self.tty:
            from tqdm import tqdm
            try:                       # a terminal that says it is 0x0 (a bare pty)
                size = os.get_terminal_size(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                size = os.terminal_size((0, 0))
            known = size.columns > 0 and size.lines > 0      # else 80x24, not no bar
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream,
                             dynamic_ncols=known, ncols=None if known else 80,
                             nrows=None if known else 24, leave=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int, total: int | None = None, note: str | None = None) -> None:
        with self._lock:
            if total is not None and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
            if self._bar is not None:
                if done != self.done:
                    self._bar.update(done - self.done)
                if note is not None:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.refresh()
            self.done = done
            now = time.monotonic()
            if self._bar is None and now - self._last >= self.every:
                self._last = now
                self._line(note)

    def _line(self, note: str | None = None, final: bool = False) -> None:
        elapsed = time.monotonic() - self.t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = f", {self.done / elapsed:.0f}/s" if elapsed > 0 and self.done else ""
        tail = f"; {note}" if note else ""
        what = "done: " if final else ""
        print(f"{self.desc}: {what}{self.done}{of} {self.unit}{pct}{rate}, "
              f"{elapsed:.0f} s{tail}", file=self.stream, flush=True)
        self._printed = True

    def message(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def close(self, ok: bool = True, note: str | None = None) -> None:
        with self._lock:
            if self._bar is not None:
                if note is not None:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.close()
                self._bar = None
            elif ok and self._printed:     # a short task prints nothing but its result
                self._line(note, final=True)


class DeleteWatch:
    """``pacsp2p delete``: progress while the peer deletes (the POST runs in the
    caller): the tombstones the peer has written so far (``/status``), out of the
    instances of the study (``/where``, for ``--study``). *fetch(what)* reads the admin
    endpoint (``cli.fetch_status``)."""

    POLL = 0.5

    def __init__(self, fetch, level: str, uid: str, stream=None, tty: bool | None = None):
        self.fetch, self.level, self.uid = fetch, level, uid
        self.stream, self.tty = stream, tty
        self.bar: Progress | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tombstones(self) -> int:
        return int((self.fetch("status").get("deletions") or {}).get("tombstones", 0))

    def __enter__(self) -> "DeleteWatch":
        from urllib.parse import urlencode
        total = None
        try:
            if self.level == "STUDY":
                total = len(self.fetch("where?" + urlencode({"study": self.uid})))
            before = self._tombstones()
        except BaseException:            # the peer does not answer: the POST will say
            return self
        what = {"STUDY": "study", "SERIES": "series"}.get(self.level, "instance")
        uid = self.uid if len(self.uid) <= 24 else f"{self.uid[:10]}...{self.uid[-8:]}"
        self.bar = Progress(f"deleting {what} {uid}", total=total or None,
                            unit="instances", stream=self.stream, tty=self.tty)
        self._thread = threading.Thread(target=self._poll, args=(before,), daemon=True,
                                        name="delete-progress")
        self._thread.start()
        return self

    def _poll(self, before: int) -> None:
        while not self._stop.wait(self.POLL):
            try:
                done = self._tombstones() - before
            except BaseException:
                continue
            total = self.bar.total
            self.bar.set(max(0, min(done, total) if total else done),
                         note="waiting for the other peers" if total and done >= total
                         else None)

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.bar is not None:
            if exc_type is None and self.bar.total:
                self.bar.set(self.bar.total)
            self.bar.close(ok=exc_type is None)
