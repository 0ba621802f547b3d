"""How the ``pacsp2p`` CLI reaches its peer's admin endpoint (``status``, ``where``,
``delete``, ...): the URL, HTTPS and the token.

- URL: ``[admin] bind`` (127.0.0.1 for a wildcard bind) and ``port``; ``https://`` when
  ``[admin] tls_cert`` is set.
- HTTPS: the endpoint's own certificate (``tls_cert``, read from the config) is the one
  trusted: it is pinned as the trust anchor (OpenSSL's partial-chain flag), so a
  self-signed one or one from a private CA both work, whatever name or address it
  carries.
- Authentication: the token the running peer wrote to ``<data_dir>/admin.token``
  (``auth.write_token``), sent as ``Authorization: Bearer``. Without read access to
  the data directory there is none, and an endpoint that needs one answers 401.
- Errors (``call``): one line and exit status 1 -- "refused by the peer ... (HTTP
  400): its reason" when the peer answered, "no peer answers ... is it running?" only
  when none did, "... is not a pacsp2p admin endpoint" when what answered speaks no
  HTTP or no JSON.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request

from pacsp2p.admin.auth import read_token
from pacsp2p.validate import shown

MAX_ANSWER = 256 << 20        # bytes of one JSON answer at most
ANSWERED: list = []           # what this process has had answered (cli.main's errors)


def base_url(settings) -> str:
    adm = settings.admin
    host = adm.bind
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if adm.tls_cert is not None else "http"
    return f"{scheme}://{host}:{adm.port}"


def url(settings, what: str) -> str:
    return f"{base_url(settings)}/{what.lstrip('/')}"


def ssl_context(settings) -> ssl.SSLContext | None:
    """The context that trusts exactly the endpoint's certificate (None over HTTP)."""
    cert = settings.admin.tls_cert
    if cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False          # pinned: the certificate itself is the anchor
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def request(settings, what: str, data: bytes | None = None, method: str | None = None,
            headers: dict | None = None) -> urllib.request.Request:
    """A request to the endpoint with the CLI's token (if readable)."""
    headers = dict(headers or {})
    token = read_token(settings.data_dir)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url(settings, what), data=data, method=method,
                                  headers=headers)


def open(settings, what: str, timeout: float = 10.0, **kwargs):  # noqa: A001
    """``urllib.request.urlopen`` of ``request(settings, what, ...)`` (raises as it)."""
    return urllib.request.urlopen(request(settings, what, **kwargs), timeout=timeout,
                                  context=ssl_context(settings))


def call(settings, what: str, timeout: float = 60.0, shape: type = dict, **kwargs):
    """The JSON answer of *what* (``open``'s keywords), a *shape* (dict or list);
    SystemExit with one line when the peer refuses (its status and reason), nobody
    answers, or what answers is not an admin endpoint (not HTTP, not JSON, cut short,
    more than ``MAX_ANSWER`` bytes: another service on that port)."""
    try:
        with open(settings, what, timeout=timeout, **kwargs) as r:
            raw = r.read(MAX_ANSWER + 1)
        if len(raw) > MAX_ANSWER:
            raise ValueError(f"more than {MAX_ANSWER >> 20} MiB")
        value = json.loads(raw)
        if not isinstance(value, shape):
            raise ValueError(f"JSON, but not {'an object' if shape is dict else 'a list'}")
        ANSWERED.append(what)
        return value
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read(64 << 10)).get("error", "")
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            reason = ""
        reason = reason if isinstance(reason, str) and reason else str(e.reason)
        if len(reason) > 500 or not reason.isprintable():   # no terminal escapes
            reason = shown(reason, 500)
        verb = what.split("?")[0].strip("/")
        raise SystemExit(f"pacsp2p: {verb} refused by the peer at {url(settings, what)} "
                         f"(HTTP {e.code}): {reason}")
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"pacsp2p: no peer answers at {url(settings, what)} ({e}); "
                         "is it running?")
    except (http.client.HTTPException, ValueError) as e:
        why = " ".join(str(e).split())
        raise SystemExit(f"pacsp2p: what answers at {url(settings, what)} is not a pacsp2p "
                         f"admin endpoint ({type(e).__name__}: {shown(why, 100)}); is that "
                         "port another service's?")
