"""Bounded retries with exponential backoff and full jitter, honouring ``Retry-After``.

The policy is a plain value: tests switch retries off or make them instant by passing
``RetryPolicy(attempts=1)`` or ``RetryPolicy(initial_delay=0)``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from .errors import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial_delay: float = 0.5
    max_delay: float = 30.0
    # Give up once this much time has gone by since the first attempt (or, for work that
    # reports its progress, since the last failure after which it got further).
    deadline: float = 600.0

    def delay(self, attempt: int, retry_after: float | None, jitter: float) -> float:
        """Seconds to wait before attempt ``attempt + 1``; ``jitter`` is uniform in [0, 1)."""
        # The exponent capped: past attempt 1025, 2.0 ** attempt overflows a float, and retries
        # has no ceiling; 2 ** 64 half-seconds are far past the longest max_delay allowed.
        growth = 2.0 ** min(attempt - 1, 64)
        backoff = min(self.max_delay, self.initial_delay * growth) * jitter
        if retry_after is not None:
            # The server's word wins, but never beyond our own ceiling.
            return min(max(retry_after, backoff), self.max_delay)
        return backoff

    def gives_up(self, attempt: int, started: float, next_delay: float, now: float) -> bool:
        return attempt >= self.attempts or now + next_delay - started > self.deadline


async def retrying(
    policy: RetryPolicy,
    operation: Callable[[], Awaitable[T]],
    progress: Callable[[], int] | None = None,
    retried: Callable[[], None] | None = None,
) -> T:
    """Run ``operation``, retrying it on `TransientError` as the policy allows.

    With ``progress`` (how far the work has got: the bytes of a part that have landed), a
    failure after the work got further starts the count afresh, so attempts and deadline bound
    the failures in a row without progress: a part that takes longer than the deadline on a
    slow link, or a link that drops every so many megabytes, is not given up for its age or for
    the drops it came through. ``retried`` is called before each attempt after the first: a
    failure given up on was not asked again.
    """
    started = time.monotonic()
    attempt = 0
    reached = progress() if progress is not None else 0
    while True:
        attempt += 1
        try:
            return await operation()
        except TransientError as exc:
            if progress is not None and (now_at := progress()) > reached:
                reached = now_at
                attempt, started = 1, time.monotonic()
            wait = policy.delay(attempt, exc.retry_after, random.random())
            if policy.gives_up(attempt, started, wait, time.monotonic()):
                raise
            await anyio.sleep(wait)
            if retried is not None:
                retried()
