"""C-FIND identifier -> SQL, following the matching rules of PS3.4 C.2.2.2.

Single value, universal (empty), wildcard (``*``/``?``), range (DA/TM/DT ``a-b``, ``-b``,
``a-``) and list-of-UID matching. Values are decoded text whatever the character sets of
the data and of the query, so ``*`` and ``?`` work on characters. A wildcard pattern
has its runs of ``*`` made one, and one needing more characters than the catalog keeps
(``validate.VALUE_MAX``) matches nothing: SQLite refuses a GLOB pattern past 50,000
bytes (0xC001 for a C-FIND of 30,000 ``*?``). Like Orthanc, person
names match without regard to case: ``pn_key(col)`` against the pattern's
``names.pn_key`` (upper case with accents, one character at a time). Other VRs match
case-sensitively. Keys below the query level are ignored. The unique keys of the levels
above are not required: a query without them (relational, an extended behaviour of
PS3.4 C.4.1) is answered as Orthanc answers it, though no extended negotiation announces
it (dcmqrscp refuses it).
Computed attributes (counts, ModalitiesInStudy) are correlated sub-queries, so they are
computed over everything the catalog holds — the union of all archives.
"""

from __future__ import annotations

import re
from itertools import islice

from pacsp2p.attributes import ALIAS, COMPUTED, LEVELS, PARENT, STORED, TABLES
from pacsp2p.catalog.names import SQL_FUNCTION, pn_key
from pacsp2p.types import Query, TooMany, is_pattern
from pacsp2p.validate import VALUE_MAX

_STARS = re.compile(r"\*{2,}")
_COUNT_SQL = {
    "NumberOfPatientRelatedStudies":
        "(SELECT count(*) FROM studies x WHERE x.PatientID = p.PatientID)",
    "NumberOfPatientRelatedSeries":
        "(SELECT count(*) FROM series x JOIN studies y USING (StudyInstanceUID)"
        " WHERE y.PatientID = p.PatientID)",
    "NumberOfPatientRelatedInstances":
        "(SELECT count(*) FROM instances x JOIN series y USING (SeriesInstanceUID)"
        " JOIN studies z USING (StudyInstanceUID) WHERE z.PatientID = p.PatientID)",
    "NumberOfStudyRelatedSeries":
        "(SELECT count(*) FROM series x WHERE x.StudyInstanceUID = st.StudyInstanceUID)",
    "NumberOfStudyRelatedInstances":
        "(SELECT count(*) FROM instances x JOIN series y USING (SeriesInstanceUID)"
        " WHERE y.StudyInstanceUID = st.StudyInstanceUID)",
    "ModalitiesInStudy":
        "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT Modality AS m FROM series x"
        " WHERE x.StudyInstanceUID = st.StudyInstanceUID AND Modality != '' ORDER BY m))",
    "SOPClassesInStudy":
        "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT SOPClassUID AS c FROM"
        " instances x JOIN series y USING (SeriesInstanceUID)"
        " WHERE y.StudyInstanceUID = st.StudyInstanceUID ORDER BY c))",
    "NumberOfSeriesRelatedInstances":
        "(SELECT count(*) FROM instances x WHERE x.SeriesInstanceUID = se.SeriesInstanceUID)",
}


class QueryError(ValueError):
    """The identifier cannot be answered (e.g. unknown level)."""


def levels_up_to(level: str) -> list[str]:
    if level not in LEVELS:
        raise QueryError(f"unknown QueryRetrieveLevel {level!r}")
    return list(LEVELS[: LEVELS.index(level) + 1])


def from_clause(level: str) -> str:
    parts = [f"{TABLES[level]} {ALIAS[level]}"]
    current = level
    while current in PARENT:
        parent, key = PARENT[current]
        parts.append(f"JOIN {TABLES[parent]} {ALIAS[parent]} "
                     f"ON {ALIAS[parent]}.{key} = {ALIAS[current]}.{key}")
        current = parent
    return " ".join(parts)


def _glob_escape(text: str) -> str:
    return text.replace("[", "[[]")


def successor(prefix: str) -> str | None:
    """The least string above every string that starts with *prefix*, in SQLite's BINARY
    order (UTF-8 bytes, the order of code points): *prefix* with its last character
    incremented (None if there is none: no upper bound). ``s`` starts with ``p`` iff
    ``p <= s < successor(p)``."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:            # surrogates are no text: skip them
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _prefix_range(col: str, prefix: str, params: list) -> str:
    """``col >= prefix AND col < successor(prefix)``: what an index can search."""
    params.append(prefix)
    above = successor(prefix)
    if above is None:
        return f"{col} >= ?"
    params.append(above)
    return f"{col} >= ? AND {col} < ?"


def _one_value(col: str, vr: str, value: str, params: list) -> str:
    """SQL condition for one (non-list) value of one attribute. Every condition is one an
    index on the column (for person names: on ``pn_key(col)``) can serve."""
    if vr in ("DA", "TM", "DT") and "-" in value:
        lo, _, hi = value.partition("-")
        conds = []
        if lo:
            conds.append(f"({col} != '' AND {col} >= ?)")
            params.append(lo)
        if hi:
            # values up to *hi* at its precision, e.g. TM -1015 takes 101559.9: the same
            # as substr(col, 1, len(hi)) <= hi, but a plain comparison an index can use
            conds.append(f"({col} != '' AND {_upper_bound(col, hi, params)})")
        return "(" + " AND ".join(conds or ["1"]) + ")"
    if vr == "PN":                   # without regard to case, as Orthanc (names.py)
        col, value = f"{SQL_FUNCTION}({col})", pn_key(value)
    if "*" in value or "?" in value:
        value = _STARS.sub("*", value)      # "**" is "*": the same pattern, shorter
        if len(value) - value.count("*") > VALUE_MAX:
            return "0"                      # longer than any value the catalog keeps
        prefix = value[:min(i for i in (value.find("*"), value.find("?")) if i >= 0)]
        cond = f"{col} GLOB ?"
        params_glob = [_glob_escape(value)]
        if prefix:                   # DOE* -> >= 'DOE' AND < 'DOF' (an index range)
            cond = f"{_prefix_range(col, prefix, params)} AND {cond}"
        params.extend(params_glob)
        return f"({cond})"
    params.append(value)
    return f"{col} = ?"


def _upper_bound(col: str, hi: str, params: list) -> str:
    above = successor(hi)
    if above is None:
        params.append(hi)
        return f"substr({col}, 1, {len(hi)}) <= ?"
    params.append(above)
    return f"{col} < ?"


def condition(col: str, vr: str, raw: str, params: list) -> str | None:
    value = raw.strip() if vr != "PN" else raw.strip().rstrip("^ =")
    if value in ("", "*"):
        return None                                     # universal matching
    values = [v.strip() for v in value.split("\\")]
    if vr == "UI" and len(values) > 1:
        params.extend(values)
        return f"{col} IN ({', '.join('?' * len(values))})"
    plain = [v for v in values if v and not is_pattern(vr, v)]
    conds = []
    if len(plain) > 1:                  # one IN: linear, where an OR of thousands of
        key = f"{SQL_FUNCTION}({col})" if vr == "PN" else col     # terms took minutes
        params.extend(map(pn_key, plain) if vr == "PN" else plain)
        conds.append(f"{key} IN ({', '.join('?' * len(plain))})")
    conds += [_one_value(col, vr, v, params) for v in values
              if v and (len(plain) < 2 or is_pattern(vr, v))]
    return _any(conds) if conds else None


def _any(conds: list[str]) -> str:
    """The OR of *conds*, in order, as a balanced tree: SQLite refuses an expression
    deeper than 1000, which a chain of ORs of a list of 1,000 values or more was
    (0xC001 for a RIS asking for 2,000 accession numbers at once)."""
    if len(conds) == 1:
        return f"({conds[0]})"
    half = len(conds) // 2
    return f"({_any(conds[:half])} OR {_any(conds[half:])})"


def build(query: Query, return_keys: list[str]) -> tuple[str, list, list[str]]:
    """Return (sql, params, selected keywords) for *query* at its level."""
    allowed = levels_up_to(query.level)
    params: list = []
    where: list[str] = []
    for kw, raw in query.keys.items():
        if kw in STORED and STORED[kw].level in allowed:
            a = STORED[kw]
            cond = condition(f"{ALIAS[a.level]}.{kw}", a.vr, raw, params)
        elif kw == "ModalitiesInStudy" and "STUDY" in allowed and raw.strip():
            sub: list = []
            inner = condition("x.Modality", "CS", raw, sub)
            cond = None
            if inner:
                cond = (f"EXISTS (SELECT 1 FROM series x WHERE x.StudyInstanceUID = "
                        f"st.StudyInstanceUID AND {inner})")
                params.extend(sub)
        else:
            cond = None
        if cond:
            where.append(cond)
    selected, exprs = [], []
    for kw in return_keys:
        if kw in STORED and STORED[kw].level in allowed:
            exprs.append(f"{ALIAS[STORED[kw].level]}.{kw}")
        elif kw in COMPUTED and COMPUTED[kw][0] == query.level:   # as Orthanc: own level only
            exprs.append(_COUNT_SQL[kw])
        else:
            continue
        selected.append(kw)
    if not exprs:
        exprs = ["1"]
    sql = f"SELECT {', '.join(exprs)} FROM {from_clause(query.level)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql, params, selected


def first_column(conn, sql: str, params: list, limit: int | None) -> list:
    """The first column of *sql*'s rows; with *limit*, ``TooMany`` once more than
    *limit* rows come (the rest never read: a C-GET of every instance of a catalog of
    millions held them all, 280 MB for 300,000, before being refused as too many)."""
    rows = conn.execute(sql, params)
    try:
        out = [r[0] for r in (rows if limit is None else islice(rows, limit + 1))]
    finally:
        rows.close()
    if limit is not None and len(out) > limit:
        raise TooMany(f"more than {limit} instances match")
    return out
