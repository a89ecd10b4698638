"""A built-in server that speaks the providers' APIs (``shared/api``) over real HTTP.

It backs ``checkpoint-sync demo``, the tests and the benchmarks. It serves:

- the Baseten training-job API (checkpoints and paginated ``checkpoint_files``);
- the Baseten Loops API (checkpoints by exactly one filter, paginated files per checkpoint);
- the W&B Training checkpoint listing (cursor pagination), and the one W&B GraphQL query that
  lists an artifact version's files with signed URLs (what `sources.wandb_artifacts` asks);
- presigned-style object URLs (``/objects/<id>?X-Amz-...``) that expire, honour ``Range``, and
  misbehave on demand through `Faults`: errors, resets, short bodies, stalls, ignored ranges.

File contents are synthetic and deterministic (`content`), so any byte can be checked without
keeping the data. ``python -m checkpoint_sync.localserver serve-tree`` lists a directory tree
whose files another server (nginx in ``benchmarks/``) serves.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import random
import re
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import overload
from urllib.parse import quote

import anyio
from aiohttp import web

# Content is a prime-length random block read at a per-file rotation, so no two parts of a
# file, nor two files, share their bytes at power-of-two offsets.
_BLOCK_LEN = 1_048_573
_BLOCK = random.Random(20261122).randbytes(_BLOCK_LEN)
_BLOCK2 = _BLOCK + _BLOCK
SEND_CHUNK = 256 << 10
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def content(seed: int, offset: int, length: int) -> bytes:
    """Bytes ``offset .. offset+length`` of the synthetic file ``seed``."""
    out = bytearray()
    position = (seed * 7919 + offset) % _BLOCK_LEN
    while len(out) < length:
        take = min(length - len(out), _BLOCK_LEN)
        out += _BLOCK2[position : position + take]
        position = (position + take) % _BLOCK_LEN
    return bytes(out)


@dataclass
class ServedFile:
    node_rank: int
    name: str  # relative_file_name as listed
    size: int
    last_modified: str
    seed: int
    # Where the bytes come from instead of `content`: another server's URL (serve-tree).
    external_url: str | None = None


@dataclass
class ServedCheckpoint:
    checkpoint_id: str
    created_at: datetime
    sync_status: str | None = "COMPLETE"  # as the pages spell it per checkpoint
    files: list[ServedFile] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class ServedJob:
    project_id: str
    job_id: str
    checkpoints: list[ServedCheckpoint] = field(default_factory=list)


@dataclass
class ServedLoopsCheckpoint:
    """A Loops checkpoint: ``checkpoint`` holds its name, status and files (relative to it)."""

    id: str  # unique, unlike the name a trainer and a sampler checkpoint may share
    run_id: str
    target: str  # "trainer" or "sampler", or a kind the pages do not name yet
    base_model: str
    checkpoint: ServedCheckpoint

    @property
    def uri(self) -> str:
        kind = {"trainer": "weights", "sampler": "sampler_weights"}.get(self.target, self.target)
        return f"bt://loops:{self.run_id}/{kind}/{self.checkpoint.checkpoint_id}"

    def matches(self, query: str, value: str) -> bool:
        """Whether the list filter ``query=value`` selects this checkpoint."""
        mine = {"run_id": self.run_id, "base_model": self.base_model, "checkpoint_path": self.uri}
        return mine[query] == value


@dataclass
class ServedWandbCheckpoint:
    """A W&B Training checkpoint, and the files of its artifact version ``<name>:step<N>``."""

    id: str
    step: int | None  # None: served as null, which the OpenAPI page does not allow
    metrics: dict[str, float | None]  # None: served as null, as W&B does for one not logged
    files: list[ServedFile] = field(default_factory=list)
    # False: listed by the Training API, but its artifact has no such version (the weights not
    # uploaded yet, or deleted).
    uploaded: bool = True


@dataclass
class ServedWandbModel:
    model_id: str
    entity: str  # the artifact's W&B path: entity/project/name
    project: str
    name: str
    checkpoints: list[ServedWandbCheckpoint] = field(default_factory=list)
    # Hand out the first page whatever the cursor: a listing that never advances.
    stuck_cursor: bool = False
    # Say there is more on every page: the walk ends on an empty page that still says so.
    more_promised: bool = False


@dataclass
class Faults:
    """Switches for misbehaviour, changed freely while the server runs."""

    # Answer ranged requests with 200 and the whole body.
    ignore_range: bool = False
    # Share of object requests that fail, and the ways they may fail.
    fail_rate: float = 0.0
    fail_kinds: tuple[str, ...] = ("500", "502", "503", "429", "reset", "short", "stall")
    # Presigned URLs stop working this many seconds after they were listed.
    url_ttl: float | None = None
    # Names that always answer 403 (a permission problem, not an expiry).
    denied: set[str] = field(default_factory=set)
    # Names whose bytes arrive damaged: the first byte of every response body is flipped.
    corrupt: set[str] = field(default_factory=set)
    # Names listed with a size that is not a number (an entry off the API's schema); for a
    # checkpoint in a checkpoint list, its id (a Loops checkpoint's `id`, a training job's
    # `checkpoint_id`).
    unreadable: set[str] = field(default_factory=set)
    # Names listed without their relative_file_name in a Baseten file listing: an entry off the
    # schema that does not tell which checkpoint it is of.
    nameless: set[str] = field(default_factory=set)
    # Checkpoints (by id, as for `unreadable`) listed with a null size_bytes, which the pages do
    # not allow.
    sizeless: set[str] = field(default_factory=set)
    # Per-response send rate in bytes/s (None: as fast as possible).
    throttle: float | None = None
    # Answer 206 with a Content-Range shifted by this many bytes, or whose total is off by so many.
    shift_content_range: int = 0
    misstate_total: int = 0
    # Send this many bytes past the range asked for (Content-Length counts them).
    overlong_body: int = 0
    # Answer a ranged request with at most this many bytes from its start, as CDNs and gateways
    # that cap range answers do (RFC 9110 lets a server send less than asked for); 0: no cap.
    range_cap: int = 0
    # A new weak ETag on every answer (W/"..."): weak validators say nothing about the bytes.
    weak_etags: bool = False
    stall_seconds: float = 30.0
    # The Retry-After header of an injected 429 (of an object or of the API).
    retry_after: str = "0"
    # Decides a fault for one request from (name, start, end), before `fail_rate` is drawn;
    # besides `fail_kinds`, "unterminated": the whole body, chunked, without its last chunk;
    # "chunked": the whole body, chunked; "empty": the head as for the range, and a chunked
    # body without a byte; "late": the answer as it should be, after ``stall_seconds``.
    hook: Callable[[str, int, int], str | None] | None = None
    seed: int = 7
    # Seconds every API request waits before it is answered (a slow listing).
    api_delay: float = 0.0
    # Answers for the next API requests, one each, instead of the real one: an HTTP status
    # ("308", "401", "404", "422", "429", "500"...; a 3xx but 304 with a Location), a broken
    # body ("not-json", "truncated"), or None for the real answer.
    api_faults: list[str | None] = field(default_factory=list)
    # As ``api_faults``, for the file listing page at a page_token (once each): pages asked for
    # at once reach the server in no set order.
    page_faults: dict[int, str] = field(default_factory=dict)
    # File listings that never end: "stuck" hands back the page_token it was given, "repeat"
    # hands out ever larger tokens and repeats the last page once the files run out, "empty"
    # hands out ever larger tokens and empty pages once they run out (NOTES.md: a client stops
    # on an empty page).
    endless_listing: str | None = None
    # How many entries a page of a file listing holds, from its offset and the page_size asked
    # for (None: as many as asked), as an API that caps page_size or ends pages where it likes.
    page_length: Callable[[int, int], int] | None = None
    # File listing tokens that count pages, not entries (NOTES.md says they are offsets).
    page_numbers: bool = False
    # Loops checkpoints (by id) still in the checkpoint list whose file listing answers 404, as
    # it does for one deleted after the list was read.
    files_gone: set[str] = field(default_factory=set)
    # Called with the offset of every file listing page (a W&B artifact version's too) once it
    # is answered, on the server's loop: a test changes the catalog there, as uploads and
    # deletions upstream do while a listing is walked (the pages after it see the change).
    on_page: Callable[[int], None] | None = None
    # API answers leave out the fields the pages do not require, as a real server may: a file
    # listing page's next_page_token and a checkpoint's sync_status where null (their default),
    # and a W&B page's object, first_id and last_id (the client has its entries' ids).
    required_only: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


@dataclass
class InFlight:
    """Requests being answered now, and the most there ever were at once."""

    now: int = 0
    most: int = 0

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            yield
        finally:
            self.now -= 1


@dataclass
class Traffic:
    """What clients asked for, for tests to assert on."""

    object_requests: int = 0
    object_bytes_sent: int = 0
    # Object bodies being sent (what a client's connection count shows).
    objects_in_flight: InFlight = field(default_factory=InFlight)
    api_requests: int = 0
    api_in_flight: InFlight = field(default_factory=InFlight)
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    # The W&B artifact versions (``NAME:ALIAS``) whose files the GraphQL query asked for, a page
    # each, in the order asked.
    versions_asked: list[str] = field(default_factory=list)
    # How often each object fault was injected.
    faults: dict[str, int] = field(default_factory=dict)


@dataclass
class Catalog:
    api_key: str = "local-key"
    jobs: list[ServedJob] = field(default_factory=list)
    loops: list[ServedLoopsCheckpoint] = field(default_factory=list)
    wandb_api_key: str = "wandb-local-key"
    wandb_models: list[ServedWandbModel] = field(default_factory=list)

    def job(self, project_id: str, job_id: str) -> ServedJob | None:
        for job in self.jobs:
            if job.project_id == project_id and job.job_id == job_id:
                return job
        return None

    def files(self) -> Iterator[ServedFile]:
        for job in self.jobs:
            for checkpoint in job.checkpoints:
                yield from checkpoint.files


def synthetic_job(
    project_id: str = "demo-project",
    job_id: str = "demo-job",
    *,
    checkpoints: int = 3,
    ranks: int = 2,
    large_files: int = 2,
    large_size: int = 48 << 20,
    small_files: int = 40,
    small_size: int = 64 << 10,
    syncing_last: bool = False,
) -> ServedJob:
    """A training job with multi-rank checkpoints: a few large shards and many small files."""
    job = ServedJob(project_id, job_id)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    seed = 0
    for c in range(checkpoints):
        name = f"checkpoint-{(c + 1) * 10}"
        created = base + timedelta(hours=c)
        status = "SYNCING" if syncing_last and c == checkpoints - 1 else "COMPLETE"
        checkpoint = ServedCheckpoint(name, created, status)
        stamp = created.isoformat()
        for rank in range(ranks):
            for i in range(large_files):
                seed += 1
                shard = f"{name}/model-{i + 1:05d}-of-{large_files:05d}.safetensors"
                checkpoint.files.append(ServedFile(rank, shard, large_size + i * 4099, stamp, seed))
            for i in range(small_files):
                seed += 1
                small = f"{name}/extra/state_{i:04d}.json"
                checkpoint.files.append(ServedFile(rank, small, small_size + i * 31, stamp, seed))
        job.checkpoints.append(checkpoint)
    return job


def synthetic_loops_run(
    run_id: str,
    base_model: str = "Qwen/Qwen3-8B",
    *,
    names: tuple[str, ...] = ("step-10", "step-20"),
    ranks: int = 1,
    files: int = 3,
    size: int = 3000,
    syncing_last: bool = False,
    first_seed: int = 100_000,
) -> list[ServedLoopsCheckpoint]:
    """A Loops run with a trainer and a sampler checkpoint of each name.

    Both hold files of the same relative names, with different contents: mirrored into one
    directory, one would overwrite the other.
    """
    found = []
    base = datetime(2026, 11, 2, tzinfo=UTC)
    seed = first_seed
    for i, name in enumerate(names):
        status = "SYNCING" if syncing_last and i == len(names) - 1 else "COMPLETE"
        for minute, target in enumerate(("trainer", "sampler")):
            created = base + timedelta(hours=i, minutes=minute)
            checkpoint = ServedCheckpoint(name, created, status)
            for rank in range(ranks):
                for j in range(files):
                    seed += 1
                    shard = f"adapter/shard-{j}.safetensors"
                    stamp = created.isoformat()
                    checkpoint.files.append(ServedFile(rank, shard, size + seed % 97, stamp, seed))
            unique = f"lc-{run_id}-{target}-{name}"
            found.append(ServedLoopsCheckpoint(unique, run_id, target, base_model, checkpoint))
    return found


def synthetic_wandb_model(
    model_id: str,
    metrics: Mapping[int, Mapping[str, float | None]],
    *,
    entity: str = "team",
    project: str = "agents",
    name: str = "agent-001",
    files: int = 2,
    size: int = 3000,
    first_seed: int = 200_000,
) -> ServedWandbModel:
    """A W&B Training model with a checkpoint per step of ``metrics`` (step -> its metrics)."""
    model = ServedWandbModel(model_id, entity, project, name)
    stamp = datetime(2026, 11, 3, tzinfo=UTC).isoformat()
    seed = first_seed
    for step, values in metrics.items():
        checkpoint_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{step}"))
        checkpoint = ServedWandbCheckpoint(checkpoint_id, step, dict(values))
        for j in range(files):
            seed += 1
            checkpoint.files.append(
                ServedFile(0, f"adapter/part-{j}.safetensors", size + seed % 89, stamp, seed)
            )
        model.checkpoints.append(checkpoint)
    return model


def demo_catalog() -> Catalog:
    """The demo's job: about 400 MB over 3 checkpoints x 2 ranks, the newest still syncing."""
    return Catalog(api_key="demo-key", jobs=[synthetic_job(syncing_last=True)])


class Joined(Sequence[ServedFile]):
    """Lists of files read as one, as the catalog holds them now (tests change it while it is
    listed), without copying them: a page of a job's listing costs its own entries and a step
    per checkpoint, where a copy of the whole job's list for each page cost the server 41 s of
    CPU over the 1,000 pages of a 1,000,000-entry job."""

    def __init__(self, parts: list[list[ServedFile]]) -> None:
        self._parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    def __iter__(self) -> Iterator[ServedFile]:
        # Not Sequence's, which would index each file from the start.
        return itertools.chain.from_iterable(self._parts)

    @overload
    def __getitem__(self, index: int) -> ServedFile: ...

    @overload
    def __getitem__(self, index: slice) -> list[ServedFile]: ...

    def __getitem__(self, index: int | slice) -> ServedFile | list[ServedFile]:
        if isinstance(index, int):
            position = index + len(self) if index < 0 else index
            found = self[position : position + 1] if position >= 0 else []
            if not found:
                raise IndexError(index)
            return found[0]
        if index.step not in (None, 1):
            raise ValueError("a listing is read in pages, without a step")
        start, stop, _ = index.indices(len(self))
        page: list[ServedFile] = []
        for part in self._parts:
            if stop <= 0:
                break
            page += part[max(start, 0) : stop]
            start, stop = start - len(part), stop - len(part)
        return page


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalServer:
    """The API and object server; ``async with LocalServer(catalog) as server: server.url``."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.catalog = catalog
        self.faults = faults or Faults()
        self.traffic = Traffic()
        self._host = host
        self._port = port
        self._tls = tls  # serve HTTPS with this context
        self._secret = random.Random().randbytes(16)
        self._files: dict[str, ServedFile] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        jobs = "/v1/training_projects/{project}/jobs/{job}"
        app.router.add_get(f"{jobs}/checkpoints", self._api(self._job_checkpoints))
        app.router.add_get(f"{jobs}/checkpoint_files", self._api(self._job_files))
        loops = "/v1/loops/checkpoints"
        app.router.add_get(loops, self._api(self._loops_checkpoints))
        app.router.add_get(f"{loops}/{{checkpoint_id}}/files", self._api(self._loops_files))
        app.router.add_get(
            "/v1/preview/models/{model_id}/checkpoints",
            self._wandb(self._wandb_checkpoints, "Bearer"),
        )
        app.router.add_post("/graphql", self._wandb(self._wandb_graphql, "Basic"))
        # Presigned URLs are signed for GET only (NOTES.md): aiohttp's add_get would also run
        # `_object` for a HEAD, and its body would follow the head.
        app.router.add_get("/objects/{file_id}", self._object, allow_head=False)
        app.router.add_head("/objects/{file_id}", self._object_head)
        return app

    async def __aenter__(self) -> LocalServer:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self._tls else 'http'}://{self._host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            # Shielded: in a scope a signal cancelled, the cleanup would raise the cancellation
            # in place of the error the code it served stopped with (`demo` would not say it).
            # Bounded: the stopped process must not wait long on a client that lingers.
            with anyio.move_on_after(5, shield=True):
                await self._runner.cleanup()

    # --- the management API ----------------------------------------------------------------------

    def _api(self, handler: Handler) -> Handler:
        return self._guarded(handler, self._baseten_key)

    def _baseten_key(self, authorization: str) -> bool:
        """The management API takes ``Bearer <key>`` and ``Api-Key <key>`` alike."""
        scheme, _, key = authorization.partition(" ")
        return scheme in ("Bearer", "Api-Key") and hmac.compare_digest(
            key.encode(), self.catalog.api_key.encode()
        )

    def _guarded(self, handler: Handler, authorized: Callable[[str], bool]) -> Handler:
        """``handler`` as an API's: counted, a fault injected in its place, and a 401 where
        the ``Authorization`` header is not one ``authorized`` takes."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            async with self._api_request():
                return await answer(request)

        async def answer(request: web.Request) -> web.StreamResponse:
            if (injected := await self._injected(handler, request)) is not None:
                return injected
            if not authorized(request.headers.get("Authorization", "")):
                return web.json_response({"detail": "Invalid API key"}, status=401)
            return await handler(request)

        return guarded

    async def _injected(self, handler: Handler, request: web.Request) -> web.StreamResponse | None:
        """The answer `Faults.api_faults` (or `Faults.page_faults`, for the page_token asked
        for) has next for an API request instead of the real one."""
        if self.faults.api_faults and (kind := self.faults.api_faults.pop(0)) is not None:
            return await _api_fault(kind, handler, request, self.faults.retry_after)
        token = request.query.get("page_token", "")
        if token.isdigit() and (kind := self.faults.page_faults.pop(int(token), None)):
            return await _api_fault(kind, handler, request, self.faults.retry_after)
        return None

    @contextlib.asynccontextmanager
    async def _api_request(self) -> AsyncIterator[None]:
        """An API request counted while it is answered, `Faults.api_delay` late."""
        self.traffic.api_requests += 1
        with self.traffic.api_in_flight.counted():
            if self.faults.api_delay:
                await asyncio.sleep(self.faults.api_delay)
            yield

    def _find_job(self, request: web.Request) -> ServedJob:
        job = self.catalog.job(request.match_info["project"], request.match_info["job"])
        if job is None:
            raise web.HTTPNotFound(
                text='{"detail": "Training job not found"}', content_type="application/json"
            )
        return job

    async def _job_checkpoints(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        # Required date-times (TrainingJobV1), a job without checkpoints too.
        stamp = (job.checkpoints[0].created_at if job.checkpoints else _JOB_CREATED).isoformat()
        return web.json_response(
            {
                "training_job": {
                    "id": job.job_id,
                    "created_at": stamp,
                    "current_status": "TRAINING_JOB_COMPLETED",
                    "instance_type": {
                        "id": "H100x8",
                        "name": "8 H100s",
                        "memory_limit_mib": 2 << 20,
                        "millicpu_limit": 192000,
                        "gpu_count": 8,
                        "gpu_type": "H100",
                        "gpu_memory_limit_mib": 80 << 10,
                    },
                    "updated_at": stamp,
                    "training_project_id": job.project_id,
                    "training_project": {"id": job.project_id, "name": job.project_id},
                },
                "checkpoints": [
                    {
                        "checkpoint_id": c.checkpoint_id,
                        "created_at": c.created_at.isoformat(),
                        "checkpoint_type": "lora",
                        "base_model": "Qwen/Qwen3-8B",
                        "lora_adapter_config": None,
                        "size_bytes": self._listed_size(c.checkpoint_id, c.size_bytes),
                        **self._optional(sync_status=c.sync_status),
                        "training_job_id": job.job_id,
                    }
                    for c in job.checkpoints
                ],
            }
        )

    async def _job_files(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        return self.file_page(request, Joined([c.files for c in job.checkpoints]))

    def _listed_size(self, key: str, size: int) -> int | str | None:
        """A file's or checkpoint's size as listed: not a number where `Faults.unreadable`
        names it (its name, or its checkpoint id), null where `Faults.sizeless` does."""
        if key in self.faults.sizeless:
            return None
        return "unknown" if key in self.faults.unreadable else size

    def _file_entry(self, file: ServedFile) -> dict[str, object]:
        entry: dict[str, object] = {
            "url": self.presign(file),
            "relative_file_name": file.name,
            "node_rank": file.node_rank,
            "size_bytes": self._listed_size(file.name, file.size),
            "last_modified": file.last_modified,
        }
        if file.name in self.faults.nameless:
            del entry["relative_file_name"]
        return entry

    def file_page(self, request: web.Request, entries: Sequence[ServedFile]) -> web.StreamResponse:
        """One page of a Baseten file listing, with freshly signed URLs."""
        try:
            page_size = int(request.query.get("page_size", "1000"))
            token = int(request.query.get("page_token", "0"))
        except ValueError:
            return _unprocessable("page_size and page_token must be integers")
        if page_size < 1 or token < 0:
            return _unprocessable("page_size must be >= 1 and page_token >= 0")
        offset = token * page_size if self.faults.page_numbers else token
        length = (
            page_size
            if self.faults.page_length is None
            else self.faults.page_length(offset, page_size)
        )
        page = entries[offset : offset + length]
        following = token + 1 if self.faults.page_numbers else offset + length
        next_token = following if offset + length < len(entries) else None
        if self.faults.endless_listing == "stuck":
            next_token = token
        elif self.faults.endless_listing == "repeat":
            page, next_token = page or entries[-page_size:], following
        elif self.faults.endless_listing == "empty":
            next_token = following
        return self._page_answered(
            offset,
            {
                "presigned_urls": [self._file_entry(f) for f in page],
                **self._optional(next_page_token=next_token),
                "total_count": len(entries),
            },
        )

    def _optional(self, **fields: object) -> dict[str, object]:
        """``fields``, which the pages do not require and default to null, as an answer holds
        them: those null left out under `Faults.required_only`."""
        if not self.faults.required_only:
            return fields
        return {name: value for name, value in fields.items() if value is not None}

    def _page_answered(self, offset: int, body: dict[str, object]) -> web.Response:
        """The answer of a file listing page at ``offset``, once `Faults.on_page` has seen it."""
        answer = web.json_response(body)
        if self.faults.on_page is not None:
            self.faults.on_page(offset)
        return answer

    # --- Baseten Loops ---------------------------------------------------------------------------

    async def _loops_checkpoints(self, request: web.Request) -> web.StreamResponse:
        filters = {name: request.query.get(name, "") for name in _LOOPS_FILTERS}
        given = [name for name, value in filters.items() if value]
        if len(given) != 1:
            return _unprocessable(
                "Provide exactly one filter: run_id, base_model or checkpoint_path"
            )
        path = filters["checkpoint_path"]
        if path and not _BT_URI.fullmatch(path):
            return _unprocessable(
                "checkpoint_path must be bt://loops:<run_id>/(weights|sampler_weights)/<name>"
            )
        chosen = given[0]
        return web.json_response(
            {
                "checkpoints": [
                    {
                        "checkpoint_id": c.checkpoint.checkpoint_id,
                        "created_at": c.checkpoint.created_at.isoformat(),
                        "checkpoint_type": "lora",
                        "base_model": c.base_model,
                        "lora_adapter_config": {"r": 16, "lora_alpha": 32},
                        "size_bytes": self._listed_size(c.id, c.checkpoint.size_bytes),
                        **self._optional(sync_status=c.checkpoint.sync_status),
                        "id": c.id,
                        "run_id": c.run_id,
                        "target": c.target,
                    }
                    for c in self.catalog.loops
                    if c.matches(chosen, filters[chosen])
                ]
            }
        )

    async def _loops_files(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info["checkpoint_id"]
        for c in self.catalog.loops:
            if c.id == wanted and wanted not in self.faults.files_gone:
                return self.file_page(request, c.checkpoint.files)
        return web.json_response({"detail": "Checkpoint not found"}, status=404)

    # --- W&B: the Training API and the artifact files' GraphQL query -----------------------------

    def _wandb(self, handler: Handler, scheme: str) -> Handler:
        return self._guarded(handler, partial(self._wandb_key, scheme))

    def _wandb_key(self, scheme: str, authorization: str) -> bool:
        """W&B's Training API takes ``Bearer <key>``; its GraphQL API ``Basic api:<key>``."""
        key = self.catalog.wandb_api_key
        if scheme == "Basic":
            key = base64.b64encode(f"api:{key}".encode()).decode()
        return hmac.compare_digest(authorization.encode(), f"{scheme} {key}".encode())

    async def _wandb_checkpoints(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        model = next((m for m in self.catalog.wandb_models if m.model_id == model_id), None)
        if model is None:
            return web.json_response({"detail": "Model not found"}, status=404)
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _unprocessable("limit must be an integer")
        order = request.query.get("order", "asc")
        if not 1 <= limit <= 100 or order not in ("asc", "desc"):
            return _unprocessable("limit must be within 1..100 and order asc or desc")
        # A null step sorts last, as SQL's ascending order puts nulls.
        items = sorted(
            model.checkpoints, key=lambda c: (c.step is None, c.step or 0), reverse=order == "desc"
        )
        start = 0
        after = request.query.get("after")
        if after and not model.stuck_cursor:
            ids = [c.id for c in items]
            if after not in ids:
                return _unprocessable(f"unknown cursor {after}")
            start = ids.index(after) + 1
        page = items[start : start + limit]
        answer: dict[str, object] = {
            "data": [{"id": c.id, "step": c.step, "metrics": c.metrics} for c in page],
            "has_more": model.more_promised or start + limit < len(items),
        }
        if not self.faults.required_only:
            answer |= {
                "object": "list",
                "first_id": page[0].id if page else "",
                "last_id": page[-1].id if page else "",
            }
        return web.json_response(answer)

    async def _wandb_graphql(self, request: web.Request) -> web.StreamResponse:
        """Only the query `sources.wandb_artifacts` sends; its cursor is an offset, as text."""
        try:
            body = await request.json()
            variables = body["variables"]
            name, _, alias = variables["name"].partition(":")
            place = (variables["entityName"], variables["projectName"])
            offset = int(variables.get("cursor") or 0)
            per_page = int(variables.get("perPage") or 50)
            known = "query CheckpointArtifactFiles(" in body["query"]
        except (ValueError, KeyError, TypeError, AttributeError):
            known = False
        if not known:
            return web.json_response({"errors": [{"message": "unsupported query"}]}, status=400)
        self.traffic.versions_asked.append(variables["name"])
        models = [m for m in self.catalog.wandb_models if (m.entity, m.project) == place]
        if not models:
            return web.json_response({"data": {"project": None}})
        version = next(
            (
                c
                for m in models
                if m.name == name
                for c in m.checkpoints
                if alias == f"step{c.step}"
            ),
            None,
        )
        if version is None or not version.uploaded:
            return web.json_response({"data": {"project": {"artifact": None}}})
        page = version.files[offset : offset + per_page]
        end = offset + len(page)
        files = {
            "pageInfo": {"hasNextPage": end < len(version.files), "endCursor": str(end)},
            "edges": [
                {
                    "node": {
                        "name": f.name,
                        "directUrl": self.presign(f),
                        "sizeBytes": self._listed_size(f.name, f.size),
                        "md5": _md5(f),
                    }
                }
                for f in page
            ],
        }
        return self._page_answered(offset, {"data": {"project": {"artifact": {"files": files}}}})

    # --- presigned objects -----------------------------------------------------------------------

    def presign(self, file: ServedFile) -> str:
        if file.external_url is not None:
            return file.external_url
        file_id = f"{file.seed}-{file.node_rank}"
        self._files[file_id] = file
        issued = f"{time.time():.3f}"
        signature = self._sign(file_id, issued)
        return f"{self.url}/objects/{file_id}?X-Amz-Date={issued}&X-Amz-Signature={signature}"

    def _sign(self, file_id: str, issued: str) -> str:
        return hmac.new(self._secret, f"{file_id}|{issued}".encode(), hashlib.sha256).hexdigest()

    async def _object(self, request: web.Request) -> web.StreamResponse:
        self.traffic.object_requests += 1
        file_id = request.match_info["file_id"]
        file = self._files.get(file_id)
        issued = request.query.get("X-Amz-Date", "")
        signature = request.query.get("X-Amz-Signature", "")
        if file is None or not hmac.compare_digest(signature, self._sign(file_id, issued)):
            return _s3_error(
                "SignatureDoesNotMatch", "The request signature we calculated does not match"
            )
        ttl = self.faults.url_ttl
        if file.name in self.faults.denied:
            return _s3_error("AccessDenied", "Access Denied")
        if ttl is not None and time.time() > float(issued) + ttl:
            return _s3_error("AccessDenied", "Request has expired")
        start, end, ranged = _requested_range(request.headers.get("Range"), file.size)
        if start is None:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{file.size}"})
        if self.faults.ignore_range:
            start, end, ranged = 0, file.size, False
        self.traffic.ranges.append((file.name, start, end))
        fault = self._pick_fault(file.name, start, end)
        if fault is not None:
            self.traffic.faults[fault] = self.traffic.faults.get(fault, 0) + 1
        if fault == "429":
            retry_after = self.faults.retry_after
            return web.Response(status=429, headers={"Retry-After": retry_after}, text="slow down")
        if fault is not None and fault.isdigit():
            return web.Response(status=int(fault), text="injected failure")
        if fault == "late":
            await asyncio.sleep(self.faults.stall_seconds)
        if ranged and self.faults.range_cap:
            end = min(end, start + self.faults.range_cap)
        response = web.StreamResponse(status=206 if ranged else 200)
        extra = self.faults.overlong_body
        if fault in ("unterminated", "chunked", "empty"):
            response.enable_chunked_encoding()  # "unterminated": every byte, then no last chunk
        else:
            response.content_length = end - start + extra
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Last-Modified"] = file.last_modified
        response.headers["ETag"] = (
            f'W/"{self.traffic.object_requests:x}"'
            if self.faults.weak_etags
            else f'"{file.seed:x}-{file.size:x}"'  # a version, as S3's is
        )
        if ranged:
            shift = self.faults.shift_content_range
            total = file.size + self.faults.misstate_total
            response.headers["Content-Range"] = f"bytes {start + shift}-{end - 1 + shift}/{total}"
        # A client that goes away (`demo` stopped by Ctrl-C) is no error of ours: aiohttp would
        # log it, and with no logging set up Python prints that traceback on stderr.
        with contextlib.suppress(ConnectionResetError), self.traffic.objects_in_flight.counted():
            await response.prepare(request)
            await self._send_body(request, response, file, start, end, fault)
        return response

    async def _object_head(self, request: web.Request) -> web.StreamResponse:
        """A HEAD on a URL signed for GET: refused, as S3 answers one (403, no body)."""
        self.traffic.object_requests += 1
        return web.Response(status=403)

    def _pick_fault(self, name: str, start: int, end: int) -> str | None:
        if self.faults.hook is not None and (chosen := self.faults.hook(name, start, end)):
            return chosen
        if self.faults.fail_rate and self.faults.rng.random() < self.faults.fail_rate:
            return self.faults.rng.choice(self.faults.fail_kinds)
        return None

    async def _send_body(
        self,
        request: web.Request,
        response: web.StreamResponse,
        file: ServedFile,
        start: int,
        end: int,
        fault: str | None,
    ) -> None:
        # A broken transfer stops somewhere in the middle of the body; an empty one at once.
        if fault == "empty":
            cut = start
        elif fault in ("reset", "short", "stall"):
            cut = start + (end - start) // 2
        else:
            cut = end
        position = start
        while position < cut:
            chunk = content(file.seed, position, min(SEND_CHUNK, cut - position))
            if position == start and file.name in self.faults.corrupt:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            await response.write(chunk)
            self.traffic.object_bytes_sent += len(chunk)
            position += len(chunk)
            if self.faults.throttle:
                await asyncio.sleep(len(chunk) / self.faults.throttle)
        if fault in (None, "chunked") and self.faults.overlong_body:
            await response.write(b"\0" * self.faults.overlong_body)
        if fault == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        if fault in ("reset", "stall") and request.transport is not None:
            request.transport.abort()
        elif fault in ("short", "unterminated") and request.transport is not None:
            request.transport.close()  # a clean close before the body's framing is complete
        else:
            await response.write_eof()


def _requested_range(header: str | None, size: int) -> tuple[int | None, int, bool]:
    """(start, end exclusive, ranged) of a ``bytes=a-b`` range; start is None if unsatisfiable."""
    match = _RANGE.fullmatch(header or "")
    if match is None:
        return 0, size, False
    start = int(match.group(1))
    end = min(int(match.group(2)) + 1, size) if match.group(2) else size
    if start >= size or end <= start:
        return None, 0, True
    return start, end, True


# When a training job without checkpoints was created and last updated.
_JOB_CREATED = datetime(2026, 11, 1, tzinfo=UTC)
_LOOPS_FILTERS = ("run_id", "base_model", "checkpoint_path")
_BT_URI = re.compile(r"bt://loops:[^/]+/(weights|sampler_weights)/[^/]+")


def _md5(file: ServedFile) -> str:
    """The file's MD5 as W&B lists it: base64 of the digest."""
    digest = hashlib.md5(content(file.seed, 0, file.size), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


async def _api_fault(
    kind: str, handler: Handler, request: web.Request, retry_after: str
) -> web.StreamResponse:
    if kind == "not-json":
        return web.Response(
            text="<html><body>502 Bad Gateway</body></html>", content_type="text/html"
        )
    if kind == "truncated":
        whole = await handler(request)
        body = whole.body if isinstance(whole, web.Response) else b""
        assert isinstance(body, bytes)
        return web.Response(body=body[: len(body) // 2], content_type="application/json")
    status = int(kind)
    if status == 304:
        return web.Response(status=status)
    if 300 <= status < 400:
        moved = "https://elsewhere.example/v1/training_projects?token=moved-secret"
        return web.Response(status=status, headers={"Location": moved})
    if status == 422:
        return _unprocessable(f"page_size is out of range for this listing (injected {kind})")
    headers = {"Retry-After": retry_after} if status == 429 else None
    return web.json_response({"detail": f"injected HTTP {kind}"}, status=status, headers=headers)


def _s3_error(code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=403, text=body, content_type="application/xml")


def _unprocessable(message: str) -> web.Response:
    return web.json_response(
        {"detail": [{"loc": ["query"], "msg": message, "type": "value_error"}]}, status=422
    )


# --- serve-tree: list files that another server serves -----------------------------------------


def tree_catalog(
    root: Path, file_base_url: str, project_id: str, job_id: str, api_key: str
) -> Catalog:
    """A job listing ``root/<node_rank>/<checkpoint_id>/<path>``, served at ``file_base_url``;
    `ValueError` for a tree not laid out so."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    checkpoints: dict[str, ServedCheckpoint] = {}
    base = file_base_url.rstrip("/")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts
        if len(parts) < 3 or not parts[0].isdigit():
            raise ValueError(f"{path} is not at <node_rank>/<checkpoint_id>/<path> under {root}")
        rank, checkpoint_id, *rest = parts
        info = path.stat()
        stamp = datetime.fromtimestamp(info.st_mtime, UTC)
        checkpoint = checkpoints.setdefault(checkpoint_id, ServedCheckpoint(checkpoint_id, stamp))
        relative = "/".join(rest)
        checkpoint.files.append(
            ServedFile(
                node_rank=int(rank),
                name=f"{checkpoint_id}/{relative}",
                size=info.st_size,
                last_modified=stamp.isoformat(),
                seed=0,
                external_url=f"{base}/{quote(f'{rank}/{checkpoint_id}/{relative}')}",
            )
        )
    return Catalog(
        api_key=api_key, jobs=[ServedJob(project_id, job_id, list(checkpoints.values()))]
    )


async def _serve(
    catalog: Catalog, host: str, port: int, faults: Faults, until_stdin_closes: bool
) -> None:
    async with LocalServer(catalog, host=host, port=port, faults=faults) as server:
        print(f"ready {server.url}", flush=True)
        if not until_stdin_closes:
            await asyncio.Event().wait()
            return
        # The process holding the pipe's other end (`bench`) closes it however it ends, even
        # by SIGKILL, which runs none of its code that would stop this server.
        stdin = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
        )
        while await stdin.read(1 << 16):
            pass


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, default=0)
    common.add_argument("--project", default="bench")
    common.add_argument("--job", default="job")
    common.add_argument("--api-key", default="bench", help="the key clients must send")
    common.add_argument(
        "--api-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="answer every API request this much later, as a far API would",
    )
    common.add_argument(
        "--until-stdin-closes", action="store_true", help="stop when standard input closes"
    )
    parser = argparse.ArgumentParser(prog="python -m checkpoint_sync.localserver")
    commands = parser.add_subparsers(dest="command", required=True)
    tree = commands.add_parser(
        "serve-tree", parents=[common], help="list a directory tree served elsewhere"
    )
    tree.add_argument("--root", type=Path, required=True)
    tree.add_argument("--file-base-url", required=True)
    synthetic = commands.add_parser(
        "serve-synthetic", parents=[common], help="serve a synthetic one-checkpoint training job"
    )
    synthetic.add_argument("--ranks", type=int, default=2)
    synthetic.add_argument("--large-files", type=int, default=2)
    synthetic.add_argument("--large-size", type=int, default=128 << 20)
    synthetic.add_argument("--small-files", type=int, default=100)
    synthetic.add_argument(
        "--small-size",
        type=int,
        default=256 << 10,
        # Sizes differ so that a file cut short or swapped shows; they add up fast at scale.
        help="bytes of the first small file of a rank; each next one is 31 bytes larger "
        "(a rank's 100,000 files of --small-size 1 hold 155 GB: walk such a job with --dry-run)",
    )
    args = parser.parse_args(argv)
    if args.command == "serve-tree":
        try:
            catalog = tree_catalog(
                args.root, args.file_base_url, args.project, args.job, args.api_key
            )
        except ValueError as exc:
            parser.error(str(exc))
    else:
        job = synthetic_job(
            args.project,
            args.job,
            checkpoints=1,
            ranks=args.ranks,
            large_files=args.large_files,
            large_size=args.large_size,
            small_files=args.small_files,
            small_size=args.small_size,
        )
        catalog = Catalog(api_key=args.api_key, jobs=[job])
    try:
        with contextlib.suppress(KeyboardInterrupt):
            faults = Faults(api_delay=args.api_delay)
            asyncio.run(_serve(catalog, args.host, args.port, faults, args.until_stdin_closes))
    except OSError as exc:  # the port is taken, or the host is not ours
        parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")


if __name__ == "__main__":
    main()
