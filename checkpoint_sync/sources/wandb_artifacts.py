"""The files of a W&B artifact version, page by page, from W&B's GraphQL API.

W&B Training keeps checkpoint N of a model as the artifact version ``ENTITY/PROJECT/NAME:step<N>``
(type ``lora``; NOTES.md). The query below asks that version, by name, for its ``files`` with
``directUrl`` (a short-lived signed URL), ``sizeBytes`` and ``md5``: the connection and fields the
``wandb`` SDK itself reads to download an artifact. Authentication is HTTP Basic ``api:<key>``,
as the SDK sends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from ..api import ApiClient
from ..errors import ApiError, NotFoundError, UsageError
from ..models import OR_UNREADABLE, Unreadable
from .base import answer_when_wanted
from .cursors import advance
from .wandb import step_name

GRAPHQL_PATH = "/graphql"
QUERY = """
query CheckpointArtifactFiles(
    $entityName: String!, $projectName: String!, $name: String!, $cursor: String, $perPage: Int
) {
    project(name: $projectName, entityName: $entityName) {
        artifact(name: $name) {
            files(after: $cursor, first: $perPage) {
                pageInfo { hasNextPage endCursor }
                edges { node { name directUrl sizeBytes md5 } }
            }
        }
    }
}
"""


@dataclass(frozen=True)
class ArtifactPath:
    entity: str
    project: str
    name: str

    def __str__(self) -> str:
        return f"{self.entity}/{self.project}/{self.name}"


def parse_artifact_path(text: str) -> ArtifactPath:
    """``ENTITY/PROJECT/NAME`` (the version is chosen per checkpoint), or `UsageError`."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"--wandb-artifact '{text}' is not ENTITY/PROJECT/NAME")
    _, colon, version = parts[2].partition(":")
    if colon:
        raise UsageError(
            f"--wandb-artifact '{text}': leave out the version (:...); each checkpoint's "
            f"step<N> alias is added{_version_flag(version)}"
        )
    return ArtifactPath(*parts)


def _version_flag(version: str) -> str:
    """The flag that takes the version a `wandb artifact get` user put in the path."""
    if version == "latest":
        return ": --latest takes the newest checkpoint whose weights are there"
    step = version.removeprefix("step")
    if step != version and step.isascii() and step.isdigit():
        return f": --checkpoint {step_name(int(step))} takes that one"
    return ""


class _GraphModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="ignore", frozen=True)


class ArtifactFile(_GraphModel):
    name: str
    direct_url: str
    size_bytes: int
    md5: str


class _Edge(_GraphModel):
    node: Annotated[ArtifactFile | Unreadable, OR_UNREADABLE]


class _PageInfo(_GraphModel):
    has_next_page: bool
    end_cursor: str | None = None


class _Files(_GraphModel):
    page_info: _PageInfo
    edges: list[_Edge]


class _Artifact(_GraphModel):
    files: _Files


class _Project(_GraphModel):
    artifact: _Artifact | None = None


class _Data(_GraphModel):
    project: _Project | None = None


class _Error(_GraphModel):
    message: str


class _Answer(_GraphModel):
    data: _Data | None = None
    errors: list[_Error] | None = None


# A version's first page of files, asked for: what `ArtifactFiles.pages` takes as ``first``.
FirstPage = asyncio.Task[_Answer]


@dataclass(frozen=True)
class ArtifactFiles:
    """Where a model's checkpoint artifacts are, and the API that lists their files."""

    api: ApiClient
    path: ArtifactPath

    def first_page(self, alias: str, page_size: int) -> FirstPage:
        """Ask for the first page of version ``alias``'s files now, in one attempt, for `pages`
        to walk them from later (`answer_when_wanted` asks again)."""
        return asyncio.create_task(self._page(alias, page_size, None, retried=False))

    async def first_page_found(self, alias: str, page_size: int) -> FirstPage:
        """The first page of version ``alias``'s files, asked for now (with retries), as a task
        done; `VersionMissing` if there is no such version."""
        task = asyncio.create_task(self._page(alias, page_size, None))
        self._files(await task, _what(self.path, alias), later=False)
        return task

    async def pages(
        self, alias: str, page_size: int, first: FirstPage | None = None
    ) -> AsyncGenerator[list[ArtifactFile | Unreadable], None]:
        """Every page of the files of version ``alias`` (``first``: its first page, asked for
        already); `VersionMissing` if there is none, `VersionGone` if it went after its first
        page."""
        what = _what(self.path, alias)
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            if first is not None:
                answer = await answer_when_wanted(
                    first, partial(self._page, alias, page_size, None), self.api.retry
                )
                first = None
            else:
                answer = await self._page(alias, page_size, cursor)
            files = self._files(answer, what, later=cursor is not None)
            if not files.edges:
                return
            yield [edge.node for edge in files.edges]
            if not files.page_info.has_next_page:
                return
            cursor = advance(files.page_info.end_cursor, seen, what)

    def _files(self, answer: _Answer, what: str, *, later: bool) -> _Files:
        """The files of a page of the version's (``later``: a page after its first)."""
        # GraphQL reports failures inside a 200 answer.
        if answer.errors:
            raise ApiError(f"{what}: W&B answered: {self.api.said(answer.errors[0].message)}")
        artifact = self.path
        if answer.data is None or answer.data.project is None:
            raise NotFoundError(
                f"{what}: W&B project {artifact.entity}/{artifact.project} not found (check "
                "--wandb-artifact, and that the W&B key may read it)"
            )
        if answer.data.project.artifact is None:
            if later:
                raise VersionGone(f"{what}: deleted after its first page of files was read")
            raise VersionMissing(what)
        return answer.data.project.artifact.files

    async def _page(
        self, alias: str, page_size: int, cursor: str | None, *, retried: bool = True
    ) -> _Answer:
        variables = {
            "entityName": self.path.entity,
            "projectName": self.path.project,
            "name": f"{self.path.name}:{alias}",
            "cursor": cursor,
            "perPage": page_size,
        }
        return await self.api.post(
            GRAPHQL_PATH,
            _Answer,
            what=_what(self.path, alias),
            payload={"query": QUERY, "variables": variables},
            retried=retried,
        )


class VersionMissing(NotFoundError):
    """The artifact has no version of that alias: a checkpoint W&B lists whose weights are not
    uploaded yet, or were deleted (or an artifact path that names no artifact at all)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: not found (check --wandb-artifact)")
        # Where another version was found, the path is right: said without blaming it.
        self.beside_found = f"{what}: not there (its weights not uploaded yet, or deleted)"


class VersionGone(NotFoundError):
    """The version was there for its first page of files, and not for a later one: deleted (or
    its alias taken off) while its files were listed. The artifact path is right."""


def _what(artifact: ArtifactPath, alias: str) -> str:
    return f"W&B artifact {artifact}:{alias}"
