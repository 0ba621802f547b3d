"""Checks for what arrives from the network, before anything uses it.

- UIDs by PS3.5 §9.1: components of digits separated by single dots, no component with a
  leading zero (except "0" itself), at most 64 characters, nothing else (no padding, no
  spaces, no slashes). A UID that passes can never name a path outside a directory.
- AE titles by PS3.5 §6.2 (VR AE): 1-16 characters of the default repertoire, no
  backslash or control character, not only spaces.
- The catalog's attribute values (``long_value``): at most ``VALUE_MAX`` characters each
  (16 times the longest a VR the catalog keeps allows, LO/PN: 64 per value), whether a
  C-STORE brings them or an archive lists them; a longer one would be kept in every
  peer's catalog and sent in every sync answer and C-FIND match. A value of several
  (VM 1-n: Other Patient IDs, Image Type) may be valid and longer: ``clipped`` keeps its
  whole values that fit, for the catalog (the instance is kept as it came).

Every front end (facade, bulk channel, AMP commands, REST paths) calls these; nothing
below them trusts a UID it did not check.
"""

from __future__ import annotations

import re

UID_MAX = 64
AE_MAX = 16
VALUE_MAX = 1024          # characters of one catalog attribute value

_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z", re.ASCII)
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}\Z", re.ASCII)


class InvalidUID(ValueError):
    """A UID that breaks PS3.5 §9.1; its message says how (the value shown escaped)."""


def is_uid(value) -> bool:
    """True if *value* is a str holding a valid UID (PS3.5 §9.1)."""
    return (isinstance(value, str) and 0 < len(value) <= UID_MAX
            and _UID_RE.match(value) is not None)


def check_uid(value, what: str = "UID") -> str:
    """*value* if it is a valid UID, else raise :class:`InvalidUID` naming *what*."""
    if is_uid(value):
        return value
    if not isinstance(value, str):
        raise InvalidUID(f"{what}: not text")
    shown = ascii(value[:80]) + ("..." if len(value) > 80 else "")
    if not value:
        raise InvalidUID(f"{what}: empty")
    if len(value) > UID_MAX:
        raise InvalidUID(f"{what}: {len(value)} characters (at most {UID_MAX}): {shown}")
    raise InvalidUID(f"{what}: not digits and dots without leading zeros: {shown}")


def is_ae_title(value) -> bool:
    """True if *value* is a str holding a valid AE title (PS3.5 §6.2, VR AE)."""
    return (isinstance(value, str) and _AE_RE.match(value) is not None
            and bool(value.strip()))


def clipped(value: str) -> str:
    """*value*; if it is longer than ``VALUE_MAX`` characters and of several values
    (backslash-separated), the first of them that fit together in ``VALUE_MAX``."""
    if len(value) <= VALUE_MAX or "\\" not in value[:VALUE_MAX + 1]:
        return value
    return value[:value.rindex("\\", 0, VALUE_MAX + 1)]


def long_value(attributes) -> str:
    """Why the catalog attributes *attributes* ({keyword: text}) cannot be kept: the first
    value that is not text of at most ``VALUE_MAX`` characters; "" if none. A value of
    several over the bound is ``clipped`` first, in *attributes*."""
    for key, value in attributes.items():
        if isinstance(value, str) and len(value) > VALUE_MAX:
            attributes[key] = value = clipped(value)
        if not isinstance(value, str) or len(value) > VALUE_MAX:
            size = f"{len(value)} characters" if isinstance(value, str) else "not text"
            return f"{shown(key)}: {size} (at most {VALUE_MAX})"
    return ""


def shown(value, limit: int = 80) -> str:
    """*value* as it may appear in a log line: escaped, bounded."""
    text = value if isinstance(value, str) else repr(value)
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")
