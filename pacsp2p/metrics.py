"""The peer's Prometheus metrics (``prometheus-client``), served as ``GET /metrics`` by
the admin endpoint.

Two kinds:

- **events**, counted where they happen (the facade's operations, when they send their
  final response): ``DIMSE_OPERATIONS`` by service and status, ``DIMSE_SECONDS``
  (latency histograms), ``INSTANCES`` and ``BYTES`` in and out, ``QUORUM_SECONDS``
  (a C-STORE's wait for its write quorum), ``ASSOCIATIONS`` (open now) and
  ``ASSOCIATIONS_TOTAL`` (by outcome);
- **state**, read at scrape time from one snapshot of the cluster's state (the
  ``status()`` dict of ``pacsp2p.cluster``, plus a few numbers the scrape measures
  itself) by ``StateCollector``: peers (probe round trip, state), archives (up, free space, read
  rate), the catalog's size, hinted hand-offs owed, under-replicated instances, scrub and repair
  progress, replication copies. Nothing in it asks anything: it turns a dict that the
  admin endpoint fetched (asynchronously, before rendering) into metric families.

A base module (no import of the cluster): the facade (a front end) and the admin web
both use it; every metric lives in ``REGISTRY``, this peer's own (not the library's
global one, so an embedding process or a test can hold several).
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "REGISTRY", "STATE", "StateCollector", "render",
           "status_class"]

disable_created_metrics()       # no *_created series: counters' start times are noise here
REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                   300, 600, 1800)

DIMSE_OPERATIONS = Counter(
    "pacsp2p_dimse_operations", "DIMSE operations answered by the facade, by service "
    "(C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET), final status class (success, warning, "
    "failure, cancel, refused) and status code (hex)", ["service", "status", "code"],
    registry=REGISTRY)
DIMSE_SECONDS = Histogram(
    "pacsp2p_dimse_operation_seconds", "Time from a DIMSE request's start to its final "
    "response, by service", ["service"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
INSTANCES = Counter(
    "pacsp2p_instances", "Instances the facade received (direction in: C-STORE) or "
    "sent (out: C-GET sub-operations, C-MOVE sub-operations completed)",
    ["direction", "service"], registry=REGISTRY)
BYTES = Counter(
    "pacsp2p_bytes", "Data set bytes the facade received (in) or sent (out)",
    ["direction", "service"], registry=REGISTRY)
QUORUM_SECONDS = Histogram(
    "pacsp2p_store_quorum_wait_seconds", "Time a C-STORE waits, once its data set is "
    "complete, for its write quorum of copies to be durable", buckets=LATENCY_BUCKETS,
    registry=REGISTRY)
ASSOCIATIONS = Gauge(
    "pacsp2p_associations_open", "DICOM associations established with the facade now",
    registry=REGISTRY)
ASSOCIATIONS_TOTAL = Counter(
    "pacsp2p_associations", "Associations with the facade by outcome (released, aborted, "
    "lost, rejected)", ["outcome"], registry=REGISTRY)
AUDIT_DROPPED = Counter(
    "pacsp2p_audit_records_dropped", "Audit records dropped because the audit writer "
    "fell behind (its queue was full) or could not write", registry=REGISTRY)


def status_class(status: int | None) -> str:
    """The class of a DIMSE status (PS3.7 annex C): success, pending, warning, cancel,
    refused (0x0124 Not Authorized, 0xA801 Move Destination unknown: the request was
    not one this requestor may make) or failure (everything else, Out of Resources
    included)."""
    if status is None:
        return "none"
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF or status == 0x0107 or \
            status == 0x0116:
        return "warning"
    if status in (0x0124, 0xA801):
        return "refused"
    return "failure"


def _g(name: str, doc: str, labels=(), value=None, rows=()):
    fam = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels:
        for lv, v in rows:
            if v is not None:
                fam.add_metric(list(lv), float(v))
    elif value is not None:
        fam.add_metric([], float(value))
    return fam


class StateCollector:
    """Metric families of one snapshot of the cluster's state (``snapshot``: the dict
    ``cluster.status()`` returns, plus ``_probe`` with what the scrape measured: the data
    directory's disk, the catalog's file). Set ``snapshot`` before each render."""

    PEER_STATES = ("self", "alive", "suspect", "dead")

    def __init__(self):
        self.snapshot: dict | None = None

    def describe(self):
        return []           # families vary with the snapshot: none declared up front

    def collect(self):
        s = self.snapshot
        if not s:
            return
        yield from self._catalog(s)
        yield from self._archives(s)
        yield from self._peers(s)
        yield from self._work(s)
        probe = s.get("_probe") or {}
        yield _g("pacsp2p_up", "1: this peer serves (facade listening, catalog opens)",
                 value=1 if probe.get("healthy", True) else 0)
        if probe.get("data_dir_free_bytes") is not None:
            yield _g("pacsp2p_data_dir_free_bytes", "Free bytes on the data directory's "
                     "file system (catalog, incoming data sets, audit log)",
                     value=probe["data_dir_free_bytes"])
            yield _g("pacsp2p_data_dir_size_bytes", "Size of the data directory's file "
                     "system", value=probe["data_dir_size_bytes"])
        if probe.get("catalog_bytes") is not None:
            yield _g("pacsp2p_catalog_file_bytes", "Bytes of catalog.sqlite (and its WAL)",
                     value=probe["catalog_bytes"])
        info = GaugeMetricFamily("pacsp2p_peer_info", "This peer: name, version, AE title",
                                 labels=["peer", "version", "ae_title"])
        info.add_metric([str(s.get("peer", "")), str(s.get("version", "")),
                         str((s.get("facade") or {}).get("ae_title", ""))], 1)
        yield info

    def _catalog(self, s):
        c = s.get("catalog") or {}
        fam = GaugeMetricFamily("pacsp2p_catalog_rows", "Catalog size: rows per level "
                                "(patients, studies, series, instances; locations: live "
                                "copies; conflicts)", labels=["table"])
        for table in ("patients", "studies", "series", "instances", "locations",
                      "conflicts"):
            if isinstance(c.get(table), int):
                fam.add_metric([table], c[table])
        yield fam
        yield _g("pacsp2p_hinted_handoffs_owed", "Copies owed to archives that were down "
                 "or failed (hinted hand-off)", value=c.get("hints", 0))
        integrity = str(c.get("integrity", "ok"))
        yield _g("pacsp2p_catalog_damaged", "1 if the catalog's integrity check found it "
                 "damaged", value=1 if integrity.startswith("damaged") else 0)

    def _archives(self, s):
        archives = s.get("archives") or {}
        rows = sorted(archives.items())
        yield _g("pacsp2p_archive_up", "1 if this peer's archive answers its health check",
                 ["archive"], rows=[((n,), 1 if h.get("up") else 0) for n, h in rows])
        yield _g("pacsp2p_archive_free_bytes", "Free space of this peer's archive",
                 ["archive"], rows=[((n,), h.get("free_bytes")) for n, h in rows])
        yield _g("pacsp2p_archive_size_bytes", "Size of the file system of this peer's "
                 "archive, where known", ["archive"],
                 rows=[((n,), h.get("total_bytes")) for n, h in rows])
        yield _g("pacsp2p_archive_latency_seconds", "Latency of the archive's last health "
                 "check", ["archive"],
                 rows=[((n,), h["latency_ms"] / 1000 if h.get("latency_ms") is not None
                        else None) for n, h in rows])
        rates = []
        for key, v in sorted((s.get("sources") or {}).items()):
            peer, _, archive = key.partition("/")
            rates.append(((peer, archive), (v.get("MB_per_s") or 0) * 1e6))
        yield _g("pacsp2p_source_fetch_bytes_per_second", "Read rate this peer measured "
                 "per source archive (peer/archive), latest weighted most",
                 ["peer", "archive"], rows=rates)
        crawls = s.get("crawls") or []
        yield _g("pacsp2p_crawl_instances", "Instances a crawl of an existing archive has "
                 "read so far", ["archive"],
                 rows=[((c.get("archive", ""),), c.get("done")) for c in crawls])
        yield _g("pacsp2p_crawl_total_instances", "Instances a crawl expects in all, where "
                 "the archive says", ["archive"],
                 rows=[((c.get("archive", ""),), c.get("total")) for c in crawls])

    def _peers(self, s):
        members = ((s.get("overlay") or {}).get("members")) or []
        rtt = [((m["name"],), m["rtt_ms"] / 1000 if m.get("rtt_ms") is not None else None)
               for m in members if m.get("state") != "self"]
        yield _g("pacsp2p_peer_rtt_seconds", "Round trip of the last direct probe of each "
                 "other peer answered (SWIM ping/ack)", ["peer"], rows=rtt)
        state = GaugeMetricFamily("pacsp2p_peer_state", "1 for each peer's current state "
                                  "(self, alive, suspect, dead)", labels=["peer", "state"])
        for m in members:
            for st in self.PEER_STATES:
                state.add_metric([m["name"], st], 1 if m.get("state") == st else 0)
        yield state
        if members:
            yield _g("pacsp2p_peers", "Peers of the cluster this peer knows (itself "
                     "included) by state", ["state"],
                     rows=[((st,), sum(1 for m in members if m.get("state") == st))
                           for st in self.PEER_STATES])

    def _work(self, s):
        copies = (s.get("ingest") or {}).get("copies") or {}
        fam = CounterMetricFamily("pacsp2p_replication_copies", "Copies of received "
                                  "instances made since start: local (this peer's "
                                  "archives), pushed (to other peers as they arrived), "
                                  "fetched (by other peers once complete)",
                                  labels=["kind"])
        for kind in ("local", "pushed", "fetched"):
            fam.add_metric([kind], copies.get(kind, 0))
        yield fam
        u = s.get("under_replicated") or {}
        yield _g("pacsp2p_under_replicated_instances", "Instances with fewer than "
                 "[cluster] replicas live copies (as last counted)", value=u.get("instances"))
        yield _g("pacsp2p_unavailable_instances", "Instances with no live copy at all (as "
                 "last counted)", value=u.get("unavailable"))
        if u.get("at"):
            yield _g("pacsp2p_under_replicated_counted_timestamp_seconds", "When the "
                     "under-replicated instances were last counted (Unix time)",
                     value=u["at"])
        r = s.get("repair") or {}
        yield _g("pacsp2p_repair_running", "1 while repair makes copies", value=1 if
                 r.get("state") not in (None, "idle") else 0)
        rep = CounterMetricFamily("pacsp2p_repair_copies", "Repair since start: copies "
                                  "made, surplus copies dropped, failures",
                                  labels=["outcome"])
        for key, outcome in (("done", "made"), ("dropped", "dropped"), ("failed", "failed")):
            rep.add_metric([outcome], r.get(key, 0) or 0)
        yield rep
        rb = CounterMetricFamily("pacsp2p_repair_bytes", "Bytes copied by repair since "
                                 "start")
        rb.add_metric([], r.get("bytes", 0) or 0)
        yield rb
        yield _g("pacsp2p_repair_remaining_instances", "Instances repair still has to copy",
                 value=r.get("remaining", 0))
        sc = s.get("scrub") or {}
        current = sc.get("pass") or {}
        yield _g("pacsp2p_scrub_running", "1 while a scrub pass re-hashes this peer's copies",
                 value=1 if current else 0)
        yield _g("pacsp2p_scrub_pass_checked_copies", "Copies checked by the running scrub "
                 "pass (of pacsp2p_scrub_pass_total_copies)", value=current.get("checked", 0))
        yield _g("pacsp2p_scrub_pass_total_copies", "Copies the running scrub pass has to "
                 "check", value=current.get("total", 0))
        sct = CounterMetricFamily("pacsp2p_scrub_copies", "Scrub since the catalog began: "
                                  "copies checked, damaged, missing, repaired, unrepaired",
                                  labels=["outcome"])
        totals = sc.get("totals") or {}
        for key in ("checked", "damaged", "missing", "repaired", "unrepaired"):
            sct.add_metric([key], totals.get(key, 0) or 0)
        yield sct
        d = s.get("deletions") or {}
        yield _g("pacsp2p_tombstones", "Instances deleted from the cluster (tombstones held)",
                 value=d.get("tombstones", 0))
        yield _g("pacsp2p_purge_pending_copies", "Copies of deleted instances this peer's "
                 "archives still have to remove", value=d.get("purge_pending", 0))
        retrievals = s.get("retrievals") or []
        yield _g("pacsp2p_retrievals_running", "Retrievals (C-MOVE, C-GET) not finished",
                 value=sum(1 for x in retrievals if x.get("done", 0) < x.get("instances", 0)))


STATE = StateCollector()
REGISTRY.register(STATE)


def render(snapshot: dict) -> bytes:
    """The text exposition of every metric, the state ones from *snapshot*. Called in the
    reactor: generating the text is CPU only (no I/O)."""
    STATE.snapshot = snapshot
    try:
        return generate_latest(REGISTRY)
    finally:
        STATE.snapshot = None
