"""Who may use the admin endpoint: passwords, sessions, client certificates, the CLI's
token, and the checks that keep a browser's credentials from being used by other sites.

Ways to authenticate (any of them; docs/operations.md, "Admin endpoint authentication"):

- ``[admin] users``: name -> an scrypt hash (``pacsp2p admin hash-password`` makes one;
  RFC 7914, hashlib.scrypt, N=2^15 r=8 p=1 by default, a 16-byte random salt). A browser
  logs in on the console's form and gets a session cookie (HttpOnly, SameSite=Strict,
  Secure over HTTPS, 8 hours); a script sends HTTP Basic (``curl -u alice``). A
  password is checked in a thread of its own (scrypt takes ~0.1 s and 32 MiB), at most
  two at a time; a good Basic password is remembered for five minutes (keyed by an
  HMAC of it under a secret of this run, never stored in clear); an address with ten
  failures in five minutes is refused (429) until they age out.
- ``[admin] tls_client_ca``: over HTTPS, a client certificate issued by this CA (e.g.
  the cluster's ``tls/ca.crt``) authenticates its common name. The certificate is
  optional in the handshake (password users connect without one), verified if shown.
- The local token: at every start the peer writes a random token to
  ``<data_dir>/admin.token`` (mode 0600); the ``pacsp2p`` CLI on the same machine reads
  it and sends ``Authorization: Bearer``. Whoever can read the data directory can read
  the archive anyway, so this gives no one more than they have.

What needs it:

- Bound to a loopback address, reading (GET) needs nothing (only the machine's users
  reach the port); the ``Host`` header must then name a loopback address,
  ``localhost`` or the host of an ``[admin] origins`` entry, so a web page cannot reach
  the endpoint through DNS rebinding.
- Bound to any other address (which ``config`` allows only with HTTPS and users or a
  client CA), every request needs authentication: 401 otherwise.
- Write actions (the console's retrieve, ``POST /delete``, ...) always need an
  authenticated user — with one exception kept for scripts on the machine itself: on a
  loopback-bound endpoint with no ``users`` and no ``tls_client_ca``, a JSON write
  action from a loopback client is served as before (a JSON body cannot be posted by a
  page of another origin without a CORS preflight, which is never granted).

Browser posts (CSRF): a write from a browser form carries a token, an HMAC of the
session (or user) under a secret of this run, checked in constant time; a request
whose ``Origin`` is neither the endpoint's own nor one of ``[admin] origins`` (a
reverse proxy's), or whose ``Sec-Fetch-Site`` says another site sent it, is refused
(403) whatever it carries. Session cookies are
SameSite=Strict on top.
"""

from __future__ import annotations

import base64
import collections
import getpass
import hashlib
import hmac
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel

from pacsp2p import threads
from pacsp2p.config import PASSWORD_HASH_RE, is_loopback
from pacsp2p.dicom.admission import LogLimit
from pacsp2p.validate import shown

log = Logger()

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
TOKEN_FILE = "admin.token"
SESSION_TTL = 8 * 3600.0          # seconds a console login lasts
MAX_SESSIONS = 1000
BASIC_CACHE_TTL = 300.0           # seconds a verified Basic password is remembered
MAX_CHECKS_WAITING = 32           # password checks queued at most (else 503)
FAILURES, FAILURE_WINDOW = 10, 300.0   # failed logins per address per window, then 429


# -- passwords ------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of *password* (RFC 7914)."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                         maxmem=256 * n * r + (1 << 20), dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Does *password* match *stored* (a hash as ``hash_password`` makes)? Blocking."""
    m = PASSWORD_HASH_RE.match(stored or "")
    if m is None:
        return False
    n, r, p = (int(x) for x in m.groups())
    _, _, _, _, salt, key = stored.split("$")
    try:
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=n, r=r,
                             p=p, maxmem=256 * n * r + (1 << 20), dklen=len(
                                 base64.b64decode(key)))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, base64.b64decode(key))


def add_parser(sub):
    """``pacsp2p admin hash-password`` on *sub* (argparse subparsers)."""
    adm = sub.add_parser("admin", help="the admin endpoint: users and passwords")
    asub = adm.add_subparsers(dest="action", required=True)
    hp = asub.add_parser("hash-password",
                         help="print the [admin] users hash of a password (asked twice on "
                              "a terminal, else read from the first line of stdin)")
    hp.add_argument("user", nargs="?", help="print a whole 'user = \"...\"' line")
    hp.set_defaults(fn=cmd_hash_password)
    return adm


def cmd_hash_password(args) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("pacsp2p: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("pacsp2p: a password of at least 8 characters, please", file=sys.stderr)
        return 1
    hashed = hash_password(password)
    print(f'{args.user} = "{hashed}"' if args.user else hashed)
    return 0


# -- the CLI's token -----------------------------------------------------------------------

def write_token(data_dir: Path) -> str:
    """A new random token in ``data_dir/admin.token`` (0600), returned."""
    token = secrets.token_urlsafe(32)
    path = Path(data_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(TOKEN_FILE + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def read_token(data_dir: Path) -> str | None:
    try:
        return (Path(data_dir) / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


# -- requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Who made a request: ``how`` is "session", "basic", "certificate", "token" or
    "loopback" (the exception for JSON writes on an endpoint without users)."""

    name: str
    how: str
    session: str | None = None

    def __str__(self):
        return f"{self.name} ({self.how})"


def client_host(request) -> str | None:
    return getattr(request.getClientAddress(), "host", None)


def _header(request, name: bytes) -> str:
    return (request.getHeader(name) or b"").decode("latin-1").strip()


def host_of(value: str) -> str:
    """The host of a Host header value (``[::1]:80`` -> ``::1``, ``a:80`` -> ``a``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class Guard:
    """The authentication and anti-CSRF checks of one admin endpoint (see above).

    *admin*: ``config.AdminSettings``; *bind*: the address it listens on; *tls*: served
    over HTTPS; *token*: the CLI's token of this run (None: none accepted)."""

    def __init__(self, admin, bind: str, reactor=None, tls: bool = False,
                 token: str | None = None, clock=time.time):
        self.admin, self.bind, self.tls, self.token = admin, bind, tls, token
        self.reactor = reactor
        self.clock = clock
        self.secret = os.urandom(32)
        self.loopback = is_loopback(bind)
        # the hosts of [admin] origins (a reverse proxy's name) pass the Host check too
        self._origin_hosts = {host_of(urlsplit(o).netloc).lower()
                              for o in getattr(admin, "origins", ())}
        self.sessions: collections.OrderedDict[str, tuple[str, float]] = \
            collections.OrderedDict()
        self.cookie = f"pacsp2p_session_{admin.port}".encode()
        self._basic: dict[bytes, tuple[str, float]] = {}
        self._failures: dict[str, collections.deque] = {}
        self._checking = 0
        self._refusals = None           # a LogLimit, made at the first refusal

    # -- what the configuration allows --------------------------------------------------
    @property
    def open_reads(self) -> bool:
        """Reads need no authentication (a loopback-bound endpoint)."""
        return self.loopback

    @property
    def logins(self) -> bool:
        """Can a browser log in (users configured)?"""
        return bool(self.admin.users)

    @property
    def local_writes(self) -> bool:
        """The exception: JSON writes from loopback clients without credentials."""
        return self.loopback and not self.admin.authenticates

    def host_ok(self, request) -> bool:
        """On a loopback-bound endpoint, the Host header names a loopback address or
        localhost (no DNS rebinding); elsewhere any host name reaches it."""
        if not self.loopback:
            return True
        host = host_of(_header(request, b"host")).lower().rstrip(".")
        return host == "localhost" or is_loopback(host) or host in self._origin_hosts

    def origin(self, request) -> str:
        """This endpoint's origin as the client addressed it."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_header(request, b'host').lower()}"

    def same_origin(self, request) -> bool:
        """No sign that another site made the browser send *request*."""
        site = _header(request, b"sec-fetch-site").lower()
        if site and site not in ("same-origin", "none"):
            return False
        origin = _header(request, b"origin").lower()
        if origin and origin != "null":
            parts = urlsplit(origin)
            origin = f"{parts.scheme}://{parts.netloc}"
            return origin == self.origin(request) or origin in self.admin.origins
        return origin != "null"

    def refusal(self, fmt: str, **kw) -> None:
        """One warning line for a refused request (*fmt* with *kw*); at most 10 per 10
        seconds, then one counting the rest (``dicom.admission.LogLimit``), so a flood
        of refused requests cannot fill the disk."""
        if self._refusals is None:
            if self.reactor is None:
                from twisted.internet import reactor
                self.reactor = reactor
            self._refusals = LogLimit(self.reactor, logger=log)
        self._refusals("admin refusal", LogLevel.warn, fmt, **kw)

    # -- who is asking --------------------------------------------------------------------
    def identify(self, request) -> defer.Deferred:
        """Deferred[Identity | None] of *request*: token, certificate, session, Basic."""
        auth = _header(request, b"authorization")
        scheme, _, value = auth.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token and \
                hmac.compare_digest(value.encode(), self.token.encode()):
            return defer.succeed(Identity("pacsp2p-cli", "token"))
        cert = self._certificate(request)
        if cert is not None:
            return defer.succeed(Identity(cert, "certificate"))
        cookies = getattr(request, "received_cookies", None) or {}
        sid = (cookies.get(self.cookie) or b"").decode("latin-1")
        found = self.sessions.get(sid) if sid else None
        if found is not None:
            user, expires = found
            if expires > self.clock() and user in self.admin.users:
                return defer.succeed(Identity(user, "session", sid))
            self.sessions.pop(sid, None)
        if scheme == "basic" and self.admin.users:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode(
                    "utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return defer.succeed(None)
            return self.check_password(request, user, password).addCallback(
                lambda ok: Identity(user, "basic") if ok else None)
        return defer.succeed(None)

    def _certificate(self, request) -> str | None:
        if not self.tls or self.admin.tls_client_ca is None:
            return None
        transport = getattr(request.channel, "transport", None)
        get = getattr(transport, "getPeerCertificate", None)
        try:
            cert = get() if get is not None else None
        except Exception:
            return None
        cn = cert.get_subject().CN if cert is not None else None
        return cn if isinstance(cn, str) and cn else None

    def throttled(self, request) -> bool:
        """Too many failed passwords from this address lately?"""
        host = client_host(request) or "?"
        recent = self._failures.get(host)
        now = self.clock()
        while recent and recent[0] < now - FAILURE_WINDOW:
            recent.popleft()
        return bool(recent) and len(recent) >= FAILURES

    def _failed(self, request, user: str) -> None:
        host = client_host(request) or "?"
        if len(self._failures) > 10000:
            self._failures.clear()
        self._failures.setdefault(host, collections.deque(maxlen=FAILURES)).append(
            self.clock())
        log.warn("admin: wrong password for {user} from {host}", user=shown(user, 64),
                 host=host)

    def check_password(self, request, user: str, password: str) -> defer.Deferred:
        """Deferred[bool]: *password* is *user*'s (a thread; remembered a while). Raises
        ``Busy`` (as a failure) when too many checks wait or the address is throttled."""
        stored = self.admin.users.get(user)
        if self.throttled(request):
            return defer.fail(Busy(429, "too many failed logins from this address; "
                                        "try again in a few minutes"))
        key = hmac.new(self.secret, f"{user}\0{password}".encode(), "sha256").digest()
        now = self.clock()
        cached = self._basic.get(key)
        if cached is not None and cached[1] > now and cached[0] == stored:
            return defer.succeed(True)
        if self._checking >= MAX_CHECKS_WAITING:
            return defer.fail(Busy(503, "too many logins at once; try again"))
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self._checking += 1
        # an unknown user costs the same as a known one (no user enumeration by timing)
        against = stored or _DUMMY_HASH
        d = deferToThreadPool(self.reactor, threads.pool(self.reactor, "admin-auth", 1, 2),
                              verify_password, password, against)

        def done(ok):
            self._checking -= 1
            ok = bool(ok) and stored is not None
            if ok:
                if len(self._basic) > 256:
                    self._basic.clear()
                self._basic[key] = (stored, self.clock() + BASIC_CACHE_TTL)
            else:
                self._failed(request, user)
            return ok

        def error(f):
            self._checking -= 1
            return f
        d.addCallbacks(done, error)
        return d

    # -- sessions and CSRF tokens ---------------------------------------------------------
    def new_session(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = (user, self.clock() + SESSION_TTL)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return sid

    def session_cookie(self, request, sid: str, max_age: int | None = None) -> None:
        request.addCookie(self.cookie, sid.encode(), path=b"/", httpOnly=True,
                          secure=self.tls, sameSite="strict",
                          max_age=str(int(SESSION_TTL if max_age is None else max_age)))

    def end_session(self, request, identity: Identity | None) -> None:
        if identity is not None and identity.session:
            self.sessions.pop(identity.session, None)
        self.session_cookie(request, "", max_age=0)

    def csrf_token(self, identity: Identity | None) -> str:
        """The token a form of *identity* must post back (empty for nobody)."""
        if identity is None:
            return ""
        subject = f"session:{identity.session}" if identity.session else \
            f"{identity.how}:{identity.name}"
        return hmac.new(self.secret, subject.encode(), "sha256").hexdigest()

    def check_write(self, request, identity: Identity | None, form_token: str | None,
                    json_body: bool) -> tuple[int, str] | None:
        """None if *request* may perform a write action, else (HTTP code, reason).
        *form_token*: the CSRF token a browser form posted (None for a JSON write)."""
        if not self.same_origin(request):
            return 403, ("this request comes from another site (Origin / Sec-Fetch-Site); "
                         "write actions are taken only from the console itself")
        if identity is None:
            if self.admin.authenticates:
                return 401, "write actions need authentication"
            if not (self.loopback and is_loopback(client_host(request))):
                return 403, (f"write actions without authentication are taken only from "
                             f"loopback clients of a loopback-bound admin endpoint ([admin] "
                             f"bind = \"127.0.0.1\"); this one is bound to {self.bind}: "
                             f"add [admin] users to authenticate")
            if not json_body:
                return 403, ("the console's write actions need a login: add [admin] users "
                             "('pacsp2p admin hash-password'), see docs/operations.md")
            return None              # the exception: a JSON write from this machine
        if identity.how in ("session", "basic", "certificate") and not json_body:
            if not form_token or not hmac.compare_digest(
                    form_token.encode(), self.csrf_token(identity).encode()):
                return 403, "the form's token is missing or stale: reload the page"
        return None


class Busy(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# a hash to check an unknown user's password against (same cost as a real one)
_DUMMY_HASH = ("scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA==$"
               "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
