"""The peer's local status endpoint (twisted.web): ``GET /status`` -> JSON.

Bound to 127.0.0.1 by default; ``pacsp2p status`` and ``pacsp2p peers`` read it.
"""

from __future__ import annotations

import json

from twisted.web import resource, server


class _Json(resource.Resource):
    isLeaf = True

    def __init__(self, producer):
        super().__init__()
        self.producer = producer

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        d = self.producer()

        def done(value):
            request.write(json.dumps(value, indent=2, default=str).encode())
            request.finish()

        def failed(f):
            request.setResponseCode(500)
            request.write(json.dumps({"error": f.getErrorMessage()}).encode())
            request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


def site(cluster) -> server.Site:
    root = resource.Resource()
    root.putChild(b"status", _Json(cluster.status))
    root.putChild(b"digest", _Json(lambda: cluster.catalog.digest().addCallback(
        lambda d: {"digest": d, "vector": dict(cluster.catalog.vector)})))
    s = server.Site(root)
    s.noisy = False
    s.log = lambda request: None         # no access log lines for local status polls
    return s
