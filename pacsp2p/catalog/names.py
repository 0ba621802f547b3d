"""Person names match without regard to case, as Orthanc does by default.

Orthanc (``CaseSensitivePN: false``) compares person names after
``Toolbox::ToUpperCaseWithAccents``: every character made upper case one by one with the
C library's ``towupper`` in the en_US.UTF-8 locale, i.e. the Unicode *simple* upper-case
mapping — accents kept ("müller" -> "MÜLLER", "strøm" -> "STRØM"), one character never
becoming two ("ß" stays "ß", "ﬁ" stays "ﬁ"), no other normalization (NFD "u" + U+0308 is
not "ü"), scripts without case (kanji, kana, hangul) unchanged. :func:`pn_key` is that
mapping (it equals glibc 2.36's ``towupper`` on every code point; tests/unit/
test_charset_matching.py checks it against the C library).

The catalog keeps decoded text (``dicom.header`` decodes each data set's Specific
Character Set on ingest; pydicom decodes each query's), so data and queries in any
character set meet as text, and ``*`` and ``?`` work on characters. ``matching``
compares ``pn_key(PatientName)``; ``schema`` keeps an index on that expression, so
SQLite computes and stores each name's key when a patient row is written.

``pn_key`` is an application-defined SQL function: every connection that writes the
patients table, or queries through that index, must have it (:func:`register`; every
connection made by ``db._connect`` and every ``schema.create_schema`` does). Another
program (the sqlite3 shell) may read the catalog but not write patients rows.
"""

from __future__ import annotations

import sqlite3
import unicodedata

SQL_FUNCTION = "pn_key"
UNICODE_VERSION = unicodedata.unidata_version      # the case tables pn_key uses


def _upper(char: str) -> str:
    """The simple upper-case mapping of one character (itself if it has none)."""
    upper = char.upper()
    if len(upper) == 1:
        return upper
    title = char.title()           # "ᾳ": upper "ΑΙ", title (= simple upper) "ᾼ"
    return title if len(title) == 1 else char          # "ß", "ﬁ", "ŉ": unchanged


def pn_key(text):
    """The form in which person names are compared: *text* upper case, character by
    character (see the module docstring). Anything but a str is returned as it is."""
    if not isinstance(text, str):
        return text
    upper = text.upper()
    if len(upper) == len(text):    # no character became two: the simple mapping
        return upper
    return "".join(map(_upper, text))


def register(conn: sqlite3.Connection) -> None:
    """Make ``pn_key(text)`` known to *conn* (deterministic: usable in an index)."""
    conn.create_function(SQL_FUNCTION, 1, pn_key, deterministic=True)
