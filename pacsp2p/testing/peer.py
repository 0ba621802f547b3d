"""A real pacsp2p peer process (`twistd -n pacsp2p --config FILE`) for tests and benches."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from . import toml
from .dcmtk import wait_for_echo
from .ports import LOOPBACK, free_port, free_ports
from .procs import Process, Server


def twistd_path() -> Path:
    """twistd of the venv that runs this Python."""
    return Path(sys.executable).parent / "twistd"


SPAWNED: dict = {}     # log path -> peer name: every peer this process started (a failed
                       # test's report shows their logs: tests/conftest.py)


class Peer(Server):
    """Context manager running one pacsp2p peer with a generated TOML config.

    ``with Peer(destinations={"STORESCP": "127.0.0.1:11113"}) as p: p.port, p.ae_title``.
    *config* is deep-merged over the generated config (e.g. {"archives": [...]}).
    The admin web listens on a free loopback port too (``admin_url``).
    Ready when its facade answers C-ECHO; stopped by PID (SIGTERM, then SIGKILL).
    """

    def __init__(self, workdir: Path | str | None = None, *, name: str = "test",
                 ae_title: str = "PACSP2P", port: int | None = None,
                 destinations: Mapping[str, str] | None = None,
                 allowed_calling_aes: list[str] | tuple = (),
                 config: Mapping[str, Any] | None = None,
                 startup_timeout: float = 30.0, stop_timeout: float = 15.0,
                 twistd: Path | str | None = None, env: Mapping[str, str] | None = None):
        self.twistd = Path(twistd) if twistd else twistd_path()   # another release's
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="peer-"))
        self.name = name
        self.ae_title = ae_title
        self.port = port or 0
        self.admin_port = 0  # the admin status endpoint (default 11180 would collide)
        self._fixed_port = port is not None
        self.destinations = dict(destinations or {})
        self.allowed_calling_aes = list(allowed_calling_aes)
        self.overrides = dict(config or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: Process | None = None
        self.env = dict(env) if env is not None else None     # None: this process's

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "pacsp2p.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "peer.log"

    def config(self) -> dict:
        """The config dict written to pacsp2p.toml."""
        base = {
            "peer": {"name": self.name, "data_dir": str(self.data_dir)},
            "facade": {"ae_title": self.ae_title, "port": self.port, "bind": LOOPBACK,
                       "allowed_calling_aes": self.allowed_calling_aes},
            "admin": {"bind": LOOPBACK, "port": self.admin_port},
            "destinations": self.destinations,
        }
        return toml.deep_merge(base, self.overrides)

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml.dumps(self.config()))
        return self.config_path

    def spawn(self) -> "Peer":
        """Write the config and start twistd on the ports already chosen, without waiting
        (``wait_ready`` next): peers of a cluster are spawned together, then awaited."""
        self.write_config()
        argv = [self.twistd, "-n", "--pidfile=", "pacsp2p", "--config", self.config_path]
        with open(self.log_path, "a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(map(str, argv))}\n")
        self.process = Process(argv, self.log_path, cwd=self.workdir, env=self.env).start()
        SPAWNED[self.log_path] = self.name
        return self

    def start(self) -> "Peer":
        error = ""
        for _attempt in range(1 if self._fixed_port else 3):
            if not self._fixed_port:
                self.port, self.admin_port = free_ports(2)
            elif not self.admin_port:
                self.admin_port = free_port()
            self.spawn()
            try:
                self.wait_ready()
                return self
            except (RuntimeError, TimeoutError) as exc:
                error = str(exc)
                self.process.stop(timeout=self.stop_timeout)
        raise RuntimeError(f"pacsp2p peer did not start: {error}\n--- {self.log_path} tail:\n"
                           f"{self.process.log_tail(60)}")

    def wait_ready(self) -> None:
        """Until the facade answers C-ECHO (a subclass may wait otherwise, e.g. on a TLS
        port); raises RuntimeError or TimeoutError."""
        wait_for_echo(self.port, self.ae_title, timeout=self.startup_timeout,
                      alive=lambda: self.process.alive)

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL after stop_timeout; returns the exit code."""
        return self.process.stop(timeout=self.stop_timeout) if self.process else None

    def kill9(self) -> int | None:
        """Crash the peer: SIGKILL by PID (no clean shutdown)."""
        return self.process.kill9() if self.process else None

    def restart(self) -> "Peer":
        """Stop (if running) and start again with the same config, port and data_dir."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""

