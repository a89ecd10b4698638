from __future__ import annotations

import contextlib

import anyio
import pytest

from checkpoint_sync.errors import TransientError
from checkpoint_sync.net import retry_after_seconds
from checkpoint_sync.retry import RetryPolicy, retrying

POLICY = RetryPolicy(attempts=5, initial_delay=1.0, max_delay=8.0, deadline=60.0)


@pytest.mark.parametrize(
    ("attempt", "retry_after", "jitter", "delay"),
    [
        (1, None, 1.0, 1.0),
        (2, None, 1.0, 2.0),
        (4, None, 1.0, 8.0),
        (9, None, 1.0, 8.0),  # capped
        (3, None, 0.5, 2.0),  # full jitter
        (1, 5.0, 0.1, 5.0),  # the server's Retry-After wins
        (1, 100.0, 0.1, 8.0),  # but never beyond our ceiling
    ],
)
def test_delay(attempt: int, retry_after: float | None, jitter: float, delay: float) -> None:
    assert POLICY.delay(attempt, retry_after, jitter) == delay


def test_a_run_backs_off_from_half_a_second() -> None:
    # The settings give the attempts, ceiling and deadline (cli._retry); the first backoff is
    # the policy's own, and every run's.
    policy = RetryPolicy()
    assert [policy.delay(attempt, None, 1.0) for attempt in (1, 2, 3)] == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    ("attempt", "elapsed", "next_delay", "gives_up"),
    [(1, 0, 1, False), (5, 0, 1, True), (2, 59.5, 1, True), (2, 10, 1, False)],
)
def test_gives_up(attempt: int, elapsed: float, next_delay: float, gives_up: bool) -> None:
    assert POLICY.gives_up(attempt, 0.0, next_delay, elapsed) is gives_up


@pytest.mark.anyio
async def test_retrying_stops_after_the_allowed_attempts() -> None:
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        raise TransientError("nope")

    with pytest.raises(TransientError):
        await retrying(RetryPolicy(attempts=3, initial_delay=0), flaky)
    assert calls == 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("attempts", "failures", "retried"),
    [
        (3, 1, 1),  # asked again once, then answered
        (3, 2, 2),
        (3, 5, 2),  # the third failure is given up on: not asked again
        (1, 1, 0),  # retries switched off: a failure is never asked again
    ],
)
async def test_retried_is_told_of_each_attempt_after_the_first(
    attempts: int, failures: int, retried: int
) -> None:
    left = failures
    told = 0

    async def op() -> int:
        nonlocal left
        if left:
            left -= 1
            raise TransientError("503")
        return 42

    def count() -> None:
        nonlocal told
        told += 1

    with contextlib.suppress(TransientError):
        await retrying(RetryPolicy(attempts=attempts, initial_delay=0), op, retried=count)
    assert told == retried


@pytest.mark.anyio
async def test_retrying_returns_the_first_success() -> None:
    failures = [TransientError("once")]

    async def op() -> int:
        if failures:
            raise failures.pop()
        return 42

    assert await retrying(RetryPolicy(initial_delay=0), op) == 42


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("policy", "progresses", "succeeds"),
    [
        # Four failures in a row, each after the work got further, then success.
        (RetryPolicy(attempts=2, initial_delay=0), True, True),
        (RetryPolicy(attempts=2, initial_delay=0), False, False),
        # Each attempt takes 0.1 s: 0.4 s in all, twice the deadline, but never 0.2 s in a row.
        (RetryPolicy(attempts=99, initial_delay=0, deadline=0.2), True, True),
        (RetryPolicy(attempts=99, initial_delay=0, deadline=0.2), False, False),
        # Retries switched off stay off, progress or not.
        (RetryPolicy(attempts=1, initial_delay=0), True, False),
    ],
)
async def test_failures_count_afresh_after_progress(
    policy: RetryPolicy, progresses: bool, succeeds: bool
) -> None:
    landed = 0
    failures = 4

    async def part() -> str:
        nonlocal landed, failures
        if policy.deadline < 1:
            await anyio.sleep(0.1)
        if failures:
            failures -= 1
            landed += 1000 if progresses else 0
            raise TransientError("connection reset mid-body")
        return "done"

    if succeeds:
        assert await retrying(policy, part, lambda: landed) == "done"
    else:
        with pytest.raises(TransientError):
            await retrying(policy, part, lambda: landed)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("-1", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date passed: no wait
        ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0),  # "-0000": UTC without saying so
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str, seconds: float | None) -> None:
    assert retry_after_seconds({"retry-after": header}) == seconds
