"""A throwaway real DCMTK dcmqrscp archive on a free loopback port (stopped by PID)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

from .dcmtk import dcmtk_env, dcmtk_path, wait_for_echo
from .ports import free_port
from .procs import Process, Server


class DcmQrScp(Server):
    """Context manager: /usr/bin/dcmqrscp with a private config and index directory, keeping
    every file bit-preserved (+B: data set bytes as received).

    ``with DcmQrScp(ae_title="DCMQR", peers={"PACSP2P": ("127.0.0.1", 11112)}) as q:``
    exposes ``q.port``, ``q.ae_title``, ``q.storage`` (its index + files). *peers* are
    the C-MOVE destinations it knows (HostTable). Any calling AE may store, find and get.
    ``stop()`` and ``start()`` again keep the same port and content (an archive restart).
    """

    def __init__(self, workdir: Path | str | None = None, *, ae_title: str = "DCMQR",
                 peers: Mapping[str, tuple] | None = None, port: int | None = None,
                 max_pdu: int = 131072, max_studies: int = 1000,
                 startup_timeout: float = 15.0):
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dcmqr-"))
        self.ae_title = ae_title
        self.peers = dict(peers or {})
        self.port = port or 0
        self.max_pdu = max_pdu
        self.max_studies = max_studies
        self.startup_timeout = startup_timeout
        self.process: Process | None = None

    @property
    def storage(self) -> Path:
        return self.workdir / "db"

    @property
    def config_path(self) -> Path:
        return self.workdir / "dcmqrscp.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dcmqrscp.log"

    def write_config(self) -> None:
        hosts = "\n".join(f"{ae.lower()} = ({ae}, {host}, {port})"
                          for ae, (host, port) in self.peers.items())
        self.config_path.write_text(f"""\
NetworkTCPPort  = {self.port}
MaxPDUSize      = {self.max_pdu}
MaxAssociations = 32

HostTable BEGIN
{hosts}
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{self.ae_title}  {self.storage}  RW  ({self.max_studies}, 1024mb)  ANY
AETable END
""")

    def start(self) -> "DcmQrScp":
        self.storage.mkdir(parents=True, exist_ok=True)
        fixed = bool(self.port)
        error = None
        for _attempt in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            self.write_config()
            argv = [dcmtk_path("dcmqrscp"), "-c", self.config_path, "-ll", "info", "+B",
                    "--disable-host-lookup", self.port]
            self.process = Process(argv, self.log_path, env=dcmtk_env(), group=True).start()
            try:
                wait_for_echo(self.port, self.ae_title, timeout=self.startup_timeout,
                              alive=lambda: self.process.alive)
                return self
            except (RuntimeError, TimeoutError) as exc:
                error = exc
                self.process.stop(timeout=5)
        raise RuntimeError(f"dcmqrscp did not start: {error}\n{self.process.log_tail()}")

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout=5)

    def restart(self) -> "DcmQrScp":
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def files(self) -> list[Path]:
        """The instance files it keeps (index.dat excluded)."""
        return sorted(p for p in self.storage.rglob("*") if p.is_file()
                      and p.name != "index.dat")

