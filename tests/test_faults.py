"""Transient faults on the object URLs: the mirror still ends byte-exact, refetching little."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from checkpoint_sync.errors import FileError, IntegrityError
from checkpoint_sync.localserver import Faults, ServedFile, content
from checkpoint_sync.transfer import content_range_end, range_not_satisfiable, refused_answer

from .conftest import JOB, job_catalog, job_with_a_file_pushed_off_its_page, sync_args
from .support import (
    PUSHED_OFF_REQUESTS,
    ServerThread,
    assert_exact,
    first_answers,
    leave_in_parts,
    mirrored,
    new_version,
    run_cli,
    staged,
    trusted_tls,
)

PART = 256 << 10
# The faults that break a body half way; the others are answered before any byte.
MID_BODY = ("reset", "short", "stall")


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServerThread]:
    # 2 checkpoints x 2 ranks, each with two 5-part files and 20 small ones: 120 requests.
    catalog = job_catalog(checkpoints=2, large_files=2, small_files=20)
    context = None
    if getattr(request, "param", "http") == "https":  # with a CA the client is told to trust
        context = trusted_tls(tmp_path, monkeypatch, "CHECKPOINT_SYNC_CA_BUNDLE")
    with ServerThread(catalog, tls=context) as running:
        yield running


def assert_mirrored(server: ServerThread, dest: Path) -> None:
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())


@pytest.mark.parametrize("server", ["http", "https"], indirect=True)
def test_ten_percent_of_requests_failing_every_way_still_ends_byte_exact(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "0.5")
    server.faults.fail_rate = 0.1
    server.faults.stall_seconds = 5  # past the read timeout: the client must give up on it

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert_mirrored(server, dest)
    injected = server.traffic.faults
    assert set(injected) == set(Faults().fail_kinds), injected  # every kind was tried
    assert json.loads(result.stdout)["retries"] == sum(injected.values())
    # Only the broken parts are asked for again: a body cut half way costs at most its part.
    broken = sum(injected.get(kind, 0) for kind in MID_BODY)
    refetched = server.traffic.object_bytes_sent - server.data_size()
    assert 0 < refetched <= broken * PART


def test_a_part_whose_connection_keeps_dropping_completes_while_each_drop_brings_bytes(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One 16 MiB part dropped more often in a row than retries allow, each time halfway through
    # what was asked for: megabytes land before every drop.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    catalog = job_catalog(checkpoints=1, large_size=16 << 20, small_files=0)
    with ServerThread(catalog) as server:
        target = next(f for f in server.files() if f.node_rank == 0)
        dropped: list[int] = []

        def drop_three_times(name: str, start: int, end: int) -> str | None:
            if name == target.name and len(dropped) < 3:
                dropped.append(start)
                return "reset"
            return None

        server.faults.hook = drop_three_times
        args = ("--part-size", "16MiB", "--node-rank", "0", "--json")
        result = run_cli(*sync_args(server, dest, *args))

        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["retries"] == 3
        # Each attempt resumed about where the last broke (halfway: 8 MiB, then 12 MiB; a
        # reset may discard what the socket had not yet handed over).
        assert dropped[0] == 0 < dropped[1] <= 8 << 20 < dropped[2] <= 12 << 20
        assert_exact(mirrored(dest, JOB, target), target)


@pytest.mark.parametrize(
    ("attempts", "retried", "said"),
    [("1", 0, "gave up without retrying: "), ("3", 2, "gave up after retrying: ")],
)
def test_a_file_given_up_on_counts_only_the_requests_asked_again(
    server: ServerThread,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    attempts: str,
    retried: int,
    said: str,
) -> None:
    # Its last failure was not asked again: with retries switched off, no request was retried,
    # and its error does not say it was.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", attempts)
    target = next(f for f in server.files() if f.size <= PART and f.node_rank == 0)
    server.faults.hook = lambda name, start, end: "503" if name == target.name else None

    result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--json"))

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["failed"] == 1
    assert summary["retries"] == retried
    [failure] = summary["failures"]
    assert failure["error"].startswith(said), failure["error"]


def test_a_server_that_sends_a_few_bytes_before_every_drop_runs_out_of_retries(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Progress too small to count (under a MiB each time) does not start the count afresh.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "3")
    target = next(f for f in server.files() if f.size > PART)
    server.faults.hook = lambda name, start, end: "reset" if name == target.name else None

    result = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-10", "--json"))

    assert result.code == 1
    summary = json.loads(result.stdout)
    assert {f["path"].rpartition("/")[2] for f in summary["failures"]} == {
        target.name.rpartition("/")[2]
    }
    assert all("gave up after retrying" in f["error"] for f in summary["failures"])
    # At most 3 attempts for each part of both ranks' copies (each drop halves what is left:
    # counted byte by byte, a part would take some 18 before nothing more came).
    parts = -(-target.size // PART)
    assert summary["retries"] <= 3 * parts * 2


def test_retry_after_of_a_429_is_honoured(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRY_MAX_DELAY", "5")
    target = server.files()[0]
    answered: list[int] = []

    def once(name: str, start: int, end: int) -> str | None:
        if name == target.name and start == PART and not answered:
            answered.append(start)
            return "429"
        return None

    server.faults.hook = once
    server.faults.retry_after = "1"
    started = time.monotonic()

    result = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-10"))

    assert result.code == 0, result.stderr
    assert time.monotonic() - started >= 1.0
    assert answered == [PART]
    assert_exact(mirrored(dest, JOB, target), target)


def test_a_body_that_came_whole_before_its_framing_broke_is_not_asked_for_again(
    server: ServerThread, dest: Path
) -> None:
    answered: set[tuple[str, int]] = set()

    def first_answer_unterminated(name: str, start: int, end: int) -> str | None:
        first = (name, start) not in answered
        answered.add((name, start))
        return "unterminated" if first else None

    server.faults.hook = first_answer_unterminated

    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    assert_mirrored(server, dest)
    assert server.traffic.faults == {"unterminated": len(answered)}
    # Nothing was asked for twice, not even an empty range past the end (answered 416).
    assert server.traffic.object_bytes_sent == server.data_size()
    assert server.traffic.object_requests == len(server.traffic.ranges)


def test_a_server_ignoring_range_is_read_as_one_stream(server: ServerThread, dest: Path) -> None:
    server.faults.ignore_range = True

    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    assert_mirrored(server, dest)
    # The whole body that answered the first ranged request is the file: nothing is asked twice.
    assert server.traffic.object_requests == len(server.files())
    assert server.traffic.object_bytes_sent == server.data_size()


def test_a_file_resumed_from_a_server_now_ignoring_range_is_fetched_whole(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left in parts, then resumed through a host that answers its first missing part with the
    # whole object (a CDN put in front, say): the parts go, and the file comes as one stream.
    leave_in_parts(server, monkeypatch, sync_args(server, dest), from_byte=2 * PART)
    resumed = [f for f in server.files() if f.size > 2 * PART]
    server.faults.ignore_range = True
    server.traffic.ranges.clear()

    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    assert_mirrored(server, dest)  # and no parts left
    # Asked for from its first missing part (answered whole, and dropped), then whole.
    assert {name for name, _, _ in server.traffic.ranges} == {f.name for f in resumed}
    assert "parts an earlier run left" not in result.stdout  # they were written over, not kept


def test_a_resumed_file_answered_whole_sends_no_other_part_before_it_is_fetched_whole(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its first missing part is answered whole, late: by then a small file fetched meanwhile
    # left its connection idle, on which another part would go out at once if the rest started
    # before that answer was judged. Two requests in all: the one answered whole, whose body is
    # not taken (only an answer to a request from byte 0 is), then the file as one stream.
    catalog = job_catalog(checkpoints=1, large_size=6 * PART, small_files=1)
    with ServerThread(catalog) as server:
        args = sync_args(server, dest, "--node-rank", "0")
        leave_in_parts(server, monkeypatch, args, from_byte=2 * PART)
        large, small = sorted(
            (f for f in server.files() if f.node_rank == 0), key=lambda f: -f.size
        )
        server.call(lambda: new_version(small))  # fetched again beside it
        server.faults.ignore_range = True
        server.faults.stall_seconds = 0.3
        server.faults.hook = lambda name, start, end: (
            "late" if name == large.name and not server.traffic.faults else None
        )
        server.traffic.faults.clear()
        server.traffic.ranges.clear()

        result = run_cli(*args)

        assert result.code == 0, result.stderr
        assert_exact(mirrored(dest, JOB, large), large)
        assert server.traffic.faults == {"late": 1}
        assert [r for r in server.traffic.ranges if r[0] == large.name] == [
            (large.name, 0, large.size)
        ] * 2


def every_file_fails(server: ServerThread, dest: Path, reason: str, *extra: str) -> Any:
    """A run fails every file for ``reason``, and publishes none; its JSON summary."""
    result = run_cli(*sync_args(server, dest, "--json", *extra))

    assert result.code == 1
    summary = json.loads(result.stdout)
    failures = summary["failures"]
    assert len(failures) == len(server.files())
    assert all(reason in f["error"] for f in failures)
    assert not (dest / JOB).exists() or not any(p.is_file() for p in (dest / JOB).rglob("*"))
    return summary


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("shift_content_range", "does not match the requested bytes"),
        ("misstate_total", "the server says the object has "),
    ],
)
def test_a_mismatched_content_range_fails_the_file_and_writes_nothing(
    server: ServerThread, dest: Path, fault: str, reason: str
) -> None:
    # Shifted, the bytes are not the ones asked for; with another total, not of the listed
    # object (Baseten lists no checksum to tell two versions apart).
    server.call(lambda: setattr(server.faults, fault, 1))

    every_file_fails(server, dest, reason)
    for staging in (dest / ".checkpoint-sync" / "staging").iterdir():
        assert staging.read_bytes().count(0) == staging.stat().st_size  # never written

    server.call(lambda: setattr(server.faults, fault, 0))
    again = run_cli(*sync_args(server, dest))

    assert again.code == 0, again.stderr
    assert_mirrored(server, dest)  # no shifted part was taken as done


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        # Its Content-Length counts the bytes past the range: refused as soon as the head came.
        (None, "a body of "),
        ("chunked", "server sent more than the range it answered with"),  # found while read
    ],
)
def test_a_body_longer_than_its_range_fails_the_file(
    server: ServerThread, dest: Path, fault: str | None, reason: str
) -> None:
    server.faults.overlong_body = 100  # after the range, with a Content-Range that matches it
    server.faults.hook = lambda name, start, end: fault

    summary = every_file_fails(server, dest, reason)

    assert summary["retries"] == 0


# Asked for bytes 100-199 of a 1000-byte object: where the answer's bytes end, or why not.
@pytest.mark.parametrize(
    ("header", "outcome"),
    [
        ("bytes 100-199/1000", 200),  # whole
        ("bytes 100-199/*", 200),  # size unknown to the server: taken as listed
        ("bytes 100-149/1000", 150),  # short, as RFC 9110 allows
        ("bytes 100-100/1000", 101),  # one byte is progress
        ("bytes 100-149/*", 150),
        ("bytes 99-149/1000", "does not match the requested bytes 100-199/1000"),
        ("bytes 0-99/1000", "does not match"),  # the same bytes again: no progress
        ("bytes 101-199/1000", "does not match"),  # a gap
        ("bytes 100-200/1000", "does not match"),  # past the range asked for
        # Another version of the object, whatever the range: its size is said.
        ("bytes 100-149/999", "the server says the object has 999 bytes; the listing says 1000"),
        ("bytes 100-199/1001", "the server says the object has 1001 bytes; the listing says"),
        ("bytes 0-99/150", "the server says the object has 150 bytes; the listing says 1000"),
        # A length the range does not fit in is invalid: no size to believe.
        ("bytes 100-149/149", "does not match the requested bytes 100-199/1000"),
        ("bytes 100-149/0", "does not match"),
        ("bytes 100-99/1000", "without a valid Content-Range"),  # empty
        ("bytes */1000", "without a valid Content-Range"),
        ("bytes 100-149", "without a valid Content-Range"),
        (None, "without a valid Content-Range"),
    ],
)
def test_a_content_range_is_taken_whole_or_short_or_refused(
    header: str | None, outcome: int | str
) -> None:
    if isinstance(outcome, int):
        assert content_range_end(header, 100, 200, 1000) == outcome
    else:
        with pytest.raises(IntegrityError, match=outcome):
            content_range_end(header, 100, 200, 1000)


# A 416 to a request for bytes of an object listed with 1000: what its Content-Range tells.
@pytest.mark.parametrize(
    ("header", "said"),
    [
        ("bytes */600", "the server says the object has 600 bytes; the listing says 1000"),
        ("bytes */1001", "the server says the object has 1001 bytes; the listing says 1000"),
        (None, "the object is smaller than listed"),
        # A server gone wrong tells no size: not "has 1000 bytes; the listing says 1000".
        ("bytes */1000", "the object is smaller than listed"),
        ("bytes */600, bytes */700", "the object is smaller than listed"),
        ("bytes */", "the object is smaller than listed"),
        ("bytes 0-99/600", "the object is smaller than listed"),
    ],
)
def test_a_416_says_the_objects_size_only_when_it_gives_another(
    header: str | None, said: str
) -> None:
    assert range_not_satisfiable(header, 1000) == said


COMPRESSED = "http://h/o?<redacted> sent the object compressed (Content-Encoding: gzip), not as"


# An object listed with 1000 bytes, asked for whole (200) or for bytes 100-199 (206): whether the
# length and the coding an answer's head gives are refused at once, and why.
@pytest.mark.parametrize(
    ("status", "coding", "length", "expected", "outcome"),
    [
        (200, "gzip", 1000, 1000, None),  # stored compressed: served at its length
        (206, "GZIP", 100, 100, None),
        (200, "identity", 1000, 1000, None),
        (200, "gzip", 400, 1000, COMPRESSED),  # not "the server says the object has 400 bytes"
        # A header's value is quoted in a one-line message by its start only.
        (200, "x" * 21, 400, 1000, f"compressed (Content-Encoding: {'x' * 20}), not as stored"),
        # Chunked: its length cannot be told first, the bytes it brings are (`_PartWriter`).
        (200, "gzip", None, 1000, None),
        (206, "gzip", None, 100, None),
        (206, "gzip", 40, 100, COMPRESSED),
        (200, None, 1000, 1000, None),
        (200, None, None, 1000, None),  # chunked, or until the close: counted as it is read
        (200, None, 1001, 1000, "the server says the object has 1001 bytes; the listing says 1000"),
        (200, None, 999, 1000, "the server says the object has 999 bytes; the listing says 1000"),
        (200, None, 0, 1000, "has 0 bytes"),
        (200, "Identity", 999, 1000, "has 999 bytes"),  # in any case: sent as is
        (206, None, 100, 100, None),
        (206, None, None, 100, None),
        (206, None, 101, 100, "a body of 101 bytes does not match its Content-Range "),
        (206, None, 0, 100, "a body of 0 bytes does not match its Content-Range 'bytes 100-199/"),
    ],
)
def test_an_answer_whose_length_or_coding_is_not_the_objects_is_refused(
    status: int, coding: str | None, length: int | None, expected: int, outcome: str | None
) -> None:
    headers = {"content-range": "bytes 100-199/1000"} if status == 206 else {}
    if coding is not None:
        headers["content-encoding"] = coding
    refused = refused_answer(status, headers, length, expected, "http://h/o?X-Amz-Signature=s")
    if outcome is None:
        assert refused is None
    else:
        # Compressed, the file failed, but not for its length: the listing may well be right.
        assert type(refused) is (FileError if "compressed" in outcome else IntegrityError)
        assert outcome in str(refused)


def parts_asked(size: int, part: int, cap: int) -> list[tuple[int, int]]:
    """The ranges a file of ``size`` bytes in parts of ``part`` is asked for from a server that
    answers with at most ``cap`` bytes: each part, then what is left of it after each answer."""
    return [
        (offset, min(start + part, size))
        for start in range(0, size, part)
        for offset in range(start, min(start + part, size), cap)
    ]


def test_short_range_answers_are_kept_and_the_rest_asked_for(dest: Path) -> None:
    # Large files in 5 parts, and one-part files hashed as they arrive, all answered in pieces.
    catalog = job_catalog(checkpoints=1, small_files=2, small_size=250_000)
    with ServerThread(catalog, Faults(range_cap=100_000)) as server:
        result = run_cli(*sync_args(server, dest, "--json"))

        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["retries"] == 0  # a short answer is no failure
        assert_mirrored(server, dest)
        assert server.traffic.object_bytes_sent == server.data_size()  # nothing twice
        for file in server.files():
            asked = sorted((s, e) for name, s, e in server.traffic.ranges if name == file.name)
            copies = sum(f.name == file.name for f in server.files())  # one per rank
            assert asked == sorted(parts_asked(file.size, PART, 100_000) * copies)

        # The digests recorded for files hashed on the way are those of the bytes on disk.
        checked = run_cli(*sync_args(server, dest, "--verify", "--json"))

        assert checked.code == 0, checked.stderr
        files = json.loads(checked.stdout)["files"]
        assert (files["checked"], files["damaged"]) == (len(server.files()), 0)


@pytest.mark.parametrize("spliced", [False, True])
def test_a_short_answer_longer_than_its_range_fails_the_file(dest: Path, spliced: bool) -> None:
    # Spliced: a 5 MiB answer, moved by the kernel unless more than its range comes.
    size, part, cap = (12 << 20, "8MiB", 5 << 20) if spliced else (4 * PART, "256KiB", 100_000)
    catalog = job_catalog(checkpoints=1, large_size=size, small_files=0)
    with ServerThread(catalog, Faults(range_cap=cap, overlong_body=100)) as server:
        summary = every_file_fails(
            server, dest, "does not match its Content-Range", "--part-size", part
        )

        assert summary["retries"] == 0  # refused at once, not written and then found short


def test_short_answers_without_their_bytes_end_in_a_failure(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    server.faults.range_cap = 1000  # every file answered in pieces, small ones too
    server.faults.hook = lambda name, start, end: "empty"

    summary = every_file_fails(server, dest, "gave up after retrying: body ended at byte")

    assert summary["retries"] >= len(server.files())


def test_a_server_answering_the_rest_of_a_part_with_its_start_again_fails_the_file(
    server: ServerThread, dest: Path
) -> None:
    server.faults.range_cap = 1000

    def same_start(name: str, start: int, end: int) -> None:
        server.faults.shift_content_range = -(start % PART)  # back to the part's first byte

    server.faults.hook = same_start

    every_file_fails(server, dest, "does not match the requested bytes")
    # Each file's first short answer was taken, and the rest asked for.
    rest_asked = {name for name, start, _ in server.traffic.ranges if start % PART}
    assert rest_asked == {f.name for f in server.files()}


def test_weak_etags_that_differ_do_not_fail_a_file(server: ServerThread, dest: Path) -> None:
    server.faults.weak_etags = True  # W/"1", W/"2"...: each part's answer has its own

    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    assert_mirrored(server, dest)


def test_urls_that_expire_mid_transfer_are_refreshed_and_nothing_is_fetched_twice(
    server: ServerThread, dest: Path
) -> None:
    server.faults.url_ttl = 0.5
    server.faults.throttle = 1 << 20  # a 5-part file takes over a second at concurrency 2
    args = sync_args(server, dest, "--checkpoint", "checkpoint-10", "--concurrency", "2", "--json")

    result = run_cli(*args)

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["url_refreshes"] > 0
    wanted = [f for f in server.files() if f.name.startswith("checkpoint-10/")]
    for file in wanted:
        assert_exact(mirrored(dest, JOB, file), file)
    assert server.traffic.object_bytes_sent == sum(f.size for f in wanted)


def test_a_fresh_url_that_worked_and_then_expired_too_is_refreshed_again(dest: Path) -> None:
    # URLs live 0.6 s. The first two answers (on the listed URL, then on the fresh one) stall
    # half way for 0.8 s: each URL sent bytes, then expired before its retry went out. The 403
    # on the fresh URL is an expiry like the first, not "denied even with a fresh URL".
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=1)
    with ServerThread(
        catalog, Faults(url_ttl=0.6, hook=first_answers(2, "stall"), stall_seconds=0.8)
    ) as server:
        result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--json"))

        assert result.code == 0, result.stdout
        assert json.loads(result.stdout)["url_refreshes"] >= 2
        (file,) = [f for f in server.files() if f.node_rank == 0]
        assert_exact(mirrored(dest, JOB, file), file)


def test_one_re_read_of_a_page_serves_every_file_whose_url_expired(dest: Path) -> None:
    # 80 small files on one listing page. The first four answers stall until every listed URL
    # has expired: the four retries find theirs refused at about the same time, while the API
    # takes 0.3 s to answer. One read of the page serves them, and the 76 files after them.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=40)
    faults = Faults(url_ttl=1.0, hook=first_answers(4, "stall"), stall_seconds=1.2, api_delay=0.3)
    with ServerThread(catalog, faults) as server:
        result = run_cli(*sync_args(server, dest, "--json"))

        assert result.code == 0, result.stderr
        files = server.files()
        for file in files:
            assert_exact(mirrored(dest, JOB, file), file)
        # The checkpoint list and the page, then the page read again: once, not once per file.
        assert server.traffic.api_requests == 2 + 1
        assert server.traffic.api_in_flight.most == 1
        # Counted per file, as when each file read the page itself.
        assert json.loads(result.stdout)["url_refreshes"] == len(files)


def test_fresh_urls_kept_from_a_re_read_that_expired_too_are_refreshed_not_denied(
    dest: Path,
) -> None:
    # A slow link: 40 small files at 0.1 s each, two at a time, take 2 s; URLs live 0.4 s. The
    # URLs a read of the page brought for the files after expire before the last of them start:
    # refused, they lead to the page read again, not to "denied even with a fresh URL".
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=20)
    with ServerThread(catalog, Faults(url_ttl=0.4, throttle=32_000)) as server:
        result = run_cli(*sync_args(server, dest, "--concurrency", "2", "--json"))

        assert result.code == 0, result.stdout
        files = server.files()
        for file in files:
            assert_exact(mirrored(dest, JOB, file), file)
        rereads = server.traffic.api_requests - 2  # after the checkpoint list and the page
        # More than one: URLs kept from a read expired. About one per URL lifetime, not one for
        # every file that started after the first URLs expired.
        assert 2 <= rereads <= 10


def test_a_url_kept_from_a_re_read_for_another_file_and_refused_leads_to_a_re_read(
    dest: Path,
) -> None:
    # Two files of one page. The second's first answer stalls; meanwhile the first's URL is
    # refused, and the page read again for it. The second's URL is refused next: it takes the
    # one that read brought, refused too (it may have expired on a slow link). That is no
    # denial: the page is read again, and the file lands.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=2)
    first, second = (f for f in catalog.files() if f.node_rank == 0)
    answers = {first.name: ["403"], second.name: ["stall", "403", "403"]}

    def scripted(name: str, start: int, end: int) -> str | None:
        return answers[name].pop(0) if answers[name] else None

    with ServerThread(catalog, Faults(hook=scripted, stall_seconds=0.5)) as server:
        args = sync_args(server, dest, "--node-rank", "0", "--concurrency", "2", "--json")
        result = run_cli(*args)

        assert result.code == 0, result.stdout
        for file in (first, second):
            assert_exact(mirrored(dest, JOB, file), file)
        # The checkpoint list and the page, then the page read for the first, then for the second.
        assert server.traffic.api_requests == 2 + 2
        assert json.loads(result.stdout)["url_refreshes"] == 1 + 2


def test_a_file_looked_for_past_its_page_fails_alone_not_with_the_files_that_shared_its_read(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two files on one page of two. The first is deleted upstream once its URL is refused; the
    # page is read again for it, and the second's URL is refused while that read is in flight.
    # The page shows the second: it lands. The first is looked for in the rest of the listing,
    # which cannot be read (404): that fails the first alone, and the second did not wait for it.
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=2)
    (checkpoint,) = catalog.jobs[0].checkpoints
    deleted, kept = (f for f in catalog.files() if f.node_rank == 0)
    server_faults = Faults(stall_seconds=0.3)
    # Stalls first, so that the first listing is over before anything changes.
    answers = {deleted.name: ["stall", "403"], kept.name: ["stall", "stall", "403"]}

    def scripted(name: str, start: int, end: int) -> str | None:
        fault = answers[name].pop(0) if answers[name] else None
        if name == deleted.name and fault == "403":
            checkpoint.files.remove(deleted)
            server_faults.page_faults[2] = "404"
            server_faults.api_delay = 1.0
        return fault

    server_faults.hook = scripted
    with ServerThread(catalog, server_faults) as server:
        args = sync_args(server, dest, "--node-rank", "0", "--concurrency", "2", "--json")
        result = run_cli(*args)

    assert result.code == 1, result.stderr
    assert_exact(mirrored(dest, JOB, kept), kept)
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["path"] == f"{JOB}/{deleted.name.replace('/', '/0/', 1)}"
    assert "could not be listed" in failure["error"]


def test_a_408_request_timeout_is_retried(dest: Path) -> None:
    # What a server may send on a kept-alive connection it is about to close as idle.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=1)
    with ServerThread(catalog, Faults(hook=first_answers(1, "408"))) as server:
        result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--json"))

        assert result.code == 0, result.stdout
        assert json.loads(result.stdout)["retries"] == 1
        (file,) = [f for f in server.files() if f.node_rank == 0]
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_url_that_cannot_be_refreshed_fails_its_file_not_the_run(
    server: ServerThread, dest: Path
) -> None:
    server.faults.url_ttl = 0.5
    server.faults.throttle = 1 << 20
    # The listing is answered (the job's checkpoints, then its files); every re-listing for a
    # fresh URL finds the job gone.
    server.faults.api_faults = [None, None, *["404"] * 50]
    args = sync_args(server, dest, "--checkpoint", "checkpoint-10", "--concurrency", "2", "--json")

    result = run_cli(*args)

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["failed"] > 0
    assert summary["files"]["fetched"] + summary["files"]["failed"] == summary["files"]["listed"]
    assert all("a fresh one could not be listed" in f["error"] for f in summary["failures"])


def test_a_file_replaced_mid_transfer_is_not_published_from_two_versions(dest: Path) -> None:
    """Half way through, the object is replaced and the URL in hand refused: the listing, read
    again for a fresh URL, shows the new version. Its bytes must not join the old ones."""
    catalog = job_catalog(checkpoints=1, large_size=4 * PART, small_files=0)
    with ServerThread(catalog) as server:
        replaced: list[int] = []

        def replace_then_refuse(name: str, start: int, end: int) -> str | None:
            if start < 2 * PART or replaced:
                return None
            replaced.append(start)
            new_version(*server.files())  # both ranks' copies
            return "403"

        server.faults.hook = replace_then_refuse
        one_file_fails_then_all_land(server, dest, "changed while it was being fetched")


def test_an_object_replaced_while_its_url_still_works_is_not_published_from_two_versions(
    dest: Path,
) -> None:
    """Half way through a file, its object is replaced and the URL keeps working: the parts
    after that answer with another ETag. The file fails; its old parts are not kept."""
    catalog = job_catalog(checkpoints=1, large_size=4 * PART, small_files=0)
    with ServerThread(catalog) as server:
        replaced: list[int] = []

        def replace(name: str, start: int, end: int) -> None:
            if start >= 2 * PART and not replaced:
                replaced.append(start)
                for file in server.files():  # the bytes change, the listing does not
                    file.seed = 31337

        server.faults.hook = replace
        one_file_fails_then_all_land(server, dest, "changed while it was being fetched (ETag")


def one_file_fails_then_all_land(server: ServerThread, dest: Path, reason: str) -> None:
    """A first run (one file at a time) fails exactly one file for ``reason``; with the fault
    gone, the next run leaves every file exact."""
    first = run_cli(*sync_args(server, dest, "--concurrency", "1", "--json"))

    assert first.code == 1
    (failure,) = json.loads(first.stdout)["failures"]
    assert reason in failure["error"]

    server.faults.hook = None
    again = run_cli(*sync_args(server, dest))

    assert again.code == 0, again.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("large", [True, False])
def test_a_persistent_403_is_a_permission_error_for_that_file_only(
    server: ServerThread, dest: Path, large: bool
) -> None:
    denied = next(f for f in server.files() if (f.size > PART) == large and f.node_rank == 0)
    server.faults.denied = {denied.name}  # both ranks' copies
    started = time.monotonic()

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1
    failures = json.loads(result.stdout)["failures"]
    expected = [f"{JOB}/{_relative(f)}" for f in server.files() if f.name == denied.name]
    assert sorted(f["path"] for f in failures) == sorted(expected)
    assert all("access denied even with a freshly listed URL" in f["error"] for f in failures)
    assert all("X-Amz-Signature" not in f["error"] for f in failures)
    assert time.monotonic() - started < 5  # not retried for ever
    for file in server.files():
        if file.name != denied.name:
            assert_exact(mirrored(dest, JOB, file), file)
    # A large file keeps its staging file and record, to resume; a small one has nothing to
    # resume from, so nothing of it is left behind.
    left = len(list((dest / ".checkpoint-sync" / "staging").iterdir()))
    assert left == (len(failures) if large else 0)


def _relative(file: ServedFile) -> str:
    checkpoint, _, rest = file.name.partition("/")
    return f"{checkpoint}/{file.node_rank}/{rest}"


def test_urls_that_keep_expiring_while_an_object_keeps_failing_run_out_of_retries(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object answers 503 and never a byte; by each retry its URL has expired (403), and a
    fresh one is listed. A refresh is no progress: the retries run out as they would without
    it, rather than starting afresh with every fresh URL, for ever."""
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "3")
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=1)
    answers: list[str] = []

    def failing_then_expired(name: str, start: int, end: int) -> str | None:
        answers.append(name)
        if len(answers) > 40:
            return None  # a hang guard: the object comes back at last
        return "503" if len(answers) % 2 else "403"

    with ServerThread(catalog, Faults(hook=failing_then_expired)) as server:
        result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--json"))

        assert result.code == 1, result.stdout
        (failure,) = json.loads(result.stdout)["failures"]
        assert "gave up after retrying" in failure["error"]
        assert len(answers) <= 2 * 3


def test_an_object_replaced_between_runs_while_its_url_still_works_is_not_resumed_into(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run leaves a file in parts; its object is then replaced, the listing unchanged.
    The next run's answers carry the new ETag, not the one the kept parts came with: the file
    must not be published from the old parts and the new ones."""
    catalog = job_catalog(checkpoints=1, large_size=4 * PART, small_files=0)
    with ServerThread(catalog) as server:
        monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
        server.faults.hook = lambda name, start, end: "500" if start >= 2 * PART else None
        assert run_cli(*sync_args(server, dest, "--concurrency", "1")).code == 1
        server.faults.hook = None

        def replace() -> None:
            for file in server.files():  # the bytes change, the listing does not
                file.seed = 31337

        server.call(replace)
        again = run_cli(*sync_args(server, dest, "--concurrency", "1", "--json"))

        for file in server.files():
            path = mirrored(dest, JOB, file)
            assert not path.exists() or path.read_bytes() == content(31337, 0, file.size)
        assert again.code == 1
        failures = json.loads(again.stdout)["failures"]
        assert len(failures) == len(server.files())  # both ranks' copies were left in parts
        assert all("changed while it was being fetched (ETag" in f["error"] for f in failures)
        # Their parts were dropped: none was resumed, nor counted done by the progress.
        assert json.loads(again.stdout)["files"]["resumed"] == 0
        assert json.loads(again.stdout)["bytes"]["resumed"] == 0

        final = run_cli(*sync_args(server, dest))

        assert final.code == 0, final.stderr
        for file in server.files():
            assert_exact(mirrored(dest, JOB, file), file)


def test_an_object_shrunk_past_the_parts_left_to_fetch_fails_on_its_416_and_lands_next_run(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run leaves a file in parts, two of four done. The next run's listing is read,
    and then the object is replaced by one that ends before the parts left to fetch: the store
    answers their ranges 416. The file fails, nothing lands at its path; the run after that
    lists the new size and lands it exact."""
    catalog = job_catalog(checkpoints=1, large_size=4 * PART, small_files=0)
    with ServerThread(catalog) as server:
        args = sync_args(server, dest, "--node-rank", "0", "--json")
        leave_in_parts(server, monkeypatch, args, from_byte=2 * PART)
        (file,) = [f for f in server.files() if f.node_rank == 0]

        def shrink(offset: int) -> None:
            server.faults.on_page = None  # once: the pages of the next run show the change
            new_version(file)
            file.size = 2 * PART - 100

        server.faults.on_page = shrink
        shrunk = run_cli(*args, "--concurrency", "1")

        assert shrunk.code == 1, shrunk.stderr
        (failure,) = json.loads(shrunk.stdout)["failures"]
        assert failure["path"] == f"{JOB}/{_relative(file)}"
        # Its Content-Range (bytes */N) tells the object's size now.
        assert "HTTP 416 from " in failure["error"]
        assert (
            f"the server says the object has {file.size} bytes; the listing says {4 * PART}"
            in failure["error"]
        )
        assert not mirrored(dest, JOB, file).exists()
        # Its parts are kept: the listing that would tell the object changed is the next one.
        assert staged(dest) == {f"{JOB}/{file.name.partition('/')[0]}"}

        before = len(server.traffic.ranges)
        again = run_cli(*args)

        assert again.code == 0, again.stderr
        assert_exact(mirrored(dest, JOB, file), file)
        assert not any((dest / ".checkpoint-sync" / "staging").iterdir())
        # Fetched anew, both its parts: none of the old version's was taken.
        assert sorted(start for _, start, _ in server.traffic.ranges[before:]) == [0, PART]


# A one-part file of 3000 bytes asked for whole (bytes 0-2999), its object replaced after the
# listing: by a shorter one (206 bytes 0-999/1000), a longer one (206 bytes 0-2999/5000), an
# empty one (416 bytes */0).
@pytest.mark.parametrize("now", [1000, 5000, 0])
def test_a_one_part_file_whose_object_changed_size_says_so_and_lands_next_run(
    dest: Path, now: int
) -> None:
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=1)
    with ServerThread(catalog) as server:
        args = sync_args(server, dest, "--node-rank", "0", "--json")
        (file,) = [f for f in server.files() if f.node_rank == 0]
        listed = file.size

        def resize(offset: int) -> None:
            server.faults.on_page = None  # once: the next run's listing shows the change
            new_version(file)
            file.size = now

        server.faults.on_page = resize
        changed = run_cli(*args)

        assert changed.code == 1, changed.stderr
        summary = json.loads(changed.stdout)
        (failure,) = summary["failures"]
        # An IntegrityError as before: exit 1, not retried (the same answer would come).
        assert failure["error"].endswith(
            f"the server says the object has {now} bytes; the listing says {listed}"
        )
        assert summary["retries"] == 0
        assert not mirrored(dest, JOB, file).exists()

        again = run_cli(*args)

        assert again.code == 0, again.stderr
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_416_without_the_objects_size_says_it_is_smaller_than_listed(
    server: ServerThread, dest: Path
) -> None:
    server.faults.hook = lambda name, start, end: "416"  # no Content-Range: bytes */N

    summary = every_file_fails(server, dest, "the object is smaller than listed")

    assert not any("the server says" in f["error"] for f in summary["failures"])
    assert summary["retries"] == 0  # asked again, it would be answered the same way


def test_a_refused_url_of_a_file_pushed_off_its_page_is_found_further_on_and_lands(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refused file is looked for in the whole listing, found on the next page with a fresh
    # URL, and lands.
    with job_with_a_file_pushed_off_its_page(monkeypatch) as (server, added):
        result = run_cli(*sync_args(server, dest, "--json"))

        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["url_refreshes"] == 1
        assert summary["files"]["fetched"] == 4
        for file in server.files():
            if file is not added:  # listed after the walk: the next run's
                assert_exact(mirrored(dest, JOB, file), file)
        assert server.traffic.api_requests == PUSHED_OFF_REQUESTS
