"""Shared bits of the benchmarks: timing, temp dirs, cached synthetic data, printing.

Benchmarks are scripts, not tests. Everything runs on 127.0.0.1 with the real processes
from :mod:`pacsp2p.testing` (pacsp2p peer, DCMTK, Orthanc). Synthetic data is generated
once into a cache directory (``$TMPDIR/pacsp2p-bench-cache``, or ``--cache DIR``) so
that generating it is never part of a timed run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
try:                      # the venv's pacsp2p, or a snapshot put first on PYTHONPATH
    import pacsp2p  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

from pacsp2p.testing.dcmtk import dcmtk as _dcmtk_run  # noqa: E402
from pacsp2p.testing.datasets import ExplicitVRLittleEndian, make_study, uid  # noqa: E402

# Orthanc (and any DCMTK-based server we start) inherits this: without it the Debian DCMTK
# build keeps Nagle's algorithm on and caps an association at ~11 MB/s / ~22 instances/s.
os.environ["TCP_NODELAY"] = "1"

CT_COUNT, CT_SIZE = 300, 512            # 300 x 512x512x16-bit  ~ 157 MB
MR_COUNT, MR_SIZE = 1000, 64            # 1000 small MR instances
CT_PATIENT, MR_PATIENT = "BENCHCT01", "BENCHMR01"


# -- arguments, temp dirs -------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions / smaller data")
    p.add_argument("--cache", type=Path,
                   default=Path(tempfile.gettempdir()) / "pacsp2p-bench-cache",
                   help="where generated data sets are kept between runs")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


@contextlib.contextmanager
def workdir(keep: bool = False, prefix: str = "pacsp2p-bench-"):
    """A fresh temp dir on the same disk as the cache; removed afterwards unless *keep*."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        if keep:
            print(f"(work directory kept: {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)


# -- data -----------------------------------------------------------------------------

@dataclass
class DataSet:
    name: str
    directory: Path
    files: list[Path]
    study_uid: str

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _cached_study(cache: Path, name: str, *, modality: str, count: int, size: int,
                  patient_id: str) -> DataSet:
    directory = cache / name
    marker = directory / ".complete"
    study_uid = str(uid("study", patient_id, 0))
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        t0 = time.monotonic()
        print(f"generating {name}: {count} x {modality} {size}x{size} into {directory} ...",
              flush=True)
        make_study(directory / "study", patient_name=f"BENCH^{modality}",
                   patient_id=patient_id,
                   series=((modality, count, ExplicitVRLittleEndian),), size=size,
                   StudyInstanceUID=study_uid, AccessionNumber=f"ACC{patient_id}")
        marker.write_text(study_uid)
        print(f"  generated in {time.monotonic() - t0:.1f} s (cached for next runs)")
    files = sorted(p for p in (directory / "study").rglob("*.dcm"))
    if len(files) != count:
        raise RuntimeError(f"cache {directory} holds {len(files)} files, expected {count}; "
                           "delete it to regenerate")
    return DataSet(name, directory / "study", files, marker.read_text().strip())


def ct_study(cache: Path, count: int = CT_COUNT) -> DataSet:
    """One CT study, one series: *count* x 512x512x16-bit, explicit VR LE (cached)."""
    return _cached_study(cache, f"ct{count}x{CT_SIZE}", modality="CT", count=count,
                         size=CT_SIZE, patient_id=CT_PATIENT)


def mr_study(cache: Path, count: int = MR_COUNT) -> DataSet:
    """One MR study, one series: *count* small (64x64x16-bit) instances (cached)."""
    return _cached_study(cache, f"mr{count}x{MR_SIZE}", modality="MR", count=count,
                         size=MR_SIZE, patient_id=MR_PATIENT)


# -- timing, statistics, printing -----------------------------------------------------

class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def count_files(directory: Path, pattern: str = "*") -> int:
    """Files under *directory* whose name matches *pattern* (0 if it does not exist)."""
    return sum(1 for p in directory.rglob(pattern) if p.is_file()) if directory.exists() else 0


def held_instances(peer) -> int:
    """Instance files in a peer's embedded archive (``objects/**/*.dcm``)."""
    return count_files(peer.data_dir / "archives" / "local" / "objects", "*.dcm")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def mb(n_bytes: int) -> float:
    return n_bytes / 1e6


def table(rows: Iterable[Sequence], headers: Sequence[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def run_dcmtk(tool: str, *args, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """/usr/bin/<tool> with TCP_NODELAY=1; raises with its output tail on failure."""
    return _dcmtk_run(tool, *args, timeout=timeout, check=True)


def versions() -> dict[str, str]:
    import pydicom
    import pynetdicom
    out = {"python": sys.version.split()[0], "pydicom": pydicom.__version__,
           "pynetdicom": pynetdicom.__version__}
    try:
        out["dcmtk"] = subprocess.run(["/usr/bin/storescu", "--version"], capture_output=True,
                                      text=True, timeout=10).stdout.split("\n")[0].strip(" $")
    except Exception:
        pass
    try:
        out["orthanc"] = subprocess.run(["/usr/sbin/Orthanc", "--version"],
                                        capture_output=True, text=True,
                                        timeout=10).stdout.split("\n")[0].strip()
    except Exception:
        pass
    return out


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"nproc={os.cpu_count()}  cpu={model}  ram={mem}"


def code_under_test() -> str:
    """Where the pacsp2p being measured comes from (and its git commit, if known)."""
    import pacsp2p
    where = Path(pacsp2p.__file__).resolve().parents[1]
    commit = os.environ.get("PACSP2P_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(where), "describe", "--always",
                                     "--dirty"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except Exception:
            commit = ""
    return f"pacsp2p from {where}" + (f" @ {commit}" if commit else "")


def code_versions(spec: str | None) -> list[tuple[str, str | None]]:
    """[(label, PYTHONPATH for the peers or None: this checkout)] from "a=DIR,b=DIR"."""
    if not spec:
        return [("", None)]
    return [tuple(item.split("=", 1)) for item in spec.split(",")]


def label_configs(items) -> dict:
    """{label: config} from ``--set-for LABEL:section.KEY=JSON`` items: settings for the
    peers of one ``--code`` label only (e.g. two labels on the same tree, one with
    ``strategies.first_copy="local"``)."""
    out: dict = {}
    for item in items:
        label, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        out.setdefault(label, {}).setdefault(section, {})[name] = json.loads(value)
    return out


@contextlib.contextmanager
def code_tree(tree: str | None):
    """Peers started inside the block run from *tree* (PYTHONPATH; None: this checkout)."""
    original = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = tree
    try:
        yield
    finally:
        if original is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = original


def cpu_seconds(pids) -> float:
    """user + system CPU seconds used so far by the processes *pids* (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   {code_under_test()}")
    print(f"   {machine()}")
    print("   " + "  ".join(f"{k}={v}" for k, v in versions().items()))
    print(flush=True)


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of *pid* in MB (None without psutil)."""
    if pid is None:
        return None
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 1e6
    except Exception:
        return None


@contextlib.contextmanager
def profiled(pid: int | None, out: Path | None, label: str, duration: float = 120.0):
    """py-spy record the process *pid* while the block runs (if *out* is given)."""
    if out is None or pid is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{label}.txt"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw",
                             "--threads", "--rate", "200", "--duration", str(int(duration)),
                             "--output", str(target), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)                    # let py-spy attach before the timed run
    try:
        yield
    finally:
        proc.send_signal(2)            # SIGINT: py-spy writes its output and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        print(f"   profile of {label}: {target}")
        if target.exists():
            for line in summarize_profile(target):
                print("     " + line)


@contextlib.contextmanager
def profiled_all(pids: dict[str, int], out: Path | None):
    """py-spy record each process of *pids* ({label: pid}) while the block runs (if
    *out* is given); a summary of each is printed afterwards."""
    with contextlib.ExitStack() as stack:
        for label, pid in (pids.items() if out is not None else ()):
            stack.enter_context(profiled(pid, out, label))
        yield


_SKIP = ("threading.py", "context.py", "_threadworker.py", "_team.py", "threadpool.py")


def _thread_kind(frames: list[str]) -> str:
    text = ";".join(frames)
    if "Association.run" in text:
        return "association"       # pynetdicom association thread (runs the handlers)
    if "DULServiceProvider" in text:
        return "dul"               # pynetdicom PDU reader/writer
    if "EPollReactor" in text or "mainLoop" in text:
        return "reactor"
    if "_threadworker" in text or "threadpool" in text:
        return "pools"             # archive / catalog thread pools
    return "other"


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Per kind of thread: its share of samples and the functions it spends them in
    (inclusive), from a py-spy raw (collapsed, --threads) file."""
    kinds: dict[str, int] = {}
    inclusive: dict[str, dict[str, int]] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        kind = _thread_kind(frames)
        total += n
        kinds[kind] = kinds.get(kind, 0) + n
        bucket = inclusive.setdefault(kind, {})
        for f in set(frames):
            if not any(x in f for x in _SKIP):
                bucket[f] = bucket.get(f, 0) + n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples: " + "  ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))]
    for kind in ("association", "dul", "pools", "reactor"):
        if kind not in inclusive:
            continue
        lines.append(f"{kind} thread(s), inclusive share of their own samples:")
        ranked = sorted(inclusive[kind].items(), key=lambda kv: -kv[1])
        for f, n in ranked[:top]:
            lines.append(f"  {100 * n / kinds[kind]:5.1f}%  {f}")
    return lines


def bounded(seconds: float) -> Callable[[], bool]:
    """A deadline check for loops: returns True while time remains."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline
