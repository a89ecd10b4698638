"""The lean HTTP client against raw TCP servers that answer exactly as scripted."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
import trustme
from aiohttp import web

from checkpoint_sync.api import ApiClient
from checkpoint_sync.errors import (
    ApiError,
    CheckpointSyncError,
    IntegrityError,
    LocalIOError,
    TransientError,
    UsageError,
)
from checkpoint_sync.models import TrainingJobCheckpoints
from checkpoint_sync.net import NetSettings
from checkpoint_sync.proxied import refused_length
from checkpoint_sync.retry import RetryPolicy
from checkpoint_sync.wire import FLUSH_AT, RECV_BUFFER, HttpClient, split_url

from .support import proxy_named

pytestmark = pytest.mark.anyio

# Each script: what the server writes for one request, as separate writes; a number is a pause
# in seconds (the bytes after it then come in a TCP segment of their own).
Script = Callable[[int], Sequence[bytes | float]]


class Server:
    def __init__(self, script: Script, *, close_after_each: bool = False) -> None:
        self.script = script
        self.close_after_each = close_after_each
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.requests.append(head)
                for piece in self.script(len(self.requests)):
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/bucket/object?X-Amz-Signature=abc"
    finally:
        listener.close()


@asynccontextmanager
async def client(
    read_timeout: float = 5.0, limit_rate: int | None = None
) -> AsyncIterator[HttpClient]:
    net = NetSettings(connect_timeout=5, read_timeout=read_timeout, limit_rate=limit_rate)
    async with HttpClient(net) as http:
        yield http


async def fetch(http: HttpClient, url: str) -> tuple[int, bytes]:
    got = bytearray()
    async with http.request(url, {"Range": "bytes=0-"}) as response:
        await response.stream_to(got.extend)
        return response.status, bytes(got)


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        # Content-Length, the body in several writes.
        [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhel", b"lo w", b"orld"],
        # Chunked, cut at every byte.
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        + [CHUNKED[i : i + 1] for i in range(len(CHUNKED))],
        # An interim 100 answer before the real one.
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world"],
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </b>\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"Content-Length: 11\r\n\r\nhello world",
        ],
        # The head itself cut in pieces.
        [b"HTTP/1.1 200 OK\r", b"\nContent-Le", b"ngth: 11\r\n\r", b"\nhello world"],
        # One length said twice (a proxy adding its own), as browsers and RFC 9110 accept it.
        [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 11\r\n\r\nhello world"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 11, 11\r\n\r\nhello world"],
        # RFC 2616's Transfer-Encoding that changes nothing.
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 11\r\n\r\n",
            b"hello world",
        ],
        # No reason phrase, with or without its space; a later minor version.
        [b"HTTP/1.1 200\r\nContent-Length: 11\r\n\r\nhello world"],
        [b"HTTP/1.2 200 \r\nContent-Length: 11\r\n\r\nhello world"],
        # A head of its status line alone, with no reason phrase: its CR was read with it.
        [b"HTTP/1.1 100\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"],
        # Lines ended by a bare LF (RFC 9112 §2.2), all or some, the blank line cut in two.
        [b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200\nContent-Length: 11\n", b"\nhello world"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 11\n\r", b"\nhello world"],
        # A header folded over lines (obs-fold), as RFC 9112 §5.2 has a client unfold it.
        [b"HTTP/1.1 200 OK\r\nContent-Length:\r\n \t11\r\n\r\nhello world"],
        [b"HTTP/1.1 200 OK\nContent-Length:\n 11\n\nhello world"],
    ],
    ids=[
        "content-length",
        "chunked",
        "interim-100",
        "interim-103-twice",
        "split-head",
        "twice",
        "listed-twice",
        "identity-transfer-encoding",
        "no-reason",
        "no-reason-but-its-space",
        "status-line-alone-no-reason",
        "lf-line-ends",
        "some-lf-line-ends",
        "folded-header",
        "folded-header-lf-line-ends",
    ],
)
async def test_bodies_arrive_exactly(answer: list[bytes]) -> None:
    server = Server(lambda _: answer)
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"hello world")
    assert server.requests[0].startswith(b"GET /bucket/object?X-Amz-Signature=abc HTTP/1.1\r\n")
    assert b"\r\nRange: bytes=0-\r\n" in server.requests[0]


async def test_a_body_delimited_by_the_end_of_the_connection() -> None:
    server = Server(lambda _: [b"HTTP/1.0 200 OK\r\n\r\nhello ", b"world"], close_after_each=True)
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"hello world")


@pytest.mark.parametrize(
    "options", [b"", b"Connection: Keep-Alive\r\n", b"Connection: x-close, a\r\n"]
)
async def test_connections_are_kept_alive_and_reused(options: bytes) -> None:
    server = Server(
        lambda n: [b"HTTP/1.1 206 Partial\r\n%sContent-Length: 1\r\n\r\n%d" % (options, n)]
    )
    async with serving(server) as url, client() as http:
        assert [await fetch(http, url) for _ in range(3)] == [
            (206, b"1"),
            (206, b"2"),
            (206, b"3"),
        ]
    assert server.connections == 1


async def test_an_idle_connection_the_server_closed_is_replaced_quietly() -> None:
    # The server promises keep-alive, then closes: the next request must not fail for it.
    server = Server(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], close_after_each=True
    )
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


async def test_a_body_cut_short_is_a_transient_error_without_the_query() -> None:
    server = Server(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"], close_after_each=True
    )
    async with serving(server) as url, client() as http:
        with pytest.raises(TransientError) as caught:
            await fetch(http, url)
    assert "X-Amz-Signature" not in str(caught.value)


async def test_a_head_cut_short_is_a_transient_error_that_says_so() -> None:
    # The error had no text of its own: "download:  (http://...)".
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Le"], close_after_each=True)
    async with serving(server) as url, client() as http:
        with pytest.raises(TransientError) as caught:
            await fetch(http, url)
    assert str(caught.value) == (
        "download: connection closed in the middle of an answer's head "
        f"({url.partition('?')[0]}?<redacted>)"
    )


async def test_what_came_before_a_body_was_cut_short_reaches_the_sink() -> None:
    # Less than a buffer's worth, which is handed over only at its end: the break is its end.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    server = Server(lambda _: [head + b"x" * 40000, 0.2], close_after_each=True)
    got = bytearray()
    async with serving(server) as url, client() as http:
        with pytest.raises(TransientError, match="closed mid-body"):
            async with http.request(url, {}) as response:
                await response.stream_to(got.extend)
    assert got == b"x" * 40000  # written, so a resumed part does not ask for it again


async def test_a_body_given_up_on_gets_nothing_more_into_its_sink() -> None:
    # The caller cancelled (a stop, a sibling part failing): its file may be closed by the time
    # the connection it closed reports the loss, and its descriptor reused by another file.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    server = Server(lambda _: [head + b"x" * 40000, 0.25])
    got = bytearray()
    async with serving(server) as url, client() as http:
        with anyio.move_on_after(0.2):
            async with http.request(url, {}) as response:
                await response.stream_to(got.extend)
        given_up_with = len(got)
        await asyncio.sleep(0.1)
    # What came before the stop is written as it stops (a stopped part keeps it); nothing after.
    assert len(got) == given_up_with == 40000


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",  # closes unless it says otherwise
        # A list of options, in any case (RFC 9110 §7.6.1): close is one of them.
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Close ,x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x\r\nConnection: CLOSE\r\n\r\n",
    ],
    ids=[
        "connection-close",
        "Close",
        "http-1.0",
        "close-twice",
        "keep-alive-close",
        "close-x",
        "two-lines",
    ],
)
async def test_a_connection_the_server_will_close_is_not_reused(head: bytes) -> None:
    # The server says it closes, but is slow to: reusing the connection would race its close.
    server = Server(lambda _: [head + b"ok"])
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"ok")
        assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


async def test_a_stalled_answer_times_out() -> None:
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel"])
    started = time.monotonic()
    async with serving(server) as url, client(read_timeout=0.3) as http:
        with pytest.raises(TransientError, match="timed out"):
            await fetch(http, url)
    assert time.monotonic() - started < 1.2  # about the read timeout, not many times it


async def test_an_answer_that_never_comes_times_out_and_its_connection_is_dropped() -> None:
    server = Server(lambda _: [])  # reads each request, never answers
    async with serving(server) as url, client(read_timeout=0.3) as http:
        for _ in range(2):
            with pytest.raises(TransientError, match="timed out"):
                await fetch(http, url)
    assert server.connections == 2


async def test_a_request_given_up_while_waiting_for_its_answer_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with suppress(ConnectionError):
            await reader.read()  # b"" once the client closes its end
        closed.set()

    listener = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/o"
    try:
        async with client() as http:
            with anyio.move_on_after(0.2):  # the caller's own timeout, or a stop
                await fetch(http, url)
            with anyio.fail_after(2):  # closed at once, not when the client goes
                await closed.wait()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"FOO 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        # int() would take it: the body was taken as complete and empty.
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        # int() would take these; a negative size used to spin the event loop forever.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        # The bytes past the size were taken for the CRLF that ends the chunk, and dropped.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * (70 << 10),
        # Each was parsed by a call of its own: a RecursionError, and memory and time without
        # bound for a server that never stops sending them.
        b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        # Kept whole until it ended, or read on for as long as the server kept sending.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"x" * (70 << 10),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 12000,
        # Any "chunked" in it was taken for chunked alone: these bodies were handed on as the
        # gzip stream they are, or cut where a chunk size was guessed.
        CHUNKED_HEAD.replace(b"chunked", b"gzip, chunked") + b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello",
        # Statuses that were taken for a 2, a -20, a 99 (all successes to the API client), a 200.
        b"HTTP/1.1 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 -20 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=[
        "status-line",
        "content-length",
        "content-lengths-differ",
        "negative-content-length",
        "chunk-size",
        "negative-chunk",
        "0x-chunk",
        "chunk-longer-than-its-size",
        "head-too-large",
        "interim-answers-without-end",
        "chunk-line-without-end",
        "trailers-without-end",
        "gzip-then-chunked",
        "chunked-not-last",
        "not-chunked",
        "one-digit-status",
        "negative-status",
        "status-below-100",
        "four-digit-status",
        "no-space-after-version",
    ],
)
async def test_a_malformed_answer_is_a_transient_error(answer: bytes) -> None:
    server = Server(lambda _: [answer], close_after_each=True)
    async with serving(server) as url, client() as http:
        with pytest.raises(TransientError, match="malformed answer") as caught:
            await fetch(http, url)
    assert "X-Amz-Signature" not in str(caught.value)


async def test_a_reset_does_not_end_a_body_delimited_by_the_end_of_the_connection() -> None:
    async def answer_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"partial": ')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()  # RST, not FIN

    listener = await asyncio.start_server(answer_then_reset, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/o"
    try:
        async with client() as http:
            with pytest.raises(TransientError, match="closed mid-body"):
                await fetch(http, url)
    finally:
        listener.close()


async def test_a_connection_left_paused_by_a_partly_read_answer_is_not_reused() -> None:
    # More than is taken in unpaused (MAX_PENDING, then a buffer): the answer stays unfinished.
    page = b"<Error>" + b"x" * (3 << 20) + b"</Error>"

    def script(n: int) -> list[bytes]:
        if n == 1:
            return [b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(page) + page]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    server = Server(script)
    async with serving(server) as url, client(read_timeout=2) as http:
        async with http.request(url, {}) as response:
            await asyncio.sleep(0.2)  # as much as is taken in arrives before it is read
            assert await response.read(7) == b"<Error>"
        with anyio.fail_after(5):
            assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Slow Down\r\nContent-Length: 23\r\n\r\n<Error>SlowDown</Error>",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
    ids=["redirect", "error-page", "no-content"],
)
async def test_a_connection_whose_complete_answer_was_not_read_is_reused(answer: bytes) -> None:
    # Redirects and transient errors are answered without reading their bodies: a connection
    # closed for that costs each of those a new connection (and TLS handshake).
    server = Server(
        lambda n: [answer] if n == 1 else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    )
    async with serving(server) as url, client(read_timeout=2) as http:
        async with http.request(url, {}) as response:
            await asyncio.sleep(0.05)  # the whole answer arrives
            assert response.status != 200
        with anyio.fail_after(5):
            assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
    ids=["redirect", "no-content"],
)
async def test_bytes_past_an_answer_held_unread_keep_its_connection_from_being_reused(
    answer: bytes,
) -> None:
    # They wait in the socket while reading is paused: the next request, sent at once on the
    # same connection, took them for the start of its answer ("malformed answer").
    server = Server(
        lambda n: (
            [answer, 0.05, b"<html>a body it should not have</html>"]
            if n == 1
            else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        )
    )
    async with serving(server) as url, client(read_timeout=2) as http:
        async with http.request(url, {}) as response:
            await asyncio.sleep(0.2)  # the answer, and the bytes past it, arrive
            assert response.status != 200
        with anyio.fail_after(5):
            assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


async def test_bytes_arriving_on_an_idle_connection_keep_it_from_being_reused() -> None:
    # They arrive on the idle connection: left in its buffer, the next request dropped them.
    server = Server(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0.05, b"<html>more"]
    )
    async with serving(server) as url, client(read_timeout=2) as http:
        assert await fetch(http, url) == (200, b"ok")
        await asyncio.sleep(0.2)  # the bytes past the answer arrive
        with anyio.fail_after(5):
            assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


async def test_bytes_arriving_on_a_connection_held_idle_keep_it_from_being_reused() -> None:
    # Held by --limit-rate after its answer, the idle connection does not read them as they
    # come: the next request sent on it took them, a whole answer here, for its own.
    body = os.urandom(125536)
    first: list[bytes | float] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:65536],
        0.1,
        body[65536:],  # read at once, past the bucket (64 KiB): a hold of a third of a second
        0.05,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
    ]
    server = Server(
        lambda n: first if n == 1 else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    )
    async with serving(server) as url, client(read_timeout=2, limit_rate=128 << 10) as http:
        assert await fetch(http, url) == (200, body)
        await asyncio.sleep(0.15)  # the bytes past the answer arrive; the hold goes on
        with anyio.fail_after(5):
            assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 2


@pytest.mark.parametrize("size", [5, 3 << 20], ids=["small", "past-the-buffer"])
async def test_a_body_that_arrives_before_it_is_read_is_handed_over_whole(size: int) -> None:
    body = os.urandom(size)

    def script(n: int) -> list[bytes]:
        if n == 1:
            return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    server = Server(script)
    async with serving(server) as url, client(read_timeout=2) as http:
        got = bytearray()
        async with http.request(url, {}) as response:
            await asyncio.sleep(0.2)  # held unread: all of it, or as much as the buffer takes
            with anyio.fail_after(5):
                await response.stream_to(got.extend)
        assert got == body
        assert await fetch(http, url) == (200, b"ok")
    assert server.connections == 1  # read to its end, the connection is kept


@asynccontextmanager
async def tls_closing_server(
    pieces: Sequence[bytes | float],
) -> AsyncIterator[tuple[HttpClient, str]]:
    """An HTTPS server that writes ``pieces`` (a number: a pause) to one request and closes the
    connection without a TLS close_notify, as many servers do; yields a client that trusts it
    and a URL on it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            while b"\r\n\r\n" not in tls.recv(1 << 16):
                pass
            for piece in pieces:
                if isinstance(piece, float):
                    time.sleep(piece)
                else:
                    tls.sendall(piece)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with ca.cert_pem.tempfile() as ca_file:
        settings = NetSettings(connect_timeout=5, read_timeout=2, ca_bundle=Path(ca_file))
        try:
            async with HttpClient(settings) as http:
                yield http, f"https://127.0.0.1:{listener.getsockname()[1]}/o?X-Amz-Signature=abc"
        finally:
            thread.join(5)
            listener.close()


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"],
    ids=["until-close", "content-length"],
)
async def test_a_body_that_arrives_before_it_is_read_survives_the_server_closing(
    head: bytes,
) -> None:
    # uvloop's TLS transport drops what it has not delivered when the server closes while
    # reading is paused: the body ended short (until-close: silently) or failed the request.
    body = os.urandom(FLUSH_AT + 100_000)  # past FLUSH_AT, within the receive buffer
    assert len(body) < RECV_BUFFER
    cut = FLUSH_AT + 50_000
    pieces: list[bytes | float] = [
        head.replace(b"%d", str(len(body)).encode()) + body[:cut],
        0.1,
        body[cut:],
    ]
    async with tls_closing_server(pieces) as (http, url), http.request(url, {}) as response:
        await asyncio.sleep(0.3)  # all of it, and the close, arrive before it is read
        got = bytearray()
        with anyio.fail_after(5):
            await response.stream_to(got.extend)
    assert len(got) == len(body)
    assert got == body


async def test_more_bytes_than_announced_are_cut_and_the_connection_dropped() -> None:
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello-and-more"])
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"hello")
        assert await fetch(http, url) == (200, b"hello")
    assert server.connections == 2


async def test_bytes_past_a_chunked_body_keep_its_connection_from_being_reused() -> None:
    # As past a Content-Length: the server's framing is not ours, its next answer cannot be told.
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED
    server = Server(lambda _: [chunked + b"SURPLUS"])
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"hello world")
        assert await fetch(http, url) == (200, b"hello world")
    assert server.connections == 2


async def test_error_pages_are_read_up_to_a_limit() -> None:
    page = b"<Error><Code>AccessDenied</Code>" + b"x" * 5000 + b"</Error>"
    head = b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(page)
    server = Server(lambda _: [head + page])
    async with serving(server) as url, client() as http, http.request(url, {}) as response:
        assert response.status == 403
        assert await response.read(40) == page[:40]


@pytest.mark.parametrize(
    "value",
    ["Bearer key\r\nX-Injected: 1", "Bearer key\u2011pasted"],
    ids=["line-break", "non-ascii"],
)
async def test_a_header_that_cannot_be_sent_is_refused_before_anything_is_sent(value: str) -> None:
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    async with serving(server) as url, client() as http:
        with pytest.raises(UsageError, match="Authorization header would contain a line break"):
            async with http.request(url, {"Authorization": value}):
                pass
    assert server.requests == []


async def test_a_refused_connection_is_transient() -> None:
    async with client() as http:
        with pytest.raises(TransientError):
            await fetch(http, "http://127.0.0.1:9/x?sig=1")


BIG = bytes(range(256)) * (24 << 10)  # 6 MiB, past the threshold of a large body


class FileTarget:
    """A file the client may write a large body into without the sink (spliced, over plain
    HTTP; written by a worker thread, over HTTPS); what went around the sink is counted."""

    def __init__(self, path: Path, size: int = len(BIG)) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.offset = 0
        self.behind_sink = 0
        self.spliced = 0  # as a splice under way last told
        self.size = size

    @property
    def room(self) -> int:
        return self.size - self.offset

    def take(self, piece: memoryview) -> None:
        if len(piece) > self.room:
            raise IntegrityError("more than the range")  # as the transfer's sink does
        self.offset += os.pwrite(self.fd, piece, self.offset)

    def took(self, size: int) -> None:
        self.offset += size
        self.behind_sink += size

    def splicing(self, size: int) -> None:
        self.spliced = size

    def write_failed(self, error: OSError) -> Exception:
        return LocalIOError(f"cannot write the part: {error.strerror}")


@asynccontextmanager
async def served(
    server: Server, scheme: str, read_timeout: float = 5.0
) -> AsyncIterator[tuple[HttpClient, str]]:
    """``server`` over ``scheme`` (http or https), and a client that trusts it; yields the
    client and a URL on the server."""
    if scheme == "http":
        async with serving(server) as url, client(read_timeout) as http:
            yield http, url
        return
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    with ca.cert_pem.tempfile() as ca_file:
        net = NetSettings(connect_timeout=5, read_timeout=read_timeout, ca_bundle=Path(ca_file))
        try:
            async with HttpClient(net) as http:
                yield http, f"https://127.0.0.1:{port}/bucket/object?X-Amz-Signature=abc"
        finally:
            listener.close()


SCHEMES = pytest.mark.parametrize("scheme", ["http", "https"])


@SCHEMES
async def test_a_large_body_that_cannot_be_written_fails_as_the_file_not_as_the_network(
    tmp_path: Path, scheme: str
) -> None:
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head, 0.05, BIG])  # all of the body goes around the sink
    target = FileTarget(tmp_path / "part")
    os.close(target.fd)
    target.fd = os.open(tmp_path / "part", os.O_RDONLY)  # as a full or read-only disk would
    async with served(server, scheme) as (http, url):
        with pytest.raises(LocalIOError, match="cannot write the part: Bad file descriptor"):
            async with http.request(url, {}) as response:
                await response.stream_to(target.take, target)
    os.close(target.fd)


@SCHEMES
async def test_bytes_past_a_large_body_keep_its_connection_from_being_reused(
    tmp_path: Path, scheme: str
) -> None:
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(
        lambda n: (
            [head, 0.05, BIG + b"SURPLUS"]
            if n == 1
            else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        )
    )
    target = FileTarget(tmp_path / "part")
    async with served(server, scheme) as (http, url):
        async with http.request(url, {}) as response:
            await response.stream_to(target.take, target)
        assert target.behind_sink == len(BIG)
        assert await fetch(http, url) == (200, b"ok")
    os.close(target.fd)
    assert (tmp_path / "part").read_bytes() == BIG
    assert server.connections == 2


@SCHEMES
async def test_a_large_body_goes_into_the_file_exactly_around_the_sink(
    tmp_path: Path, scheme: str
) -> None:
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head + BIG[:1000], BIG[1000:]])
    target = FileTarget(tmp_path / "part")
    async with served(server, scheme) as (http, url):
        async with http.request(url, {}) as response:
            await response.stream_to(target.take, target)
        assert await fetch(http, url) == (206, BIG)  # the connection is reused afterwards
    os.close(target.fd)
    assert (tmp_path / "part").read_bytes() == BIG
    assert target.behind_sink > len(BIG) // 2
    assert server.connections == 1


@SCHEMES
async def test_a_large_body_cut_short_keeps_what_landed_and_fails(
    tmp_path: Path, scheme: str
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head + BIG[: 5 << 20]], close_after_each=True)
    target = FileTarget(tmp_path / "part")
    async with served(server, scheme) as (http, url):
        with pytest.raises(TransientError):
            async with http.request(url, {}) as response:
                await response.stream_to(target.take, target)
    os.close(target.fd)
    assert target.offset == 5 << 20
    assert (tmp_path / "part").read_bytes() == BIG[: 5 << 20]


@SCHEMES
@pytest.mark.parametrize("with_head", [0, 1000], ids=["body-after-head", "body-with-head"])
async def test_a_body_longer_than_the_range_does_not_go_around_the_sink(
    tmp_path: Path, with_head: int, scheme: str
) -> None:
    # Bytes that came with the head go through the sink before the splice: they count too.
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head + BIG[:with_head], 0.05, BIG[with_head:]])
    target = FileTarget(tmp_path / "part", size=len(BIG) - 100)  # 100 bytes too many come
    async with served(server, scheme) as (http, url):
        with pytest.raises(IntegrityError, match="more than the range"):
            async with http.request(url, {}) as response:
                await response.stream_to(target.take, target)
    os.close(target.fd)
    assert target.behind_sink == 0
    assert (tmp_path / "part").stat().st_size <= target.size


async def test_a_body_whose_connection_closed_before_it_was_read_is_not_spliced(
    tmp_path: Path,
) -> None:
    # The socket is gone by the time the caller gives its file: splicing from it raised a raw
    # ValueError (its descriptor read -1) and left the splice's pipe open.
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head + BIG[:1000]], close_after_each=True)
    target = FileTarget(tmp_path / "part")

    async def receive(http: HttpClient, url: str) -> None:
        async with http.request(url, {}) as response:
            await asyncio.sleep(0.2)  # the server's close arrives before the body is read
            with anyio.fail_after(5):
                await response.stream_to(target.take, target)

    async with serving(server) as url, client() as http:
        before = _pipes_open()
        with pytest.raises(TransientError, match="closed mid-body"):
            await receive(http, url)
        assert _pipes_open() == before
    os.close(target.fd)
    assert target.behind_sink == 0
    assert (tmp_path / "part").read_bytes() == BIG[: target.offset]


def _pipes_open() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        for fd in os.listdir("/proc/self/fd")
        if os.path.islink(f"/proc/self/fd/{fd}")
    )


async def test_splices_waiting_for_a_thread_hold_no_descriptors(tmp_path: Path) -> None:
    threads = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    bodies = threads + 30  # more spliced bodies at once than there are threads
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head, 0.05, BIG[:1000], 3.0])  # then stalls
    targets = [FileTarget(tmp_path / f"part{i}") for i in range(bodies)]
    before = _pipes_open()

    async def receive(http: HttpClient, url: str, target: FileTarget) -> None:
        async with http.request(url, {}) as response:
            await response.stream_to(target.take, target)

    async with serving(server) as url, client() as http:
        with anyio.move_on_after(1.0):
            async with anyio.create_task_group() as tasks:
                for target in targets:
                    tasks.start_soon(receive, http, url, target)
                await anyio.sleep(0.8)
                # Two pipes per running splice (its own, and the one that wakes it); none for
                # the ones still waiting for a thread.
                assert _pipes_open() - before <= 4 * threads
    for target in targets:
        os.close(target.fd)


async def test_a_splice_under_way_tells_how_far_it_got_with_those_bytes_in_the_file(
    tmp_path: Path,
) -> None:
    # Read from the loop while the splice waits for the rest, as the transfer's record of how
    # far a part got is: a run killed then keeps them.
    came = 3 << 20
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    server = Server(lambda _: [head, 0.05, BIG[:came], 30.0, BIG[came:]])
    target = FileTarget(tmp_path / "part")
    async with (
        serving(server) as url,
        client(read_timeout=60) as http,
        http.request(url, {}) as response,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(response.stream_to, target.take, target)
        with anyio.fail_after(20):  # never told: the splice ends only with the body
            while target.offset + target.spliced < came:  # noqa: ASYNC110 (set by a thread)
                await anyio.sleep(0.01)
        reached = target.offset + target.spliced
        landed = (tmp_path / "part").read_bytes()
        tasks.cancel_scope.cancel()
    os.close(target.fd)
    assert target.spliced > 0
    assert reached == came
    assert landed == BIG[:came]


@SCHEMES
@pytest.mark.parametrize("size", [len(BIG), 2 << 20], ids=["large", "through-the-sink"])
async def test_cancelling_a_stalled_body_returns_at_once_with_what_came_written(
    tmp_path: Path, scheme: str, size: int
) -> None:
    body = BIG[:size]
    came = 1 << 20 if size == len(BIG) else 256 << 10  # less than a buffer's worth, held in it
    head = b"HTTP/1.1 206 Partial\r\nContent-Length: %d\r\n\r\n" % size
    server = Server(lambda _: [head, 0.05, body[:came], 5.0, body[came:]])
    target = FileTarget(tmp_path / "part", size)
    started = time.monotonic()
    async with served(server, scheme, read_timeout=30) as (http, url):
        with anyio.move_on_after(0.5):
            async with http.request(url, {}) as response:
                await response.stream_to(target.take, target)
    os.close(target.fd)
    assert time.monotonic() - started < 2.5  # not the stall's 5 s, nor the read timeout's 30
    # What came is written, in place, whichever way: a stopped part keeps it for the next run.
    assert target.offset == came
    assert (tmp_path / "part").read_bytes() == body[:came]


@asynccontextmanager
async def proxy_in_env(
    monkeypatch: pytest.MonkeyPatch, scheme: str = "http://", variable: str = "HTTP_PROXY"
) -> AsyncIterator[list[bytes]]:
    """A minimal HTTP proxy named by ``variable`` (as ``{scheme}127.0.0.1:PORT``); yields the
    request heads it forwarded."""
    seen: list[bytes] = []

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Absolute-form request in, origin-form request out, then bytes both ways as they come.
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        method, target, rest = head.split(b" ", 2)
        origin = target.split(b"/", 3)
        host, port = origin[2].decode().rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        upstream_writer.write(b" ".join([method, b"/" + origin[3], rest]))
        await asyncio.gather(relay(upstream_reader, writer), relay(reader, upstream_writer))

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0)
    url = f"{scheme}127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    try:
        with proxy_named(monkeypatch, variable, url):
            yield seen
    finally:
        proxy.close()


# A proxy named without a scheme ("proxy.corp:3128") is an HTTP proxy, as curl, urllib and
# requests take it; aiohttp refused it as an invalid URL, and every request failed its retries.
# ALL_PROXY was ignored: curl, httpx and urllib use it for a scheme with no proxy of its own.
@pytest.mark.parametrize(
    ("variable", "scheme"),
    [
        ("HTTP_PROXY", "http://"),
        ("HTTP_PROXY", ""),
        ("ALL_PROXY", "http://"),
        ("all_proxy", ""),
    ],
)
async def test_urls_behind_a_proxy_go_through_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, scheme: str
) -> None:
    server = Server(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nproxy"]
    )
    async with (
        proxy_in_env(monkeypatch, scheme, variable) as seen,
        serving(server) as url,
        client() as http,
    ):
        assert await fetch(http, url) == (200, b"proxy")
    assert seen
    assert seen[0].startswith(b"GET http://127.0.0.1:")


@pytest.mark.parametrize(
    ("variable", "unused"),
    [
        ("HTTP_PROXY", "all_proxy"),  # the scheme's own variable before ALL_PROXY
        ("all_proxy", "ALL_PROXY"),  # the lower-case one, as urllib takes it
    ],
)
async def test_which_proxy_variable_counts(
    monkeypatch: pytest.MonkeyPatch, variable: str, unused: str
) -> None:
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nproxy"])
    async with proxy_in_env(monkeypatch, variable=variable) as seen, serving(server) as url:
        monkeypatch.setenv(unused, "socks5://127.0.0.1:9")  # refused, were it taken
        async with client() as http:
            assert await fetch(http, url) == (200, b"proxy")
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (  # llhttp (aiohttp's C parser), as aiohttp 3.14 words it
            "Invalid character in Content-Length:\n\n  b'Content-Length: 5, 5'\n      ^",
            '"Content-Length: 5, 5"',
        ),
        (
            "Invalid character in Content-Length:\n\n  b'content-length: 5,6'",
            '"content-length: 5,6"',
        ),
        (  # a long one, quoted whole
            "Invalid character in Content-Length:\n\n  b'Content-Length: 1099511627776, "
            "1099511627776'",
            '"Content-Length: 1099511627776, 1099511627776"',
        ),
        ("Invalid character in Content-Length", "an unreadable Content-Length"),
        ("Duplicate Content-Length:\n\n  b'Content-Length: 5'\n      ^", "Content-Length twice"),
        ("Invalid HTTP header: 'Content-Length'", "an unreadable Content-Length"),  # pure Python
        ("Content-Length can't be present with Transfer-Encoding", None),
        ("Invalid HTTP header: 'Content-Type'", None),
        ("Bad status line 'HTTP/1.1 abc'", None),
    ],
)
def test_a_content_length_aiohttp_refuses_is_told_by_its_message(
    message: str, said: str | None
) -> None:
    assert refused_length(message) == said


async def test_a_proxy_that_never_answers_connect_is_a_transient_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiohttp reads the answer to CONNECT without sock_read: a proxy that took the connection
    # and said nothing held the request (and its part's retries) forever.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    proxy = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    settings = NetSettings(connect_timeout=0.5, read_timeout=0.5)
    try:
        with proxy_named(monkeypatch, "HTTPS_PROXY", f"http://127.0.0.1:{port}"):
            async with HttpClient(settings) as http:
                with pytest.raises(TransientError) as caught, anyio.fail_after(20):  # hang guard
                    await fetch(http, "https://127.0.0.1:1/x?X-Amz-Signature=abc")
    finally:
        proxy.close()
    assert str(caught.value).endswith("https://127.0.0.1:1/x?<redacted>")


@pytest.mark.parametrize(
    ("host", "no_proxy", "direct"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "localhost,127.0.0.1:{port}", True),  # a port, as urllib matches it
        ("127.0.0.1", "127.0.0.1:{other}", False),  # another port is still proxied
        ("::1", "::1", True),
        ("::1", "[::1]", True),  # an IPv6 literal written as in URLs
        ("::1", "[::1]:{port}", True),
    ],
)
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
async def test_hosts_no_proxy_names_are_reached_directly(
    monkeypatch: pytest.MonkeyPatch, host: str, no_proxy: str, direct: bool, variable: str
) -> None:
    # The proxy was looked up by the host alone: NO_PROXY entries with a port, or an IPv6
    # address in brackets, never matched, and their requests went to the proxy.
    server = Server(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndirect"])
    listener = await asyncio.start_server(server.handle, host, 0)
    port = listener.sockets[0].getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/x"
    try:
        with proxy_named(monkeypatch, variable, "http://127.0.0.1:9"):  # nobody listens
            monkeypatch.setenv("NO_PROXY", no_proxy.format(port=port, other=port + 1))
            async with client() as http:
                if direct:
                    assert await fetch(http, url) == (200, b"direct")
                else:
                    with pytest.raises(TransientError):
                        await fetch(http, url)
    finally:
        listener.close()
    assert len(server.requests) == direct


async def test_bodies_behind_a_proxy_arrive_whole_however_they_are_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(
        lambda n: (
            [CHUNKED_HEAD + b"5\r\nhello", 0.05, b"\r\n5\r\nworld\r\n0\r\n\r\n"]
            if n == 1
            else [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", 0.05, b"world"]
        )
    )
    async with proxy_in_env(monkeypatch) as seen, serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"helloworld")
        async with http.request(url, {}) as response:
            assert await response.read(1000) == b"helloworld"  # up to the limit, not one read
    assert seen


@pytest.mark.parametrize(
    ("framing", "length", "proxied"),
    [
        (b"Content-Length: 11\r\n", 11, False),
        (b"Content-Length: 11\r\n", 11, True),
        # Said twice, on one line and on two (aiohttp refuses either).
        (b"Content-Length: 11, 11\r\nContent-Length: 11\r\n", 11, False),
        (b"Transfer-Encoding: chunked\r\n", None, False),
        (b"Transfer-Encoding: chunked\r\n", None, True),
        (b"Connection: close\r\n", None, False),  # the body ends with the connection
        (b"Connection: close\r\n", None, True),
    ],
    ids=[
        "length",
        "length-proxied",
        "length-twice",
        "chunked",
        "chunked-proxied",
        "until-close",
        "until-close-proxied",
    ],
)
async def test_an_answer_tells_the_length_of_its_body_as_its_framing_gives_it(
    monkeypatch: pytest.MonkeyPatch, framing: bytes, length: int | None, proxied: bool
) -> None:
    body = CHUNKED if b"chunked" in framing else b"hello world"
    answer = [b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body]
    server = Server(lambda _: answer, close_after_each=True)
    async with AsyncExitStack() as stack:
        if proxied:
            await stack.enter_async_context(proxy_in_env(monkeypatch))
        url = await stack.enter_async_context(serving(server))
        http = await stack.enter_async_context(client())
        async with http.request(url, {}) as response:
            assert response.length == length
            assert await response.read(100) == b"hello world"


@pytest.mark.parametrize(
    ("first", "connections"),
    [
        # Its trailers are read before the connection is used again.
        ([CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n", 0.05, b"X-Checksum: 1\r\n\r\n"], 1),
        # Framed by chunks and a length: chunked wins (RFC 9112 §6.3), and such an answer may be
        # an attempt at response splitting, so its connection is not used again.
        (
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            ],
            2,
        ),
    ],
    ids=["trailers", "chunks-and-length"],
)
async def test_a_chunked_answer_is_read_to_its_end_before_its_connection_serves_again(
    first: list[bytes | float], connections: int
) -> None:
    server = Server(
        lambda n: first if n == 1 else [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    )
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, b"hello")
        assert await fetch(http, url) == (200, b"ok")
    assert server.connections == connections


async def test_a_body_of_many_tiny_chunks_is_read_in_time_linear_in_its_size() -> None:
    # Each chunk was cut off the front of the bytes left, copying them all: 300,000 one-byte
    # chunks (1.8 MB) took 4.5 s of the event loop, time no read_timeout bounds.
    server = Server(lambda _: [CHUNKED_HEAD + b"1\r\nx\r\n" * 300_000 + b"0\r\n\r\n"])
    async with serving(server) as url, client() as http:
        # CPU time of this process (client and server both): the wall clock of a busy machine
        # counts other processes' turns too (4.3 s of it here, under 8 CPU-bound processes).
        started = time.process_time()
        assert await fetch(http, url) == (200, b"x" * 300_000)
    assert time.process_time() - started < 2.0  # 0.4 s here, busy or not; 4.7 s copying


def api_client(http: HttpClient, url: str) -> ApiClient:
    """The management API at the scripted server's origin, tried once."""
    return ApiClient(
        http,
        url.partition("/bucket")[0],
        api_key="secret-key",
        auth_scheme="Api-Key",
        key_hint="BASETEN_API_KEY",
        retry=RetryPolicy(attempts=1),
    )


JOB_ANSWER = (
    b'{"training_job": {"id": "job-1"}, '
    b'"checkpoints": [{"checkpoint_id": "c-1", "created_at": "2026-11-22T10:00:00Z"}]}'
)


def checkpoint_ids(listed: TrainingJobCheckpoints) -> list[str]:
    return [getattr(checkpoint, "checkpoint_id", "unreadable") for checkpoint in listed.checkpoints]


async def test_api_calls_behind_a_proxy_go_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = JOB_ANSWER
    server = Server(
        lambda _: [
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(answer), answer)
        ]
    )
    async with proxy_in_env(monkeypatch) as seen, serving(server) as url, client() as http:
        got = await api_client(http, url).get(
            "/v1/jobs", TrainingJobCheckpoints, what="job", params={"a": "b c"}
        )
    assert checkpoint_ids(got) == ["c-1"]
    (head,) = seen
    assert head.startswith(b"GET http://127.0.0.1:")
    assert b"/v1/jobs?a=b%20c HTTP/1.1" in head
    assert b"Authorization: Api-Key secret-key" in head


@pytest.mark.parametrize(
    "head",
    [b"Content-Type: application/json; charset=utf-8\r\n", b"Content-Type: text/plain\r\n"],
    ids=["json", "text-plain"],
)
async def test_an_api_answer_that_starts_with_a_byte_order_mark_is_json(head: bytes) -> None:
    answer = b"\xef\xbb\xbf" + JOB_ANSWER
    server = Server(
        lambda _: [
            b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (head, len(answer), answer)
        ]
    )
    async with serving(server) as url, client() as http:
        got = await api_client(http, url).get("/v1/jobs", TrainingJobCheckpoints, what="job")
    assert checkpoint_ids(got) == ["c-1"]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 304 Not Modified\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nLocation: /v2/jobs\r\n\r\n",  # still no redirect
        b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 300 Multiple Choices\r\nLocation:\r\nContent-Length: 0\r\n\r\n",
        # A code not registered is read as the x00 of its class (RFC 9110 §15): a 300.
        b"HTTP/1.1 399 Unknown\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["304", "304-location", "302-nowhere", "300-empty-location", "399-unregistered"],
)
async def test_an_api_answer_of_3xx_that_leads_nowhere_is_unexpected_not_a_redirect(
    head: bytes,
) -> None:
    # "The API redirected; check its URL" (exit 2) sent the operator after a URL that was right.
    server = Server(lambda _: [head])
    async with serving(server) as url, client() as http:
        with pytest.raises(ApiError) as caught:
            await api_client(http, url).get("/v1/jobs", TrainingJobCheckpoints, what="job")
    status = head[9:12].decode()
    assert str(caught.value) == f"job: unexpected answer (HTTP {status}) from the API"
    assert caught.value.exit_code == 1
    assert len(server.requests) == 1  # it would answer the same again


@asynccontextmanager
async def compressing_server(body: bytes) -> AsyncIterator[str]:
    """An aiohttp server that gzips its answers to clients that accept gzip, as nginx's or a
    CDN's compression does; yields a URL on it."""

    async def answer(request: web.Request) -> web.Response:
        response = web.Response(body=body, content_type="application/json")
        response.enable_compression()  # only if the request's Accept-Encoding allows it
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/bucket/object?X-Amz-Signature=abc"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "proxied"])
async def test_bodies_arrive_as_stored_from_a_server_that_compresses_on_request(
    monkeypatch: pytest.MonkeyPatch, proxied: bool
) -> None:
    # The proxied path sent aiohttp's default "Accept-Encoding: gzip, deflate" and kept the
    # compressed bytes: every API answer was "not JSON", every file the wrong length.
    answer = JOB_ANSWER + b" " * 4000
    async with AsyncExitStack() as stack:
        if proxied:
            await stack.enter_async_context(proxy_in_env(monkeypatch))
        url = await stack.enter_async_context(compressing_server(answer))
        http = await stack.enter_async_context(client())
        assert await fetch(http, url) == (200, answer)
        got = await api_client(http, url).get("/v1/jobs", TrainingJobCheckpoints, what="job")
    assert checkpoint_ids(got) == ["c-1"]


async def test_bodies_arrive_as_stored_from_a_server_free_to_compress_them() -> None:
    # A request without Accept-Encoding accepts any coding (RFC 9110 §12.5.3): this server
    # gzips unless told not to, as it may.
    stored = b"hello world" * 100

    def answer(n: int) -> list[bytes]:
        if b"\r\nAccept-Encoding: identity\r\n" in server.requests[n - 1]:
            return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(stored), stored)]
        packed = gzip.compress(stored)
        return [
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(packed), packed)
        ]

    server = Server(answer)
    async with serving(server) as url, client() as http:
        assert await fetch(http, url) == (200, stored)


async def test_an_api_error_page_nested_too_deep_to_parse_is_still_a_clear_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    server = Server(
        lambda _: [b"HTTP/1.1 422 Unprocessable\r\nContent-Length: %d\r\n\r\n" % len(body), body]
    )
    async with serving(server) as url, client() as http:
        with pytest.raises(CheckpointSyncError) as caught:
            await api_client(http, url).get("/v1/jobs", TrainingJobCheckpoints, what="job")
    assert caught.value.exit_code == 2
    assert "rejected the request" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://h/p?q=1",
        "http://h?q",
        "http://h",
        "http://h/p?",
        "HTTPS://user:pw@Host:8443/a/b?x=1&y=%2F#fragment",
        "http://h#f",
        "http://h/p#f?x",
        "http://[::1]:8080/x?y",
        "http://h/a?b?c",
    ],
)
def test_a_url_is_cut_into_origin_and_target_as_urlsplit_cuts_it(url: str) -> None:
    parts = urlsplit(url)
    origin, target = split_url(url)
    assert target == (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    assert origin.key == (
        parts.scheme,
        parts.hostname,
        parts.port or {"http": 80}.get(parts.scheme, 443),
    )
    assert origin.authority == parts.netloc.rpartition("@")[2]
