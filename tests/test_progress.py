"""What the plain progress lines and the summary say."""

from __future__ import annotations

import time

import anyio
import pytest

from checkpoint_sync.progress import (
    LogLines,
    Stats,
    human_bytes,
    log_interval,
    status_line,
    summary,
)


@pytest.mark.anyio
async def test_log_lines_report_counts_at_each_interval() -> None:
    stats = Stats(files_fetched=3, files_skipped=2, files_failed=1, bytes_fetched=5 << 20)
    lines: list[str] = []
    with anyio.move_on_after(0.2):
        await LogLines(lines.append, interval=lambda elapsed: 0.05).run(stats)
    assert len(lines) >= 2
    assert "5.0 MiB fetched" in lines[0]
    assert "files 3 done, 2 skipped, 1 failed (still listing)" in lines[0]


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [
        (0, 10),
        (59.9, 10),
        (60, 30),
        (599, 30),
        (600, 60),
        (3599, 60),
        (3600, 300),
        (86_400, 300),
    ],
)
def test_plain_status_lines_come_less_often_as_the_run_goes_on(
    elapsed: float, interval: float
) -> None:
    assert log_interval(elapsed) == interval


def test_a_three_hour_run_writes_about_a_hundred_plain_status_lines() -> None:
    at, lines = 0.0, 0
    while (at := at + log_interval(at)) <= 3 * 3600:
        lines += 1
    assert lines == 6 + 18 + 50 + 24  # not 1,080, one every 10 seconds


def test_status_line_gives_an_eta_once_the_listing_is_done() -> None:
    stats = Stats(bytes_fetched=10 << 20, bytes_to_fetch=20 << 20, listing_done=True)
    assert "ETA" in status_line(stats)
    assert "still listing" not in status_line(stats)


MiB = 1 << 20


@pytest.mark.parametrize(
    ("counts", "eta"),
    [
        # A large file half in: its bytes count before it is published.
        ({"bytes_fetched": 40 * MiB}, "ETA 15s"),
        ({"bytes_fetched": 40 * MiB, "bytes_published": 40 * MiB}, "ETA 15s"),
        # Parts kept from an earlier run are done; they are no bytes a second.
        ({"bytes_fetched": 40 * MiB, "bytes_resumed": 40 * MiB}, "ETA 5s"),
        # Skipped files neither.
        ({"bytes_fetched": 40 * MiB, "bytes_skipped": 1000 * MiB}, "ETA 15s"),
        # Bytes received twice (a retry) do not make the rest negative.
        ({"bytes_fetched": 110 * MiB}, None),
    ],
)
def test_the_eta_counts_what_is_in_at_the_rate_received(
    counts: dict[str, int], eta: str | None
) -> None:
    stats = Stats(bytes_to_fetch=100 * MiB, listing_done=True)
    for name, count in counts.items():
        setattr(stats, name, count)
    stats.started = time.monotonic() - 10  # 4 MiB/s for the 40 MiB
    shown = status_line(stats)
    assert (eta in shown) if eta else "ETA" not in shown


def test_summary_keeps_failures_and_left_out_checkpoints() -> None:
    stats = Stats(syncing_left_out=["job/checkpoint-30"])
    stats.fail("job/c/0/a.bin", "HTTP 500")
    report = summary(stats)
    assert report["files"]["failed"] == 1
    assert report["failures"] == [{"path": "job/c/0/a.bin", "error": "HTTP 500"}]
    assert report["syncing_left_out"] == ["job/checkpoint-30"]


def test_a_run_waiting_for_the_lock_says_so_and_whose() -> None:
    stats = Stats(waiting_for="4242")
    assert status_line(stats) == "waiting for the mirror's lock, held by another run (pid 4242)"


def test_a_verify_run_shows_how_far_its_read_back_is() -> None:
    stats = Stats(files_skipped=3, files_to_check=10, files_checked=4, listing_done=True)
    assert "files 0 done, 3 skipped, 0 failed, 4 of 10 checked" in status_line(stats)
    assert "checked" not in status_line(Stats(files_skipped=3))


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 << 20, "1.5 GiB"),
        (1023 << 30, "1023.0 GiB"),
        (5 << 40, "5.0 TiB"),
        (3 << 50, "3072.0 TiB"),  # no unit past TiB
    ],
)
def test_human_bytes(n: int, shown: str) -> None:
    assert human_bytes(n) == shown
