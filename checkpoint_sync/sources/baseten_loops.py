"""Baseten Loops: ``/v1/loops/checkpoints`` filtered by run, base model or ``bt://`` URI.

A trainer and a sampler checkpoint of one run may share a name (NOTES.md), so each lands in a
directory named after its ``bt://`` URI with the slash turned into a dash: the trainer's
``bt://loops:RUN/weights/step-100`` in ``RUN/weights-step-100/<node_rank>/...`` and the sampler's
``bt://loops:RUN/sampler_weights/step-100`` in ``RUN/sampler_weights-step-100/<node_rank>/...``.
Every trainer directory starts with ``weights-`` and every sampler one with ``sampler_weights-``,
so the two can never meet, whatever the names. A checkpoint whose entry the schema does not
admit (a target the pages do not name, say) has no such directory: it is reported, not mirrored.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Mapping, Sequence, Set
from contextlib import aclosing, closing
from dataclasses import dataclass
from functools import partial

from ..api import ApiClient, path_segment
from ..errors import NotFoundError, UsageError
from ..models import (
    CheckpointFile,
    CheckpointFilesPage,
    LoopsCheckpoint,
    LoopsCheckpoints,
    LoopsTarget,
    Unreadable,
)
from .base import (
    AbsentCheckpoint,
    Available,
    Checkpoint,
    FileKey,
    FilePages,
    Listed,
    PageRef,
    Relisted,
    RemoteFile,
    Source,
    SourceContext,
    SyncState,
    UnreadableCheckpoint,
    UnreadableEntry,
    VanishedCheckpoint,
    flags_given,
    known_by,
    marked,
    not_empty,
    started_ahead,
    whole_list,
)
from .baseten_pages import (
    file_pages,
    first_page,
    look_for,
    read_page,
    relist,
    remote_file,
    unreadable_checkpoint,
)

URI_PREFIX = "bt://loops:"
URI_FORM = "bt://loops:RUN_ID/weights/NAME or bt://loops:RUN_ID/sampler_weights/NAME"
# The URI's word for each target; also the first half of the checkpoint's directory name.
KIND = {LoopsTarget.TRAINER: "weights", LoopsTarget.SAMPLER: "sampler_weights"}
TARGET_OF_KIND = {kind: target for target, kind in KIND.items()}
TARGETS = {target.value for target in LoopsTarget}


@dataclass(frozen=True)
class LoopsUri:
    run_id: str
    target: LoopsTarget
    name: str

    def __str__(self) -> str:
        return f"{URI_PREFIX}{self.run_id}/{KIND[self.target]}/{self.name}"


def parse_bt_uri(text: str) -> LoopsUri:
    """``bt://loops:<run_id>/(weights|sampler_weights)/<name>``; `UsageError` naming the flaw."""
    if not text.startswith("bt://"):
        raise UsageError(f"'{text}' is not a bt:// URI; expected {URI_FORM}")
    if not text.startswith(URI_PREFIX):
        raise UsageError(
            f"'{text}' is not a Loops checkpoint (bt://loops:...); expected {URI_FORM}"
        )
    parts = text.removeprefix(URI_PREFIX).split("/")
    if len(parts) != 3:
        raise UsageError(
            f"'{text}' has {len(parts)} part(s) after bt://loops:, expected 3 "
            f"(RUN_ID/KIND/NAME): {URI_FORM}"
        )
    run_id, kind, name = parts
    if not run_id:
        raise UsageError(f"'{text}' has no run id: {URI_FORM}")
    target = TARGET_OF_KIND.get(kind)
    if target is None:
        raise UsageError(
            f"'{text}': '{kind}' is neither weights (trainer) nor sampler_weights (sampler)"
        )
    if not name:
        raise UsageError(f"'{text}' has no checkpoint name: {URI_FORM}")
    return LoopsUri(run_id, target, name)


def checkpoint_dir(target: LoopsTarget, name: str) -> str:
    """Its directory under the run: ``weights-<name>`` or ``sampler_weights-<name>``."""
    return f"{KIND[target]}-{name}"


class LoopsSource:
    """Loops checkpoints matching one filter; files land under ``<run_id>/<kind>-<name>/...``."""

    name = "baseten-loops"

    def __init__(
        self,
        api: ApiClient,
        query: tuple[str, str],
        description: str,
        *,
        target: LoopsTarget | None = None,
        latest: bool = False,
        names: Sequence[str] = (),
        include_syncing: bool = False,
        page_size: int = 1000,
    ) -> None:
        self._api = api
        self._query = query
        self.picked = query[0] == "checkpoint_path"
        self._target = target
        # What --latest chooses from (`_deleted_newest`), as the run's selection does.
        self._latest = latest
        self._names = tuple(names)
        self._include_syncing = include_syncing
        self._page_size = page_size
        self.description = description
        self._listed_whole: dict[str, frozenset[str]] = {}
        self._moved: set[tuple[str, str]] = set()
        # What --latest found deleted, by key: looked for once a run (a list read again, after a
        # wait for the mirror's lock, only tells what was removed upstream).
        self._deleted: dict[str, AbsentCheckpoint] | None = None
        # The first page of files of the checkpoint --latest found, for the walk that comes
        # first (unless the list is read again first).
        self._found: dict[str, asyncio.Task[CheckpointFilesPage]] = {}

    async def checkpoints(self) -> list[Available]:
        answer = await self._api.get(
            "/v1/loops/checkpoints",
            LoopsCheckpoints,
            what=self.description,
            params=dict([self._query]),
        )
        readable = [c for c in answer.checkpoints if isinstance(c, LoopsCheckpoint)]
        found: list[Available] = [
            Checkpoint(
                key=c.id,
                name=checkpoint_dir(c.target, c.checkpoint_id),
                run=c.run_id,
                created_at=c.created_at,
                size_bytes=c.size_bytes,
                state=SyncState.parse(c.sync_status),
                status=c.sync_status,
                target=c.target.value,
            )
            for c in sorted(readable, key=lambda c: c.created_at)
            if self._target in (None, c.target)
        ]
        found += [
            _unreadable(entry, position)
            for position, entry in enumerate(answer.checkpoints, 1)
            if isinstance(entry, Unreadable)
            # One whose target shows it is not wanted is left out quietly, as a readable one is.
            and (self._target is None or entry.get("target", str) in (None, self._target.value))
        ]
        if not found:
            # The API answers an unknown run or model with an empty list, not a 404.
            raise NotFoundError(f"{self.description}: no checkpoints found")
        query, value = self._query
        if query == "run_id":  # every checkpoint of the run, whatever --target keeps
            directories: list[str | None] = [
                checkpoint_dir(c.target, c.checkpoint_id) for c in readable
            ]
            directories += [_directory(e) for e in answer.checkpoints if isinstance(e, Unreadable)]
            self._listed_whole = whole_list(value, directories)
        if self._latest:
            if self._deleted is None:
                self._deleted = await self._deleted_newest(found)
            else:
                # Read again once the mirror's lock was taken, maybe after a long wait: the page
                # found before may hold URLs expired since; the walk asks anew.
                self._found.clear()
            found = marked(found, self._deleted)
        return found

    async def _deleted_newest(self, available: list[Available]) -> dict[str, AbsentCheckpoint]:
        """The checkpoints --latest would take before the newest whose files are still listed,
        by key: each deleted after the list was read (its file listing answers 404), which a
        rerun, reading the list anew, would not see either. The first page of files of the one
        found is kept for the walk."""
        from ..plan import select_checkpoints  # loaded here: plan imports the sources

        deleted: dict[str, AbsentCheckpoint] = {}
        while True:
            try:
                selection = select_checkpoints(
                    marked(available, deleted),
                    names=self._names,
                    latest=True,
                    include_syncing=self._include_syncing,
                    what=self.description,
                )
            except NotFoundError:
                if not deleted:
                    raise
                # Every checkpoint --latest could take was deleted: the newest says why.
                newest = next(iter(deleted.values()))
                raise NotFoundError(f"{newest.where}: {newest.reason}") from None
            (taken,) = selection.checkpoints
            listing, page_size, what = self._listing(taken)
            page = asyncio.create_task(read_page(self._api, PageRef(listing, 0, page_size), what))
            try:
                await page
            except NotFoundError as exc:
                where = f"{taken.run}/{taken.name}"
                deleted[taken.key] = AbsentCheckpoint(
                    taken.key, where, _gone(exc), names=(taken.name,), created_at=taken.created_at
                )
                continue
            self._found[taken.key] = page
            return deleted

    def listed_whole(self) -> Mapping[str, frozenset[str]]:
        return self._listed_whole

    async def file_pages(
        self, selected: Sequence[Checkpoint], *, counting: bool = False
    ) -> FilePages:
        def first(checkpoint: Checkpoint) -> asyncio.Task[CheckpointFilesPage]:
            found = self._found.pop(checkpoint.key, None)
            return first_page(self._api, *self._listing(checkpoint)) if found is None else found

        if not counting:
            self._moved = set()
        with closing(started_ahead(selected, first)) as walk:
            for checkpoint, asked in walk:
                moved = (
                    None
                    if counting
                    else partial(self._moved.add, (checkpoint.run, checkpoint.name))
                )
                try:
                    pages = file_pages(
                        self._api, *self._listing(checkpoint), asked, moved=moved, once=counting
                    )
                    async with aclosing(pages):
                        async for ref, entries in pages:
                            yield [_listed(checkpoint, ref, entry) for entry in entries]
                except NotFoundError as exc:
                    # The run's other checkpoints are still there: this one fails alone.
                    gone = _gone(exc)
                    yield [VanishedCheckpoint(checkpoint.run, checkpoint.name, None, None, gone)]

    def moved_while_listed(self) -> Set[tuple[str, str]]:
        return self._moved

    def _listing(self, checkpoint: Checkpoint) -> tuple[str, int, str]:
        """Where its files are listed, the page size, and how messages name it."""
        listing = f"/v1/loops/checkpoints/{path_segment(checkpoint.key)}/files"
        return listing, self._page_size, _what(checkpoint.run, checkpoint.name)

    async def relist(self, file: RemoteFile) -> dict[FileKey, Relisted]:
        return await relist(self._api, file.origin, *_relisting(file))

    async def look_for(self, file: RemoteFile) -> Relisted | None:
        return await look_for(self._api, file, *_relisting(file))


def _relisting(file: RemoteFile) -> tuple[str, Callable[[str], tuple[str, str]]]:
    """How messages name ``file``'s listing, and where a name listed in it lands: a
    checkpoint's own listing, its names are paths in it."""
    return _what(file.run, file.checkpoint), lambda name: (file.checkpoint, name)


def _listed(checkpoint: Checkpoint, ref: PageRef, entry: CheckpointFile | Unreadable) -> Listed:
    """A file listing entry of ``checkpoint``; names are relative to the checkpoint itself
    (NOTES.md)."""
    if isinstance(entry, Unreadable):
        return UnreadableEntry(
            checkpoint.run,
            checkpoint.name,
            entry.get("node_rank", int),
            entry.get("relative_file_name", str),
            entry.reason,
        )
    return remote_file(
        entry, ref, run=checkpoint.run, checkpoint=checkpoint.name, path=entry.relative_file_name
    )


def _unreadable(entry: Unreadable, position: int) -> UnreadableCheckpoint:
    """An entry of the checkpoint list, named by what it tells of itself: `--checkpoint` may
    call it by its name as reports show it, or by the directory it would land in where its
    target is one the pages name (its entry off the schema elsewhere)."""
    key, name = entry.get("id", str), entry.get("checkpoint_id", str)
    run, target = entry.get("run_id", str) or "?", entry.get("target", str)
    names: tuple[str, ...] = (name,) if name else ()
    if directory := _directory(entry):
        names += (directory,)
    where = f"{run}/{name or '?'} (target {target or '?'}, {known_by(key, position)})"
    return unreadable_checkpoint(entry, key, where, names=names)


def _directory(entry: Unreadable) -> str | None:
    """The directory of a checkpoint list entry off the schema, where its name and a target the
    pages name tell it."""
    name, target = entry.get("checkpoint_id", str), entry.get("target", str)
    if name and target is not None and target in TARGETS:
        return checkpoint_dir(LoopsTarget(target), name)
    return None


def _what(run: str, checkpoint: str) -> str:
    return f"Loops checkpoint {run}/{checkpoint}"


def _gone(not_found: NotFoundError) -> str:
    """Why a checkpoint whose file listing answered ``not_found`` (404) cannot be mirrored."""
    return f"deleted after the checkpoint list was read: {not_found}"


class LoopsRuns:
    """``--loops-run RUN_ID``, ``--loops-checkpoint bt://...`` or ``--base-model MODEL``."""

    name = LoopsSource.name

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--loops-run", type=not_empty, metavar="RUN_ID", help="every checkpoint of a Loops run"
        )
        group.add_argument(
            "--loops-checkpoint",
            type=not_empty,
            metavar="URI",
            help="one Loops checkpoint: bt://loops:RUN_ID/(weights|sampler_weights)/NAME",
        )
        group.add_argument(
            "--base-model",
            type=not_empty,
            metavar="MODEL",
            help="Loops checkpoints of all runs of a base model",
        )
        group.add_argument(
            "--target",
            choices=[t.value for t in LoopsTarget],
            help="only Loops checkpoints for the trainer (weights) or the sampler",
        )

    def given(self, args: argparse.Namespace) -> list[str]:
        return flags_given(
            {
                "--loops-run": args.loops_run,
                "--loops-checkpoint": args.loops_checkpoint,
                "--base-model": args.base_model,
                "--target": args.target,
            }
        )

    def build(self, args: argparse.Namespace, context: SourceContext) -> Source:
        target = LoopsTarget(args.target) if args.target else None
        filters = [
            (query, value)
            for query, value in (
                ("run_id", args.loops_run),
                ("base_model", args.base_model),
                ("checkpoint_path", args.loops_checkpoint),
            )
            if value is not None
        ]
        # Beyond a bt:// URI's form (and not being empty), the values are the API's to judge.
        if len(filters) != 1:
            raise UsageError("choose one of --loops-run, --loops-checkpoint and --base-model")
        query, value = filters[0]
        if query == "checkpoint_path":
            uri = parse_bt_uri(value)
            if target not in (None, uri.target):
                raise UsageError(f"--target {args.target} contradicts {uri}")
            value, description = str(uri), f"Loops checkpoint {uri}"
        else:
            description = (
                f"Loops run {value}"
                if query == "run_id"
                else f"Loops checkpoints of base model {value}"
            )
            if target is not None:
                description += f" ({target.value} checkpoints)"
        return LoopsSource(
            context.baseten_api(),
            (query, value),
            description,
            target=target,
            latest=args.latest,
            names=args.checkpoint,
            include_syncing=context.settings.include_syncing,
            page_size=context.settings.page_size,
        )
