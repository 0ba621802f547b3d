"""The peer's local status endpoint (twisted.web): ``GET /status`` -> JSON.

Bound to 127.0.0.1 by default; ``pacsp2p status`` and ``pacsp2p peers`` read it.
"""

from __future__ import annotations

import json

from twisted.web import resource, server


class _Json(resource.Resource):
    isLeaf = True

    def __init__(self, producer, with_request=None):
        super().__init__()
        self.producer = producer
        self.with_request = with_request

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        d = self.with_request(request) if self.with_request else self.producer()

        def done(value):
            request.write(json.dumps(value, indent=2, default=str).encode())
            request.finish()

        def failed(f):
            request.setResponseCode(500)
            request.write(json.dumps({"error": f.getErrorMessage()}).encode())
            request.finish()

        d.addCallbacks(done, failed)
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
