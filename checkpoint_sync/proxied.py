"""Requests through an HTTP(S) proxy, on aiohttp: the rare path, kept out of `wire.py`.

Imported only when ``HTTP(S)_PROXY`` or ``ALL_PROXY`` names a proxy for a URL being fetched, so
that a run without one never pays for importing aiohttp.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager

import aiohttp

from .errors import TransientError, UsageError
from .net import USER_AGENT, NetSettings, Proxy, converting_errors, ssl_context, transient_status
from .rate import RateLimit
from .redact import redact_url
from .wire import Body, FileTarget, Response, Sink


class ProxiedClient:
    """One aiohttp session for every proxied request of a run, opened on first use."""

    def __init__(self, net: NetSettings, limit: RateLimit | None) -> None:
        self._net = net
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    @asynccontextmanager
    async def request(
        self,
        url: str,
        proxy: Proxy,
        headers: Mapping[str, str],
        method: str,
        body: bytes,
        what: str,
    ) -> AsyncIterator[Response]:
        """``url`` through ``proxy``, which `wire.HttpClient` looked up for its host."""
        with converting_errors(url, what), _converting_aiohttp_errors(url, proxy, what):
            async with self._open().request(
                method,
                url,
                headers=headers,
                data=body or None,
                proxy=proxy.url,
                allow_redirects=False,  # as on the direct path
            ) as response:
                if response.status == 407:  # the proxy's own answer, to a plain-HTTP request
                    raise _refused_by(proxy, 407, what)
                lowered = {name.lower(): value for name, value in response.headers.items()}
                # What aiohttp framed the body by (it refuses a length said twice, or chunked).
                length = response.content_length
                yield Response(
                    response.status, lowered, _AiohttpBody(response, self._limit), length
                )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            net = self._net
            self._session = aiohttp.ClientSession(
                # The API host takes a few extra connections beside the file transfers.
                connector=aiohttp.TCPConnector(limit=net.connections + 4, ssl=ssl_context(net)),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # The whole connection, as on the direct path: aiohttp reads the proxy's
                    # answer to CONNECT without sock_read, and a silent proxy held it forever.
                    connect=net.connect_timeout,
                    sock_connect=net.connect_timeout,
                    sock_read=net.read_timeout,
                ),
                # Bytes must land exactly as stored: never let a Content-Encoding rewrite them,
                # nor ask for one (aiohttp would send "Accept-Encoding: gzip, deflate").
                auto_decompress=False,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                # The proxy comes from `net.proxy_for_host`, once per host: trust_env looked it
                # up in a thread per request.
                trust_env=False,
            )
        return self._session


class _AiohttpBody(Body):
    def __init__(self, response: aiohttp.ClientResponse, limit: RateLimit | None) -> None:
        self._response = response
        self._limit = limit

    async def stream_to(self, sink: Sink, file: FileTarget | None) -> None:
        loop = asyncio.get_running_loop()
        async for data in self._response.content.iter_any():
            sink(memoryview(data))
            if self._limit is not None:
                # aiohttp stops reading the socket once its buffer is full: waiting holds it.
                await asyncio.sleep(self._limit.took(len(data), loop.time()))

    async def read(self, limit: int) -> bytes:
        got = bytearray()  # content.read gives what is buffered, not up to the limit
        while len(got) < limit and (data := await self._response.content.read(limit - len(got))):
            got += data
        return bytes(got)


@contextmanager
def _converting_aiohttp_errors(url: str, proxy: Proxy, what: str) -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorCertificateError as exc:
        raise exc.certificate_error from exc  # `converting_errors` explains distrust
    except aiohttp.ClientPayloadError as exc:
        raise TransientError(f"{what}: connection closed mid-body ({redact_url(url)})") from exc
    except aiohttp.ClientProxyConnectionError as exc:
        # Named by its class and the URL asked for, it read as the API or the store being down.
        # asyncio's strerror is "Connect call failed (address)": the errno says why.
        errno = exc.os_error.errno
        raise TransientError(
            f"{what}: cannot connect to the proxy {redact_url(proxy.url)} ({proxy.variable}): "
            f"{os.strerror(errno) if errno else exc.os_error}"
        ) from exc
    except aiohttp.ClientError as exc:
        # The proxy's answer to CONNECT: one it would give again (its access rules, 403) is no
        # transient fault.
        if isinstance(exc, aiohttp.ClientHttpProxyError) and not transient_status(exc.status):
            raise _refused_by(proxy, exc.status, what) from exc
        # The same answer would come again: each retry only waited for it.
        if isinstance(exc, aiohttp.ClientResponseError) and (said := refused_length(exc.message)):
            raise UsageError(
                f"{what}: the answer through the proxy {redact_url(proxy.url)} ({proxy.variable}) "
                f"had {said}, which aiohttp (the client of proxied requests) refuses; have the "
                "proxy send it once, or reach the host directly (NO_PROXY)"
            ) from exc
        raise TransientError(f"{what}: {type(exc).__name__} talking to {redact_url(url)}") from exc


def _refused_by(proxy: Proxy, status: int, what: str) -> UsageError:
    """The proxy refused us: its settings are wrong, and no retry can change that."""
    if status == 407:
        problem = "asked for credentials (HTTP 407); check the user and password in its URL"
    else:
        problem = f"refused the connection (HTTP {status}); check its URL and NO_PROXY"
    return UsageError(f"{what}: the proxy {redact_url(proxy.url)} {problem} ({proxy.variable})")


# llhttp's message quotes the header line it stopped at.
_LENGTH_LINE = re.compile(r"b'(content-length:[^'\n]{0,60})'", re.IGNORECASE)


def refused_length(message: str) -> str | None:
    """What an answer's Content-Length was, if that is why aiohttp's parser refused the answer
    with ``message``: it refuses a length said twice (a proxy adding its copy), which RFC 9110
    lets a client take as the one length, as `wire.py` does."""
    # llhttp, aiohttp's C parser: to a second header line, and to "N, N" on one.
    if message.startswith("Duplicate Content-Length"):
        return "Content-Length twice"
    if message.startswith("Invalid character in Content-Length"):
        line = _LENGTH_LINE.search(message)
        return f'"{line[1]}"' if line else "an unreadable Content-Length"
    # The pure-Python parser (AIOHTTP_NO_EXTENSIONS=1), to "N, N" (of two lines it takes the first).
    if message == "Invalid HTTP header: 'Content-Length'":
        return "an unreadable Content-Length"
    return None
