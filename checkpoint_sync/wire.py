"""A lean HTTP/1.1 client: ranged GETs of presigned object URLs, and the management APIs.

aiohttp spends about 150 us of Python per request and an ``await`` per received chunk; a
checkpoint is thousands of objects and gigabytes of chunks, and importing aiohttp costs a run
about 70 ms of start-up. Here each received chunk goes from the protocol callback straight to a
sink (the transfer's positional write; a large part's body is spliced into its file, or over
HTTPS written by a worker thread), connections are kept alive per host, and only what
object stores and JSON APIs send is understood: a status line, headers, and a body framed by
Content-Length, chunked encoding or the end of the connection. Redirects are not followed here
(`transfer.py` follows those of object URLs).
HTTPS connections come from `tls.py`. URLs behind a proxy go through aiohttp (`proxied.py`),
loaded only then.

Errors are converted here: connection failures, resets, stalls and answers that are not HTTP as
expected become `TransientError` naming the URL without its query string.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import re
import select
import socket
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .errors import TransientError, UsageError
from .net import (
    USER_AGENT,
    NetSettings,
    connection_error,
    origin_end,
    proxy_for_host,
)
from .rate import READ_SIZE, RateLimit
from .redact import redact_url, without_query

if TYPE_CHECKING:
    from .proxied import ProxiedClient

# Receives each piece of a body in order; the piece is only valid during the call.
Sink = Callable[[memoryview], None]
MAX_HEAD = 64 << 10
# Each connection receives straight into a buffer of its own; a body is handed over from it in
# pieces of at least FLUSH_AT bytes, so one positional write follows several socket reads
# without a copy in between. 2 MiB, not 1: a large HTTPS body then goes to its writing thread
# in half as many hand-offs (big over HTTPS about 5% faster in alternating runs, for up to
# 32 MiB more peak RSS).
RECV_BUFFER = 2 << 20
FLUSH_AT = RECV_BUFFER - (256 << 10)
# Body bytes copied out before the caller hands over its sink; past this the socket is paused.
# A body complete by then waits in the receive buffer itself.
MAX_PENDING = 1 << 20
IDLE_PER_HOST = 32
# Bodies at least this long go into their file without the sink: spliced from the socket (plain
# HTTP), or decrypted on the loop and written by a worker thread (HTTPS).
LARGE_BODY = 4 << 20
PIPE_SIZE = 1 << 20


class FileTarget(Protocol):
    """Where a body may go without passing through Python: a file, at a moving offset."""

    @property
    def fd(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def room(self) -> int:
        """How many bytes it takes from ``offset`` on: a body longer than that is not spliced
        (the sink refuses the excess, which a splice would write past the range)."""

    def took(self, size: int) -> None:
        """``size`` more bytes were written at ``offset`` behind the sink's back."""

    def splicing(self, size: int) -> None:
        """Called by the thread of a splice under way after each move into the file: ``size``
        bytes of it are there past ``offset`` so far (``took`` counts them once it ended). It
        runs for every move, in another thread than the loop: it only notes the number."""

    def write_failed(self, error: OSError) -> Exception:
        """What to raise when writing into the file failed (a full disk is not the network's)."""


class Response:
    """Status and headers (lower-case names) of an answer whose body is still to be read, and
    the body's length as its framing says (a Content-Length said once or repeated; 0 for a 204
    or 304), or None when it is not told before the end (chunked, or until the close)."""

    def __init__(
        self, status: int, headers: dict[str, str], body: Body, length: int | None
    ) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self._body = body

    async def stream_to(self, sink: Sink, file: FileTarget | None = None) -> None:
        """Hand every body byte to ``sink``, in order, until the body ends.

        With ``file``, a large body may instead go into the file without the sink: on a plain-HTTP
        connection moved from the socket by the kernel (``splice``) in a worker thread, with no
        copy through Python; over HTTPS decrypted on the loop and written by a worker thread.
        Either way several connections' writes run on several cores.
        """
        await self._body.stream_to(sink, file)

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (error pages); the rest is not read."""
        return await self._body.read(limit)

    def held(self) -> int:
        """Body bytes received and not yet handed on: for a display, which would otherwise see
        a slow body move only a buffer's worth at a time."""
        return self._body.held()


class Body:
    """How a response's body is read: from our own connection, or through a proxy."""

    async def stream_to(self, sink: Sink, file: FileTarget | None) -> None:
        raise NotImplementedError

    async def read(self, limit: int) -> bytes:
        raise NotImplementedError

    def held(self) -> int:
        """What `Response.held` says: none, for a body handed on as it arrives (a proxy's)."""
        return 0


class HttpClient:
    """``async with HttpClient(net) as http``: requests on kept-alive connections (and a watch
    for stalled ones)."""

    def __init__(self, net: NetSettings) -> None:
        self._net = net
        self._proxied: ProxiedClient | None = None
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._tasks: TaskGroup | None = None
        self._limit: RateLimit | None = None

    async def __aenter__(self) -> HttpClient:
        if self._net.limit_rate:
            self._limit = RateLimit(self._net.limit_rate, asyncio.get_running_loop().time())
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._watch_stalls)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        for connection in self._busy:
            connection.close()
        if self._proxied is not None:
            await self._proxied.close()
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(None, None, None)

    def request(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        method: str = "GET",
        body: bytes = b"",
        what: str = "download",
    ) -> AbstractAsyncContextManager[Response]:
        """``async with http.request(...) as response``: the response is valid inside the block,
        and its body read there.

        ``what`` names the request in errors.
        """
        origin, target = split_url(url)
        proxy = proxy_for_host(*origin.key) if self._net.proxies else None
        if proxy is not None:
            return self._via_proxy().request(url, proxy, headers, method, body, what)
        request = _request_bytes(origin.authority, target, headers, method, body)
        return _Exchange(self, url, origin.key, request, what)

    def _via_proxy(self) -> ProxiedClient:
        if self._proxied is None:
            from .proxied import ProxiedClient  # aiohttp: only loaded when a proxy is set

            self._proxied = ProxiedClient(self._net, self._limit)
        return self._proxied

    async def _send(
        self, url: str, key: tuple[str, str, int], request: bytes
    ) -> tuple[_Connection, Response]:
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            try:
                return connection, await self._exchange(connection, request)
            except _StaleConnection:
                continue  # the server closed it while it was idle: not a failure
        connection = await self._connect(*key)
        try:
            return connection, await self._exchange(connection, request)
        except _StaleConnection as exc:
            raise TransientError(
                f"connection closed before an answer from {redact_url(url)}"
            ) from exc

    async def _exchange(self, connection: _Connection, request: bytes) -> Response:
        """Send ``request`` and wait for the head of the answer, watched for stalls like a body;
        the connection is busy from here until the caller is done with the answer."""
        self._busy.add(connection)
        try:
            return await connection.send(request)
        except BaseException:
            self._busy.discard(connection)
            connection.close()
            raise

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(loop, (scheme, host, port), self._net.read_timeout, self._limit)
        with anyio.fail_after(self._net.connect_timeout):
            if scheme == "https":
                from . import tls  # loaded on first use, with its trust store

                await tls.connect(connection, host, port, self._net)
            else:
                await loop.create_connection(lambda: connection, host, port)
        return connection

    def _release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if connection.reusable and len(idle) < IDLE_PER_HOST and connection.drop_unread():
            idle.append(connection)
        else:
            connection.close()

    async def _watch_stalls(self) -> None:
        """Drop connections that have been silent for ``read_timeout`` while we waited on them."""
        loop = asyncio.get_running_loop()
        timeout = self._net.read_timeout
        while True:
            await anyio.sleep(min(1.0, timeout / 4))
            now = loop.time()
            for connection in list(self._busy):
                if connection.stalled(now, timeout):
                    connection.fail(TimeoutError(f"no data for {timeout:.0f} s"), abort=True)


class _Exchange:
    """One request on a kept-alive connection: the answer inside the ``async with`` block, the
    connection back to the pool after it, or closed if the block failed. A connection error,
    in the request or while the block reads the body, is converted (`connection_error`).

    A class, not an ``asynccontextmanager``: the generator's machinery cost 3% of the CPU of a
    run of small files.
    """

    __slots__ = ("_client", "_connection", "_key", "_request", "_url", "_what")

    def __init__(
        self, client: HttpClient, url: str, key: tuple[str, str, int], request: bytes, what: str
    ) -> None:
        self._client = client
        self._url = url
        self._key = key
        self._request = request
        self._what = what
        self._connection: _Connection | None = None

    async def __aenter__(self) -> Response:
        try:
            self._connection, response = await self._client._send(
                self._url, self._key, self._request
            )
        except OSError as exc:
            raise connection_error(exc, self._url, self._what) from exc
        return response

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        connection = self._connection
        assert connection is not None
        self._client._busy.discard(connection)
        if exc is None:
            self._client._release(connection)
            return
        connection.close()
        if isinstance(exc, OSError):
            raise connection_error(exc, self._url, self._what) from exc


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int
    authority: str  # as the Host header gives it

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def split_url(url: str) -> tuple[_Origin, str]:
    """The origin of ``url`` (parsed once per origin) and its request target, as ``urlsplit``
    would cut them; that took 4% of the CPU of fetching 100,000 small files."""
    end = origin_end(url)
    # Sent exactly as listed: a presigned signature covers the path and query as they are.
    path, _, query = url[end:].partition("#")[0].partition("?")
    return _origin(url[:end]), (path or "/") + (f"?{query}" if query else "")


@functools.lru_cache(maxsize=256)
def _origin(origin: str) -> _Origin:
    parts = urlsplit(origin)
    scheme = parts.scheme
    return _Origin(
        scheme,
        parts.hostname or "",
        parts.port or (443 if scheme == "https" else 80),
        parts.netloc.rpartition("@")[2],
    )


def _request_bytes(
    authority: str, target: str, headers: Mapping[str, str], method: str, body: bytes
) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {authority}",
        f"User-Agent: {USER_AGENT}",
        # Without it any coding is acceptable (RFC 9110 §12.5.3), and the bytes must land as
        # stored: a server free to gzip them sent what was neither the object nor its length.
        "Accept-Encoding: identity",
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or not value.isascii():
            # A key pasted with its line break would end the head early, or add a header.
            raise UsageError(
                f"the {name} header would contain a line break or a non-ASCII character "
                "(check the API key)"
            )
        lines.append(f"{name}: {value}")
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _StaleConnection(Exception):
    """A kept-alive connection that was closed before it answered."""


class _Connection(asyncio.BufferedProtocol, Body):
    """One HTTP/1.1 connection, its response parser, and the body's way to the sink."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, str, int],
        read_timeout: float,
        limit: RateLimit | None,
    ) -> None:
        self.key = key
        self._read_timeout = read_timeout
        self._limit = limit
        self._held = False  # reading paused by the rate limit, until its timer resumes it
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.last_activity = loop.time()
        self.reusable = False
        self.waiting = False  # a request is out and its answer not fully read
        self._in_body = False
        self._answered = False
        self._keep_alive = True
        self._remaining: int | None = None  # Content-Length left; None: chunked or until close
        self._chunks: _Chunked | None = None
        self._sink: Sink | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._paused = False
        # A large HTTPS body goes to `_write_behind`, not the sink: a buffer's worth at a time
        # (`_writing` while one waits or is written, reading paused meanwhile).
        self._behind = False
        self._writing = False
        self._head_done: asyncio.Future[Response] | None = None
        self._body_done: asyncio.Future[None] | None = None
        self._closed = False
        self._buffer = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buffer)
        # The buffer holds a head being received, or body bytes _base:_filled not handed over.
        self._base = 0
        self._filled = 0

    # --- asyncio.BufferedProtocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._limit is not None:
            return self._view[self._filled : self._filled + READ_SIZE]
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_activity = self._loop.time()
        start = self._filled
        self._filled += nbytes
        try:
            if not self._in_body:
                self._head_arrived(start)
            elif self._chunks is None:
                self._body_arrived(start)
            else:  # chunked framing is decoded from a copy; the buffer is free again
                data = bytes(self._view[start : self._filled])
                self._filled = start
                self._feed_chunks(data)
        except ValueError as exc:  # not HTTP as we understand it: like a broken connection
            self.fail(ConnectionError(f"malformed answer ({exc})"), abort=True)
        except BaseException as exc:  # the sink's own (disk full...)
            self.fail(exc, abort=True)
            return
        if self._limit is not None:
            self._hold(self._limit.took(nbytes, self.last_activity))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.reusable = False
        if self._head_done is not None and not self._head_done.done():
            _settle(
                self._head_done,
                _StaleConnection()
                if not self._answered
                else ConnectionResetError("connection closed in the middle of an answer's head"),
            )
        elif self._in_body and self._remaining is None and self._chunks is None and exc is None:
            try:
                self._hand_over()
                self._finish()  # a body delimited by the end of the connection
            except BaseException as error:
                self.fail(error, abort=False)
        else:
            if self.waiting and self._sink is not None:
                # What came before the break is sound (TCP delivers in order, TLS checks every
                # record): written now, it is not asked for again when the part resumes.
                try:
                    self._hand_over()
                except BaseException as error:
                    self.fail(error, abort=False)
                    return
            self.fail(ConnectionResetError("connection closed mid-body"), abort=False)

    # --- requests ----------------------------------------------------------------------------

    async def send(self, request: bytes) -> Response:
        if self._closed or self._transport is None or self._transport.is_closing():
            raise _StaleConnection()
        if self._held and self._unseen_bytes():
            # Held by the rate limit while idle, it has not read what the server sent since
            # (bytes past its last answer, or its close): the answer would begin with them.
            raise _StaleConnection()
        self._reset()
        self._head_done = self._loop.create_future()
        self.waiting = True
        self.last_activity = self._loop.time()
        self._transport.write(request)
        return await self._head_done

    def _reset(self) -> None:
        self._in_body = self._answered = False
        self._keep_alive = True
        self._remaining = None
        self._chunks = None
        self._sink = None
        self._pending, self._pending_size = [], 0
        self._body_done = None
        self._base = self._filled = 0
        self._behind = self._writing = False
        self.reusable = False

    def drop_unread(self) -> bool:
        """Forget what the caller left unread of a complete answer (a redirect's or an error's
        body, held paused), and read on: the connection waits for its next request, and sees
        the server close it meanwhile. False if it cannot: the socket holds bytes past the
        answer, or its end."""
        self._pending, self._pending_size = [], 0
        self._base = self._filled = 0
        if (self._paused or self._held) and self._transport is not None:
            # Reading stopped at the answer's end: what the server sent after it is still in
            # the socket, and the next request, sent at once, would take it for its answer.
            if self._unseen_bytes():
                return False
            self._resume()
        return True

    def _unseen_bytes(self) -> bool:
        """Whether the socket, not read while reading is paused, holds bytes or its end."""
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        return sock is None or _more_to_read(sock.fileno())

    def close(self) -> None:
        self._closed = True
        # Closed by us, the caller is done with the answer: nothing more goes to its sink (its
        # file may be closed, its descriptor reused), though the transport delivers what it
        # still holds (a TLS one as it closes, its connection_lost up to 30 s later).
        self.waiting = False
        self._sink = None
        if self._transport is not None:
            self._transport.close()

    def fail(self, exc: BaseException, *, abort: bool) -> None:
        self.reusable = False
        self.waiting = False
        for waiter in (self._head_done, self._body_done):
            if waiter is not None and not waiter.done():
                _settle(waiter, exc)
                break
        else:
            if self._body_done is None and self._in_body:
                self._body_done = self._loop.create_future()
                _settle(self._body_done, exc)
        if abort and self._transport is not None:
            self._transport.abort()

    # --- parsing -----------------------------------------------------------------------------

    def _head_arrived(self, start: int) -> None:
        """Bytes up to ``_filled`` of the buffer hold the head, and maybe the body's start."""
        if self._head_done is None or self._head_done.done():
            # Nothing asked for them: bytes past the last answer. Left in the buffer, they were
            # dropped by the next request, whose answer the rest of them would have begun.
            raise ValueError("bytes past the answer")
        self._answered = True
        while True:
            # The head begins at _base: past the interim answers (100, 103) before it, whose
            # bytes count towards MAX_HEAD too, so that a server sending them without end
            # neither grows the buffer nor keeps us parsing.
            end = _HEAD_END.search(self._buffer, max(self._base, start - 3), self._filled)
            if end is None and self._filled <= MAX_HEAD:
                return  # the rest of the head is still to come
            if end is None or end.start() > MAX_HEAD:
                raise ValueError("response head too large")
            status, headers = _parse_head(bytes(self._view[self._base : end.start()]))
            if not 100 <= status < 200:
                break
            self._base = end.end()  # an interim answer: the real one follows
        self._keep_alive = not _closes(headers.get("connection", ""))
        if status in (204, 304):
            self._remaining = 0
        elif _chunked(headers.get("transfer-encoding", "")):
            self._chunks = _Chunked()
            if "content-length" in headers:
                # Chunked wins (RFC 9112 §6.3), but an answer framed both ways may be an
                # attempt at response splitting: its connection is not trusted with another.
                self._keep_alive = False
        elif "content-length" in headers:
            self._remaining = _content_length(headers["content-length"])
        else:
            self._keep_alive = False  # the body ends with the connection
        self._in_body = True
        assert self._head_done is not None
        self._head_done.set_result(Response(status, headers, self, self._remaining))
        self._base = end.end()
        if self._chunks is not None:
            self._feed_chunks(bytes(self._take_buffered()))
        else:
            self._body_arrived(self._base)

    def _feed_chunks(self, data: bytes) -> None:
        assert self._chunks is not None
        self._deliver(self._chunks.feed(data))
        if self._chunks.done:
            if self._chunks.surplus:
                self._keep_alive = False  # more than the body came: as with Content-Length
            self._finish()

    def _body_arrived(self, start: int) -> None:
        """Bytes ``start:_filled`` of the buffer are new body bytes (Content-Length or close)."""
        if self._remaining is not None:
            if self._filled - start > self._remaining:
                self._keep_alive = False  # more than announced: do not trust the connection
                self._filled = start + self._remaining
            self._remaining -= self._filled - start
            if self._behind and (self._remaining == 0 or self._filled >= FLUSH_AT):
                self._batch_ready()
                return
            if self._remaining == 0:
                self._hand_over()
                self._finish()
                return
        if self._filled >= FLUSH_AT:
            # Before the caller has given a sink, copied out (up to MAX_PENDING, then reading
            # pauses) so that the buffer takes the rest of a long body. Holding it with reading
            # paused instead lost bytes under uvloop's TLS transport, which dropped what it had
            # not delivered when the server closed; `tls.py`, which replaced it, leaves them in
            # the socket.
            self._deliver(self._take_buffered())

    def _batch_ready(self) -> None:
        """The buffer's body bytes wait for `_write_behind`: nothing more is read meanwhile."""
        self._writing = True
        if self._transport is not None:
            self._transport.pause_reading()
        if self._body_done is not None and not self._body_done.done():
            self._body_done.set_result(None)

    def _hand_over(self) -> None:
        """Hand the body bytes in the buffer to the sink. Before the caller has given one, a
        complete body stays where it was received, and reading pauses so that nothing lands
        after it. Small bodies mostly are complete by then: copying them out instead cost 3-8%
        of the CPU of a run of small files."""
        if self._sink is None:
            if not self._paused and not self._closed and self._transport is not None:
                self._transport.pause_reading()
            self._paused = True
            return
        self._deliver(self._take_buffered())

    def _resume(self) -> None:
        """Read on, after a pause for want of a sink; unless the rate limit holds reading, whose
        timer then resumes it."""
        self._paused = False
        self._read_on()

    def _hold(self, wait: float) -> None:
        """Stop reading for ``wait`` seconds: the rate limit's bucket is empty."""
        if wait <= 0 or self._held or self._closed or self._transport is None:
            return
        self._held = True
        self._transport.pause_reading()
        self._loop.call_later(wait, self._end_hold)

    def _end_hold(self) -> None:
        self._held = False
        self.last_activity = self._loop.time()  # the wait was ours, not the server's silence
        self._read_on()

    def _read_on(self) -> None:
        """Resume reading once no reason to pause stands: a body waiting for its sink
        (`_paused`), the rate limit's hold (`_held`) and a buffer waiting to be written
        (`_writing`) each keep it paused."""
        if (
            not (self._paused or self._held or self._writing or self._closed)
            and self._transport is not None
        ):
            self._transport.resume_reading()

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether the answer to a request of ours has brought no byte for ``timeout`` while
        we read (a hold of the rate limit is not the server's silence)."""
        return self.waiting and not self._held and now - self.last_activity > timeout

    def _take_buffered(self) -> memoryview:
        """The body bytes in the buffer, which is free for the next ones (the view is valid
        until then)."""
        piece = self._view[self._base : self._filled]
        self._base = self._filled = 0
        return piece

    def _deliver(self, piece: memoryview) -> None:
        """Hand body bytes to the sink, or keep a copy until there is one."""
        if not piece:
            return
        if self._sink is not None:
            self._sink(piece)
            return
        self._pending.append(bytes(piece))
        self._pending_size += len(piece)
        if self._pending_size > MAX_PENDING and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

    def _finish(self) -> None:
        self._in_body = False
        self.waiting = False
        self.reusable = self._keep_alive and not self._closed
        if self._body_done is None:
            self._body_done = self._loop.create_future()
        if not self._body_done.done():
            self._body_done.set_result(None)

    # --- the body, for the caller ------------------------------------------------------------

    def held(self) -> int:
        # A complete body waiting for its sink is held after the answer ended (`_paused`).
        in_buffer = self._chunks is None and (self._in_body or self._paused)
        return self._pending_size + (self._filled - self._base if in_buffer else 0)

    async def stream_to(self, sink: Sink, file: FileTarget | None = None) -> None:
        pending, self._pending, self._pending_size = self._pending, [], 0
        for piece in pending:
            sink(memoryview(piece))
        self._sink = sink
        if self._paused:
            self._hand_over()  # what the buffer held for want of a sink
        # Where the rest of a large body goes around the sink (judged once: resuming below
        # changes nothing it looks at).
        around = file if file is not None and self._large_body_for(file) else None
        if around is not None and self.key[0] == "http":
            await self._splice_into(around)  # TLS bytes must be decrypted by us
            return
        if self._paused:
            self._resume()
        if around is not None:
            await self._write_behind(around)  # HTTPS
            return
        if self._body_done is None:
            self._body_done = self._loop.create_future()
        try:
            await self._body_done
        except anyio.get_cancelled_exc_class():
            self._keep_received(self._deliver)
            raise

    def _keep_received(self, write: Callable[[memoryview], None]) -> None:
        """Stopped in the middle of a body: ``write`` the bytes of it received but not yet
        written (held until the buffer fills), so that a stopped part keeps them for the next
        run, as on a broken connection. Failing to is not what the stop raises."""
        if self._in_body and self._chunks is None and self._filled > self._base:
            with suppress(Exception):
                write(self._take_buffered())

    def _large_body_for(self, file: FileTarget) -> bool:
        """Whether the rest of the body goes into ``file`` without the sink."""
        return (
            self._limit is None  # a rate paces reading by the sink's calls, not the kernel's
            and self._in_body
            and self._chunks is None
            and self._remaining is not None
            and self._remaining >= LARGE_BODY
            # What arrived with the head goes to the sink first (a splice), or with the first
            # buffer written (HTTPS): it counts against the file's room too.
            and self._remaining + (self._filled - self._base) <= file.room
            and self._transport is not None
            # A connection that failed or closed before the sink came has no socket to splice
            # from (its descriptor is gone, or soon may be another file's): its error is raised.
            and self._body_done is None
            and not self._closed
            and not self._transport.is_closing()
        )

    async def _splice_into(self, file: FileTarget) -> None:
        """Let the kernel move the rest of the body from the socket into ``file``."""
        assert self._transport is not None
        assert self._remaining is not None
        if self._filled > self._base:
            self._hand_over()  # what already arrived goes first, through the sink
        self._transport.pause_reading()
        self.waiting = False  # the thread watches for stalls itself
        sock = self._transport.get_extra_info("socket").fileno()
        moved, error = await _splice_in_thread(sock, file, self._remaining, self._read_timeout)
        file.took(moved)
        self._remaining -= moved
        if error is not None:
            self.fail(error, abort=True)
            if isinstance(error, _Woken):
                await anyio.lowlevel.checkpoint()  # we were cancelled: that is what we raise
            if isinstance(error, _WriteFailed):
                raise file.write_failed(error.error) from error.error
            raise error
        if _more_to_read(sock):
            self._keep_alive = False  # more than the body came: the next answer cannot be told
        self._resume()
        self._finish()

    async def _write_behind(self, file: FileTarget) -> None:
        """Decrypt the rest of the body on the loop, and have a worker thread write each
        buffer of it into ``file`` while the loop decrypts the other connections' bytes: the
        copy into the page cache was up to half of the CPU of a large HTTPS body. This connection
        reads on once its buffer is written."""
        self._behind = True
        while True:
            if not self._writing:
                self._body_done = self._loop.create_future()
                self._read_on()
                try:
                    await self._body_done  # a buffer's worth, the body's end, or a failure
                except anyio.get_cancelled_exc_class():
                    self._keep_received(functools.partial(_write_into, file))
                    raise
            # Left in the buffer (reading is paused) until the file took it: `held` counts it
            # meanwhile, or a progress display would see the count drop by a buffer's worth.
            piece = self._view[self._base : self._filled]
            # Failed meanwhile (the server closing), the connection fails the wait after it.
            self._body_done = self._loop.create_future()
            self.waiting = False  # the disk's time, not the server's silence
            written = self._loop.run_in_executor(None, _write_all, file.fd, piece, file.offset)
            try:
                # A cancellation waits for the write (milliseconds): the file may be closed
                # right after. The loop's executor, not anyio's worker threads, which took 6%
                # longer in alternating runs of big files over HTTPS (benchmarks/FINDINGS.md).
                with anyio.CancelScope(shield=True):
                    await written
            except OSError as exc:
                self.fail(exc, abort=True)
                raise file.write_failed(exc) from exc
            file.took(len(piece))
            self._base = self._filled = 0
            if self._body_done.done():
                self._body_done.result()  # the connection's failure, raised
            self._writing = False
            self.waiting, self.last_activity = True, self._loop.time()
            if self._remaining == 0:
                self._finish()
                self._read_on()  # as after any answer: the server's close is seen
                return

    async def read(self, limit: int) -> bytes:
        got = bytearray()

        def keep(piece: memoryview) -> None:
            got.extend(piece[: limit - len(got)])
            if len(got) >= limit:
                raise _Enough()

        with suppress(_Enough):
            await self.stream_to(keep)
        return bytes(got)


def _settle(waiter: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``waiter``. Whoever awaits it still gets ``exc``; a body nobody reads any more (the
    caller gave up on it) must not be reported as an unretrieved error when it is collected."""
    waiter.set_exception(exc)
    waiter.exception()


class _Enough(Exception):
    """Read as much of an error page as wanted."""


class _WriteFailed(Exception):
    """A splice failed on the file's side, not the connection's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Chunked:
    """Decodes ``Transfer-Encoding: chunked`` as it arrives, in time linear in its bytes: a body
    of many small chunks is not slower per byte than one of a few large ones."""

    def __init__(self) -> None:
        self._line = b""  # the start of a line (a size, a CRLF, a trailer) the last feed ended in
        self._left = 0  # bytes of the current chunk still to come
        self._after_chunk = False  # its CRLF still to come
        self._in_trailers = False  # after the last chunk: header lines up to an empty one
        self._trailers = 0  # bytes of them read
        self.done = False
        self.surplus = False  # bytes came after the body's end (they are dropped)

    def feed(self, data: bytes) -> memoryview:
        """The chunks' bytes in ``data``, as one piece (a view of ``data`` when they are one
        run of it). The data is walked by offset: cutting each chunk off the front of what was
        left copied the rest every time, and 1 MiB of one-byte chunks took seconds."""
        if self._line:
            data, self._line = self._line + data, b""
        view = memoryview(data)
        pieces = []
        at = 0
        while at < len(data) and not self.done:
            if self._left:
                piece = view[at : at + self._left]
                at += len(piece)
                self._left -= len(piece)
                pieces.append(piece)
                self._after_chunk = self._left == 0
                continue
            line_end = data.find(b"\r\n", at)
            # A line (a size, a trailer) bounded as a head is: one without end would hold ever
            # more memory while the bytes keep the connection from counting as stalled.
            if line_end < 0 and len(data) - at <= MAX_HEAD:
                self._line = data[at:]
                break
            if line_end < 0 or line_end - at > MAX_HEAD:
                raise ValueError("chunk line too long")
            line, at = data[at:line_end], line_end + 2
            if self._after_chunk:
                if line:  # more data than the chunk's size: its size is wrong, not the data
                    raise ValueError("chunk longer than its size")
                self._after_chunk = False  # the CRLF that closes a chunk
                continue
            if self._in_trailers:
                # Not needed, but read to the end: left over, they would be taken for the
                # head of the next answer on this connection.
                self._trailers += len(line) + 2
                if self._trailers > MAX_HEAD:
                    raise ValueError("chunk trailers too large")
                self.done = not line
                continue
            size = _chunk_size(line)
            self._in_trailers = size == 0
            self._left = size
        self.surplus = self.done and at < len(data)
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


def _chunked(value: str) -> bool:
    """Whether a Transfer-Encoding says chunked. Any other coding is refused: a body gzip-coded
    as well would be handed on still compressed, and one not chunked last is not chunked at
    all. ``identity`` (RFC 2616's no-op, which older servers send) changes nothing."""
    if value in ("", "chunked"):  # all but a few answers: told without the lists below
        return bool(value)
    codings = [coding for coding in _tokens(value) if coding not in ("", "identity")]
    if codings not in ([], ["chunked"]):
        raise ValueError(f"unsupported Transfer-Encoding {value[:40]!r}")
    return bool(codings)


def _closes(value: str) -> bool:
    """Whether a Connection header has the ``close`` option. It is a list of tokens, in any
    case (RFC 9110 §7.6.1): taken for close only when it was all of it, "keep-alive, close" kept
    the connection, and the next request went out on it and waited for the server to close."""
    if "," not in value:  # one token or none: all but a few answers, told without a list
        return value.strip().lower() == "close"
    return "close" in _tokens(value)


def _tokens(value: str) -> list[str]:
    """The items of a header that is a comma-separated list (RFC 9110 §5.6.1), in lower case."""
    return [token.strip().lower() for token in value.split(",")]


def _chunk_size(line: bytes) -> int:
    """The size on a chunk's first line: hex digits only (``int`` would take a sign, ``0x`` or
    ``_``, and a negative size would never be consumed)."""
    digits = line.split(b";")[0].strip(b" \t")
    if not digits or digits.strip(b"0123456789abcdefABCDEF"):
        raise ValueError(f"bad chunk size {digits[:20]!r}")
    return int(digits, 16)


# The blank line that ends a head (from the LF of the line before it: a pattern that starts with
# a literal is searched for several times faster). Lines may end in a bare LF, as curl, h11 and
# browsers accept (RFC 9112 §2.2): waiting for a CRLF that never came timed out every request to
# such a server.
_HEAD_END = re.compile(rb"\n\r?\n")
# Three digits, then a reason or nothing (RFC 9112 §4). The first three characters after the
# version were taken for the status: "HTTP/1.1 2" was a 2, "-20" a -20, "099" a 99, all below
# 300 and so a success to the API client; "2000" was a 200.
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] [1-9][0-9][0-9](?: .*)?")
# A line ended by a bare LF, or one that starts with a space or a tab, which goes on the line
# before it (obs-fold): one search tells a head that has either from a usual one.
_ODD_LINES = re.compile("\n(?:[ \t]|(?<!\r\n))")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers of ``head``, which ends where `_HEAD_END` begins."""
    # Without the CR of its last line: on a status line alone, "HTTP/1.1 100", it was refused.
    text = head.decode("latin-1").removesuffix("\r")
    # The odd heads are told by a search in C, so that a usual one costs little more than it did
    # before they were read (each file is one answer at least: 100,000 files, 100,000 heads).
    odd = _ODD_LINES.search(text) is not None
    lines = [line.removesuffix("\r") for line in text.split("\n")] if odd else text.split("\r\n")
    status_line, *header_lines = lines
    if _STATUS_LINE.fullmatch(status_line) is None:
        # It may be our request sent back (a server that echoes): the query string of its
        # target is a presigned signature.
        raise ValueError(f"not an HTTP/1.x status line: {without_query(status_line[:40])!r}")
    status = int(status_line[9:12])  # where the pattern has it: a slice costs less than a group
    if odd:
        header_lines = _unfolded(header_lines)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    if status_line.startswith("HTTP/1.0"):
        headers.setdefault("connection", "close")
    return status, headers


def _unfolded(lines: list[str]) -> list[str]:
    """Header lines with those folded onto the next (obs-fold: a line that starts with a space
    or a tab) read as one, joined by a space (RFC 9112 §5.2). Taken for a header of its own, a
    folded Content-Length was left empty."""
    joined: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t") and joined:
            joined[-1] = f"{joined[-1]} {line.strip()}"
        else:
            joined.append(line)
    return joined


def _content_length(value: str) -> int:
    """Content-Length, said once or repeated (headers of one name arrive joined by ", "): a
    proxy may add its own copy, and RFC 9110 lets the one value be taken. Values that differ
    leave the body's end unknown."""
    lengths = {length.strip() for length in value.split(",")}
    if len(lengths) != 1:
        raise ValueError(f"conflicting Content-Length {value[:40]!r}")
    length = lengths.pop()
    # Digits only: int() takes a sign or "_", and a negative length ended the body at once.
    if not (length.isascii() and length.isdigit()):
        raise ValueError(f"bad Content-Length {value[:40]!r}")
    return int(length)


def _more_to_read(sock: int) -> bool:
    """Whether ``sock`` holds bytes past a body that was read to its end, or was closed."""
    with socket.socket(fileno=os.dup(sock)) as peek:
        try:
            peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"" when closed
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True


class _Woken(Exception):
    """The splice was given up: the task waiting for it was cancelled."""


async def _splice_in_thread(
    sock: int, file: FileTarget, length: int, read_timeout: float
) -> tuple[int, Exception | None]:
    """`_splice` in a worker thread, which a cancellation wakes at once (a thread cannot be
    cancelled, and a stalled socket would keep it, and the run, waiting ``read_timeout``)."""
    # A place in the thread pool first, then the pipe: a splice waiting for a thread holds no
    # descriptors (hundreds of parts in flight would otherwise run into the process's limit).
    async with anyio.to_thread.current_default_thread_limiter():
        wake_read, wake_write = os.pipe()

        async def wake_when_cancelled() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                os.write(wake_write, b"!")

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wake_when_cancelled)
                result = await anyio.to_thread.run_sync(
                    _splice,
                    sock,
                    file.fd,
                    file.offset,
                    length,
                    read_timeout,
                    wake_read,
                    file.splicing,
                    limiter=anyio.CapacityLimiter(1),  # the pool's place is held already
                )
                tasks.cancel_scope.cancel()
        finally:
            os.close(wake_read)
            os.close(wake_write)
    return result


def _write_into(file: FileTarget, data: memoryview) -> None:
    _write_all(file.fd, data, file.offset)
    file.took(len(data))


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """``data`` into ``fd`` at ``offset``: a short write (the disk filling up) is followed by
    one that raises why."""
    while data:
        written = os.pwrite(fd, data, offset)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data, offset = data[written:], offset + written


def _splice(
    sock: int,
    fd: int,
    offset: int,
    length: int,
    timeout: float,
    wake: int,
    landed: Callable[[int], None],
) -> tuple[int, Exception | None]:
    """Move ``length`` bytes from ``sock`` into ``fd`` at ``offset`` through a pipe, in the
    kernel, telling ``landed`` how many are in the file after each move; how many bytes landed,
    and what stopped it short if anything did (``wake`` turning readable: `_Woken`)."""
    read_end, write_end = os.pipe()
    with suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake, select.POLLIN)
    moved = 0
    try:
        while moved < length:
            try:
                got = os.splice(
                    sock,
                    write_end,
                    min(length - moved, PIPE_SIZE),
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
            except BlockingIOError:
                ready = poller.poll(timeout * 1000)
                if not ready:
                    return moved, TimeoutError(f"no data for {timeout:.0f} s")
                if any(ready_fd == wake for ready_fd, _ in ready):
                    return moved, _Woken()
                continue
            if got == 0:
                return moved, ConnectionResetError("connection closed mid-body")
            left = got
            while left:
                try:
                    left -= os.splice(
                        read_end,
                        fd,
                        left,
                        offset_dst=offset + moved + got - left,
                        flags=os.SPLICE_F_MOVE,
                    )
                except OSError as exc:
                    return moved + got - left, _WriteFailed(exc)
            moved += got
            landed(moved)
        return moved, None
    except OSError as exc:
        return moved, exc
    finally:
        os.close(read_end)
        os.close(write_end)
