"""Child processes for tests: start with a log file, stop by PID only, show a log tail."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import weakref
from pathlib import Path
from typing import Mapping, Sequence

_LIVE: "weakref.WeakSet[Process]" = weakref.WeakSet()


class Process:
    """One child process whose stdout+stderr go to *log_path*.

    Stopped only through its own PID: SIGTERM, bounded wait, then SIGKILL. With
    *group* it runs in a process group of its own and the signals go to that group —
    for servers that fork a child per association (dcmqrscp), whose children are ours too.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, *, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None, group: bool = False):
        self.group = group
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.env, start_new_session=self.group)
        finally:
            log.close()
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to *timeout* s, then SIGKILL; return the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.group:
            self._signal(signal.SIGKILL)        # children that outlived their parent
        return self.popen.poll()

    def kill9(self, timeout: float = 10.0) -> int | None:
        """SIGKILL the process (by PID) and reap it."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGKILL)
            self.popen.wait(timeout)
        elif self.group:
            self._signal(signal.SIGKILL)        # children outliving their parent
        return self.popen.poll()

    def _signal(self, sig) -> None:
        try:
            if self.group:
                os.killpg(self.popen.pid, sig)  # the group we created for it
            else:
                os.kill(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last *lines* lines of a text file ('' if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        try:
            proc.kill9(timeout=5)
        except Exception:
            pass


class Server:
    """Base of a server the tests run (a peer, Orthanc, dcmqrscp): ``start()`` and
    ``stop()`` come from the subclass; a context manager that stops it, and removes a
    work directory it made itself (``_own_dir``) when the block ended cleanly."""

    process: Process | None = None
    workdir: Path
    _own_dir = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return bool(self.process and self.process.alive)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_dir and exc[0] is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
