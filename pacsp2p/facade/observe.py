"""What the facade tells the audit trail and the metrics (issue 16): one audit record per
association, per refused association and per DIMSE operation — a summary when it ends,
never one per sub-operation — and the counters and histograms of ``pacsp2p.metrics``.

``Observer`` is the acceptor's ``observer`` (``dicom.acceptor``: ``established``,
``rejected``, ``ended``) and the services' (``facade.services``: ``finished``, called
from ``Operation.finish`` with the final status). The record formats are
``pacsp2p.audit``'s (PS3.15 A.5 names):

- an association (written when it ends): User Authentication (110114), EventTypeCode
  Login (110122); the calling AE (requestor, its address) and the called AE (this
  facade); ``pacsp2p``: how it ended, how long it lasted, its operations per service;
- a refused association: the same event with outcome 8 (serious failure) and why
  (unknown calling AE, wrong called AE, host or certificate not the declared one, ...);
- C-STORE: DICOM Instances Transferred (110104), action C (created here); the calling
  AE as Source, this facade as Destination; the patient and the study, with the SOP
  class and one instance;
- C-FIND: Query (110112), action E; the query object (the SOP class, the identifier in
  base64, its transfer syntax) and the patient / studies the identifier names;
- C-MOVE: DICOM Instances Transferred, action R (read here); the requestor (no role),
  this facade as Source, the Move Destination as Destination (its address); the patient
  and the studies (looked up in the catalog when the identifier names only the patient
  or only the studies), the sub-operation counts;
- C-GET: as C-MOVE, the requestor being the Destination;
- C-ECHO: Application Activity (110100), action E;
- a request refused 0x0124 (no right to it): the service's event, outcome 8,
  EventTypeCode Use of Restricted Function (110129).
"""

from __future__ import annotations

import base64
import itertools
import time

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p import audit, metrics
from pacsp2p.dicom import dimse
from pacsp2p.types import Query

log = Logger()

SERVICES = {dimse.C_ECHO_RSP: "C-ECHO", dimse.C_STORE_RSP: "C-STORE",
            dimse.C_FIND_RSP: "C-FIND", dimse.C_MOVE_RSP: "C-MOVE",
            dimse.C_GET_RSP: "C-GET", dimse.N_ACTION_RSP: "N-ACTION"}
LOOKUP_LIMIT = 1000            # studies listed in one record at most
EVENT_USER_AUTHENTICATION = audit.code("110114", "User Authentication")
TYPE_LOGIN = audit.code("110122", "Login")


def _host(assoc) -> str:
    return getattr(assoc, "host", "") or str(getattr(assoc, "peer", "")).rsplit(":", 1)[0]


def _concrete(value: str | None) -> list[str]:
    """The values of a key that names things (no wildcard, not empty)."""
    if not value or "*" in value or "?" in value:
        return []
    return [v for v in value.split("\\") if v]


class Observer:
    """Audit records and metrics of the facade's associations and operations."""

    def __init__(self, settings, cluster, reactor):
        self.peer = settings.peer.name
        self.ae_title = settings.facade.ae_title
        self.address = settings.facade.bind
        self.cluster = cluster
        self.reactor = reactor
        self._ids = itertools.count(1)
        self._children: dict = {}     # (metric, labels) -> its child: no .labels() per call

    def _child(self, metric, *labels):
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the acceptor's observer ------------------------------------------------------
    def _requestor(self, assoc, role=None) -> dict:
        return _requestor(assoc.calling_ae, _host(assoc),
                          getattr(assoc, "peer_certificate", None), role)

    def _us(self, requestor: bool = False, role=None) -> dict:
        return _us(self.ae_title, self.address, self.peer, requestor, role)

    def _assoc_ext(self, assoc) -> dict:
        return {"calling_ae": assoc.calling_ae, "called_ae": assoc.called_ae,
                "peer": assoc.peer, "tls": bool(getattr(assoc, "tls", False)),
                **({"certificate": assoc.peer_certificate}
                   if getattr(assoc, "peer_certificate", None) else {})}

    def established(self, assoc) -> None:
        metrics.ASSOCIATIONS.inc()
        assoc.audit_id = f"{self.peer}-{next(self._ids)}"
        assoc.audit_ops = {}

    def rejected(self, assoc, why: str, result=None, source=None, reason=None) -> None:
        metrics.ASSOCIATIONS_TOTAL.labels("rejected").inc()
        audit.emit(audit.message(
            EVENT_USER_AUTHENTICATION, "E", audit.SERIOUS_FAILURE,
            [self._requestor(assoc), self._us()], self.peer,
            objects=[audit.node_object(assoc.peer, why)],
            event_types=[TYPE_LOGIN], description=f"association rejected: {why}",
            extension={"kind": "association", "outcome": "rejected", **self._assoc_ext(assoc),
                       "reject": {"result": result, "source": source, "reason": reason}}))

    def ended(self, assoc, how: str, why: str) -> None:
        metrics.ASSOCIATIONS.dec()
        metrics.ASSOCIATIONS_TOTAL.labels(how).inc()
        t0 = assoc.established_at
        ops = getattr(assoc, "audit_ops", {})
        audit.emit(audit.message(
            EVENT_USER_AUTHENTICATION, "E",
            audit.SUCCESS if how == "released" else audit.MINOR_FAILURE,
            [self._requestor(assoc), self._us()], self.peer, event_types=[TYPE_LOGIN],
            description="" if how == "released" else why,
            extension={"kind": "association", "id": getattr(assoc, "audit_id", None),
                       "outcome": how, **self._assoc_ext(assoc),
                       "duration_s": round(self.reactor.seconds() - t0, 3)
                       if t0 is not None else None,
                       "operations": dict(sorted(ops.items()))}))

    # -- the services' observer ---------------------------------------------------------
    def finished(self, op, status: int, counts=None, comment: str = "") -> None:
        """*op* sent its final response with *status* (and *counts*)."""
        service = SERVICES.get(op.RSP, f"0x{op.RSP:04x}")
        cls = metrics.status_class(status) if status is not None else "lost"
        code = f"0x{status:04X}" if status is not None else "none"
        self._child(metrics.DIMSE_OPERATIONS, service, cls, code).inc()
        arrived = getattr(op, "arrived", None)
        elapsed = self.reactor.seconds() - arrived if arrived is not None else None
        if elapsed is not None:
            self._child(metrics.DIMSE_SECONDS, service).observe(max(0.0, elapsed))
        ops = getattr(op.assoc, "audit_ops", None)
        if ops is not None:
            ops[service] = ops.get(service, 0) + 1
        self._count_data(op, service, status, counts)
        if service == "C-STORE":
            try:
                self._store_record(op, status, code, cls, elapsed, comment, counts)
            except Exception:
                log.failure("audit record of a {service} failed", service=service)
            return
        ext = _operation_ext(service, getattr(op.assoc, "audit_id", None), op.msg_id,
                             status, code, cls, op.assoc.calling_ae, op.assoc.called_ae,
                             op.assoc.peer, elapsed, comment, counts)
        try:
            d = self._record(op, service, status, ext)
        except Exception:
            log.failure("audit record of a {service} failed", service=service)
            return
        if isinstance(d, defer.Deferred):
            d.addErrback(lambda f: log.failure("audit record of a {service} failed", f,
                                               service=service))

    def _count_data(self, op, service: str, status: int, counts) -> None:
        if service == "C-STORE" and status == 0 and getattr(op, "meta", None) is not None:
            self._child(metrics.INSTANCES, "in", service).inc()
            self._child(metrics.BYTES, "in", service).inc(op.meta.data_size or op.meta.size)
        elif service in ("C-GET", "C-MOVE") and counts is not None:
            sent = (counts[1] or 0) + (counts[3] or 0)
            if sent:
                metrics.INSTANCES.labels("out", service).inc(sent)
            nbytes = getattr(op, "bytes_out", None)
            if nbytes is None:
                failed = set(getattr(op, "failed_uids_final", ()) or ())
                nbytes = sum(r.size or 0 for r in getattr(op, "refs_out", ()) or ()
                             if r.sop_instance_uid not in failed) if sent else 0
            if nbytes:
                metrics.BYTES.labels("out", service).inc(nbytes)

    def _store_record(self, op, status, code, cls, elapsed, comment, counts) -> None:
        """A C-STORE's record (the frequent one): its values taken here, its dicts made
        in the audit writer's thread (``_store_message``)."""
        assoc = op.assoc
        meta = getattr(op, "meta", None)
        if meta is not None:
            a = meta.attributes
            m = (a.get("PatientID"), a.get("StudyInstanceUID"), meta.sop_class_uid,
                 a.get("AccessionNumber"), meta.data_size or meta.size)
        else:
            m = None
        audit.emit_lazy(_store_message, self.peer, self.ae_title, self.address,
                        time.time(), status, code, cls, elapsed, comment, counts,
                        assoc.calling_ae, assoc.called_ae, assoc.peer, _host(assoc),
                        getattr(assoc, "peer_certificate", None),
                        getattr(assoc, "audit_id", None), op.msg_id,
                        getattr(op, "uid", None) or None, m)

    def _record(self, op, service, status, ext):
        assoc = op.assoc
        outcome = audit.outcome_of(status) if status is not None else audit.MINOR_FAILURE
        refused = status == 0x0124
        types = [audit.TYPE_RESTRICTED_FUNCTION] if refused else []
        description = ext.get("comment", "")
        if service == "C-ECHO":
            return audit.emit(audit.message(
                audit.EVENT_APPLICATION_ACTIVITY, "E", outcome,
                [self._requestor(assoc), self._us()], self.peer, extension=ext))
        query = getattr(op, "query", None)
        keys = query.keys if query is not None else {}
        if query is not None:
            ext["level"] = query.level
        patients = _concrete(keys.get("PatientID"))
        studies = _concrete(keys.get("StudyInstanceUID"))
        if service == "C-FIND":
            ext["matches"] = getattr(op, "pendings", None)
            objects = [audit.query_object(
                op.cx.abstract_syntax,
                base64.b64encode(op.data or b"").decode("ascii"), str(op.ts))]
            objects += [audit.patient(p) for p in patients]
            objects += [audit.study(s) for s in studies]
            return audit.emit(audit.message(
                audit.EVENT_QUERY, "E", outcome,
                [self._requestor(assoc, audit.ROLE_SOURCE),
                 self._us(False, audit.ROLE_DESTINATION)], self.peer, objects,
                types, description, ext))
        # C-MOVE, C-GET
        if service == "C-MOVE":
            dest_ae = getattr(op, "dest_ae", "") or ""
            dest = getattr(op, "dest", None)
            ext["destination"] = dest_ae
            parts = [self._requestor(assoc), self._us(False, audit.ROLE_SOURCE),
                     audit.participant(dest_ae, False, audit.ROLE_DESTINATION,
                                       getattr(dest, "host", None))]
        else:
            parts = [self._requestor(assoc, audit.ROLE_DESTINATION),
                     self._us(False, audit.ROLE_SOURCE)]
        refs = getattr(op, "refs_out", None) or ()
        classes: dict = {}
        for r in refs:
            classes[r.sop_class_uid] = classes.get(r.sop_class_uid, 0) + 1
        ext["instances"] = len(refs)

        def emit(found):
            pats, studs = list(patients), list(studies)
            for row in found or ():
                p, s = row.get("PatientID"), row.get("StudyInstanceUID")
                if p is not None and p not in pats:
                    pats.append(p)
                if s and s not in studs:
                    studs.append(s)
            objects = [audit.patient(p) for p in pats]
            objects += [audit.study(s, classes if len(studs) == 1 else None)
                        for s in studs[:LOOKUP_LIMIT]]
            audit.emit(audit.message(
                audit.EVENT_TRANSFERRED, "R", outcome, parts, self.peer, objects, types,
                description, ext))

        lookup = None
        if refs and query is not None and (not studies or not patients):
            if query.level == "PATIENT" and patients:
                lookup = Query("STUDY", {"PatientID": "\\".join(patients)}, query.root)
            elif studies:
                lookup = Query("STUDY", {"StudyInstanceUID": "\\".join(studies)})
        if lookup is None:
            return emit(())
        d = defer.maybeDeferred(self.cluster.find, lookup, ["PatientID", "StudyInstanceUID"])
        d.addCallback(lambda rows: rows[:LOOKUP_LIMIT])
        d.addErrback(lambda f: log.warn("audit: looking up the studies of a {service} "
                                        "failed: {err}", service=service,
                                        err=f.getErrorMessage()) or ())
        d.addCallback(emit)
        return d


def _store_message(peer, ae_title, address, when, status, code, cls, elapsed, comment,
                   counts, calling_ae, called_ae, assoc_peer, host, certificate, audit_id,
                   msg_id, uid, meta) -> dict:
    """A C-STORE's audit record (DICOM Instances Transferred, action C), made from plain
    values (``Observer._store_record``) in the audit writer's thread."""
    ext = _operation_ext("C-STORE", audit_id, msg_id, status, code, cls, calling_ae,
                         called_ae, assoc_peer, elapsed, comment, counts)
    ext["instance"] = uid
    objects = []
    if meta is not None:
        patient_id, study_uid, sop_class, accession, nbytes = meta
        if patient_id is not None:
            objects.append(audit.patient(patient_id))
        if study_uid:
            objects.append(audit.study(study_uid, {sop_class: 1}, accession or None))
        ext["bytes"] = nbytes
    outcome = audit.outcome_of(status) if status is not None else audit.MINOR_FAILURE
    types = [audit.TYPE_RESTRICTED_FUNCTION] if status == 0x0124 else []
    requestor = _requestor(calling_ae, host, certificate, audit.ROLE_SOURCE)
    us = _us(ae_title, address, peer, False, audit.ROLE_DESTINATION)
    return audit.message(audit.EVENT_TRANSFERRED, "C", outcome, [requestor, us], peer,
                         objects, types, comment, ext, when=audit.now_iso(when))


def _operation_ext(service, audit_id, msg_id, status, code, cls, calling_ae, called_ae,
                   assoc_peer, elapsed, comment, counts) -> dict:
    """The extension every DIMSE operation's audit record carries."""
    ext = {"kind": "operation", "service": service, "association": audit_id,
           "message_id": msg_id, "status": code if status is not None else None,
           "status_class": cls, "calling_ae": calling_ae, "called_ae": called_ae,
           "peer": assoc_peer,
           "duration_s": round(elapsed, 3) if elapsed is not None else None}
    if comment:
        ext["comment"] = comment
    if counts is not None:
        ext["counts"] = {"remaining": counts[0], "completed": counts[1],
                         "failed": counts[2], "warning": counts[3]}
    return ext


def _requestor(calling_ae, host, certificate, role=None) -> dict:
    return audit.participant(calling_ae or "?", True, role, host,
                             AlternativeUserID=certificate)


def _us(ae_title, address, peer, requestor: bool = False, role=None) -> dict:
    return audit.participant(ae_title, requestor, role,
                             None if address in ("", "0.0.0.0", "::") else address,
                             AlternativeUserID=peer)
