"""What a peer checks before it starts, shared by ``twistd pacsp2p`` and
``pacsp2p check-config`` so that both refuse a config with the same message.

``config.load`` checks the TOML itself (types, value ranges, names). Then:

- ``archives``: every ``[[archives]]`` block made by its adapter (``make_archive``): the
  adapter name (entry point or file), each adapter's own options, the interfaces the
  archive claims;
- ``strategies``: the strategy plugins named in ``[strategies] plugins`` (entry points,
  files), their options (``pacsp2p_configure``) and the strategy each role names;
- ``credentials``: with an ``[overlay]``, the TLS files it names (the cluster CA, this
  peer's certificate and key: present, matching, not expired, issued by the CA);
- the facade's DICOM TLS files and those of TLS destinations
  (``dicom.tls.settings_options``), and the admin endpoint's HTTPS files
  (``dicom.tls.admin_options``).

- ``paths``: the data directory and the overlay's TLS directory are not files (a
  mistyped path); ``places``: it and every archive's directory are not on a kernel
  filesystem (/proc, /sys); ``descriptors``: ``[facade] fd_reserve`` below the
  open-file limit.

Each raises ``config.ConfigError`` (or ``overlay.tls.TLSError``) with a one-line
message; nothing here opens a port, a file for writing or a connection.
"""

from __future__ import annotations

import resource
from pathlib import Path

import OpenSSL

from pacsp2p.adapters import make_archive
from pacsp2p.config import ConfigError
from pacsp2p.dicom import tls as dicom_tls
from pacsp2p.overlay import tls
from pacsp2p.strategies import Strategies

__all__ = ["archives", "check", "credentials", "descriptors", "kernel_fs", "paths", "places",
           "strategies"]

KERNEL_FS = frozenset({"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "configfs", "pstore", "bpf", "efivarfs", "fusectl"})


def paths(settings) -> None:
    """The data directory is a directory, or not there yet (made at start) and not to be
    made under a file; the overlay's ``tls_dir`` likewise (a missing one: ``credentials``
    says so)."""
    dirs = [("peer.data_dir", settings.data_dir)]
    if settings.overlay is not None:
        dirs.append(("overlay.tls_dir", settings.overlay.tls_dir))
    for key, path in dirs:
        there = next(p for p in (path, *path.parents) if p.exists())
        if not there.is_dir():                # it, or the file it would be made in
            where = "" if there == path else f" ({there} is a file)"
            raise ConfigError(f"{settings.source}: {key}: {path}: not a directory{where}")


def kernel_fs(path: Path) -> str | None:
    """The kernel filesystem (proc, sysfs, ...) *path* is on, by the longest mount point
    of /proc/self/mounts above it; None for any other (or when they cannot be read)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(path.resolve()), "", None
    for fields in (line.split() for line in mounts):
        point = fields[1].replace("\\040", " ") if len(fields) > 2 else ""
        if point and len(point) >= len(best) and (
                target == point or target.startswith(point.rstrip("/") + "/")):
            best, kind = point, fields[2]
    return kind if kind in KERNEL_FS else None


def places(settings, made=()) -> None:
    """The data directory and the directory of every archive made (*made*: its ``root``)
    are not on a kernel filesystem: ``/proc/self`` was "ok", then twistd "cannot start:
    peer.data_dir: /proc/self: No such file or directory"."""
    for key, path in [("peer.data_dir", settings.data_dir)] + [
            (f"archives.{a.name}.path", a.root) for a in made
            if isinstance(getattr(a, "root", None), Path)]:
        if kind := kernel_fs(path):
            raise ConfigError(f"{settings.source}: {key}: {path}: on the kernel's {kind} "
                              "filesystem, where no file can be kept")


OPEN_FILES = 65536      # the soft open-file limit a peer raises itself to (at most the hard)
ROOM = 256              # descriptors fd_reserve must leave: its own files, one association


def descriptors(settings) -> None:
    """``[facade] fd_reserve`` leaves room below the open-file limit the peer will run
    with (its soft limit raised to the hard one, at most ``OPEN_FILES``): the facade
    takes no connection within fd_reserve of it, so one past it took none, silently."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    limit = soft if soft == resource.RLIM_INFINITY else max(soft, raised)
    reserve = settings.facade.fd_reserve
    if limit != resource.RLIM_INFINITY and reserve and reserve + ROOM > limit:
        raise ConfigError(f"{settings.source}: facade.fd_reserve: must leave {ROOM} of the "
                          f"open-file limit ({limit}) for the peer's files and connections, "
                          f"got {reserve}")


def archives(settings, reactor, catalog=None) -> list:
    """The archives of *settings*, made and checked by their adapters (not started)."""
    return [make_archive(a, settings, reactor, catalog=catalog) for a in settings.archives]


def strategies(settings) -> Strategies:
    """The peer's strategies: plugins loaded and configured, roles checked."""
    st = settings.strategies
    return Strategies(st.placement, st.selection, st.plugins, settings.source, st.options,
                      settings.peer.name, st.balancing)


def credentials(settings):
    """The overlay's TLS credentials (None without an ``[overlay]``); a file there that
    is not what it should be (not PEM, a directory) is a ConfigError naming
    ``overlay.tls_dir``, not a traceback."""
    if settings.overlay is None:
        return None
    directory = settings.overlay.tls_dir
    try:
        return tls.Credentials(directory, settings.peer.name)
    except tls.TLSError:
        raise
    except (OSError, ValueError, OpenSSL.crypto.Error) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"{settings.source}: overlay.tls_dir: {directory}: its "
                          f"certificates or key cannot be read ({type(e).__name__}: "
                          f"{why})") from None


def check(settings, reactor=None) -> dict:
    """Everything start-up checks of *settings*, in the order the peer does it; a short
    summary of what was checked."""
    if reactor is None:
        from twisted.internet import reactor
    paths(settings)
    descriptors(settings)
    made = archives(settings, reactor)
    places(settings, made)
    chosen = strategies(settings)
    credentials(settings)
    dicom_tls.settings_options(settings)
    dicom_tls.admin_options(settings)
    return {"archives": {a.name: getattr(a, "max_fetches", None) for a in made},
            "strategies": chosen.describe()}
