"""TLS for `wire.py`'s connections, on the OpenSSL that ``cryptography`` bundles.

Python's ``ssl`` uses the system's OpenSSL, which can be years older than the one in the
``cryptography`` wheel. On a CPU with VAES and AVX-512, OpenSSL 3.0 decrypts AES-GCM at about
5 GB/s and the bundled one at over 11 GB/s, and decryption is most of an HTTPS download's CPU.
OpenSSL reads the socket itself here (a socket BIO): no copy through a memory BIO either.

`connect` opens a verified TLS connection and hands it to an ``asyncio.BufferedProtocol`` as
its transport, just as ``loop.create_connection(ssl=...)`` would: certificates are checked
against the same trust store (``ca_bundle``, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``, or the
system's) and the host name, over TLS 1.2 or later. Failures raise what ``ssl`` would
(`ssl.SSLCertVerificationError`, `ssl.SSLError`, `ConnectionResetError`), so that
`net.connection_error` converts them as before.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding

from .net import NetSettings, trust_error

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi

_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_CLOSED = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL = _lib.SSL_ERROR_SYSCALL


async def connect(
    protocol: asyncio.BufferedProtocol, host: str, port: int, settings: NetSettings
) -> None:
    """Connect to ``host``, verify its certificate and give ``protocol`` the connection."""
    context = _context(
        settings.ca_bundle, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    )
    loop = asyncio.get_running_loop()
    sock = await _open_socket(loop, host, port)
    try:
        connection = _new_connection(context, sock, host)
        await _handshake(loop, sock, connection)
    except BaseException:
        sock.close()
        raise
    _Transport(loop, sock, connection, protocol)


def openssl_version() -> str:
    """The OpenSSL in use here, e.g. "OpenSSL 3.5.4 30 Sep 2025"."""
    return str(_ffi.string(_lib.OpenSSL_version(_lib.OPENSSL_VERSION)).decode())


@functools.cache
def _context(ca_bundle: Path | None, cert_file: str | None, cert_dir: str | None) -> Any:
    # One per place certificates come from, as `net.ssl_context`: loading a trust store takes
    # tens of milliseconds. The variables are read by `ssl.get_default_verify_paths`: the
    # bundled OpenSSL's own defaults point into the machine that built the wheel.
    context = _ffi.gc(_lib.SSL_CTX_new(_lib.TLS_client_method()), _lib.SSL_CTX_free)
    _lib.SSL_CTX_set_min_proto_version(context, _lib.TLS1_2_VERSION)
    # A peer that closes without close_notify ends the stream, as under `ssl` and asyncio; a
    # body cut short is caught by its length.
    _lib.SSL_CTX_set_options(
        context, _lib.SSL_OP_NO_COMPRESSION | _lib.SSL_OP_IGNORE_UNEXPECTED_EOF
    )
    _lib.SSL_CTX_set_mode(context, _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    _lib.SSL_CTX_set_verify(context, _lib.SSL_VERIFY_PEER, _ffi.NULL)
    if ca_bundle is not None:
        cafile, capath = str(ca_bundle), None
    else:
        defaults = ssl.get_default_verify_paths()
        cafile, capath = defaults.cafile, defaults.capath
    if cafile is not None or capath is not None:
        loaded = _lib.SSL_CTX_load_verify_locations(
            context,
            _ffi.NULL if cafile is None else os.fsencode(cafile),
            _ffi.NULL if capath is None else os.fsencode(capath),
        )
        if loaded != 1:
            reason = _take_errors() or "no certificate in it"
            raise trust_error(str(ca_bundle) if ca_bundle is not None else None, reason)
    return context


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to the first address of ``host`` that accepts."""
    error: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error if error is not None else OSError(f"no address for {host}")


def _new_connection(context: Any, sock: socket.socket, host: str) -> Any:
    connection = _ffi.gc(_lib.SSL_new(context), _lib.SSL_free)
    _lib.SSL_set_fd(connection, sock.fileno())
    param = _lib.SSL_get0_param(connection)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")  # `net.url_problem` let only ASCII URLs through
        _lib.SSL_set_tlsext_host_name(connection, name)
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, address.packed, len(address.packed))
    if ok != 1:
        raise ssl.SSLError(ssl.SSL_ERROR_SSL, f"cannot check the certificate against {host}")
    _lib.SSL_set_connect_state(connection)
    return connection


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, connection: Any) -> None:
    while True:
        result = _lib.SSL_do_handshake(connection)
        if result == 1:
            return
        code = _lib.SSL_get_error(connection, result)
        if code == _WANT_READ:
            await _ready(loop.add_reader, loop.remove_reader, sock.fileno())
        elif code == _WANT_WRITE:
            await _ready(loop.add_writer, loop.remove_writer, sock.fileno())
        else:
            verified = _lib.SSL_get_verify_result(connection)
            if verified != _lib.X509_V_OK:
                _take_errors()
                reason = _ffi.string(_lib.X509_verify_cert_error_string(verified)).decode()
                raise ssl.SSLCertVerificationError(1, f"certificate verify failed: {reason}")
            raise _error(code, "during the TLS handshake") or ConnectionResetError(
                "connection closed during the TLS handshake"
            )


async def _ready(watch: Callable[..., object], unwatch: Callable[[int], object], fd: int) -> None:
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    watch(fd, wake)
    try:
        await waiter
    finally:
        unwatch(fd)


def _take_errors() -> str:
    """Empty OpenSSL's error queue (which must be empty before each call), returning the reason
    of its first error."""
    first = ""
    while code := _lib.ERR_get_error():
        if not first:
            reason = _lib.ERR_reason_error_string(code)
            first = _ffi.string(reason).decode() if reason != _ffi.NULL else f"error {code}"
    return first


def _error(code: int, when: str) -> OSError | None:
    """The exception for a failed call's ``SSL_get_error`` code; None for the peer's end of
    the stream (close_notify, or only closing)."""
    errno = _ffi.errno  # before any other call replaces it
    reason = _take_errors()
    if code == _CLOSED:
        return None
    if code == _SYSCALL:
        if not reason and not errno:
            return None
        if errno:
            return OSError(errno, f"{os.strerror(errno)} {when}")
    # With its code, as `ssl` raises it: with the message alone, str() is the repr of a tuple
    # and `strerror` None, which is what `net.connection_error` shows.
    return ssl.SSLError(ssl.SSL_ERROR_SSL, f"{reason or f'TLS error {code}'} {when}")


class _Transport(asyncio.Transport):
    """The decrypted stream, as ``asyncio`` hands a ``BufferedProtocol`` a TLS connection:
    records are decrypted straight into the buffer the protocol offers, and reading pauses
    when it asks."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        connection: Any,
        protocol: asyncio.BufferedProtocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._connection = connection
        self._protocol = protocol
        self._unsent: list[bytes] = []
        self._write_waits = False  # _write_ready waits for the socket to take more
        self._paused = False
        # Pausing leaves the reader in place, and only a wake-up while paused removes it: a
        # small body is held paused until its transfer takes it, once per file, and watching
        # and unwatching the socket each time cost two system calls.
        self._watched = True
        self._closing = False
        self._again = False  # _read_again is scheduled
        protocol.connection_made(self)
        loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        """Decrypt into one buffer of the protocol's: a sender that keeps the socket full must
        not keep the loop (the other connections, timeouts, cancellation) waiting."""
        if self._closing:
            return
        if self._paused:
            self._watched = False
            self._loop.remove_reader(self._fd)
            return
        connection, protocol = self._connection, self._protocol
        view = memoryview(protocol.get_buffer(-1))
        room = len(view)
        filled = code = 0
        # Given back before the protocol runs: an error it keeps (the sink's) keeps this frame
        # in a cycle, and collecting that with the buffer still exported crashes the process.
        with _ffi.from_buffer(view, require_writable=True) as pointer:
            while filled < room:
                got = _lib.SSL_read(connection, pointer + filled, room - filled)
                if got <= 0:
                    code = _lib.SSL_get_error(connection, got)
                    break
                filled += got
        # Taken now, emptying the error queue: the protocol may close the transport.
        error = _error(code, "while reading") if code and code != _WANT_READ else None
        if filled:
            protocol.buffer_updated(filled)  # which may pause reading, or close
        if code == _WANT_READ or self._closing:
            return
        if code:
            self._lost(error)
            return
        if not self._paused:
            self._read_pending()

    def _read_pending(self) -> None:
        """The socket wakes us for its next bytes, but not for the rest of a record OpenSSL
        decrypted in part (once: the reader may run meanwhile)."""
        if _lib.SSL_pending(self._connection) and not self._again:
            self._again = True
            self._loop.call_soon(self._read_again)

    def _read_again(self) -> None:
        self._again = False
        self._read_ready()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._unsent.append(bytes(data))
        if len(self._unsent) == 1:
            self._write_ready()

    def _write_ready(self) -> None:
        while self._unsent and not self._closing:
            data = self._unsent[0]
            sent = _lib.SSL_write(self._connection, data, len(data))
            if sent > 0:  # all of it: partial writes are not enabled
                self._unsent.pop(0)
                continue
            code = _lib.SSL_get_error(self._connection, sent)
            if code in (_WANT_WRITE, _WANT_READ):  # the socket is full: try again when it is not
                if not self._write_waits:
                    self._write_waits = True
                    self._loop.add_writer(self._fd, self._write_ready)
                return
            self._lost(_error(code, "while writing") or BrokenPipeError("connection closed"))
            return
        if self._write_waits and not self._closing:  # a closed descriptor's number may be reused
            self._write_waits = False
            self._loop.remove_writer(self._fd)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused and not self._closing:
            self._paused = False
            if not self._watched:
                self._watched = True
                self._loop.add_reader(self._fd, self._read_ready)
            self._read_pending()

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send close_notify (without waiting for the peer's) and close."""
        if not self._closing:
            _lib.SSL_shutdown(self._connection)
            _take_errors()
            self._lost(None)

    def abort(self) -> None:
        if not self._closing:
            self._lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default

    def _lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
