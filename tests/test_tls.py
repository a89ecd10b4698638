"""HTTPS end to end: the API and the objects over TLS, trusted through a CA bundle or
SSL_CERT_FILE, and an untrusted certificate refused as a configuration error; and what
`tls.py` checks itself (the host name, SNI, the trust store it loads)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import anyio
import pytest
import trustme
from cryptography.hazmat.bindings.openssl.binding import Binding

from checkpoint_sync import __version__, tls
from checkpoint_sync.errors import TransientError, UsageError
from checkpoint_sync.net import NetSettings
from checkpoint_sync.wire import HttpClient

from .conftest import JOB, job_catalog, sync_args
from .support import (
    ServerThread,
    TunnelProxy,
    assert_exact,
    least_seconds,
    mirrored,
    proxy_named,
    run_cli,
    run_subprocess,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def https_server(ca: trustme.CA) -> Iterator[ServerThread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with ServerThread(job_catalog(), tls=context) as running:
        yield running


def test_a_job_over_https_is_mirrored_byte_exact_with_the_configured_ca(
    https_server: ServerThread, dest: Path, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_CA_BUNDLE", str(ca_file))
    assert https_server.url.startswith("https://")

    result = run_cli(*sync_args(https_server, dest, "--json"))

    assert result.code == 0, result.stderr
    # Files of several 256 KiB parts and one-stream files, all through TLS.
    assert json.loads(result.stdout)["files"]["fetched"] == len(https_server.files())
    for file in https_server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_large_parts_over_https_cut_mid_body_land_exact_refetching_only_what_was_cut(
    ca: trustme.CA, dest: Path, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 8 MiB: decrypted on the loop and written by worker threads, a buffer at a time.
    # Each part's first answer is cut half way, reset or short: what landed before the cut stays.
    monkeypatch.setenv("CHECKPOINT_SYNC_CA_BUNDLE", str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    catalog = job_catalog(checkpoints=1, large_size=20 << 20, small_files=1)
    cut: dict[tuple[str, int], str] = {}

    def cut_each_part_once(name: str, start: int, end: int) -> str | None:
        if end - start < 4 << 20 or (name, start) in cut:
            return None
        cut[name, start] = "reset" if len(cut) % 2 else "short"
        return cut[name, start]

    with ServerThread(catalog, tls=context) as server:
        server.faults.hook = cut_each_part_once
        result = run_cli(*sync_args(server, dest, "--part-size", "8MiB", "--json"))
        files = server.files()
        sent = server.traffic.object_bytes_sent

    assert result.code == 0, result.stderr
    assert cut  # every large part was cut once
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)
    # A part resumes where its bytes stopped landing: no more than the data and one part again.
    assert sent <= sum(f.size for f in files) + (8 << 20)


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_a_job_over_https_keeps_to_the_rate_limit(
    https_server: ServerThread,
    dest: Path,
    ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    through_proxy: bool,
    request: pytest.FixtureRequest,
) -> None:
    # Decrypted by tls.py straight into each connection's buffer, or read by aiohttp past a
    # proxy (proxied.py): both draw on the one bucket.
    if through_proxy:
        request.getfixturevalue("https_proxy")
    monkeypatch.setenv("CHECKPOINT_SYNC_CA_BUNDLE", str(ca_file))
    files = [f for f in https_server.files() if f.name.startswith("checkpoint-10/")]

    started = time.monotonic()
    result = run_cli(
        *sync_args(https_server, dest, "--checkpoint", "checkpoint-10", "--limit-rate", "1MiB")
    )
    seconds = time.monotonic() - started

    assert result.code == 0, result.stderr
    total = sum(f.size for f in files)
    # aiohttp reads what its buffer holds, up to 256 KiB, before the limit is asked.
    assert seconds >= least_seconds(total, 1 << 20, connections=4, read=256 << 10)
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)


def test_ssl_cert_file_is_honoured(https_server: ServerThread, dest: Path, ca_file: Path) -> None:
    # A process of its own: the trust store is loaded once per process.
    process = run_subprocess(*sync_args(https_server, dest), env={"SSL_CERT_FILE": str(ca_file)})
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr.decode()
    for file in https_server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_ssl_cert_file_set_between_runs_in_one_process_is_honoured(
    https_server: ServerThread, dest: Path, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(*sync_args(https_server, dest)).code == 2  # untrusted, as it should be
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))

    result = run_cli(*sync_args(https_server, dest))

    assert result.code == 0, result.stderr


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_an_untrusted_certificate_is_a_configuration_error_not_retried(
    https_server: ServerThread, dest: Path, through_proxy: bool, request: pytest.FixtureRequest
) -> None:
    # Through a proxy, aiohttp meets the certificate (proxied.py), past the tunnel.
    proxy: TunnelProxy | None = request.getfixturevalue("https_proxy") if through_proxy else None

    result = run_cli(*sync_args(https_server, dest))

    assert result.code == 2
    assert result.stderr.count("\n") == 1
    assert f"TLS certificate of {https_server.url}/v1/" in result.stderr
    assert "is not trusted (set ca_bundle in the config, or SSL_CERT_FILE)" in result.stderr
    assert https_server.traffic.api_requests == 0
    assert not dest.exists() or not any(dest.glob(f"{JOB}/**/*"))
    assert proxy is None or proxy.tunnels


@pytest.fixture
def https_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[TunnelProxy]:
    """A tunnelling proxy named by HTTPS_PROXY: requests then go through aiohttp."""
    with TunnelProxy() as proxy, proxy_named(monkeypatch, "HTTPS_PROXY", proxy.url):
        yield proxy


def test_a_job_over_https_through_a_proxy_is_mirrored_byte_exact(
    https_server: ServerThread,
    https_proxy: TunnelProxy,
    dest: Path,
    ca_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_CA_BUNDLE", str(ca_file))

    result = run_cli(*sync_args(https_server, dest))

    assert result.code == 0, result.stderr
    # The API and the objects both went through it.
    assert set(https_proxy.tunnels) == {https_server.url.removeprefix("https://")}
    for file in https_server.files():
        assert_exact(mirrored(dest, JOB, file), file)


ON_BOTH_LOOPS = pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)


@contextmanager
def tls_serving(
    ca: trustme.CA, serve: Callable[[ssl.SSLSocket], None], *identities: str
) -> Iterator[tuple[int, list[str | None]]]:
    """An HTTPS server on 127.0.0.1, with a certificate for ``identities`` (127.0.0.1 if none),
    that hands its first connection to ``serve`` after the handshake; yields its port and the
    server names clients asked for (SNI)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(identities or ["127.0.0.1"])).configure_cert(context)
    asked: list[str | None] = []
    context.sni_callback = lambda _tls, name, _context: asked.append(name)
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                serve(tls)
        except OSError:
            pass  # the client went away, or refused the certificate

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], asked
    finally:
        listener.close()
        thread.join(5)


def url_on(port: int, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{port}/o?X-Amz-Signature=secret"


def read_request(tls: ssl.SSLSocket, received: bytearray | None = None) -> None:
    """Receive a request's head (into ``received``, if given)."""
    received = bytearray() if received is None else received
    while b"\r\n\r\n" not in received:
        received.extend(tls.recv(1 << 16))


def answer_ok(tls: ssl.SSLSocket) -> None:
    read_request(tls)
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def fetch(url: str, settings: NetSettings) -> bytes:
    async with HttpClient(settings) as http, http.request(url, {}) as response:
        return await response.read(100)


@pytest.mark.anyio
async def test_a_host_name_is_sent_as_sni_and_matched_against_the_certificate(
    ca: trustme.CA, ca_file: Path
) -> None:
    # "localhost" may resolve to ::1 first, where nothing listens: the next address is tried.
    with tls_serving(ca, answer_ok, "localhost") as (port, asked):
        got = await fetch(url_on(port, "localhost"), NetSettings(ca_bundle=ca_file))

    assert got == b"ok"
    assert asked == ["localhost"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("identity", "host"),
    [("example.org", "127.0.0.1"), ("127.0.0.2", "127.0.0.1"), ("*.localhost", "localhost")],
    ids=["name-for-address", "other-address", "wildcard-for-bare-name"],
)
async def test_a_certificate_for_another_host_is_not_trusted(
    ca: trustme.CA, ca_file: Path, identity: str, host: str
) -> None:
    with (
        tls_serving(ca, answer_ok, identity) as (port, _),
        pytest.raises(UsageError, match="is not trusted") as raised,
    ):
        await fetch(url_on(port, host), NetSettings(ca_bundle=ca_file))

    assert "secret" not in str(raised.value)


@pytest.mark.anyio
async def test_an_unusable_ca_bundle_fails_the_first_https_request_as_a_usage_error(
    unusable_ca_bundle: Path,
) -> None:
    bundle = unusable_ca_bundle
    listener = socket.create_server(("127.0.0.1", 0))  # never reached: trust is loaded first
    with listener, pytest.raises(UsageError, match=f"^ca_bundle {bundle} cannot be used \\("):
        await fetch(
            f"https://127.0.0.1:{listener.getsockname()[1]}/", NetSettings(ca_bundle=bundle)
        )


@pytest.mark.anyio
async def test_a_plain_http_answer_to_the_handshake_is_a_transient_error_said_plainly() -> None:
    # An https:// URL on a plain-HTTP port: OpenSSL's reason, not the repr of a tuple.
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(1 << 16)  # the ClientHello
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/o?X-Amz-Signature=secret"
    with listener, pytest.raises(TransientError) as raised:
        await fetch(url, NetSettings(connect_timeout=5))
    thread.join(5)

    assert str(raised.value).startswith("download: ")
    assert str(raised.value).endswith(
        " during the TLS handshake (" + url.split("?")[0] + "?<redacted>)"
    )
    assert "('" not in str(raised.value)


@pytest.mark.anyio
@ON_BOTH_LOOPS
async def test_a_body_that_arrives_faster_than_it_is_written_lets_the_loop_run(
    ca: trustme.CA, ca_file: Path
) -> None:
    # The sender keeps the socket full: a connection must not read it dry in one callback, or
    # the other connections, the stall watch and a cancellation wait for the whole body.
    size = 32 << 20

    def serve(tls: ssl.SSLSocket) -> None:
        read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(32):
            tls.sendall(bytes(1 << 20))

    def slow_disk(piece: memoryview) -> None:
        time.sleep(0.02)

    with tls_serving(ca, serve) as (port, _):
        async with HttpClient(NetSettings(ca_bundle=ca_file)) as http:
            started = time.monotonic()
            with anyio.move_on_after(0.1):
                async with http.request(url_on(port), {}) as response:
                    await response.stream_to(slow_disk)
            cancelled_after = time.monotonic() - started

    assert cancelled_after < 0.3  # not the 0.6 s of the whole body


@pytest.mark.anyio
async def test_a_connection_dropped_on_a_tls_error_leaves_no_error_for_the_next_call(
    ca: trustme.CA, ca_file: Path
) -> None:
    # OpenSSL's error queue is the thread's: what one connection leaves there is taken for the
    # failure of the next call on any other (SSL_get_error, and the reason shown).
    def serve(tls: ssl.SSLSocket) -> None:
        read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.2)  # the answer is held unread, reading paused
        tls.sendall(b"junk\r\n\r\n")  # not an answer: the connection is dropped for it...
        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + bytes(32))  # ...and a forged record
        time.sleep(0.5)

    lib = Binding().lib
    with tls_serving(ca, serve) as (port, _):
        async with HttpClient(NetSettings(ca_bundle=ca_file)) as http:
            async with http.request(url_on(port), {}) as response:
                await anyio.sleep(0.4)  # both arrive before reading resumes, at the release
                assert response.status == 200
            await anyio.sleep(0.1)

            assert lib.ERR_peek_error() == 0


@pytest.mark.anyio
async def test_a_request_larger_than_the_socket_takes_at_once_is_sent_whole(
    ca: trustme.CA, ca_file: Path
) -> None:
    # OpenSSL answers "want write" while the server is not reading: the rest goes when the
    # socket takes more.
    body = os.urandom(8 << 20)
    received = bytearray()

    def serve(tls: ssl.SSLSocket) -> None:
        time.sleep(0.3)  # the socket buffers fill up meanwhile
        read_request(tls, received)
        while len(received) - received.index(b"\r\n\r\n") - 4 < len(body):
            received.extend(tls.recv(1 << 20))
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with tls_serving(ca, serve) as (port, _):
        async with (
            HttpClient(NetSettings(ca_bundle=ca_file)) as http,
            http.request(url_on(port), {}, method="PUT", body=body) as response,
        ):
            assert await response.read(100) == b"ok"

    assert received.endswith(body)


class SmallBuffers(asyncio.BufferedProtocol):
    """Receives ``expected`` bytes into 1,000-byte buffers, far smaller than a TLS record,
    pausing after the first one until told to resume."""

    def __init__(self, expected: int) -> None:
        self.received = bytearray()
        self.complete = anyio.Event()
        self.transport: asyncio.Transport | None = None
        self._expected = expected
        self._buffer = bytearray(1000)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self._buffer[:nbytes]
        if len(self.received) == nbytes:
            assert self.transport is not None
            self.transport.pause_reading()
        if len(self.received) >= self._expected:
            self.complete.set()


@pytest.mark.anyio
@ON_BOTH_LOOPS
async def test_what_openssl_decrypted_but_the_buffer_could_not_take_is_delivered(
    ca: trustme.CA, ca_file: Path
) -> None:
    # Each record is read a buffer at a time; the socket is quiet once all of it has arrived,
    # so nothing but the transport itself can bring the rest of the last record.
    sent = os.urandom(20_000)  # two records

    def serve(tls: ssl.SSLSocket) -> None:
        tls.sendall(sent)
        time.sleep(1.5)  # then closes, which would wake the reader

    protocol = SmallBuffers(len(sent))
    with tls_serving(ca, serve) as (port, _):
        await tls.connect(protocol, "127.0.0.1", port, NetSettings(ca_bundle=ca_file))
        await anyio.sleep(0.2)  # all of it arrives while reading is paused
        assert protocol.transport is not None
        assert bytes(protocol.received) == sent[:1000]

        protocol.transport.resume_reading()
        with anyio.fail_after(1):
            await protocol.complete.wait()
        protocol.transport.close()

    assert bytes(protocol.received) == sent


def test_version_names_the_openssl_that_https_runs_on() -> None:
    # Which OpenSSL decrypts decides HTTPS throughput: the wheel's, not the system's `ssl`.
    result = run_cli("--version")

    assert result.code == 0, result.stderr
    assert result.stdout == f"checkpoint-sync {__version__} (HTTPS: {tls.openssl_version()})\n"
    assert tls.openssl_version().startswith("OpenSSL ")


class DiskFull(Exception):
    """What a sink raises when its write fails."""


def a_sink_fails_mid_body_then_the_garbage_is_collected(use_uvloop: bool) -> None:
    """Run by the test below in a process of its own."""
    size = 4 << 20

    def serve(tls: ssl.SSLSocket) -> None:
        read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        time.sleep(0.2)  # the client's young objects are collected meanwhile
        tls.sendall(bytes(size))

    def full_disk(piece: memoryview) -> None:
        raise DiskFull()

    async def fetch(url: str, ca_file: Path) -> None:
        async def collect_young() -> None:
            await anyio.sleep(0.1)
            gc.collect(0)  # the connection becomes older than what its failure leaves

        async with (
            HttpClient(NetSettings(ca_bundle=ca_file)) as http,
            anyio.create_task_group() as tasks,
        ):
            tasks.start_soon(collect_young)
            with pytest.raises(DiskFull):
                async with http.request(url, {}) as response:
                    await response.stream_to(full_disk)

    unraisable: list[object] = []
    sys.unraisablehook = unraisable.append
    gc.disable()  # collected only when said, in a known order
    ca = trustme.CA()
    with ca.cert_pem.tempfile() as ca_file, tls_serving(ca, serve) as (port, _):
        anyio.run(fetch, url_on(port), Path(ca_file), backend_options={"use_uvloop": use_uvloop})
    gc.collect()
    assert unraisable == []


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_sink_that_fails_mid_body_leaves_nothing_that_crashes_the_collector(
    use_uvloop: bool,
) -> None:
    # The sink's error is kept with its traceback, and the transport's frame with it, in a
    # cycle through the connection. Had that frame still held the protocol's buffer (exported
    # to OpenSSL to decrypt into), collecting the cycle could clear the buffer's memoryview
    # first: "memoryview has 1 exported buffer", then a segmentation fault.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.test_tls import a_sink_fails_mid_body_then_the_garbage_is_collected as"
            f" run; run({use_uvloop})",
        ],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr.decode()[-3000:]
