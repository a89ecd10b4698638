"""Cursor pagination (W&B's REST and GraphQL listings): a cursor must move on, or we stop."""

from __future__ import annotations

from ..errors import MalformedResponseError


def advance(cursor: str | None, seen: set[str], what: str) -> str:
    """``cursor``, recorded in ``seen``; an error if it is missing or was handed out before.

    A server that hands back a cursor it already gave would have us list the same pages forever.
    """
    if not cursor:
        raise MalformedResponseError(f"{what}: the listing says there is more but gives no cursor")
    if cursor in seen:
        raise MalformedResponseError(
            f"{what}: the listing's cursor {cursor!r} does not advance (it was handed out before)"
        )
    seen.add(cursor)
    return cursor
