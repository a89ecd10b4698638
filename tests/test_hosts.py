"""Object hosts that answer in legal but unusual ways: the files still land byte-exact."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from checkpoint_sync.localserver import ServedFile, content

from .conftest import JOB, sync_args
from .support import ServerThread, assert_exact, http_serving, mirrored, run_cli


@contextmanager
def redirecting(locations: dict[str, str]) -> Iterator[str]:
    """A server answering ``GET path`` with ``307`` to ``locations[path]``; yields its origin."""

    class Redirect(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", locations[self.path.partition("?")[0]])
            self.send_header("Content-Length", "0")
            self.end_headers()

    with http_serving(Redirect) as origin:
        yield origin


def range_asked(request: BaseHTTPRequestHandler, asked: list[str]) -> tuple[int, int]:
    """The bytes ``request`` asks for (``Range: bytes=a-b``), from and to (exclusive), noted as
    asked ("a-b") in ``asked``."""
    ranged = request.headers["Range"].removeprefix("bytes=")
    asked.append(ranged)
    first, _, last = ranged.partition("-")
    return int(first), int(last) + 1


def presigned(server: ServerThread, file: ServedFile) -> str:
    """The built-in server's own URL for ``file``, whatever URL the listing gives for it."""
    return server.call(lambda: server.server.presign(file))


def test_redirected_object_urls_are_followed_and_named_without_their_query(
    server: ServerThread, dest: Path
) -> None:
    # S3 answers 307 to a regional endpoint while a new bucket's name settles, CDNs 302 to
    # their origin: each hop keeps the Range, and a loop ends in an error for its file alone.
    multipart, small, looping = server.files()[0], server.files()[1], server.files()[2]
    locations = {
        "/a": "/b?X-Amz-Signature=hop",  # relative, then absolute
        "/b": presigned(server, multipart),
        "/c": presigned(server, small),
        "/loop": "/loop?X-Amz-Signature=again",
    }
    with redirecting(locations) as origin:
        multipart.external_url = f"{origin}/a?X-Amz-Signature=first"
        small.external_url = f"{origin}/c?X-Amz-Signature=first"
        looping.external_url = f"{origin}/loop?X-Amz-Signature=first"

        result = run_cli(*sync_args(server, dest))

    assert result.code == 1
    assert_exact(mirrored(dest, JOB, multipart), multipart)
    assert_exact(mirrored(dest, JOB, small), small)
    assert not mirrored(dest, JOB, looping).exists()
    assert f"more than 5 redirects, the last to {origin}/loop?<redacted>" in result.stderr
    assert "hop" not in result.stderr
    assert "again" not in result.stderr
    # Every byte was asked for once, by range (each rank has a file of that name).
    copies = sum(f.name == multipart.name for f in server.files())
    ranges = [r for r in server.traffic.ranges if r[0] == multipart.name]
    assert sum(end - start for _, start, end in ranges) == copies * multipart.size


@pytest.mark.parametrize(
    ("location", "error"),
    [
        ("http://[::1/x?X-Amz-Signature=bad", "http://[::1/x?<redacted>, which is not a valid URL"),
        (
            "ftp://127.0.0.1/x?X-Amz-Signature=bad",
            "ftp://127.0.0.1/x?<redacted>, which is not an http(s) URL",
        ),
        (
            "http://127.0.0.1/a b?X-Amz-Signature=bad",
            "http://127.0.0.1/a b?<redacted>, which is not a valid URL"
            " (spaces, control or non-ASCII characters)",
        ),
    ],
    ids=["unparsed", "not-http", "space"],
)
def test_a_redirect_to_a_location_that_cannot_be_fetched_fails_its_file_alone(
    server: ServerThread, dest: Path, location: str, error: str
) -> None:
    victim, *others = server.files()
    with redirecting({"/a": location}) as origin:
        victim.external_url = f"{origin}/a?X-Amz-Signature=first"

        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["error"] == f"redirected to {error}"
    for file in others:
        assert_exact(mirrored(dest, JOB, file), file)


def chunked(body: bytes) -> bytes:
    """``body`` framed as one chunk and the last one."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_object_stored_compressed_lands_when_fetched_in_parts(
    server: ServerThread, dest: Path, framing: str
) -> None:
    # Its Content-Encoding comes with each ranged answer, whose length is the range's (told by
    # its head, or by the bytes its chunks bring): the check against coding on the way must
    # not take those for it.
    large = max(server.files(), key=lambda file: file.size)
    assert large.size > 256 << 10  # in parts of 256 KiB
    ranges: list[str] = []

    class StoredGzip(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            start, end = range_asked(self, ranges)
            body = content(large.seed, start, end - start)
            self.send_response(206)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{large.size}")
            if framing == "length":
                self.send_header("Content-Length", str(end - start))
            else:
                self.send_header("Transfer-Encoding", "chunked")
                body = chunked(body)
            self.end_headers()
            self.wfile.write(body)

    with http_serving(StoredGzip) as origin:
        large.external_url = f"{origin}/stored?X-Amz-Signature=s"

        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert len(ranges) > 1
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_an_object_stored_compressed_lands_however_its_answer_is_framed(
    server: ServerThread, dest: Path
) -> None:
    # S3 serves an object uploaded gzip-coded with that coding, at its stored length. A
    # Content-Length said twice (a proxy adding its copy) is one length. An answer in chunks,
    # or ended by the close, cannot show its length before its body: it is judged by the bytes
    # it brings, which are the object as stored. It was refused as compressed.
    whole_chunked, repeated, closed, told, *others = server.files()
    assert whole_chunked.size > 1 << 20  # more than a receive buffer: handed over in pieces
    served = {"/chunked": whole_chunked, "/repeated": repeated, "/closed": closed, "/told": told}

    class StoredGzip(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            file = served[self.path.partition("?")[0]]
            body = content(file.seed, 0, file.size)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            if file is told:
                self.send_header("Content-Length", str(file.size))
            elif file is repeated:
                self.send_header("Content-Length", f"{file.size}, {file.size}")
            elif file is closed:
                self.send_header("Connection", "close")  # the body ends with the connection
            else:
                self.send_header("Transfer-Encoding", "chunked")
                body = chunked(body)
            self.end_headers()
            self.wfile.write(body)

    with http_serving(StoredGzip) as origin:
        for path, file in served.items():
            file.external_url = f"{origin}{path}?X-Amz-Signature=s"

        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["retries"] == 0
    for file in [*served.values(), *others]:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("packed", ["smaller", "larger"])
def test_an_object_compressed_on_the_way_fails_alone_at_once(
    server: ServerThread, dest: Path, framing: str, packed: str
) -> None:
    # Gzip-coded on the fly despite "Accept-Encoding: identity", as a whole (200) or by range
    # (206): the gzip stream is not the object's bytes. A head that tells a length tells it
    # (refused before the body); in chunks or up to the close, the body does, by not coming to
    # the length asked for (longer, for bytes that do not compress; shorter, for bytes that
    # do). Not retried: the next answer would come compressed again; and nothing of it is
    # published.
    large, small, *others = server.files()
    assert large.size > 256 << 10 > small.size  # in parts, and in one
    asked: dict[str, list[str]] = {"/large": [], "/small": []}

    class Compressing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            file = large if path == "/large" else small
            start, end = range_asked(self, asked[path])
            stored = content(file.seed, start, end - start)
            body = gzip.compress(stored if packed == "larger" else bytes(len(stored)))
            assert (len(body) > len(stored)) == (packed == "larger")
            if file is large:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{large.size}")
            else:
                self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            if framing == "length":
                self.send_header("Content-Length", str(len(body)))
            elif framing == "close":
                self.send_header("Connection", "close")
            else:
                self.send_header("Transfer-Encoding", "chunked")
                body = chunked(body)
            self.end_headers()
            self.wfile.write(body)

    with http_serving(Compressing) as origin:
        large.external_url = f"{origin}/large?X-Amz-Signature=s"
        small.external_url = f"{origin}/small?X-Amz-Signature=s"

        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(failure["error"] for failure in summary["failures"]) == [
        f"{origin}{path}?<redacted> sent the object compressed (Content-Encoding: gzip), "
        "not as stored"
        for path in ("/large", "/small")
    ]
    assert summary["retries"] == 0
    assert len(asked["/small"]) == 1
    assert len(asked["/large"]) <= -(-large.size // (256 << 10))  # each part asked once at most
    assert not mirrored(dest, JOB, large).exists()
    assert not mirrored(dest, JOB, small).exists()
    for file in others:
        assert_exact(mirrored(dest, JOB, file), file)


def test_an_object_whose_length_is_not_the_listed_one_fails_at_once(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 200's Content-Length is the object's length now (RFC 9110 §8.6): another version than
    # the one listed, which no retry brings back. Longer, from a server that holds the
    # connection open once the listed bytes are sent, the rest was waited for until
    # read_timeout, on every retry; shorter, the body was retried as one cut short.
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "30")
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    longer, shorter = server.files()[0], server.files()[1]  # the first in parts, from byte 0
    said = {longer.name: longer.size + 1000, shorter.name: shorter.size - 1000}
    asked: list[str] = []
    hold = threading.Event()

    class Misstating(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            file = longer if self.path.startswith("/longer") else shorter
            asked.append(file.name)
            self.send_response(200)
            self.send_header("Content-Length", str(said[file.name]))
            self.end_headers()
            self.wfile.write(content(file.seed, 0, min(file.size, said[file.name])))
            self.wfile.flush()
            hold.wait(60)  # the connection stays open, and nothing more comes

    try:
        with http_serving(Misstating) as origin:
            longer.external_url = f"{origin}/longer?X-Amz-Signature=s"
            shorter.external_url = f"{origin}/shorter?X-Amz-Signature=s"
            started = time.monotonic()

            result = run_cli(*sync_args(server, dest, "--json"))

            took = time.monotonic() - started
    finally:
        hold.set()

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert sorted(failure["error"] for failure in summary["failures"]) == sorted(
        f"the server says the object has {said[file.name]} bytes; the listing says {file.size}"
        for file in (longer, shorter)
    )
    assert summary["retries"] == 0
    assert sorted(asked) == sorted([longer.name, shorter.name])  # each asked for once
    assert took < 10  # not read_timeout (30 s) for the bytes that never come
    assert not mirrored(dest, JOB, longer).exists()
    assert not mirrored(dest, JOB, shorter).exists()
    for file in server.files()[2:]:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("off_by", [-1000, 1000])
def test_a_range_answer_whose_length_is_not_its_content_ranges_fails_at_once(
    server: ServerThread, dest: Path, off_by: int
) -> None:
    # Which of the two is wrong cannot be told: neither is written, and the same request
    # would be answered the same way.
    large = server.files()[0]
    assert large.size > 256 << 10  # in parts of 256 KiB
    asked: list[str] = []

    class Misstating(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            start, end = range_asked(self, asked)
            body = content(large.seed, start, end - start) + b"\0" * max(0, off_by)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{large.size}")
            self.send_header("Content-Length", str(end - start + off_by))
            self.end_headers()
            self.wfile.write(body[: end - start + off_by])

    with http_serving(Misstating) as origin:
        large.external_url = f"{origin}/large?X-Amz-Signature=s"

        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    (failure,) = summary["failures"]
    part = 256 << 10
    assert failure["error"] == (
        f"a body of {part + off_by} bytes does not match its Content-Range "
        f"'bytes 0-{part - 1}/{large.size}' ({part} bytes)"
    )
    assert summary["retries"] == 0
    assert asked == [f"0-{part - 1}"]  # the first part's answer, and nothing after it
    for staged in (dest / ".checkpoint-sync" / "staging").iterdir():
        assert not staged.read_bytes().strip(b"\0")  # never written
    for file in server.files()[1:]:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    ("whole", "then"), [(False, "retried"), (False, "next run"), (True, "retried")]
)
def test_a_compressed_answer_cut_short_is_asked_for_again_from_its_start(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, whole: bool, then: str
) -> None:
    # A file's answer gzip-coded on the way, in chunks, that breaks off: the bytes written are
    # the gzip stream's, not the object's, and Baseten lists no checksum that would catch them.
    # Neither the retry nor the next run (from how far the part got) may take them: a part goes
    # on from its start, a file in one part (hashed as it comes) from its first byte.
    part = 256 << 10
    large, small = (
        max(server.files(), key=lambda f: f.size),
        min(server.files(), key=lambda f: f.size),
    )
    assert large.size > 2 * part > part > small.size
    target = small if whole else large
    cut = (0, small.size) if whole else (part, 2 * part)
    asked: list[str] = []

    class CompressingOnce(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            start, end = range_asked(self, asked)
            stored = content(target.seed, start, end - start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{target.size}")
            if (start, end) == cut and asked.count(f"{start}-{end - 1}") == 1:
                gzipped = gzip.compress(stored)[: len(stored) // 2]
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(gzipped), gzipped))
                self.close_connection = True  # without the last chunk
                return
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            self.wfile.write(stored)

    with http_serving(CompressingOnce) as origin:
        target.external_url = f"{origin}/target?X-Amz-Signature=s"
        if then == "next run":
            monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
            assert run_cli(*sync_args(server, dest)).code == 1
            monkeypatch.delenv("CHECKPOINT_SYNC_RETRIES")

        result = run_cli(*sync_args(server, dest))
        # The digest recorded is of the object's bytes, not of the gzip stream's as well.
        verified = run_cli(*sync_args(server, dest, "--verify", "--json"))

    assert result.code == 0, result.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    assert asked.count(f"{cut[0]}-{cut[1] - 1}") == 2  # asked for again from its start
    assert verified.code == 0, verified.stderr
    assert json.loads(verified.stdout)["files"]["damaged"] == 0
