"""The peer's local status endpoint (twisted.web): ``GET /status`` -> JSON.

Bound to 127.0.0.1 by default; ``pacsp2p status`` and ``pacsp2p peers`` read it.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.web import resource, server

from pacsp2p.validate import InvalidUID


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


def _arg(request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def site(cluster) -> server.Site:
    root = resource.Resource()
    root.putChild(b"status", _Json(cluster.status))
    root.putChild(b"digest", _Json(cluster.digest))
    root.putChild(b"where", _Json(None, lambda req: cluster.where(
        study=_arg(req, b"study"), instance=_arg(req, b"instance"))))
    s = server.Site(root)
    s.noisy = False
    s.log = lambda request: None         # no access log lines for local status polls
    return s
