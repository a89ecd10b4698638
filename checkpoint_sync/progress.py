"""Counters the engine updates, the summary made of them, and the two ways of showing them live.

The engine only increments `Stats`; a display polls it. On a terminal that is a rich progress
bar, elsewhere (cron mail, CI logs) a plain line every few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import anyio

MAX_FAILURES_KEPT = 1000
MAX_TIMINGS_KEPT = 10_000


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
    removed_upstream: list[str] = field(default_factory=list)  # their "<run>/<checkpoint>"
    delete_held_back: list[str] = field(default_factory=list)  # runs listed with no checkpoint
    retries: int = 0
    url_refreshes: int = 0
    listing_done: bool = False
    # The pid of another run whose lock this one waits for (--wait-lock), while it waits.
    waiting_for: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    # The checkpoints the run took (by --latest, say): (where, the provider's id, their
    # directory under DEST, or None where its name cannot be one).
    taken: list[tuple[str, str, str | None]] = field(default_factory=list)
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

    def fail(self, where: str, message: str) -> None:
        self.files_failed += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append((where, message))

    def timed(self, first_byte: float, body_bytes: int, body_seconds: float) -> None:
        if len(self.timings) < MAX_TIMINGS_KEPT:
            self.timings.append((first_byte, body_bytes, body_seconds))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def mb_per_s(self) -> float:
        return self.bytes_fetched / 1e6 / max(self.seconds, 1e-9)


def summary(stats: Stats) -> dict[str, Any]:
    """The machine-readable summary ``--json`` prints."""
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
            {"checkpoint": where, "id": key, "path": path} for where, key, path in stats.taken
        ],
        "removed_upstream": stats.removed_upstream,
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def bytes_done(stats: Stats) -> int:
    """Bytes of the files to fetch that are in: received, or kept from an earlier run's parts."""
    return min(stats.bytes_fetched + stats.bytes_resumed, stats.bytes_to_fetch)


def _rate(stats: Stats) -> float:
    """Bytes received a second: skipped and resumed files moved none."""
    return stats.bytes_fetched / max(stats.seconds, 1e-9)


def _eta(stats: Stats) -> str | None:
    """Seconds left at the rate so far, once the listing has told how much there is."""
    rate = _rate(stats)
    remaining = stats.bytes_to_fetch - bytes_done(stats)
    return f"ETA {remaining / rate:.0f}s" if rate > 0 and stats.listing_done and remaining else None


def status_line(stats: Stats) -> str:
    if stats.waiting_for is not None:
        return waiting_line(stats.waiting_for)
    eta = _eta(stats)
    return (
        f"{human_bytes(stats.bytes_fetched)} fetched at {human_bytes(_rate(stats))}/s"
        f"{'' if eta is None else f', {eta}'}; files "
        f"{files_line(stats)}{'' if stats.listing_done else ' (still listing)'}"
    )


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
    async def run(self, stats: Stats) -> None:
        """Show ``stats`` until cancelled."""


class LogLines:
    """A plain status line every ``interval`` seconds, handed to ``emit``: readable in cron mail."""

    def __init__(self, emit: Callable[[str], None], interval: float = 10.0) -> None:
        self._emit = emit
        self._interval = interval

    async def run(self, stats: Stats) -> None:
        while True:
            await anyio.sleep(self._interval)
            self._emit(status_line(stats))


class ProgressBar:
    """A rich progress bar: bytes, rate, ETA, files done/skipped/failed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    async def run(self, stats: Stats) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[files]}"),
        )
        console = Console(file=self._stream)
        with Progress(*columns, console=console, transient=True) as bar:
            # The total is known once the listing is walked, which goes on beside the transfers.
            task = bar.add_task("syncing", total=None, files="")
            while True:
                waiting = stats.waiting_for
                bar.update(
                    task,
                    description="syncing" if waiting is None else waiting_line(waiting),
                    completed=stats.bytes_fetched,
                    total=stats.bytes_to_fetch if stats.listing_done else None,
                    files=files_line(stats),
                )
                await anyio.sleep(0.2)


class NoDisplay:
    async def run(self, stats: Stats) -> None:
        await anyio.sleep_forever()
