"""Where files land in the mirror, and the rules that keep them inside it. Pure: no I/O.

Paths relative to DEST are plain ``/``-joined strings: they are made once per listed file, and
pathlib objects cost several times more on listings of a million entries.
"""

from __future__ import annotations

import os
import sys

import xxhash

from .errors import UnsafePathError
from .sources.base import RemoteFile

STATE_DIR = ".checkpoint-sync"
# The longest file or directory name (in bytes) that Linux filesystems take: a longer one would
# only fail at the rename into place, after its whole download.
NAME_MAX = 255


# How this process names files on disk: the locale's encoding. UTF-8 under a UTF-8 locale, and
# under C or POSIX too (Python coerces them); Latin-1 under LANG=en_US.ISO-8859-1, say.
FILE_NAME_ENCODING = sys.getfilesystemencoding()

# No character takes more than 4 bytes in UTF-8: a name this short needs no encoding to know
# that it fits (listings of a million entries check every one).
_SURELY_SHORT = NAME_MAX // 4


def _too_long(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) > NAME_MAX


# A path quoted in a message is cut past this length: one deeper than the OS takes (PATH_MAX,
# 4096 bytes) would make a failure line of several kilobytes, naming it twice.
_QUOTED_WHOLE = 255
_QUOTED_ENDS = 60


def quoted(path: str | os.PathLike[str]) -> str:
    """``path`` as a message quotes it: whole, or its start and end around "..." when long
    (``--json`` keeps the whole path of a failed file under its own key)."""
    text = os.fspath(path)
    if len(text) <= _QUOTED_WHOLE:
        return text
    return f"{text[:_QUOTED_ENDS]}...{text[-_QUOTED_ENDS:]}"


def safe_segment(name: str, what: str) -> str:
    """``name`` if it can stand as one directory or file name, else `UnsafePathError`."""
    if name in ("", ".", ".."):
        raise UnsafePathError(f"{what} '{name}' is not a usable name")
    for bad, label in (("/", "a slash"), ("\\", "a backslash"), ("\0", "a NUL byte")):
        if bad in name:
            raise UnsafePathError(f"{what} '{quoted(name)}' contains {label}")
    if len(name) > _SURELY_SHORT and _too_long(name):
        raise UnsafePathError(f"{what} '{name[:40]}...' is longer than {NAME_MAX} bytes")
    return name


def safe_relative_path(path: str, what: str = "file name") -> str:
    """A listed relative path, refused if absolute, climbing (``..``) or otherwise odd."""
    if path.startswith("/"):
        raise UnsafePathError(f"{what} '{quoted(path)}' is absolute")
    if "\\" in path:
        raise UnsafePathError(f"{what} '{quoted(path)}' contains a backslash")
    if "\0" in path:
        raise UnsafePathError(f"{what} '{quoted(path)}' contains a NUL byte")
    segments = path.split("/")
    if ".." in segments:
        raise UnsafePathError(f"{what} '{quoted(path)}' climbs out with '..'")
    if any(segment in ("", ".") for segment in segments):
        raise UnsafePathError(f"{what} '{quoted(path)}' has an empty or '.' segment")
    if len(path) > _SURELY_SHORT and any(_too_long(segment) for segment in segments):
        raise UnsafePathError(f"{what} '{path[:40]}...' has a name longer than {NAME_MAX} bytes")
    return path


# The manifest keeps ranks as SQLite integers (64-bit signed).
MAX_NODE_RANK = (1 << 63) - 1


def mirror_path(file: RemoteFile, encoding: str = FILE_NAME_ENCODING) -> str:
    """``<run>/<checkpoint>/<node_rank>/<path>``, relative to DEST, or `UnsafePathError`; also
    where file names in ``encoding`` cannot hold it."""
    if file.node_rank < 0:
        raise UnsafePathError(f"node rank {file.node_rank} is negative")
    if file.node_rank > MAX_NODE_RANK:
        raise UnsafePathError(f"node rank {file.node_rank} is out of range")
    checkpoint = checkpoint_path(file.run, file.checkpoint)
    relative = f"{checkpoint}/{file.node_rank}/{safe_relative_path(file.path)}"
    return nameable(relative, encoding)


def checkpoint_path(run: str, checkpoint: str) -> str:
    """``<run>/<checkpoint>``, the directory of a checkpoint's node ranks relative to DEST, or
    `UnsafePathError`."""
    if safe_segment(run, "run") == STATE_DIR:
        raise UnsafePathError(f"run '{run}' would overwrite checkpoint-sync's own state")
    return f"{run}/{safe_segment(checkpoint, 'checkpoint')}"


def nameable(relative: str, encoding: str = FILE_NAME_ENCODING) -> str:
    """``relative`` if file names in ``encoding`` can hold it, else `UnsafePathError`: a path
    the manifest recorded under another locale is checked so too, before it is looked up."""
    if encoding != "utf-8":  # which writes any name a listing can give
        try:
            relative.encode(encoding)
        except UnicodeEncodeError as exc:
            # Else the run would end at the first such file, not fail it alone.
            lacking = relative[exc.start]
            raise UnsafePathError(
                f"'{quoted(relative)}' cannot be a file name under this locale: its encoding "
                f"({encoding}) has no '{lacking}'; run with a UTF-8 one (LANG=C.UTF-8)"
            ) from None
    return relative


def mirror_path_parts(relative: str) -> tuple[str, str, int, str]:
    """The run, checkpoint, node rank and path within the rank of a path `mirror_path` made."""
    run, checkpoint, rank, path = relative.split("/", 3)
    return run, checkpoint, int(rank), path


def staging_name(relative: str) -> str:
    """A flat, fixed-length name in the staging area for the file bound for ``relative``."""
    return xxhash.xxh3_128_hexdigest(relative.encode()) + ".part"


def is_within(root: str, candidate: str) -> bool:
    """Whether resolved path ``candidate`` is ``root`` or lies below it."""
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)
