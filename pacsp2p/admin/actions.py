"""The admin endpoint's write actions: ``POST /delete``, ``POST /scrub``, ``POST /drain``
and ``GET /drain`` (a drain's progress), for ``pacsp2p delete``, ``scrub`` and ``drain``.

Write actions like ``POST /delete``: the gate's rules (``auth.Guard.check_write``: an
authenticated user, or a JSON write from a loopback client of a loopback-bound
endpoint without users), a JSON body, and an audit record of who asked what. Each
calls one verb of the door (``cluster.scrub``, ``cluster.drain``,
``cluster.drain_progress``) and answers JSON.

- ``POST /scrub`` ``{"rate": MB/s or null}`` -> ``{"pass": id, ...}``: one full pass
  started (progress and summary: ``GET /status``, ``scrub``);
- ``POST /drain`` ``{"peer": name or null, "archive": name or null, "stop": false}`` ->
  ``{"peer", "archives", "copies"}``: the drain asked of that peer;
- ``GET /drain?peer=P&archive=A`` -> ``{"remaining", "states", ...}``.
"""

from __future__ import annotations

import json
import math

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from pacsp2p.admin import gate, monitoring
from pacsp2p.types import Scope
from pacsp2p.validate import shown

log = Logger()

MAX_NAME = 255


def _body(value) -> bytes:
    return json.dumps(value, indent=2, default=str).encode()


def _name(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME or not value.isprintable():
        raise ValueError(f'"{key}" must be a name (a short string)')
    return value


class _Action(resource.Resource):
    """A JSON write action: ``parse(body) -> kwargs``, ``act(**kwargs) -> Deferred``."""

    isLeaf = True
    action = ""
    usage = ""

    def __init__(self, cluster, guard):
        super().__init__()
        self.cluster, self.guard = cluster, guard

    def render_GET(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        request.setHeader(b"content-type", b"application/json")
        return _body({"error": f"POST a JSON body: {self.usage}"})

    def render_POST(self, request):
        request.setHeader(b"content-type", b"application/json")
        client = getattr(request.getClientAddress(), "host", None)
        who = gate.identity(request)
        problem = self.guard.check_write(request, who, None, json_body=True)
        if problem is not None:
            code, message = problem
            self.guard.refusal("admin: {action} refused from {client} ({who}): {why}",
                               action=self.action, client=shown(client),
                               who=str(who) if who else "nobody", why=message)
            request.setResponseCode(code)
            if code == 401 and self.guard.admin.users:
                request.setHeader(b"www-authenticate",
                                  b'Basic realm="pacsp2p admin", charset="UTF-8"')
            return _body({"error": message})
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "application/json":
            request.setResponseCode(415)
            return _body({"error": "Content-Type: application/json expected"})
        try:
            raw = request.content.read(gate.MAX_BODY + 1)
            body = json.loads(raw or b"{}") if len(raw) <= gate.MAX_BODY else None
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object (of at most 1 MiB)")
            kwargs = self.parse(body)
        except RecursionError:                # [[[[...: nested deeper than Python's stack
            request.setResponseCode(400)
            return _body({"error": "the body is nested too deep"})
        except ValueError as e:
            request.setResponseCode(400)
            return _body({"error": str(e)[:300]})
        log.info("admin: {action} {args} requested from {client}", action=self.action,
                 args=shown(self.summary(kwargs), 200), client=shown(client))
        d = defer.maybeDeferred(self.act, **kwargs)
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(code, value):
            monitoring.admin_action(            # the audit trail: who asked what
                self.cluster, self.action, client,
                user=getattr(who, "name", None) if who else None,
                outcome=0 if code == 200 else 8,
                description=value.get("error", "") or self.describe(kwargs),
                **self.audited(kwargs, value))
            if not gone:
                request.setResponseCode(code)
                request.write(_body(value))
                request.finish()

        def failed(f):
            if f.check(ValueError):           # DrainError, a bad rate, ...
                return answer(400, {"error": str(f.value)[:500]})
            log.warn("admin: {action} failed: {err}", action=self.action,
                     err=f.getErrorMessage())
            return answer(500, {"error": f.getErrorMessage()[:500]})
        d.addCallbacks(lambda value: answer(200, value), failed)
        return server.NOT_DONE_YET


    def describe(self, kwargs) -> str:
        """What was asked, in words (the audit record's outcome description)."""
        return json.dumps(kwargs)

    def summary(self, kwargs) -> str:
        """What was asked, for the log line."""
        return self.describe(kwargs)

    def audited(self, kwargs, value) -> dict:
        """The action's own fields of its audit record."""
        return {"result": {k: value[k] for k in ("pass", "peer", "archives", "copies")
                           if k in value}}


class _Delete(_Action):
    """``POST /delete`` {"level": "STUDY"|"SERIES"|"IMAGE", "uids": [...], "reason": ...}
    -> {"deleted": n, "level", "uids"}: the cluster's ``delete`` verb."""

    action = "delete"
    usage = '{"level": "STUDY"|"SERIES"|"IMAGE", "uids": [...], "reason": "..."}'

    def parse(self, body):
        uids = body.get("uids")
        if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
            raise ValueError('"uids" must be a list of UID strings')
        reason = body.get("reason") if isinstance(body.get("reason"), str) else ""
        return {"scope": Scope(str(body.get("level", "")).upper(), tuple(uids)),
                "reason": reason or "admin"}

    def act(self, scope, reason):
        d = self.cluster.delete(scope, reason)
        return d.addCallback(lambda n: {"deleted": n, "level": scope.level,
                                        "uids": list(scope.uids)})

    def describe(self, kwargs) -> str:
        return kwargs["reason"]

    def summary(self, kwargs) -> str:
        scope = kwargs["scope"]
        return f"{scope.level} {','.join(scope.uids)} ({kwargs['reason']})"

    def audited(self, kwargs, value) -> dict:
        return {"level": kwargs["scope"].level, "uids": kwargs["scope"].uids,
                "result": value.get("deleted")}


class _Scrub(_Action):
    action = "scrub"
    usage = '{"rate": MB/s or null (the configured scrub_rate), 0: no limit}'

    def parse(self, body):
        rate = body.get("rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 <= rate < math.inf):      # NaN, Infinity too
            raise ValueError('"rate" must be MB/s (a number >= 0, 0: no limit) or null')
        return {"rate": rate}

    def act(self, rate):
        return self.cluster.scrub(rate)


class _Drain(_Action):
    action = "drain"
    usage = '{"peer": name or null, "archive": name or null, "stop": false}'

    def parse(self, body):
        stop = body.get("stop", False)
        if not isinstance(stop, bool):
            raise ValueError('"stop" must be true or false')
        return {"peer": _name(body, "peer"), "archive": _name(body, "archive"), "stop": stop}

    def act(self, peer, archive, stop):
        return self.cluster.drain(peer, archive, stop)

    def render_GET(self, request):
        """A drain's progress as this peer sees it."""
        def arg(name):
            values = request.args.get(name)
            value = values[0].decode("utf-8", "replace") if values else None
            return value if value and len(value) <= MAX_NAME else None

        def produce():
            d = defer.maybeDeferred(self.cluster.drain_progress, arg(b"peer"), arg(b"archive"))

            def ok(value):
                return 200, b"application/json", _body(value), {}

            def failed(f):
                code = 400 if f.check(ValueError) else 500
                return code, b"application/json", _body(
                    {"error": f.getErrorMessage()[:500]}), {}
            return d.addCallbacks(ok, failed)
        return gate.deferred_answer(request, produce)


def install(root, cluster, guard) -> None:
    """``/delete``, ``/scrub`` and ``/drain`` on the admin site's *root*."""
    root.putChild(b"delete", _Delete(cluster, guard))
    root.putChild(b"scrub", _Scrub(cluster, guard))
    root.putChild(b"drain", _Drain(cluster, guard))
