"""What `list` shows: each checkpoint's size and status, and how much of it the mirror holds.

The local state compares the checkpoint's remote file listing with the manifest's records, read
without a lock and without writing anything. A record counts only while its file is on disk with
the recorded size (one `lstat` each); contents are not read.
"""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from enum import StrEnum
from pathlib import Path
from typing import Any

from .engine import local_size, manifest_path
from .errors import FileError, UnsafePathError
from .filesystem import Places
from .layout import mirror_path_parts, nameable
from .manifest import Manifest
from .plan import FileFilter, Recorded, Selection, Tally
from .progress import counted_files, human_bytes
from .prune import Pruner, deletions
from .sources.base import Checkpoint, Source, UnreadableEntry

# Stands for an unreadable listing entry: no manifest record ever matches it.
_UNREADABLE = Recorded(0, "")


class LocalState(StrEnum):
    MIRRORED = "mirrored"
    PARTIAL = "partial"
    ABSENT = "absent"
    CHANGED = "changed remotely"


@dataclass
class Compared:
    """One checkpoint's listed files against the manifest's records of files still on disk at
    their recorded size (present), counted as the listing is walked: nothing is kept per file."""

    matched: int = 0  # listed as recorded, and present
    missing: bool = False  # a listed file not present (or listed twice, differently)
    changed: bool = False  # a present file listed otherwise, or no longer listed
    size: int = 0  # of the listed files
    # Why some recorded files could not be looked up (this locale cannot name them).
    refused: list[UnsafePathError] = field(default_factory=list)


def local_state(compared: Compared, staging: bool) -> LocalState:
    """One checkpoint's state; ``staging`` says whether a transfer into it was left unfinished."""
    if compared.changed:
        return LocalState.CHANGED
    if not compared.matched and not staging:
        return LocalState.ABSENT
    if staging or compared.missing:
        return LocalState.PARTIAL
    return LocalState.MIRRORED


@dataclass(frozen=True)
class Row:
    checkpoint: Checkpoint
    size_bytes: int | None
    local: LocalState | None  # None: no mirror to compare with
    # Why some recorded files could not be looked up (this locale cannot name them): they count
    # as missing, as a sync under this locale would fail them.
    unreachable: str | None = None


async def survey(
    source: Source, selection: Selection, dest: Path | None, wanted: FileFilter
) -> list[Row]:
    """A row per selected checkpoint; with ``dest``, the files are listed to tell each one's
    local state. Each listed file is compared with its record as its page comes (memory stays
    flat however long the listing is); the manifest's temporary table of paths listed tells
    repeats, as in `sync`, and the records no longer listed."""
    checkpoints = selection.checkpoints
    if dest is None:
        return [Row(c, c.size_bytes, None) for c in checkpoints]
    compared: dict[tuple[str, str], Compared] = defaultdict(Compared)
    tally = Tally(wanted)
    manifest = Manifest(manifest_path(dest), read_only=True)
    places = Places(dest)

    def present(path: str, size: int, seen: Compared) -> bool:
        """Whether the recorded file at ``path`` is on disk at ``size``, as `sync` would find
        it: not deleted or cut short since, nor reached through a directory swapped for a
        symlink."""
        try:
            final = f"{dest}/{nameable(path)}"
        except UnsafePathError as exc:
            seen.refused.append(exc)
            return False
        return local_size(final) == size and places.own(os.path.dirname(path))

    try:
        async for page in source.file_pages(checkpoints):
            manifest.catch_up()  # a sync may have written it while the page was awaited
            for file in page:
                if isinstance(file, UnreadableEntry):
                    # A file that cannot be mirrored is missing.
                    if not tally.takes(file.node_rank, file.name) or file.checkpoint is None:
                        continue
                    seen = compared[file.run, file.checkpoint]
                    path, entry, version = file.where, _UNREADABLE, None
                elif tally.takes(file.node_rank, file.path):
                    seen = compared[file.run, file.checkpoint]
                    # The path `layout.mirror_path` gives a safe entry; an unsafe one matches
                    # nothing in the manifest, so it counts as missing.
                    path = f"{file.run}/{file.checkpoint}/{file.node_rank}/{file.path}"
                    entry = Recorded(file.size, file.last_modified)
                    version = hash((file.size, file.last_modified))
                else:
                    continue
                # As in `sync`, the first entry of a path is the one mirrored, a repeat of the
                # same file counts once, and another repeat fails: it counts as missing.
                first = manifest.first_listing(path, version)
                if first is None:
                    continue
                if not first:
                    seen.missing = True
                    continue
                seen.size += entry.size
                recorded = manifest.recorded(path)
                if recorded is None or not present(path, recorded.size, seen):
                    seen.missing = True
                elif recorded == entry:
                    seen.matched += 1
                else:
                    seen.changed = True
        tally.check(named=selection.named)  # as `sync` does: a mistyped rank or pattern is no state
        rows = []
        for c in checkpoints:
            seen = compared[c.run, c.name]
            for v in manifest.unlisted_in(c.run, c.name):
                if wanted.takes(v.node_rank, mirror_path_parts(v.path)[3]) and present(
                    v.path, v.size, seen
                ):
                    seen.changed = True
            staging = any(
                wanted.takes(*mirror_path_parts(path)[2:])
                for path in manifest.staged_under(f"{c.run}/{c.name}/")
            )
            size = c.size_bytes if c.size_bytes is not None else seen.size
            state = local_state(seen, staging)
            rows.append(Row(c, size, state, _unnamed(f"{c.run}/{c.name}", seen.refused)))
        return rows
    finally:
        manifest.close()


@dataclass(frozen=True)
class RemovedUpstream:
    """A checkpoint the mirror holds that its provider no longer lists: still there to restore
    from, and what `sync --delete` would delete."""

    where: str  # "<run>/<checkpoint>"
    files: int  # none where every file is `unreachable`
    size_bytes: int
    unreachable: str | None = None  # as `Row`'s: these are not counted


def removed_upstream(
    dest: Path, whole_lists: Mapping[str, frozenset[str]], wanted: FileFilter
) -> list[RemovedUpstream]:
    """The checkpoints gone from their run's whole checkpoint list of which the mirror holds
    files ``wanted`` takes: those `sync --delete` would delete, as its dry run tells them."""
    manifest = Manifest(manifest_path(dest), read_only=True)
    try:
        # Files and bytes by checkpoint, counted, not kept: a million may have gone upstream.
        held: dict[str, tuple[int, int]] = {}
        refused: dict[str, list[UnsafePathError]] = {}
        pruner = Pruner(str(dest))
        for doomed in deletions(manifest, wanted, whole_lists):
            try:
                if pruner.goes(doomed):
                    files, size = held.get(doomed.checkpoint, (0, 0))
                    held[doomed.checkpoint] = (files + 1, size + doomed.size)
            except UnsafePathError as exc:
                refused.setdefault(doomed.checkpoint, []).append(exc)
            except FileError:  # one it cannot even look at: not counted
                pass
    finally:
        manifest.close()
    removed = []
    for where in dict.fromkeys([*held, *refused]):
        files, size = held.get(where, (0, 0))
        removed.append(RemovedUpstream(where, files, size, _unnamed(where, refused.get(where, []))))
    return removed


def _unnamed(where: str, refused: Sequence[UnsafePathError]) -> str | None:
    """What to say of a checkpoint some of whose recorded files this locale cannot name."""
    if not refused:
        return None
    return f"cannot look up {counted_files(len(refused), 'mirrored ')} of {where}: {refused[0]}"


def row_json(row: Row) -> dict[str, Any]:
    c = row.checkpoint
    return {
        "run": c.run,
        "checkpoint": c.name,
        "id": c.key,
        "target": c.target,
        "created_at": c.created_at.isoformat() if c.created_at else None,
        "step": c.step,
        "metrics": dict(c.metrics),
        "size_bytes": row.size_bytes,
        "status": c.state.value,
        "local": row.local.value if row.local else None,
    }


Column = tuple[str, Callable[[Row], str]]


def table(rows: Sequence[Row], shown: Callable[[str], str]) -> list[str]:
    """The rows as text aligned once each line is ``shown`` (escaped, redacted, encoded), with
    only the columns some row has a value for."""

    def some(has: Callable[[Checkpoint], object]) -> bool:
        return any(has(r.checkpoint) for r in rows)

    columns: list[Column] = [
        ("RUN", lambda r: r.checkpoint.run),
        ("CHECKPOINT", lambda r: r.checkpoint.name),
    ]
    if some(lambda c: c.key != c.name):
        columns.append(("ID", lambda r: r.checkpoint.key))
    if some(lambda c: c.created_at):
        columns.append(("CREATED", _created))
    if some(lambda c: c.step is not None):
        columns.append(("STEP", lambda r: _text(r.checkpoint.step)))
    columns += [("SIZE", _size), ("STATUS", lambda r: r.checkpoint.state.value)]
    if any(r.local is not None for r in rows):
        columns.append(("LOCAL", lambda r: _text(r.local)))
    if some(lambda c: c.metrics):
        columns.append(("METRICS", _metrics))
    lines = [[title for title, _ in columns], *([cell(r) for _, cell in columns] for r in rows)]
    # What a terminal shows: an escape (ESC as \x1b) is wider than the name, a CJK one is twice.
    shown_widths = [[_terminal_width(shown(text)) for text in line] for line in lines]
    widths = [max(column) for column in zip(*shown_widths, strict=True)]
    return [
        "  ".join(
            text + " " * (width - taken)
            for text, taken, width in zip(line, taken_widths, widths, strict=True)
        ).rstrip()
        for line, taken_widths in zip(lines, shown_widths, strict=True)
    ]


def _terminal_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for each East Asian wide character, none
    for a combining mark (the accent of an "é" written as two characters)."""
    if text.isascii():  # most names: no look-up per character
        return len(text)
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.category(char) in ("Mn", "Me"):  # drawn over the character before it
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _created(row: Row) -> str:
    created = row.checkpoint.created_at
    return created.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if created else "-"


def _size(row: Row) -> str:
    return "-" if row.size_bytes is None else human_bytes(row.size_bytes)


def _metrics(row: Row) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(row.checkpoint.metrics.items()))
