"""A throwaway real Orthanc server (/usr/sbin/Orthanc) on free loopback ports."""
from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from .ports import LOOPBACK, free_ports
from .procs import Process, Server

ORTHANC_BIN = Path("/usr/sbin/Orthanc")


class Orthanc(Server):
    """Context manager running Orthanc with a private config, storage and index.

    ``with Orthanc(aet="ORTHANC", modalities={"PEER": ["PACSP2P", "127.0.0.1", 11112]}) as o:``
    exposes ``o.dicom_port``, ``o.http_port``, ``o.aet``, ``o.url``; ``o.upload(path)``
    loads a file via REST; stopped by PID on exit. *config* entries override the defaults.
    """

    def __init__(self, workdir: Path | str | None = None, *, aet: str = "ORTHANC",
                 modalities: Mapping[str, list] | None = None,
                 config: Mapping[str, Any] | None = None, startup_timeout: float = 30.0):
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.overrides = dict(config or {})
        self.startup_timeout = startup_timeout
        self.http_port = 0
        self.dicom_port = 0
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def _config(self) -> dict:
        cfg = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "JobsHistorySize": 10,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "StorageAccessOnFind": "Always",
            "CaseSensitivePN": False,
            "DeidentifyLogs": False,
            "HttpDescribeErrors": True,
        }
        cfg.update(self.overrides)
        return cfg

    def start(self) -> "Orthanc":
        if not ORTHANC_BIN.is_file():
            raise FileNotFoundError(f"{ORTHANC_BIN} missing (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        error = ""
        for _attempt in range(3):  # a picked port may be taken meanwhile: retry
            self.http_port, self.dicom_port = free_ports(2)
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            self.process = Process([ORTHANC_BIN, self.config_path],
                                   self.log_path).start()
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                error = str(exc)
                self.process.stop(timeout=5)
        raise RuntimeError(f"Orthanc did not start: {error}\n{self.process.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.process.alive:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}")
            try:
                self.get("/system", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc /system not answering after {self.startup_timeout}s")

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout=15)


    # -- REST -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60.0) -> Any:
        """Call the REST API; JSON answers are decoded, others returned as bytes."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            data = rsp.read()
            if rsp.headers.get_content_type() == "application/json":
                return json.loads(data or b"null")
            return data

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
        body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        return self.request("POST", path, body, timeout=timeout)

    def upload(self, path: Path | str) -> dict:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, Status...)."""
        return self.request("POST", "/instances", Path(path).read_bytes(),
                            content_type="application/dicom")

    def upload_all(self, paths) -> int:
        """Upload many files (or the files under directories); return how many."""
        count = 0
        for p in paths:
            p = Path(p)
            for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]):
                self.upload(f)
                count += 1
        return count

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return self.get("/instances")

    def statistics(self) -> dict:
        return self.get("/statistics")
