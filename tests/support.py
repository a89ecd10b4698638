"""Test support: the built-in server on a thread of its own, and the CLI run in process.

The server runs its own event loop in a background thread so that the code under test can own
the main thread exactly as it does for a user (``main()`` calls ``anyio.run`` itself).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import selectors
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import (
    aclosing,
    asynccontextmanager,
    contextmanager,
    redirect_stderr,
    redirect_stdout,
    suppress,
)
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from checkpoint_sync.api import ApiClient
from checkpoint_sync.cli import main
from checkpoint_sync.localserver import Catalog, Faults, LocalServer, ServedFile, content
from checkpoint_sync.manifest import Manifest
from checkpoint_sync.net import NetSettings, proxy_for_host
from checkpoint_sync.rate import READ_SIZE
from checkpoint_sync.retry import RetryPolicy
from checkpoint_sync.sources.base import FilePages
from checkpoint_sync.wire import HttpClient

T = TypeVar("T")
API_KEY = "test-key-0123456789abcdef"


class ServerThread:
    """A `LocalServer` on its own loop and thread; changes go through `call`."""

    def __init__(
        self, catalog: Catalog, faults: Faults | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.server = LocalServer(catalog, faults=faults, tls=tls)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def catalog(self) -> Catalog:
        return self.server.catalog

    @property
    def faults(self) -> Faults:
        return self.server.faults

    @property
    def traffic(self) -> Any:
        return self.server.traffic

    def files(self) -> list[ServedFile]:
        return list(self.catalog.files())

    def data_size(self) -> int:
        return sum(f.size for f in self.files())

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.server:
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop, so it never races a request in progress."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@contextmanager
def stop_signals_kept() -> Iterator[None]:
    """The stop signals' handlers as they were: a run in this process ignores them once its job
    is over (`cli._run`), as its process is about to exit; this one goes on, and the runs it
    starts as processes would inherit that."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = {signum: signal.getsignal(signum) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def run_cli(*args: str | Path) -> Result:
    """``checkpoint-sync ARGS`` in this process, with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), stop_signals_kept():
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    assert_no_secret(out.getvalue() + err.getvalue())
    return Result(code, out.getvalue(), err.getvalue())


def assert_no_secret(text: str) -> None:
    """Checked on every run in the tests: the key and presigned signatures never show."""
    assert API_KEY not in text, "the API key was printed"
    assert "X-Amz-Signature" not in text, "a presigned URL's query string was printed"


def run_subprocess(
    *args: str | Path, env: dict[str, str] | None = None, umask: int = -1
) -> subprocess.Popen[bytes]:
    """``python -m checkpoint_sync ARGS`` as a real process (for kills and signals), with
    ``umask`` if given (-1: this process's)."""
    return subprocess.Popen(
        [sys.executable, "-m", "checkpoint_sync", *[str(a) for a in args]],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        umask=umask,
    )


def run_without_dac_override(
    *args: str | Path, umask: int = -1
) -> subprocess.CompletedProcess[bytes]:
    """``python -m checkpoint_sync ARGS`` as root without the capabilities that override file
    modes, so that a mode keeps the run out as it keeps out a user (of the group of a file
    that another uid owns); skipped where they cannot be dropped. ``umask`` as
    `run_subprocess`'s."""
    command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m"]
    try:
        run = subprocess.run(
            [*command, "checkpoint_sync", *[str(a) for a in args]],
            capture_output=True,
            timeout=60,
            umask=umask,
        )
    except FileNotFoundError:
        pytest.skip("no setpriv here")
    if b"setpriv:" in run.stderr:
        pytest.skip(f"cannot drop capabilities here ({run.stderr.decode().strip()})")
    return run


def stop_while_the_manifest_is_held(
    process: subprocess.Popen[bytes], manifest: Path, signum: int = signal.SIGINT
) -> tuple[bytes, bytes]:
    """Send ``signum`` to ``process`` while another program holds ``manifest`` (say, someone
    editing it with the sqlite3 shell), so that the stop cannot record what it would; its
    stdout and stderr once it ended (SQLite waits 5 s for the lock)."""
    other = sqlite3.connect(manifest, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        process.send_signal(signum)
        return process.communicate(timeout=30)
    finally:
        other.close()


def mirrored(dest: Path, run: str, file: ServedFile) -> Path:
    """Where a job-level listed ``file`` lands under ``dest``."""
    checkpoint, _, rest = file.name.partition("/")
    return dest / run / checkpoint / str(file.node_rank) / rest


@contextmanager
def proxy_named(monkeypatch: pytest.MonkeyPatch, variable: str, url: str) -> Iterator[None]:
    """``variable`` (HTTP_PROXY, HTTPS_PROXY or ALL_PROXY, in either case) names ``url``, nothing
    bypasses it (NO_PROXY), and the proxy looked up per host is forgotten before and after."""
    for name in (variable.lower(), "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, url)
    proxy_for_host.cache_clear()
    try:
        yield
    finally:
        proxy_for_host.cache_clear()


def new_version(*files: ServedFile) -> None:
    """Replace ``files`` on the server as an upload would: other bytes, a later last_modified.
    Call it on the server's thread (``server.call``, or inside a fault hook)."""
    for file in files:
        file.seed, file.last_modified = file.seed + 1000, "2026-12-01T00:00:00+00:00"


def leave_in_parts(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, args: list[str], *, from_byte: int
) -> None:
    """A sync (``args``) whose files fail from byte ``from_byte`` on, with no retry: each file
    in parts is left in parts, those before ``from_byte`` recorded, and the run ends with exit
    1. On one connection: side by side, a part failing at once would cancel those before it
    while they still streamed."""
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    server.faults.hook = lambda name, start, end: "500" if start >= from_byte else None
    assert run_cli(*args, "--concurrency", "1").code == 1
    server.faults.hook = None


def first_answers(count: int, fault: str) -> Callable[[str, int, int], str | None]:
    """A `Faults.hook` that gives the first ``count`` object answers ``fault``, and no other."""
    answered = 0

    def hook(name: str, start: int, end: int) -> str | None:
        nonlocal answered
        answered += 1
        return fault if answered <= count else None

    return hook


def staged(dest: Path) -> set[str]:
    """``<run>/<checkpoint>`` of every file the mirror's manifest holds in parts; each has its
    staging file."""
    db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
    try:
        paths = [path for (path,) in db.execute("SELECT path FROM staging")]
    finally:
        db.close()
    assert len(list((dest / ".checkpoint-sync" / "staging").iterdir())) == len(paths)
    return {"/".join(path.split("/", 2)[:2]) for path in paths}


def note_staging_writes(manifest: Path) -> None:
    """Have the manifest at ``manifest`` (made now) note every row added to its tables of files
    in parts, for `staging_writes`."""
    Manifest(manifest).close()
    db = sqlite3.connect(manifest, isolation_level=None)
    try:
        db.executescript(
            """
            CREATE TABLE staging_writes (tab TEXT);
            CREATE TRIGGER staged AFTER INSERT ON staging
                BEGIN INSERT INTO staging_writes VALUES ('staging'); END;
            CREATE TRIGGER reached AFTER INSERT ON parts_reached
                BEGIN INSERT INTO staging_writes VALUES ('parts_reached'); END;
            """
        )
    finally:
        db.close()


def staging_writes(manifest: Path) -> list[str]:
    """The tables of files in parts written since `note_staging_writes`, a row each."""
    db = sqlite3.connect(manifest)
    try:
        return [tab for (tab,) in db.execute("SELECT tab FROM staging_writes")]
    finally:
        db.close()


def trusted_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> ssl.SSLContext:
    """A server's TLS context, its certificate from a CA that the environment ``variable``
    (SSL_CERT_FILE, CHECKPOINT_SYNC_CA_BUNDLE) tells the client to trust."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv(variable, str(tmp_path / "ca.pem"))
    return tls


def assert_exact(path: Path, file: ServedFile) -> None:
    data = path.read_bytes()
    assert len(data) == file.size, f"{path}: {len(data)} bytes, expected {file.size}"
    assert data == content(file.seed, 0, file.size), f"{path}: content differs"


def send_answer(
    handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str | None = None
) -> None:
    """Answer ``handler``'s request with ``status`` and ``body``, its length told."""
    handler.send_response(status)
    if content_type is not None:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def http_serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` answering on 127.0.0.1, on threads of its own, quietly; yields its origin."""

    class Quiet(handler):  # type: ignore[valid-type,misc]  # a class given at run time
        def log_message(self, *args: object) -> None:
            pass

        def handle(self) -> None:
            with suppress(ConnectionError):  # a client that gave up on an answer dropped it
                super().handle()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def api_client(
    url: str,
    key: str = API_KEY,
    key_hint: str = "BASETEN_API_KEY",
    scheme: str = "Bearer",
    *,
    attempts: int = 1,
) -> AsyncIterator[ApiClient]:
    """A client of the API at ``url``, on connections of its own, that by default does not
    retry: what a source module asks of it is answered once (retried at once, ``attempts``)."""
    async with HttpClient(NetSettings(connect_timeout=5, read_timeout=5)) as http:
        yield ApiClient(
            http,
            url,
            api_key=key,
            auth_scheme=scheme,
            key_hint=key_hint,
            retry=RetryPolicy(attempts=attempts, initial_delay=0),
        )


async def walk_through(pages: FilePages) -> None:
    """Read a source's listing to its end, keeping nothing."""
    async with aclosing(pages):
        async for _ in pages:
            pass


def pages_being_read() -> int:
    """How many listing pages are still being asked for, not yet answered or let go."""
    return sum(
        not task.done()
        and not task.cancelling()
        and getattr(task.get_coro(), "__qualname__", None) == "read_page"
        for task in asyncio.all_tasks()
    )


@contextmanager
def job_listing_checkpoints(job: str, entries: Sequence[Mapping[str, object]]) -> Iterator[str]:
    """A training job API whose checkpoint list is ``entries``, as given (off the schema if
    need be), and whose file listing is empty; yields its origin."""

    class Answers(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            answer: dict[str, object] = {"presigned_urls": [], "total_count": 0}
            if self.path.endswith("/checkpoints"):
                answer = {"training_job": {"id": job}, "checkpoints": entries}
            send_answer(self, 200, json.dumps(answer).encode(), "application/json")

    with http_serving(Answers) as origin:
        yield origin


class TunnelProxy(socketserver.ThreadingTCPServer):
    """An HTTP(S) proxy: ``CONNECT host:port``, then bytes both ways (``tunnels`` lists targets);
    a plain-HTTP request is sent on, and its answer's head passed through ``answer_head`` on the
    way back (``forwarded`` lists their targets)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer_head: Callable[[str, bytes], bytes] = lambda _, head: head) -> None:
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.answer_head = answer_head
        self.tunnels: list[str] = []
        self.forwarded: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> TunnelProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class _Tunnel(socketserver.BaseRequestHandler):
    server: TunnelProxy
    request: socket.socket

    def handle(self) -> None:
        with suppress(ConnectionError):
            head, body = _message(self.request)
            method, target, rest = head.split(b" ", 2)
            if method != b"CONNECT":
                self._forward(method, target.decode(), rest, body)
                return
            host, port = target.decode().rsplit(":", 1)
            self.server.tunnels.append(target.decode())
            with socket.create_connection((host, int(port))) as upstream:
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                ends = {self.request: upstream, upstream: self.request}
                with selectors.DefaultSelector() as selector:
                    for end in ends:
                        selector.register(end, selectors.EVENT_READ)
                    while True:  # until either side closes
                        for key, _ in selector.select():
                            source = key.fileobj
                            assert isinstance(source, socket.socket)
                            data = source.recv(1 << 16)
                            if not data:
                                return
                            ends[source].sendall(data)

    def _forward(self, method: bytes, target: str, rest: bytes, body: bytes) -> None:
        """One request, its target in origin form; the answer ends the connection."""
        self.server.forwarded.append(target)
        authority, _, path = target.removeprefix("http://").partition("/")
        host, port = authority.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as upstream:
            upstream.sendall(b"%s /%s %s\r\n\r\n%s" % (method, path.encode(), rest, body))
            head, answer = _message(upstream)
        kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection")]
        head = self.server.answer_head(target, b"\r\n".join([*kept, b"Connection: close"]))
        self.request.sendall(head + b"\r\n\r\n" + answer)


def _message(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP message's head (without its blank line) and body, framed by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _received(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while length is not None and len(body) < int(length[1]):
        body += _received(sock)
    return head, body


def _received(sock: socket.socket) -> bytes:
    if not (data := sock.recv(1 << 16)):
        raise ConnectionError("closed mid-message")
    return data


def least_seconds(size: int, rate: int, connections: int, read: int = READ_SIZE) -> float:
    """The shortest a transfer of ``size`` bytes may take under ``--limit-rate`` ``rate``: all
    but the bucket and one ``read`` per connection (taken before it waits) go at the rate."""
    return (size - max(rate / 10, READ_SIZE) - connections * read) / rate


# API requests of a run whose file was pushed off its page (`pushed_off_its_page`): the checkpoint
# list and two pages; the refused file's page; then the listing from its start up to the page
# that shows it.
PUSHED_OFF_REQUESTS = 1 + 2 + 1 + 3


def pushed_off_its_page(
    files: list[ServedFile], name: str, file_id: int
) -> tuple[ServedFile, Callable[[str, int, int], str | None]]:
    """A file ``name`` to add at the start of ``files``, and a fault hook that adds it and then
    refuses (403) the URL of the last of ``files``, once: with pages of two, that file's page,
    read again, no longer shows it (it was pushed to the next one)."""
    pushed = files[-1]
    added = ServedFile(0, name, 100, pushed.last_modified, file_id)

    def refuse_once(name: str, start: int, end: int) -> str | None:
        if name != pushed.name or added in files:
            return None
        files.insert(0, added)
        return "403"

    return added, refuse_once
