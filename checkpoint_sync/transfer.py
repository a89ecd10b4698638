"""One file from presigned URL to final path: parts, positional writes, verification, publish.

A file is fetched into a staging file under ``DEST/.checkpoint-sync/staging`` (same filesystem,
so the final rename is atomic), reserved at full size where that pays (`filesystem.py`). Large
files are cut into parts fetched concurrently with ``Range`` requests; each finished part is
recorded in the manifest, and every second how far each part in flight got, so that a run
interrupted, even killed, costs the next little more than the bytes it did not write; a file
of one part is recorded so only once in flight for a second, or stopped (most finish sooner).
The file reaches its final path only after its length was checked and its xxh3-128 digest
computed (with the MD5 the listing gives, if it gives one: W&B): over the bytes as they were
written for a file that came as one stream, else by reading the assembled file back from disk.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import mmap
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urljoin

import anyio
import anyio.from_thread
import anyio.to_thread
import xxhash

from .errors import (
    CheckpointSyncError,
    DownloadDeniedError,
    FileError,
    IntegrityError,
    LocalIOError,
    TransientError,
    UnsafePathError,
    UrlExpiredError,
    most_severe,
)
from .filesystem import (
    Places,
    filesystem_named,
    fsync_directory,
    make_directories,
    preallocation_pays,
)
from .layout import STATE_DIR, mirror_path_parts, quoted, staging_name
from .lock import LOCK_NAME
from .manifest import SPACE_RESERVE, Manifest, VerifiedFile
from .net import retry_after_seconds, transient_status, url_problem
from .plan import (
    FileFilter,
    Part,
    parts_to_fetch,
    reach_to_record,
    split_parts,
    unlisted_parts_go,
)
from .progress import Stats, human_bytes
from .redact import redact_url
from .rereads import LISTED, FreshUrl, PageRereads
from .retry import RetryPolicy, retrying
from .sources.base import RemoteFile, Source
from .wire import HttpClient, Response

T = TypeVar("T")

# A multiple of the page size: mapping offsets must be.
HASH_WINDOW = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# A 416's: the object's length now (RFC 9110 §14.4, §15.5.17).
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
# Errors that no other file could escape either: the run stops.
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# Object URLs may redirect (S3's 307 to a regional endpoint, a CDN's 302 to its origin): only a
# Range header goes along. API URLs never are followed: their key would.
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The empty file a run renames out of the staging area at its start (`_rename_crosses`).
_RENAME_PROBE = ".rename-probe"
# How often the parts in flight have how far they got recorded: a run killed (SIGKILL, the OOM
# killer) costs the next about this much of each one's transfer, not whole parts. Each time is
# one transaction of at most --concurrency rows (and with --fsync a flush of each file being
# fetched, of bytes it must write anyway): a cost per second, whatever the rate.
REACHED_SECONDS = 1.0


@dataclass(frozen=True)
class TransferSettings:
    part_size: int = 64 << 20
    fsync: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Go on from the recorded parts of a file left in parts. Not with --verify: no digest vouches
    # for a part, and after a power loss its record may be on disk while its bytes are not.
    resume: bool = True


class _RangeIgnored(FileError):
    """The server answered a ranged request with the whole body."""


class _ObjectChanged(IntegrityError):
    """Parts of one file came from different versions of the object."""


class _CurrentUrl:
    """A file's presigned URL, refreshed once however many parts find it expired."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.generation = LISTED  # as `FreshUrl`'s
        self.reread = False
        self._lock: anyio.Lock | None = None  # made when needed: most URLs never expire

    def take(self, fresh: FreshUrl) -> None:
        self.url, self.generation, self.reread = fresh.url, fresh.generation, fresh.reread

    async def refresh(self, expired: str, fresh: Callable[[int], Awaitable[FreshUrl]]) -> None:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self.url == expired:
                self.take(await fresh(self.generation))


def staging_area(dest: Path) -> Path:
    """Where files are fetched into before they are published in the mirror at ``dest``."""
    return dest / STATE_DIR / "staging"


def prepare_staging_area(dest: Path, *, fsync: bool) -> None:
    """Make the staging area of the mirror at ``dest``, or stop the run (`LocalIOError`) where
    it cannot serve: before anything in the mirror is changed (`--delete`'s deletions), as a
    run that stops at its start must change nothing."""
    staging_dir = staging_area(dest)
    try:
        make_directories(staging_dir)
    except OSError as exc:  # every file is fetched into it: none could be
        raise LocalIOError(f"cannot create {quoted(staging_dir)}: {exc.strerror}") from exc
    _refuse_another_mount(staging_dir, dest)
    if fsync:
        # The staging area may have been made just now (the lock made the directories above
        # it): its entry lives in the state directory.
        for directory in (dest / STATE_DIR, staging_dir):
            _os_call(directory, partial(fsync_directory, str(directory)))


def refuse_a_staging_area_that_cannot_serve(dest: Path) -> None:
    """For a dry run, which makes nothing: `LocalIOError`, with the run's own message, where the
    run would stop at its start as `stat`s tell (the lock's directory or the staging area is
    there and no directory, or a symlink leading nowhere, which the run cannot make either; or
    the staging area is on another device than DEST). What only a write tells (a bind mount
    from DEST's own device, a directory that refuses files) is not checked."""
    state, staging_dir = dest / STATE_DIR, staging_area(dest)
    lock, staging = f"the lock {quoted(state / LOCK_NAME)}", quoted(staging_dir)
    for directory, made in ((state, lock), (staging_dir, staging)):
        try:
            if stat.S_ISDIR(os.stat(directory).st_mode):
                continue
        except OSError:
            if not os.path.islink(directory):
                return  # not there, for the run to make, or not to be looked into, as it says
        raise LocalIOError(f"cannot create {made}: {os.strerror(errno.ENOTDIR)}")
    _refuse_another_mount(staging_dir, dest, probe=False)


class Transfers:
    """Fetches files into one mirror, whose staging area `prepare_staging_area` made; shared by
    all workers of a run."""

    def __init__(
        self,
        http: HttpClient,
        dest: Path,
        manifest: Manifest,
        source: Source,
        connections: asyncio.Semaphore,
        stats: Stats,
        settings: TransferSettings,
    ) -> None:
        self._http = http
        self._dest = dest
        self._places = Places(dest)
        self._staging_dir = staging_area(dest)  # made by `prepare_staging_area`
        self._prepared_dirs: set[str] = set()
        self._in_flight: set[_Staged] = set()
        self._manifest = manifest
        self._source = source
        self._rereads = PageRereads(source)
        self._connections = connections
        self._stats = stats
        self._settings = settings
        # The periodic record's flush (--fsync) has a thread of its own: in the pool's, it
        # would wait behind the splices of large parts, which may hold every place for
        # minutes (40 connections splicing: anyio's default), and no part would be recorded.
        self._record_flusher = anyio.CapacityLimiter(1)
        self._reserves = preallocation_pays(str(self._staging_dir))
        # The files that may have a record of parts although fetched as one part: left by an
        # earlier run, or recorded in flight by this one. Only theirs is looked up, not every
        # small file's.
        self._may_be_staged = set(self._manifest.staged_under(""))
        # Periodic records of how far parts got so far: a one-part file is recorded once it was
        # in flight at two in a row (`_Staged.since`).
        self._rounds = 0
        self._sweep_staging()
        stats.bytes_landing = self._landing

    def _landing(self) -> int:
        """Bytes the bodies under way have received and not yet handed on, or moved into their
        files by a splice so far (`Stats`)."""
        return sum(
            state.spliced + state.held()
            for staged in self._in_flight
            for _, state in staged.parts.values()
        )

    def _may_have_record(self, key: str, multipart: bool) -> bool:
        """Whether the manifest may hold a record of parts of ``key``: looked up only then."""
        return multipart or key in self._may_be_staged

    def _sweep_staging(self) -> None:
        """Remove the staging files that no record of parts leads to, before this run stages
        anything: a run killed while it fetched a file in one piece before it was recorded, or
        between dropping a record and its file, left them, and no run would resume them.
        Before, one stayed until a run fetched the same file again: for ever, were it gone."""
        kept = {staging_name(path) for path in self._may_be_staged}
        # Best effort, as for any staging file dropped: only their room is at stake.
        with suppress(OSError), os.scandir(self._staging_dir) as entries:
            for entry in entries:
                if entry.name not in kept and entry.is_file(follow_symlinks=False):
                    with suppress(OSError):
                        os.unlink(entry.path)

    async def fetch(self, file: RemoteFile, relative: str, *, replaces: bool = True) -> None:
        """Mirror ``file`` at ``DEST/relative``; `FileError` if this file failed.

        ``replaces``: the manifest may hold a record of an older file at that path.
        """
        final = f"{self._dest}/{relative}"
        if replaces:
            _refuse_a_directory_in_place(final, relative)
        self._prepare_parent(os.path.dirname(relative))
        staging = f"{self._staging_dir}/{staging_name(relative)}"
        key = relative
        part_size = self._settings.part_size
        parts = split_parts(file.size, part_size)
        multipart = len(parts) > 1
        todo, etag, resumed = parts, None, 0
        if self._settings.resume and self._may_have_record(key, multipart):
            staged = self._manifest.staged(key, _size_of(staging))
            todo = parts_to_fetch(file, part_size, staged)
            if resumed := file.size - sum(part.length for part in todo):
                # The bytes kept came from that version of the object: the others must too.
                etag = staged.etag if staged is not None else None
        reserve = multipart and self._reserves
        if reserve:
            # The staging file holds all its space (reserved now, or by the run that left parts
            # to keep), and the disk shows it as used.
            needed, unseen = (0 if resumed else file.size), 0
        else:
            needed = unseen = sum(part.length for part in todo)
        self._check_space(needed, final)
        try:
            digest = await self._fetch_staged(
                file,
                key,
                staging,
                todo,
                multipart=multipart,
                resumed=resumed,
                reserve=reserve,
                unseen=unseen,
                etag=etag,
            )
            if replaces:
                # The old record must not outlive the old file: a crash right after the rename
                # would leave it describing bytes that are no longer there.
                self._manifest.forget(key)
            self._publish(staging, final)
            self._manifest.record_verified(
                VerifiedFile(
                    path=key,
                    source=self._source.name,
                    run=file.run,
                    checkpoint=file.checkpoint,
                    node_rank=file.node_rank,
                    size=file.size,
                    last_modified=file.last_modified,
                    digest=digest,
                )
            )
        except BaseException:
            self._discard_useless_staging(key, staging, multipart)
            raise
        self._stats.bytes_published += file.size

    async def _fetch_staged(
        self,
        file: RemoteFile,
        key: str,
        staging: str,
        todo: list[Part],
        *,
        multipart: bool,
        resumed: int,
        reserve: bool,
        unseen: int,
        etag: str | None,
    ) -> str:
        """Fetch ``todo`` into the staging file and verify it whole; its xxh3 digest.
        ``resumed``: the bytes of the parts an earlier run left, kept."""
        # The mode the published file keeps: 0o666 before the umask, as `cp` and `rclone` make.
        fd = _os_call(staging, lambda: os.open(staging, os.O_RDWR | os.O_CREAT, 0o666))
        unstaged = None if multipart or resumed else file
        staged = _Staged(fd, key, unseen, etag, resumed, unstaged)
        self._in_flight.add(staged)
        # Counted as done (by the progress and its ETA too) only once the space was there and
        # the staging file opened; taken back if the parts are dropped (`_drop_parts`).
        if resumed:
            self._stats.files_resumed += 1
            self._stats.bytes_resumed += resumed
        try:
            if not resumed:
                if multipart:
                    if self._settings.fsync:  # its parts are recorded: its name must be durable
                        _os_call(staging, lambda: fsync_directory(str(self._staging_dir)))
                    self._manifest.begin_staging(
                        key, file.size, file.last_modified, self._settings.part_size
                    )
                elif key in self._may_be_staged:
                    # A record left of it, not taken up: gone before its staging file is reset.
                    self._manifest.drop_staging(key)
                    self._manifest.commit()
                _prepare_staging(fd, file.size if multipart else 0, staging, reserve=reserve)
            try:
                digests = await self._fetch_parts(staged, file, todo)
            except _ObjectChanged:
                self._drop_parts(staged)  # parts of the old version must not be kept
                raise
            if digests is not None:
                _check_length(fd, file.size)
            else:
                digests = await anyio.to_thread.run_sync(_read_back, fd, file)
            try:
                digest = digests.verified()
            except IntegrityError:
                # Some part is wrong and nothing tells which: the next attempt starts over.
                self._drop_parts(staged)
                raise
            if self._settings.fsync:
                # In a thread, as a part's is: flushing a large file takes seconds of the disk,
                # which on the loop would stall every other transfer.
                await anyio.to_thread.run_sync(_os_call, staging, partial(os.fsync, fd))
            return digest
        finally:
            os.close(fd)
            self._in_flight.discard(staged)

    def _drop_parts(self, staged: _Staged) -> None:
        """Forget the parts recorded of ``staged``: those an earlier run left were not kept
        after all, and count as resumed no more."""
        self._manifest.drop_staging(staged.key)
        if staged.resumed:
            self._stats.files_resumed -= 1
            self._stats.bytes_resumed -= staged.resumed
            staged.resumed = 0

    async def still_recorded(self, file: RemoteFile, relative: str) -> bool:
        """Whether the mirrored file at ``relative`` still has the xxh3 digest recorded when it
        was verified (and the listing's MD5, if it gives one); a file that cannot be read has
        not."""
        recorded = self._manifest.digest(relative)
        try:
            # Not through a symlink; and a FIFO swapped in since the plan must not block the loop.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            fd = os.open(f"{self._dest}/{relative}", flags)
        except OSError:
            return False
        try:
            digests = await anyio.to_thread.run_sync(_read_digests, fd, file)
            return digests.verified() == recorded
        except (OSError, IntegrityError):
            return False
        finally:
            os.close(fd)

    def forget(self, relative: str) -> None:
        """Stop vouching for the mirrored file at ``relative`` (committed): its bytes are not
        the ones recorded."""
        self._manifest.forget(relative)

    def drop_unlisted(
        self,
        checkpoints: set[tuple[str, str]],
        files: FileFilter,
        whole_lists: Mapping[str, frozenset[str]],
    ) -> None:
        """After a complete listing: forget the files left in parts that it no longer shows
        (removed upstream), in the checkpoints, ranks and paths it took or in checkpoints gone
        from a checkpoint list read whole (`plan.unlisted_parts_go`). Their staging files,
        reserved at full size, would otherwise stay for ever."""
        for key in self._manifest.staged_not_listed():
            if unlisted_parts_go(mirror_path_parts(key), checkpoints, files, whole_lists):
                self._manifest.drop_staging(key)  # first: no record vouches for a missing file
                with suppress(OSError):
                    os.unlink(f"{self._staging_dir}/{staging_name(key)}")
        self._manifest.commit()

    def _discard_useless_staging(self, key: str, staging: str, multipart: bool) -> None:
        """After a failure, remove a staging file that no record lets a later run resume from
        (a one-part file's not recorded in flight, or one whose parts were dropped): it would
        only hold disk space."""
        if self._may_have_record(key, multipart) and self._manifest.staged(key, None) is not None:
            return
        with suppress(OSError):
            os.unlink(staging)

    def _check_space(self, size: int, final: str) -> None:
        """Stop with a clear message before the disk is full, not with ENOSPC half way."""
        try:
            info = os.statvfs(self._staging_dir)
        except OSError as exc:
            raise _local_error(exc, self._staging_dir) from exc
        if info.f_blocks == 0:
            return  # no capacity reported (ramfs, some FUSE mounts): nothing to check against
        free = info.f_bavail * info.f_frsize - SPACE_RESERVE
        unseen = sum(staged.unseen for staged in self._in_flight)
        if size > free - unseen:
            promised = f", {human_bytes(unseen)} of it to files being fetched" if unseen else ""
            raise LocalIOError(
                f"not enough space for {quoted(final)}: it needs {human_bytes(size)}, "
                f"{human_bytes(max(free, 0))} is free on {quoted(self._dest)}{promised} "
                f"(keeping {human_bytes(SPACE_RESERVE)} for the manifest)"
            )

    def _prepare_parent(self, directory: str) -> None:
        """Create the file's ``directory`` (relative to DEST), refusing one that a symlink
        leads elsewhere."""
        if directory in self._prepared_dirs:
            return  # the mirror is ours while we hold its lock: one check per directory
        # Checked before mkdir too, which would follow the symlink and create directories there.
        existing = directory
        while existing and not os.path.lexists(f"{self._dest}/{existing}"):
            existing = os.path.dirname(existing)
        self._refuse_elsewhere(existing)
        parent = f"{self._dest}/{directory}"
        self._in_mirror_call(parent, partial(make_directories, parent))
        self._refuse_elsewhere(directory)
        if self._settings.fsync:
            # Each directory made just now is an entry in the one above it, down from the one
            # that was there. Walked by relative names: `dirname` of an absolute path stops at
            # "//" under a DEST of "/", never reaching it.
            made = directory
            while made != existing:
                made = os.path.dirname(made)
                above = f"{self._dest}/{made}" if made else str(self._dest)
                self._in_mirror_call(above, partial(fsync_directory, above))
        self._prepared_dirs.add(directory)

    def _refuse_elsewhere(self, directory: str) -> None:
        if elsewhere := self._places.elsewhere(directory):
            raise UnsafePathError(f"{quoted(f'{self._dest}/{directory}')} {elsewhere}")

    def _in_mirror_call(self, path: str, call: Callable[[], T]) -> T:
        """An OS call on a file's own place in the mirror: a directory below DEST that refuses
        writes (its permissions, an immutable flag) fails the files in it, not the whole run;
        DEST itself refusing stops the run, as every file would fail."""
        try:
            return call()
        except OSError as exc:
            refused_by = os.path.dirname(str(exc.filename2 or exc.filename or path))
            if exc.errno in (errno.EACCES, errno.EPERM) and refused_by != str(self._dest):
                raise FileError(f"cannot write {quoted(path)}: {exc.strerror}") from exc
            raise _local_error(exc, path) from exc

    def _publish(self, staging: str, final: str) -> None:
        self._in_mirror_call(final, lambda: os.replace(staging, final))
        if self._settings.fsync:
            _os_call(final, lambda: fsync_directory(os.path.dirname(final)))

    async def _fetch_parts(
        self, staged: _Staged, file: RemoteFile, parts: list[Part]
    ) -> _Digests | None:
        """Fetch ``parts``; the file's digests if it came as one stream, hashed on the way."""
        if not parts or file.size == 0:
            return None
        url = _CurrentUrl(file.url)
        if (fresh := self._rereads.taken(file)) is not None:
            # Its page was read again for another file's expired URL: its own URL, signed with
            # that one, has likely expired too.
            self._stats.url_refreshes += 1
            url.take(fresh)
        whole = Part(0, 0, file.size)
        if parts == [whole]:
            return await self._fetch_part(staged, file, whole, url)
        try:
            return await self._fetch_concurrently(staged, file, parts, url)
        except _RangeIgnored:
            # Fetch it as one stream instead, and forget parts that will be written over.
            self._drop_parts(staged)
            if file.size <= self._settings.part_size:
                # A file of one part, resumed: recorded again as it comes, as if fetched afresh.
                staged.unstaged = file
            return await self._fetch_part(staged, file, whole, url)

    async def _fetch_concurrently(
        self, staged: _Staged, file: RemoteFile, parts: list[Part], url: _CurrentUrl
    ) -> _Digests | None:
        """The parts side by side; the digests if the server sent the whole file instead."""
        first = _PartState.of(parts[0], file)
        try:
            async with anyio.create_task_group() as tg:
                # The first part's answer tells whether Range is honoured: the rest go out once
                # it was taken (a 206 as asked for, or a 200 as the whole file), not merely once
                # it came. Woken by a first part that failed (a 200 to a later part), this would
                # start them before the group's cancellation reached it, and one of them would
                # send its request on a connection left idle. A failure cancels this wait.
                first_taken = anyio.Event()
                tg.start_soon(self._fetch_part, staged, file, parts[0], url, first_taken, first)
                await first_taken.wait()
                if first.digests is None:
                    for part in parts[1:]:
                        tg.start_soon(self._fetch_part, staged, file, part, url)
        except ExceptionGroup as group:
            raise most_severe(group) from None
        return first.digests

    async def _fetch_part(
        self,
        staged: _Staged,
        file: RemoteFile,
        part: Part,
        url: _CurrentUrl,
        taken: anyio.Event | None = None,
        state: _PartState | None = None,
    ) -> _Digests | None:
        """Fetch one part, retrying; the digests when the part is (or became) the whole file.
        ``taken`` is set once an answer's head was taken, before its body is read."""
        state = state or _PartState.of(part, file)

        async def attempt() -> None:
            # A server may answer with fewer bytes than asked for (RFC 9110 §14.4; CDNs and
            # gateways cap range answers): they are kept and the rest is asked for at once, in
            # the same attempt. This ends: an answer that is no error leaves ``state.offset``
            # further on (`content_range_end` refuses an empty range and one that starts
            # elsewhere, and a body that stops short of its range is a `TransientError`).
            # An expired URL is refreshed within the attempt, not by starting the retries
            # afresh: an object that keeps failing while its URLs keep expiring still runs out
            # of them.
            while True:
                listed = url.url
                try:
                    while state.offset < state.end:
                        await self._request_range(staged, file, part, listed, state, taken)
                    return
                except UrlExpiredError as exc:
                    if state.relisted and not state.url_worked:
                        # The URL we listed a moment ago, for this very request, is refused too.
                        raise DownloadDeniedError(
                            f"access denied even with a freshly listed URL ({exc})"
                        ) from exc
                    if listed == url.url:
                        self._stats.url_refreshes += 1
                        await url.refresh(listed, partial(self._rereads.fresh, file))
                        state.relisted, state.url_worked = url.reread, False

        async with self._connections:
            # A one-part file is in flight from here: the wait for a connection (another file's
            # parts may hold them all for minutes) is no transfer to resume.
            staged.since = self._rounds
            staged.parts[part.index] = (part, state)  # its progress is recorded meanwhile
            try:
                # Progress in whole MiB: a server that sends a few bytes before every drop runs
                # out of attempts, as one that sends none does.
                await retrying(
                    self._settings.retry,
                    attempt,
                    lambda: state.offset >> 20,
                    partial(self._retried, state),
                )
            except TransientError as exc:
                # Out of retries: this file fails, the run goes on.
                await self._keep_reached(staged, part, state)
                retried = "after retrying" if state.retried else "without retrying"
                raise FileError(f"gave up {retried}: {exc}") from exc
            except anyio.get_cancelled_exc_class():
                await self._keep_reached(staged, part, state)
                raise
            finally:
                del staged.parts[part.index]
        if state.digests is not None:
            return state.digests  # made durable with the whole file, before it is published
        if self._settings.fsync:  # durable before the manifest vouches for it
            await self._flush(staged)
        self._manifest.part_done(staged.key, part.index)
        return None

    def _retried(self, state: _PartState) -> None:
        """A request that failed is asked again (not one given up on: it is no retry)."""
        state.retried += 1
        self._stats.retries += 1

    async def _flush(self, staged: _Staged) -> None:
        """Make the bytes written into ``staged`` durable, and its name if it is to be recorded
        for the first time (a one-part file): in a thread, as flushing a large file takes
        seconds of the disk, which on the loop would stall every other transfer."""
        staging = f"{self._staging_dir}/{staging_name(staged.key)}"
        directory = str(self._staging_dir) if staged.unstaged is not None else None

        def flush() -> None:
            _os_call(staging, partial(os.fdatasync, staged.fd))
            if directory is not None:
                _os_call(directory, partial(fsync_directory, directory))

        await anyio.to_thread.run_sync(flush)

    async def _keep_reached(self, staged: _Staged, part: Part, state: _PartState) -> None:
        """Record how far a part got, stopped or out of retries, so that the next run asks
        only for the rest: as a retry of this run would, it trusts the bytes written (another
        failure, such as bytes not of the range asked for, records nothing, nor did the
        periodic records: `_PartState.written`). A one-part file gets its record of parts now,
        however long it was in flight."""
        reached = state.to_record(part)
        if reached is None:
            return
        if self._settings.fsync:
            # The record must not vouch for bytes a power loss could take; the flush is waited
            # for even by a stop, as the file is closed next.
            with anyio.CancelScope(shield=True):
                await self._flush(staged)
        self._record_reached(staged, part, state, reached)

    def _record_reached(self, staged: _Staged, part: Part, state: _PartState, reached: int) -> None:
        if (file := staged.unstaged) is not None:
            # A one-part file's record of parts is made only now: most finish within a second.
            part_size = self._settings.part_size
            self._manifest.stage(staged.key, file.size, file.last_modified, part_size)
            if staged.etag is not None:
                self._manifest.staging_etag(staged.key, staged.etag)
            self._may_be_staged.add(staged.key)
            staged.unstaged = None
        self._manifest.part_reached(staged.key, part.index, reached)
        state.recorded = reached

    async def record_reached_periodically(self) -> None:
        """Every `REACHED_SECONDS`, record how far each part in flight got, in one transaction:
        a run killed then leaves the next only the rest of each to fetch. A part records the
        bytes in its file, not those its connection holds unwritten, nor those of an answer told
        no length while it is read (`_PartState.written`)."""
        while True:
            await anyio.sleep(REACHED_SECONDS)
            self._rounds += 1
            due = [
                (staged, part, state, reached, state.recorded)
                for staged in self._in_flight
                # A one-part file only once in flight for a second: most finish sooner.
                if staged.unstaged is None or self._rounds - staged.since > 1
                for part, state in staged.parts.values()
                if (reached := state.to_record(part)) is not None
            ]
            if self._settings.fsync and due:
                # No record may vouch for bytes a power loss could take: those written before
                # the flush began are durable after it.
                synced = await self._flushed({staged for staged, *_ in due})
                due = [entry for entry in due if entry[0] in synced]
            for staged, part, state, reached, recorded in due:
                # Else the part's stop recorded it meanwhile, or (after a flush) the file was
                # done with: a one-part file's record made now would outlive it.
                if state.recorded == recorded and staged in self._in_flight:
                    self._record_reached(staged, part, state, reached)
            if due:
                self._manifest.commit()

    async def _flushed(self, files: set[_Staged]) -> set[_Staged]:
        """Those of ``files`` whose written bytes were made durable, in a worker thread of the
        periodic record's own. A copy of each descriptor is flushed, as a file may finish and
        close its own meanwhile; one that cannot be flushed now is recorded next time (or its
        part's own flush says why)."""
        copies: dict[_Staged, int] = {}
        # The names of files recorded for the first time (one-part ones) must last too.
        named = any(staged.unstaged is not None for staged in files)
        try:
            for staged in files:
                with suppress(OSError):  # out of descriptors, say
                    copies[staged] = os.dup(staged.fd)
            return await anyio.to_thread.run_sync(
                _data_synced,
                copies,
                str(self._staging_dir) if named else None,
                limiter=self._record_flusher,
            )
        finally:
            for fd in copies.values():
                os.close(fd)

    async def _request_range(
        self,
        staged: _Staged,
        file: RemoteFile,
        part: Part,
        url: str,
        state: _PartState,
        taken: anyio.Event | None,
    ) -> None:
        """One request for the part's bytes from ``state.offset`` on, its redirects followed."""
        headers = {"Range": f"bytes={state.offset}-{state.end - 1}"}
        requested = time.monotonic()
        # A loop, not a context manager of its own: that layer cost 3% of the CPU on small files.
        for _ in range(MAX_REDIRECTS + 1):
            async with self._http.request(url, headers) as resp:
                location = resp.headers.get("location") if resp.status in _REDIRECTS else None
                if location is None:
                    answered_at = time.monotonic()
                    started_at, stop = await self._take_answer(
                        resp, staged, file, part, url, state, taken
                    )
                    break
            try:
                url = urljoin(url, location)
            except ValueError as exc:  # urljoin parses it: an unbalanced "[" in its host, say
                raise FileError(
                    f"redirected to {redact_url(location)}, which is not a valid URL"
                ) from exc
            if problem := url_problem(url):
                raise FileError(f"redirected to {redact_url(url)}, which is {problem}")
        else:
            raise FileError(f"more than {MAX_REDIRECTS} redirects, the last to {redact_url(url)}")
        if state.offset != stop:
            raise TransientError(f"body ended at byte {state.offset}, expected {stop}")
        self._stats.timed(
            answered_at - requested, state.offset - started_at, time.monotonic() - answered_at
        )

    async def _take_answer(
        self,
        resp: Response,
        staged: _Staged,
        file: RemoteFile,
        part: Part,
        url: str,
        state: _PartState,
        taken: anyio.Event | None,
    ) -> tuple[int, int]:
        """Write the body of a part's (final) answer at its place; the offsets it started at and
        should end at."""
        state.url_worked = state.url_worked or resp.status != 403
        if resp.status == 200:
            if part.start != 0:
                raise _RangeIgnored(f"{redact_url(url)} ignores Range requests")
            # The whole body, whatever was asked: take it as the file, from byte 0.
            state.take_whole(file)
            stop = state.end
        elif resp.status == 206:
            content_range = resp.headers.get("content-range")
            stop = content_range_end(content_range, state.offset, state.end, file.size)
        else:
            await _raise_for_file_status(resp, url, file.size)
        expected = stop - state.offset
        if refused := refused_answer(resp.status, resp.headers, resp.length, expected, url):
            raise refused
        # Told no length before its body, a coded answer is judged by it: the object stored
        # coded if its bytes come to the length asked for, else coded on the way.
        coded = _compressed(resp.headers, url) if resp.length is None else None
        first = staged.same_object(resp.headers.get("etag"))
        if first is not None and part.length < file.size:
            # Recorded with the parts, for the run that resumes them (a one-part file's goes
            # with its record, if one is made: `_record_reached`).
            self._manifest.staging_etag(staged.key, first)
        if taken is not None:
            taken.set()
        started_at = state.offset
        # Told no length, an answer may yet prove longer than its range (not the bytes asked
        # for), or coded on the way: no record of how far the part got goes past its start
        # while it is read.
        state.unsure_from = started_at if resp.length is None else None
        writer = _PartWriter(staged, state, stop, self._stats, self._dest, coded)
        try:
            # A part hashed on the way cannot skip Python; the others may be spliced.
            state.held = resp.held
            await resp.stream_to(writer.take, writer if state.digests is None else None)
        except BaseException as exc:
            if coded is not None:
                # Its bytes are the object's only once they come to the length asked for: cut
                # short (or stopped), they may be a stream compressed on the way. Neither a
                # retry nor the record of how far the part got may go on from them.
                state.rewind(started_at, file)
            elif not isinstance(exc, IntegrityError):
                # Cut short or stopped, not longer than its range: its bytes are trusted, as a
                # retry trusts them.
                state.unsure_from = None
            raise
        finally:
            state.held = _nothing_held
        if coded is not None and state.offset != stop:
            raise coded  # not a body cut short: the same request would be answered the same way
        state.unsure_from = None
        return started_at, stop


class _PartWriter:
    """Writes an answer's body at its offset as it arrives, up to ``stop`` (where the range it
    answered with ends), hashing it if it is the whole file. Past ``stop``, the bytes of an
    answer whose head told a coding and no length fail it as ``coded``."""

    def __init__(
        self,
        staged: _Staged,
        state: _PartState,
        stop: int,
        stats: Stats,
        dest: Path,
        coded: FileError | None = None,
    ) -> None:
        self.fd = staged.fd
        self._staged = staged
        self._state = state
        self._stop = stop
        self._stats = stats
        self._dest = dest
        self._coded = coded

    @property
    def offset(self) -> int:
        return self._state.offset

    @property
    def room(self) -> int:
        return self._stop - self._state.offset

    def took(self, size: int) -> None:
        """``size`` bytes were spliced into the file at ``offset``."""
        self._stats.bytes_fetched += size
        self._state.offset += size
        self._state.spliced = 0
        self._staged.landed(size)

    def splicing(self, size: int) -> None:
        self._state.spliced = size

    def write_failed(self, error: OSError) -> CheckpointSyncError:
        return _local_error(error, self._dest, self._state.end - self._state.offset)

    def take(self, piece: memoryview) -> None:
        """Called on the event loop with each piece, which is only valid during the call."""
        size = len(piece)
        self._stats.bytes_fetched += size
        state = self._state
        if state.offset + size > self._stop:
            raise self._coded or IntegrityError(
                f"server sent more than the range it answered with, up to byte {self._stop - 1}"
            )
        # On the loop, not in a thread: a write into the page cache takes microseconds, and
        # handing each piece of a small body to a thread cost more CPU than it saved
        # (benchmarks/). A large part's body bypasses this (`wire.Response.stream_to`).
        try:
            written = os.pwrite(self.fd, piece, state.offset)
        except OSError as exc:
            raise _local_error(exc, self._dest, size) from exc
        if written != size:
            raise LocalIOError(f"short write under {self._dest}: disk full?")
        if state.digests is not None:
            state.digests.update(piece)
        state.offset += size
        self._staged.landed(size)


@dataclass(eq=False)
class _Staged:
    """A file being fetched into its staging file."""

    fd: int
    key: str  # its path under DEST, as the manifest knows it
    # Bytes still to land that the disk does not show as used yet: counted against free space
    # by every other file's check.
    unseen: int
    # The object's strong ETag as the first answer gave it: every part must come from it.
    etag: str | None = None
    # The bytes of the parts an earlier run left, counted as resumed while they are kept.
    resumed: int = 0
    # A one-part file that has no record of parts yet: one is made with the first record of
    # how far it got.
    unstaged: RemoteFile | None = None
    # The periodic records made before its part took a connection (`Transfers._rounds`).
    since: int = 0
    # The parts being fetched, by index, whose progress is recorded every `REACHED_SECONDS`.
    parts: dict[int, tuple[Part, _PartState]] = field(default_factory=dict)

    def landed(self, size: int) -> None:
        self.unseen = max(0, self.unseen - size)

    def same_object(self, etag: str | None) -> str | None:
        """`_ObjectChanged` if this answer is of another version than the earlier ones (the
        object was replaced while its URL still worked); its ETag if it is the first known."""
        if etag is None or etag.startswith("W/"):
            return None  # weak or no ETag: nothing reliable to compare
        if self.etag is None:
            self.etag = etag
            return etag
        if etag != self.etag:
            raise _ObjectChanged(
                f"changed while it was being fetched (ETag {self.etag} became {etag}): "
                "the next run fetches the new version"
            )
        return None


def _nothing_held() -> int:
    return 0


@dataclass
class _PartState:
    offset: int  # next byte to request and write; survives retries of the part
    end: int
    # Digest of bytes [0, offset) when the part is the whole file: hashed as written, in order.
    digests: _Digests | None
    # Where the manifest's record of how far the part got points (its start where none does).
    recorded: int
    relisted: bool = False  # this part asked for a fresh URL
    url_worked: bool = False  # a request since then was answered with something else than 403
    # Bytes a splice under way has put into the file past ``offset``, set by its thread.
    spliced: int = 0
    # Bytes the answer being read holds, received and not yet written (`wire.Response.held`).
    held: Callable[[], int] = field(default=_nothing_held, repr=False)
    # Where the body being read began, while it may prove longer than its range or coded on
    # the way (it was told no length): its bytes are the object's only once they all came.
    unsure_from: int | None = None
    retried: int = 0  # requests of this part asked again after a failure

    @classmethod
    def of(cls, part: Part, file: RemoteFile) -> _PartState:
        whole = part.length == file.size
        return cls(part.start, part.end, _Digests(file) if whole else None, part.start)

    def written(self) -> int:
        """Where the bytes known to be the object's end, written in order from the part's
        start: how far a record of the part may say it got."""
        if self.unsure_from is not None:
            return self.unsure_from
        return self.offset + self.spliced

    def to_record(self, part: Part) -> int | None:
        """The byte to record as reached in ``part`` now; None: nothing (`reach_to_record`)."""
        # Only `take_whole` moves the end of a part: the whole file came in its place.
        whole = self.end != part.end
        return reach_to_record(part, self.written(), self.recorded, answered_whole=whole)

    def take_whole(self, file: RemoteFile) -> None:
        """Receive the whole file from byte 0 on: a server that ignores Range sent it."""
        self.offset, self.end, self.digests = 0, file.size, _Digests(file)

    def rewind(self, offset: int, file: RemoteFile) -> None:
        """Forget the bytes written from ``offset`` on, to ask for them again; a part hashed on
        the way (the whole file) starts over, as its hash cannot be taken back."""
        if self.digests is None:
            self.offset = offset
        else:
            self.take_whole(file)


class _Digests:
    """A file's xxh3-128, and its MD5 when the listing gives one to check the bytes against."""

    def __init__(self, file: RemoteFile) -> None:
        self._xxh3 = xxhash.xxh3_128()
        self._listed_md5 = file.md5
        self._md5 = hashlib.md5(usedforsecurity=False) if file.md5 is not None else None

    def update(self, data: memoryview) -> None:
        self._xxh3.update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def verified(self) -> str:
        """The xxh3 digest to record; `IntegrityError` if the bytes are not what was listed."""
        if self._md5 is not None:
            got = base64.b64encode(self._md5.digest()).decode()
            if got != self._listed_md5:
                raise IntegrityError(
                    f"MD5 of the bytes received is {got}, the listing says {self._listed_md5}"
                )
        return self._xxh3.hexdigest()


def content_range_end(header: str | None, offset: int, end: int, size: int) -> int:
    """Where the bytes of a 206 answer to a request for bytes ``offset`` to ``end - 1`` of an
    object of ``size`` bytes end (exclusive): ``end``, or before it when the server sent less
    than asked for, as RFC 9110 lets it. `IntegrityError` for any range that does not start at
    ``offset``, ends past ``end - 1``, is empty, or names another size: those bytes are not
    the ones asked for, or not of the listed object (whose size then is said)."""
    match = _CONTENT_RANGE.fullmatch(header or "")
    # A last byte before the first is an invalid range (RFC 9110 §14.4), not an empty one.
    if match is None or int(match[2]) < int(match[1]):
        raise IntegrityError(f"206 without a valid Content-Range ({header!r})")
    start, last = int(match[1]), int(match[2])
    total = int(match[3]) if match[3] != "*" else size
    if total != size and total > last:
        # The object's length now: it was replaced since it was listed (a one-part file that
        # shrank answers its whole range with all it has), not a server gone wrong. A length
        # the range does not fit in (invalid, RFC 9110 §14.4) tells nothing.
        raise IntegrityError(_sizes(total, size))
    if start != offset or last >= end or total != size:
        raise IntegrityError(
            f"Content-Range {header!r} does not match the requested bytes {offset}-{end - 1}/{size}"
        )
    return last + 1


def refused_answer(
    status: int, headers: Mapping[str, str], length: int | None, expected: int, url: str
) -> FileError | None:
    """Why an object's `200` or `206` answer with ``headers``, whose head frames a body of
    ``length`` bytes (None: not told), is refused before its body is read, if it is: it should
    carry ``expected`` bytes (the listed size for a `200`, its Content-Range's length for a
    `206`). Not retried: the same request would be answered the same way."""
    if length is None or length == expected:
        return None  # a body without a length is checked as it is read, a coded one too
    if coded := _compressed(headers, url):
        # Coded on the way despite our Accept-Encoding, they are not the object's bytes (an
        # object stored coded, which S3 serves with its Content-Encoding, has its length).
        return coded
    if status == 200:
        # The object's length now (RFC 9110 §8.6): another version than the one listed, which
        # the next run lists; read, it would end short, or wait for bytes that never come.
        return IntegrityError(_sizes(length, expected))
    return IntegrityError(
        f"a body of {length} bytes does not match its Content-Range "
        f"{headers.get('content-range')!r} ({expected} bytes)"
    )


def _compressed(headers: Mapping[str, str], url: str) -> FileError | None:
    """The `FileError` of an answer with a Content-Encoding, for when its bytes are found not to
    be the object's (their length is not that of the bytes asked for); None for one sent as is."""
    coding = headers.get("content-encoding", "identity").lower()
    if coding == "identity":
        return None
    return FileError(
        f"{redact_url(url)} sent the object compressed (Content-Encoding: {coding[:20]}), "
        "not as stored"
    )


def _sizes(length: int, listed: int) -> str:
    return f"the server says the object has {length} bytes; the listing says {listed}"


async def _raise_for_file_status(resp: Response, url: str, size: int) -> NoReturn:
    """The error of an object's answer that carries no bytes of it, for an object listed with
    ``size`` bytes."""
    status = resp.status
    where = redact_url(url)
    if status == 403:
        body = (await resp.read(2048)).decode("utf-8", "replace")
        reason = "Request has expired" if "expired" in body.lower() else "AccessDenied"
        raise UrlExpiredError(f"HTTP 403 ({reason}) from {where}")
    if transient_status(status):
        raise TransientError(
            f"HTTP {status} from {where}", retry_after=retry_after_seconds(resp.headers)
        )
    if status == 416:
        unsatisfied = range_not_satisfiable(resp.headers.get("content-range"), size)
        raise IntegrityError(f"HTTP 416 from {where}: {unsatisfied}")
    raise FileError(f"HTTP {status} from {where}")


def range_not_satisfiable(header: str | None, size: int) -> str:
    """What a 416 with Content-Range ``header`` says of an object listed with ``size`` bytes.
    Only bytes within the listed size are asked for: the object shrank, and another version is
    there, which the next run lists. Its size now when the header gives one (``bytes */N``, RFC
    9110 §15.5.17); a server that names the listed size, or spells it otherwise, contradicts
    itself and tells no size."""
    match = _UNSATISFIED_RANGE.fullmatch(header or "")
    if match is not None and int(match[1]) != size:
        return _sizes(int(match[1]), size)
    return "the object is smaller than listed"


def _prepare_staging(fd: int, size: int, path: str, *, reserve: bool) -> None:
    """Empty the staging file and give it ``size`` bytes, reserved on disk if ``reserve`` (a
    full disk then shows now, not after gigabytes), else sparse."""
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)  # leftovers of an earlier attempt
        if size == 0:
            return
        if reserve:
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        os.ftruncate(fd, size)  # sparse: tmpfs, and filesystems without fallocate
    except OSError as exc:
        raise _local_error(exc, path, size) from exc


def _data_synced(fds: Mapping[T, int], directory: str | None) -> set[T]:
    """The keys of ``fds`` whose descriptor's data `fdatasync` made durable; with
    ``directory``, none unless its entries were made durable too."""
    synced = set()
    for key, fd in fds.items():
        with suppress(OSError):
            os.fdatasync(fd)
            synced.add(key)
    if directory is not None:
        try:
            fsync_directory(directory)
        except OSError:
            return set()
    return synced


def _check_length(fd: int, size: int) -> None:
    actual = os.fstat(fd).st_size
    if actual != size:
        raise IntegrityError(f"staged file is {actual} bytes, expected {size}")


def _read_back(fd: int, file: RemoteFile) -> _Digests:
    """Digests of the file as it is on disk, and a last check of its length.

    Read through mappings of the page cache, a window at a time: no copy into a buffer of ours
    (measured: that copy cost more CPU than the hash), and no more than a window mapped at once.
    """
    size = file.size
    _check_length(fd, size)
    digests = _Digests(file)
    for start in range(0, size, HASH_WINDOW):
        anyio.from_thread.check_cancelled()  # as `_read_digests` does: a stop must not wait
        length = min(HASH_WINDOW, size - start)
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=start) as window:
            window.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(window) as view:
                digests.update(view)
    return digests


def _read_digests(fd: int, file: RemoteFile) -> _Digests:
    """Digests of a file in the mirror, read through a buffer: unlike a mapping, a read that
    another program's truncation cuts short is an error, not a SIGBUS that kills the run."""
    digests = _Digests(file)
    # No bigger than the file (a byte more shows one that grew): a zeroed 4 MiB buffer per file
    # would cost more than reading a small one.
    buffer = bytearray(min(HASH_WINDOW, file.size + 1))
    total = 0
    with memoryview(buffer) as view:
        while got := os.readv(fd, [buffer]):
            # A thread cannot be cancelled: a stopped run would wait for the whole file, which
            # may take a minute, so it asks between reads.
            anyio.from_thread.check_cancelled()
            digests.update(view[:got])
            total += got
    if total != file.size:
        raise IntegrityError(f"mirrored file is {total} bytes, expected {file.size}")
    return digests


def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _refuse_a_directory_in_place(final: str, relative: str) -> None:
    """`FileError` if a directory stands where a mirrored file was (the operator's): its rename
    onto it would fail the file, after all its bytes were fetched. Looked for only where the
    manifest had a file: a lookup for each file new to the mirror costs a first sync."""
    try:
        mode = os.lstat(final).st_mode
    except OSError:
        return  # nothing there, or nothing this can tell: the rename will say
    if stat.S_ISDIR(mode):
        raise FileError(f"cannot write {quoted(relative)}: a directory is in its place")


def _refuse_another_mount(staging_dir: Path, dest: Path, *, probe: bool = True) -> None:
    """A file is published by a rename from the staging area, which cannot cross mounts (EXDEV):
    a staging area elsewhere (a symlink to another filesystem, a bind mount even of DEST's own)
    would fail every file, every run, each after it was fetched. Told by the devices, and where
    they are one, by renaming an empty file from it into the state directory (not without
    ``probe``: a dry run writes nothing)."""
    staging_device = _os_call(staging_dir, lambda: os.stat(staging_dir).st_dev)
    dest_device = _os_call(dest, lambda: os.stat(dest).st_dev)
    if staging_device != dest_device or (probe and _rename_crosses(staging_dir, dest / STATE_DIR)):
        raise LocalIOError(
            f"cannot stage files in {quoted(staging_dir)}: it is on another mount "
            f"({filesystem_named(staging_dir, staging_device)}) than the destination "
            f"({filesystem_named(dest, dest_device)}), and a file is published by a rename, "
            "which cannot cross mounts (a symlink? a bind mount? the staging area must be on "
            "DEST's)"
        )


def _rename_crosses(source: Path, target: Path) -> bool:
    """Whether a file cannot be renamed from directory ``source`` into ``target`` (EXDEV), as
    an empty one tells. Any other failure tells nothing of that: the files will say it. A probe
    a run killed here left is replaced by the next one's, or swept from the staging area."""
    probe, moved = source / _RENAME_PROBE, target / _RENAME_PROBE
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))
        os.replace(probe, moved)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(probe)
        return exc.errno == errno.EXDEV
    with suppress(OSError):
        os.unlink(moved)
    return False


def _local_error(exc: OSError, path: str | Path, needed: int | None = None) -> CheckpointSyncError:
    """An OS error at ``path``: fatal for the run when it would hit every file alike."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FATAL_ERRNOS:
        space = f"; {needed} more bytes are needed" if needed and exc.errno == errno.ENOSPC else ""
        return LocalIOError(f"cannot write {quoted(path)}: {reason}{space}")
    return FileError(f"cannot write {quoted(path)}: {reason}")


def _os_call(path: str | Path, call: Callable[[], T]) -> T:
    try:
        return call()
    except OSError as exc:
        raise _local_error(exc, path) from exc
