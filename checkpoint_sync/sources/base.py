"""What every source gives the engine: checkpoints, file entries page by page, fresh URLs."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
    Set,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from itertools import islice
from typing import Any, Protocol, TypeVar
from weakref import WeakKeyDictionary

import anyio

from ..api import ApiClient
from ..config import Settings
from ..errors import AuthError, TransientError
from ..net import NetSettings
from ..retry import RetryPolicy
from ..wire import HttpClient


class SyncState(StrEnum):
    COMPLETE = "complete"
    SYNCING = "syncing"
    UNKNOWN = "unknown"  # the API reported none (null)
    OTHER = "other"  # a status the pages do not name (FAILED, say)

    @classmethod
    def parse(cls, status: str | None) -> SyncState:
        """The providers' spellings: ``COMPLETE``, ``COMPLETED``, ``SYNCING`` or null."""
        match (status or "").upper():
            case "COMPLETE" | "COMPLETED":
                return cls.COMPLETE
            case "SYNCING":
                return cls.SYNCING
            case "":
                return cls.UNKNOWN
            case _:
                return cls.OTHER


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint of a run, as a source lists it."""

    key: str  # the provider's unique id, used to list the checkpoint's files
    name: str  # the directory it lands in under its run
    run: str
    created_at: datetime | None
    size_bytes: int | None
    state: SyncState
    step: int | None = None
    target: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    status: str | None = None  # the provider's own spelling of ``state``, for reports


@dataclass(frozen=True, slots=True)
class UnreadableCheckpoint:
    """A checkpoint list entry that does not match the API's schema (a Loops target the pages do
    not name, say): with no directory it could safely land in, its files are never listed, and
    it fails as one entry."""

    key: str | None  # its unique id, where the entry tells it: what --checkpoint names it by
    where: str  # how a report names it
    reason: str
    # The other names --checkpoint may call it by: what a report shows, the directory it would
    # land in. Named, it is refused as it is by its id, not taken for a checkpoint never listed.
    names: tuple[str, ...] = ()
    # Where the entry tells it: --latest says so when it passes over one newer than it takes.
    created_at: datetime | None = None
    # W&B lists no times: there --latest tells a newer one by its step, where the entry has one.
    step: int | None = None

    @property
    def problem(self) -> str:
        return f"its listing entry is unreadable ({self.reason}), so it cannot be mirrored"


@dataclass(frozen=True, slots=True)
class AbsentCheckpoint(UnreadableCheckpoint):
    """A checkpoint listed whose files are not there (a W&B artifact version not uploaded yet,
    or deleted), ``reason`` saying so. Only `--latest` looks for them before listing: it passes
    over such a one for the newest whose files are there, and names it. Named by `--checkpoint`,
    it is a checkpoint as any other, not an unreadable entry."""

    @property
    def problem(self) -> str:
        return self.reason


# What a checkpoint list holds.
Available = Checkpoint | UnreadableCheckpoint


def marked(
    available: Sequence[Available], absent: Mapping[str, AbsentCheckpoint]
) -> list[Available]:
    """``available``, each checkpoint in ``absent`` (by key) replaced by its entry there."""
    return [absent.get(c.key, c) if isinstance(c, Checkpoint) else c for c in available]


def known_by(key: str | None, position: int) -> str:
    """How a report tells an unreadable checkpoint list entry: by its id, or where it gives none,
    by its place in the list (1 the first), as two such entries would otherwise read alike."""
    return f"id {key}" if key else f"entry {position} of the checkpoint list"


def left_out(unreadable: Sequence[UnreadableCheckpoint]) -> str:
    """For a message that found no checkpoint to take: the ones left out as unreadable (how
    many, and the first), which would otherwise go unmentioned; "" when there are none."""
    if not unreadable:
        return ""
    first = unreadable[0]
    return f" ({len(unreadable)} left out as unreadable, {first.where}: {first.reason})"


def whole_list(run: str, directories: Iterable[str | None]) -> dict[str, frozenset[str]]:
    """``{run: directories}`` of a run's whole checkpoint list: a checkpoint of the run in no
    other directory was removed upstream. Nothing where an entry does not tell its directory
    (None): any checkpoint may be that one."""
    listed = list(directories)
    if None in listed:
        return {}
    return {run: frozenset(d for d in listed if d is not None)}


T = TypeVar("T")
R = TypeVar("R")

# At most how many checkpoints' file listings a source that lists each checkpoint apart (Loops,
# W&B) keeps asked for ahead of the one being planned (`Lookahead`).
LISTINGS_AHEAD = 8


class Lookahead:
    """How many requests a walk keeps asked for ahead, from 1 to ``most``: as many as are
    answered in the time the walk takes to use one answer. A walk faster than the API (a far
    one) then pays its latency once for them all; one held up elsewhere (by the downloads) keeps
    one ahead, as answers kept waiting only age, their presigned URLs with them."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.size = 1
        self._latency: float | None = None  # of the latest answer
        # Weak: a request answered and then let go unused (a guess proved wrong) must not stay
        # held, its answer with it, for the rest of the walk.
        self._answered_at: WeakKeyDictionary[asyncio.Future[Any], float] = WeakKeyDictionary()
        self._handed: tuple[float, asyncio.Future[Any]] | None = None

    def asked(self, request: asyncio.Future[Any]) -> None:
        """Time the answer to ``request``, asked for now."""
        loop = asyncio.get_running_loop()
        asked_at = loop.time()

        def answered(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                self._answered_at[done] = loop.time()
                self._latency = loop.time() - asked_at

        request.add_done_callback(answered)

    def handed_on(self, request: asyncio.Future[Any]) -> None:
        """The walk goes on with the answer to ``request`` (there, or awaited next)."""
        self._handed = (asyncio.get_running_loop().time(), request)

    def wanted(self) -> None:
        """The walk wants its next answer: the time it used the last one (from having it to
        now) sets how many to keep asked for."""
        if self._handed is None or self._latency is None:
            return
        handed_at, request = self._handed
        had_it = max(handed_at, self._answered_at.pop(request, handed_at))
        using = max(asyncio.get_running_loop().time() - had_it, 0.001)
        self.size = min(self.most, max(1, math.ceil(self._latency / using)))


async def answer_when_wanted(
    asked: asyncio.Task[R], again: Callable[[], Awaitable[R]], policy: RetryPolicy
) -> R:
    """The answer to a request asked for ahead, in one attempt, now that the walk wants it. One
    that failed on a transient error is asked for ``again``, with retries of its own, as it
    would have been without the read-ahead (the API may be back, and the outage did not matter
    until now): once the wait ``policy`` asks after that failure (its ``Retry-After``) has gone
    by since it came. Requests kept ahead retrying meanwhile would each send a walk's worth of
    retries to an API that refuses them (429), and use up their retries before they were
    wanted."""
    try:
        return await asked
    except TransientError as exc:
        waited = time.monotonic() - exc.at
        await anyio.sleep(max(0.0, policy.delay(1, exc.retry_after, random.random()) - waited))
        return await again()


def started_ahead(
    items: Iterable[T], start: Callable[[T], asyncio.Task[R]], most: int = LISTINGS_AHEAD
) -> Generator[tuple[T, asyncio.Task[R]], None, None]:
    """``items`` in order, each with the task ``start`` made for it, the tasks of the items after
    it (as many as a `Lookahead` keeps) started before it is handed on. Those not yet done when
    the walk stops are cancelled: close it (``contextlib.closing``)."""
    lookahead = Lookahead(most)
    started: deque[tuple[T, asyncio.Task[R]]] = deque()
    waiting = iter(items)

    def top_up() -> None:
        # Kept when the lookahead shrinks: those started already go on.
        for item in islice(waiting, max(0, 1 + lookahead.size - len(started))):
            task = start(item)
            lookahead.asked(task)
            started.append((item, task))

    try:
        while True:
            lookahead.wanted()
            top_up()
            if not started:
                return
            lookahead.handed_on(started[0][1])
            yield started[0]
            started.popleft()
    finally:
        for _, task in started:
            task.cancel()


@dataclass(frozen=True, slots=True)
class PageRef:
    """Where an entry was listed: re-reading this page gives a fresh presigned URL."""

    listing: str
    page_token: int
    page_size: int


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to mirror, at ``<run>/<checkpoint>/<node_rank>/<path>`` under DEST."""

    run: str
    checkpoint: str
    node_rank: int
    path: str  # as listed, relative to the checkpoint; checked by `layout` before use
    size: int
    last_modified: str
    url: str
    origin: PageRef
    # The content's MD5 as the provider lists it (base64; W&B), checked once the file is fetched.
    md5: str | None = None


@dataclass(frozen=True, slots=True)
class UnreadableEntry:
    """A listing entry that does not match the API's schema: it fails as a file, unfetched."""

    run: str
    checkpoint: str | None  # None where the entry does not say
    node_rank: int | None
    name: str | None
    reason: str

    @property
    def where(self) -> str:
        """Its mirror path, as far as the entry tells it."""
        rank = "?" if self.node_rank is None else self.node_rank
        return f"{self.run}/{self.checkpoint or '?'}/{rank}/{self.name or '(unnamed entry)'}"

    @property
    def problem(self) -> str:
        return f"its listing entry is unreadable ({self.reason})"


@dataclass(frozen=True, slots=True)
class VanishedCheckpoint(UnreadableEntry):
    """A selected checkpoint whose files are not there to list (a Loops listing answering 404,
    as for one deleted after the checkpoint list was read; a W&B artifact version missing),
    ``reason`` saying which. Like an entry that tells no path, it fails alone, and the others
    are listed on."""

    @property
    def where(self) -> str:
        return f"{self.run}/{self.checkpoint}"

    @property
    def problem(self) -> str:
        return self.reason


# What a listing page holds.
Listed = RemoteFile | UnreadableEntry
# A source's listing pages: a caller that stops early closes them (``contextlib.aclosing``), which
# lets go of the requests asked for ahead.
FilePages = AsyncGenerator[list[Listed], None]

# A file of a run, as `file_key` names it: (checkpoint, node_rank, path).
FileKey = tuple[str, int, str]


def file_key(file: RemoteFile) -> FileKey:
    return file.checkpoint, file.node_rank, file.path


@dataclass(frozen=True, slots=True)
class Relisted:
    """A file as its listing shows it now: a fresh URL, and what tells whether it changed."""

    url: str
    size: int
    last_modified: str


class Source(Protocol):
    """A provider's listing. ``name`` goes into the manifest beside every file."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str:
        """What is being mirrored, for messages: "training job J of project P"."""
        ...

    @property
    def picked(self) -> bool:
        """Whether its checkpoints are the one a flag picked by its id (``--loops-checkpoint``),
        not a run's: a restore, held to what ``--checkpoint`` is (`plan.select_checkpoints`)."""
        ...

    async def checkpoints(self) -> Sequence[Available]:
        """Every checkpoint of the run, oldest first; entries it cannot read come last."""
        ...

    def listed_whole(self) -> Mapping[str, frozenset[str]]:
        """After `checkpoints`: the directories of every checkpoint of each run whose whole
        checkpoint list it read, selected or not (see `whole_list`)."""
        ...

    def file_pages(self, selected: Sequence[Checkpoint], *, counting: bool = False) -> FilePages:
        """The files of the selected checkpoints, one listing page at a time. ``counting``: a
        walk beside another only to count them, which leaves `moved_while_listed` to the
        other, and shows each file once (a listing that changed is not walked again)."""
        ...

    def moved_while_listed(self) -> Set[tuple[str, str]]:
        """After `file_pages`: the checkpoints (run, directory) whose file listing changed while
        it was walked, so that a file of theirs it did not show may still be there."""
        ...

    async def relist(self, file: RemoteFile) -> dict[FileKey, Relisted]:
        """The files of ``file``'s listing page as listed now (fresh presigned URLs), by
        `file_key`: the page read again for ``file``, and shared with the other files on it."""
        ...

    async def look_for(self, file: RemoteFile) -> Relisted | None:
        """``file`` as listed now wherever its listing shows it (None: nowhere), for a file that
        its page read again no longer shows: a walk for it alone, whose failure is its own."""
        ...


@dataclass(frozen=True)
class SourceContext:
    """What a source needs to talk to its provider."""

    http: HttpClient
    settings: Settings
    retry: RetryPolicy

    def baseten_api(self) -> ApiClient:
        return self._client(
            self.settings.api_url,
            self.settings.baseten_key(),
            self.settings.auth_scheme,
            self.settings.api_key_env,
            "api_key",
        )

    def wandb_api(self) -> ApiClient:
        return self._client(
            self.settings.wandb_api_url,
            self.settings.wandb_key(),
            "Bearer",
            self.settings.wandb_api_key_env,
            "wandb_api_key",
        )

    def wandb_graphql(self) -> ApiClient:
        """W&B's GraphQL API, with the W&B key as HTTP Basic credentials."""
        return self._client(
            self.settings.wandb_base_url,
            self.settings.wandb_basic_credentials(),
            "Basic",
            self.settings.wandb_api_key_env,
            "wandb_api_key",
        )

    def _client(
        self, url: str, key: str | None, scheme: str, key_env: str, key_setting: str
    ) -> ApiClient:
        if not key:
            raise AuthError(f"no API key: set {key_env} (or {key_setting} in the config file)")
        return ApiClient(
            self.http,
            url,
            api_key=key,
            auth_scheme=scheme,
            key_hint=key_env,
            retry=self.retry,
            secrets=self.settings.secrets(),
        )


@dataclass(frozen=True)
class SourceRecipe:
    """A source built from the flags, the client it talks through (opened once, by `open`),
    and the settings it was built with."""

    http: HttpClient
    source: Source
    settings: Settings
    net: NetSettings
    retry: RetryPolicy

    @classmethod
    def build(
        cls,
        build: Callable[[SourceContext], Source],
        settings: Settings,
        net: NetSettings,
        retry: RetryPolicy,
    ) -> SourceRecipe:
        """Built before the run starts: flags that do not go together, or a missing key, are
        refused as the settings are, not as a run that failed."""
        http = HttpClient(net)
        return cls(http, build(SourceContext(http, settings, retry)), settings, net, retry)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[tuple[HttpClient, Source]]:
        async with self.http:
            yield self.http, self.source


def not_empty(text: str) -> str:
    """The value of a flag that names something (an id, a URI, a metric, a pattern): an empty one
    (an unset variable in a script) names nothing, and is refused before any request, rather
    than sent as an empty path segment or filter, which asks the API something else."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def flags_given(values: Mapping[str, object]) -> list[str]:
    """Of a source's flags and their parsed values, those given on the command line (argparse
    leaves the others None)."""
    return [flag for flag, value in values.items() if value is not None]


class SourceSpec(Protocol):
    """How the command line picks and builds a source; one per provider module."""

    @property
    def name(self) -> str: ...

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add the flags that choose this source (``--project``, ``--loops-run``...)."""
        ...

    def given(self, args: argparse.Namespace) -> list[str]:
        """This source's flags on the command line (``--loops-run``...); any of them chooses it."""
        ...

    def build(self, args: argparse.Namespace, context: SourceContext) -> Source:
        """The source the flags describe; `UsageError` if they are incomplete."""
        ...
