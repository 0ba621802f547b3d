"""DCMTK command-line tools as test clients/servers (always /usr/bin/<tool>, TCP_NODELAY=1)."""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .ports import LOOPBACK, free_port, port_open, wait_for_port
from .procs import Process

DCMTK_BIN = Path("/usr/bin")


def dcmtk_path(tool: str) -> Path:
    """Full path of a DCMTK tool; raises FileNotFoundError if it is missing (never skip)."""
    path = DCMTK_BIN / tool
    if not path.is_file():
        raise FileNotFoundError(f"DCMTK tool {path} is not installed (apt-get install dcmtk)")
    return path


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def dcmtk(tool: str, *args, timeout: float = 120.0, cwd: Path | None = None,
          check: bool = False) -> subprocess.CompletedProcess:
    """Run /usr/bin/<tool> *args* (text output captured); bounded by *timeout*."""
    argv = [str(dcmtk_path(tool)), *[str(a) for a in args]]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=timeout, cwd=cwd, env=dcmtk_env(), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise DcmtkError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


class DcmtkError(subprocess.CalledProcessError):
    """A DCMTK tool failed; str() includes the tail of its output."""

    def __str__(self) -> str:
        out = ((self.stderr or "") + (self.output or ""))[-2000:]
        return f"{super().__str__()}\n{out}"


def echo(port: int, aec: str, *, host: str = LOOPBACK, aet: str = "ECHOSCU",
         timeout: float = 10.0) -> bool:
    """One C-ECHO with echoscu; True on success."""
    try:
        proc = dcmtk("echoscu", "-aet", aet, "-aec", aec, "-to", "5", "-ta", "5", "-td", "5",
                     host, port, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def wait_for_echo(port: int, aec: str, *, host: str = LOOPBACK, timeout: float = 30.0,
                  alive=None) -> None:
    """Repeat C-ECHO until it succeeds (bounded); *alive()* False aborts early."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"server on {host}:{port} exited before answering C-ECHO")
        # a TCP connect first (cheap, polled often); echoscu once something listens
        if port_open(host, port) and echo(
                port, aec, host=host, timeout=max(1.0, min(10.0, deadline - time.monotonic()))):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no C-ECHO answer from {aec}@{host}:{port} after {timeout}s")
        time.sleep(0.05)


def storescu(port: int, aec: str, paths: Iterable[Path | str], *, host: str = LOOPBACK,
             aet: str = "STORESCU", extra: Sequence[str] = (), timeout: float = 300.0,
             required: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """Send files or directories (recursively, +sd +r) with storescu.

    *required* (-R -xr) proposes each file's own SOP class + transfer syntax, so files
    (RLE too) travel unconverted and keep their data set bytes.
    """
    paths = [str(p) for p in paths]
    args = ["-aet", aet, "-aec", aec, "-to", "20", "-ta", "20", "-td", "60"]
    if required:
        args += ["-R", "-xr"]
    if any(Path(p).is_dir() for p in paths):
        args += ["+sd", "+r"]
    return dcmtk("storescu", *args, *extra, host, port, *paths, timeout=timeout, check=check)


def findscu(port: int, aec: str, keys: Mapping[str, str] | Sequence[str], *,
            model: str = "S", host: str = LOOPBACK, aet: str = "FINDSCU",
            extra: Sequence[str] = (), timeout: float = 60.0):
    """C-FIND with findscu -X; return (responses as pydicom Datasets, CompletedProcess).

    *model* is "P" (patient root), "S" (study root) or "O". *keys* is a mapping
    {"PatientName": "DOE*", "StudyDate": ""} or a list of raw "-k" values.
    """
    from pydicom import dcmread

    items = [f"{k}={v}" for k, v in keys.items()] if isinstance(keys, Mapping) else list(keys)
    kargs: list[str] = []
    for item in items:
        kargs += ["-k", item]
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        proc = dcmtk("findscu", f"-{model}", "-aet", aet, "-aec", aec, "-to", "20",
                     "-ta", "20", "-td", "60", "-X", "-od", out, *kargs, *extra, host, port,
                     timeout=timeout)
        rsp = sorted(Path(out).glob("rsp*.dcm"))
        datasets = [dcmread(p) for p in rsp]
    return datasets, proc


def get_study_hashes(port: int, aec: str, study: str, out: Path | str, *,
                     host: str = LOOPBACK) -> dict[str, str]:
    """C-GET of one study with getscu into *out* (made): {SOP Instance UID: dataset_sha256}
    of what arrived (a failed sub-operation is simply absent)."""
    from pydicom import dcmread

    out = Path(out)
    out.mkdir(parents=True)
    dcmtk("getscu", "-aec", aec, "-S", "-k", "QueryRetrieveLevel=STUDY",
          "-k", f"StudyInstanceUID={study}", "-od", str(out), host, port, check=False)
    return {dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_sha256(f)
            for f in out.iterdir()}


def dataset_sha256(path: Path | str) -> str:
    """sha256 of a Part-10 file's bytes after the File Meta Information (group 0002).

    Parses the 128-byte preamble, 'DICM' and the explicit-VR-LE group-0002 elements
    one by one (not trusting the group length), so two files holding the same data set
    encoding hash equal even if their meta headers differ.
    """
    return dataset_sha256_of(Path(path).read_bytes())


def dataset_sha256_of(data: bytes) -> str:
    """``dataset_sha256`` of a Part-10 file's bytes already in memory."""
    return hashlib.sha256(data[_meta_end(data):]).hexdigest()


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
             b"UR", b"UT", b"UV"}


def _meta_end(data: bytes) -> int:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no 'DICM' after the preamble)")
    pos = 132
    while pos + 8 <= len(data):
        group, _elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


class StoreSCP:
    """Context manager: /usr/bin/storescp receiving into *directory* (a C-MOVE destination).

    ``with StoreSCP(dir, ae_title="STORESCP") as scp: scp.port``; stopped by PID.
    """

    def __init__(self, directory: Path | str, *, ae_title: str = "STORESCP",
                 port: int | None = None, fork: bool = False,
                 extra: Sequence[str] = (), log_path: Path | None = None):
        self.directory = Path(directory)
        self.ae_title = ae_title
        self.port = port
        self.fork = fork
        self.extra = list(extra)
        self.log_path = Path(log_path) if log_path else self.directory.parent / (
            self.directory.name + "-storescp.log")
        self.process: Process | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def files(self) -> list[Path]:
        """Received files (storescp names them <modality>.<sop instance uid>)."""
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def start(self) -> "StoreSCP":
        self.directory.mkdir(parents=True, exist_ok=True)
        last_error = None
        for _attempt in range(3):
            port = self.port or free_port()
            argv = [dcmtk_path("storescp"), "-od", self.directory, "+xa", "-aet",
                    self.ae_title, "-ll", "info"]
            if self.fork:
                argv.append("--fork")
            argv += [*self.extra, port]
            self.process = Process(argv, self.log_path, env=dcmtk_env()).start()
            try:
                wait_for_port(LOOPBACK, port, timeout=10, alive=lambda: self.process.alive)
                self.port = port
                return self
            except (RuntimeError, TimeoutError) as exc:
                last_error = exc
                self.process.stop()
                if self.port:  # fixed port given: do not retry on another
                    break
        raise RuntimeError(f"storescp did not start: {last_error}\n{self.process.log_tail()}")

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout=5)

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
