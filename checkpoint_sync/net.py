"""Network settings and the HTTP boundary's shared pieces: trust, proxies, URL checks, errors.

Every request (`wire.py`, `proxied.py`) converts its connection errors with `connection_error`,
so none (whose text could carry a presigned URL) escapes the package unconverted.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from .errors import TransientError, UsageError
from .redact import redact_url

USER_AGENT = "checkpoint-sync/0.1"


@dataclass(frozen=True)
class NetSettings:
    connections: int = 16
    connect_timeout: float = 30.0
    # A connection that sends no byte for this long is dropped and retried.
    read_timeout: float = 60.0
    ca_bundle: Path | None = None
    proxies: bool = True  # through the proxy HTTP(S)_PROXY or ALL_PROXY names, if any
    limit_rate: int | None = None  # bytes per second over all connections (None: no limit)


def loop_options() -> dict[str, bool]:
    """``anyio.run`` backend options: uvloop when installed, for its faster sockets and TLS."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def ssl_context(settings: NetSettings) -> ssl.SSLContext:
    """The system's trust store (or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), or the configured CA
    bundle."""
    environ = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    return _trust(settings.ca_bundle, *environ)


@functools.cache
def _trust(ca_bundle: Path | None, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    # One per place certificates come from, whatever the other settings: loading a trust store
    # takes tens of milliseconds (and `bench` trials, which differ in connections, must not pay
    # it unevenly). OpenSSL reads the variables itself.
    cafile = str(ca_bundle) if ca_bundle is not None else None
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as exc:  # missing, unreadable, or no certificate in it: not worth a retry
        raise trust_error(cafile, exc.strerror or str(exc)) from exc


def trust_error(ca_bundle: str | None, reason: str) -> UsageError:
    """A trust store that cannot be loaded: a configuration matter, not worth a retry."""
    what = f"ca_bundle {ca_bundle}" if ca_bundle else "the trust store (SSL_CERT_FILE?)"
    return UsageError(f"{what} cannot be used ({reason})")


@dataclass(frozen=True)
class Proxy:
    url: str
    variable: str  # the environment variable that named it, for messages


@functools.cache
def proxy_for_host(scheme: str, host: str, port: int) -> Proxy | None:
    # Most runs name no proxy at all, and then need not load urllib.request (and http.client).
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None
    import urllib.request

    # NO_PROXY: urllib matches its entries against "host:port" (so "host:8080" and "[::1]"
    # match too), and a bare "::1" only against the bare address.
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if urllib.request.proxy_bypass(authority) or urllib.request.proxy_bypass(host):
        return None
    # ALL_PROXY serves a scheme whose own variable is unset, as to curl and httpx. Of an upper-
    # and a lower-case variable, urllib takes the lower-case one.
    proxies = urllib.request.getproxies()
    key = scheme if scheme in proxies else "all"
    named = proxies.get(key)
    if named is None:
        return None
    variable = _proxy_variable(key, named)
    # "proxy.corp:3128" is an HTTP proxy to curl, urllib and requests; aiohttp refuses it.
    proxy = named if "://" in named else f"http://{named}"
    proxy_scheme = proxy.partition("://")[0]
    if proxy_scheme.lower() not in ("http", "https"):
        # aiohttp would speak HTTP to it (a SOCKS proxy, say): every request would fail.
        raise UsageError(
            f"{variable} names a {proxy_scheme}:// proxy; "
            "only http:// and https:// proxies are supported"
        )
    if (problem := url_problem(proxy)) is not None:
        # aiohttp's InvalidURL would be retried, and name the URL asked for, not the proxy. Its
        # credentials are cut off first: `redact_url` would take a "/", "?" or "#" left in a
        # password for the end of the host.
        shown = redact_url(f"{proxy_scheme}://{_split_credentials(proxy)[1]}")
        raise UsageError(f"{variable} is {problem}: {shown}")
    if (problem := credentials_problem(proxy)) is not None:
        raise UsageError(f"{variable}: the proxy's {problem}")
    return Proxy(proxy, variable)


def credentials_problem(proxy: str) -> str | None:
    """Why aiohttp, which talks to proxies, would not send the user name and password of the
    proxy URL ``proxy`` as written, or None."""
    authority = proxy[proxy.find("://") + 3 : origin_end(proxy)]
    userinfo = authority.rpartition("@")[0]
    if "@" in proxy[origin_end(proxy) :]:
        # A proxy URL has no path: its credentials hold a "/", "?" or "#" as it is. aiohttp took
        # all before that mark for the host ("user" of "user:123/pw@host", port 123), and named
        # the API's URL in its error.
        return 'password holds a "/", "?" or "#": write them percent-encoded (%2F, %3F, %23)'
    if ":" in as_sent(userinfo.partition(":")[0]):
        # Basic authentication ends the user name at its first ":" (RFC 7617): aiohttp refuses
        # one that holds a "%3A", with an internal error.
        return 'user name holds a ":" (written %3A), which Basic authentication cannot send'
    try:
        as_sent(userinfo).encode("latin-1")
    except UnicodeError:
        # aiohttp sends Basic credentials in Latin-1 only: an internal error otherwise.
        return "user name or password, decoded, is not Latin-1 text, which aiohttp cannot send"
    return None


# A run of percent-escapes in a proxy URL's credentials.
_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that `surrogateescape` kept


def as_sent(credentials: str) -> str:
    """A proxy URL's user name or password (or both) decoded as aiohttp sends it (yarl
    decodes it): each run of percent-escapes as UTF-8, but an escape of a byte that is no part
    of a UTF-8 character stays as written, its hex digits in capitals ("p%ff" goes as "p%FF")."""

    def decoded(run: re.Match[str]) -> str:
        text = bytes.fromhex(run[0].replace("%", "")).decode("utf-8", "surrogateescape")
        return _NOT_UTF8.sub(lambda byte: f"%{ord(byte[0]) - 0xDC00:02X}", text)

    return _ESCAPES.sub(decoded, credentials)


def proxy_credentials(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every form in which the credentials of the proxies ``environ`` names may travel, and so
    come back quoted (a proxy's error page echoing the request): the password (or a user name
    given alone) as written and percent-decoded, and the ``Proxy-Authorization`` Basic
    credentials aiohttp makes of them."""
    found = []
    for name, value in environ.items():
        if not name.lower().endswith("_proxy") or name.lower() == "no_proxy":
            continue
        userinfo = _split_credentials(value)[0]
        if not userinfo:
            continue
        raw_user, _, raw_password = userinfo.partition(":")
        user, password = as_sent(raw_user), as_sent(raw_password)
        # Without a password, the user name is the credential (a token, as some proxies take).
        found += [raw_password, password] if raw_password else [raw_user, user]
        with suppress(UnicodeEncodeError):  # aiohttp encodes them as Latin-1, or fails
            found.append(base64.b64encode(f"{user}:{password}".encode("latin-1")).decode())
    return [form for form in dict.fromkeys(found) if form]


def _split_credentials(proxy: str) -> tuple[str, str]:
    """A proxy URL's credentials, and what follows them (with or without a scheme before). A
    proxy URL has no path: all before its last "@" is credentials, even a "/", "?" or "#" left
    as it is in a password (which aiohttp would not send: `credentials_problem`)."""
    rest = proxy.partition("://")[2] if "://" in proxy else proxy
    credentials, _, host = rest.rpartition("@")
    return credentials, host


def _proxy_variable(key: str, proxy: str) -> str:
    """The environment variable urllib took ``proxy`` from (``key`` is "http", "https" or "all"),
    to name it in a message."""
    names = (n for n, value in os.environ.items() if n.lower() == f"{key}_proxy" and value == proxy)
    return next(names, f"{key.upper()}_PROXY")


# A request line carries the URL as it is: these would break it, or smuggle in a header.
_NOT_IN_URLS = re.compile(r"[\x00-\x20\x7f]")


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched over HTTP(S), or None: checked before any request is made."""
    if not url.isascii() or _NOT_IN_URLS.search(url):
        return "not a valid URL (spaces, control or non-ASCII characters)"
    # Only the origin can be wrong in a way urlsplit notices, and a listing has few origins.
    return _origin_problem(url[: origin_end(url)])


def origin_end(url: str) -> int:
    """Where ``scheme://authority`` ends in ``url``: at the first "/", "?" or "#" after "://",
    as ``urlsplit`` cuts it (which costs several times as much)."""
    end = len(url)
    start = url.find("://") + 3
    for mark in "/?#":
        found = url.find(mark, start)
        if 0 <= found < end:
            end = found
    return end


@functools.lru_cache(maxsize=1024)
def _origin_problem(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
        _ = parts.port  # a port out of range raises here, not in the middle of a transfer
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    try:
        parts.hostname.encode("idna")  # what connecting does: empty or over-long labels fail
    except UnicodeError:
        return "not a valid host name"
    return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` as seconds, from either its delta or its HTTP-date form."""
    value = headers.get("retry-after")  # header names are lower-cased where they are parsed
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime  # rare: most servers send seconds

    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # a "-0000" zone: UTC, with no offset information
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def transient_status(status: int) -> bool:
    # 408: a server may send it on a kept-alive connection it closes as idle, just as a request
    # goes out on it.
    return status in (408, 429) or status >= 500


@contextmanager
def converting_errors(url: str, what: str) -> Iterator[None]:
    """Turn connection-level failures into `TransientError` naming the redacted URL."""
    try:
        yield
    except OSError as exc:
        raise connection_error(exc, url, what) from exc


def connection_error(exc: OSError, url: str, what: str) -> TransientError | UsageError:
    """What a connection-level failure (refused, reset, unreachable, name resolution, TLS,
    timed out) means for the request to ``url``, named without its query string."""
    if isinstance(exc, TimeoutError):
        return TransientError(f"{what}: timed out talking to {redact_url(url)}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Retrying cannot fix trust: it is a configuration matter.
        return UsageError(
            f"{what}: TLS certificate of {redact_url(url)} is not trusted "
            "(set ca_bundle in the config, or SSL_CERT_FILE)"
        )
    return TransientError(f"{what}: {exc.strerror or exc} ({redact_url(url)})")
