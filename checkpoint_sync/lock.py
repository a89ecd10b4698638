"""One run per mirror: an advisory lock on ``DEST/.checkpoint-sync/lock``.

``flock`` locks die with their process, so a run that was killed never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from itertools import takewhile
from pathlib import Path

import anyio

from .errors import LocalIOError, LockHeldError
from .filesystem import fsync_directory

POLL_SECONDS = 0.25


@asynccontextmanager
async def mirror_lock(
    state_dir: Path,
    *,
    wait: bool,
    on_wait: Callable[[str], None] | None = None,
    durable: bool = False,
) -> AsyncIterator[None]:
    """Hold the mirror's lock; `LockHeldError` if another run has it and ``wait`` is off, else
    ``on_wait(holder's pid)`` once, and the wait. ``durable``: the directories made on the way
    (DEST, its parents) survive power loss, as their entries are synced."""
    path = state_dir / "lock"
    try:
        ancestry = (state_dir, *state_dir.parents)
        made = list(takewhile(lambda d: not d.exists(), ancestry)) if durable else []
        state_dir.mkdir(parents=True, exist_ok=True)
        for directory in made:  # each new directory is an entry of its parent
            try:
                fsync_directory(str(directory.parent))
            except OSError as exc:  # not the lock's fault: the lock could be made
                raise LocalIOError(
                    f"cannot sync {directory.parent} to make the new {directory} durable: "
                    f"{exc.strerror or exc}"
                ) from exc
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LocalIOError(f"cannot create the lock {path}: {exc.strerror or exc}") from exc
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A pid, or nothing said: whatever else the file holds (escapes) must not reach
                # the progress line, which shows it as it is.
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if not (holder.isascii() and holder.isdigit()):
                    holder = "unknown"
                if not wait:
                    raise LockHeldError(
                        f"another checkpoint-sync run (pid {holder}) is mirroring into "
                        f"{state_dir.parent}; pass --wait-lock to wait for it"
                    ) from None
                if on_wait is not None:
                    on_wait(holder)
                    on_wait = None
                await anyio.sleep(POLL_SECONDS)
            except OSError as exc:  # ENOLCK on some NFS and FUSE mounts: no run is safe there
                raise LocalIOError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        # Only names the holder to a second run: a full disk must not stop this one here (it
        # says what it needs once it knows).
        with suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
