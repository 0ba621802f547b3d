"""Who may associate with the facade, and what each calling AE may do (issue 17).

AE titles are labels, not credentials: anyone can claim one. So the facade can bind them
to what a requestor cannot choose as easily — its network address and its TLS client
certificate — and give each its own rights. ``Policy`` is the ``policy`` of the acceptor
(``dicom.acceptor``): called once per A-ASSOCIATE-RQ, after the acceptor's own checks
(AE repertoire, ``allowed_calling_aes``, ``max_associations``), it returns a ``Grant``
(what the association may do) or raises ``negotiation.Refused`` (A-ASSOCIATE-RJ):

- ``[facade] check_called_ae`` (default true): the called AE title must be ours, else
  rejected-permanent, service user, "called AE title not recognized" (PS3.8 9.3.4 reason
  7);
- a calling AE declared under ``[modalities]`` with ``host`` (addresses, CIDR networks or
  host names) is refused from any other address when ``[facade] check_modality_host``
  (default true): rejected-permanent, "calling AE title not recognized" (reason 3). Host
  names are resolved in a thread at start and every ``RESOLVE_EVERY`` seconds, never in
  the reactor; until a name has resolved once, its AE gets rejected-transient;
- a modality with ``certificate = "NAME"`` must come over the TLS port with a verified
  client certificate whose common name is NAME (reason 3 otherwise);
- a calling AE not declared has the rights of ``[facade] allow_unknown`` (default all);
  none at all (``allow_unknown = []``): reason 3. A declared modality may always
  associate and C-ECHO, even with ``allow = []``.

Then, per request, the facade's services (``facade.services``) ask ``permits(assoc,
right)`` for C-STORE, C-FIND, C-MOVE and C-GET (C-ECHO is always answered), and the
C-MOVE asks ``may_move_to`` for its destination (a modality's ``move_to``). A refused
request is answered 0x0124 "Refused: Not Authorized" (a general failure status of
PS3.7 annex C, valid for every DIMSE-C service) with an Error Comment, its data set
discarded.

Every refusal writes one log line (the calling AE, its address and why; values shown
bounded), rate-limited per kind (``dicom.admission.LogLimit``).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel

from pacsp2p import threads
from pacsp2p.config import RIGHTS
from pacsp2p.dicom.admission import LogLimit
from pacsp2p.dicom.negotiation import (CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED,
                                       NO_REASON, PERMANENT, TRANSIENT, USER, Refused)
from pacsp2p.validate import shown

log = Logger()

RESOLVE_EVERY = 300.0          # seconds between two resolutions of modality host names


@dataclass(frozen=True)
class Grant:
    """What one association may do: its rights, the destinations it may move to (None:
    any) and the modality it was recognised as (None: an AE not declared)."""

    rights: frozenset
    move_to: frozenset | None = None
    modality: str | None = None


ALL = Grant(frozenset(RIGHTS))


def _address(host: str):
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _resolve(name: str) -> frozenset:
    """Thread pool: every address of host *name*."""
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return frozenset(_address(info[4][0]) for info in infos) - {None}


class Policy:
    """The facade's association and operation policy (see the module docstring)."""

    def __init__(self, settings, reactor, resolve=_resolve):
        fs = settings.facade
        self.reactor = reactor
        self.ae_title = fs.ae_title
        self.check_called = fs.check_called_ae
        self.check_host = fs.check_modality_host
        self.unknown = Grant(frozenset(fs.allow_unknown))
        self.modalities = dict(settings.modalities)
        self.networks: dict[str, list] = {}
        self.names: dict[str, list[str]] = {}
        for ae, m in self.modalities.items():
            nets, names = [], []
            for h in m.hosts:
                try:
                    nets.append(ipaddress.ip_network(h, strict=False))
                except ValueError:
                    names.append(h)
            self.networks[ae], self.names[ae] = nets, names
        self.grants = {ae: Grant(frozenset(m.allow),
                                 None if m.move_to is None else frozenset(m.move_to), ae)
                       for ae, m in self.modalities.items()}
        self.resolved: dict[str, frozenset] = {}       # host name -> its addresses
        self._resolve = resolve
        self._loop = None
        self.log_limit = LogLimit(reactor)

    # -- host names ---------------------------------------------------------------------
    def start(self) -> None:
        """Resolve the modalities' host names now (in a thread) and every RESOLVE_EVERY
        seconds."""
        if any(self.names.values()) and self.check_host:
            self._loop = task.LoopingCall(self.refresh)
            self._loop.clock = self.reactor
            self._loop.start(RESOLVE_EVERY, now=True).addErrback(
                lambda f: log.failure("resolving modality host names failed", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def refresh(self):
        """Deferred: every modality host name resolved again (in a thread pool)."""
        pool = threads.pool(self.reactor, "resolve", 1, 2)
        return self._refresh(
            lambda name: deferToThreadPool(self.reactor, pool, self._resolve, name))

    @defer.inlineCallbacks
    def _refresh(self, lookup):
        for name in sorted({n for names in self.names.values() for n in names}):
            try:
                found = yield lookup(name)
            except Exception as e:
                log.warn("modality host {name} does not resolve ({err}); "
                         "{kept}", name=name, err=e,
                         kept="keeping its previous addresses" if name in self.resolved
                         else "its AE titles are refused until it does")
                continue
            if found != self.resolved.get(name):
                log.info("modality host {name} is {addrs}", name=name,
                         addrs=", ".join(sorted(map(str, found))) or "nothing")
            self.resolved[name] = found

    # -- association ----------------------------------------------------------------------
    def _refuse(self, assoc, why: str, result: int = PERMANENT,
                reason: int = CALLING_AE_NOT_RECOGNIZED):
        return Refused(why, result, USER, reason)

    def __call__(self, assoc) -> Grant:
        """The acceptor's policy: the Grant of *assoc*, or raise Refused."""
        if self.check_called and assoc.called_ae != self.ae_title:
            raise self._refuse(assoc, f"called AE title {shown(assoc.called_ae)} is not "
                                      f"{self.ae_title}",
                               reason=CALLED_AE_NOT_RECOGNIZED)
        ae = assoc.calling_ae
        modality = self.modalities.get(ae)
        if modality is None:
            if not self.unknown.rights:
                raise self._refuse(assoc, "calling AE title not declared under "
                                          "[modalities]")
            return self.unknown
        if self.check_host and modality.hosts:
            self._check_host(assoc, ae)
        if modality.certificate is not None:
            cn = assoc.peer_certificate
            if not assoc.tls:
                raise self._refuse(assoc, f"{ae} must use the TLS port (certificate "
                                          f"{modality.certificate})")
            if cn != modality.certificate:
                raise self._refuse(assoc, f"{ae} showed certificate {shown(str(cn))}, "
                                          f"not {modality.certificate}")
        return self.grants[ae]

    def _check_host(self, assoc, ae: str) -> None:
        addr = _address(assoc.host)
        if addr is not None:
            if any(addr.version == net.version and addr in net for net in self.networks[ae]):
                return
            if any(addr in self.resolved.get(n, ()) for n in self.names[ae]):
                return
        if self.names[ae] and not any(n in self.resolved for n in self.names[ae]):
            raise self._refuse(assoc, f"{ae}: its host names have not resolved yet",
                               result=TRANSIENT, reason=NO_REASON)
        raise self._refuse(assoc, f"{ae} is not declared at {shown(assoc.host)}")

    # -- operations -------------------------------------------------------------------------
    def grant_of(self, assoc) -> Grant:
        grant = getattr(assoc, "grant", None)
        return grant if isinstance(grant, Grant) else ALL

    def permits(self, assoc, right: str) -> bool:
        """May *assoc* do *right* ("store", "find", "move", "get")? A refusal is logged."""
        if right in self.grant_of(assoc).rights:
            return True
        self.log_limit("not authorized", LogLevel.warn,
                       "{op} from {ae}@{peer} refused: not authorized ({ae} may {may})",
                       op=f"C-{right.upper()}", ae=shown(assoc.calling_ae),
                       peer=assoc.peer,
                       may=", ".join(sorted(self.grant_of(assoc).rights)) or "nothing")
        return False

    def may_move_to(self, assoc, destination: str) -> bool:
        """May *assoc* send a C-MOVE to *destination*? A refusal is logged."""
        allowed = self.grant_of(assoc).move_to
        if allowed is None or destination in allowed:
            return True
        self.log_limit("not authorized", LogLevel.warn,
                       "C-MOVE from {ae}@{peer} to {dest} refused: not one of its move_to",
                       ae=shown(assoc.calling_ae), peer=assoc.peer, dest=shown(destination))
        return False
