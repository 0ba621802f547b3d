"""What the adapters of archives reached over HTTP (Orthanc's REST API, DICOMweb) share:
the blocking client and the thread pool it runs in, start-up that refuses an archive
that does not answer, and the up/down mark the service's health loop reads."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from pacsp2p.adapters.http import Client


class RestArchive:
    kind = "http"                  # in repr
    product = "the archive"        # in messages: "<product> at <url> does not answer"

    def __init__(self, name: str, reactor, *, url: str, username: str | None,
                 password: str | None, site: str | None, crawl_qps: float, timeout: float,
                 incoming: Path | None, threads: int):
        self.name, self.site, self.reactor = name, site, reactor
        self.http = Client(url, username, password, timeout)
        self.url = self.http.url
        self.crawl_qps = float(crawl_qps)
        self.incoming = Path(incoming) if incoming else Path(tempfile.gettempdir())
        self.up: bool | None = None
        self._pool = ThreadPool(1, threads, f"archive-{name}")

    @classmethod
    def options(cls, cfg, settings, known) -> dict:
        """The options of archive *cfg*, checked (ConfigError naming file, key, reason)."""
        from pacsp2p.adapters import config_where
        from pacsp2p.config import ConfigError
        opts = dict(cfg.options)
        where = config_where(cfg, settings)
        _option_checks(opts, where, cls.kind, known)
        try:
            Client(opts["url"])
        except ValueError as e:
            raise ConfigError(f"{where}.url: {e}") from None
        return opts

    def __repr__(self):
        return f"<{self.kind} archive {self.name}: {self.url}>"

    def _run(self, fn, *args):
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        self._pool.start()
        self.incoming.mkdir(parents=True, exist_ok=True)

        def check(h):
            if not h.get("up"):         # refuse to start: the admin sees why at once
                raise ConnectionError(f"{self.product} at {self.url} does not answer: "
                                      f"{h.get('error', 'no answer')}")
            self._started(h)
        return self.health().addCallback(check)

    def _started(self, health: dict) -> None:
        """Called once the archive answered at start (its health)."""

    def stop(self):
        self._pool.stop()

    def _mark(self, up: bool, error: str = "") -> None:
        """Remember whether the archive answers (the service logs the changes)."""
        self.up = up


def _option_checks(opts: dict, where: str, adapter: str, known) -> None:
    from pacsp2p.config import ConfigError
    for key in opts:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key for adapter {adapter!r} "
                              f"(known: {', '.join(known)})")
    if not isinstance(opts.get("url"), str) or not opts.get("url"):
        raise ConfigError(f"{where}.url: required by adapter {adapter!r} "
                          "(an http:// URL string)")
    for key in ("username", "password", "storage_path"):
        if key in opts and not isinstance(opts[key], str):
            raise ConfigError(f"{where}.{key}: must be a string")
    for key in ("crawl_qps", "timeout"):
        if key in opts and (isinstance(opts[key], bool)     # nan: "ok", then no start
                            or not isinstance(opts[key], (int, float))
                            or not 0 < opts[key] < float("inf")):
            raise ConfigError(f"{where}.{key}: must be a positive number, got {opts[key]!r}")
    if opts.get("timeout", 30.0) > 3600:
        raise ConfigError(f"{where}.timeout: must be at most 3600 seconds, "
                          f"got {opts['timeout']!r}")
    for key, most in (("page_studies", 1000), ("page_instances", 10000), ("threads", 64)):
        if key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], int)
                            or not 0 < opts[key] <= most):     # (a page held in memory)
            raise ConfigError(f"{where}.{key}: must be an integer 1..{most}, "
                              f"got {opts[key]!r}")
