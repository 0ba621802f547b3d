"""TOML configuration -> typed, frozen settings.

Every problem is reported as one :class:`ConfigError` whose message names the file, the
key and the reason, e.g. ``etc/peer.toml: facade.port: must be an integer 1-65535, got
'abc'``. No config at all means the embedded default: one peer, AE title ``PACSP2P`` on
port 11112, data under ``./pacsp2p-data``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from pacsp2p.smallfile import read_small
from pacsp2p.settings import (DEFAULT_AE, DEFAULT_PORT, RIGHTS, AdminSettings,  # noqa: F401
                              ArchiveConfig, AuditSettings, ClusterSettings, ConfigError,
                              Destination, FacadeSettings, Modality, OverlaySettings,
                              PeerSettings, Settings, StorageSettings, StrategySettings)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash
# a peer's or an archive's name: a file name too (tls/<peer>.crt, archives/<archive>)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RULE = "must be 1-64 letters, digits, '.', '_' or '-' (not first)"
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)(\w([\w-]{0,61}\w)?)(\.\w([\w-]{0,61}\w)?)*\.?$",
                          re.ASCII)      # \w: "_" too (PACS_01: /etc/hosts, NetBIOS names)


MAX_INT = 1 << 53         # an integer value at most (SQLite and JSON keep it exactly)
MAX_BACKUPS = 10000       # [audit] backups at most


class _Reader:
    """Typed access to one table of the TOML document, remembering the dotted path."""

    def __init__(self, source: str, table: dict, prefix: str):
        self.source, self.table, self.prefix = source, dict(table), prefix
        for key, value in self.table.items():      # a NUL: no path, host or name holds one
            if isinstance(value, str) and "\0" in value:
                raise self.fail(key, f"must not hold a NUL character, got {value!r}")

    def fail(self, key: str, reason: str) -> ConfigError:
        where = f"{self.prefix}.{key}" if self.prefix else key
        where = where if where.isprintable() else ascii(where)[1:-1]   # "A\nB": one line
        return ConfigError(f"{self.source}: {where}: {reason}")

    def take(self, key: str, kind: type | tuple, default: Any, what: str) -> Any:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) \
                or (isinstance(value, float) and not math.isfinite(value)):  # nan, inf
            raise self.fail(key, f"must be {what}, got {value!r}")
        if isinstance(value, int) and abs(value) > MAX_INT:    # tomllib reads any size
            raise self.fail(key, f"must be {what}, at most 2^53, got {str(value)[:40]}")
        return value

    def name(self, key: str, default: str | None) -> str | None:
        value = self.take(key, str, default, "a string")
        if value is not None and not _NAME_RE.match(value):
            raise self.fail(key, f"{_NAME_RULE}, got {value!r}")
        return value

    def port(self, key: str, default: int, low: int = 1) -> int:
        what = "an integer 1-65535" if low == 1 else "-1 (none), 0 (any free port) or 1-65535"
        value = self.take(key, int, default, what)
        if not low <= value <= 65535:
            raise self.fail(key, f"must be {what}, got {value!r}")
        return value

    def ae(self, key: str, default: str) -> str:
        value = self.take(key, str, default, "an AE title (1-16 characters)")
        return check_ae(value, lambda reason: self.fail(key, reason))

    def done(self) -> None:
        for key in self.table:
            raise self.fail(key, "unknown key")


MAX_LINKS = 8             # [destinations] associations: at most this many at once

# [facade] limits on hostile input: key -> (type, default, lowest, highest, what it must
# be); a timer past a day (1e308) was in effect off
FACADE_LIMITS = {
    "max_pending": (int, 64, 1, None, "an integer >= 1"),
    "max_per_address": (int, 16, 1, None, "an integer >= 1"),
    "artim_timeout": ((int, float), 30.0, 0.01, 86400, "seconds (a number > 0, <= 86400)"),
    "idle_timeout": ((int, float), 60.0, 0.01, 86400, "seconds (a number > 0, <= 86400)"),
    "max_dataset": (int, 4 << 30, 1024, None, "an integer (bytes) >= 1024"),
    "fd_reserve": (int, 64, 0, None, "an integer >= 0 (0: no check)"),
    "min_peer_pdu": (int, 4096, 0, None, "an integer (bytes) >= 0 (0: any)"),
    "commitment_wait": ((int, float), 30.0, 0, 3600, "seconds (a number >= 0, <= 3600)"),
}


def _in_range(f, key, kind, default, lowest, highest, what):
    """*key* of the table *f*, a number from *lowest* to *highest* (None: no bound)."""
    if not lowest <= (value := f.take(key, kind, default, what)) <= (highest or value):
        raise f.fail(key, f"must be {what}, got {value!r}")
    return float(value) if kind != int else value


def _at_least(r: _Reader, key: str, default: int, lowest: int) -> int:
    if (value := r.take(key, int, default, f"an integer >= {lowest}")) < lowest:
        raise r.fail(key, f"must be an integer >= {lowest}, got {value}")
    return value


def _positive(r: _Reader, key: str, default: float) -> float:
    if not (value := r.take(key, (int, float), default, "a number > 0")) > 0:
        raise r.fail(key, f"must be a number > 0, got {value}")
    return value


def archive_integer(opts: dict, key: str, default: int, lowest: int, where: str) -> int:
    """The integer *key* of an ``[[archives]]`` entry's options *opts* (*default* if
    absent), at least *lowest*; else ConfigError "*where*.*key*: reason" (*where*: the
    file and the entry)."""
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{where}.{key}: must be an integer >= {lowest}, got {value!r}")
    return value


def check_ae(value: str, fail) -> str:
    stripped = value.strip()
    if not _AE_RE.match(value) or not stripped:
        raise fail(f"must be an AE title of 1-16 characters without backslash, got {value!r}")
    return stripped


def _rights(value, fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(f"must be a list of {', '.join(map(repr, RIGHTS))}, got {value!r}")
    for v in value:
        if v not in RIGHTS:
            raise fail(f"{v!r} is not one of {', '.join(map(repr, RIGHTS))}")
    return tuple(r for r in RIGHTS if r in value)


def check_host(text, fail) -> str:
    """An IP address, a CIDR network or a host name (returned normalised)."""
    if not isinstance(text, str) or not text.strip():
        raise fail(f"must be an IP address, a CIDR network or a host name, got {text!r}")
    text = text.strip()
    try:
        return str(ipaddress.ip_network(text, strict=False)) if "/" in text else \
            str(ipaddress.ip_address(text))
    except ValueError:
        if "/" in text or ":" in text or text.replace(".", "").isdigit() or \
                not _HOSTNAME_RE.match(text):
            raise fail(f"must be an IP address, a CIDR network or a host name, got "
                       f"{text!r}") from None
        return text.lower().rstrip(".")


def _bind(r: _Reader, key: str = "bind", default: str = "0.0.0.0") -> str:
    """A listener's ``bind`` (or ``advertise``): an IP address or a host name ("" or 0.0.0.0:
    every interface), stripped; "999.1.1.1" or " " refused here, not at start."""
    value = r.take(key, str, default, "an address string")

    def refused(_why=None):
        return r.fail(key, f"must be an IP address or a host name, got {value!r}")
    if value.strip() and "/" not in value:
        check_host(value, refused)
    elif value:
        raise refused()
    return value.strip()


def is_loopback(bind: str) -> bool:
    if bind.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip()).is_loopback
    except ValueError:
        return False


def parse_address(text: str, fail) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")       # host: an address or name ("a b": no)
    refused = lambda _=None: fail(f'must be "host:port", got {text!r}')  # noqa: E731
    if not sep or "/" in host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise refused()
    return check_host(host.strip("[]"), refused), int(port)


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    return Path(value) if Path(value).is_absolute() else (base / value).resolve()


def _facade_security(f: _Reader, base: Path) -> dict:
    """The [facade] keys of TLS and of who may associate (docs/security.md)."""
    out = {}
    tls_port = f.take("tls_port", int, 0, "an integer 1-65535 (0: no TLS port)")
    if not 0 <= tls_port <= 65535:
        raise f.fail("tls_port", f"must be an integer 1-65535 (0: no TLS port), got "
                                 f"{tls_port!r}")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        out[key] = _path(f.take(key, str, None, "a file path"), base)
    require = f.take("tls_require_client_cert", bool, True, "true or false")
    tls_only = f.take("tls_only", bool, False, "true or false")
    if tls_port:
        for key in ("tls_cert", "tls_key"):
            if out[key] is None:
                raise f.fail(key, "is required with tls_port (a PEM file)")
        if require and out["tls_ca"] is None:
            raise f.fail("tls_ca", "is required to check client certificates (the CA "
                                   "file), or set tls_require_client_cert = false")
    elif tls_only:
        raise f.fail("tls_only", "needs tls_port")
    unknown = f.take("allow_unknown", list, list(RIGHTS), "a list of rights")
    out.update(tls_port=tls_port, tls_require_client_cert=require, tls_only=tls_only,
               check_called_ae=f.take("check_called_ae", bool, True, "true or false"),
               check_modality_host=f.take("check_modality_host", bool, True,
                                          "true or false"),
               allow_unknown=_rights(unknown, lambda r: f.fail("allow_unknown", r)))
    return out


def _modalities(m: _Reader, source: str, facade: FacadeSettings,
                destinations: dict) -> dict[str, Modality]:
    """[modalities]: AE title -> "host" or { host, allow, move_to, certificate }."""
    out: dict[str, Modality] = {}
    for ae, value in list(m.table.items()):
        m.table.pop(ae)
        title = check_ae(ae, lambda r, ae=ae: m.fail(ae, r))
        if isinstance(value, str):
            value = {"host": value}
        if not isinstance(value, dict):
            raise m.fail(ae, f'must be "host" or a table with host, allow, move_to, '
                             f'certificate, got {value!r}')
        sub = _Reader(source, value, f"modalities.{ae}")
        hosts = sub.take("host", (str, list), [], "a host, a CIDR network or a list of them")
        hosts = [hosts] if isinstance(hosts, str) else hosts
        if "host" in value and not hosts:
            raise sub.fail("host", "must name at least one host (leave it out for any)")
        hosts = tuple(check_host(h, lambda r: sub.fail("host", r)) for h in hosts)
        allow = _rights(sub.take("allow", list, list(RIGHTS), "a list of rights"),
                        lambda r: sub.fail("allow", r))
        move_to = sub.take("move_to", list, None, "a list of [destinations] AE titles")
        if move_to is not None:
            names = []
            for d in move_to:
                if not isinstance(d, str) or d.strip() not in destinations:
                    raise sub.fail("move_to", f"{d!r} is not a [destinations] entry")
                names.append(d.strip())
            move_to = tuple(names)
        cert = sub.take("certificate", str, None, "a certificate's common name")
        if cert is not None and (not facade.tls_port or facade.tls_ca is None):
            raise sub.fail("certificate", "needs [facade] tls_port and tls_ca (client "
                                          "certificates are checked on the TLS port)")
        sub.done()
        out[title] = Modality(title, hosts, allow, move_to, cert)
    return out


_USER_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_ORIGIN_RE = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
PASSWORD_HASH_RE = re.compile(rf"^scrypt\$(\d+)\$(\d+)\$(\d+)\${_B64}\${_B64}$")


def check_password_hash(value, fail) -> str:
    """A password hash as ``pacsp2p admin hash-password`` prints it:
    ``scrypt$N$r$p$salt$hash`` (base64), N a power of two 2^14..2^20, r 1-32, p 1-16."""
    m = PASSWORD_HASH_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise fail("must be a password hash (\"scrypt$...\"), not a password: make one "
                   "with 'pacsp2p admin hash-password'")
    n, r, p = (int(x) for x in m.groups())
    if n & (n - 1) or not (1 << 14) <= n <= (1 << 20) or not 1 <= r <= 32 or \
            not 1 <= p <= 16:
        raise fail(f"scrypt parameters N={n} r={r} p={p} out of range (N a power of two "
                   f"2^14..2^20, r 1-32, p 1-16)")
    return value


def _admin(ad: _Reader, base: Path) -> AdminSettings:
    """[admin]: where the endpoint listens, who may use it, HTTPS. Bound to anything but
    a loopback address it needs HTTPS and a way to authenticate (docs/operations.md)."""
    bind = _bind(ad, "bind", "127.0.0.1")
    port = ad.port("port", 11180)
    users = {}
    for name, value in ad.take("users", dict, {}, 'a table of name = "scrypt$..."').items():
        if not _USER_RE.match(name):
            raise ad.fail(f"users.{name}", "a user name is 1-64 letters, digits or ._@-")
        users[name] = check_password_hash(value, lambda r, n=name: ad.fail(f"users.{n}", r))
    files = {key: _path(ad.take(key, str, None, "a file path"), base)
             for key in ("tls_cert", "tls_key", "tls_client_ca")}
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        missing = "tls_key" if files["tls_key"] is None else "tls_cert"
        raise ad.fail(missing, "is required with " + ("tls_cert" if missing == "tls_key"
                                                      else "tls_key") + " (a PEM file)")
    if files["tls_client_ca"] is not None and files["tls_cert"] is None:
        raise ad.fail("tls_client_ca", "needs HTTPS (tls_cert and tls_key): client "
                                       "certificates are checked in the TLS handshake")
    origins = []
    listed = ad.take("origins", list, [], 'a list of "https://host[:port]"')
    for i, origin in enumerate(listed):
        if not isinstance(origin, str) or not _ORIGIN_RE.match(origin.strip().rstrip("/")):
            raise ad.fail(f"origins[{i}]", f'must be "https://host[:port]" (or http://), '
                                           f"got {origin!r}")
        origins.append(origin.strip().rstrip("/").lower())
    ad.done()
    admin = AdminSettings(bind=bind, port=port, users=users, origins=tuple(origins), **files)
    if not is_loopback(bind):
        lacks = [what for what, ok in (
            ("HTTPS (admin.tls_cert and admin.tls_key)", admin.tls_cert is not None),
            ("authentication (admin.users, or admin.tls_client_ca)", admin.authenticates))
            if not ok]
        if lacks:
            raise ad.fail("bind", f"{bind!r} is not a loopback address: the admin endpoint "
                                  f"then needs {' and '.join(lacks)}, or bind it to "
                                  f"127.0.0.1 (see docs/operations.md)")
    return admin


def _swim(o: _Reader, heartbeat: float) -> dict:
    """The membership protocol's knobs of [overlay] (docs/cluster.md)."""
    def number(key, default, low, high, kind=(int, float)):
        v = o.take(key, kind, default, "an integer" if kind is int else "a number")
        if not low <= v <= high:
            raise o.fail(key, f"must be {low}-{high}, got {v}")
        return v
    timeout = number("probe_timeout", 0.0, 0.0, 60.0)
    if timeout and timeout >= heartbeat:
        raise o.fail("probe_timeout", f"must be below heartbeat ({heartbeat} s), got {timeout}")
    return {"probe_timeout": float(timeout),
            "indirect_probes": number("indirect_probes", 3, 0, 16, int),
            "suspicion_mult": float(number("suspicion_mult", 2.5, 0.5, 100.0)),
            "gossip_interval": float(number("gossip_interval", 0.2, 0.01, 60.0)),
            "gossip_fanout": number("gossip_fanout", 3, 1, 64, int),
            "max_links": number("max_links", 32, 2, 100000, int),
            "pull_interval": float(number("pull_interval", 0.5, 0.0, 3600.0))}


def load(path: str | Path | None = None) -> Settings:
    """Read *path* (or nothing: the embedded default) into :class:`Settings`."""
    if path is None:
        return from_dict({}, "<defaults>", Path.cwd())
    path = Path(path)
    try:
        doc = tomllib.loads(read_small(path).decode())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read config: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:              # tomllib recurses: [[[[... 5,000 deep
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deep") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte 0x{e.object[e.start]:02x} "
                          f"on line {line})") from None
    return from_dict(doc, str(path), path.parent)


def from_dict(doc: dict, source: str, base: Path) -> Settings:
    top = _Reader(source, doc, "")

    def table(key: str) -> _Reader:
        value = top.take(key, dict, {}, "a table")
        return _Reader(source, value, key)

    p = table("peer")
    name = p.name("name", "pacsp2p")
    data_dir = Path(p.take("data_dir", str, "pacsp2p-data", "a path string"))
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()
    p.done()

    f = table("facade")
    allowed = f.take("allowed_calling_aes", list, [], "a list of AE titles")
    allowed_t = []
    for a in allowed:
        if not isinstance(a, str):
            raise f.fail("allowed_calling_aes", f"must list strings, got {a!r}")
        allowed_t.append(check_ae(a, lambda r: f.fail("allowed_calling_aes", r)))
    max_pdu = f.take("max_pdu", int, 0, "an integer (bytes, 0 = unlimited)")
    if max_pdu and not 4096 <= max_pdu <= 2**31:
        raise f.fail("max_pdu", f"must be 0 or 4096..2^31, got {max_pdu}")
    if "engine" in f.table:
        raise f.fail("engine", "was removed: the facade has one engine (the Twisted "
                               "acceptor); delete this line")
    limits = {key: _in_range(f, key, *spec) for key, spec in FACADE_LIMITS.items()}
    facade = FacadeSettings(
        ae_title=f.ae("ae_title", DEFAULT_AE),
        port=f.port("port", DEFAULT_PORT),
        bind=_bind(f),
        allowed_calling_aes=tuple(allowed_t),
        max_pdu=max_pdu,
        max_associations=_at_least(f, "max_associations", 32, 1),
        keep_compressed=f.take("keep_compressed", bool, True, "true or false"),
        **limits,
        **_facade_security(f, base),
    )
    f.done()
    if facade.tls_port == facade.port and not facade.tls_only:
        raise f.fail("tls_port", f"must differ from port ({facade.port})")

    d = table("destinations")
    destinations: dict[str, Destination] = {}
    for ae, value in list(d.table.items()):
        d.table.pop(ae)
        fail = lambda r, ae=ae: d.fail(ae, r)  # noqa: E731
        title = check_ae(ae, fail)
        mode = "relay"
        tls: dict = {}
        associations = 1
        if isinstance(value, dict):
            sub = _Reader(source, value, f"destinations.{ae}")
            address = sub.take("address", str, None, 'a "host:port" string')
            if address is None:
                raise sub.fail("address", "is required")
            mode = sub.take("mode", str, "relay", '"relay" or "direct"')
            if mode not in ("relay", "direct"):
                raise sub.fail("mode", f'must be "relay" or "direct", got {mode!r}')
            ca = _path(sub.take("tls_ca", str, None, "a file path"), base)
            if sub.take("tls", bool, False, "true or false"):
                if mode == "direct":
                    raise sub.fail("tls", 'is for mode = "relay" only (in direct mode '
                                          'other peers send, without this TLS setting)')
                ca = ca or facade.tls_ca
                if ca is None:
                    raise sub.fail("tls", "needs a CA to check the destination's "
                                          "certificate: tls_ca here or in [facade]")
                tls = dict(tls=True, tls_cert=facade.tls_cert, tls_key=facade.tls_key,
                           tls_ca=ca)
            elif ca is not None:
                raise sub.fail("tls_ca", "is only used with tls = true")
            associations = sub.take("associations", int, 1, f"an integer 1-{MAX_LINKS}")
            if not 1 <= associations <= MAX_LINKS:
                raise sub.fail("associations",
                               f"must be an integer 1-{MAX_LINKS}, got {associations}")
            sub.done()
        elif isinstance(value, str):
            address = value
        else:
            raise fail(f'must be "host:port" or a table with address and mode, got {value!r}')
        host, port = parse_address(address, fail)
        destinations[title] = Destination(title, host, port, mode, **tls,
                                          associations=associations)

    modalities = _modalities(table("modalities"), source, facade, destinations)

    archives_raw = top.take("archives", list, [{"name": "local", "adapter": "embedded"}],
                            "an array of tables ([[archives]])")
    archives = []
    seen = set()
    for i, raw in enumerate(archives_raw):
        if not isinstance(raw, dict):
            raise top.fail(f"archives[{i}]", "must be a table")
        a = _Reader(source, raw, f"archives[{i}]")
        aname = a.name("name", None)
        if not aname:
            raise a.fail("name", "is required")
        if aname in seen:
            raise a.fail("name", f"duplicate archive name {aname!r}")
        seen.add(aname)
        adapter = a.take("adapter", str, "embedded", "an adapter name")
        site = a.take("site", str, None, "a string")
        max_fetches = a.take("max_fetches", int, None, "an integer >= 1")
        if max_fetches is not None and max_fetches < 1:
            raise a.fail("max_fetches", f"must be an integer >= 1, got {max_fetches}")
        archives.append(ArchiveConfig(aname, adapter, site, dict(a.table), max_fetches))

    admin = _admin(table("admin"), base)

    overlay = None
    if "overlay" in doc:
        o = table("overlay")
        port = o.port("port", 11114)
        seeds = []
        for i, seed in enumerate(o.take("seeds", list, [], 'a list of "host:port"')):
            if not isinstance(seed, str):
                raise o.fail("seeds", f'must list "host:port" strings, got {seed!r}')
            seeds.append(parse_address(seed, lambda r: o.fail(f"seeds[{i}]", r)))
        tls_dir = o.take("tls_dir", str, None, "a directory path")
        if tls_dir is None:
            raise o.fail("tls_dir", "is required (the directory with ca.crt and this "
                                    "peer's NAME.crt/NAME.key)")
        tls_path = Path(tls_dir) if Path(tls_dir).is_absolute() else (base / tls_dir).resolve()
        heartbeat = o.take("heartbeat", (int, float), 0.5, "seconds (a number)")
        if not 0.05 <= heartbeat <= 10:
            raise o.fail("heartbeat", f"must be 0.05-10 seconds, got {heartbeat}")
        handshake = o.take("handshake_timeout", (int, float), 10.0, "seconds (a number)")
        if not 0.1 <= handshake <= 300:
            raise o.fail("handshake_timeout", f"must be 0.1-300 seconds, got {handshake}")
        read_port, push_port = (o.port(key, 0, low=-1) for key in ("read_port", "push_port"))
        overlay = OverlaySettings(
            port=port, bulk_port=o.port("bulk_port", port + 1), read_port=read_port,
            push_port=push_port,
            bind=_bind(o),
            advertise=_bind(o, "advertise", ""),
            seeds=tuple(seeds), tls_dir=tls_path, heartbeat=float(heartbeat),
            phi_threshold=float(_positive(o, "phi_threshold", 8.0)),
            handshake_timeout=float(handshake), **_swim(o, heartbeat))
        o.done()

    _distinct_ports(source, facade, admin, overlay)
    c = table("cluster")
    default_r = 2 if overlay is not None else 1
    replicas = c.take("replicas", int, default_r, "an integer >= 1")
    if replicas < 1:
        raise c.fail("replicas", f"must be >= 1, got {replicas}")
    quorum = c.take("write_quorum", int, min(replicas, default_r), "an integer >= 1")
    if not 1 <= quorum <= replicas:
        raise c.fail("write_quorum", f"must be 1..replicas ({replicas}), got {quorum}")
    repair_after = c.take("repair_after", (int, float), 600.0, "seconds (a number > 0)")
    if not repair_after > 0:
        raise c.fail("repair_after", f"must be seconds (a number > 0), got {repair_after}")
    rate = "MB/s (a number >= 0, 0: no limit)"
    repair_rate = _in_range(c, "repair_rate", (int, float), 50.0, 0, None, rate)
    scrub_rate = _in_range(c, "scrub_rate", (int, float), 20.0, 0, None, rate)
    scrub_interval = _in_range(c, "scrub_interval", (int, float), 604800.0, 0, None,
                                   "seconds (a number >= 0, 0: no background scrub)")
    scrub_sample = c.take("scrub_sample", (int, float), 0.01, "a fraction (0 < x <= 1)")
    if not 0 < scrub_sample <= 1:
        raise c.fail("scrub_sample", f"must be a fraction (0 < x <= 1), got {scrub_sample}")
    c.done()
    cluster = ClusterSettings(replicas, quorum, float(repair_after), float(repair_rate),
                              float(scrub_rate), float(scrub_interval), float(scrub_sample))

    st = table("strategies")
    plugin_paths = []
    for i, pth in enumerate(st.take("plugins", list, [],
                                    "a list of entry-point names or file paths")):
        if not isinstance(pth, str) or not pth:
            raise st.fail(f"plugins[{i}]", "must be an entry-point name or a file path, "
                                           f"got {pth!r}")
        if pth.endswith(".py") or "/" in pth:           # a file, relative to this config
            plugin_paths.append(Path(pth) if Path(pth).is_absolute()
                                else (base / pth).resolve())
        else:
            plugin_paths.append(pth)
    strategies = StrategySettings(
        placement=st.take("placement", str, "rendezvous", "a strategy name"),
        selection=st.take("selection", str, "nearest", "a strategy name"),
        balancing=st.take("balancing", str, "work-stealing", "a strategy name"),
        plugins=tuple(plugin_paths),
        options=st.take("options", dict, {}, "a table of plugin options"),
        first_copy=st.take("first_copy", str, "auto", '"auto", "placement" or "local"'),
        first_copy_slack=_in_range(st, "first_copy_slack", (int, float), 1.0, 0, 100,
                                       "a fraction of the mean (a number 0-100)"))
    if strategies.first_copy not in ("auto", "placement", "local"):
        raise st.fail("first_copy", 'must be "auto", "placement" or "local", got '
                                    f"{strategies.first_copy!r}")
    st.done()

    s = table("storage")
    storage = StorageSettings(
        fsync=s.take("fsync", bool, True, "true or false"),
        sync_directories=s.take("sync_directories", bool, False, "true or false"))
    s.done()
    audit = _audit(table("audit"))
    top.done()
    return Settings(source, PeerSettings(name, data_dir), facade, destinations,
                    tuple(archives), storage, admin, overlay, cluster, strategies,
                    modalities=modalities, audit=audit)


def _overlaps(a: str, b: str) -> bool:
    """Do listeners bound to *a* and *b* take the same port (one is a wildcard)?"""
    return a == b or {a, b} & {"0.0.0.0", "::", ""} != set()


def _distinct_ports(source: str, facade, admin, overlay) -> None:
    """ConfigError naming both keys when two of the peer's listeners would take one
    port (the second one could not start: "Address already in use")."""
    listeners = [] if facade.tls_only else [("facade.port", facade.port, facade.bind)]
    if facade.tls_port:
        listeners.append(("facade.tls_port", facade.tls_port, facade.bind))
    listeners.append(("admin.port", admin.port, admin.bind))
    if overlay is not None:
        listeners += [(f"overlay.{key}", getattr(overlay, key), overlay.bind)
                      for key in ("port", "bulk_port", "read_port", "push_port")
                      if getattr(overlay, key) > 0]      # 0: any free port; -1: none
    for i, (key, port, bind) in enumerate(listeners):
        for other, port2, bind2 in listeners[:i]:
            if port == port2 and _overlaps(bind, bind2):
                raise ConfigError(f"{source}: {key}: {port} is {other} too (on {bind2}); "
                                  "every listener needs a port of its own")


def _audit(a: _Reader) -> AuditSettings:
    enabled = a.take("enabled", bool, True, "true or false")
    max_bytes = a.take("max_bytes", int, 50 << 20, "an integer (bytes) >= 4096")
    if max_bytes < 4096:
        raise a.fail("max_bytes", f"must be an integer (bytes) >= 4096, got {max_bytes}")
    backups = _at_least(a, "backups", 10, 1)
    if backups > MAX_BACKUPS:     # a rotation walks every number: 10^6 took 5 s each
        raise a.fail("backups", f"must be an integer 1-{MAX_BACKUPS}, got {backups}")
    a.done()
    return AuditSettings(enabled, max_bytes, backups)
