"""``--limit-rate``: the bucket's arithmetic, and runs that take as long as the limit says."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from checkpoint_sync.localserver import Catalog, Faults
from checkpoint_sync.rate import READ_SIZE, RateLimit

from .conftest import JOB, job_catalog, sync_args
from .support import Result, ServerThread, assert_exact, least_seconds, mirrored, run_cli

MiB = 1 << 20


@pytest.mark.parametrize(
    ("reads", "waits"),
    [
        # (seconds since the start, bytes read) at 1000 KiB/s: the bucket holds a tenth of a
        # second, 100 KiB.
        ([(0.0, 50 << 10)], [0.0]),
        ([(0.0, 100 << 10)], [0.0]),
        ([(0.0, 150 << 10)], [0.05]),  # 50 KiB over
        ([(0.0, 100 << 10), (0.0, 100 << 10)], [0.0, 0.1]),  # the second waits its turn
        ([(0.0, 100 << 10), (0.05, 100 << 10)], [0.0, 0.05]),  # half refilled
        ([(0.0, 100 << 10), (10.0, 100 << 10)], [0.0, 0.0]),  # refilled, never past its size
        ([(0.0, 300 << 10), (0.1, 0)], [0.2, 0.1]),  # a debt is paid by time
    ],
)
def test_a_connection_waits_for_the_bytes_it_took_beyond_the_bucket(
    reads: list[tuple[float, int]], waits: list[float]
) -> None:
    limit = RateLimit(1000 << 10, now=0.0)
    assert [limit.took(size, now) for now, size in reads] == pytest.approx(waits)


def test_a_slow_limit_still_lets_a_whole_read_through() -> None:
    # 1 KiB/s: a tenth of a second is less than one read, which would wait for ever to fit.
    limit = RateLimit(1 << 10, now=0.0)
    assert limit.took(READ_SIZE, 0.0) == 0.0
    assert limit.took(1 << 10, 0.0) == pytest.approx(1.0)


def timed_sync(server: ServerThread, dest: Path, *extra: str) -> tuple[Result, float]:
    started = time.monotonic()
    result = run_cli(*sync_args(server, dest, "--json", *extra))
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("catalog", "rate", "part_size", "faults"),
    [
        # Files of several 256 KiB parts and small one-stream files.
        (job_catalog(checkpoints=1), MiB, "256KiB", Faults()),
        # Parts long enough to be spliced into their file by the kernel, which counts no rate
        # (sent slowly enough that most of each is still to come when its file is ready).
        (
            job_catalog(checkpoints=1, large_size=12 * MiB, small_files=0),
            16 * MiB,
            "8MiB",
            Faults(throttle=64 * MiB),
        ),
    ],
    ids=["parts", "spliced-parts"],
)
def test_a_sync_under_a_limit_takes_as_long_as_the_limit_says(
    dest: Path, catalog: Catalog, rate: int, part_size: str, faults: Faults
) -> None:
    with ServerThread(catalog, faults=faults) as server:
        files = server.files()
        result, seconds = timed_sync(
            server, dest, "--limit-rate", str(rate), "--concurrency", "2", "--part-size", part_size
        )

    assert result.code == 0, result.stderr
    total = sum(f.size for f in files)
    assert json.loads(result.stdout)["bytes"]["fetched"] == total
    assert seconds >= least_seconds(total, rate, connections=2)
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_connection_held_by_the_limit_is_not_taken_for_a_stalled_one(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 connections share 512 KiB/s: each waits for seconds between reads, longer than the
    # read timeout, which bounds a server's silence, not ours.
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "0.5")
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=8, small_size=64 << 10)
    with ServerThread(catalog) as server:
        result, seconds = timed_sync(server, dest, "--limit-rate", "512KiB", "--concurrency", "16")
        files = server.files()

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["retries"] == 0
    assert seconds >= least_seconds(sum(f.size for f in files), 512 << 10, connections=16)
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)
