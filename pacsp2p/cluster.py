"""The cluster API: the one door for the facade, the admin web/CLI and any later front end.

Every verb hides where instances live (which archive, which peer); every verb is called
from the reactor thread and returns at once (a session) or a Deferred. Front ends import
this module and the value types (``pacsp2p.types``), nothing else of the core.

Verbs:

- ``receive(uid, sop_class, transfer_syntax, head, pause, resume) -> StoreSession`` —
  an instance arriving (``transfer.session`` documents the session's protocol);
- ``find(query, return_keys, limit=None, offset=0) -> Deferred[list[dict]]`` — one row
  per matching entity of the whole cluster (de-duplicated over every archive); with
  *limit*, one page in a stable order (studies newest first), for the console;
- ``matches(query, return_keys) -> Deferred[Matches]`` — every match of a C-FIND in
  bounded memory: ``len()`` of them, ``next_page()`` -> Deferred[list[dict]] ([] at the
  end; ``catalog.findpages``);
- ``move(query, destination, originator_ae=, originator_msg_id=) -> Deferred[Delivery]``
  — the instances *query* names, ready to be sent to *destination* (``config.Destination``);
  ``delivery.refs`` lists them, ``start()`` -> Deferred[final Progress], ``cancel()``,
  ``listeners`` get each ``Progress``;
- ``get(query) -> Deferred[Retrieval]`` — the instances, for a front end that sends them
  itself (C-GET): ``refs`` and ``open(ref) -> Deferred[file]``, the replica chosen and
  failed over by the cluster;
- ``where(study=, instance=) -> Deferred[list]`` — each instance and its replicas;
- ``uncommitted(refs) -> Deferred[{(class, instance): Failure Reason}]`` — of (SOP class, SOP
  instance) pairs, those the cluster cannot yet take responsibility for (storage
  commitment: not held, another class, fewer than the write quorum of readable copies);
- ``all_archives() -> Deferred[list[dict]]`` — every archive of the cluster this peer knows of: peer,
  name, site, adapter (this peer's own), up, instances held (as last counted);
- ``delete(scope, reason) -> Deferred[int]`` — remove every instance of *scope*
  (``types.Scope``: studies, series or instances by UID) from every replica on every
  archive, cluster-wide, for good: tombstones travel by anti-entropy, so a peer down now
  removes them when it returns and no copy path brings them back (``transfer.delete``);
  fires with the instances deleted once every peer alive has the tombstones (bounded
  wait). Sending an instance again afterwards stores it again. A Key Object Selection
  "rejection note" (IHE IOCM) that ``receive`` stores rejects what it references the
  same way. Raises ``transfer.delete.DeleteError`` (a ValueError) for a scope that is
  not one. ``status()["deletions"]``: tombstones held, copies still to remove here, and
  deleted instances an archive that cannot delete retains (hidden from the view);
- ``status() -> Deferred[dict]`` — this peer, its archives, the overlay, work running
  (``repair``: re-replication's progress; ``under_replicated``: instances with fewer than
  ``replicas`` live copies and with none, as last counted, with the time);
- ``digest() -> Deferred[dict]`` — the catalog's digest and version vector;
- ``health() -> Deferred[dict]`` — can this peer serve: ``healthy`` when every front end
  registered in ``serving`` (the facade: listening) says so and the catalog opens
  afresh; ``reasons`` otherwise; also the data directory's free space (``GET /health``,
  ``/metrics``).

``status()`` also says which strategies run (``strategies``) and the read rate this
peer measured per archive (``sources``, keyed ``peer/archive``); each retrieval lists
its sources (archives) with what each served.

Self-healing verbs (the life of an instance after it is stored):

- ``scrub(rate=None) -> Deferred[dict]`` — start one full pass now over this peer's
  archives: every copy re-hashed against the catalog's SHA-256, a damaged or missing one
  replaced from a good replica (``transfer.scrub``); *rate* MB/s (None: ``[cluster]
  scrub_rate``, 0: no limit); ``{"pass": id}``; its progress and, once done, its summary
  are ``status()["scrub"]`` (``pass``, ``last``). A background pass runs every
  ``scrub_interval``; retrievals never serve a damaged copy (``transfer.verify``);
- ``drain(peer=None, archive=None, stop=False) -> Deferred[dict]`` — move every copy off
  *archive* of *peer* (default: this peer; no archive: all of the peer's) to archives
  placement chooses, and send nothing new there; asked of that peer over the overlay
  (``transfer.drain``). Raises ``DrainError`` (a ValueError) for an unknown or dead peer
  or an unknown archive; ``stop`` ends a drain;
- ``drain_progress(peer=None, archive=None) -> Deferred[dict]`` — the copies this
  peer's catalog still places there (``remaining``) and the state the draining peer
  advertises per archive (``states``: draining, blocked, drained = safe to remove).
"""

from __future__ import annotations

import collections
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from pacsp2p import __version__, threads
from pacsp2p.catalog import findpages, versions
from pacsp2p.catalog.schema import SCHEMA_VERSION
from pacsp2p.health import probe
from pacsp2p.overlay.commands import PROTOCOL
from pacsp2p.dicom.rejection import KOS_SOP_CLASS
from pacsp2p.transfer.delete import DeleteError, Deleter, RejectionSession
from pacsp2p.transfer.deliver import Delivery
from pacsp2p.transfer.direct import make_delivery
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.transfer.recheck import Recheck
from pacsp2p.transfer.drain import Drain, DrainError
from pacsp2p.transfer.repair import Repair
from pacsp2p.transfer.scrub import Scrub
from pacsp2p.transfer.retrieve import Retrieval, readable
from pacsp2p.transfer.session import StoreSession
from pacsp2p.types import Query, Scope
from pacsp2p.validate import check_uid

HEALTH_WAIT = 5.0       # seconds status() waits for an archive's health check


def _reactor():
    from twisted.internet import reactor
    return reactor


__all__ = ["Cluster", "DeleteError", "DrainError", "Delivery", "Retrieval", "Scope", "StoreSession"]


class Cluster:
    def __init__(self, settings, catalog, archives, strategies, overlay=None, reactor=None,
                 crawlers=()):
        self.settings = settings
        self.catalog = catalog
        self.archives = {a.name: a for a in archives}
        self.strategies = strategies
        self.overlay = overlay
        self.reactor = reactor
        self.crawlers = list(crawlers)
        self.retrievals = collections.deque(maxlen=20)    # the latest, for status
        self._purposes: dict[int, str] = {}     # retrieval id -> "C-MOVE to X", "C-GET"
        self._counted: tuple[float, dict] = (0.0, {})     # archives(): when, counts
        # front ends that serve: name -> callable() giving why it does not ("" if it does)
        self.serving: dict = {}
        self.ingest = Ingest(settings, self.archives, catalog, strategies, overlay, reactor)
        self.deleter = Deleter(settings, catalog, self.archives, overlay, reactor)
        self.scrubber = Scrub(settings, catalog, self.archives, strategies, overlay, reactor)
        self.repair = Repair(settings, catalog, self.archives, strategies, self.ingest,
                             overlay, reactor, self.scrubber)
        self.recheck = Recheck(settings.peer.name, catalog, self.archives, self.scrubber,
                               self.repair, overlay, strategies, reactor)
        self.scrubber.on_unrestorable = self.recheck.unrestorable    # a DIMSE archive's
        self.drainer = Drain(settings, catalog, self.archives, strategies, self.ingest,
                             self.repair, overlay, reactor, self.scrubber)
        services = getattr(getattr(overlay, "membership", None), "services", None)
        if services is not None:            # the overlay's requests: Drain, CheckCopy
            services.drainer, services.scrubber = self.drainer, self.scrubber

    # -- store -----------------------------------------------------------------------------
    def receive(self, uid: str, sop_class: str, transfer_syntax: str, head: bytes,
                pause, resume) -> StoreSession:
        """A StoreSession for an instance whose data set starts arriving (raises
        ``validate.InvalidUID`` for a UID that is not one)."""
        check_uid(uid, "SOP Instance UID")
        check_uid(sop_class, "SOP Class UID")
        session = self.ingest.begin(uid, sop_class, transfer_syntax, head, pause, resume)
        if sop_class == KOS_SOP_CLASS:                 # maybe an IOCM rejection note
            session = RejectionSession(session, self.deleter)
        return session

    # -- scrub and drain --------------------------------------------------------------------
    def scrub(self, rate: float | None = None):
        """Deferred[dict]: one full scrub pass started now (see above)."""
        return self.scrubber.run(rate)

    def drain(self, peer: str | None = None, archive: str | None = None,
              stop: bool = False):
        """Deferred[dict]: a drain asked of *peer* (see above)."""
        return self.drainer.request(peer, archive, stop)

    def drain_progress(self, peer: str | None = None, archive: str | None = None):
        """Deferred[dict]: how far a drain is, as this peer sees it (see above)."""
        return self.drainer.progress(peer, archive)

    # -- delete ------------------------------------------------------------------------------
    def delete(self, scope: Scope, reason: str):
        """Deferred[int]: the instances of *scope* deleted cluster-wide (see above)."""
        return self.deleter.delete(scope, reason)

    # -- query and retrieve ------------------------------------------------------------------
    def find(self, query: Query, return_keys, limit: int | None = None, offset: int = 0):
        """Deferred[list of {keyword: value}], one per matching entity (a page of at most
        *limit* from *offset*, in a stable order, when *limit* is given)."""
        if limit is None:
            return self.catalog.find(query, return_keys)
        return self.catalog.find(query, return_keys, limit=limit, offset=offset)

    def matches(self, query: Query, return_keys):
        """Deferred[Matches]: every match, a page of rows at a time (see above)."""
        return findpages.matches(self.catalog, query, return_keys)

    @defer.inlineCallbacks
    def _retrieval(self, query: Query, purpose: str = "C-GET", limit: int | None = None):
        refs = yield self.catalog.resolve(query, limit, current=True)   # (no other version)
        retrieval = Retrieval(refs, self.archives, self.settings.peer.name, self.overlay,
                              self.strategies, self.reactor)
        self.retrievals.append(retrieval)
        retrieval.on_damaged = self.scrubber.suspect     # a damaged copy: replace it
        self._purposes[retrieval.id] = purpose
        for old in set(self._purposes) - {r.id for r in self.retrievals}:
            del self._purposes[old]
        return retrieval

    def get(self, query: Query, limit: int | None = None):
        """Deferred[Retrieval] of the instances *query* names (``types.TooMany`` if more
        than *limit*)."""
        return self._retrieval(query, limit=limit)

    @defer.inlineCallbacks
    def move(self, query: Query, destination, originator_ae: str | None = None,
             originator_msg_id: int | None = None, limit: int | None = None):
        """Deferred[Delivery] (not started) of the instances *query* names to
        *destination*, relayed or sent direct as its ``mode`` says (``types.TooMany``
        if more than *limit*)."""
        retrieval = yield self._retrieval(query, f"C-MOVE to {destination.ae_title}", limit)
        return make_delivery(retrieval, destination, self.settings.facade.ae_title,
                             self.reactor, originator_ae=originator_ae,
                             originator_msg_id=originator_msg_id)

    # -- storage commitment -----------------------------------------------------------------
    @defer.inlineCallbacks
    def uncommitted(self, refs):
        """Deferred[{(SOP class, SOP instance): Failure Reason}] of the *refs* (valid UIDs)
        the cluster does not yet take responsibility for: 0x0112 not held, 0x0119 held
        as another SOP class, 0x0110 held with fewer than ``write_quorum`` copies this
        peer sees readable (the promise a C-STORE Success makes). The others are
        committed (storage commitment, PS3.4 J.3)."""
        uids = list(dict.fromkeys(inst for _, inst in refs))
        held = yield self.catalog.read(
            lambda conn: self.catalog.refs_of(conn, uids, True))
        by_uid = {r.sop_instance_uid: r for r in held}
        me, quorum = self.settings.peer.name, self.settings.cluster.write_quorum
        out = {}
        for cls, inst in refs:
            ref = by_uid.get(inst)
            if ref is None:
                out[cls, inst] = 0x0112
            elif ref.sop_class_uid != cls:
                out[cls, inst] = 0x0119
            elif sum(readable(loc, me, self.archives, self.overlay)
                     for loc in ref.locations) < quorum:
                out[cls, inst] = 0x0110
        return out

    # -- where things are ------------------------------------------------------------------
    @defer.inlineCallbacks
    def where(self, study: str | None = None, instance: str | None = None):
        """Each instance of a study (or one instance) with its replicas and availability
        (raises ``validate.InvalidUID`` for a UID that is not one)."""
        named = study is not None
        check_uid((study if named else instance) or "", "study" if named else "instance")
        query = (Query("STUDY", {"StudyInstanceUID": study}) if named else
                 Query("IMAGE", {"SOPInstanceUID": instance or ""}))
        refs = yield self.catalog.resolve(query)
        current = yield self.catalog.versions([r.sop_instance_uid for r in refs])
        me = self.settings.peer.name
        return [{"instance": r.sop_instance_uid,
                 "replicas": [{"peer": loc.peer, "archive": loc.archive,
                               "available": readable(loc, me, self.archives, self.overlay),
                               "version": "current" if loc.sha256 in current.get(
                                   r.sop_instance_uid, (loc.sha256,)) else "other"}
                              for loc in r.locations]}
                for r in refs]

    @defer.inlineCallbacks
    def all_archives(self):
        """Every archive of the cluster this peer knows of (see the module docstring);
        instance counts as placement last counted them (a peer alone: counted again when
        older than 30 s)."""
        counts = self.ingest.counts
        if self.overlay is None:
            now = time.monotonic()
            at, counts = self._counted
            if not at or now - at > 30.0:
                counts = yield self.catalog.archive_counts()
                self._counted = (now, counts)
        me = self.settings.peer.name
        adapters = {a.name: a.adapter for a in self.settings.archives}
        out = [{"peer": me, "archive": name, "site": getattr(a, "site", None),
                "up": bool(getattr(a, "up", True)), "local": True,
                "adapter": adapters.get(name), "instances": counts.get((me, name), 0)}
               for name, a in self.archives.items()]
        out += [{"peer": a.peer, "archive": a.name, "site": a.site, "up": a.alive,
                 "local": False, "adapter": None, "instances": counts.get((a.peer, a.name))}
                for a in self.ingest.candidates(draining=True) if not a.local]
        return out

    @defer.inlineCallbacks
    def digest(self):
        """The catalog's digest and version vector (what anti-entropy compares)."""
        d = yield self.catalog.digest()
        return {"digest": d, "vector": dict(self.catalog.vector)}

    @defer.inlineCallbacks
    def health(self):
        """Can this peer serve (see the module docstring)? Never raises."""
        reasons = []
        for name, why_not in sorted(self.serving.items()):
            try:
                why = why_not()
            except Exception as e:
                why = f"{name}: {e}"
            if why:
                reasons.append(why)
        pool = threads.pool(self.reactor, "probe", 1, 1)
        try:
            probed = yield deferToThreadPool(self.reactor, pool, probe,
                                             self.catalog.path, self.settings.data_dir)
        except Exception as e:
            probed = {"reasons": [f"the health probe failed: {e}"]}
        reasons += probed.pop("reasons")
        return {"healthy": not reasons, "reasons": reasons, **probed}

    @defer.inlineCallbacks
    def status(self, cached: bool = False):
        """This peer's state (see the module docstring); *cached*: the archives' health
        as the peer's health loop last saw it (every 5 s) instead of asking each archive
        now — what ``/metrics`` wants: fast even while an archive hangs."""
        counts = yield self.catalog.counts()
        counts["versions"] = yield self.catalog.read(versions.count)   # (a small table)
        archives, asked = {}, {}
        for name, archive in self.archives.items():
            seen = getattr(archive, "last_health", None) if cached else None
            if seen is not None:
                archives[name] = dict(seen)
            else:       # all at once, each bounded: a hung archive (frozen, its disk
                        # stalled) is shown not answering, not waited for (30 s each)
                archives[name] = None                   # (in the config's order)
                asked[name] = defer.maybeDeferred(archive.health).addTimeout(
                    HEALTH_WAIT, self.reactor or _reactor())
        for name, d in asked.items():
            try:
                archives[name] = yield d
            except defer.TimeoutError:
                archives[name] = {"up": False, "error": "its health check did not answer "
                                                        f"within {HEALTH_WAIT:.0f} s"}
            except Exception as e:
                archives[name] = {"up": False, "error": str(e)}
            archives[name]["max_fetches"] = getattr(self.archives[name], "max_fetches", None)
        status = {"peer": self.settings.peer.name, "version": __version__,
                  "catalog_schema": SCHEMA_VERSION, "overlay_protocol": PROTOCOL,
                  "facade": {"ae_title": self.settings.facade.ae_title,
                             "port": self.settings.facade.port},
                  "catalog": {**counts, "integrity": self.catalog.integrity.state},
                  "archives": archives}
        if self.overlay is not None:
            status["overlay"] = self.overlay.status()
        status["ingest"] = {"copies": dict(self.ingest.copies),
                            "recorded_in_thread": self.ingest.recorded_in_thread,
                            "commits_behind": self.ingest.commits_behind,
                            "durable_in_thread": self.ingest.durable_in_thread,
                            "first_copy": {"mode": self.ingest.first_copy,
                                           "slack": self.ingest.slack, **self.ingest.first}}
        status["retrievals"] = [{**r.status(), "for": self._purposes.get(r.id, "")}
                                for r in self.retrievals if r.started]
        status["strategies"] = self.strategies.describe()
        # what this peer's reads measured per archive (peer/archive), latest weighted most
        status["sources"] = {f"{peer}/{archive}": {"MB_per_s": round(rate / 1e6, 2)}
                             for (peer, archive), rate in sorted(self.strategies.rates.items())}
        status["crawls"] = [c.status() for c in self.crawlers]
        status["deletions"] = yield self.deleter.status()
        status["repair"] = self.repair.status()
        status["under_replicated"] = self.repair.under_replicated()
        status["scrub"] = self.scrubber.status()
        status["drain"] = self.drainer.status()
        return status
