"""Baseten training jobs: ``/v1/training_projects/{project}/jobs/{job}/...``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence, Set
from contextlib import aclosing

from ..api import ApiClient, path_segment
from ..errors import UsageError
from ..models import TrainingJobCheckpoint, TrainingJobCheckpoints, Unreadable
from .base import (
    Available,
    Checkpoint,
    FileKey,
    FilePages,
    Listed,
    Relisted,
    RemoteFile,
    Source,
    SourceContext,
    SyncState,
    UnreadableCheckpoint,
    UnreadableEntry,
    flags_given,
    known_by,
    not_empty,
    whole_list,
)
from .baseten_pages import file_pages, look_for, relist, remote_file, unreadable_checkpoint


class TrainingJobSource:
    """A training job's checkpoints. Files land under ``<job_id>/<checkpoint_id>/...``."""

    name = "baseten-training"
    picked = False

    def __init__(self, api: ApiClient, project: str, job: str, *, page_size: int = 1000) -> None:
        self._api = api
        self._job = job
        self._page_size = page_size
        self._base = f"/v1/training_projects/{path_segment(project)}/jobs/{path_segment(job)}"
        self.description = f"training job {job} of project {project}"
        self._listed_whole: dict[str, frozenset[str]] = {}
        self._moved: set[tuple[str, str]] = set()

    async def checkpoints(self) -> list[Available]:
        answer = await self._api.get(
            f"{self._base}/checkpoints", TrainingJobCheckpoints, what=self.description
        )
        readable = [c for c in answer.checkpoints if isinstance(c, TrainingJobCheckpoint)]
        found: list[Available] = [
            Checkpoint(
                key=c.checkpoint_id,
                name=c.checkpoint_id,
                run=self._job,
                created_at=c.created_at,
                size_bytes=c.size_bytes,
                state=SyncState.parse(c.sync_status),
                status=c.sync_status,
            )
            for c in sorted(readable, key=lambda c: c.created_at)
        ]
        # Its files are never listed (file_pages keeps only the selected checkpoints'): it fails
        # as one entry while the rest of the job is mirrored.
        unreadable = [
            self._unreadable_checkpoint(entry, position)
            for position, entry in enumerate(answer.checkpoints, 1)
            if isinstance(entry, Unreadable)
        ]
        # A checkpoint's id is its directory.
        ids = [c.checkpoint_id for c in readable] + [u.key for u in unreadable]
        self._listed_whole = whole_list(self._job, ids)
        return found + unreadable

    def listed_whole(self) -> Mapping[str, frozenset[str]]:
        return self._listed_whole

    def _unreadable_checkpoint(self, entry: Unreadable, position: int) -> UnreadableCheckpoint:
        """Its checkpoint id is both its unique id and its directory: reports name it by the
        directory it would have landed in."""
        key = entry.get("checkpoint_id", str)
        where = f"{self._job}/{key}" if key else f"{self._job}/? ({known_by(key, position)})"
        return unreadable_checkpoint(entry, key, where)

    async def file_pages(
        self, selected: Sequence[Checkpoint], *, counting: bool = False
    ) -> FilePages:
        if not counting:
            self._moved = set()
        wanted = {c.name for c in selected}
        if not wanted:
            return  # the listing is the whole job's: walked for no checkpoint, it costs requests
        listing = f"{self._base}/checkpoint_files"

        def moved() -> None:
            # One listing for the whole job: a file of any checkpoint may have gone unseen.
            self._moved = {(self._job, name) for name in wanted}

        pages = file_pages(
            self._api,
            listing,
            self._page_size,
            self.description,
            moved=None if counting else moved,
            once=counting,
        )
        async with aclosing(pages):
            async for ref, entries in pages:
                files: list[Listed] = []
                for entry in entries:
                    if isinstance(entry, Unreadable):
                        files.extend(self._unreadable(entry, wanted))
                        continue
                    checkpoint, rest = _placed(entry.relative_file_name)
                    if checkpoint in wanted:
                        files.append(
                            remote_file(entry, ref, run=self._job, checkpoint=checkpoint, path=rest)
                        )
                yield files

    def moved_while_listed(self) -> Set[tuple[str, str]]:
        return self._moved

    def _unreadable(self, entry: Unreadable, wanted: set[str]) -> list[Listed]:
        """The entry as a failure, unless its name shows it belongs to a checkpoint not wanted."""
        name = entry.get("relative_file_name", str)
        rank = entry.get("node_rank", int)
        if name is None:
            return [UnreadableEntry(self._job, None, rank, None, entry.reason)]
        checkpoint, _, rest = name.partition("/")
        if checkpoint not in wanted:
            return []
        return [UnreadableEntry(self._job, checkpoint, rank, rest, entry.reason)]

    async def relist(self, file: RemoteFile) -> dict[FileKey, Relisted]:
        return await relist(self._api, file.origin, self.description, _placed)

    async def look_for(self, file: RemoteFile) -> Relisted | None:
        return await look_for(self._api, file, self.description, _placed)


def _placed(name: str) -> tuple[str, str]:
    """The checkpoint and path a job-level name stands for: it starts with the checkpoint id,
    "checkpoint-10/adapter.bin"."""
    checkpoint, _, rest = name.partition("/")
    return checkpoint, rest


class TrainingJobs:
    """``--project P --job J``."""

    name = TrainingJobSource.name

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--project", type=not_empty, metavar="PROJECT_ID", help="Baseten training project id"
        )
        group.add_argument(
            "--job", type=not_empty, metavar="JOB_ID", help="training job id (with --project)"
        )

    def given(self, args: argparse.Namespace) -> list[str]:
        return flags_given({"--project": args.project, "--job": args.job})

    def build(self, args: argparse.Namespace, context: SourceContext) -> Source:
        if not (args.project and args.job):
            raise UsageError("--project and --job go together")
        return TrainingJobSource(
            context.baseten_api(), args.project, args.job, page_size=context.settings.page_size
        )
