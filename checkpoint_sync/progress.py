"""Counters the engine updates, the summary made of them, and the two ways of showing them live.

The engine only increments `Stats`; a display polls it. On a terminal that is one line redrawn in
place, elsewhere (cron mail, CI logs) a plain line at intervals that grow with the run
(`log_interval`).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, Protocol, TextIO

import anyio

MAX_FAILURES_KEPT = 1000
MAX_TIMINGS_KEPT = 10_000


class Listing(Enum):
    """How the planning walk of the listing stands."""

    WALKING = "walking"
    DONE = "done"
    # Stopped on an error: no file is planned after those, which still land.
    FAILED = "failed"
    # Cut short as the run stops (a full disk): no file is planned or started after those, and
    # the files in flight finish.
    STOPPED = "stopped"


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    files_listed: int = 0
    files_to_fetch: int = 0
    files_fetched: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_to_check: int = 0  # --verify: mirrored files to read back against their recorded digest
    files_checked: int = 0  # ... read back
    files_damaged: int = 0  # ... whose bytes no longer matched it
    files_restored: int = 0  # ... of those, fetched again (the others failed, or the run stopped)
    files_resumed: int = 0  # files left in parts by an earlier run, taken up from those parts
    bytes_resumed: int = 0  # ... the bytes of their parts kept, not fetched again
    bytes_to_fetch: int = 0
    bytes_to_check: int = 0
    bytes_fetched: int = 0  # as received over the wire, retries included
    bytes_published: int = 0
    bytes_skipped: int = 0
    # --delete: mirrored files of checkpoints removed upstream (what a --dry-run would delete)
    files_to_delete: int = 0
    files_deleted: int = 0
    bytes_to_delete: int = 0
    bytes_deleted: int = 0
    # The bytes of the listed files the planning walk took so far, repeats included; and, once
    # a walk ahead counted the whole listing alike, its count (`bytes_total`).
    bytes_walked: int = 0
    bytes_counted: int | None = None
    removed_upstream: list[str] = field(default_factory=list)  # their "<run>/<checkpoint>"
    # Without --delete: the checkpoints removed upstream whose files the mirror keeps.
    removed_upstream_kept: list[str] = field(default_factory=list)
    delete_held_back: list[str] = field(default_factory=list)  # runs listed with no checkpoint
    retries: int = 0
    url_refreshes: int = 0
    listing: Listing = Listing.WALKING
    # The pid of another run whose lock this one waits for (--wait-lock), while it waits.
    waiting_for: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    # The checkpoints the run took (by --latest, say), by where.
    taken: dict[str, Taken] = field(default_factory=dict)
    # The files failed in each of those (by where): one checkpoint's failure leaves the others
    # whole, and `failures` keeps only the first few.
    failed_in: Counter[str] = field(default_factory=Counter)
    # The files of each of those queued to be fetched or read back and not yet done: a run
    # stopped after its walk ended mirrored a checkpoint with none left whole.
    queued_in: Counter[str] = field(default_factory=Counter)
    # Of those, the ones that may lack a file no failure of theirs names, and why: their listing
    # kept changing, or an unreadable entry of their run did not tell its checkpoint.
    unsure: dict[str, str] = field(default_factory=dict)
    syncing_left_out: list[str] = field(default_factory=list)
    # Checkpoints left out for a status neither complete nor syncing: (where, status).
    status_left_out: list[tuple[str, str | None]] = field(default_factory=list)
    # Unreadable checkpoints --latest passed over that may be newer than the one it took:
    # (where, problem).
    passed_over: list[tuple[str, str]] = field(default_factory=list)
    # Checkpoints ("<run>/<checkpoint>") whose file listing kept changing while it was walked,
    # each time it was: a file removed upstream meanwhile may have hidden another.
    listings_changed: list[str] = field(default_factory=list)
    # Per request, the first MAX_TIMINGS_KEPT: (seconds to first byte, body bytes, body seconds).
    timings: list[tuple[float, int, float]] = field(default_factory=list)
    # Bytes of bodies under way that ``bytes_fetched`` counts only later: received and held
    # until a buffer's worth (up to 2 MiB a connection) is written, or moved into their files
    # by the kernel (a large plain-HTTP part) until the move ends. For a display, so that a
    # body on a slow link shows as it comes. Set by the run's transfers.
    bytes_landing: Callable[[], int] = field(default=lambda: 0, repr=False)

    def end_listing(self, how: Listing) -> None:
        """The walk ends once, and the first way it ended stands: a listing that failed was not
        walking when the run stopped, nor one walked whole whose checks then failed."""
        if self.listing is Listing.WALKING:
            self.listing = how

    def fail(self, where: str, message: str) -> None:
        self.files_failed += 1
        # Looked up by each path leading to it: a run may take thousands of checkpoints.
        leading = [where[:i] for i, char in enumerate(where) if char == "/"]
        for checkpoint in (*leading, where):
            if checkpoint in self.taken:
                self.failed_in[checkpoint] += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append((where, message))

    def timed(self, first_byte: float, body_bytes: int, body_seconds: float) -> None:
        if len(self.timings) < MAX_TIMINGS_KEPT:
            self.timings.append((first_byte, body_bytes, body_seconds))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def bytes_per_s(self) -> float:
        return self.bytes_fetched / max(self.seconds, 1e-9)

    def mb_per_s(self) -> float:
        return self.bytes_per_s() / 1e6


class Taken(NamedTuple):
    """A checkpoint the run took, as its summary tells it: a restore's script reads which one."""

    key: str  # the provider's id
    path: str | None  # its directory under DEST; None where its name cannot be one
    # W&B's: its step and metrics, which --best and --latest chose it by (None and {} elsewhere).
    step: int | None = None
    metrics: Mapping[str, float] = {}


def told_by(taken: Taken) -> str:
    """What a checkpoint taken was chosen by, where its provider tells it (W&B's step and
    metrics: `--best loss` took the one of least loss), for the summary's line naming it."""
    told = [f"step {taken.step}"] if taken.step is not None else []
    if taken.metrics:
        told.append(", ".join(f"{name} {value:.4g}" for name, value in taken.metrics.items()))
    return f" ({'; '.join(told)})" if told else ""


def incompleteness(stats: Stats, where: str, *, stopped: bool, error: bool) -> str | None:
    """Why the checkpoint ``where``, one the run took, may not be whole in the mirror as the run
    ends (``stopped`` by a signal, or by an ``error``); None where the run mirrored every file
    of it that it set out to. A stop after the walk of the listing ended leaves whole those
    checkpoints none of whose files it queued was still to land; before, any may lack a file
    not listed yet (a job's listing is not by checkpoint)."""
    if stopped and (stats.listing is not Listing.DONE or stats.queued_in[where]):
        return "the run was stopped"
    if error:
        return "the run stopped on an error"
    if failed := stats.failed_in[where]:
        return f"{counted_files(failed)} failed"
    return stats.unsure.get(where)


def summary(stats: Stats, missing: Callable[[str], str | None] | None) -> dict[str, Any]:
    """The machine-readable summary ``--json`` prints; ``missing``: why a checkpoint the run
    took may not be whole (`incompleteness`), None for a dry run, which mirrors nothing."""
    return {
        "files": {
            "listed": stats.files_listed,
            "to_fetch": stats.files_to_fetch,  # what a --dry-run would fetch
            "fetched": stats.files_fetched,
            "skipped": stats.files_skipped,
            "failed": stats.files_failed,
            "to_check": stats.files_to_check,  # what a --dry-run --verify would read back
            "checked": stats.files_checked,
            "damaged": stats.files_damaged,
            "to_delete": stats.files_to_delete,
            "deleted": stats.files_deleted,
            "resumed": stats.files_resumed,
        },
        "bytes": {
            "to_fetch": stats.bytes_to_fetch,
            "to_check": stats.bytes_to_check,
            "fetched": stats.bytes_fetched,
            "published": stats.bytes_published,
            "skipped": stats.bytes_skipped,
            "to_delete": stats.bytes_to_delete,
            "deleted": stats.bytes_deleted,
            "resumed": stats.bytes_resumed,
        },
        "seconds": round(stats.seconds, 3),
        "mb_per_s": round(stats.mb_per_s(), 1),
        "retries": stats.retries,
        "url_refreshes": stats.url_refreshes,
        "checkpoints": [
            {
                "checkpoint": where,
                "id": taken.key,
                "path": taken.path,
                "step": taken.step,
                "metrics": dict(taken.metrics),
                "complete": None if missing is None else missing(where) is None,
            }
            for where, taken in stats.taken.items()
        ],
        "removed_upstream": stats.removed_upstream,
        "removed_upstream_kept": stats.removed_upstream_kept,
        "delete_held_back": stats.delete_held_back,
        "syncing_left_out": stats.syncing_left_out,
        "status_left_out": [
            {"checkpoint": where, "status": status} for where, status in stats.status_left_out
        ],
        "passed_over": [
            {"checkpoint": where, "error": error} for where, error in stats.passed_over
        ],
        "listings_changed": stats.listings_changed,
        "failures": [{"path": path, "error": error} for path, error in stats.failures],
    }


def summary_line(stats: Stats, dest: str, *, dry_run: bool) -> str:
    """The text summary's first line: the files fetched, skipped and failed. A dry run's says
    what it would do, and the seconds it took to plan that, which tell nothing of how long the
    run would take."""
    if dry_run:
        return (
            f"would fetch {counted_files(stats.files_to_fetch)} "
            f"({human_bytes(stats.bytes_to_fetch)}) into {dest}; would skip "
            f"{stats.files_skipped} unchanged ({human_bytes(stats.bytes_skipped)}); "
            f"{stats.files_failed} failed; planned in {stats.seconds:.1f}s"
        )
    size = human_bytes(stats.bytes_published)
    if stats.bytes_fetched != stats.bytes_published:
        # Parts of files not finished (a stop, a failure), parts kept from an earlier run, or
        # retries: what came over the wire is not the size of the files fetched.
        size += f"; {human_bytes(stats.bytes_fetched)} received"
    rate = f" at {human_rate(stats.bytes_per_s())}" if stats.bytes_fetched else ""
    return (
        f"fetched {counted_files(stats.files_fetched)} ({size}) into {dest} in "
        f"{stats.seconds:.1f}s{rate}; skipped {stats.files_skipped} unchanged "
        f"({human_bytes(stats.bytes_skipped)}); {stats.files_failed} failed"
    )


def human_bytes(n: float) -> str:
    return _scaled(n, 1024, (("B", 0), ("KiB", 1), ("MiB", 1), ("GiB", 1), ("TiB", 1)))


def human_rate(rate: float) -> str:
    """A rate of ``rate`` bytes a second in decimal units, MB/s (10^6 bytes) from 1 MB/s, as the
    summary, `--json`, `bench` and the benchmarks give it and curl and rclone are read against
    them; kB/s and B/s below, where a limited or stalling link would read 0.0 MB/s."""
    return _scaled(rate, 1000, (("B/s", 0), ("kB/s", 1), ("MB/s", 1)))


def _scaled(value: float, base: int, units: Sequence[tuple[str, int]]) -> str:
    """``value`` in the first of ``units`` (each ``base`` times the one before, with the digits
    it is shown with) whose figure, as shown, is under ``base`` (999,960 B/s is 1.0 MB/s, not
    1000.0 kB/s), or in the last, whatever its figure."""
    *smaller, (last, digits) = units
    for unit, shown_digits in smaller:
        if abs(float(shown := f"{value:.{shown_digits}f}")) < base:
            return f"{shown} {unit}"
        value /= base
    return f"{value:.{digits}f} {last}"


def counted_files(count: int, kind: str = "") -> str:
    """``count`` files, as said of one or of several: "1 file", "3 mirrored files"."""
    return f"{count} {kind}file{'' if count == 1 else 's'}"


def _received(stats: Stats) -> int:
    """Bytes received so far, those of bodies still coming included."""
    return stats.bytes_fetched + stats.bytes_landing()


def bytes_done(stats: Stats) -> int:
    """Bytes of the files to fetch that are in: received, or kept from an earlier run's parts."""
    return min(_received(stats) + stats.bytes_resumed, stats.bytes_to_fetch)


def _rate(stats: Stats) -> float:
    """Bytes received a second: skipped and resumed files moved none."""
    return _received(stats) / max(stats.seconds, 1e-9)


def bytes_total(stats: Stats) -> tuple[int, str] | None:
    """The bytes to fetch, with "" once the listing has been walked, or its walk failed or was
    stopped (what was planned is then all the run fetches, at most: a count ahead no longer
    tells anything); before, where a walk ahead counted the listing, an estimate marked "~":
    those planned so far, and all those the planning walk has not reached, as if none of them
    were mirrored already. None: not known."""
    if stats.listing is not Listing.WALKING:
        return stats.bytes_to_fetch, ""
    if stats.bytes_counted is None:
        return None
    return stats.bytes_to_fetch + max(stats.bytes_counted - stats.bytes_walked, 0), "~"


def _eta(stats: Stats) -> str | None:
    """Seconds left at the rate so far, once the total is known (or estimated: "~")."""
    rate, total = _rate(stats), bytes_total(stats)
    if total is None or rate <= 0:
        return None
    whole, mark = total
    left = whole - bytes_done(stats)
    # At least a second while anything is left, as the share is rounded down: neither says the
    # run is done before it is.
    return f"ETA {mark}{max(round(left / rate), 1)}s" if left > 0 else None


def status_line(stats: Stats) -> str:
    if stats.waiting_for is not None:
        return waiting_line(stats.waiting_for)
    eta = _eta(stats)
    return (
        f"{_bytes_line(*_progress(stats))} at {human_rate(_rate(stats))}"
        f"{'' if eta is None else f', {eta}'}; files {files_line(stats)}{listing_note(stats)}"
    )


def _progress(stats: Stats) -> tuple[int, int, str]:
    """(bytes done, of how many, "~" where that is an estimate: `bytes_total`), once the total
    is known; before, (bytes received, 0, "")."""
    total, mark = bytes_total(stats) or (0, "")
    return (bytes_done(stats) if total else _received(stats)), total, mark


def _bytes_line(done: int, total: int, mark: str) -> str:
    """The bytes done of the total (`_progress`), or fetched while it is not known."""
    if total:
        return f"{human_bytes(done)} of {mark}{human_bytes(total)}"
    return f"{human_bytes(done)} fetched"


def listing_note(stats: Stats) -> str:
    """The note on the files while the listing is not planned whole: its walk goes on, failed
    (its error is reported at the end; the files planned before it still land), or was stopped
    with the run (a full disk: the files in flight finish, then the run ends)."""
    return _LISTING_NOTES[stats.listing]


_LISTING_NOTES = {
    Listing.WALKING: " (still listing)",
    Listing.DONE: "",
    Listing.FAILED: " (listing failed)",
    Listing.STOPPED: " (listing stopped)",
}


# The shortest progress bar worth drawing, and the longest.
BAR_WIDTHS = (10, 30)


def terminal_line(stats: Stats, width: int) -> str:
    """The progress line for a terminal ``width`` columns wide: a bar and the share done, bytes
    done (of how many, once listed or estimated: `bytes_total`), rate, ETA and files, less what
    does not fit the width less one column, dropped in that order but the bytes (a terminal may
    wrap a line that fills its last column, and a wrapped line is not redrawn in place). Only
    ASCII: every encoding has it, and each character takes one column."""
    room = max(width - 1, 1)
    if stats.waiting_for is not None:
        return _cut(waiting_line(stats.waiting_for), room)
    done, total, mark = _progress(stats)
    # Each piece as (which is dropped first, what precedes it unless it leads, its text).
    pieces: list[tuple[int, str, str]] = [
        (0, " ", _bytes_line(done, total, mark)),
        (1, ", ", human_rate(_rate(stats))),
        (3, "; ", f"files {files_line(stats)}{listing_note(stats)}"),
    ]
    if (eta := _eta(stats)) is not None:
        pieces.insert(2, (2, ", ", eta))
    if total:
        pieces.insert(0, (4, "", f"{done * 100 // total}%"))
    kept = list(pieces)
    while len(kept) > 1 and len(_joined(kept)) > room:
        kept.remove(max(kept))
    line = _joined(kept)
    if total and len(kept) == len(pieces):
        bar = min(room - len(line) - 3, BAR_WIDTHS[1])  # "[", "]" and a space
        if bar >= BAR_WIDTHS[0]:
            filled = bar * done // total
            line = f"[{'#' * filled}{'-' * (bar - filled)}] {line}"
    return _cut(line, room)


def _joined(pieces: list[tuple[int, str, str]]) -> str:
    return pieces[0][2] + "".join(sep + text for _, sep, text in pieces[1:])


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(room - 3, 0)] + "..."[:room]


def files_line(stats: Stats) -> str:
    """Files done, skipped and failed; and with ``--verify``, how far the read-back is (which
    moves no bytes over the network, so a long one would look stuck)."""
    checking = (
        f", {stats.files_checked} of {stats.files_to_check} checked" if stats.files_to_check else ""
    )
    return (
        f"{stats.files_fetched} done, {stats.files_skipped} skipped, {stats.files_failed} failed"
        f"{checking}"
    )


def waiting_line(holder: str) -> str:
    return f"waiting for the mirror's lock, held by another run (pid {holder})"


class Display(Protocol):
    # Whether it shows the bytes to fetch before the listing has been walked (`bytes_total`):
    # only then does a run walk its listing ahead to count them.
    estimates: bool

    async def run(self, stats: Stats) -> None:
        """Show ``stats`` until cancelled."""


# How often a plain status line is written, by how long the display has run: (until, every)
# seconds. Cron mails every line: a 3-hour run gets about 100 of them, not 1,000.
LOG_SCHEDULE: tuple[tuple[float, float], ...] = (
    (60, 10),
    (600, 30),
    (3600, 60),
    (math.inf, 300),
)


def log_interval(elapsed: float) -> float:
    """Seconds from a plain status line to the next, ``elapsed`` seconds into the display."""
    return next(every for until, every in LOG_SCHEDULE if elapsed < until)


class LogLines:
    """A plain status line handed to ``emit`` at intervals that grow with the run
    (``interval`` of the seconds it has run): readable in cron mail."""

    estimates = True

    def __init__(
        self, emit: Callable[[str], None], interval: Callable[[float], float] = log_interval
    ) -> None:
        self._emit = emit
        self._interval = interval

    async def run(self, stats: Stats) -> None:
        started = time.monotonic()
        while True:
            await anyio.sleep(self._interval(time.monotonic() - started))
            self._emit(status_line(stats))


class TerminalLine:
    """One line on a terminal, redrawn in place every ``interval`` seconds (`terminal_line`),
    fitted to the terminal's width as it is now, and erased when it stops, or by `clear` before
    another line is printed: no line is ever written after half of it."""

    estimates = True

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        self._stream = stream
        self._interval = interval
        self._drawn = False

    async def run(self, stats: Stats) -> None:
        try:
            while True:
                self._write(f"\r{terminal_line(stats, terminal_width(self._stream))}\x1b[K")
                self._drawn = True
                await anyio.sleep(self._interval)
        finally:  # cancelled at the end of the run, or by Ctrl-C
            self.clear()

    def clear(self) -> None:
        """Erase the line, if drawn; the next redraw draws it again, below what was printed."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def _write(self, text: str) -> None:
        with suppress(OSError):  # stderr cannot be written: nowhere left to say so
            self._stream.write(text)
            self._stream.flush()


def terminal_width(stream: TextIO) -> int:
    """The columns of the terminal ``stream`` writes to: COLUMNS if set, as for other programs,
    else what the terminal says (asked each time: it may be resized), else 80."""
    with suppress(ValueError):
        if (columns := int(os.environ.get("COLUMNS", ""))) > 0:
            return columns
    with suppress(OSError, ValueError):  # no descriptor, or not a terminal's
        if (columns := os.get_terminal_size(stream.fileno()).columns) > 0:
            return columns
    return 80


class NoDisplay:
    estimates = False

    async def run(self, stats: Stats) -> None:
        await anyio.sleep_forever()
