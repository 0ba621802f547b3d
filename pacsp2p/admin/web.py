"""The peer's local admin endpoint (twisted.web): ``GET /status`` -> JSON, ...

Bound to 127.0.0.1 by default; ``pacsp2p status``, ``peers``, ``where`` read it.

Every request passes the gate (``gate.AdminSite``): who is asking (``auth.Guard``: users
with passwords, client certificates, the CLI's token) and, on an endpoint bound to a
non-loopback address (HTTPS then), 401 for nobody. Write actions (``POST /delete``, the
console's retrieve) need an authenticated user; the one exception: on a loopback-bound
endpoint with no ``[admin] users`` and no ``tls_client_ca``, a JSON write action from a
loopback client is served without credentials, as before (``auth`` says why that is
safe). They also want a JSON body (``Content-Type: application/json``), which a web
page of another origin cannot send without a CORS preflight this endpoint never grants.
The web console (``console``) lives under ``/console/``; ``/`` leads there.
"""

from __future__ import annotations

import ipaddress
import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from pacsp2p.admin import auth, console, gate
from pacsp2p.admin import actions, monitoring
from pacsp2p.config import AdminSettings
from pacsp2p.validate import InvalidUID

log = Logger()

MAX_BODY = 1 << 20            # bytes of a write action's JSON body


def is_loopback(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address((address or "").strip("[]")).is_loopback
    except ValueError:
        return False


class _Json(resource.Resource):
    isLeaf = True

    def __init__(self, producer, with_request=None):
        super().__init__()
        self.producer = producer
        self.with_request = with_request

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        d = defer.maybeDeferred(self.with_request, request) if self.with_request else \
            defer.maybeDeferred(self.producer)
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(code, value):
            if gone:
                return                  # the client left: nobody to answer
            request.setResponseCode(code)
            request.write(json.dumps(value, indent=2, default=str).encode())
            request.finish()

        def failed(f):
            if f.check(InvalidUID):
                return answer(400, {"error": str(f.value)})
            return answer(500, {"error": f.getErrorMessage()[:500]})

        d.addCallback(lambda value: answer(200, value))
        d.addErrback(failed)
        return server.NOT_DONE_YET


def _body(value) -> bytes:
    return json.dumps(value, indent=2, default=str).encode()


def _arg(request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def site(cluster, bind: str | None = None, guard=None) -> server.Site:
    """The admin site; *bind*: the address it listens on (default: the config's), which
    decides what needs authentication; *guard*: its ``auth.Guard`` (default: one made
    from the config, plain HTTP, no CLI token)."""
    settings = getattr(cluster, "settings", None)
    if bind is None:
        bind = settings.admin.bind
    if guard is None:
        guard = auth.Guard(settings.admin if settings is not None else AdminSettings(), bind)
    root = resource.Resource()
    root.putChild(b"status", _Json(cluster.status))
    root.putChild(b"digest", _Json(cluster.digest))
    root.putChild(b"where", _Json(None, lambda req: cluster.where(
        study=_arg(req, b"study"), instance=_arg(req, b"instance"))))
    actions.install(root, cluster, guard)      # POST /delete, /scrub, POST and GET /drain
    monitoring.install(root, cluster)          # /metrics, /health
    pages = None
    if settings is not None:
        pages = console.Console(cluster, guard)
        root.putChild(b"console", pages)
        root.putChild(b"", gate.Answer(302, b"", b"text/plain",
                                       {b"location": b"/console/"}))
    return gate.AdminSite(root, guard, login_page=pages.login_page if pages else None)
