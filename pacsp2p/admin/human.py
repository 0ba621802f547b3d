"""Times, durations and sizes as a person reads them (``pacsp2p status``, ``peers``):
"08:21:05 (3 min ago)", "in 9 min 58 s", "2.4 GiB" — never epoch floats."""

from __future__ import annotations

import datetime
import time


def duration(seconds: float | None) -> str:
    """'850 ms', '42 s', '3 min 20 s', '2 h 5 min', '3 d 4 h'."""
    if seconds is None:
        return "?"
    s = abs(float(seconds))
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec} s" if sec and m < 10 else f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def when(ts: float | None, now: float | None = None) -> str:
    """A Unix time as local time, with how long ago: '08:21:05 (3 min ago)'; the date too
    when it is not today."""
    if not ts:
        return "never"
    now = time.time() if now is None else now
    t = datetime.datetime.fromtimestamp(float(ts))
    today = datetime.datetime.fromtimestamp(now).date()
    shown = t.strftime("%H:%M:%S") if t.date() == today else t.strftime("%Y-%m-%d %H:%M")
    delta = now - float(ts)
    rel = f"{duration(delta)} ago" if delta >= 0 else f"in {duration(-delta)}"
    return f"{shown} ({rel})"


def ago(ts: float | None, now: float | None = None) -> str:
    """'3 min ago' (or 'never')."""
    if not ts:
        return "never"
    now = time.time() if now is None else now
    delta = now - float(ts)
    return f"{duration(delta)} ago" if delta >= 0 else f"in {duration(-delta)}"


def size(n: float | None) -> str:
    """'512 B', '3.4 MiB', '1.2 TiB'."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
