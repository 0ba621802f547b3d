"""The admin endpoint's front gate: every request passes here before any resource.

``AdminSite`` (a twisted.web ``Site``) checks the ``Host`` header of a loopback-bound
endpoint (DNS rebinding), finds out who is asking (``auth.Guard.identify``: the CLI's
token, a client certificate, a console session, HTTP Basic), puts that on the request
(``request.admin_identity``, None for nobody) and then serves the resource — or, where
reading needs authentication (an endpoint bound to a non-loopback address), answers
401: the console's login page for console paths, JSON with ``WWW-Authenticate: Basic``
for the JSON API. The login form and the console's stylesheet are served to anyone.

``DeadlineChannel`` gives a request ``REQUEST_TIMEOUT`` seconds from its first byte to
the end of its body, then closes the connection: the idle timeout alone is reset by every
byte, so a client dripping a header line a minute held a connection slot for ever (all
``endpoint.MAX_CONNECTIONS`` of them: a "slowloris").

``BoundedRequest`` caps a request body at ``MAX_BODY``: a ``Content-Length`` past it is
answered 413 at once, before any of the body is read, a chunked body as soon as it
passes it; the connection is then half-closed and what still comes is dropped, at most
``LINGER`` bytes of it (so that a client sending its whole body first still reads the
answer), then the connection is closed. It adds the headers every answer carries: no
caching (the console shows patient data), no sniffing, no framing, no referrer to other
sites, and a content security policy without scripts.
"""

from __future__ import annotations

import copy
import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server, util

from pacsp2p.admin import auth
from pacsp2p.validate import shown

log = Logger()

MAX_BODY = 1 << 20            # bytes of a request body at most
LINGER = 16 << 20             # bytes dropped after a refusal before the connection is closed
IDLE_TIMEOUT = 60             # seconds a connection may sit idle
REQUEST_TIMEOUT = 60          # seconds from a request's first byte to the end of its body
PUBLIC = ([b"console", b"login"], [b"console", b"static"])   # served without a login
SECURITY_HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",     # (no-referrer would make Origin "null")
    b"content-security-policy": b"default-src 'none'; style-src 'self'; img-src 'self'; "
                                b"form-action 'self'; frame-ancestors 'none'; "
                                b"base-uri 'none'",
}


class BoundedRequest(server.Request):
    """A request whose body is at most ``MAX_BODY`` bytes (see the module docstring)."""

    max_body = MAX_BODY
    admin_identity = None
    _body_seen = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._too_large()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self._too_large()
        elif not self.channel.refused:
            super().handleContentChunk(data)

    def _too_large(self):
        if not self.channel.refused:
            self.channel.refuse(b"413 Payload Too Large",
                                f"a request body is at most {self.max_body} bytes")

    def process(self):
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        super().process()


class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel whose requests must arrive whole within ``REQUEST_TIMEOUT``;
    ``answering``: requests received whole and not answered yet (the endpoint's cap
    closes a connection that has none to make room: ``endpoint.Capped``)."""

    request_timeout = REQUEST_TIMEOUT
    linger = LINGER
    _deadline = None
    answering = 0
    refused = False                # answered already (413, 414): the rest is dropped
    _dropped = 0

    def dataReceived(self, data):
        if self.refused:
            self._drop(data)
            return
        if self._deadline is None and data:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if self.refused:               # the rest of the read that was refused
            self._drop(data)
        else:
            super().rawDataReceived(data)

    def _drop(self, data):
        self._dropped += len(data)
        if self._dropped > self.linger:
            self.transport.abortConnection()

    def lineLengthExceeded(self, line):
        """A request line or header line past ``MAX_LENGTH`` (16 KB: a console search
        of 1 MB in its address): 414 with one JSON line (``refuse``); before, twisted
        closed the connection with no answer at all (a browser's empty page)."""
        self.refuse(b"414 URI Too Long",
                    f"a request line or header over {self.MAX_LENGTH} bytes")

    def refuse(self, status: bytes, message: str):
        """Answer *status* with *message* (one JSON line) at once, whatever of the request
        has not arrived yet, then close our side while the rest is read and dropped (up
        to ``linger`` bytes, until the client closes, or ``_too_slow``), so that the
        client reads the answer instead of a reset."""
        self.refused = True
        body = json.dumps({"error": message}).encode()
        head = b"".join(b"%s: %s\r\n" % kv for kv in SECURITY_HEADERS.items())
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
                             % (status, len(body), head, body))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:                          # (TLS: no half-close) closed once written
            self.transport.loseConnection()

    def _send100Continue(self):
        if not self.refused:           # (asked with a Content-Length refused already)
            super()._send100Continue()

    def allContentReceived(self):
        if self.refused:               # (a body refused and ended in the same read)
            return
        self._stop_deadline()
        self.answering += 1            # first: the answer may be done before super returns
        super().allContentReceived()

    def requestDone(self, request):
        self.answering = max(0, self.answering - 1)
        super().requestDone(request)

    def connectionLost(self, reason):
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self):
        self._deadline = None
        peer = self.transport.getPeer()
        log.warn("admin: a request from {host} not whole after {s} s: closing",
                 host=getattr(peer, "host", "?"), s=self.request_timeout)
        self.transport.abortConnection()


class Answer(resource.Resource):
    """A fixed answer: *code*, *body* (bytes), *ctype*, extra *headers*."""

    isLeaf = True

    def __init__(self, code: int, body: bytes, ctype: bytes = b"application/json",
                 headers: dict | None = None):
        super().__init__()
        self.code, self.body, self.ctype, self.headers = code, body, ctype, headers or {}

    def render(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.ctype)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return b"" if request.method == b"HEAD" else self.body


def json_answer(code: int, message: str, headers: dict | None = None) -> Answer:
    return Answer(code, json.dumps({"error": message}).encode(), headers=headers)


class AdminSite(server.Site):
    """The admin endpoint's site (see the module docstring). *login_page*:
    callable(request, code, message) -> resource, the console's answer to a browser
    that must log in first."""

    requestFactory = BoundedRequest
    protocol = DeadlineChannel
    noisy = False

    def __init__(self, root, guard: auth.Guard, login_page=None):
        super().__init__(root, timeout=IDLE_TIMEOUT)
        self.guard = guard
        self.login_page = login_page

    def log(self, request):
        """No access log lines (the CLI polls /status); refusals are logged where made."""

    def getResourceFor(self, request):
        request.site = self
        request.sitepath = copy.copy(request.prepath)
        guard = self.guard
        if not guard.host_ok(request):
            return json_answer(403, "this admin endpoint answers to a loopback address or "
                                    "localhost only (Host header)")
        path = list(request.postpath)
        d = guard.identify(request)

        def decide(identity):
            request.admin_identity = identity
            if identity is None and not guard.open_reads and \
                    not any(path[:len(p)] == p for p in PUBLIC):
                return self.unauthenticated(request, path)
            return self.resource

        def busy(f):
            f.trap(auth.Busy)
            return json_answer(f.value.code, str(f.value))

        def broken(f):
            log.failure("admin: authentication failed", f)
            return json_answer(500, "authentication failed")
        d.addCallback(decide)
        d.addErrback(busy)
        d.addErrback(broken)
        return util.DeferredResource(d)

    def unauthenticated(self, request, path):
        if request.method not in (b"GET", b"HEAD"):
            self.note_refusal(request)
        if (not path or path[0] in (b"", b"console")) and self.login_page is not None:
            return self.login_page(request, 401, "")
        headers = {}
        if self.guard.admin.users:
            headers[b"www-authenticate"] = b'Basic realm="pacsp2p admin", charset="UTF-8"'
        else:      # a 401 names a scheme: here a client certificate of tls_client_ca
            headers[b"www-authenticate"] = b'TLS-client-certificate realm="pacsp2p admin"'
        return json_answer(401, "authentication required: a user of [admin] users (HTTP "
                                "Basic) or a client certificate", headers)


    def note_refusal(self, request) -> None:
        """The line for a write action refused for want of authentication."""
        self.guard.refusal("admin: {method} {path} from {client} refused: authentication "
                           "required", method=request.method.decode("latin-1")[:10],
                           path=shown(request.path.decode("latin-1"), 80),
                           client=auth.client_host(request))


def identity(request) -> auth.Identity | None:
    return getattr(request, "admin_identity", None)


def deferred_answer(request, produce):
    """Render *produce()* -> Deferred[(code, ctype, body bytes, headers)] on *request*,
    never writing to a client that left; returns NOT_DONE_YET."""
    gone = []
    request.notifyFinish().addErrback(gone.append)

    def write(result):
        if gone:
            return
        code, ctype, body, headers = result
        request.setResponseCode(code)
        request.setHeader(b"content-type", ctype)
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def failed(f):
        log.failure("admin: {path} failed", f, path=request.path[:200])
        write((500, b"text/plain; charset=utf-8",
               f"error: {f.getErrorMessage()[:300]}".encode(), None))
    defer.maybeDeferred(produce).addCallbacks(write, failed)
    return server.NOT_DONE_YET
