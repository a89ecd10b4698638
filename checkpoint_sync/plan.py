"""Decisions, as pure functions: which checkpoints, skip or fetch, which parts are still missing."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property

from .errors import FileError, IntegrityError, NotFoundError, UsageError
from .net import url_problem
from .sources.base import (
    AbsentCheckpoint,
    Available,
    Checkpoint,
    RemoteFile,
    SyncState,
    UnreadableCheckpoint,
    left_out,
)

# Larger than any checkpoint file we can imagine; a size beyond it is a broken listing.
MAX_FILE_SIZE = 1 << 50


@dataclass(frozen=True)
class Selection:
    checkpoints: list[Checkpoint]
    # Left out because their upload is still going on; named in the output.
    syncing: list[Checkpoint] = field(default_factory=list)
    # Left out because their listing entry is unreadable; each fails as one entry.
    unreadable: list[UnreadableCheckpoint] = field(default_factory=list)
    # Unreadable, or their files not there (`AbsentCheckpoint`), and passed over by --latest
    # although they may be newer than the one it took.
    passed_over: list[UnreadableCheckpoint] = field(default_factory=list)
    # Left out because their status is neither complete, syncing nor null (FAILED, say), as
    # --latest leaves them out; named in the output with their status.
    other_status: list[Checkpoint] = field(default_factory=list)
    # Asked for, by --latest or --checkpoint: a restore, which listing no file fails to do.
    asked: bool = False

    @property
    def named(self) -> tuple[str, ...]:
        """The checkpoints asked for (`asked`), as ``run/name``, for a message that they took
        nothing: a restore with --latest may not know which one it took. Empty otherwise."""
        return tuple(f"{c.run}/{c.name}" for c in self.checkpoints) if self.asked else ()


def select_checkpoints(
    available: Sequence[Available],
    *,
    names: Iterable[str] = (),
    latest: bool = False,
    include_syncing: bool = False,
    every_status: bool = False,
    picked: bool = False,
    what: str = "the run",
) -> Selection:
    """Narrow a run's checkpoints to those named, complete or latest; without ``latest``,
    ``every_status`` keeps them whatever their status (`list` shows it). ``picked``: the
    source's checkpoints are one picked by its id (`Source.picked`), which counts as named.

    Of the checkpoints named, none taken for their status (still syncing, or failed) is a
    restore of nothing: `NotFoundError`, saying why, before anything is fetched.

    A checkpoint whose entry is unreadable is never selected: named (by its id or another of
    its names), it is a usage error; a selection of the whole run carries it as unreadable, and
    `--latest`, which asks for one checkpoint, passes it over, noting it where it may be newer
    than the one taken. So it does one whose files a source found not there
    (`AbsentCheckpoint`), which, named, is one of those named.
    """
    wanted = list(dict.fromkeys(names))
    candidates = [c for c in available if isinstance(c, Checkpoint)]
    unreadable = [c for c in available if isinstance(c, UnreadableCheckpoint)]
    if wanted:
        by_name = {c.name for c in candidates} | {c.key for c in candidates}
        absent = [c for c in unreadable if isinstance(c, AbsentCheckpoint)]
        by_name |= {n for c in absent for n in (c.key, *c.names) if n is not None}
        for entry in unreadable:
            # A name a readable checkpoint has too is that one's: it can be mirrored.
            if any(n in wanted and n not in by_name for n in (entry.key, *entry.names)):
                raise UsageError(f"{entry.where} in {what}: {entry.problem}")
        missing = [n for n in wanted if n not in by_name]
        if missing:
            known = ", ".join(c.name for c in candidates) or "none"
            raise NotFoundError(
                f"checkpoint {', '.join(missing)} not found in {what} (it has: {known})"
            )
        candidates = [c for c in candidates if c.name in wanted or c.key in wanted]
        unreadable = [c for c in absent if any(n in wanted for n in (c.key, *c.names))]
    if latest:
        # Where the API reports no checkpoint as complete but leaves some statuses null (it
        # may: NOTES.md), the newest of those, as a plain sync would mirror them too.
        complete = [c for c in candidates if c.state is SyncState.COMPLETE] or [
            c for c in candidates if c.state is SyncState.UNKNOWN
        ]
        syncing = [c for c in candidates if c.state is SyncState.SYNCING]
        pool = complete + syncing if include_syncing else complete
        if not pool:
            raise NotFoundError(
                f"no complete checkpoint in {what} to take as --latest{left_out(unreadable)}"
            )
        newest = max(pool, key=_latest_key)
        # A newer one still uploading is named: a restore should know what it did not take.
        newer = [c for c in syncing if c not in pool and _age_key(c) > _age_key(newest)]
        # So is an unreadable one newer than that, or of an age its entry does not tell, and one
        # whose files were not there: the run has a newer checkpoint than the one restored.
        passed_over = [c for c in unreadable if is_newer(c, newest) is not False]
        # And one of another status (FAILED, say), which no rerun will mirror either.
        other = [
            c for c in candidates if c.state is SyncState.OTHER and _age_key(c) > _age_key(newest)
        ]
        return Selection([newest], newer, passed_over=passed_over, other_status=other, asked=True)
    if every_status:
        return Selection(candidates, unreadable=unreadable)
    states = {SyncState.COMPLETE, SyncState.UNKNOWN} | (
        {SyncState.SYNCING} if include_syncing else set()
    )
    taken = [c for c in candidates if c.state in states]
    syncing = [c for c in candidates if c.state is SyncState.SYNCING and not include_syncing]
    other = [c for c in candidates if c.state is SyncState.OTHER]
    asked = bool(wanted) or picked
    if asked and not taken and (syncing or other):
        # Exit 0 with nothing fetched would let `sync ... && resume-training` go on.
        raise NotFoundError(f"nothing to restore from {what}: {_not_taken(syncing, other)}")
    return Selection(taken, syncing, unreadable, other_status=other, asked=asked)


def _not_taken(syncing: Sequence[Checkpoint], other: Sequence[Checkpoint]) -> str:
    """Why the checkpoints named were not taken."""
    reasons = [
        f"{c.run}/{c.name} is still uploading (its file list is not final; --include-syncing "
        "takes it as it is)"
        for c in syncing
    ]
    reasons += [f"{c.run}/{c.name} has status {c.status}" for c in other]
    return "; ".join(reasons)


def is_newer(entry: UnreadableCheckpoint, taken: Checkpoint) -> bool | None:
    """Whether a checkpoint passed over is newer than the one ``taken``: by the time its entry
    tells, else by its step where neither tells a time (W&B); None where nothing tells (it may
    be)."""
    if entry.created_at is not None:
        return entry.created_at.timestamp() > _age_key(taken)[0]
    if taken.created_at is None and entry.step is not None and taken.step is not None:
        return entry.step > taken.step
    return None


def _age_key(checkpoint: Checkpoint) -> tuple[float, int]:
    created = checkpoint.created_at.timestamp() if checkpoint.created_at else float("-inf")
    return created, checkpoint.step or 0


def _latest_key(
    checkpoint: Checkpoint,
) -> tuple[float, int, tuple[str | tuple[int, str], ...], str, str]:
    """What --latest takes the greatest of: the age, and of checkpoints of one age the last by
    name (numbers in it as numbers), then by id. Never the API's order, which may change between
    runs: a restore must take the same checkpoint each time. Only the age makes one "newer"."""
    name = checkpoint.name
    return *_age_key(checkpoint), _natural(name), name, checkpoint.key


def _natural(name: str) -> tuple[str | tuple[int, str], ...]:
    """``name`` to order by, its digit runs as numbers: checkpoint-10 after checkpoint-9. Text
    and numbers alternate from a text (maybe empty), so the two meet only at like places."""
    return tuple(
        _number(run) if i % 2 else run for i, run in enumerate(re.split(r"([0-9]+)", name))
    )


def _number(digits: str) -> tuple[int, str]:
    """A run of ASCII digits as it orders as a number: by its length without leading zeros, then
    digit by digit. Not `int`, which refuses a run of over 4300 digits (a name the API gives may
    hold one) and takes time quadratic in its length."""
    significant = digits.lstrip("0")
    return len(significant), significant


def check_listed_size(file: RemoteFile) -> None:
    if not 0 <= file.size <= MAX_FILE_SIZE:
        raise IntegrityError(f"listed size {file.size} is not a plausible file size")


def check_listed_url(url: str) -> None:
    if problem := url_problem(url):
        raise FileError(f"its presigned URL is {problem}")


@dataclass(frozen=True)
class Recorded:
    """What the manifest says was verified at a path."""

    size: int
    last_modified: str


@dataclass(frozen=True)
class FileFilter:
    """Which listed files a run takes: those of ``ranks`` (``--node-rank``; none: every rank)
    whose path within their rank matches an ``include`` pattern (none: every path) and no
    ``exclude`` pattern. Patterns are shell-style, matched against the whole path, ``*`` matching
    ``/`` too, one ending in ``/`` taking its directory (as ``huggingface-cli download
    --include`` does).

    A rank or path a listing entry does not tell (an unreadable one) is taken: it is reported,
    not hidden.
    """

    ranks: frozenset[int] = frozenset()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @cached_property
    def _included(self) -> re.Pattern[str] | None:
        return _any_of(self.include)

    @cached_property
    def _excluded(self) -> re.Pattern[str] | None:
        return _any_of(self.exclude)

    def takes_rank(self, rank: int | None) -> bool:
        return not self.ranks or rank is None or rank in self.ranks

    def takes_path(self, path: str | None) -> bool:
        if path is None:
            return True
        included, excluded = self._included, self._excluded
        if included is not None and included.match(path) is None:
            return False
        return excluded is None or excluded.match(path) is None

    def takes(self, rank: int | None, path: str | None) -> bool:
        return self.takes_rank(rank) and self.takes_path(path)


def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One compiled pattern for all: a listing of a million paths is matched against it."""
    if not patterns:
        return None
    # A trailing "/" names a directory, as huggingface-cli reads it: everything under it.
    whole = [f"{p}*" if p.endswith("/") else p for p in patterns]
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in whole))


def check_paths_matched(
    files: FileFilter, left_out: int, taken: int, named: Sequence[str] = ()
) -> None:
    """`NotFoundError` if ``--include``/``--exclude`` left out every file of the wanted ranks
    (``left_out`` of them, none ``taken``): a restore with a mistyped pattern must not end as a
    success that mirrored nothing. ``named``: the checkpoints to name (`Selection.named`)."""
    if left_out and not taken:
        patterns = [f"--include '{p}'" for p in files.include]
        patterns += [f"--exclude '{p}'" for p in files.exclude]
        raise NotFoundError(
            f"no listed file matches {' '.join(patterns)} in {_where(named)} ({left_out} left out)"
        )


def _where(named: Sequence[str]) -> str:
    return ", ".join(named) or "the selected checkpoints"


def unlisted_parts_go(
    place: tuple[str, str, int, str],
    listed: set[tuple[str, str]],
    files: FileFilter,
    whole_lists: Mapping[str, frozenset[str]],
) -> bool:
    """Whether the parts of a file at ``place`` (run, checkpoint, node rank, path) that a run's
    listings did not show are dropped, as removed upstream: the files of its checkpoint were
    listed whole (``listed``) and the run took its rank and path (``files``), or its run's
    checkpoint list was read whole (``whole_lists``: run -> directories) and no longer has its
    checkpoint. An empty list drops none: as for ``--delete`` (`prune.held_back`), it is more
    likely the API's bad moment than a run emptied on purpose."""
    run, checkpoint, rank, path = place
    if whole_lists.get(run) and removed_upstream(run, checkpoint, whole_lists):
        return True
    return (run, checkpoint) in listed and files.takes(rank, path)


def walked_whole(
    selected: Iterable[tuple[str, str]],
    moved: Set[tuple[str, str]],
    untold: Set[tuple[str, str | None]],
) -> set[tuple[str, str]]:
    """Of the ``selected`` checkpoints (run, directory), those whose file listing showed every
    file they hold, where the parts of a file it did not show go (`unlisted_parts_go`): not one
    whose listing changed while it was walked (``moved``), nor one that an entry which did not
    tell its path may be of (``untold``; (run, None): the entry did not tell its checkpoint
    either). A checkpoint whose files were not there to list (`VanishedCheckpoint`) is such an
    entry: they may be back later, parts and all. The others' parts still go."""
    return {
        (run, checkpoint)
        for run, checkpoint in selected
        if (run, checkpoint) not in moved and not {(run, checkpoint), (run, None)} & untold
    }


def removed_upstream(run: str, checkpoint: str, whole_lists: Mapping[str, frozenset[str]]) -> bool:
    """Whether the checkpoint in directory ``checkpoint`` of ``run`` was removed upstream: its
    run's checkpoint list was read whole (``whole_lists``: run -> directories) and no longer has
    it. Baseten's checkpoint lists are one answer each and W&B's is read by a cursor that a
    deletion does not shift, so a checkpoint missing from such a list is gone."""
    return run in whole_lists and checkpoint not in whole_lists[run]


def check_ranks_listed(
    wanted: frozenset[int], listed: set[int], *, each: bool = True, named: Sequence[str] = ()
) -> None:
    """`NotFoundError` if ``--node-rank`` asked for a rank no listed file has (``each``; else
    only if it has none of them): a restore with a mistyped rank, alone or beside good ones,
    must not end as a success with that rank missing (the ranks that are there still land).
    ``named``: the checkpoints to name (`Selection.named`)."""
    missing = wanted - listed
    if listed and missing and (each or missing == wanted):
        asked = ", ".join(map(str, sorted(missing)))
        there = ", ".join(map(str, sorted(listed)))
        have = "it has" if len(named) == 1 else "they have"
        raise NotFoundError(
            f"no file of node rank {asked} in {_where(named)} ({have} ranks {there})"
        )


def check_files_listed(selection: Selection, tally: Tally) -> None:
    """`NotFoundError` where the checkpoints asked for (`--latest`, `--checkpoint`) list no file
    at all (`tally` walked them): a restore of a checkpoint whose files are not there must not
    end as a success that mirrored nothing, naming nothing."""
    if selection.named and not tally.listed_any:
        names = ", ".join(selection.named)
        raise NotFoundError(f"no file is listed in {names}: there is nothing to mirror")


class Tally:
    """A walk of a listing through a `FileFilter`: the ranks it showed, and how many files the
    filter's patterns took and left out; `check` then tells a choice that took nothing."""

    def __init__(self, files: FileFilter) -> None:
        self.files = files
        self.ranks_listed: set[int] = set()
        self.taken = self.left_out_by_path = 0
        # Asked of every entry of listings of a million files: most runs choose none.
        self._takes_all = not (files.ranks or files.include or files.exclude)

    def takes(self, rank: int | None, path: str | None) -> bool:
        """Whether ``files`` takes the entry of ``rank`` and ``path`` (counted)."""
        if rank is not None:
            self.ranks_listed.add(rank)
        if self._takes_all:
            self.taken += 1
            return True
        if not self.files.takes_rank(rank):
            return False
        if not self.files.takes_path(path):
            self.left_out_by_path += 1
            return False
        self.taken += 1
        return True

    @property
    def listed_any(self) -> bool:
        """Whether the walk showed any entry, taken or not."""
        return bool(self.ranks_listed or self.taken or self.left_out_by_path)

    def check(self, *, each: bool = True, named: Sequence[str] = ()) -> None:
        """`NotFoundError` for a rank or patterns that took nothing (see `check_ranks_listed`
        for ``each`` and ``named``)."""
        check_ranks_listed(self.files.ranks, self.ranks_listed, each=each, named=named)
        check_paths_matched(self.files, self.left_out_by_path, self.taken, named)


def is_current(file: RemoteFile, recorded: Recorded | None, local_size: int | None) -> bool:
    """Skip rule: manifest matches the listing, and the local file is there at that size."""
    return (
        recorded is not None
        and recorded.size == file.size
        and recorded.last_modified == file.last_modified
        and local_size == file.size
    )


@dataclass(frozen=True)
class Part:
    index: int
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


def split_parts(size: int, part_size: int) -> list[Part]:
    """Cut ``size`` bytes into parts of ``part_size``; an empty file is one empty part."""
    if size <= 0:
        return [Part(0, 0, 0)]
    return [
        Part(index, start, min(start + part_size, size))
        for index, start in enumerate(range(0, size, part_size))
    ]


@dataclass(frozen=True)
class Staged:
    """Progress of an earlier, interrupted transfer of one file."""

    size: int
    last_modified: str
    part_size: int
    done: frozenset[int]
    bytes_on_disk: int | None  # size of the staging file, None if it is gone
    etag: str | None = None  # the object's strong ETag when its parts were fetched, if known
    # Parts it left unfinished (in flight, stopped, or out of retries): the byte each had
    # reached, by index.
    reached: Mapping[int, int] = field(default_factory=dict)


def reach_to_record(part: Part, written: int, recorded: int, *, answered_whole: bool) -> int | None:
    """The byte to record as reached in ``part``, whose bytes before ``written`` are in the
    staging file and whose record says ``recorded`` (its start where it has none); None when
    there is nothing to record: the part of a file in parts was ``answered_whole`` (a server
    that ignores Range sent the whole file in its place: a run that resumes asks for it from
    byte 0, to take it whole again), reached nothing or its end (its record of being done says
    that), or its record says as much already."""
    if answered_whole or not part.start < written < part.end or written == recorded:
        return None
    return written


def parts_to_fetch(file: RemoteFile, part_size: int, staged: Staged | None) -> list[Part]:
    """The parts of ``part_size`` still to fetch of ``file`` after an interrupted transfer:
    all but those it finished, each from the byte it reached in it.

    What it left counts only if the remote file is unchanged, the parts were cut the same way
    and the staging file still holds the bytes kept: for a file in parts, preallocated, it is
    at full size; for a file of one part, written in order and not preallocated, it reaches at
    least the byte recorded (the file's end, once done) and not past the file's size. A byte
    reached outside its part (a part cut otherwise, a damaged record) counts for nothing.
    """
    parts = split_parts(file.size, part_size)
    if (
        staged is None
        or staged.size != file.size
        or staged.last_modified != file.last_modified
        or staged.part_size != part_size
    ):
        return parts
    todo = []
    for part in parts:
        if part.index in staged.done:
            continue
        reached = staged.reached.get(part.index, part.start)
        start = reached if part.start < reached < part.end else part.start
        todo.append(Part(part.index, start, part.end))
    on_disk = staged.bytes_on_disk
    if len(parts) > 1:
        holds = on_disk == file.size
    else:
        kept = todo[0].start if todo else file.size
        holds = on_disk is not None and kept <= on_disk <= file.size
    return todo if holds else parts
