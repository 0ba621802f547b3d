"""A small blocking HTTP/1.1 client for adapters that speak REST (Orthanc, DICOMweb).

Each thread of the adapter's pool keeps its own keep-alive connection (``http.client``),
so the many small requests of a crawl do not pay a TCP handshake each. Calls block: run
them in the adapter's thread pool, never in the reactor thread. Bodies are decoded (JSON)
in the same thread, so a large answer never stalls the reactor either.

An answer is hostile input: a body is read within bounds (``Body``) — at most
``MAX_ANSWER`` bytes for one decoded into memory, ``MAX_DOWNLOAD`` for one streamed into
a file — and it must keep coming: a body of known length is read ``LOW_WATER`` bytes
(or its rest) at a time, each within the socket's ``timeout`` (SO_RCVLOWAT: a read of
Python per 64 KB, not per packet), and once ``timeout`` seconds have passed any body
must average ``MIN_RATE`` bytes a second, so an archive that trickles a byte at a time
cannot hold a thread of the pool for ever.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit


MAX_ANSWER = 64 << 20     # bytes of an answer decoded in memory (JSON) at most
MAX_DOWNLOAD = 4 << 30    # bytes of a body streamed into a file (an instance) at most
MIN_RATE = 64 << 10       # bytes a second a body must average once ``timeout`` has passed
CHUNK = 1 << 20
LOW_WATER = 64 << 10      # bytes a read of a body of known length waits for (or its end)


class HTTPError(Exception):
    """The server answered with an error status (``status``), or did not answer. The
    message holds what the archive said (reason, body: hostile) with every character that
    is not printable escaped: it reaches log lines, ``/status`` and the admin's terminal."""

    def __init__(self, status: int, message: str):
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))
        self.status = status


class Unreachable(HTTPError):
    """No answer at all: connection refused, reset or timed out."""

    def __init__(self, message: str):
        super().__init__(0, message)


class TooLarge(HTTPError):
    """The answer's body is longer than the bound of what it is read into."""

    def __init__(self, message: str):
        super().__init__(0, message)


class BadAnswer(HTTPError):
    """The answer says it is JSON and is not."""

    def __init__(self, message: str):
        super().__init__(0, message)


class Body:
    """The body of response *rsp* read within bounds: ``read`` raises TooLarge past
    *limit* bytes, Unreachable when the connection fails or the body comes slower than
    ``MIN_RATE`` once the client's timeout has passed. ``getheader``, ``status`` and
    ``reason`` are the response's."""

    def __init__(self, client: "Client", rsp: http.client.HTTPResponse, what: str,
                 limit: int, conn=None):
        self.client, self.rsp, self.what, self.limit = client, rsp, what, limit
        self.conn = conn if getattr(conn, "sock", None) is not None else None
        self.status, self.reason = rsp.status, rsp.reason
        self.done = 0
        self.t0 = time.monotonic()

    def getheader(self, name: str, default=None):
        return self.rsp.getheader(name, default)

    def read(self, n: int = -1) -> bytes:
        """Up to *n* bytes (fewer if fewer have come; b"" at the end), or all the rest."""
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        try:
            n = min(n, CHUNK)
            if self.conn is not None and self.rsp.length:
                _low_water(self.conn, min(n, self.rsp.length, LOW_WATER))
            chunk = self.rsp.read1(n)
            if not chunk or not self.rsp.length:
                if self.conn is not None:
                    _low_water(self.conn, 1)    # the next answer's headers
            if not chunk:
                if self.rsp.length:             # closed before its Content-Length
                    raise http.client.IncompleteRead(b"", self.rsp.length)
                self.rsp.read()                 # the end: the connection is kept
        except (OSError, http.client.HTTPException) as e:
            self.client._drop()
            reason = "timed out" if isinstance(e, socket.timeout) else str(e) or type(e).__name__
            raise Unreachable(f"{self.what}: {reason}") from e
        self.done += len(chunk)
        if self.done > self.limit:
            self.client._drop()
            raise TooLarge(f"{self.what}: the answer is longer than {self.limit} bytes")
        elapsed = time.monotonic() - self.t0
        if chunk and elapsed > self.client.timeout and \
                self.done < (elapsed - self.client.timeout) * MIN_RATE:
            self.client._drop()
            raise Unreachable(f"{self.what}: too slow ({self.done} bytes in "
                              f"{elapsed:.0f} s)")
        return chunk


def _low_water(conn, n: int) -> None:
    """A read of *conn*'s socket waits (within its timeout) until *n* bytes have come: a body of
    known length is read 64 KB at a time, not a packet at a time (a read is a turn of
    Python), and a trickle of bytes times out (SO_RCVLOWAT, honoured by poll)."""
    if getattr(conn, "pacsp2p_low", 1) != n and conn.sock is not None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        conn.pacsp2p_low = n


class Client:
    """HTTP client for one base URL (``http://host:port/prefix``), basic auth optional."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 timeout: float = 30.0):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self._local = threading.local()

    # -- connections ------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (http.client.HTTPSConnection if self.scheme == "https"
                   else http.client.HTTPConnection)
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        self._drop()

    # -- requests ---------------------------------------------------------------------
    def open(self, method: str, path: str, body=None, headers: dict | None = None,
             ok=(200,), limit: int = MAX_DOWNLOAD) -> Body:
        """Send a request; return the response with its body unread (``Body``: read it
        all before the next request of this thread). Raises HTTPError / Unreachable."""
        hdrs = dict(self.headers)
        hdrs.update(headers or {})
        target = self.prefix + path
        for attempt in (0, 1):        # a kept-alive connection the server closed: once more
            conn = self._connection()
            try:
                if hasattr(body, "read"):
                    body.seek(0)
                conn.request(method, target, body=body, headers=hdrs)
                rsp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self._drop()
                if attempt == 0:
                    continue
                raise Unreachable(f"{method} {self.url}{path}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                reason = "timed out" if isinstance(e, socket.timeout) else str(e) or type(e).__name__
                raise Unreachable(f"{method} {self.url}{path}: {reason}") from e
            if rsp.status not in ok:
                text = rsp.read(2000).decode("utf-8", "replace").strip()
                self._drop()
                raise HTTPError(rsp.status, f"{method} {self.url}{path}: HTTP {rsp.status} "
                                f"{rsp.reason}: {text[:300]}")
            return Body(self, rsp, f"{method} {self.url}{path}", limit, conn)
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body=None, headers: dict | None = None,
             ok=(200,), limit: int = MAX_ANSWER):
        """The decoded answer: JSON as Python values, anything else as bytes (TooLarge
        past *limit* bytes)."""
        rsp = self.open(method, path, body, headers, ok, limit)
        data = rsp.read()
        ctype = (rsp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype.endswith("json") and data:
            try:
                return json.loads(data)
            except (ValueError, RecursionError) as e:     # (nested too deep)
                raise BadAnswer(f"{rsp.what}: not JSON: {str(e)[:200]}") from None
        return data

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post_json(self, path: str, payload, **kw):
        return self.call("POST", path, json.dumps(payload).encode(),
                         {"Content-Type": "application/json"}, **kw)

    def download(self, path: str, out, headers: dict | None = None) -> tuple[int, str]:
        """Stream the body of GET *path* into the binary file *out*; return (bytes,
        content type)."""
        rsp = self.open("GET", path, headers=headers)
        before = out.tell()
        while chunk := rsp.read(CHUNK):
            out.write(chunk)
        return out.tell() - before, rsp.getheader("Content-Type") or ""

    def ping(self, path: str) -> float:
        """Milliseconds one GET of *path* took."""
        t0 = time.monotonic()
        self.call("GET", path)
        return (time.monotonic() - t0) * 1000
