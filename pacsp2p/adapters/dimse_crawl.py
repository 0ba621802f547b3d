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
  supports, DCMTK dcmqrscp included, unlike paging by offset, which DIMSE lacks, or
  wildcards on Patient ID, which many do not): date windows, halved while one answers
  more than ``max_find_rows`` matches (bisection) and doubled after one that answers
  under a quarter of them; the cursor is ``<first>-<last day> <last study UID done>``,
  so a restart resumes inside its window. A range never matches a study without a
  StudyDate: on such a large archive those are not crawled (a warning says so once; a
  larger ``max_find_rows`` lists them). One day with more studies than the bound stops
  the crawl with an error naming the setting, as does a series of more instances (an
  IMAGE query has no key to page on that every archive matches by range). No total is
  known when paging.

``changes`` lists the studies whose StudyDate is on or after the last date seen (a
window halved in the same way while it answers too much: the next round goes on from
its end) and re-lists those whose instance count grew.

What the archive answers is hostile: a study or series row whose UID is not a UID by
PS3.5 §9.1 is skipped (one warning per listing with the count and an example); an
instance row goes on to the crawler's own check (``crawl.listed_error``), never into a
query or the adapter's map before it is valid.
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


def parse_cursor(cursor: str | None):
    """(window, last study done) of a crawl cursor; window ALL or (first, last day)."""
    if not cursor:
        return ALL, ""
    window, _, after = cursor.partition(" ")
    if not after:                        # a cursor of earlier versions: a study UID
        return ALL, window
    if window == ALL:
        return ALL, after
    try:
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
                             "StudyDate ranges (a study with no StudyDate is not listed "
                             "by a range: raise max_find_rows to crawl those)",
                             archive=self.name, n=self.max_find_rows)
                window = (EPOCH, FUTURE)
        lo, hi = window
        while True:
            try:
                rows = yield self._list_studies(throttle, {"StudyDate": _range_key(lo, hi)})
                return (lo, hi), rows
            except TooManyMatches:
                mid = _halved(lo, hi)
                if mid is None:
                    raise TooManyMatches(
                        f"archive {self.name}: more than {self.max_find_rows} studies on "
                        f"{lo:%Y%m%d} alone: cannot page further (raise max_find_rows)")
                hi = mid

    @staticmethod
    def _next_window(window, found: int, bound: int):
        """The window after *window*, which listed *found* studies (None: the end)."""
        if window == ALL:
            return None
        lo, hi = window
        if hi >= FUTURE:
            return None
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
            name = ALL if window == ALL else _window_text(*window)
            return items, f"{name} {study}", total
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
        items = []
        for serow in self._valid_rows(series_rows, "SeriesInstanceUID", "series"):
            series = serow["SeriesInstanceUID"]
            sattrs = dict(base, **{k: v for k, v in serow.items()
                                   if k in LEVEL_KEYS["SERIES"]})
            yield throttle()
            rows = yield self._find_d("IMAGE", {"StudyInstanceUID": study,
                                                "SeriesInstanceUID": series},
                                      self.IMAGE_RETURNS)
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
        self._seen_counts.put(study, len(items))
        return items

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
