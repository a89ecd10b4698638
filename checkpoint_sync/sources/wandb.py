"""W&B Training: a model's checkpoints (step and metrics), the pick of one, and its weights.

``GET /v1/preview/models/{model_id}/checkpoints`` lists the checkpoints with cursor pagination; it
is what picks *which* checkpoint (``--latest``: the highest step whose weights are there;
``--best METRIC``). The weights are W&B artifacts (`wandb_artifacts`), found through
``--wandb-artifact ENTITY/PROJECT/NAME`` and mirrored under ``<model_id>/step-<N>/0/...``: an
artifact has no node ranks, so all of it is rank 0.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from contextlib import aclosing, closing
from typing import TYPE_CHECKING

from ..api import ApiClient, path_segment
from ..errors import NotFoundError, UsageError
from ..models import Unreadable, WandbCheckpoint, WandbCheckpointPage
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
    file_key,
    flags_given,
    known_by,
    left_out,
    marked,
    not_empty,
    started_ahead,
    whole_list,
)
from .cursors import advance

if TYPE_CHECKING:
    from .wandb_artifacts import ArtifactFile, ArtifactFiles, FirstPage

MAX_LIMIT = 100  # the API's ceiling for ``limit``
# How many artifact versions --latest asks for, from the newest down, before it takes none there
# for a wrong path: a checkpoint's weights are uploaded soon after it is saved, so more than a
# few newer ones missing is unlikely, and a wrong path must not cost a request per checkpoint.
MOST_LOOKED_FOR = 4


def best_checkpoint(
    checkpoints: Sequence[Checkpoint],
    metric: str,
    *,
    minimize: bool = False,
    what: str = "model",
    unreadable: Sequence[UnreadableCheckpoint] = (),
) -> Checkpoint:
    """The checkpoint with the highest ``metric`` (lowest with ``minimize``); ties go to the later
    step. Checkpoints without the metric, or with NaN, take no part; nor do ``unreadable`` ones,
    which only a failure to find one names."""
    scored = [c for c in checkpoints if not math.isnan(c.metrics.get(metric, math.nan))]
    if not scored:
        if not checkpoints:
            readable = " readable" if unreadable else ""
            raise NotFoundError(f"{what} has no{readable} checkpoints{left_out(unreadable)}")
        known = sorted({name for c in checkpoints for name in c.metrics})
        raise UsageError(
            f"no checkpoint of {what} has the metric '{metric}' "
            f"(its metrics: {', '.join(known) or 'none'})"
        )
    sign = -1.0 if minimize else 1.0
    return max(scored, key=lambda c: (sign * c.metrics[metric], c.step or 0))


class WandbSource:
    """A W&B Training model's checkpoints, narrowed to the best one when ``best`` is given; with
    ``latest`` (of those ``names`` names, if any) and ``artifacts``, those newer than the newest
    whose weights are there as `AbsentCheckpoint`."""

    name = "wandb-training"
    picked = False

    def __init__(
        self,
        api: ApiClient,
        model_id: str,
        *,
        artifacts: ArtifactFiles | None,
        best: tuple[str, bool] | None = None,
        latest: bool = False,
        names: Sequence[str] = (),
        page_size: int = MAX_LIMIT,
    ) -> None:
        self._api = api
        self._model = model_id
        self._artifacts = artifacts
        self._best = best
        self._latest = latest
        self._names = tuple(names)
        self._page_size = page_size
        self.description = f"W&B Training model {model_id}"
        self._listed_whole: dict[str, frozenset[str]] = {}
        # What --latest found, by checkpoint key: looked for once a run (a list read again, after
        # a wait for the mirror's lock, only tells what was removed upstream).
        self._absent: dict[str, AbsentCheckpoint] | None = None
        # The first page of files of the version --latest found, for the walk that comes first
        # (unless the list is read again first).
        self._found: dict[str, FirstPage] = {}

    async def checkpoints(self) -> list[Available]:
        pages = [page async for page in self._pages()]
        entries = [c for page in pages for c in page.data]
        listed = [c for c in entries if isinstance(c, WandbCheckpoint)]
        found = [
            Checkpoint(
                key=c.id,
                name=step_name(c.step),
                run=self._model,
                created_at=None,
                size_bytes=None,
                # The API lists saved checkpoints only; it has no upload state.
                state=SyncState.COMPLETE,
                step=c.step,
                metrics=c.metrics,
            )
            for c in sorted(listed, key=lambda c: c.step)
        ]
        # One with no step has no directory (step-<N>) and no artifact version (step<N>).
        unreadable = [
            _unreadable(self._model, c, position)
            for position, c in enumerate(entries, 1)
            if isinstance(c, Unreadable)
        ]
        # Every page was read (one that fails stops the run): the list is whole, unless an
        # empty page ended the walk while saying there was more. Read again (after a wait for
        # the mirror's lock), what an earlier read found whole says nothing of now.
        self._listed_whole = {}
        if not pages[-1].has_more:
            of_unreadable = [None if u.step is None else step_name(u.step) for u in unreadable]
            names = [*(c.name for c in found), *of_unreadable]
            self._listed_whole = whole_list(self._model, names)
        if self._best is not None:
            # --best asks for one checkpoint: it passes over those unreadable, as --latest does.
            metric, minimize = self._best
            best = best_checkpoint(
                found, metric, minimize=minimize, what=self.description, unreadable=unreadable
            )
            return [best]
        available: list[Available] = [*found, *unreadable]
        if self._latest and self._artifacts is not None:
            if self._absent is None:
                self._absent = await self._absent_newest(self._artifacts, available)
            else:
                # Read again once the mirror's lock was taken, maybe after a long wait: the page
                # found before may hold URLs expired since, each a refresh; the walk asks anew.
                self._found.clear()
            available = marked(available, self._absent)
        return available

    async def _absent_newest(
        self, artifacts: ArtifactFiles, available: list[Available]
    ) -> dict[str, AbsentCheckpoint]:
        """The checkpoints --latest would take before the newest whose weights are there, by
        key. The Training API lists a checkpoint once it is saved, and its weights are uploaded
        after: their versions are asked for one at a time, from the newest down, up to the first
        there. Where none of `MOST_LOOKED_FOR` is, the artifact path is more likely wrong: the
        first not found stops the run, as it would alone, saying which others were not there
        where older ones were left unlooked for (their weights may still be uploading)."""
        # Loaded here: plan imports the sources, and `wandb_artifacts` waits for --wandb-artifact.
        from ..plan import select_checkpoints
        from .wandb_artifacts import VersionMissing

        absent: dict[str, AbsentCheckpoint] = {}
        missing: list[tuple[str, VersionMissing]] = []
        while True:
            try:
                selection = select_checkpoints(
                    marked(available, absent),
                    names=self._names,
                    latest=True,
                    what=self.description,
                )
            except NotFoundError:
                if not missing:  # a checkpoint named that is not listed, say
                    raise
                raise missing[0][1] from None  # every checkpoint --latest could take is absent
            (taken,) = selection.checkpoints
            if len(missing) == MOST_LOOKED_FOR:
                raise _newest_missing(missing)
            alias = _alias(taken)
            try:
                self._found[alias] = await artifacts.first_page_found(alias, self._page_size)
                return absent
            except VersionMissing as exc:
                missing.append((alias, exc))
                where = f"{taken.run}/{taken.name}"
                absent[taken.key] = AbsentCheckpoint(
                    taken.key, where, exc.beside_found, names=(taken.name,), step=taken.step
                )

    def listed_whole(self) -> Mapping[str, frozenset[str]]:
        return self._listed_whole

    async def _pages(self) -> AsyncIterator[WandbCheckpointPage]:
        """Every page up to one that says there is no more, or an empty one."""
        path = f"/v1/preview/models/{path_segment(self._model)}/checkpoints"
        params: dict[str, str | int] = {"limit": min(self._page_size, MAX_LIMIT), "order": "asc"}
        seen: set[str] = set()
        while True:
            page = await self._api.get(
                path, WandbCheckpointPage, what=self.description, params=params
            )
            yield page
            if not page.data or not page.has_more:
                return
            last = page.data[-1]
            last_id = last.get("id", str) if isinstance(last, Unreadable) else last.id
            params["after"] = advance(page.last_id or last_id, seen, self.description)

    async def file_pages(
        self, selected: Sequence[Checkpoint], *, counting: bool = False
    ) -> FilePages:
        # Nothing to leave to another walk: what moved_while_listed tells never changes.
        from .wandb_artifacts import VersionGone, VersionMissing  # loaded with `ArtifactFiles`

        artifacts = self._artifacts_or_fail()

        def first_page(checkpoint: Checkpoint) -> FirstPage:
            alias = _alias(checkpoint)
            found = self._found.pop(alias, None)
            return artifacts.first_page(alias, self._page_size) if found is None else found

        walk = started_ahead(selected, first_page)
        # A checkpoint whose version is missing (its weights not uploaded yet, or deleted) fails
        # alone once another's was found; where none is, the artifact path is likely wrong, and
        # the run stops at the first as not found. One found, then gone, shows the path right.
        missing: list[tuple[Checkpoint, VersionMissing]] = []
        with closing(walk):
            for checkpoint, first in walk:
                alias = _alias(checkpoint)
                # A URL is refreshed by walking the version's files from the start: a LoRA
                # artifact holds a handful, and a GraphQL cursor cannot be rebuilt from a page
                # number.
                ref = PageRef(listing=alias, page_token=0, page_size=self._page_size)
                pages = artifacts.pages(alias, self._page_size, first)
                try:
                    async with aclosing(pages):
                        async for files in pages:
                            yield [self._listed(checkpoint, ref, f) for f in files]
                except VersionMissing as exc:
                    missing.append((checkpoint, exc))
                except VersionGone as exc:
                    yield [_vanished(checkpoint, str(exc))]
        if missing and len(missing) == len(selected):
            (only, not_found), *_ = missing
            if self._best is not None:
                raise _best_missing(only, not_found, *self._best) from not_found
            raise not_found
        if missing:
            yield [_vanished(checkpoint, exc.beside_found) for checkpoint, exc in missing]

    def moved_while_listed(self) -> Set[tuple[str, str]]:
        # A version's files are paged by a cursor, not by an offset that a file added or removed
        # ahead of it would shift, and they do not change once the version is committed (an
        # upload makes a new one).
        return frozenset()

    def _listed(self, checkpoint: Checkpoint, ref: PageRef, f: ArtifactFile | Unreadable) -> Listed:
        if isinstance(f, Unreadable):
            return UnreadableEntry(self._model, checkpoint.name, 0, f.get("name", str), f.reason)
        return RemoteFile(
            run=self._model,
            checkpoint=checkpoint.name,
            node_rank=0,
            path=f.name,
            size=f.size_bytes,
            last_modified=_version(f.md5),
            url=f.direct_url,
            origin=ref,
            md5=f.md5,
        )

    async def relist(self, file: RemoteFile) -> dict[FileKey, Relisted]:
        # Walked from the start up to the file's page: each file it shows was listed before it.
        artifacts = self._artifacts_or_fail()
        found: dict[FileKey, Relisted] = {}
        key = file_key(file)
        async with aclosing(artifacts.pages(file.origin.listing, self._page_size)) as pages:
            async for files in pages:
                for f in files:
                    if not isinstance(f, Unreadable):
                        entry = Relisted(f.direct_url, f.size_bytes, _version(f.md5))
                        found[file.checkpoint, 0, f.name] = entry
                if key in found:
                    break
        return found

    async def look_for(self, file: RemoteFile) -> Relisted | None:
        # Its page is the walk up to it: one made for another file may have stopped before it.
        return (await self.relist(file)).get(file_key(file))

    def _artifacts_or_fail(self) -> ArtifactFiles:
        if self._artifacts is None:
            raise UsageError(
                "W&B Training weights are W&B artifacts: pass --wandb-artifact "
                "ENTITY/PROJECT/NAME (the model's W&B path) to list or fetch their files"
            )
        return self._artifacts


class WandbTraining:
    """``--wandb-model MODEL_ID [--wandb-artifact ENTITY/PROJECT/NAME] [--best METRIC]``."""

    name = WandbSource.name

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--wandb-model", type=not_empty, metavar="MODEL_ID", help="W&B Training model id"
        )
        group.add_argument(
            "--wandb-artifact",
            type=not_empty,
            metavar="ENTITY/PROJECT/NAME",
            help="the W&B model whose step<N> artifact versions hold the weights (to fetch them)",
        )
        group.add_argument(
            "--best",
            type=not_empty,
            metavar="METRIC",
            help="only the W&B checkpoint with the highest METRIC",
        )
        group.add_argument(
            "--minimize", action="store_true", help="with --best: the lowest METRIC wins"
        )

    def given(self, args: argparse.Namespace) -> list[str]:
        return flags_given(
            {
                "--wandb-model": args.wandb_model,
                "--wandb-artifact": args.wandb_artifact,
                "--best": args.best,
                "--minimize": args.minimize or None,  # a store_true flag: False when not given
            }
        )

    def build(self, args: argparse.Namespace, context: SourceContext) -> Source:
        if args.wandb_model is None:
            raise UsageError("--wandb-artifact, --best and --minimize go with --wandb-model")
        if args.minimize and args.best is None:
            raise UsageError("--minimize goes with --best METRIC")
        if args.best is not None and (args.latest or args.checkpoint):
            raise UsageError(
                "--best, --latest and --checkpoint each pick the checkpoints: choose one of them"
            )
        artifacts = None
        if args.wandb_artifact is not None:
            # Lazy: building its GraphQL models costs every other source's run ~5 ms of start-up.
            from .wandb_artifacts import ArtifactFiles, parse_artifact_path

            path = parse_artifact_path(args.wandb_artifact)
            artifacts = ArtifactFiles(context.wandb_graphql(), path)
        return WandbSource(
            context.wandb_api(),
            args.wandb_model,
            artifacts=artifacts,
            best=None if args.best is None else (args.best, args.minimize),
            latest=args.latest,
            names=args.checkpoint,
            page_size=context.settings.page_size,
        )


def _unreadable(model: str, entry: Unreadable, position: int) -> UnreadableCheckpoint:
    """An entry of the checkpoint list, named by what it tells of itself."""
    key, step = entry.get("id", str), entry.get("step", int)
    where = f"{model}/step-{'?' if step is None else step} ({known_by(key, position)})"
    return UnreadableCheckpoint(key, where, entry.reason, step=step)


def _newest_missing(missing: Sequence[tuple[str, NotFoundError]]) -> NotFoundError:
    """The versions of the newest checkpoints, newest first (alias, error), all missing, with
    older ones not looked for: the path is more likely wrong, but where it is right, their
    weights are not uploaded yet, and the message must not leave the user checking it alone."""
    (_, first), *rest, (last, _) = missing  # `MOST_LOOKED_FOR` of them
    nor = ", ".join(alias for alias, _ in rest)
    return NotFoundError(
        f"{first}; nor are {nor} and {last}, and older versions were not looked for: where the "
        f"path is right, the weights of these {len(missing)} newest checkpoints are not uploaded "
        "yet, and --checkpoint takes an older one"
    )


def _best_missing(
    checkpoint: Checkpoint, missing: NotFoundError, metric: str, minimize: bool
) -> NotFoundError:
    """``--best``'s checkpoint has no weights: the path may be wrong, or they may not be uploaded
    yet, and the user must learn which checkpoint was taken, and why, to tell."""
    flags = f"--best {metric}{' --minimize' if minimize else ''}"
    return NotFoundError(
        f"{missing}; it holds the weights of {checkpoint.run}/{checkpoint.name}, which {flags} "
        f"took ({metric} {checkpoint.metrics[metric]:.4g}): where the path is right, they are "
        "not uploaded yet, or were deleted, and --checkpoint in place of --best takes another"
    )


def _vanished(checkpoint: Checkpoint, problem: str) -> VanishedCheckpoint:
    return VanishedCheckpoint(checkpoint.run, checkpoint.name, None, None, problem)


def step_name(step: int) -> str:
    """The name, and directory, of the checkpoint at ``step`` (its weights' artifact version is
    `_alias`'s)."""
    return f"step-{step}"


def _alias(checkpoint: Checkpoint) -> str:
    """The artifact version that holds the checkpoint's weights (NOTES.md)."""
    return f"step{checkpoint.step}"


def _version(md5: str) -> str:
    """What the manifest keeps as an artifact file's last_modified: artifact files are
    content-addressed, so the digest is the change marker."""
    return f"md5:{md5}"
