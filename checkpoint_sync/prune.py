"""``--delete``: removing from the mirror the checkpoints their provider has deleted.

A cron mirror of a job that keeps its last few checkpoints would otherwise grow for ever. Only a
checkpoint missing from its run's checkpoint list read whole goes (`plan.removed_upstream`), never
one a listing merely did not reach; and of it only the files the manifest records (what
checkpoint-sync put there) whose rank and path the run takes. A user's own files stay, and so do
the directories that hold them. A checkpoint still listed keeps every file: its file listing is
paged by offset, and a file deleted upstream mid-walk can shift another one out of it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field

from .errors import FileError, LocalIOError
from .filesystem import Places, fsync_directory
from .layout import mirror_path_parts, nameable, quoted
from .manifest import Manifest
from .plan import FileFilter, removed_upstream


@dataclass(frozen=True)
class Deletion:
    """A mirrored file to delete: ``path`` relative to DEST."""

    path: str
    size: int
    checkpoint: str  # "<run>/<checkpoint>", for reports


def deletions(
    manifest: Manifest, files: FileFilter, whole_lists: Mapping[str, frozenset[str]]
) -> Generator[Deletion, None, None]:
    """The mirrored files of checkpoints removed upstream that ``files`` takes, in the order of
    their paths (a dry run's `delete` lines); none of a run whose checkpoint list is empty
    (`held_back`)."""
    for run, checkpoint in _removed(manifest, whole_lists):
        yield from _taken(manifest, files, run, checkpoint)


def kept(
    manifest: Manifest,
    files: FileFilter,
    whole_lists: Mapping[str, frozenset[str]],
    pruner: Pruner,
) -> list[str]:
    """The checkpoints removed upstream ("<run>/<checkpoint>") that a run without ``--delete``
    keeps, where ``--delete`` would delete a file of theirs: each is told by its first such file
    (`Pruner.goes`), so that a mirror holding large ones does not look at each of their files
    on every run. A file that cannot be looked at tells nothing, as ``--delete`` would keep it.
    Nor does a checkpoint whose directory is gone (removed by hand, which leaves its records
    for ``--delete`` to drop): its records, a million maybe, would be walked on every run."""
    held = []
    for run, checkpoint in _removed(manifest, whole_lists):
        if not pruner.may_hold(f"{run}/{checkpoint}"):
            continue
        with closing(_taken(manifest, files, run, checkpoint)) as taken:
            if any(pruner.surely_goes(doomed) for doomed in taken):
                held.append(f"{run}/{checkpoint}")
    return held


def _removed(
    manifest: Manifest, whole_lists: Mapping[str, frozenset[str]]
) -> Iterator[tuple[str, str]]:
    """The (run, checkpoint) of the checkpoints removed upstream that the manifest records files
    of, in the order of their paths; none of a run whose checkpoint list is empty."""
    for run, listed in sorted(whole_lists.items(), key=lambda item: _directory_key(item[0])):
        if not listed:
            continue
        for checkpoint in sorted(manifest.checkpoints_of(run), key=_directory_key):
            if removed_upstream(run, checkpoint, whole_lists):
                yield run, checkpoint


def _taken(
    manifest: Manifest, files: FileFilter, run: str, checkpoint: str
) -> Generator[Deletion, None, None]:
    """The recorded files of a checkpoint that ``files`` takes, by path."""
    for file in manifest.files_in(run, checkpoint):
        _, _, rank, path = mirror_path_parts(file.path)
        if files.takes(rank, path):
            yield Deletion(file.path, file.size, f"{run}/{checkpoint}")


def _directory_key(name: str) -> str:
    """Directories in the order of the paths under them: "a/" after "a-b/", as '/' sorts after
    '-', though "a" sorts before "a-b"."""
    return f"{name}/"


@dataclass
class Going:
    """The files a walk of `deletions` found going, counted, not kept: a job that lost a
    million files upstream must not cost their list in memory."""

    files: int = 0
    bytes: int = 0
    # Each once, in the order first met: by a lookup per file, not a walk of those met before
    # (thousands of checkpoints removed at once).
    _checkpoints: dict[str, None] = field(default_factory=dict)

    def add(self, doomed: Deletion) -> None:
        self.files += 1
        self.bytes += doomed.size
        self._checkpoints[doomed.checkpoint] = None

    @property
    def checkpoints(self) -> list[str]:
        return list(self._checkpoints)


def held_back(manifest: Manifest, whole_lists: Mapping[str, frozenset[str]]) -> list[str]:
    """The runs with mirrored files whose checkpoint list was empty. An empty list is more
    likely an API's bad moment than a run emptied on purpose: a mirror of every checkpoint of a
    run is not deleted on its word alone."""
    return [
        run for run, listed in whole_lists.items() if not listed and manifest.checkpoints_of(run)
    ]


class Pruner:
    """Deletes mirrored files under ``dest``, then the directories they leave empty and their
    records: the files first, as on a disk another program filled the manifest cannot be
    opened to be written (SQLite's WAL index needs room) until they are gone."""

    def __init__(self, dest: str, *, fsync: bool = False) -> None:
        self._dest = dest
        self._fsync = fsync
        self._emptied: set[str] = set()
        self._places = Places(dest)

    def goes(self, doomed: Deletion) -> bool:
        """Whether the file at ``doomed``'s place is the mirror's, to delete (`FileError` if it
        cannot be looked at). What is there and is no regular file of the recorded size (a
        user's, or changed by hand), or lies under a symlink (where it may be another
        checkpoint's file), is not the mirror's; nor is a file gone already. One this locale
        cannot name is `UnsafePathError`: kept, as one that cannot be looked at."""
        nameable(doomed.path)
        if not self._places.own(os.path.dirname(doomed.path)):
            return False
        final = f"{self._dest}/{doomed.path}"
        try:
            info = os.lstat(final)
        except FileNotFoundError:
            return False  # a run killed after deleting it, before dropping its record
        except OSError as exc:
            raise FileError(f"cannot delete {quoted(final)}: {exc.strerror or exc}") from exc
        return stat.S_ISREG(info.st_mode) and info.st_size == doomed.size

    def surely_goes(self, doomed: Deletion) -> bool:
        """`goes`, where the file can be looked at; one that cannot is not counted as going
        (only the walk that deletes reports it, as a failure)."""
        try:
            return self.goes(doomed)
        except FileError:
            return False

    def may_hold(self, directory: str) -> bool:
        """Whether a file under ``directory`` (relative to DEST) may be the mirror's, to delete
        (`goes`): not where it is no directory, or leads elsewhere (a symlink)."""
        return os.path.isdir(f"{self._dest}/{directory}") and self._places.own(directory)

    def delete(self, doomed: Deletion, *, goes: bool) -> None:
        """Delete ``doomed``'s file if it ``goes`` (`FileError` if it cannot be), and its record
        with `finish`."""
        directory = os.path.dirname(doomed.path)
        if goes:
            final = f"{self._dest}/{doomed.path}"
            try:
                os.unlink(final)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise FileError(f"cannot delete {quoted(final)}: {exc.strerror or exc}") from exc
        if self._places.own(directory):
            # Also where it was gone already: that run may have been killed before the rmdirs.
            self._emptied.add(directory)

    def finish(self, manifest: Manifest, recorded: Iterable[Deletion]) -> None:
        """Remove the directories that deleting left empty, up to the checkpoint's own; a
        directory still holding anything stays. With ``fsync``, each directory that lost entries
        and stays is then synced, once. Only then are the records in ``recorded`` (`deletions`
        of ``manifest``) whose file is no longer the mirror's (deleted, gone already, or not
        what was recorded: `goes`) dropped from ``manifest``, and committed: a run killed (or a
        power loss) before leaves them, and so the files and directories, to the next (a
        recorded file found gone is dropped then), as does a directory that cannot be synced
        (`LocalIOError`), as its deletions may not be durable. Read from the manifest again, not
        kept from the deleting: a million of them would cost their list in memory. A file that
        could not be deleted, or looked at, keeps its record."""
        directories: set[str] = set()
        for directory in self._emptied:
            # "<run>/<checkpoint>/<rank>/..." up to "<run>/<checkpoint>"
            while directory.count("/") >= 1:
                directories.add(directory)
                directory = os.path.dirname(directory)
        lost, gone = set(self._emptied), set[str]()
        for directory in sorted(directories, key=lambda d: d.count("/"), reverse=True):
            try:
                os.rmdir(f"{self._dest}/{directory}")
            except FileNotFoundError:
                pass  # removed by a run killed before its sync: its parent's is still owed
            except OSError:
                continue  # not empty (a user's file, a file the run did not take): it stays
            gone.add(directory)
            lost.add(os.path.dirname(directory))
        if self._fsync:
            for directory in sorted(lost - gone):
                path = f"{self._dest}/{directory}"
                try:
                    fsync_directory(path)
                except FileNotFoundError:
                    pass  # removed by hand: nothing of the mirror's is left to come back
                except OSError as exc:
                    raise LocalIOError(
                        f"cannot make the deletions in {path} durable: {exc.strerror or exc}"
                    ) from exc
        for doomed in recorded:
            try:
                if self.goes(doomed):
                    continue
            except FileError:
                continue
            # The row the walk has just read: SQLite lets a query's current row go under it.
            manifest.drop_record(doomed.path)
        manifest.commit()
