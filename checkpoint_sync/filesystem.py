"""Which filesystem the mirror is on, and so whether reserving a file's space up front pays;
whether its directories are its own (`Places`); and making a directory's changed entries
durable (``--fsync``).

On a disk filesystem ``fallocate`` reserves extents without writing them: a full disk shows
before gigabytes are fetched, and the file is laid out in one piece. On tmpfs it zero-fills
memory that the download then overwrites anyway: for 4 GiB, 0.28 s of CPU on the event loop
before the first request (benchmarks/). There a staging file is left sparse, and the free-space
check counts the bytes it has still to receive instead.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import NamedTuple

from .layout import is_within, quoted

MOUNTINFO = "/proc/self/mountinfo"
# Filesystems where a reservation is a write of zeros into memory.
ZERO_FILLING = frozenset({"tmpfs"})
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class Mount(NamedTuple):
    point: str
    type: str


def preallocation_pays(path: str) -> bool:
    """Whether files under ``path`` should be reserved at full size before they are fetched."""
    mount = _mount(path)
    # Where its mount cannot be read (not Linux, no /proc): reserve, as on any disk.
    return mount is None or mount.type not in ZERO_FILLING


def filesystem_named(path: str | Path, device: int) -> str:
    """The filesystem ``path`` is on, for a message: its type and mount point, or where they
    cannot be read, its device number."""
    mount = _mount(path)
    if mount is None:
        return f"device {os.major(device)}:{os.minor(device)}"
    return f"{mount.type} at {mount.point}"


def _mount(path: str | Path) -> Mount | None:
    """The mount ``path`` is on, from this process's mount table; None where it cannot be read."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as mounts:
            mountinfo = mounts.read()
    except OSError:
        return None
    return mount_of(mountinfo, os.path.realpath(path))


def mount_of(mountinfo: str, path: str) -> Mount | None:
    """The mount ``path`` (resolved) is on, from ``/proc/self/mountinfo`` text.

    That is the mount at the longest mount point above ``path``; of several mounts at one
    point, the last one listed, which hides the others.
    """
    found, longest = None, -1
    for line in mountinfo.splitlines():
        # "36 35 98:0 /root /mnt/point rw,noatime shared:1 - ext4 /dev/vda rw"
        fields = line.split(" ")
        try:
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            fstype = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue  # not a mount line
        if len(point) >= longest and is_within(point, path):
            found, longest = Mount(point, fstype), len(point)
    return found


class Places:
    """Whether the directories of the mirror at ``dest`` lead where their names say. Through a
    symlink, a file would land outside DEST, or in another checkpoint's place, whose record
    would then vouch for other bytes. One `realpath` a directory: the mirror is ours while its
    lock is held."""

    def __init__(self, dest: str | Path) -> None:
        self._dest = str(dest)
        self._real_dest = os.path.realpath(dest)
        self._resolved: dict[str, str] = {}

    def own(self, directory: str) -> bool:
        """Whether ``directory`` (relative to DEST; "" for DEST) resolves to its own place."""
        return self._resolve(directory) == self._place(directory)

    def elsewhere(self, directory: str) -> str | None:
        """Where ``directory`` leads instead of its own place, as a message; None if it does
        not."""
        resolved = self._resolve(directory)
        if resolved == self._place(directory):
            return None
        if not is_within(self._real_dest, resolved):
            return "leads outside the destination (a symlink?)"
        other = os.path.relpath(resolved, self._real_dest)
        to = "DEST itself" if other == "." else f"{quoted(other)} in the mirror"
        return f"leads to {to}, not to its own place (a symlink?)"

    def _resolve(self, directory: str) -> str:
        resolved = self._resolved.get(directory)
        if resolved is None:
            path = f"{self._dest}/{directory}" if directory else self._dest
            resolved = self._resolved[directory] = os.path.realpath(path)
        return resolved

    def _place(self, directory: str) -> str:
        if not directory:
            return self._real_dest
        return f"{self._real_dest.rstrip(os.sep)}/{directory}"  # DEST may be "/"


def make_directories(path: str | Path) -> None:
    """``os.makedirs``, saying what is wrong where a file is in the place of ``path``: makedirs
    says "File exists" there, and "Not a directory" where the file is further up."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as exc:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from exc


def fsync_directory(path: str) -> None:
    """Make the entries ``path`` gained or lost (a rename, an unlink, a rmdir) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
