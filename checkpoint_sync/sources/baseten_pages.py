"""What Baseten's training jobs and Loops share: file listings (``page_size``/``page_token``), and
how a checkpoint list entry off the schema is kept."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial

from ..api import ApiClient
from ..errors import MalformedResponseError
from ..models import CheckpointFile, CheckpointFilesPage, Unreadable
from .base import (
    FileKey,
    Lookahead,
    PageRef,
    Relisted,
    RemoteFile,
    UnreadableCheckpoint,
    answer_when_wanted,
    file_key,
)

# At most how many pages a listing keeps asked for ahead of the one being planned (`Lookahead`):
# a far API's latency per page (0.1 s added to the built-in server's: a no-op re-sync of 100,000
# files 12.4 s with one page ahead) is then paid about once per this many pages.
PAGES_AHEAD = 8
# How many times a listing that did not hold still while walked is walked again (`file_pages`).
# Each walk is one more read of every page; a listing that keeps moving (files uploaded all the
# while) is left to the next run.
REWALKS = 2


async def file_pages(
    api: ApiClient,
    listing: str,
    page_size: int,
    what: str,
    first: asyncio.Task[CheckpointFilesPage] | None = None,
    *,
    moved: Callable[[], None] | None = None,
    once: bool = False,
) -> AsyncGenerator[tuple[PageRef, list[CheckpointFile | Unreadable]], None]:
    """Every page of ``listing`` (`_walk_once`), walked again while it did not hold still (up
    to `REWALKS` times): a file removed upstream meanwhile may have hidden another, which the
    next walk shows. The entries of the walks before come again; the caller counts a repeat
    once. ``moved`` is called if the last walk did not hold still either.

    ``first``: the first page, asked for already (`first_page`). ``once``: walked once however
    it moved, for a walk only to count its files, which has no way to count a repeat once.
    """
    start = PageRef(listing=listing, page_token=0, page_size=page_size)
    walks: list[Walked] = []
    for rewalk in range(1 if once else REWALKS + 1):
        pages = _walk_once(api, start, what, None if rewalk else first, walks.append)
        async with aclosing(pages):
            async for page in pages:
                yield page
        if walks[-1].held_still:
            return
    if moved is not None:
        moved()


async def _walk_once(
    api: ApiClient,
    start: PageRef,
    what: str,
    first: asyncio.Task[CheckpointFilesPage] | None,
    ended: Callable[[Walked], None],
) -> AsyncGenerator[tuple[PageRef, list[CheckpointFile | Unreadable]], None]:
    """Every page of the listing from ``start``, stopping on a null token or an empty page
    (NOTES.md); once the last is handed on, ``ended`` gets what the walk saw (`Walked`): whether
    the listing held still meanwhile.

    The pages after this one (as many as a `Lookahead` keeps) are asked for before it is handed
    on, so that the server prepares them while the caller plans this one's files. Only the page
    that this one's token names is ever handed on next: while the tokens are the offsets NOTES.md
    says they are, the pages after it are asked for at the offsets they will name (up to
    ``total_count``), a guess that each page's own token confirms or cancels. A page that cannot
    be read fails where it would have otherwise: after the pages before it.

    A token that does not move forward, or more entries than ``total_count`` announced, means
    the server would keep us listing forever: that is reported, not followed.

    ``first``: the first page, asked for already (`first_page`).
    """
    walk = Walked()
    lookahead = Lookahead(PAGES_AHEAD)
    guessing = True  # until a guess goes wrong
    ahead: deque[tuple[PageRef, asyncio.Task[CheckpointFilesPage]]] = deque(
        [(start, first or _ask(api, start, what, lookahead))]
    )
    try:
        while True:
            ref, asked = ahead.popleft()
            lookahead.wanted()
            page = await answer_when_wanted(asked, partial(read_page, api, ref, what), api.retry)
            walk = walked(walk, page)
            if not page.presigned_urls:
                ended(walk)
                return
            following = page.next_page_token
            runaway = None if following is None else _runaway(page, following, ref, walk.seen, what)
            if following is None or runaway is not None:
                yield ref, page.presigned_urls
                if runaway is not None:
                    raise runaway
                ended(walk)
                return
            guessing = _ask_ahead(ahead, api, ref, page, following, what, lookahead, guessing)
            # Planning a page of files already mirrored never waits: without this yield the
            # requests would go out only once the caller asked for the next page.
            await asyncio.sleep(0)
            lookahead.handed_on(asked)
            yield ref, page.presigned_urls
    finally:
        # The caller stopped early: the pages asked for ahead are not wanted. A task cancelled
        # once done does not report its error as "never retrieved" either.
        _cancel(ahead)


def _ask_ahead(
    ahead: deque[tuple[PageRef, asyncio.Task[CheckpointFilesPage]]],
    api: ApiClient,
    ref: PageRef,
    page: CheckpointFilesPage,
    following: int,
    what: str,
    lookahead: Lookahead,
    guessing: bool,
) -> bool:
    """Keep the pages after ``page`` (read at ``ref``) asked for, as many as ``lookahead`` says:
    first the one its token names, then, while ``guessing`` and the tokens go up by the page's
    length, those at the offsets that follow. Whether to go on guessing: not once a guess went
    wrong, as pages of uneven lengths would waste nearly every guess."""
    if ahead and ahead[0][0].page_token != following:
        _cancel(ahead)  # from here, what the tokens say
        guessing = False
    if not ahead:
        named = replace(ref, page_token=following)
        ahead.append((named, _ask(api, named, what, lookahead)))
    stride = following - ref.page_token
    if not guessing or stride != len(page.presigned_urls):
        while len(ahead) > 1:  # not offsets: only the page named is known to come next
            ahead.pop()[1].cancel()
        return guessing
    token = ahead[-1][0].page_token + stride
    while len(ahead) < lookahead.size and token < page.total_count:
        guess = replace(ref, page_token=token)
        ahead.append((guess, _ask(api, guess, what, lookahead)))
        token += stride
    return guessing


def _cancel(ahead: deque[tuple[PageRef, asyncio.Task[CheckpointFilesPage]]]) -> None:
    while ahead:
        ahead.popleft()[1].cancel()


def first_page(
    api: ApiClient, listing: str, page_size: int, what: str
) -> asyncio.Task[CheckpointFilesPage]:
    """Ask for the first page of ``listing`` now, for `file_pages` to walk it from later."""
    return _ask(api, PageRef(listing=listing, page_token=0, page_size=page_size), what)


def _ask(
    api: ApiClient, ref: PageRef, what: str, lookahead: Lookahead | None = None
) -> asyncio.Task[CheckpointFilesPage]:
    """Read the page at ``ref`` in the background, in one attempt (`answer_when_wanted` asks
    again), timed for ``lookahead``; awaiting the task gives it, or its error."""
    task = asyncio.create_task(read_page(api, ref, what, retried=False))
    if lookahead is not None:
        lookahead.asked(task)
    return task


@dataclass(frozen=True, slots=True)
class Walked:
    """What the pages of a listing walked so far tell of whether it held still meanwhile: the
    size of one entry, however long the listing.

    Its tokens are offsets (NOTES.md): a file removed upstream before the offset reached moves
    the files after it a place up, and the one the next page would have started with is never
    shown; a file added there moves them a place down, and the next page lists the last file of
    the one before again.
    """

    seen: int = 0  # entries listed, repeats included
    total: int | None = None  # total_count, as the latest page announced it
    last: tuple[str, int] | None = None  # the latest page's last file: name and node rank
    # A page announced another total_count than the one before, or listed that page's last
    # file again.
    moved: bool = False

    @property
    def held_still(self) -> bool:
        """Whether the listing held still while walked, as far as its pages can tell: they all
        announced one total_count and held that many entries, and none listed the last file of
        the page before again. Not told: a file removed before the offset reached while another
        is added past it, between the same two pages (the count stays, and nothing comes
        twice)."""
        return not self.moved and self.seen == self.total


def walked(walk: Walked, page: CheckpointFilesPage) -> Walked:
    """``walk`` with the next page of the listing (the one the last page's token named)."""
    entries = page.presigned_urls
    last = next((e for e in reversed(entries) if isinstance(e, CheckpointFile)), None)
    return Walked(
        seen=walk.seen + len(entries),
        total=page.total_count,
        last=None if last is None else (last.relative_file_name, last.node_rank),
        moved=walk.moved
        or walk.total not in (None, page.total_count)
        or _lists(entries, walk.last),
    )


def _lists(entries: list[CheckpointFile | Unreadable], file: tuple[str, int] | None) -> bool:
    """Whether ``entries`` list ``file`` (its name and node rank)."""
    if file is None:
        return False
    name, rank = file
    return any(
        isinstance(e, CheckpointFile) and e.relative_file_name == name and e.node_rank == rank
        for e in entries
    )


def _runaway(
    page: CheckpointFilesPage, following: int, ref: PageRef, seen: int, what: str
) -> Exception | None:
    """Why the listing would go on for ever if ``page``, asked for at ``ref`` with ``seen``
    entries listed up to its end, were followed by the page at ``following``."""
    if following <= ref.page_token:
        return MalformedResponseError(
            f"{what}: the listing's next_page_token {following} does not advance past "
            f"{ref.page_token}"
        )
    if seen > page.total_count:
        return MalformedResponseError(
            f"{what}: the listing goes on past its total_count of {page.total_count}"
        )
    return None


async def read_page(
    api: ApiClient, ref: PageRef, what: str, *, retried: bool = True
) -> CheckpointFilesPage:
    return await api.get(
        ref.listing,
        CheckpointFilesPage,
        what=what,
        params={"page_size": ref.page_size, "page_token": ref.page_token},
        retried=retried,
    )


async def relist(
    api: ApiClient, ref: PageRef, what: str, placed: Callable[[str], tuple[str, str]]
) -> dict[FileKey, Relisted]:
    """The entries of the page at ``ref`` as listed now, by `file_key` (``placed``: the
    checkpoint and path a listed name stands for)."""
    return _relisted((await read_page(api, ref, what)).presigned_urls, placed)


async def look_for(
    api: ApiClient, file: RemoteFile, what: str, placed: Callable[[str], tuple[str, str]]
) -> Relisted | None:
    """``file`` as its listing shows it now, wherever that is (None: nowhere), for one its page
    no longer shows: files added or removed before it move it to another page."""
    key = file_key(file)
    ref = file.origin
    async with aclosing(file_pages(api, ref.listing, ref.page_size, what)) as pages:
        async for _, listed in pages:
            if (found := _relisted(listed, placed).get(key)) is not None:
                return found
    return None


def _relisted(
    listed: list[CheckpointFile | Unreadable], placed: Callable[[str], tuple[str, str]]
) -> dict[FileKey, Relisted]:
    found = {}
    for entry in listed:
        if isinstance(entry, CheckpointFile):
            checkpoint, path = placed(entry.relative_file_name)
            found[checkpoint, entry.node_rank, path] = Relisted(
                entry.url, entry.size_bytes, entry.last_modified
            )
    return found


def remote_file(
    entry: CheckpointFile, ref: PageRef, *, run: str, checkpoint: str, path: str
) -> RemoteFile:
    """A listed Baseten file, bound for ``<run>/<checkpoint>/<node_rank>/<path>``."""
    return RemoteFile(
        run=run,
        checkpoint=checkpoint,
        node_rank=entry.node_rank,
        path=path,
        size=entry.size_bytes,
        last_modified=entry.last_modified,
        url=entry.url,
        origin=ref,
    )


def unreadable_checkpoint(
    entry: Unreadable, key: str | None, where: str, *, names: tuple[str, ...] = ()
) -> UnreadableCheckpoint:
    """A checkpoint list entry off the schema, as its source names it: ``key`` its unique id,
    ``where`` for reports. Both lists give ``created_at``: where the entry's is readable,
    ``--latest`` can tell whether the checkpoint it passed over is newer than the one it took."""
    return UnreadableCheckpoint(
        key, where, entry.reason, names=names, created_at=entry.moment("created_at")
    )
