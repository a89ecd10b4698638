"""A sync run: a producer walks the listing into a bounded queue, a pool of workers fetches.

The producer decides, file by file, whether the mirror already holds it (`plan.is_current`), so
only files to fetch enter the queue. The queue is bounded, so memory stays flat however long
the listing is, and the first download starts while the listing is still being walked. A run the
queue holds up may walk the listing a second time beside it, only to count the bytes to come, for
a progress display's total (`_count_ahead`).
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable, Mapping
from contextlib import aclosing, closing
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Literal

import anyio

from .errors import (
    ApiError,
    FileError,
    LocalIOError,
    TransientError,
    UnsafePathError,
    UsageError,
    most_severe,
)
from .filesystem import Places
from .layout import STATE_DIR, checkpoint_path, mirror_path, nameable
from .lock import LOCK_NAME, LockSeen, mirror_lock
from .manifest import Manifest, refuse_a_directory_that_refuses_writes
from .net import NetSettings
from .plan import (
    FileFilter,
    Recorded,
    Selection,
    Tally,
    check_files_listed,
    check_listed_size,
    check_listed_url,
    is_current,
    walked_whole,
)
from .progress import Listing, Stats, Taken, counted_files
from .prune import Going, Pruner, deletions, held_back, kept
from .sources.base import Checkpoint, RemoteFile, Source, UnreadableEntry
from .transfer import (
    Transfers,
    TransferSettings,
    prepare_staging_area,
    refuse_a_staging_area_that_cannot_serve,
)
from .wire import HttpClient

MANIFEST_NAME = "manifest.sqlite3"
# A killed run fetches again what it finished since its last commit: this bounds that loss to
# a fraction of a second of transfer, for a handful of cheap WAL commits per second.
COMMIT_SECONDS = 0.2


@dataclass(frozen=True)
class SyncOptions:
    dest: Path
    concurrency: int = 16
    files: FileFilter = field(default_factory=FileFilter)
    dry_run: bool = False
    # Re-read each file the manifest vouches for, and fetch again those whose bytes changed.
    verify: bool = False
    # Delete the mirrored files of checkpoints removed upstream (`prune`), unless more than
    # max_delete would go.
    delete: bool = False
    max_delete: int | None = None
    wait_lock: bool = False
    # With wait_lock: give up (exit 5) once the wait has lasted this many seconds (None: never).
    wait_lock_timeout: float | None = None
    # The lock file as found before the checkpoint list was read: None, not looked at (then
    # only a wait for the lock, or a lock file this run made, tells that another run may have
    # mirrored since: `lock.held_since`).
    lock_seen: LockSeen | None = None
    # Whether the listing shows every file of the selection: a bench trial's stops at its byte
    # budget, before later ranks show, so there only asking for no listed rank at all is exit 4.
    complete_listing: bool = True
    # Once the queue holds the planning up, walk the listing again ahead of it, only to count
    # the bytes of its files: a progress display's total before the listing has been planned
    # (`progress.bytes_total`), at the cost of a second read of the listing's pages.
    count_ahead: bool = False
    transfer: TransferSettings = field(default_factory=TransferSettings)
    net: NetSettings = field(default_factory=NetSettings)


@dataclass(frozen=True)
class _Job:
    file: RemoteFile
    relative: str  # under DEST
    checkpoint: str  # "<run>/<checkpoint>", as `Stats.taken` names it
    replaces: bool  # the manifest records an older file there
    check: bool  # the mirror holds it: fetched only if its bytes no longer match (--verify)


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    action: Literal["fetch", "skip", "check", "delete"]


def manifest_path(dest: Path) -> Path:
    return dest / STATE_DIR / MANIFEST_NAME


def lock_path(dest: Path) -> Path:
    return dest / STATE_DIR / LOCK_NAME


async def sync(
    source: Source,
    selection: Selection,
    http: HttpClient,
    options: SyncOptions,
    stats: Stats,
    on_plan: Callable[[PlannedFile], None] | None = None,
) -> None:
    """Mirror the selected checkpoints into ``options.dest``; failures are counted in ``stats``.

    Raises only for what stops the whole run (auth, lock, disk full...): a file's own failure is
    recorded and the others go on.
    """
    stats.taken = {
        f"{c.run}/{c.name}": Taken(c.key, _directory(options.dest, c), c.step, c.metrics)
        for c in selection.checkpoints
    }
    stats.syncing_left_out = [f"{c.run}/{c.name}" for c in selection.syncing]
    stats.status_left_out = [(f"{c.run}/{c.name}", c.status) for c in selection.other_status]
    stats.passed_over = [(c.where, c.problem) for c in selection.passed_over]
    if options.dry_run:
        _refuse_what_is_no_directory(options.dest)
        refuse_a_staging_area_that_cannot_serve(options.dest)
        if options.delete:
            await _delete_removed(source.listed_whole(), options, stats, on_plan)
        manifest = Manifest(manifest_path(options.dest), read_only=True)
        try:
            _note_kept(source, options, manifest, stats)
            await _produce(source, selection, options, manifest, stats, on_plan, None)
        finally:
            manifest.close()
        return

    def waiting(holder: str) -> None:
        stats.waiting_for = holder

    async with mirror_lock(
        options.dest / STATE_DIR,
        wait=options.wait_lock,
        wait_timeout=options.wait_lock_timeout,
        on_wait=waiting,
        durable=options.transfer.fsync,
        seen=options.lock_seen,
    ) as held_since:
        if stats.waiting_for is not None:
            # Time and rate count from here: the wait is the other run's, not this one's.
            stats.waiting_for, stats.started = None, time.monotonic()
        prepare_staging_area(options.dest, fsync=options.transfer.fsync)
        if held_since:
            # The list read before may lack checkpoints another run mirrored since (it waited
            # for it, or was held up): with --delete they would go as removed upstream, and
            # their parts would be dropped. What is removed upstream is told by a list read now.
            await source.checkpoints()
        if options.delete:
            # First: the room they hold may be what the new checkpoints need, or, on a disk
            # another program filled, what opening the manifest to be written needs. Nothing
            # but the checkpoint list, read whole already, decides what goes.
            await _delete_removed(source.listed_whole(), options, stats, on_plan)
        manifest = Manifest(
            manifest_path(options.dest),
            durable=options.transfer.fsync,
            batch_seconds=COMMIT_SECONDS,
        )
        try:
            _note_kept(source, options, manifest, stats)
            await _run(source, selection, http, options, manifest, stats, on_plan)
        finally:
            manifest.close()


def _note_kept(source: Source, options: SyncOptions, manifest: Manifest, stats: Stats) -> None:
    """Without ``--delete``, the checkpoints removed upstream that the mirror keeps: a cron
    mirror's summary tells them (`prune.kept`), or its user would never learn of them."""
    if not options.delete:
        pruner = Pruner(str(options.dest))
        stats.removed_upstream_kept = kept(manifest, options.files, source.listed_whole(), pruner)


def _directory(dest: Path, checkpoint: Checkpoint) -> str | None:
    """Where ``checkpoint``'s node ranks land: what a script restoring it hands on; None where
    its name cannot be a directory (its files fail, saying why)."""
    try:
        return f"{dest}/{nameable(checkpoint_path(checkpoint.run, checkpoint.name))}"
    except UnsafePathError:
        return None


def _refuse_what_is_no_directory(dest: Path) -> None:
    """For a dry run, which creates nothing: `LocalIOError` where the real run would stop, at a
    DEST that is not a directory (a file, a dangling symlink) or lies under one."""
    existing = dest
    # lexists, not exists: a dangling symlink is there, and the real run cannot mkdir through it.
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LocalIOError(f"cannot mirror into {dest}: {existing} is not a directory")


async def _run(
    source: Source,
    selection: Selection,
    http: HttpClient,
    options: SyncOptions,
    manifest: Manifest,
    stats: Stats,
    on_plan: Callable[[PlannedFile], None] | None,
) -> None:
    transfers = Transfers(
        http,
        options.dest,
        manifest,
        source,
        # asyncio's own: anyio's CapacityLimiter took 7% of the CPU of a first sync of 100,000
        # small files (a shielded checkpoint and task bookkeeping on every acquire).
        asyncio.Semaphore(options.concurrency),
        stats,
        replace(options.transfer, resume=False) if options.verify else options.transfer,
    )
    jobs = _Jobs(options.concurrency)
    listing_failed: list[ApiError | TransientError | UsageError] = []
    untold: list[set[tuple[str, str | None]]] = []
    stop = _Stop()
    counting = anyio.CancelScope()

    async def produce() -> None:
        with stop.listing:
            try:
                untold.append(
                    await _produce(source, selection, options, manifest, stats, on_plan, jobs)
                )
            except (ApiError, TransientError, UsageError) as exc:
                # The files already queued are good: let them land, then report the listing (a
                # later page the API redirected included: the key goes to no other host).
                listing_failed.append(exc)
                stats.end_listing(Listing.FAILED)
            finally:
                counting.cancel()  # planned whole, or not at all: a count tells no more
        if stop.listing.cancelled_caught:
            stats.end_listing(Listing.STOPPED)

    async def count() -> None:
        with counting:
            await jobs.held_up.wait()  # a listing never held up is planned soon enough
            await _count_ahead(source, selection, options.files, stats)

    cancelled: BaseException | None = None
    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_commit_periodically, manifest)
            outer.start_soon(transfers.record_reached_periodically)
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                # --verify fetches only the files it finds damaged: the listing's bytes say
                # nothing of how many those are.
                if options.count_ahead and not options.verify:
                    tg.start_soon(count)
                for _ in range(options.concurrency):
                    tg.start_soon(_work, jobs, transfers, stats, stop)
            outer.cancel_scope.cancel()
    except ExceptionGroup as group:
        raise most_severe(group) from None
    except anyio.get_cancelled_exc_class() as exc:
        cancelled = exc
    # Said of a stopped run too: a checkpoint all of whose files landed before the stop may
    # still lack one its listing did not show.
    moved = source.moved_while_listed()
    stats.listings_changed = sorted(f"{run}/{name}" for run, name in moved)
    for where in stats.listings_changed:
        stats.unsure[where] = "its file listing kept changing while it was read"
    for c in selection.checkpoints:
        if untold and (c.run, None) in untold[0]:
            where = f"{c.run}/{c.name}"
            stats.unsure.setdefault(
                where, "an unreadable entry of its run's listing told no checkpoint"
            )
    # Stopped from outside (a signal), the run still raises an error met before (a listing that
    # failed while the files it listed landed) or meanwhile (a manifest that could not record
    # how far a stopped part got): it is the caller's to say.
    if (error := stop.error or next(iter(listing_failed), None)) is not None:
        raise error
    if cancelled is not None:
        raise cancelled
    # A file whose entry did not tell its path may have parts, in its checkpoint (any of its
    # run's, where the entry did not tell which), as may the files of a checkpoint not there to
    # list: only their listing could say which. So may one that a listing changed while it was
    # walked did not show: a later walk tells. The other checkpoints' parts still go.
    selected = [(c.run, c.name) for c in selection.checkpoints]
    listed = walked_whole(selected, moved, untold[0]) if untold else set()
    transfers.drop_unlisted(listed, options.files, source.listed_whole())


async def _produce(
    source: Source,
    selection: Selection,
    options: SyncOptions,
    manifest: Manifest,
    stats: Stats,
    on_plan: Callable[[PlannedFile], None] | None,
    jobs: _Jobs | None,
) -> set[tuple[str, str | None]]:
    """Plan every listed file of the ranks and paths asked for, queueing those to fetch. Every
    such path, usable or not, is noted in the manifest (a file that fails this run is still
    there); the result holds the (run, checkpoint) of each entry that did not tell its path
    (`plan.walked_whole`)."""
    places = Places(options.dest)
    untold: set[tuple[str, str | None]] = set()
    tally = Tally(options.files)
    # Unlike a checkpoint still syncing, no rerun or flag will mirror it: it fails as one listed
    # entry, as a file whose listing entry is unreadable does (exit 1), once the run has started
    # (not in a run stopped by the lock), and the rest of the selection lands.
    for checkpoint in selection.unreadable:
        stats.files_listed += 1
        stats.fail(checkpoint.where, checkpoint.problem)
    try:
        # Closed however the walk ends (an error while planning, a stop): the pages asked for
        # ahead go then, not whenever whatever holds the walk (a traceback) lets go of it.
        async with aclosing(source.file_pages(selection.checkpoints)) as pages:
            async for page in pages:
                manifest.catch_up()  # a sync may have written it while the page was awaited
                for file in page:
                    path = file.name if isinstance(file, UnreadableEntry) else file.path
                    if not tally.takes(file.node_rank, path):
                        continue  # another node's, or a path left out: neither counted nor failed
                    stats.files_listed += 1
                    if isinstance(file, UnreadableEntry):
                        if None in (file.checkpoint, file.node_rank, file.name):
                            untold.add((file.run, file.checkpoint))
                        elif manifest.first_listing(file.where) is False:
                            stats.files_listed -= 1  # failed already (a listing walked again)
                            continue
                        stats.fail(file.where, file.problem)
                        continue
                    stats.bytes_walked += file.size
                    planned = _plan(file, options, manifest, stats, places)
                    if planned is None:
                        continue
                    relative, action, recorded = planned
                    if on_plan is not None:
                        on_plan(PlannedFile(relative, file.size, action))
                    if action != "skip" and jobs is not None:
                        where = f"{file.run}/{file.checkpoint}"
                        stats.queued_in[where] += 1
                        await jobs.put(
                            _Job(file, relative, where, recorded is not None, action == "check")
                        )
        stats.end_listing(Listing.DONE)
        tally.check(each=options.complete_listing, named=selection.named)
        check_files_listed(selection, tally)
    finally:
        if jobs is not None:
            jobs.close()
    return untold


async def _count_ahead(
    source: Source, selection: Selection, files: FileFilter, stats: Stats
) -> None:
    """Walk the listing only to count the bytes of the files ``files`` takes, as the planning
    walk counts them (`Stats.bytes_walked`): summed page by page, not kept, so memory stays flat
    however long the listing is. A listing that cannot be read leaves no count; the planning
    walk reports it."""
    counted = 0
    try:
        async with aclosing(source.file_pages(selection.checkpoints, counting=True)) as pages:
            async for page in pages:
                counted += sum(
                    f.size
                    for f in page
                    if isinstance(f, RemoteFile) and files.takes(f.node_rank, f.path)
                )
    except (ApiError, TransientError, UsageError):
        return
    stats.bytes_counted = counted


def _plan(
    file: RemoteFile, options: SyncOptions, manifest: Manifest, stats: Stats, places: Places
) -> tuple[str, Literal["fetch", "skip", "check"], Recorded | None] | None:
    """Where ``file`` goes, whether it must be fetched (or, with ``--verify``, read back to
    tell), and what the manifest has there; None if it is not to be mirrored."""
    try:
        relative = mirror_path(file)
    except FileError as exc:
        stats.fail(f"{file.run}/{file.checkpoint}/{file.node_rank}", str(exc))
        return None
    # Within the run, the hash tells one version of a file from another (a temporary table).
    first = manifest.first_listing(relative, hash((file.size, file.last_modified)))
    if first is None:
        # The same entry again, as pages read while files are added or removed list it (their
        # offsets shift): not another file.
        stats.files_listed -= 1
        return None
    if not first:
        stats.fail(relative, "listed more than once; only its first entry is mirrored")
        return None
    try:
        check_listed_size(file)
    except FileError as exc:
        stats.fail(relative, str(exc))
        return None
    recorded = manifest.recorded(relative)
    final = f"{options.dest}/{relative}"
    # A file the manifest does not know is fetched, whatever is on disk: no stat for it. A
    # directory swapped for a symlink: what is there is not the mirror's (and a fetch fails it
    # as unsafe).
    if (
        recorded is not None
        and is_current(file, recorded, local_size(final))
        and places.own(os.path.dirname(relative))
    ):
        if options.verify:
            stats.files_to_check += 1
            stats.bytes_to_check += file.size
            return relative, "check", recorded
        stats.files_skipped += 1
        stats.bytes_skipped += file.size
        return relative, "skip", recorded
    try:
        check_listed_url(file.url)
    except FileError as exc:
        stats.fail(relative, str(exc))
        return None
    stats.files_to_fetch += 1
    stats.bytes_to_fetch += file.size
    return relative, "fetch", recorded


async def _delete_removed(
    whole_lists: Mapping[str, frozenset[str]],
    options: SyncOptions,
    stats: Stats,
    on_plan: Callable[[PlannedFile], None] | None,
) -> None:
    """``--delete``, before the run opens the manifest: the mirrored files of checkpoints
    removed upstream go (a dry run only says which). What goes is read from the manifest, walked
    each time it is needed, so that no list of it is kept however much goes: read only, a first
    walk counts it against ``max_delete``, a second deletes it; opened to be written once they
    are gone, a third drops their records (`Pruner.finish`): on a disk another program filled,
    that needs room (SQLite's WAL index) which only they free; what else could keep it from
    being opened so (a directory that refuses its -wal) is asked before. A file that cannot be
    deleted fails alone; more files than ``max_delete`` hold every deletion back, as a
    failure."""
    path = manifest_path(options.dest)
    if not options.dry_run:
        refuse_a_directory_that_refuses_writes(path)
    pruner = Pruner(str(options.dest), fsync=options.transfer.fsync)
    manifest = Manifest(path, read_only=True)
    deleting = False
    reached = 0  # by the walk that deletes: those past it, never looked at, lost no file
    try:
        if not _count_deletions(whole_lists, options, manifest, pruner, stats):
            return
        deleting = not options.dry_run
        # No more than were counted against max_delete: a file that could not be looked at
        # then, and can now, is the next run's to count.
        allowed = stats.files_to_delete
        with closing(deletions(manifest, options.files, whole_lists)) as doomed_files:
            for doomed in doomed_files:
                # A signal is heeded between files: many of them, or a slow disk, take a while.
                await anyio.lowlevel.checkpoint()
                reached += 1
                try:
                    goes = pruner.goes(doomed)  # again: one changed since it was counted stays
                except FileError as exc:
                    stats.fail(doomed.path, str(exc))
                    continue
                if goes:
                    if allowed == 0:
                        continue
                    allowed -= 1
                    if on_plan is not None:
                        on_plan(PlannedFile(doomed.path, doomed.size, "delete"))
                if not deleting:
                    continue
                try:
                    pruner.delete(doomed, goes=goes)
                except FileError as exc:
                    stats.fail(doomed.path, str(exc))
                    continue
                if goes:
                    stats.files_deleted += 1
                    stats.bytes_deleted += doomed.size
    finally:
        manifest.close()
        if deleting:
            # Stopped or not: the files deleted so far leave no empty directory and no record.
            manifest = Manifest(path, durable=options.transfer.fsync)
            try:
                # In the order the deleting walked them: a run stopped early does not look at
                # every file it did not reach (a million, say) before it exits.
                with closing(deletions(manifest, options.files, whole_lists)) as recorded:
                    pruner.finish(manifest, islice(recorded, reached))
            finally:
                manifest.close()


def _count_deletions(
    whole_lists: Mapping[str, frozenset[str]],
    options: SyncOptions,
    manifest: Manifest,
    pruner: Pruner,
    stats: Stats,
) -> bool:
    """Count the recorded files to forget, and of them the files that go (are the mirror's).
    Whether any record is to be forgotten, with no more than ``max_delete`` files going. A file
    that cannot be looked at fails in the walk that deletes, which looks at each again: only
    one walk tells it."""
    stats.delete_held_back = held_back(manifest, whole_lists)
    records = 0
    going = Going()
    with closing(deletions(manifest, options.files, whole_lists)) as doomed_files:
        for doomed in doomed_files:
            records += 1
            if pruner.surely_goes(doomed):
                going.add(doomed)
    if options.max_delete is not None and going.files > options.max_delete:
        stats.fail(
            "--delete",
            f"{counted_files(going.files)} would go, more than --max-delete "
            f"{options.max_delete}: none was deleted",
        )
        return False
    stats.files_to_delete, stats.bytes_to_delete = going.files, going.bytes
    stats.removed_upstream = going.checkpoints
    return records > 0


class _Stop:
    """The first error that stops a run once the files in flight are done: the disk is full or
    cannot be written. Those files may still land (they hold their space); nothing new starts."""

    def __init__(self) -> None:
        self.error: LocalIOError | None = None
        self.listing = anyio.CancelScope()

    def stop(self, error: LocalIOError) -> None:
        self.error = self.error or error
        self.listing.cancel()


class _Jobs:
    """The bounded queue from the producer to the workers, and its end.

    asyncio's queue and semaphore: anyio's memory object stream took 11% of the CPU of a first
    sync of 100,000 small files. Each side yields once per job, as anyio's did: the loop then
    polls its sockets between files (without it, small files cost more system time).
    """

    def __init__(self, size: int) -> None:
        self._room = asyncio.Semaphore(size)
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()  # bounded by _room
        # Set once a job waited for room: the downloads are behind, and hold the listing up.
        self.held_up = asyncio.Event()

    async def put(self, job: _Job) -> None:
        await asyncio.sleep(0)
        if self._room.locked():
            self.held_up.set()
        await self._room.acquire()
        self._queue.put_nowait(job)

    async def get(self) -> _Job | None:
        """The next job; None once they are all taken and no more will come."""
        await asyncio.sleep(0)
        job = await self._queue.get()
        if job is None:
            self._queue.put_nowait(None)  # for the next worker
        else:
            self._room.release()
        return job

    def close(self) -> None:
        """No more jobs: the workers stop once they have taken the queued ones."""
        self._queue.put_nowait(None)


async def _work(jobs: _Jobs, transfers: Transfers, stats: Stats, stop: _Stop) -> None:
    while (job := await jobs.get()) is not None:
        if stop.error is not None:
            continue  # drained, not fetched
        try:
            if job.check and await _still_as_recorded(job, transfers, stats):
                stats.queued_in[job.checkpoint] -= 1
                continue
            await transfers.fetch(job.file, job.relative, replaces=job.replaces)
        except FileError as exc:
            stats.fail(job.relative, str(exc))
        except LocalIOError as exc:
            stop.stop(exc)
            continue
        else:
            stats.files_fetched += 1
            if job.check:  # a checked file is fetched only when found damaged
                stats.files_restored += 1
        stats.queued_in[job.checkpoint] -= 1  # a failed one is counted in `Stats.failed_in`


async def _still_as_recorded(job: _Job, transfers: Transfers, stats: Stats) -> bool:
    """``--verify``: whether the mirrored file still has the bytes it was verified with; if
    not, its record is dropped and it is counted as a file to fetch (`FileError` if its URL
    cannot be used)."""
    size = job.file.size
    intact = await transfers.still_recorded(job.file, job.relative)
    stats.files_checked += 1  # once read back: a run stopped in the middle did not check it
    if intact:
        stats.files_skipped += 1
        stats.bytes_skipped += size
        return True
    stats.files_damaged += 1
    # Forgotten now, whatever becomes of the fetch: a later run must not skip these bytes.
    transfers.forget(job.relative)
    stats.files_to_fetch += 1
    stats.bytes_to_fetch += size
    check_listed_url(job.file.url)  # not checked while the file looked current
    return False


async def _commit_periodically(manifest: Manifest) -> None:
    while True:
        await anyio.sleep(COMMIT_SECONDS)
        manifest.commit()


def local_size(path: str) -> int | None:
    """Size of a regular file at ``path``; None for a missing file, a symlink or a directory."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None
