"""A built-in server that speaks the providers' APIs (``shared/api``) over real HTTP.

It backs ``checkpoint-sync demo``, the tests and the benchmarks. It serves:

- the Baseten training-job API (checkpoints and paginated ``checkpoint_files``);
- presigned-style object URLs (``/objects/<id>?X-Amz-...``) that expire, honour ``Range``, and
  misbehave on demand through `Faults`: errors, resets, short bodies, stalls, ignored ranges.

File contents are synthetic and deterministic (`content`), so any byte can be checked without
keeping the data. ``python -m checkpoint_sync.localserver serve-tree`` lists a directory tree
whose files another server (nginx in ``benchmarks/``) serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
    sync_status: str | None = "COMPLETED"
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
    # Per-response send rate in bytes/s (None: as fast as possible).
    throttle: float | None = None
    # Answer 206 with a Content-Range shifted by this many bytes.
    shift_content_range: int = 0
    stall_seconds: float = 30.0
    # Decides a fault for one request from (name, start, end), before `fail_rate` is drawn.
    hook: Callable[[str, int, int], str | None] | None = None
    seed: int = 7

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


@dataclass
class Traffic:
    """What clients asked for, for tests to assert on."""

    object_requests: int = 0
    object_bytes_sent: int = 0
    api_requests: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class Catalog:
    api_key: str = "local-key"
    jobs: list[ServedJob] = field(default_factory=list)

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
        status = "SYNCING" if syncing_last and c == checkpoints - 1 else "COMPLETED"
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


def demo_catalog() -> Catalog:
    """The demo's job: about 400 MB over 3 checkpoints x 2 ranks, the newest still syncing."""
    return Catalog(api_key="demo-key", jobs=[synthetic_job(syncing_last=True)])


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
    ) -> None:
        self.catalog = catalog
        self.faults = faults or Faults()
        self.traffic = Traffic()
        self._host = host
        self._port = port
        self._secret = random.Random().randbytes(16)
        self._files: dict[str, ServedFile] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        jobs = "/v1/training_projects/{project}/jobs/{job}"
        app.router.add_get(f"{jobs}/checkpoints", self._api(self._job_checkpoints))
        app.router.add_get(f"{jobs}/checkpoint_files", self._api(self._job_files))
        app.router.add_get("/objects/{file_id}", self._object)
        return app

    async def __aenter__(self) -> LocalServer:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self._host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- the management API ----------------------------------------------------------------------

    def _api(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.traffic.api_requests += 1
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            if scheme not in ("Bearer", "Api-Key") or not hmac.compare_digest(
                key.encode(), self.catalog.api_key.encode()
            ):
                return web.json_response({"detail": "Invalid API key"}, status=401)
            return await handler(request)

        return guarded

    def _find_job(self, request: web.Request) -> ServedJob:
        job = self.catalog.job(request.match_info["project"], request.match_info["job"])
        if job is None:
            raise web.HTTPNotFound(
                text='{"detail": "Training job not found"}', content_type="application/json"
            )
        return job

    async def _job_checkpoints(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        stamp = job.checkpoints[0].created_at.isoformat() if job.checkpoints else ""
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
                        "size_bytes": c.size_bytes,
                        "sync_status": c.sync_status,
                        "training_job_id": job.job_id,
                    }
                    for c in job.checkpoints
                ],
            }
        )

    async def _job_files(self, request: web.Request) -> web.StreamResponse:
        job = self._find_job(request)
        entries = [f for c in job.checkpoints for f in c.files]
        return self.file_page(request, entries)

    def file_page(self, request: web.Request, entries: list[ServedFile]) -> web.StreamResponse:
        """One page of a Baseten file listing, with freshly signed URLs."""
        try:
            page_size = int(request.query.get("page_size", "1000"))
            token = int(request.query.get("page_token", "0"))
        except ValueError:
            return _unprocessable("page_size and page_token must be integers")
        if page_size < 1 or token < 0:
            return _unprocessable("page_size must be >= 1 and page_token >= 0")
        page = entries[token : token + page_size]
        following = token + page_size
        return web.json_response(
            {
                "presigned_urls": [
                    {
                        "url": self.presign(f),
                        "relative_file_name": f.name,
                        "node_rank": f.node_rank,
                        "size_bytes": f.size,
                        "last_modified": f.last_modified,
                    }
                    for f in page
                ],
                "next_page_token": following if following < len(entries) else None,
                "total_count": len(entries),
            }
        )

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
        if fault == "429":
            return web.Response(status=429, headers={"Retry-After": "0"}, text="slow down")
        if fault is not None and fault.isdigit():
            return web.Response(status=int(fault), text="injected failure")
        response = web.StreamResponse(status=206 if ranged else 200)
        response.content_length = end - start
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Last-Modified"] = file.last_modified
        if ranged:
            shift = self.faults.shift_content_range
            response.headers["Content-Range"] = (
                f"bytes {start + shift}-{end - 1 + shift}/{file.size}"
            )
        await response.prepare(request)
        await self._send_body(request, response, file, start, end, fault)
        return response

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
        # A broken transfer stops somewhere in the middle of the body.
        cut = start + (end - start) // 2 if fault in ("reset", "short", "stall") else end
        position = start
        while position < cut:
            chunk = content(file.seed, position, min(SEND_CHUNK, cut - position))
            await response.write(chunk)
            self.traffic.object_bytes_sent += len(chunk)
            position += len(chunk)
            if self.faults.throttle:
                await asyncio.sleep(len(chunk) / self.faults.throttle)
        if fault == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        if fault in ("reset", "stall") and request.transport is not None:
            request.transport.abort()
        elif fault == "short" and request.transport is not None:
            request.transport.close()  # a clean close before Content-Length is reached
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
    """A job listing ``root/<node_rank>/<checkpoint_id>/<path>``, served at ``file_base_url``."""
    checkpoints: dict[str, ServedCheckpoint] = {}
    base = file_base_url.rstrip("/")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rank, checkpoint_id, *rest = path.relative_to(root).parts
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
                external_url=f"{base}/{rank}/{checkpoint_id}/{relative}",
            )
        )
    return Catalog(
        api_key=api_key, jobs=[ServedJob(project_id, job_id, list(checkpoints.values()))]
    )


async def _serve_tree(args: argparse.Namespace) -> None:
    catalog = tree_catalog(args.root, args.file_base_url, args.project, args.job, args.api_key)
    async with LocalServer(catalog, host=args.host, port=args.port) as server:
        print(f"ready {server.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m checkpoint_sync.localserver")
    commands = parser.add_subparsers(dest="command", required=True)
    tree = commands.add_parser("serve-tree", help="list a directory tree served elsewhere")
    tree.add_argument("--root", type=Path, required=True)
    tree.add_argument("--file-base-url", required=True)
    tree.add_argument("--host", default="127.0.0.1")
    tree.add_argument("--port", type=int, default=0)
    tree.add_argument("--project", default="bench")
    tree.add_argument("--job", default="job")
    tree.add_argument("--api-key", default="bench", help="the key clients must send")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_tree(args))


if __name__ == "__main__":
    main()
