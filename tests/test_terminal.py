"""What an operator sees on a terminal: the CLI run under a real pseudo-terminal, its bytes played
on a small screen of the terminal's width, and the progress line itself, width by width."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoint_sync.localserver import Faults
from checkpoint_sync.progress import Listing, Stats, terminal_line, terminal_width

from .conftest import job_catalog, sync_args
from .support import ServerThread, assert_no_secret

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """About 8.5 MB at about 2 MiB/s: a run draws its progress line some twenty times."""
    catalog = job_catalog(
        checkpoints=2, large_size=(2 << 20) + 4321, small_files=6, small_size=20_000
    )
    with ServerThread(catalog, Faults(throttle=1 << 20, api_delay=0.02)) as running:
        yield running


@dataclass
class Played:
    code: int
    output: str  # as the terminal received it
    lines: list[str]  # the screen at the end, a line wrapped at its edge as one, the cursor's last


def play(output: str, columns: int) -> list[str]:
    """``output`` on a terminal ``columns`` wide that wraps at its edge: carriage return, line
    feed, cursor up, erase in line; colours and the cursor's visibility change nothing here."""
    rows, row, column = [""], 0, 0
    wrapped: set[int] = set()  # the rows that go on from the one above
    for token in re.findall(r"\x1b\[[?0-9;]*[A-Za-z]|.", output, re.DOTALL):
        if token == "\r":
            column = 0
        elif token == "\n":
            row += 1
            rows += [""] * (row + 1 - len(rows))
        elif token.startswith("\x1b"):
            if token[-1] == "A":
                row = max(row - int(token[2:-1] or 1), 0)
            elif token[-1] == "K":
                rows[row] = " " * column if token == "\x1b[2K" else rows[row][:column]
        else:
            if column == columns:
                row, column = row + 1, 0
                rows += [""] * (row + 1 - len(rows))
                wrapped.add(row)
            rows[row] = rows[row][:column].ljust(column) + token + rows[row][column + 1 :]
            column += 1
    lines: list[str] = []
    for number, text in enumerate(rows[: row + 1]):
        if number in wrapped:
            lines[-1] += text
        else:
            lines.append(text)
    return [line.rstrip() for line in lines]


def run_in_terminal(
    args: list[str], *, columns: int, env: dict[str, str] | None = None, sigint_after: float = 0
) -> Played:
    """``python -m checkpoint_sync ARGS`` with stdout and stderr on a pseudo-terminal of
    ``columns`` x 20, and SIGINT after ``sigint_after`` seconds if given."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 20, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "checkpoint_sync", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        # Without COLUMNS and LINES (pytest-xdist sets them in its workers, a user's shell may
        # export them): they would override the terminal's size, which is what is tested.
        env={**_without_size(os.environ), "TERM": "xterm", **(env or {})},
    )
    os.close(follower)
    received, started = b"", time.monotonic()
    while True:
        if sigint_after and time.monotonic() - started > sigint_after:
            process.send_signal(signal.SIGINT)
            sigint_after = 0
        if select.select([leader], [], [], 0.05)[0]:
            try:
                data = os.read(leader, 1 << 16)
            except OSError:  # EIO: the last writer closed it
                break
            if not data:
                break
            received += data
        assert time.monotonic() - started < 60, "the run never ended"
    os.close(leader)
    output = received.decode()
    assert_no_secret(output)
    return Played(process.wait(timeout=10), output, play(output, columns))


def _without_size(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name not in ("COLUMNS", "LINES")}


def frames(output: str) -> list[str]:
    """Each progress line drawn: what a carriage return starts and an erase ends."""
    return re.findall(r"\r([^\r\n]+)\x1b\[K", output)


@pytest.mark.slow
@pytest.mark.parametrize("columns", [40, 80])
def test_the_progress_line_is_redrawn_in_place_within_the_width_then_erased(
    server: ServerThread, dest: Path, columns: int
) -> None:
    played = run_in_terminal(sync_args(server, dest, "--concurrency", "2"), columns=columns)

    assert played.code == 0
    drawn = frames(played.output)
    assert len(drawn) >= 5
    assert all(len(frame) < columns for frame in drawn)
    # Bytes on every line, however narrow the terminal: the first thing a user looks for.
    assert all(re.match(r"\d+(\.\d)? (B|KiB|MiB) (fetched|of )", frame) for frame in drawn)
    # The screen holds the summary alone: the progress line never left a line of its own.
    assert played.lines[:-1] == [played.lines[0]]
    assert played.lines[0].startswith("fetched 28 files (8.5 MiB) into")
    assert played.lines[-1] == ""


@pytest.mark.slow
def test_lines_printed_during_the_progress_never_start_on_its_line(
    server: ServerThread, dest: Path
) -> None:
    # A slow listing of small pages: the plan's lines come while the progress line is drawn.
    server.faults.api_delay = 0.2
    played = run_in_terminal(
        sync_args(server, dest, "--dry-run"),
        columns=100,
        env={"CHECKPOINT_SYNC_PAGE_SIZE": "2"},
    )

    assert played.code == 0
    *plan, summary, _ = played.lines
    assert len(plan) == 28
    assert all(re.fullmatch(r"fetch  \S+ \(\d+\.\d (KiB|MiB)\)", line) for line in plan)
    assert summary.startswith("would fetch 28 files")
    assert len(frames(played.output)) >= 3  # the plan's lines came while it was drawn


@pytest.mark.slow
def test_ctrl_c_during_the_progress_leaves_a_clean_screen_and_exits_130(
    server: ServerThread, dest: Path
) -> None:
    played = run_in_terminal(
        sync_args(server, dest, "--concurrency", "2"), columns=80, sigint_after=2
    )

    assert played.code == 130
    assert len(frames(played.output)) >= 3
    summary, stopped, end = played.lines
    assert summary.startswith("fetched ")
    assert stopped == "checkpoint-sync: error: stopped by SIGINT; rerun to resume"
    assert end == ""
    assert "\x1b[?25l" not in played.output  # the cursor, never hidden, needs no showing


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [{"PYTHONIOENCODING": "ascii"}, {"LANG": "C", "LC_ALL": "C"}, {"LANG": "en_US.ISO-8859-1"}],
    ids=["ascii", "posix-locale", "latin-1"],
)
def test_the_progress_line_needs_nothing_beyond_ascii(
    server: ServerThread, dest: Path, env: dict[str, str]
) -> None:
    played = run_in_terminal(sync_args(server, dest), columns=80, env=env)

    assert played.code == 0
    assert frames(played.output)
    assert played.output.isascii()
    assert "\\u" not in played.output  # no escape written for a glyph the encoding lacks
    assert "\\x" not in played.output


@pytest.mark.slow
def test_a_dumb_terminal_gets_plain_lines_and_no_escapes(server: ServerThread, dest: Path) -> None:
    played = run_in_terminal(sync_args(server, dest), columns=80, env={"TERM": "dumb"})

    assert played.code == 0
    assert "\x1b" not in played.output
    assert "\r" not in played.output.replace("\r\n", "\n")  # the terminal's own, at each line end
    assert played.lines[0].startswith("fetched 28 files")


def _stats(**counts: int | Listing) -> Stats:
    """Counters 10 seconds into a run."""
    stats = Stats(started=time.monotonic() - 10)
    for name, count in counts.items():
        setattr(stats, name, count)
    return stats


LISTED = {"bytes_to_fetch": 100 * MiB, "listing": Listing.DONE, "files_fetched": 3}
ESTIMATED = {
    "bytes_to_fetch": 60 * MiB,
    "bytes_walked": 100 * MiB,
    "bytes_counted": 300 * MiB,
    "files_fetched": 3,
}


@pytest.mark.parametrize(
    ("counts", "width", "shown"),
    [
        (
            {**LISTED, "bytes_fetched": 40 * MiB},
            120,
            "[############------------------] 40% 40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s; "
            "files 3 done, 0 skipped, 0 failed",
        ),
        # Narrower: the bar goes first, then the share, the files, the ETA, the rate.
        (
            {**LISTED, "bytes_fetched": 40 * MiB},
            90,
            "40% 40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s; files 3 done, 0 skipped, 0 failed",
        ),
        (
            {**LISTED, "bytes_fetched": 40 * MiB},
            60,
            "40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s",
        ),
        # Each cut at the edge: a bar of the shortest width fills the line to the last column
        # but one, and one column less leaves it out; so does a piece that would reach it.
        (
            {**LISTED, "bytes_fetched": 40 * MiB},
            93,
            "[####------] 40% 40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s; "
            "files 3 done, 0 skipped, 0 failed",
        ),
        (
            {**LISTED, "bytes_fetched": 40 * MiB},
            92,
            "40% 40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s; files 3 done, 0 skipped, 0 failed",
        ),
        ({**LISTED, "bytes_fetched": 40 * MiB}, 41, "40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s"),
        ({**LISTED, "bytes_fetched": 40 * MiB}, 40, "40.0 MiB of 100.0 MiB, 4.2 MB/s"),
        ({**LISTED, "bytes_fetched": 40 * MiB}, 30, "40.0 MiB of 100.0 MiB"),
        ({**LISTED, "bytes_fetched": 40 * MiB}, 20, "40.0 MiB of 100...."),
        # Nothing received yet: no rate, so no ETA.
        (
            LISTED,
            80,
            "[---------------] 0% 0 B of 100.0 MiB, 0 B/s; files 3 done, 0 skipped, 0 failed",
        ),
        # The bar, the share and the ETA say all is in only once it is.
        (
            {**LISTED, "bytes_fetched": 99 * MiB},
            120,
            "[#############################-] 99% 99.0 MiB of 100.0 MiB, 10.4 MB/s, ETA 1s; "
            "files 3 done, 0 skipped, 0 failed",
        ),
        (
            {**LISTED, "bytes_fetched": 100 * MiB - 100 * KiB},
            120,
            "[#############################-] 99% 99.9 MiB of 100.0 MiB, 10.5 MB/s, ETA 1s; "
            "files 3 done, 0 skipped, 0 failed",
        ),
        # Parts kept from an earlier run are done, though this one moved none of their bytes.
        (
            {**LISTED, "bytes_fetched": 40 * MiB, "bytes_resumed": 40 * MiB},
            90,
            "80% 80.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 5s; files 3 done, 0 skipped, 0 failed",
        ),
        # Skipped files are no bytes done, nor a faster rate.
        (
            {**LISTED, "bytes_fetched": 40 * MiB, "bytes_skipped": 900 * MiB, "files_skipped": 9},
            90,
            "40% 40.0 MiB of 100.0 MiB, 4.2 MB/s, ETA 15s; files 3 done, 9 skipped, 0 failed",
        ),
        # Retries received some bytes twice: never past the whole.
        (
            {**LISTED, "bytes_fetched": 101 * MiB},
            60,
            "100.0 MiB of 100.0 MiB, 10.6 MB/s",
        ),
        # Still listing: no total, share or ETA yet.
        (
            {"bytes_fetched": 40 * MiB, "bytes_to_fetch": 60 * MiB, "files_fetched": 3},
            100,
            "40.0 MiB fetched, 4.2 MB/s; files 3 done, 0 skipped, 0 failed (still listing)",
        ),
        # Still listing, the listing counted ahead: 60 MiB planned, 200 MiB not reached yet.
        (
            {**ESTIMATED, "bytes_fetched": 40 * MiB},
            120,
            "[##-----------------] 15% 40.0 MiB of ~260.0 MiB, 4.2 MB/s, ETA ~55s; "
            "files 3 done, 0 skipped, 0 failed (still listing)",
        ),
        ({**ESTIMATED, "bytes_fetched": 40 * MiB}, 40, "40.0 MiB of ~260.0 MiB, 4.2 MB/s"),
        # The listing failed part way: the 60 MiB planned are all the run fetches, whatever
        # was counted ahead; the files are still landing.
        (
            {**ESTIMATED, "bytes_fetched": 40 * MiB, "listing": Listing.FAILED},
            120,
            "[##############--------] 66% 40.0 MiB of 60.0 MiB, 4.2 MB/s, ETA 5s; "
            "files 3 done, 0 skipped, 0 failed (listing failed)",
        ),
        # Still listing, nor are parts kept from an earlier run "fetched".
        (
            {
                "bytes_fetched": 40 * MiB,
                "bytes_resumed": 40 * MiB,
                "bytes_to_fetch": 60 * MiB,
                "files_fetched": 3,
            },
            100,
            "40.0 MiB fetched, 4.2 MB/s; files 3 done, 0 skipped, 0 failed (still listing)",
        ),
        # Nothing to fetch: no share of nothing.
        (
            {"listing": Listing.DONE, "files_skipped": 5},
            80,
            "0 B fetched, 0 B/s; files 0 done, 5 skipped, 0 failed",
        ),
        ({"bytes_fetched": 5}, 2, "."),
    ],
)
def test_terminal_line(counts: dict[str, int | Listing], width: int, shown: str) -> None:
    line = terminal_line(_stats(**counts), width)
    assert line == shown
    assert len(line) < width


def test_a_run_waiting_for_the_lock_says_so_on_the_terminal_too() -> None:
    stats = Stats(waiting_for="4242")
    assert terminal_line(stats, 100) == (
        "waiting for the mirror's lock, held by another run (pid 4242)"
    )
    assert terminal_line(stats, 30) == "waiting for the mirror's l..."


@pytest.mark.parametrize(
    ("columns", "terminal", "width"),
    [
        ("100", 50, 100),  # COLUMNS first, as for other programs
        ("100", None, 100),
        (None, 50, 50),
        ("", 50, 50),
        ("wide", 50, 50),
        ("0", 50, 50),  # no width
        ("-3", 50, 50),
        (None, 0, 80),  # a terminal that does not tell its size (a serial console)
        (None, None, 80),  # not a terminal
    ],
)
def test_terminal_width(
    monkeypatch: pytest.MonkeyPatch, columns: str | None, terminal: int | None, width: int
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    reader, writer = os.openpty() if terminal is not None else os.pipe()
    if terminal is not None:
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 20, terminal, 0, 0))
    with os.fdopen(reader, "rb"), os.fdopen(writer, "w") as stream:
        assert terminal_width(stream) == width
