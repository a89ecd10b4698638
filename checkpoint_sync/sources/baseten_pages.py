"""What Baseten's training jobs and Loops share: file listings (``page_size``/``page_token``), and
how a checkpoint list entry off the schema is kept."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..api import ApiClient
from ..errors import FileError, MalformedResponseError
from ..models import CheckpointFile, CheckpointFilesPage, Unreadable
from .base import PageRef, Relisted, RemoteFile, UnreadableCheckpoint


async def file_pages(
    api: ApiClient, listing: str, page_size: int, what: str
) -> AsyncIterator[tuple[PageRef, list[CheckpointFile | Unreadable]]]:
    """Every page of ``listing``, stopping on a null token or an empty page (NOTES.md).

    A token that does not move forward, or more entries than ``total_count`` announced, means
    the server would keep us listing forever: that is reported, not followed.
    """
    token = 0
    seen = 0
    while True:
        ref = PageRef(listing=listing, page_token=token, page_size=page_size)
        page = await read_page(api, ref, what)
        if not page.presigned_urls:
            return
        yield ref, page.presigned_urls
        seen += len(page.presigned_urls)
        if page.next_page_token is None:
            return
        if page.next_page_token <= token:
            raise MalformedResponseError(
                f"{what}: the listing's next_page_token {page.next_page_token} "
                f"does not advance past {token}"
            )
        if seen > page.total_count:
            raise MalformedResponseError(
                f"{what}: the listing goes on past its total_count of {page.total_count}"
            )
        token = page.next_page_token


async def read_page(api: ApiClient, ref: PageRef, what: str) -> CheckpointFilesPage:
    return await api.get(
        ref.listing,
        CheckpointFilesPage,
        what=what,
        params={"page_size": ref.page_size, "page_token": ref.page_token},
    )


async def relist(
    api: ApiClient, ref: PageRef, what: str, relative_file_name: str, node_rank: int
) -> Relisted:
    """One entry as listed now: its own page first, the whole listing if it moved."""

    def find(entries: list[CheckpointFile | Unreadable]) -> Relisted | None:
        for entry in entries:
            if (
                isinstance(entry, CheckpointFile)
                and entry.relative_file_name == relative_file_name
                and entry.node_rank == node_rank
            ):
                return Relisted(entry.url, entry.size_bytes, entry.last_modified)
        return None

    found = find((await read_page(api, ref, what)).presigned_urls)
    if found is not None:
        return found
    async for _, entries in file_pages(api, ref.listing, ref.page_size, what):
        found = find(entries)
        if found is not None:
            return found
    raise FileError(f"{relative_file_name} (rank {node_rank}) is no longer listed")


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
