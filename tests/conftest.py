from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from checkpoint_sync.localserver import Catalog, Faults, ServedFile, synthetic_job

from .support import API_KEY, ServerThread, pushed_off_its_page, stop_signals_kept

PROJECT = "proj"
JOB = "job-1"


@pytest.fixture(autouse=True)
def _fast_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real retries, but short waits; a known key; no settings leaking in from the machine."""
    for name in ("CHECKPOINT_SYNC_API_URL", "WANDB_API_KEY", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BASETEN_API_KEY", API_KEY)
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRY_MAX_DELAY", "0.05")
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "5")


@pytest.fixture(autouse=True)
def _stop_signals_kept() -> Iterator[None]:
    """As `run_cli` keeps them, for a test that runs `cli.main` itself."""
    with stop_signals_kept():
        yield


def job_catalog(
    *,
    checkpoints: int = 3,
    large_files: int = 1,
    large_size: int = (1 << 20) + 12345,
    small_files: int = 4,
    small_size: int = 3000,
    syncing_last: bool = False,
) -> Catalog:
    """The job PROJECT/JOB, 2 ranks per checkpoint; by default each rank has one ~1 MiB file
    (several 256 KiB parts) and 4 small ones."""
    job = synthetic_job(
        PROJECT,
        JOB,
        checkpoints=checkpoints,
        ranks=2,
        large_files=large_files,
        large_size=large_size,
        small_files=small_files,
        small_size=small_size,
        syncing_last=syncing_last,
    )
    return Catalog(api_key=API_KEY, jobs=[job])


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(job_catalog()) as running:
        yield running


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "mirror"


def job_args(server: ServerThread, command: str, *extra: str | Path) -> list[str | Path]:
    """``COMMAND`` against the test job PROJECT/JOB on ``server``."""
    return [command, "--api-url", server.url, "--project", PROJECT, "--job", JOB, *extra]


def sync_args(server: ServerThread, dest: Path, *extra: str) -> list[str]:
    args = job_args(server, "sync", "--dest", dest, "--part-size", "256KiB", "--concurrency", "4")
    return [str(a) for a in [*args, *extra]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(
    params=[None, b"not a certificate\n", "directory"], ids=["missing", "not-pem", "directory"]
)
def unusable_ca_bundle(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A ``ca_bundle`` that cannot be loaded: missing, with no certificate in it, a directory."""
    bundle = tmp_path / "ca.pem"
    if request.param == "directory":
        bundle.mkdir()
    elif isinstance(request.param, bytes):
        bundle.write_bytes(request.param)
    return bundle


@contextmanager
def job_with_a_file_pushed_off_its_page(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ServerThread, ServedFile]]:
    """A training job of four files on two pages of two, served: the last file's URL is refused
    (403) once the listing was walked, and a file added at the listing's start meanwhile, so its
    page, read again, no longer shows it. Yields the server and the added file (listed after the
    walk: the next run's)."""
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=2)
    (checkpoint,) = catalog.jobs[0].checkpoints
    added, refuse_once = pushed_off_its_page(
        checkpoint.files, f"{checkpoint.checkpoint_id}/added.json", 99
    )
    with ServerThread(catalog, Faults(hook=refuse_once)) as server:
        yield server, added
