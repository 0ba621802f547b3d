"""``GET /metrics`` (Prometheus text format) and ``GET /health`` of the admin endpoint.

``/metrics``: the counters and histograms the facade keeps (``pacsp2p.metrics``) and the
cluster's state as metric families, from one ``cluster.status()`` and one
``cluster.health()`` fetched (asynchronously) per scrape and rendered by
``prometheus_client`` in the reactor (CPU only). docs/operations.md lists them.

``/health``: 200 ``ok`` when the facade listens and the catalog opens (a fresh
read-only connection, in a thread), else 503 with the reasons, one per line — what a
load balancer or an orchestrator's probe wants. Both go through the cluster API only.

Also the audit record of an admin action (``admin_action``): who asked (the HTTP
client's address; the user, when the endpoint authenticates), what, and the outcome.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from pacsp2p import audit, metrics

log = Logger()

EVENT_FOR = {"delete": (audit.EVENT_STUDY_DELETED, "D")}


class _Async(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.maybeDeferred(self.produce)

        def answer(result):
            code, ctype, body = result
            if not gone:
                request.setResponseCode(code)
                request.setHeader(b"content-type", ctype)
                request.setHeader(b"cache-control", b"no-store")
                request.write(body)
                request.finish()

        def failed(f):
            log.failure("admin: {path} failed", f, path=request.path.decode("latin-1"))
            return (500, b"text/plain; charset=utf-8",
                    f"error: {f.getErrorMessage()[:300]}\n".encode())
        d.addErrback(failed)
        d.addCallback(answer)
        return server.NOT_DONE_YET

    def produce(self):
        raise NotImplementedError


class Metrics(_Async):
    def __init__(self, cluster):
        super().__init__()
        self.cluster = cluster

    @defer.inlineCallbacks
    def produce(self):
        status, health = yield defer.gatherResults(
            [defer.maybeDeferred(self.cluster.status, cached=True),
             defer.maybeDeferred(self.cluster.health)], consumeErrors=True)
        snapshot = dict(status)
        snapshot["_probe"] = health
        return 200, metrics.CONTENT_TYPE_LATEST.encode(), metrics.render(snapshot)


class Health(_Async):
    def __init__(self, cluster):
        super().__init__()
        self.cluster = cluster

    @defer.inlineCallbacks
    def produce(self):
        h = yield self.cluster.health()
        if h["healthy"]:
            return 200, b"text/plain; charset=utf-8", b"ok\n"
        return (503, b"text/plain; charset=utf-8",
                ("\n".join(h["reasons"]) + "\n").encode("utf-8", "replace"))


def install(root: resource.Resource, cluster) -> None:
    """Add ``/metrics`` and ``/health`` to the admin site's *root*."""
    root.putChild(b"metrics", Metrics(cluster))
    root.putChild(b"health", Health(cluster))


def admin_action(cluster, action: str, client: str | None, user: str | None = None,
                 outcome: int = audit.SUCCESS, description: str = "",
                 level: str | None = None, uids=(), result=None) -> None:
    """One audit record of an admin action (delete; drain, scrub when they exist):
    the requestor (user or address), this peer, the studies/series/instances concerned."""
    event, verb = EVENT_FOR.get(action, (audit.EVENT_APPLICATION_ACTIVITY, "E"))
    settings = getattr(cluster, "settings", None)
    peer = settings.peer.name if settings is not None else "pacsp2p"
    objects = []
    for uid in list(uids)[:1000]:
        if level == "STUDY":
            objects.append(audit.study(uid))
        else:                     # no DCM code for these: the attribute's keyword
            kw = "SeriesInstanceUID" if level == "SERIES" else "SOPInstanceUID"
            objects.append({"ParticipantObjectID": uid, "ParticipantObjectTypeCode": 2,
                            "ParticipantObjectTypeCodeRole": 3,
                            "ParticipantObjectIDTypeCode": audit.code(kw, kw,
                                                                      "DICOM keyword")})
    audit.emit(audit.message(
        event, verb, outcome,
        [audit.participant(user or client or "?", True, None, client),
         audit.participant(peer, False, audit.ROLE_APPLICATION)], peer, objects,
        description=description,
        extension={"kind": "admin", "action": action, "level": level,
                   "client": client, "user": user, "result": result}))
