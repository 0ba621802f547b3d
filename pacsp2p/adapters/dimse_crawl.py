"""The crawl and the change feed of the ``dimse`` adapter: study root C-FIND, paged so that
no answer is ever bigger than ``max_find_rows`` matches.

A crawl page is one study: its series (C-FIND SERIES) and their instances (C-FIND IMAGE
per series), each query behind the crawl's token bucket. The studies are listed first:

- by one C-FIND STUDY with universal matching, when the archive answers it within
  ``max_find_rows`` matches (studies with no StudyDate included); the cursor is
  ``* <last Study Instance UID done>`` (studies sorted by UID; a bare UID, the cursor of
  earlier versions, means the same);
- else (the adapter cancels the C-FIND past the bound: C-CANCEL, then the association is
  aborted) by StudyDate range matching (PS3.4 C.2.2.2.5, which every Query/Retrieve SCP
  supports, DCMTK dcmqrscp included, unlike paging by offset, which DIMSE lacks): date
  windows, halved while one answers more than ``max_find_rows`` matches (bisection) and
  doubled after one that answers under a quarter of them, keeping the studies whose
  StudyDate is a date; the cursor is ``<first>-<last day> <last study UID done>``, so a
  restart resumes inside its window. One day with more studies than the bound stops the
  crawl with an error naming the setting;
- then the studies whose StudyDate is absent, empty or not a date (no range matches them
  on dcmqrscp; empty value matching ``""`` matches nothing on dcmqrscp 3.6.7 nor Orthanc
  1.10): by Patient ID wildcard prefixes (PS3.4 C.2.2.2.4, case-sensitive on both), a
  prefix trie walked depth first: ``<prefix>*`` answering more than the bound is split
  into the Patient ID ``<prefix>`` itself (single value matching) and ``<prefix><c>*``
  for each printable ASCII character ``c`` but ``\\ * ?`` (no leading space, nor two
  in a row). The cursor is ``pid*<hex of
  the prefix>`` (or ``pid=`` for one Patient ID) and the last study done. A study with
  neither StudyDate nor Patient ID, or whose Patient ID has another character where the
  trie had to split, is not listed (a warning says so once), nor any on an archive that
  answers a Patient ID no one has (it ignores the key); one Patient ID with more
  studies than the bound is skipped with a warning naming it (after
  ``MAX_BIG_PATIENTS`` such, the rest of the trie is left: an archive matching no key),
  and so is the rest after ``PID_MAX`` prefixes in a row over the bound with no row
  answered below them (a prefix over the bound has its rows below it: an archive that
  ignores wildcard keys but not single values).

No total is known when paging. A series with more instances than the bound is skipped
(no key pages one series on both archives: InstanceNumber takes single values only,
SOPInstanceUID is list matching, dcmqrscp ignores ContentTime): one warning names it and
the crawl status lists it (``unlisted``); the crawl goes on with the rest.

``changes`` lists the studies whose StudyDate is on or after the last date seen (a
window halved in the same way while it answers too much: the next round goes on from
its end) and re-lists those whose instance count grew.

What the archive answers is hostile: a study or series row whose UID is not a UID by
PS3.5 §9.1 is skipped (one warning per listing with the count and an example); an
instance row goes on to the crawler's own check (``crawl.listed_error``), never into a
query or the adapter's map before it is valid. A cursor is read back checked (a prefix
of at most 64 characters of the trie's alphabet), else the crawl starts again.
"""

from __future__ import annotations

import bisect
import datetime
import time

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.adapters.associations import Refused
from pacsp2p.attributes import STORED
from pacsp2p.types import InstanceMeta
from pacsp2p.validate import is_uid, shown

log = Logger()

LEVEL_KEYS = {lvl: [kw for kw, a in STORED.items() if a.level == lvl]
              for lvl in ("PATIENT", "STUDY", "SERIES", "IMAGE")}
EPOCH = datetime.date(1900, 1, 1)     # a first window starting here is open: "-<last>"
FUTURE = datetime.date(9999, 12, 31)  # a window ending here is open: "<first>-"
ALL = "*"                             # the window of universal matching
PID_CHARS = "".join(c for c in map(chr, range(0x20, 0x7F)) if c not in "\\*?")
FIRST_CHARS = PID_CHARS[1:]           # nor starts with a space, nor has two in a row
PID_MAX = 64                          # characters of a Patient ID (LO)
UNLISTED_SHOWN = 20                   # series the crawl status names at most
PROBE = "~pacsp2p~no~such~patient~*"  # matches nothing where Patient ID keys are honoured
GIVEN_UP = ("=", PID_CHARS[-1] * PID_MAX)  # the trie's last page: nothing comes after it
MAX_BIG_PATIENTS = 8                  # Patient IDs over the bound before the trie is left


class TooManyMatches(Refused):
    """A C-FIND answered more matches than ``max_find_rows`` (it was cancelled)."""


def _day(text: str) -> datetime.date:
    return datetime.datetime.strptime(text, "%Y%m%d").date()


def _window_text(lo: datetime.date, hi: datetime.date) -> str:
    return f"{lo:%Y%m%d}-{hi:%Y%m%d}"


def _range_key(lo: datetime.date, hi: datetime.date) -> str:
    """The StudyDate range matching key of a window (open at EPOCH and FUTURE)."""
    return (("" if lo <= EPOCH else f"{lo:%Y%m%d}") + "-"
            + ("" if hi >= FUTURE else f"{hi:%Y%m%d}"))


def _halved(lo: datetime.date, hi: datetime.date) -> datetime.date:
    """The last day of the first half of the window, or None if it is one day."""
    if hi <= lo:
        return None
    end = min(hi, datetime.date.today() + datetime.timedelta(days=1))
    if end <= lo:
        end = hi
    return lo + (end - lo) // 2


def _dated(row: dict) -> bool:
    """Whether a study row's StudyDate is a date (listed by the date windows)."""
    try:
        _day(str(row.get("StudyDate", "")).strip())
        return True
    except ValueError:
        return False


def _chars(before: str) -> str:
    """The characters of the trie after the prefix *before*."""
    return FIRST_CHARS if not before or before.endswith(" ") else PID_CHARS


def _is_prefix(text: str) -> bool:
    return 0 < len(text) <= PID_MAX and all(c in _chars(text[:i])
                                            for i, c in enumerate(text))


def _after_prefix(prefix: str):
    """The Patient ID page after the trie below *prefix* is done (None: the end)."""
    while prefix:
        chars = _chars(prefix[:-1])
        i = chars.index(prefix[-1]) + 1
        if i < len(chars):
            return "*", prefix[:-1] + chars[i]
        prefix = prefix[:-1]
    return None


def _window_name(window) -> str:
    if window == ALL:
        return ALL
    if isinstance(window[0], str):
        return f"pid{window[0]}{window[1].encode('ascii').hex()}"
    return _window_text(*window)


def parse_cursor(cursor: str | None):
    """(window, last study done) of a crawl cursor; window ALL, (first, last day), or a
    Patient ID page ("*" or "=", prefix)."""
    if not cursor:
        return ALL, ""
    window, _, after = cursor.partition(" ")
    if not after:                        # a cursor of earlier versions: a study UID
        return ALL, window
    if window == ALL:
        return ALL, after
    try:
        if window[:4] in ("pid*", "pid="):
            prefix = bytes.fromhex(window[4:]).decode("ascii")
            if not _is_prefix(prefix):
                raise ValueError(prefix)
            return (window[3], prefix), after
        lo, hi = (_day(x) for x in window.split("-"))
    except ValueError:
        return ALL, ""                   # not ours: start again
    return (lo, hi), after


class DimseCrawl:
    """The crawl and change feed of ``DimseArchive`` (mixed in: it provides ``_find_d``,
    ``_run``, ``_probe_class``, ``_where``, ``_seen_counts``, ``max_find_rows``)."""

    STUDY_RETURNS = (LEVEL_KEYS["PATIENT"] + LEVEL_KEYS["STUDY"]
                     + ["NumberOfStudyRelatedInstances"])
    SERIES_RETURNS = LEVEL_KEYS["SERIES"] + ["StudyInstanceUID"]
    IMAGE_RETURNS = LEVEL_KEYS["IMAGE"] + ["StudyInstanceUID", "SeriesInstanceUID"]

    _listing = None             # (window, sorted study UIDs, {uid: row}) being crawled
    _warned_undated = False
    _big_patients = 0           # Patient IDs of more studies than the bound, this crawl
    _dry = 0                    # prefixes over the bound since a page answered a row
    crawl_unlisted = ()         # series not listed: more instances than the bound

    def _valid_rows(self, rows, key: str, what: str) -> list[dict]:
        """The *rows* whose *key* is a UID; one warning for those skipped."""
        kept, bad = [], []
        for r in rows:
            (kept if is_uid(r.get(key)) else bad).append(r)
        if bad:
            log.warn("archive {archive}: {n} {what} row(s) skipped: {key} is not a UID "
                     "(e.g. {example})", archive=self.name, n=len(bad), what=what, key=key,
                     example=shown(bad[0].get(key, "(absent)")))
        return kept

    @defer.inlineCallbacks
    def _list_studies(self, throttle, keys=None):
        """{study uid: row} of the studies matching *keys* (TooManyMatches past the
        bound)."""
        yield throttle()
        rows = yield self._find_d("STUDY", keys or {}, self.STUDY_RETURNS)
        return {r["StudyInstanceUID"]: r
                for r in self._valid_rows(rows, "StudyInstanceUID", "study")}

    @defer.inlineCallbacks
    def _list_window(self, window, throttle):
        """(window, {uid: row}): the studies of *window*, or of its first part that
        answers within the bound (ALL turns into the first date window)."""
        if window == ALL:
            try:
                rows = yield self._list_studies(throttle)
                return ALL, rows
            except TooManyMatches:
                if not self._warned_undated:
                    self._warned_undated = True
                    log.warn("archive {archive}: more than {n} studies: crawled by "
                             "StudyDate ranges, then those with no StudyDate by Patient "
                             "ID prefix (one with no Patient ID either is not listed: "
                             "raise max_find_rows to crawl those)",
                             archive=self.name, n=self.max_find_rows)
                window = (EPOCH, FUTURE)
        if isinstance(window[0], str):
            rows = yield self._list_patients(window, throttle)
            return rows
        lo, hi = window
        while True:
            try:
                rows = yield self._list_studies(throttle, {"StudyDate": _range_key(lo, hi)})
                return (lo, hi), {u: r for u, r in rows.items() if _dated(r)}
            except TooManyMatches:
                mid = _halved(lo, hi)
                if mid is None:
                    raise TooManyMatches(
                        f"archive {self.name}: more than {self.max_find_rows} studies on "
                        f"{lo:%Y%m%d} alone: cannot page further (raise max_find_rows)")
                hi = mid

    @defer.inlineCallbacks
    def _list_patients(self, window, throttle):
        """(page, {uid: row}): the undated studies of the Patient ID page *window*, or
        of the first page of its trie that answers within the bound."""
        kind, prefix = window
        if window == ("*", FIRST_CHARS[0]):
            try:        # an archive ignoring the key would have the trie walked for ever
                rows = yield self._list_studies(throttle, {"PatientID": PROBE})
            except TooManyMatches:
                rows = True
            if rows:
                log.warn("archive {archive}: it does not match Patient ID wildcards (a "
                         "Patient ID no one has answered studies): the studies with no "
                         "StudyDate are not listed", archive=self.name)
                return GIVEN_UP, {}
            self._big_patients = self._dry = 0
        while kind == "*":
            try:
                rows = yield self._list_studies(throttle, {"PatientID": prefix + "*"})
                self._dry = 0 if rows else self._dry
                return window, {u: r for u, r in rows.items() if not _dated(r)}
            except TooManyMatches:
                kind, window = "=", ("=", prefix)
                # a prefix over the bound has its rows below it: a real trie answers one
                # within PID_MAX splits; one that never does ignores the key
                self._dry += 1
                if self._dry > PID_MAX:
                    log.warn("archive {archive}: {n} Patient ID prefixes in a row answered "
                             "more than the bound and none below them a study: the rest "
                             "of the studies with no StudyDate is not listed",
                             archive=self.name, n=self._dry)
                    return GIVEN_UP, {}
        if prefix.endswith(" "):         # trailing spaces do not count: asked as shorter
            return window, {}
        try:
            rows = yield self._list_studies(throttle, {"PatientID": prefix})
        except TooManyMatches:
            log.warn("archive {archive}: more than {n} studies of Patient ID {pid}: those "
                     "with no StudyDate are not listed (raise max_find_rows)",
                     archive=self.name, n=self.max_find_rows, pid=shown(prefix))
            self._big_patients += 1
            if self._big_patients >= MAX_BIG_PATIENTS:    # it ignores the key: leave
                log.warn("archive {archive}: {n} Patient IDs answered more than the bound: "
                         "the rest of the studies with no StudyDate is not listed",
                         archive=self.name, n=self._big_patients)
                return GIVEN_UP, {}
            return window, {}
        self._dry = 0 if rows else self._dry
        return window, {u: r for u, r in rows.items() if not _dated(r)}

    @staticmethod
    def _next_window(window, found: int, bound: int):
        """The window after *window*, which listed *found* studies (None: the end)."""
        if window == ALL:
            return None
        if isinstance(window[0], str):
            kind, prefix = window
            if kind == "=" and len(prefix) < PID_MAX:
                return "*", prefix + _chars(prefix)[0]
            return _after_prefix(prefix)
        lo, hi = window
        if hi >= FUTURE:
            return "*", FIRST_CHARS[0]
        width = (hi - lo).days + 1
        if found < bound // 4:
            width *= 2
        start = hi + datetime.timedelta(days=1)
        end = start + datetime.timedelta(days=width - 1)
        if end >= datetime.date.today() + datetime.timedelta(days=1) or end >= FUTURE:
            end = FUTURE
        return start, end

    @defer.inlineCallbacks
    def crawl(self, cursor, throttle):
        window, after = parse_cursor(cursor)
        while True:
            listing = self._listing
            if listing is None or listing[0] != window or cursor is None:
                window, rows = yield self._list_window(window, throttle)
                listing = self._listing = (window, sorted(rows), rows)
                cursor = ""
            window, studies, rows = listing
            total = self._total(rows.values()) if window == ALL else None
            pos = bisect.bisect_right(studies, after) if after else 0
            if pos < len(studies):
                break
            window = self._next_window(window, len(studies), self.max_find_rows)
            self._listing, after = None, ""
            if window is None:
                return [], None, total
        study = studies[pos]
        items = yield self._crawl_study(rows[study], throttle)
        if pos + 1 < len(studies) or self._next_window(window, len(studies),
                                                       self.max_find_rows):
            return items, f"{_window_name(window)} {study}", total
        self._listing = None
        return items, None, total

    @staticmethod
    def _total(rows):
        """The instances the study rows count, None if one does not say (or says what
        is not a count: the crawl goes on without a total)."""
        total = 0
        for r in rows:
            try:
                n = int(str(r.get("NumberOfStudyRelatedInstances", "")).strip())
            except ValueError:
                return None
            if n < 0:
                return None
            total += n
        return total

    @defer.inlineCallbacks
    def _crawl_study(self, srow: dict, throttle):
        study = srow["StudyInstanceUID"]
        base = {k: v for k, v in srow.items()
                if k in LEVEL_KEYS["PATIENT"] or k in LEVEL_KEYS["STUDY"]}
        base["StudyInstanceUID"] = study
        yield throttle()
        series_rows = yield self._find_d("SERIES", {"StudyInstanceUID": study},
                                         self.SERIES_RETURNS)
        items, skipped = [], False
        for serow in self._valid_rows(series_rows, "SeriesInstanceUID", "series"):
            series = serow["SeriesInstanceUID"]
            sattrs = dict(base, **{k: v for k, v in serow.items()
                                   if k in LEVEL_KEYS["SERIES"]})
            yield throttle()
            try:
                rows = yield self._find_d("IMAGE", {"StudyInstanceUID": study,
                                                    "SeriesInstanceUID": series},
                                          self.IMAGE_RETURNS)
            except TooManyMatches:
                self._unlisted(study, series)
                skipped = True
                continue
            probed = None
            for r in rows:
                attrs = dict(sattrs, **{k: v for k, v in r.items()
                                        if k in LEVEL_KEYS["IMAGE"]})
                uid = attrs.get("SOPInstanceUID")
                if not uid:
                    continue
                attrs["SeriesInstanceUID"] = series
                known = self._where.get(uid) if is_uid(uid) else None
                if not attrs.get("SOPClassUID") and known:
                    attrs["SOPClassUID"] = known[2]
                if not attrs.get("SOPClassUID") and is_uid(uid):
                    # archives such as dcmqrscp do not return SOPClassUID in C-FIND:
                    # learn it from one C-GET per series (a series has one SOP class)
                    if probed is None:
                        yield throttle()
                        probed = yield self._run(self._probe_class, study, series, uid)
                    attrs["SOPClassUID"] = probed
                sop_class = attrs.get("SOPClassUID", "")
                if is_uid(uid) and is_uid(sop_class):
                    self._where.put(uid, (study, series, sop_class, ""))
                items.append((InstanceMeta(uid, sop_class, "", attrs, 0), 0))
        # a study with a series left out counts what the archive says it holds: the
        # change feed does not ask again for that series every round
        self._seen_counts.put(study, self._total([srow]) if skipped else len(items))
        return items

    def _unlisted(self, study: str, series: str) -> None:
        """Say once that *series* is not listed (more instances than the bound)."""
        what = f"study {study} series {series}"
        if what in self.crawl_unlisted:
            return
        log.warn("archive {archive}: {what} not listed: more than {n} instances, which "
                 "no C-FIND key pages (raise max_find_rows); the crawl goes on",
                 archive=self.name, what=what, n=self.max_find_rows)
        if len(self.crawl_unlisted) < UNLISTED_SHOWN:
            self.crawl_unlisted = (*self.crawl_unlisted, what)

    @defer.inlineCallbacks
    def changes(self, since, throttle):
        today = time.strftime("%Y%m%d")
        if since is None:
            return [], today
        try:
            lo = _day(since)
        except ValueError:
            lo = _day(today)
        (lo, hi), rows = yield self._list_window((lo, FUTURE), throttle)
        items = []
        newest = since
        for uid, row in sorted(rows.items()):
            n = row.get("NumberOfStudyRelatedInstances")
            try:
                n = int(n) if n not in (None, "") else None
            except ValueError:
                n = None
            if n is not None and self._seen_counts.get(uid) == n:
                continue
            items += yield self._crawl_study(row, throttle)
            date = row.get("StudyDate", "")
            if len(date) == 8 and date.isdigit() and date > newest:
                newest = date
        if hi < FUTURE:               # a part of the window only: go on from its end
            newest = f"{hi:%Y%m%d}"
        return items, min(newest, today) if newest else today
