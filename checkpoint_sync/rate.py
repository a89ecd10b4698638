"""``--limit-rate``: one token bucket that every connection of a run draws its bytes from.

A connection reports the bytes it received and is told how long to stop reading. The bucket
holds a tenth of a second's worth (at least one read), so the rate holds over each second, not
only on average over the run; a connection reads at most `READ_SIZE` at a time under a limit, so
that its share comes in small steps rather than a buffer's worth followed by a long wait.
"""

from __future__ import annotations

READ_SIZE = 64 << 10


class RateLimit:
    def __init__(self, bytes_per_second: int, now: float) -> None:
        self.rate = bytes_per_second
        self._burst = max(bytes_per_second / 10, READ_SIZE)
        self._tokens = self._burst
        self._last = now

    def took(self, size: int, now: float) -> float:
        """``size`` bytes arrived at ``now`` (seconds, monotonic): how many seconds the
        connection that read them waits before it reads again."""
        refill = max(now - self._last, 0.0) * self.rate
        self._tokens = min(self._burst, self._tokens + refill) - size
        self._last = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0
