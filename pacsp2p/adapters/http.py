"""A small blocking HTTP/1.1 client for adapters that speak REST (Orthanc, DICOMweb).

Each thread of the adapter's pool keeps its own keep-alive connection (``http.client``),
so the many small requests of a crawl do not pay a TCP handshake each. Calls block: run
them in the adapter's thread pool, never in the reactor thread. Bodies are decoded (JSON)
in the same thread, so a large answer never stalls the reactor either.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import threading
import time
from urllib.parse import urlsplit


class HTTPError(Exception):
    """The server answered with an error status (``status``), or did not answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unreachable(HTTPError):
    """No answer at all: connection refused, reset or timed out."""

    def __init__(self, message: str):
        super().__init__(0, message)


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
             ok=(200,)) -> http.client.HTTPResponse:
        """Send a request; return the response with its body unread (read it all before
        the next request of this thread). Raises HTTPError / Unreachable."""
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
            return rsp
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body=None, headers: dict | None = None,
             ok=(200,)):
        """The decoded answer: JSON as Python values, anything else as bytes."""
        rsp = self.open(method, path, body, headers, ok)
        try:
            data = rsp.read()
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise Unreachable(f"{method} {self.url}{path}: {e}") from e
        ctype = (rsp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype.endswith("json") and data:
            return json.loads(data)
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
        try:
            before = out.tell()
            shutil.copyfileobj(rsp, out, 1 << 20)
            rsp.read()                  # the end of a chunked body
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            raise Unreachable(f"GET {self.url}{path}: {e}") from e
        return out.tell() - before, rsp.getheader("Content-Type") or ""

    def ping(self, path: str) -> float:
        """Milliseconds one GET of *path* took."""
        t0 = time.monotonic()
        self.call("GET", path)
        return (time.monotonic() - t0) * 1000
