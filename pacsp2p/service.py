"""PeerService: the service tree of one peer, built in its constructor, started in order
and stopped in reverse.

Parts get their collaborators when they are constructed (catalog -> archives ->
strategies -> overlay -> cluster API -> front ends); nothing is wired afterwards. The
peer is a ``MultiService``: the catalog and the archives are opened first (they must be
ready before anything serves), then its children start one after the other — ingest,
replica service, overlay, facade, crawlers, archive health, admin web — and stop in
reverse. A part that cannot start (read-only data directory, port in use, a catalog
that cannot be opened, a peer name another process holds in the cluster: found while
the overlay joins) stops the peer with one line saying why. Once everything serves,
the catalog's integrity is checked in the background unless it was closed cleanly.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pacsp2p import __version__, clock, lock, preflight, spread
from pacsp2p.adapters.crawl import Crawler
from pacsp2p.admin import endpoint
from pacsp2p.catalog import Catalog
from pacsp2p.cluster import Cluster
from pacsp2p.facade import Facade
from pacsp2p.health import ArchiveHealth

log = Logger()


class _Part(service.Service):
    """A part with plain ``start()``/``stop()`` as a child service."""

    def __init__(self, name, part):
        self.name, self.part = name, part

    def startService(self):
        self.part.start()
        super().startService()

    def stopService(self):
        super().stopService()
        return self.part.stop()


class PeerService(service.MultiService):
    name = "pacsp2p"

    def __init__(self, settings, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
            clock.use_monotonic(reactor)        # timers do not follow wall-clock steps
        self.settings = settings
        self.reactor = reactor
        preflight.paths(settings)
        preflight.descriptors(settings)
        preflight.places(settings)              # not in /proc or /sys (nor the archives')
        storage = settings.storage
        self.catalog = Catalog(settings.data_dir / "catalog.sqlite", reactor,
                               peer=settings.peer.name,
                               durable=storage.fsync and storage.sync_directories)
        # building archives validates their config (ConfigError before the reactor runs)
        self.archives = preflight.archives(settings, reactor, catalog=self.catalog)
        preflight.places(settings, self.archives)
        by_name = {a.name: a for a in self.archives}
        self.strategies = preflight.strategies(settings)   # plugins, options, roles
        self.overlay = self.replicas = None
        if settings.overlay is not None:
            from pacsp2p.overlay.node import Overlay
            from pacsp2p.transfer.replicas import ReplicaService
            preflight.credentials(settings)    # its files readable: one line, not a trace
            self.overlay = Overlay(settings, self.catalog, by_name, reactor,
                                   responders=lambda overlay: ReplicaService(
                                       settings.peer.name, by_name, self.catalog, overlay,
                                       reactor),
                                   fatal=lambda why, stage="cannot start":
                                   self._failed(Failure(RuntimeError(why)), stage))
            self.replicas = self.overlay.membership.services
        self.crawlers = [Crawler(a, self.catalog, settings.peer.name, reactor,
                                 qps=a.crawl_qps)
                         for a in self.archives if "crawl" in a.capabilities]
        self.cluster = Cluster(settings, self.catalog, self.archives, self.strategies,
                               self.overlay, reactor, self.crawlers)
        self.facade = Facade(settings, self.cluster, reactor)
        adm = settings.admin
        parts = [_Part("ingest", self.cluster.ingest)]
        if self.overlay is not None:
            parts += [_Part("replicas", self.replicas), _Part("overlay", self.overlay)]
        parts.append(self.facade)
        parts.append(_Part("deletions", self.cluster.deleter))   # purges what was deleted
        parts.append(_Part("repair", self.cluster.repair))
        parts.append(_Part("scrub", self.cluster.scrubber))     # re-hash copies, mend them
        parts.append(_Part("drain", self.cluster.drainer))      # move copies off an archive
        parts += [_Part(f"crawl {c.archive.name}", c) for c in self.crawlers]
        parts.append(ArchiveHealth(self.archives, self.crawlers, self.overlay, reactor,
                                   self.catalog, settings, gone=self.cluster.repair.gone,
                                   on_back=self.cluster.recheck.check))
        parts.append(endpoint.make(settings, self.cluster, reactor))   # "admin"
        for part in parts:
            part.setServiceParent(self)
        self.started = None
        self._lock = None

    def startService(self):
        service.Service.startService(self)        # the children start in _start, in order
        self.started = self._start()
        self.started.addErrback(self._failed)

    @defer.inlineCallbacks
    def _start(self):
        log.info("pacsp2p {v} peer {name}, data in {dir}", v=__version__,
                 name=self.settings.peer.name, dir=self.settings.data_dir)
        try:
            self._lock = lock.acquire(self.settings.data_dir)
        except OSError as e:                  # cannot be made or written: its key says
            raise RuntimeError(f"peer.data_dir: {self.settings.data_dir}: "
                               f"{e.strerror or e}") from None
        spread.mark(self.settings.data_dir)   # its new subdirectories: in uncrowded groups
        _raise_fd_limit()
        tune_malloc()
        yield self.catalog.start()
        for archive in self.archives:
            try:
                yield archive.start()
            except Exception as e:
                raise RuntimeError(f"archive {archive.name}: cannot start: {e}") from e
        for child in self:
            try:
                yield defer.maybeDeferred(child.startService)
            except Exception as e:
                said = str(e)
                if said.startswith(f"{child.name}."):   # names its key already
                    raise
                raise RuntimeError(f"{_what(self.settings, child.name)}: {e}") from e
        # the peer serves: check the catalog now, in the background (not if it was closed
        # cleanly), never before the port opens (the whole file: minutes at 10M instances)
        self.catalog.integrity.check()

    def _failed(self, failure, stage: str = "cannot start"):
        msg = failure.getErrorMessage()
        log.critical("pacsp2p {stage}: {msg}", stage=stage, msg=msg)
        # twistd has pointed sys.stderr at its log by now: say it on the real stderr
        print(f"pacsp2p: {stage}: {msg}", file=sys.__stderr__, flush=True)
        # a part may fail before the reactor runs (startService is called before run())
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                try:
                    yield defer.maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {part} failed", part=child.name)
        for archive in reversed(self.archives):
            yield archive.stop()
        yield self.catalog.stop()             # writes finished, the clean mark
        if self._lock is not None:
            self._lock.close()


def _what(settings, name: str) -> str:
    """The config key a child service's start failure is about, for the one-line error."""
    ports = {"overlay": lambda: f"overlay.port {settings.overlay.port}",
             "admin": lambda: f"admin.port {settings.admin.port}",
             "facade": lambda: f"facade.port {settings.facade.port}"}
    return ports[name]() if name in ports else name


def _raise_fd_limit(want: int = preflight.OPEN_FILES) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one: a flood of sockets then meets the
    facade's own caps (``[facade] max_pending``, ``fd_reserve``) long before EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft}: {err}", soft=soft, err=e)


MMAP_THRESHOLD = 16 << 20      # bytes: a buffer below this comes from malloc's heap ...
TRIM_THRESHOLD = 64 << 20      # ... whose free top is given back past this many bytes


def tune_malloc() -> bool:
    """glibc's malloc keeps instance-sized buffers (a CT image's 512 KB, a lane's 1 MB,
    a batch's answer) in its heaps instead of mapping and unmapping them each time: by
    default a freed one past the dynamic mmap threshold or at a heap's top is given back
    to the kernel, and the next one costs a page fault per 4 KB touched (~8 µs each on
    a VM: a relayed CT image read by ``overlay.readclient`` paid ~35 of them). What a
    heap keeps free is bounded by TRIM_THRESHOLD. False where there is no ``mallopt``
    (not glibc) or it refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # M_MMAP_THRESHOLD (-3), M_TRIM_THRESHOLD (-1): setting them ends glibc's dynamic
    # adjustment of both
    return mallopt(-3, MMAP_THRESHOLD) == 1 and mallopt(-1, TRIM_THRESHOLD) == 1


def _exit_failed():
    """End a peer that could not start with a non-zero status (twistd itself exits 0)."""
    sys.stdout.flush()
    sys.__stderr__.flush()
    os._exit(1)
