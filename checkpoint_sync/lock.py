"""One run per mirror: an advisory lock on ``DEST/.checkpoint-sync/lock``.

``flock`` locks die with their process, so a run that was killed never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import anyio

from .errors import LocalIOError, LockHeldError
from .filesystem import fsync_directory, make_directories

POLL_SECONDS = 0.25
LOCK_NAME = "lock"
# Enough of the lock file for any pid (Linux gives up to 4194303), and then some.
HOLDER_BYTES = 32


@dataclass(frozen=True)
class LockSeen:
    """The mirror's lock file as a run found it before it read the lists it acts on: its inode,
    modification time, size and first bytes (the pid of the run that last held it), or None
    where there was none. Every run that takes the lock writes its pid into it, so a file found
    otherwise once the lock is taken tells that another run held it since, and may have mirrored
    what those lists lack (`held_since`). The pid tells where the time cannot: a filesystem
    that keeps whole seconds gives two holders in one second the same time."""

    file: tuple[int, int, int, bytes] | None

    @classmethod
    def of(cls, file: Path | int) -> LockSeen:
        """The lock file at a path, or open."""
        try:
            if isinstance(file, int):
                return cls._of_open(file)
            # Not blocking: whatever is there (a FIFO, say) must not hold the run up.
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
            try:
                return cls._of_open(fd)
            finally:
                os.close(fd)
        except OSError:  # none there; an open one that cannot be read differs from any seen
            return cls(None)

    @classmethod
    def _of_open(cls, fd: int) -> LockSeen:
        info = os.fstat(fd)
        return cls((info.st_ino, info.st_mtime_ns, info.st_size, os.pread(fd, HOLDER_BYTES, 0)))


def held_since(seen: LockSeen | None, now: LockSeen, *, created: bool, waited: bool) -> bool:
    """Whether another run may have held the lock since the run that now has it read its lists:
    it waited for it, or the file is ``now`` otherwise than ``seen`` (None: not looked at). A
    file this run made was empty then: a run that took the lock before this one named itself
    in it, whatever this run saw before it made it."""
    if waited:
        return True
    if created:
        return now.file is None or now.file[2] > 0
    return seen is not None and seen != now


@asynccontextmanager
async def mirror_lock(
    state_dir: Path,
    *,
    wait: bool,
    wait_timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    durable: bool = False,
    seen: LockSeen | None = None,
) -> AsyncIterator[bool]:
    """Hold the mirror's lock; `LockHeldError` if another run has it and ``wait`` is off, else
    ``on_wait(holder's pid)``, again whenever the holder changes, and the wait: for ever, or
    `LockHeldError` once it has lasted ``wait_timeout`` seconds. ``durable``: the directories
    made on the way (DEST, its parents) survive power loss, as their entries are synced. Yields
    whether another run may have held the lock since the file was ``seen`` (`held_since`)."""
    path = state_dir / LOCK_NAME
    try:
        ancestry = (state_dir, *state_dir.parents)
        made = list(takewhile(lambda d: not d.exists(), ancestry)) if durable else []
        make_directories(state_dir)
        for directory in made:  # each new directory is an entry of its parent
            try:
                fsync_directory(str(directory.parent))
            except OSError as exc:  # not the lock's fault: the lock could be made
                raise LocalIOError(
                    f"cannot sync {directory.parent} to make the new {directory} durable: "
                    f"{exc.strerror or exc}"
                ) from exc
        try:
            # Made where a symlink there points (O_EXCL alone would not follow it, dangling),
            # to know that no run held it before. 0o666 before the umask, as every file of
            # ours: a group's umask 002 lets another member of it run on the mirror.
            real = os.path.realpath(path)
            fd, created = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False
            except OSError as exc:  # it is there: its mode, or a directory in its place
                raise LocalIOError(f"cannot open the lock {path}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise LocalIOError(f"cannot create the lock {path}: {exc.strerror or exc}") from exc
    told: str | None = None  # the holder on_wait was last told of; None: no wait yet
    deadline = math.inf
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A pid, or nothing said: whatever else the file holds (escapes) must not reach
                # the progress line, which shows it as it is.
                holder = os.pread(fd, HOLDER_BYTES, 0).decode(errors="replace").strip()
                if not (holder.isascii() and holder.isdigit()):
                    holder = "unknown"
                if not wait:
                    raise LockHeldError(
                        f"another checkpoint-sync run (pid {holder}) is mirroring into "
                        f"{state_dir.parent}; pass --wait-lock to wait for it"
                    ) from None
                now = time.monotonic()
                if told is None and wait_timeout is not None:
                    deadline = now + wait_timeout
                # Told again when another run took over: the progress, a stop's message and
                # --json's waiting_for_lock name the pid that the timeout's error names.
                if holder != told and on_wait is not None:
                    on_wait(holder)
                if told is not None and now >= deadline:
                    raise LockHeldError(
                        f"another checkpoint-sync run (pid {holder}) still held "
                        f"{state_dir.parent} after {wait_timeout:g} s; this run gave up waiting "
                        "(--wait-lock-timeout) and did nothing"
                    ) from None
                told = holder
                # The last try falls on the deadline, not up to a poll past it.
                await anyio.sleep(min(POLL_SECONDS, deadline - now))
            except OSError as exc:  # ENOLCK on some NFS and FUSE mounts: no run is safe there
                raise LocalIOError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        # A run held up between reading its lists and taking the lock may find that another
        # came and went meanwhile.
        found = LockSeen.of(fd)
        another = held_since(seen, found, created=created, waited=told is not None)
        _name_holder(fd, found)
        yield another
    finally:
        os.close(fd)


def _name_holder(fd: int, found: LockSeen) -> None:
    """Write this run's pid into the lock file, as `LockSeen` expects of every holder. Where it
    cannot be written (a full disk), the file is left `unnamed_size` bytes long instead, which
    needs no room (a hole), so that a run that noted it before still sees that another held the
    lock since. Neither stops this run: it says what it needs once it knows."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        with suppress(OSError):
            os.ftruncate(fd, unnamed_size(found))


def unnamed_size(found: LockSeen) -> int:
    """The size a holder that cannot write its pid leaves the lock file at, ``found`` as it
    took it: another than it had there, as its bytes (none, or zeros) and its time (within the
    same second) may not tell."""
    return (0 if found.file is None else found.file[2]) + 1
