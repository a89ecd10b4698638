"""Fresh presigned URLs for files whose URL expired: one read of a listing page serves them all.

Listing again is the only way to a fresh URL (NOTES.md), and the URLs of one page, signed
together, expire together: on a long restore over a slow link every file of a page finds its URL
expired. The page is read again once for them: files that need it while a read of it is in
flight wait for that one, and the fresh URLs it brings for the page's other files are kept for
them, each handed out once (`PageRereads.taken`), until a later read of the page replaces them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .errors import ApiError, AuthError, FileError, TransientError
from .net import url_problem
from .plan import check_listed_url
from .sources.base import FileKey, PageRef, Relisted, RemoteFile, Source, file_key

# How many re-read pages keep the fresh URLs their files have not taken yet. Files are fetched
# about in listing order, so those still to start are on the last pages read; a file whose
# page was let go reads it again. At most this many pages of entries are held (1,000 each).
PAGES_KEPT = 4
# The generation of a URL as the listing gave it: every read of a page again comes later.
LISTED = 0


@dataclass(frozen=True, slots=True)
class FreshUrl:
    url: str
    generation: int  # of the read of its page it came from: later reads have higher ones
    # Read for a request refused with the URL before it, or joined while in flight: refused at
    # once, it is a denial, not an expiry. A URL kept from an earlier read may have expired.
    reread: bool


@dataclass(slots=True)
class _Page:
    generation: int
    entries: dict[FileKey, Relisted]  # those no file took yet


@dataclass(slots=True)
class _Reading:
    task: asyncio.Task[_Page]
    waiting: int = 0  # files waiting for it


class PageRereads:
    """Reads of listing pages again for fresh URLs, shared by the files of each page."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._pages: dict[PageRef, _Page] = {}  # the latest read of each, oldest first
        self._reading: dict[PageRef, _Reading] = {}
        self._generation = LISTED

    def taken(self, file: RemoteFile, than: int = LISTED) -> FreshUrl | None:
        """A URL for ``file`` that a read of its page later than generation ``than`` brought,
        if one did and its entry there is unchanged; each is handed out once."""
        if not self._pages:
            return None  # no page was read again: files whose URLs never expire pay no more
        page = self._pages.get(file.origin)
        if page is None or page.generation <= than:
            return None
        entry = self._take(file.origin, page, file_key(file))
        if entry is None or _changed(file, entry) or url_problem(entry.url):
            return None  # its own read of the page tells what is wrong
        return FreshUrl(entry.url, page.generation, reread=False)

    async def fresh(self, file: RemoteFile, than: int) -> FreshUrl:
        """A URL for ``file`` newer than its own of generation ``than``, which was refused:
        one an earlier read of its page brought, else from its page read again now (or by the
        read in flight), else, where the page no longer shows it, from its listing looked through
        for it alone. `FileError` if the listing now shows another version of it, whose bytes
        must not join the old one's, or no longer shows it, or cannot be read."""
        if (earlier := self.taken(file, than)) is not None:
            return earlier
        key = file_key(file)
        try:
            page = await self._read_shared(file)
            entry = self._take(file.origin, page, key)
            if entry is None:
                # Not on its page any more: looked for alone, so that the files the page shows
                # neither wait for that walk nor fail with it.
                entry = await self._source.look_for(file)
        except AuthError:
            raise  # every other file would be refused too: the run stops
        except (ApiError, TransientError) as exc:
            # Retried already; the job or checkpoint may be gone. Files in flight go on.
            raise FileError(f"its URL expired and a fresh one could not be listed ({exc})") from exc
        if entry is None:
            raise FileError("its URL expired and it is no longer listed")
        if _changed(file, entry):
            raise FileError(
                f"changed while it was being fetched (now {entry.size} bytes, last modified "
                f"{entry.last_modified}): the next run fetches the new version"
            )
        check_listed_url(entry.url)
        return FreshUrl(entry.url, page.generation, reread=True)

    async def _read_shared(self, file: RemoteFile) -> _Page:
        """``file``'s page read again: by the read in flight, if there is one."""
        ref = file.origin
        reading = self._reading.get(ref)
        if reading is None:
            reading = _Reading(asyncio.create_task(self._read(file)))
            self._reading[ref] = reading
            reading.task.add_done_callback(lambda _: self._forget(ref, reading))
        reading.waiting += 1
        try:
            # Shielded: a file that stops waiting (it failed, say) must not stop the others'.
            return await asyncio.shield(reading.task)
        finally:
            reading.waiting -= 1
            if not reading.waiting and not reading.task.done():
                # Nobody waits any more (the run stops): no request goes on for nothing.
                self._forget(ref, reading)
                reading.task.cancel()

    def _forget(self, ref: PageRef, reading: _Reading) -> None:
        """``reading`` is over: a file that needs the page from now on reads it again."""
        if self._reading.get(ref) is reading:
            del self._reading[ref]

    async def _read(self, file: RemoteFile) -> _Page:
        entries = await self._source.relist(file)
        self._generation += 1
        page = _Page(self._generation, entries)
        ref = file.origin
        self._pages.pop(ref, None)  # replaced, and the latest read goes last
        self._pages[ref] = page
        if len(self._pages) > PAGES_KEPT:
            del self._pages[next(iter(self._pages))]
        return page

    def _take(self, ref: PageRef, page: _Page, key: FileKey) -> Relisted | None:
        entry = page.entries.pop(key, None)
        if not page.entries and self._pages.get(ref) is page:
            del self._pages[ref]  # every file of it took its URL
        return entry


def _changed(file: RemoteFile, entry: Relisted) -> bool:
    return (entry.size, entry.last_modified) != (file.size, file.last_modified)
