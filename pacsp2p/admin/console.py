"""The web console: HTML pages served by the admin endpoint under ``/console/``.

Server-rendered (twisted.web + Jinja2 templates shipped in ``pacsp2p/admin/templates``,
one stylesheet in ``pacsp2p/admin/static``): no script, no external resource, so it
works in any browser, behind any proxy, and its content security policy forbids
scripts outright. Every value shown is escaped by the template engine. Everything comes
through the cluster API (``pacsp2p.cluster``), like every front end:

- ``/console/`` overview: this peer; every peer of the cluster (state, round trip, address,
  facade AE, since when); every archive (peer, adapter, up/down, free space, instances
  held); under-replicated instances, hinted hand-offs owed, crawls, repair, deletions
  and whatever else ``status()`` reports as running (a scrub);
- ``/console/studies``: search by patient name (a prefix), patient ID, study date range,
  modality, accession number, through ``find`` (the whole cluster's catalog), 25 a page,
  newest first;
- ``/console/study/<StudyInstanceUID>``: the study, its series and instances, and where
  every copy lives (``where``: peer/archive, readable now or not), with a form that
  retrieves it to a configured ``[destinations]`` entry (``move`` + start);
- ``/console/retrievals``: the retrievals running and recent (``status()``), per source
  (peer/archive) what it served and how fast, and the retrievals asked for here (who,
  where to, sub-operations done and failed); refreshed every 3 s while one runs;
- ``/console/login``, ``/console/logout``: a session for the users of ``[admin]
  users`` (``pacsp2p.admin.auth``).

Times are shown as local date and time or "3 min ago", sizes in KiB/MiB/GiB, DICOM
dates as YYYY-MM-DD and person names as "FAMILY, Given". Reading needs a login only
where the endpoint is bound to a non-loopback address; the retrieve form always needs
an authenticated user (``auth.Guard.check_write``, with the form's CSRF token).
"""

from __future__ import annotations

import collections
import re
import time
from importlib import resources
from urllib.parse import urlencode

import jinja2
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource

from pacsp2p import __version__
from pacsp2p.admin import gate, monitoring
from pacsp2p.admin.display import (ago, describe, dicom_date, dicom_time,  # noqa: F401
                                   duration, number, person, size, when)
from pacsp2p.types import Query
from pacsp2p.validate import InvalidUID, check_uid, shown

log = Logger()

PAGE = 25                     # studies per page
MAX_INSTANCES = 5000          # instances listed on a study page at most
MAX_SERIES = 1000
HTML = b"text/html; charset=utf-8"
STUDY_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
              "StudyID", "ReferringPhysicianName", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "SOPClassUID",
              "NumberOfFrames"]
_TEXT_MAX = 64
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")


SHOWN_MAX = 256               # characters of one value shown at most (then "…")
# C0 controls but tab, LF and CR, DEL, C1 controls: as their pictures (␛) or U+FFFD
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _picture(m: re.Match) -> str:
    c = ord(m.group())
    return chr(0x2400 + c) if c < 0x20 else "\u2421" if c == 0x7F else "\ufffd"


class Link(str):
    """A page's own text (a link it built, a description of its words): shown whole."""


def visible(value):
    """What a page shows of *value* (every ``{{ ... }}``, before escaping): a string
    without control characters (a terminal escape, a NUL from a DICOM value) and of at
    most ``SHOWN_MAX`` characters, so that one 64 KB PatientName cannot widen every
    page's table off the screen."""
    if isinstance(value, str):
        if len(value) > SHOWN_MAX and not isinstance(value, Link):
            value = value[:SHOWN_MAX] + "…"
        return _CONTROLS.sub(_picture, value)
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pacsp2p.admin", "templates"),
        autoescape=True, undefined=jinja2.ChainableUndefined, finalize=visible,
        trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, ago=ago, duration=duration, size=size, number=number,
                       da=dicom_date, tm=dicom_time, pn=person,
                       describe=lambda values: Link(describe(values)))
    return env


def _static(name: str) -> bytes:
    return resources.files("pacsp2p.admin").joinpath("static", name).read_bytes()


# -- the search form ---------------------------------------------------------------------

def _arg(request, name: str) -> str:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace").strip() if values else ""


def search_query(form: dict) -> tuple[dict, list[str]]:
    """The C-FIND keys of the studies form (*form*: field -> text) and the problems with
    it. A name without a wildcard matches as a prefix; other texts exactly unless they
    hold * or ?; no backslash (a C-FIND value separator) or control character."""
    keys, problems = {}, []
    for field, value in form.items():
        if len(value) > _TEXT_MAX or "\\" in value or any(ord(c) < 32 for c in value):
            problems.append(f"{field}: at most {_TEXT_MAX} characters, no backslash")
    if problems:
        return {}, problems
    name = form.get("name", "")
    if name:
        keys["PatientName"] = name if ("*" in name or "?" in name) else name + "*"
    if form.get("patient_id"):
        keys["PatientID"] = form["patient_id"]
    if form.get("accession"):
        keys["AccessionNumber"] = form["accession"]
    modality = form.get("modality", "").upper()
    if modality:
        if _MODALITY.match(modality):
            keys["ModalitiesInStudy"] = modality
        else:
            problems.append("modality: a code such as CT, MR, US")
    dates = []
    for field in ("from", "to"):
        value = form.get(field, "")
        m = _DATE.match(value) if value else None
        if value and m is None:
            problems.append(f"{field}: a date YYYY-MM-DD")
        dates.append("".join(m.groups()) if m else "")
    if any(dates):
        keys["StudyDate"] = f"{dates[0]}-{dates[1]}" if dates[0] != dates[1] else dates[0]
    return keys, problems


# -- the console ---------------------------------------------------------------------------

class Console(resource.Resource):
    """``/console/``: the pages above, on *cluster* (the cluster API), guarded by *guard*
    (``auth.Guard``)."""

    def __init__(self, cluster, guard):
        super().__init__()
        self.cluster, self.guard = cluster, guard
        self.env = _environment()
        self.requested: collections.deque = collections.deque(maxlen=50)
        self.putChild(b"", _Get(self, self.overview, "overview.html"))
        self.putChild(b"studies", _Get(self, self.studies, "studies.html"))
        self.putChild(b"study", _Study(self))
        self.putChild(b"retrievals", _Get(self, self.retrievals, "retrievals.html"))
        self.putChild(b"retrieve", _Retrieve(self))
        self.putChild(b"login", _Login(self))
        self.putChild(b"logout", _Logout(self))
        self.putChild(b"static", _Static({b"console.css": (_static("console.css"),
                                                           b"text/css; charset=utf-8")}))

    def getChild(self, path, request):
        return self.page_resource(request, "error.html", 404,
                                  message="There is no such page.")

    # -- rendering ---------------------------------------------------------------------
    @property
    def settings(self):
        return self.cluster.settings

    def context(self, request, **values) -> dict:
        who = gate.identity(request)
        return {"peer": self.settings.peer.name, "version": __version__,
                "identity": who, "csrf": self.guard.csrf_token(who),
                "logins": self.guard.logins, "can_write": self.can_write(who),
                "open_reads": self.guard.open_reads, "now": time.time(), **values}

    @staticmethod
    def can_write(who) -> bool:
        return who is not None and who.how in ("session", "basic", "certificate")

    def html(self, request, template: str, **values) -> bytes:
        return self.env.get_template(template).render(
            self.context(request, **values)).encode("utf-8")

    def page_resource(self, request, template: str, code: int, **values):
        return gate.Answer(code, self.html(request, template, **values), HTML)

    def login_page(self, request, code: int, message: str):
        """The login form as the answer to a request that needs a login (gate)."""
        target = request.uri.decode("latin-1") if request.method == b"GET" else ""
        return self.page_resource(request, "login.html", code, message=message,
                                  next=_safe_next(target))

    def render_page(self, request, template: str, produce):
        """Render *template* with what *produce()* (Deferred[dict], or (code, dict))
        gives; NOT_DONE_YET. An error code (400 or more) is shown with ``error.html``
        (its title and message), not with *template*, which wants a page's values."""
        def made(values):
            code = 200
            if isinstance(values, tuple):
                code, values = values
            if code >= 400:
                return code, HTML, self.html(request, "error.html", **values), None
            if "redirect" in values:
                return 303, HTML, b"", {b"location": values["redirect"].encode()}
            return code, HTML, self.html(request, template, **values), None
        return gate.deferred_answer(
            request, lambda: defer.maybeDeferred(produce).addCallback(made))

    # -- pages ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def overview(self, request):
        st = yield self.cluster.status()
        archives = yield self.cluster.all_archives()
        health = st.get("archives", {})
        rows = []
        for a in archives:
            h = health.get(a["archive"], {}) if a["local"] else {}
            rows.append({**a, "up": bool(h.get("up", a["up"])) if a["local"] else a["up"],
                         "free_bytes": h.get("free_bytes"), "latency_ms": h.get("latency_ms"),
                         "error": h.get("error")})
        members = (st.get("overlay") or {}).get("members") or [
            {"name": st.get("peer"), "state": "self",
             "facade": f"{st['facade']['ae_title']}@{st['facade']['port']}"}]
        running = [r for r in st.get("retrievals", []) if not r.get("finished_at")]
        known = {"peer", "version", "facade", "catalog", "archives", "overlay", "ingest",
                 "retrievals", "strategies", "sources", "crawls", "deletions", "repair",
                 "under_replicated"}
        other = {k: v for k, v in st.items() if k not in known and isinstance(v, dict)}
        return {"title": "Overview", "st": st, "archives": rows, "members": members,
                "running": running, "other": other, "replicas":
                    self.settings.cluster.replicas, "refresh": 10}

    @defer.inlineCallbacks
    def studies(self, request):
        form = {f: _arg(request, f) for f in ("name", "patient_id", "from", "to",
                                               "modality", "accession")}
        try:
            page = max(0, min(int(_arg(request, "page") or 0), 100000))
        except ValueError:
            page = 0
        keys, problems = search_query(form)
        rows, more = [], False
        if not problems:
            found = yield self.cluster.find(Query("STUDY", keys), ["StudyInstanceUID"],
                                            limit=PAGE + 1, offset=page * PAGE)
            more = len(found) > PAGE
            uids = [r["StudyInstanceUID"] for r in found[:PAGE]]
            if uids:
                details = yield self.cluster.find(
                    Query("STUDY", {"StudyInstanceUID": "\\".join(uids)}), STUDY_KEYS)
                by_uid = {r["StudyInstanceUID"]: r for r in details}
                rows = [by_uid[u] for u in uids if u in by_uid]
        base = {k: v for k, v in form.items() if v}
        return {"title": "Studies", "form": form, "rows": rows, "problems": problems,
                "page": page, "first": page * PAGE + 1,
                "prev": Link("?" + urlencode({**base, "page": page - 1})) if page else None,
                "next": Link("?" + urlencode({**base, "page": page + 1})) if more else None}

    @defer.inlineCallbacks
    def study(self, request, uid: str):
        found = yield self.cluster.find(Query("STUDY", {"StudyInstanceUID": uid}),
                                        STUDY_KEYS)
        if not found:
            return 404, {"title": "No such study", "message":
                         f"The cluster's catalog holds no study {uid}."}
        series = yield self.cluster.find(Query("SERIES", {"StudyInstanceUID": uid}),
                                         SERIES_KEYS, limit=MAX_SERIES)
        images = yield self.cluster.find(Query("IMAGE", {"StudyInstanceUID": uid}),
                                         IMAGE_KEYS, limit=MAX_INSTANCES)
        where = yield self.cluster.where(study=uid)
        copies = {w["instance"]: w["replicas"] for w in where}
        replicas = self.settings.cluster.replicas
        holders: dict = {}
        by_series = collections.defaultdict(list)
        short = 0
        for image in images:
            reps = copies.get(image["SOPInstanceUID"], [])
            live = sum(1 for r in reps if r["available"] and r.get("version") != "other")
            short += live < replicas
            by_series[image["SeriesInstanceUID"]].append({**image, "replicas": reps,
                                                          "live": live})
            for r in reps:
                h = holders.setdefault((r["peer"], r["archive"]),
                                       {"peer": r["peer"], "archive": r["archive"],
                                        "instances": 0, "available": 0})
                h["instances"] += 1
                h["available"] += bool(r["available"])
        total = sum(int(s.get("NumberOfSeriesRelatedInstances") or 0) for s in series)
        return {"title": "Study", "study": found[0], "uid": uid, "series": series,
                "by_series": by_series, "holders": sorted(holders.values(),
                                                          key=lambda h: (h["peer"],
                                                                         h["archive"])),
                "shown": len(images), "total": max(total, len(where)),
                "short": short, "replicas": replicas,
                "destinations": sorted(self.settings.destinations),
                "requested": [r for r in self.requested if r["study"] == uid][:5]}

    @defer.inlineCallbacks
    def retrievals(self, request):
        st = yield self.cluster.status()
        ours = {r["retrieval"]: r for r in self.requested}
        rows = [{**r, "requested": ours.get(r["id"])}
                for r in reversed(st.get("retrievals", []))]
        running = any(not r.get("finished_at") for r in rows) or \
            any(not r["done"] for r in self.requested)
        return {"title": "Retrievals", "rows": rows, "requested": list(self.requested),
                "refresh": 3 if running else None}

    @defer.inlineCallbacks
    def retrieve(self, request, who, uid: str, destination):
        """Start a retrieval of study *uid* to *destination* for *who*."""
        delivery = yield self.cluster.move(Query("STUDY", {"StudyInstanceUID": uid}),
                                           destination)
        refs = list(getattr(delivery, "refs", []))
        if not refs:
            return 404, {"title": "Nothing to retrieve",
                         "message": f"The catalog holds no instance of study {uid}."}
        retrieval = getattr(delivery, "retrieval", None)
        entry = {"retrieval": getattr(retrieval, "id", None), "study": uid,
                 "destination": destination.ae_title, "who": str(who),
                 "requested_at": time.time(), "instances": len(refs), "completed": 0,
                 "failed": 0, "warning": 0, "remaining": len(refs), "done": False,
                 "cancelled": False, "error": None, "finished_at": None}
        self.requested.appendleft(entry)

        def progress(p):
            entry.update(completed=p.completed, failed=p.failed, warning=p.warning,
                         remaining=p.remaining, cancelled=p.cancelled, error=p.error)
            if p.done and not entry["done"]:
                entry.update(done=True, finished_at=time.time())
                log.info("admin: retrieval {id} of study {uid} to {dest} for {who} ended: "
                         "{c} sent, {f} failed{err}", id=entry["retrieval"], uid=uid,
                         dest=destination.ae_title, who=str(who), c=p.completed,
                         f=p.failed, err=f" ({p.error})" if p.error else "")
        delivery.listeners.append(progress)
        log.info("admin: {who} asked for study {uid} ({n} instances) to go to {dest} "
                 "(retrieval {id})", who=str(who), uid=uid, n=len(refs),
                 dest=destination.ae_title, id=entry["retrieval"])
        monitoring.admin_action(self.cluster, "retrieve", _client(request),
                                user=who.name if who else None, level="STUDY", uids=[uid],
                                description=f"to {destination.ae_title}",
                                result=len(refs))

        def failed(f):
            entry.update(done=True, error=f.getErrorMessage()[:300],
                         finished_at=time.time())
            log.failure("admin: retrieval of study {uid} to {dest} failed", f, uid=uid,
                        dest=destination.ae_title)
        d = delivery.start()
        d.addCallbacks(progress, failed)
        return {"redirect": "/console/retrievals"}


def _safe_next(target: str) -> str:
    """Where to go after logging in: a console path of this endpoint, nothing else (a
    ``Link``: shown whole, however long a search it names), in printable ASCII (what a
    browser sends; it becomes the redirect's Location header, which holds no other)."""
    if target.startswith("/console/") and not target.startswith("/console/login") and \
            "//" not in target and "\\" not in target and len(target) < 2000 and \
            target.isascii() and target.isprintable() and " " not in target:
        return Link(target)
    return Link("/console/")


class _Get(resource.Resource):
    isLeaf = True

    def __init__(self, console, produce, template):
        super().__init__()
        self.console, self.produce, self.template = console, produce, template

    def render_GET(self, request):
        return self.console.render_page(request, self.template,
                                        lambda: self.produce(request))

    render_HEAD = render_GET


class _Study(resource.Resource):
    """``/console/study/<StudyInstanceUID>``."""

    isLeaf = True

    def __init__(self, console):
        super().__init__()
        self.console = console

    def render_GET(self, request):
        uid = request.postpath[0].decode("ascii", "replace") if request.postpath else ""
        try:
            check_uid(uid, "Study Instance UID")
        except InvalidUID as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", HTML)
            return self.console.html(request, "error.html", title="Not a study",
                                     message=str(e))
        return self.console.render_page(request, "study.html",
                                        lambda: self.console.study(request, uid))


class _Post(resource.Resource):
    """A console form's write action: the guard's checks first (authentication, same
    origin, the CSRF token)."""

    isLeaf = True

    def __init__(self, console):
        super().__init__()
        self.console = console

    def refuse(self, request, code: int, message: str):
        request.setResponseCode(code)
        request.setHeader(b"content-type", HTML)
        return self.console.html(request, "error.html", title="Refused", message=message)

    def render_GET(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        request.setHeader(b"content-type", HTML)
        return self.console.html(request, "error.html", title="Use the form",
                                 message="This address takes the console's form (POST).")

    def render_POST(self, request):
        who = gate.identity(request)
        problem = self.console.guard.check_write(request, who, _arg(request, "csrf"),
                                                 json_body=False)
        if problem is not None:
            code, message = problem
            self.console.guard.refusal(
                "admin: {what} refused from {client} ({who}): {why}",
                what=shown(request.path.decode("latin-1"), 60), client=_client(request),
                who=str(who) if who else "nobody", why=message)
            if code == 401 and self.console.guard.logins:
                return self.console.login_page(request, 401, message).render(request)
            return self.refuse(request, code, message)
        return self.act(request, who)


class _Retrieve(_Post):
    def act(self, request, who):
        uid, ae = _arg(request, "study"), _arg(request, "destination")
        try:
            check_uid(uid, "Study Instance UID")
        except InvalidUID as e:
            return self.refuse(request, 400, str(e))
        destination = self.console.settings.destinations.get(ae)
        if destination is None:
            return self.refuse(request, 400, f"{shown(ae, 16)} is not a configured "
                                             f"destination ([destinations])")
        return self.console.render_page(
            request, "error.html",
            lambda: self.console.retrieve(request, who, uid, destination))


class _Logout(_Post):
    def act(self, request, who):
        self.console.guard.end_session(request, who)
        request.setResponseCode(303)
        request.setHeader(b"location", b"/console/login")
        return b""


class _Login(resource.Resource):
    isLeaf = True

    def __init__(self, console):
        super().__init__()
        self.console = console

    def render_GET(self, request):
        request.setHeader(b"content-type", HTML)
        return self.console.html(request, "login.html", message="",
                                 next=_safe_next(_arg(request, "next")))

    def render_POST(self, request):
        guard = self.console.guard
        target = _safe_next(_arg(request, "next"))
        if not guard.same_origin(request):
            return self.console.login_page(request, 403, "This login form was sent by "
                                                         "another site.").render(request)
        if not guard.logins:
            return self.console.login_page(request, 403, "No users are configured "
                                                         "([admin] users).").render(request)
        user, password = _arg(request, "user"), _arg(request, "password")

        def checked(ok):
            if not ok:
                return (401, HTML, self.console.html(request, "login.html", next=target,
                                                     message="Wrong user name or "
                                                             "password."), None)
            sid = guard.new_session(user)
            guard.session_cookie(request, sid)
            log.info("admin: {user} logged in from {client}", user=shown(user, 64),
                     client=_client(request))
            return 303, HTML, b"", {b"location": target.encode()}

        def busy(f):
            f.trap(gate.auth.Busy)
            return (f.value.code, HTML, self.console.html(
                request, "login.html", next=target, message=str(f.value)), None)
        return gate.deferred_answer(request, lambda: guard.check_password(
            request, user, password).addCallbacks(checked, busy))


class _Static(resource.Resource):
    isLeaf = True

    def __init__(self, files: dict):
        super().__init__()
        self.files = files

    def render_GET(self, request):
        name = request.postpath[0] if len(request.postpath) == 1 else b""
        if name not in self.files:
            request.setResponseCode(404)
            return b"not found"
        body, ctype = self.files[name]
        request.setHeader(b"content-type", ctype)
        return body

    render_HEAD = render_GET


def _client(request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))
