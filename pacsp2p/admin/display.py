"""Human-readable values for the web console's pages: times, durations, sizes,
numbers, DICOM dates, times and person names, and a status value in words."""

from __future__ import annotations

import math
import time


def when(ts) -> str:
    """An epoch time as local "YYYY-MM-DD HH:MM:SS" ("—" for none)."""
    if not isinstance(ts, (int, float)) or ts <= 0 or not math.isfinite(ts):
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def duration(seconds) -> str:
    """Seconds as "45 s", "3 min 20 s", "2 h 5 min", "3 days 4 h"."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    days = s // 86400
    return f"{days} day{'s' if days != 1 else ''} {s % 86400 // 3600} h"


def ago(ts, now: float | None = None) -> str:
    """An epoch time as "12 s ago" ("just now", "—" for none; "in 5 s" for the future)."""
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "—"
    delta = (time.time() if now is None else now) - ts
    if abs(delta) < 1.0:
        return "just now"
    return f"in {duration(-delta)}" if delta < 0 else f"{duration(delta)} ago"


def size(n) -> str:
    """Bytes as "512 B", "1.5 KiB", "3.2 GiB" ("—" for none)."""
    if not isinstance(n, (int, float)) or n < 0:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "—"


def number(n) -> str:
    """An integer with thousands separated ("12 345"); "—" for none."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        try:
            n = int(str(n))
        except (TypeError, ValueError):
            return "—"
    return f"{int(n):,}".replace(",", "\u202f")


def dicom_date(value) -> str:
    """DA "20240131" -> "2024-01-31" (anything else as it is)."""
    v = str(value or "").strip()
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) == 8 and v.isdigit() else v


def dicom_time(value) -> str:
    """TM "142311.12" -> "14:23:11" (anything else as it is)."""
    v = str(value or "").strip().split(".")[0]
    if v.isdigit() and len(v) in (2, 4, 6):
        return ":".join(v[i:i + 2] for i in range(0, len(v), 2))
    return v


def person(value) -> str:
    """PN "DOE^JOHN^^DR" -> "DOE, JOHN" (the alphabetic group; family, given middle)."""
    v = str(value or "").split("=")[0]
    parts = [p.strip() for p in v.split("^")]
    family = parts[0] if parts else ""
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {rest}" if family and rest else (family or rest)


def describe(values) -> str:
    """A status dict of work this console has no page section for (a scrub, a drain) as
    words: times ("next_at", "last") as "in 6 days" / "3 min ago", seconds ("_s") as
    durations, MB/s, bytes as sizes; empty values and nested ones left out."""
    if not isinstance(values, dict):
        return ""
    parts = []
    for key, value in values.items():
        if key == "state" or value in (None, "") or isinstance(value, (dict, list, tuple)):
            continue
        label = key.replace("_", " ")
        number_ = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.endswith("_MB_s") and number_:
            label, text = label[:-5], f"{value} MB/s"
        elif (key.endswith("_at") or key in ("last", "started", "finished", "since")) \
                and number_ and value > 1e9:
            label, text = label.removesuffix(" at"), ago(value)
        elif key.endswith("_s") and number_:
            label, text = label[:-2], duration(value)
        elif (key == "bytes" or key.endswith("_bytes")) and number_:
            text = size(value)
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = str(value)
        parts.append(f"{label} {text}")
    return ", ".join(parts)
