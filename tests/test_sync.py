"""End to end: the CLI against the built-in server over real HTTP."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import anyio
import pytest

from checkpoint_sync.cli import main
from checkpoint_sync.engine import manifest_path
from checkpoint_sync.layout import mirror_path, staging_name
from checkpoint_sync.localserver import Faults, ServedCheckpoint, ServedFile
from checkpoint_sync.manifest import Manifest
from checkpoint_sync.net import NetSettings
from checkpoint_sync.plan import select_checkpoints
from checkpoint_sync.progress import Stats, human_bytes
from checkpoint_sync.retry import RetryPolicy
from checkpoint_sync.sources.base import RemoteFile
from checkpoint_sync.sources.baseten_pages import PAGES_AHEAD
from checkpoint_sync.sources.baseten_training import TrainingJobSource
from checkpoint_sync.transfer import (
    REACHED_SECONDS,
    Transfers,
    TransferSettings,
    prepare_staging_area,
)
from checkpoint_sync.wire import HttpClient

from .conftest import JOB, PROJECT, job_args, job_catalog, sync_args
from .support import (
    API_KEY,
    Result,
    ServerThread,
    TunnelProxy,
    api_client,
    assert_exact,
    first_answers,
    http_serving,
    job_listing_checkpoints,
    leave_in_parts,
    mirrored,
    new_version,
    note_staging_writes,
    proxy_named,
    run_cli,
    run_subprocess,
    staged,
    staging_writes,
)


def complete_files(server: ServerThread) -> list[ServedFile]:
    return [
        f for c in server.catalog.jobs[0].checkpoints if c.sync_status != "SYNCING" for f in c.files
    ]


def test_mirrors_every_file_byte_exact_in_the_documented_layout(
    server: ServerThread, dest: Path
) -> None:
    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    listed = {mirrored(dest, JOB, f) for f in server.files()}
    on_disk = {p for p in (dest / JOB).rglob("*") if p.is_file()}
    assert on_disk == listed
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())


@pytest.mark.parametrize("required_only", [False, True], ids=["every-field", "required-only"])
def test_walks_every_page_of_the_listing(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, required_only: bool
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    # The pages require neither a page's next_page_token nor a checkpoint's sync_status: a
    # server may leave them out where null, their default.
    server.faults.required_only = required_only
    server.catalog.jobs[0].checkpoints[0].sync_status = None
    files = server.files()

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["fetched"] == len(files)
    # One checkpoints call plus ceil(n / 4) pages.
    assert server.traffic.api_requests == 1 + -(-len(files) // 4)


@pytest.mark.parametrize("extra", [[], ["--verify"]], ids=["re-sync", "verify"])
def test_a_run_with_nothing_to_fetch_walks_its_listing_once_even_with_progress_shown(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> None:
    # The plain status lines show an estimated total where the downloads hold the listing up,
    # from a second walk that only counts. A re-sync is never held up; --verify's read-backs
    # are, but the listing's bytes say nothing of what it will fetch.
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    assert run_cli(*sync_args(server, dest, "--quiet")).code == 0
    requests = server.traffic.api_requests

    result = run_cli(*sync_args(server, dest, "--concurrency", "1", *extra))

    assert result.code == 0, result.stderr
    assert server.traffic.api_requests - requests == 1 + -(-len(server.files()) // 4)


def test_large_files_arrive_as_ranged_parts_assembled_byte_exact(
    server: ServerThread, dest: Path
) -> None:
    result = run_cli(*sync_args(server, dest))

    assert result.code == 0, result.stderr
    large = next(f for f in server.files() if f.size > 1 << 20)
    ranges = sorted((s, e) for name, s, e in server.traffic.ranges if name == large.name)
    assert len(ranges) >= 5  # 1 MiB + 12345 bytes in 256 KiB parts, once per rank
    assert_exact(mirrored(dest, JOB, large), large)


def test_second_run_requests_no_file_bytes(server: ServerThread, dest: Path) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    sent = server.traffic.object_bytes_sent

    second = run_cli(*sync_args(server, dest, "--json"))

    assert second.code == 0
    summary = json.loads(second.stdout)
    assert summary["files"]["fetched"] == 0
    assert summary["files"]["skipped"] == len(server.files())
    assert server.traffic.object_bytes_sent == sent


def test_changed_remote_file_is_fetched_again(server: ServerThread, dest: Path) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    changed = server.files()[0]
    server.call(lambda: new_version(changed))
    second = run_cli(*sync_args(server, dest, "--json"))

    assert second.code == 0
    assert json.loads(second.stdout)["files"]["fetched"] == 1
    assert_exact(mirrored(dest, JOB, changed), changed)


@pytest.mark.parametrize("damage", ["delete", "truncate", "symlink", "symlink-to-directory"])
def test_locally_damaged_file_is_restored(server: ServerThread, dest: Path, damage: str) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    victim = server.files()[1]
    path = mirrored(dest, JOB, victim)
    elsewhere = dest.parent / "elsewhere"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:10])
    elif damage == "symlink":  # a link to other bytes of the same size is not the mirrored file
        elsewhere.write_bytes(b"x" * victim.size)
        path.unlink()
        path.symlink_to(elsewhere)
    else:  # a directory outside DEST: the link is replaced, nothing is written through it
        elsewhere.mkdir()
        (elsewhere / "notes.txt").write_text("mine")
        path.unlink()
        path.symlink_to(elsewhere)

    second = run_cli(*sync_args(server, dest, "--json"))

    assert second.code == 0, second.stderr
    assert json.loads(second.stdout)["files"]["fetched"] == 1
    assert_exact(path, victim)
    if damage == "symlink-to-directory":
        assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]
        assert (elsewhere / "notes.txt").read_text() == "mine"


def test_a_file_replaced_by_a_directory_fails_before_its_bytes_are_fetched(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    largest = max(server.files(), key=lambda f: f.size)
    path = mirrored(dest, JOB, largest)
    path.unlink()
    path.mkdir()  # the operator's, where a mirrored file was
    (path / "notes.txt").write_text("mine")
    sent = server.traffic.object_bytes_sent

    second = run_cli(*sync_args(server, dest, "--json"))

    assert second.code == 1
    # Its rename was bound to fail: its megabyte was fetched for nothing.
    assert server.traffic.object_bytes_sent == sent
    summary = json.loads(second.stdout)
    assert summary["files"]["failed"] == 1
    assert "a directory is in its place" in summary["failures"][0]["error"]
    assert (path / "notes.txt").read_text() == "mine"


def test_a_file_where_a_directory_of_the_mirror_goes_fails_its_files_saying_so(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    first = server.files()[0]
    rank = mirrored(dest, JOB, first).parent
    in_rank = [f for f in server.files() if mirrored(dest, JOB, f).is_relative_to(rank)]
    shutil.rmtree(rank)
    rank.write_text("mine")  # the operator's, where a rank's directory was

    second = run_cli(*sync_args(server, dest, "--json"))

    assert second.code == 1
    summary = json.loads(second.stdout)
    assert summary["files"]["failed"] == len(in_rank)
    # Each names the file that is in the way of its directory (not "File exists", which
    # makedirs says where that directory itself is one).
    errors = {failure["error"] for failure in summary["failures"]}
    assert f"cannot write {rank}: Not a directory" in errors
    assert all(error.endswith(": Not a directory") for error in errors), errors
    assert rank.read_text() == "mine"


def flip_byte(path: Path, offset: int) -> None:
    """Damage a mirrored file in place, keeping its size: its record in the manifest still fits."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_fetches_again_only_the_files_whose_bytes_changed_on_disk(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    files = server.files()
    small = next(f for f in files if 0 < f.size < 256 << 10)
    large = next(f for f in files if f.size > 1 << 20)  # assembled from parts
    for file in (small, large):
        flip_byte(mirrored(dest, JOB, file), file.size // 2)
    plain = run_cli(*sync_args(server, dest, "--json"))
    assert json.loads(plain.stdout)["files"]["fetched"] == 0  # size and record still match
    sent = server.traffic.object_bytes_sent

    checked = run_cli(*sync_args(server, dest, "--verify", "--json"))

    assert checked.code == 0, checked.stderr
    summary = json.loads(checked.stdout)["files"]
    assert (summary["checked"], summary["damaged"]) == (len(files), 2)
    assert (summary["fetched"], summary["skipped"]) == (2, len(files) - 2)
    assert server.traffic.object_bytes_sent - sent == small.size + large.size
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)
    again = run_cli(*sync_args(server, dest, "--verify", "--json"))
    assert json.loads(again.stdout)["files"]["damaged"] == 0


def test_verify_says_what_it_found_and_a_dry_run_only_lists_the_checks(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    victim = server.files()[0]
    flip_byte(mirrored(dest, JOB, victim), 0)

    dry = run_cli(*sync_args(server, dest, "--verify", "--dry-run"))
    assert dry.code == 0
    assert [line[:6] for line in dry.stdout.splitlines()].count("check ") == len(server.files())
    total = human_bytes(sum(f.size for f in server.files()))
    assert f"would check {len(server.files())} mirrored files ({total}) against" in dry.stdout
    result = run_cli(*sync_args(server, dest, "--verify"))

    assert result.code == 0, result.stderr
    assert (
        f"checked {len(server.files())} mirrored files against their recorded digests: "
        "1 no longer matched and was fetched again"
    ) in result.stdout
    assert_exact(mirrored(dest, JOB, victim), victim)


def test_a_damaged_file_that_verify_could_not_fetch_again_is_fetched_by_the_next_run(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    victim = next(f for f in server.files() if 0 < f.size < 256 << 10)
    flip_byte(mirrored(dest, JOB, victim), 0)
    server.faults.hook = lambda name, start, end: "503" if name == victim.name else None

    checked = run_cli(*sync_args(server, dest, "--verify", "--json"))

    assert checked.code == 1
    assert json.loads(checked.stdout)["files"]["failed"] == 1
    server.faults.hook = None
    # The damaged bytes are no longer vouched for: a plain run fetches them, it does not skip.
    again = run_cli(*sync_args(server, dest, "--json"))
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["fetched"] == 1
    assert_exact(mirrored(dest, JOB, victim), victim)


def test_verify_does_not_say_a_damaged_file_was_fetched_again_when_that_failed(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0
    lost, restored = [f for f in server.files() if 0 < f.size < 256 << 10][:2]
    for file in (lost, restored):
        flip_byte(mirrored(dest, JOB, file), 0)
    server.faults.hook = lambda name, start, end: "404" if name == lost.name else None

    result = run_cli(*sync_args(server, dest, "--verify"))

    assert result.code == 1
    assert (
        f"checked {len(server.files())} mirrored files against their recorded digests: "
        "2 no longer matched, 1 of them fetched again"
    ) in result.stdout
    assert "HTTP 404" in result.stderr
    assert_exact(mirrored(dest, JOB, restored), restored)


def test_manifest_records_each_verified_file(server: ServerThread, dest: Path) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0

    db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
    rows = db.execute(
        "SELECT source, run, checkpoint, node_rank, size, digest, verified_at FROM files"
    ).fetchall()

    assert len(rows) == len(server.files())
    for source, run, checkpoint, rank, size, digest, verified_at in rows:
        assert (source, run) == ("baseten-training", JOB)
        assert checkpoint.startswith("checkpoint-")
        assert rank in (0, 1)
        assert size > 0
        assert len(digest) == 32
        assert verified_at


def test_syncing_checkpoints_are_left_out_and_named(dest: Path) -> None:
    with ServerThread(job_catalog(syncing_last=True)) as server:
        result = run_cli(*sync_args(server, dest))

        assert result.code == 0, result.stderr
        assert "still syncing: job-1/checkpoint-30" in result.stdout
        assert not (dest / JOB / "checkpoint-30").exists()
        for file in complete_files(server):
            assert_exact(mirrored(dest, JOB, file), file)

        included = run_cli(*sync_args(server, dest, "--include-syncing"))
        assert included.code == 0
        assert (dest / JOB / "checkpoint-30").is_dir()


def test_a_checkpoint_of_another_status_is_left_out_and_named_with_it(dest: Path) -> None:
    catalog = job_catalog()
    failed = catalog.jobs[0].checkpoints[1]
    failed.sync_status = "FAILED"
    with ServerThread(catalog) as server:
        result = run_cli(*sync_args(server, dest))
        included = run_cli(*sync_args(server, dest, "--include-syncing", "--json"))
        listed = run_cli(*job_args(server, "list", "--json"))

    assert result.code == included.code == 0, result.stderr
    # It was mirrored as if complete, though --latest never takes it.
    assert not (dest / JOB / failed.checkpoint_id).exists()
    assert sorted(p.name for p in (dest / JOB).iterdir()) == ["checkpoint-10", "checkpoint-30"]
    assert f"left out, status FAILED: {JOB}/checkpoint-20 (" in result.stdout
    assert json.loads(included.stdout)["status_left_out"] == [
        {"checkpoint": f"{JOB}/checkpoint-20", "status": "FAILED"}
    ]
    shown = {c["checkpoint"]: c["status"] for c in json.loads(listed.stdout)["checkpoints"]}
    assert shown["checkpoint-20"] == "other"


def test_a_job_with_no_checkpoint_to_take_is_not_listed_file_by_file(dest: Path) -> None:
    # Its only checkpoint still uploading: the job-level file listing would be walked, page by
    # page, for nothing.
    with ServerThread(job_catalog(checkpoints=1, syncing_last=True)) as server:
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["syncing_left_out"] == [f"{JOB}/checkpoint-10"]
    assert server.traffic.api_requests == 1  # the checkpoint list alone


def test_latest_takes_only_the_newest_complete_checkpoint(dest: Path) -> None:
    with ServerThread(job_catalog(syncing_last=True)) as server:
        result = run_cli(*sync_args(server, dest, "--latest"))
        assert result.code == 0, result.stderr
        assert sorted(p.name for p in (dest / JOB).iterdir()) == ["checkpoint-20"]
        # The newer one still uploading is named, with what would take it.
        assert (
            f"left out, still syncing: {JOB}/checkpoint-30 (pass --include-syncing to mirror it)"
            in result.stdout
        )
        listed = run_cli(*job_args(server, "list", "--latest", "--json"))
        assert [c["checkpoint"] for c in json.loads(listed.stdout)["checkpoints"]] == [
            "checkpoint-20"
        ]

        included = run_cli(*sync_args(server, dest, "--latest", "--include-syncing"))

    assert included.code == 0, included.stderr
    assert "left out" not in included.stdout
    assert (dest / JOB / "checkpoint-30").is_dir()


def test_a_restore_says_which_checkpoint_it_took_and_where_it_landed(dest: Path) -> None:
    # A script resuming training passes that directory on: --json gives it, the text names it.
    with ServerThread(job_catalog(syncing_last=True)) as server:
        dry = run_cli(*sync_args(server, dest, "--latest", "--dry-run", "--json"))
        as_json = run_cli(*sync_args(server, dest, "--latest", "--node-rank", "1", "--json"))
        as_text = run_cli(*sync_args(server, dest, "--latest", "--node-rank", "1"))
        everything = run_cli(*sync_args(server, dest, "--json"))

    assert dry.code == as_json.code == as_text.code == everything.code == 0, as_json.stderr
    taken = json.loads(as_json.stdout)["checkpoints"]
    path = f"{dest}/{JOB}/checkpoint-20"
    where: dict[str, object] = {
        "checkpoint": f"{JOB}/checkpoint-20",
        "id": "checkpoint-20",
        "path": path,
        "step": None,  # W&B's only
        "metrics": {},
    }
    assert taken == [{**where, "complete": True}]
    assert json.loads(dry.stdout)["checkpoints"] == [{**where, "complete": None}]  # not mirrored
    assert sorted(p.name for p in Path(path, "1").rglob("*") if p.is_file()) == [
        "model-00001-of-00001.safetensors",
        *(f"state_{i:04d}.json" for i in range(4)),
    ]
    assert f"\ncheckpoint {JOB}/checkpoint-20 in {path}\n" in as_text.stdout
    # A mirror of several names each; the text, made for one, names none.
    assert [c["path"] for c in json.loads(everything.stdout)["checkpoints"]] == [
        f"{dest}/{JOB}/checkpoint-10",
        path,
    ]


def test_a_failed_file_leaves_only_its_own_checkpoint_incomplete(dest: Path) -> None:
    with ServerThread(job_catalog(checkpoints=2)) as server:
        (failing, *_) = server.catalog.jobs[0].checkpoints[0].files
        server.faults.denied = {failing.name}  # a file of checkpoint-10 answers 403
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr
    complete = {c["checkpoint"]: c["complete"] for c in json.loads(result.stdout)["checkpoints"]}
    assert complete == {f"{JOB}/checkpoint-10": False, f"{JOB}/checkpoint-20": True}


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("..", {}),
        # A name that file names cannot hold under the locale: ASCII, as POSIX's is.
        ("caf\u00e9", {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}),
    ],
)
def test_a_checkpoint_whose_name_is_no_directory_has_no_path(
    dest: Path, name: str, env: dict[str, str]
) -> None:
    entry = {"checkpoint_id": name, "created_at": "2026-11-01T00:00:00Z", "sync_status": None}
    with job_listing_checkpoints(JOB, [entry]) as origin:
        args = ("--api-url", origin, "--project", PROJECT, "--job", JOB, "--dest", dest)
        process = run_subprocess("sync", *args, "--json", env=env)
        out, err = process.communicate(timeout=60)

    assert process.returncode == 0, err
    taken = json.loads(out)["checkpoints"]
    assert taken == [
        {
            "checkpoint": f"{JOB}/{name}",
            "id": name,
            "path": None,
            "step": None,
            "metrics": {},
            "complete": True,
        }
    ]


def test_a_restore_of_a_checkpoint_that_lists_no_file_is_not_found(dest: Path) -> None:
    # Complete by its status, yet with no file (not uploaded, or gone): a restore that took it
    # would otherwise end 0, with nothing for the trainer and no word of which it took.
    catalog = job_catalog()
    (job,) = catalog.jobs
    newest = ServedCheckpoint("checkpoint-40", job.checkpoints[-1].created_at + timedelta(hours=1))
    job.checkpoints.append(newest)
    with ServerThread(catalog) as server:
        latest = run_cli(*sync_args(server, dest, "--latest", "--node-rank", "0"))
        named = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-40", "--json"))
        beside = run_cli(
            *sync_args(
                server, dest, "--checkpoint", "checkpoint-40", "--checkpoint", "checkpoint-30"
            )
        )
        whole = run_cli(*sync_args(server, dest))

    message = f"no file is listed in {JOB}/checkpoint-40: there is nothing to mirror"
    assert (latest.code, named.code) == (4, 4)
    assert latest.stderr == f"checkpoint-sync: error: {message}\n"
    assert json.loads(named.stdout)["error"] == message
    # Beside one with files, or in a mirror of the whole job, it is one checkpoint among others.
    assert beside.code == whole.code == 0, beside.stderr + whole.stderr


def test_checkpoint_and_node_rank_narrow_the_mirror(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-10", "--node-rank", "1"))

    assert result.code == 0, result.stderr
    assert [p.name for p in (dest / JOB).iterdir()] == ["checkpoint-10"]
    assert [p.name for p in (dest / JOB / "checkpoint-10").iterdir()] == ["1"]


def mirrored_paths(dest: Path) -> set[str]:
    """The files in the mirror, as ``checkpoint/rank/path``."""
    return {str(p.relative_to(dest / JOB)) for p in (dest / JOB).rglob("*") if p.is_file()}


def test_include_and_exclude_narrow_the_mirror_to_the_paths_they_match(
    server: ServerThread, dest: Path
) -> None:
    only_shards = run_cli(*sync_args(server, dest, "--include", "*.safetensors", "--json"))

    assert only_shards.code == 0, only_shards.stderr
    assert mirrored_paths(dest) == {
        f"checkpoint-{c}/{r}/model-00001-of-00001.safetensors" for c in (10, 20, 30) for r in (0, 1)
    }
    files = json.loads(only_shards.stdout)["files"]
    assert (files["fetched"], files["failed"]) == (6, 0)

    # Another filter on the same mirror: the shards are skipped, not fetched or removed.
    rest = run_cli(
        *sync_args(server, dest, "--include", "*.json", "--exclude", "*/state_0000.*", "--json")
    )

    assert rest.code == 0, rest.stderr
    files = json.loads(rest.stdout)["files"]
    assert (files["fetched"], files["skipped"]) == (3 * 2 * 3, 0)
    on_disk = mirrored_paths(dest)
    assert len(on_disk) == 6 + 18
    assert not any(p.endswith("state_0000.json") for p in on_disk)
    for file in server.files():
        if not file.name.endswith("state_0000.json"):
            assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("command", ["sync", "list"])
def test_patterns_that_match_no_listed_file_are_not_found(
    server: ServerThread, dest: Path, command: str
) -> None:
    # A restore with a mistyped pattern must not end as a success that mirrored nothing.
    result = run_cli(*job_args(server, command, "--dest", dest, "--include", "*.safetensor"))

    assert result.code == 4, result.stderr
    assert "no listed file matches --include '*.safetensor' in the selected checkpoints" in (
        result.stderr
    )
    assert server.traffic.object_requests == 0


def test_an_empty_pattern_is_a_usage_error(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--exclude", ""))

    assert result.code == 2
    assert "--exclude: must not be empty" in result.stderr


@pytest.mark.parametrize("command", ["sync", "list", "bench"])
def test_an_empty_checkpoint_id_is_a_usage_error_not_a_checkpoint_not_found(
    server: ServerThread, dest: Path, command: str
) -> None:
    # `--checkpoint "$ID"` with ID unset: it asked for the job's checkpoints and said
    # "checkpoint  not found" (exit 4).
    mirror: list[str | Path] = [] if command == "bench" else ["--dest", dest]  # bench keeps none
    result = run_cli(*job_args(server, command, *mirror, "--checkpoint", ""))

    assert result.code == 2, result.stderr
    assert "argument --checkpoint: must not be empty" in result.stderr
    assert server.traffic.api_requests == 0


@pytest.mark.parametrize(
    "source",
    [
        ("--project", "", "--job", "j"),
        ("--project", "p", "--job", ""),
        ("--loops-run", ""),
        ("--loops-checkpoint", ""),
        ("--base-model", ""),
        ("--wandb-model", ""),
        ("--wandb-model", "m", "--best", ""),
        ("--wandb-model", "m", "--wandb-artifact", ""),
    ],
    ids=lambda flags: " ".join(flags),
)
def test_an_empty_source_id_is_a_usage_error_before_any_request(
    server: ServerThread, dest: Path, source: tuple[str, ...]
) -> None:
    # `--loops-run "$RUN"` with RUN unset asked the API for the checkpoints of run "", and
    # `--job ""` for a path with an empty segment: another request than meant.
    flag = next(f for f, value in zip(source[::2], source[1::2], strict=True) if not value)
    result = run_cli("sync", *source, "--dest", dest, "--api-url", server.url)

    assert result.code == 2, result.stderr
    assert f"argument {flag}: must not be empty" in result.stderr
    assert server.traffic.api_requests == 0


def test_a_file_in_parts_that_a_pattern_leaves_out_keeps_its_parts(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left out by this run's --exclude, it is still listed upstream: a later run resumes it.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch)
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 2

        assert run_cli(*sync_args(server, dest, "--exclude", "*.safetensors")).code == 0
        assert len(list(staging.iterdir())) == 2

        before = server.traffic.object_bytes_sent
        assert run_cli(*sync_args(server, dest)).code == 0
        large = [f for f in server.files() if f.size > 1 << 20]
        # Not all of it: the parts the interrupted run had fetched were kept.
        assert server.traffic.object_bytes_sent - before < sum(f.size for f in large)
        for file in large:
            assert_exact(mirrored(dest, JOB, file), file)


def test_parts_kept_from_an_earlier_run_count_as_done_not_as_fetched(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The progress counts them done (or a resumed run's bar stops short, its ETA too long); the
    # rate counts only what came over the wire.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch)
        again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0
    counted = json.loads(again.stdout)["bytes"]
    # The first two 256 KiB parts of each rank's large file.
    assert counted["resumed"] == 2 * (512 << 10)
    assert counted["fetched"] + counted["resumed"] == counted["to_fetch"]


def test_list_tells_the_state_of_the_files_a_pattern_selects(
    server: ServerThread, dest: Path
) -> None:
    assert run_cli(*sync_args(server, dest, "--include", "*.safetensors")).code == 0

    narrowed = run_cli(*job_args(server, "list", "--dest", dest, "--include", "*.safetensors"))
    whole = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert narrowed.code == 0, narrowed.stderr
    assert narrowed.stdout.count("mirrored") == 3
    assert [c["local"] for c in json.loads(whole.stdout)["checkpoints"]] == ["partial"] * 3


@pytest.mark.parametrize("extra", [(), ("--dry-run",)], ids=["sync", "dry-run"])
@pytest.mark.parametrize(
    ("narrowed", "taken", "failed"),
    [
        (("--node-rank", "1"), lambda f: f.node_rank == 1, 1),  # rank 0's is none of this run's
        (("--exclude", "model-*"), lambda f: "model-" not in f.name, 2),
        (("--exclude", "extra/*"), lambda f: "extra/" not in f.name, 0),
    ],
    ids=["node-rank", "exclude", "exclude-the-unreadable"],
)
def test_the_json_summary_counts_the_files_selected(
    server: ServerThread,
    dest: Path,
    extra: tuple[str, ...],
    narrowed: tuple[str, ...],
    taken: Callable[[ServedFile], bool],
    failed: int,
) -> None:
    # An entry off the schema in each rank.
    off_schema = server.catalog.jobs[0].checkpoints[0].files[1]
    server.faults.unreadable = {off_schema.name}

    result = run_cli(*sync_args(server, dest, *narrowed, "--json", *extra))

    files = json.loads(result.stdout)["files"]
    assert result.code == (1 if failed else 0), result.stderr
    assert files["failed"] == failed
    assert files["listed"] == len([f for f in server.files() if taken(f)])
    done = files["fetched"] + files["skipped"] + files["failed"]
    assert files["listed"] == (files["to_fetch"] + files["failed"] if extra else done)


def test_unknown_checkpoint_is_not_found(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-99"))

    assert result.code == 4
    assert "checkpoint-99 not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_dry_run_lists_the_plan_and_writes_nothing(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--dry-run", "--node-rank", "0"))

    assert result.code == 0, result.stderr
    fetch_lines = [line for line in result.stdout.splitlines() if line.startswith("fetch")]
    assert len(fetch_lines) == len([f for f in server.files() if f.node_rank == 0])
    assert not dest.exists()
    assert server.traffic.object_requests == 0


def test_a_quiet_dry_run_prints_the_plan_without_the_summary(
    server: ServerThread, dest: Path
) -> None:
    # README: --quiet is no progress and no summary; the plan is what a dry run is for.
    result = run_cli(*sync_args(server, dest, "--dry-run", "--quiet"))

    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(server.files()), result.stdout
    assert all(line.startswith(("fetch ", "skip ")) for line in lines)
    assert "would fetch" not in result.stdout
    assert not dest.exists()


def test_a_dry_run_says_in_json_what_it_would_fetch(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--dry-run", "--json"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    wanted = complete_files(server)
    assert summary["files"]["to_fetch"] == len(wanted)
    assert summary["bytes"]["to_fetch"] == sum(f.size for f in wanted)
    assert summary["files"]["fetched"] == 0


def test_dry_run_after_a_sync_plans_only_skips(server: ServerThread, dest: Path) -> None:
    assert run_cli(*sync_args(server, dest)).code == 0

    result = run_cli(*sync_args(server, dest, "--dry-run"))

    assert result.code == 0
    assert not [line for line in result.stdout.splitlines() if line.startswith("fetch")]
    assert len([line for line in result.stdout.splitlines() if line.startswith("skip")]) == len(
        server.files()
    )
    (said,) = [line for line in result.stdout.splitlines() if line.startswith("would fetch")]
    assert f"would fetch 0 files (0 B) into {dest}; would skip {len(server.files())} " in said


def test_interrupted_file_resumes_with_only_its_missing_parts(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    large = next(f for f in server.files() if f.size > 1 << 20 and f.node_rank == 0)
    # The last part breaks, fetched over one connection: every other part has landed by then.
    # (With parts side by side, one still in flight when the broken part gives up is cancelled,
    # and fetched again by the next run.)
    part = 256 << 10
    broken_start = (large.size - 1) // part * part
    server.faults.hook = lambda name, start, end: (
        "500" if name == large.name and start == broken_start else None
    )
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    one_connection = ("--checkpoint", "checkpoint-10", "--concurrency", "1")

    first = run_cli(*sync_args(server, dest, *one_connection))

    assert first.code == 1
    assert "HTTP 500" in first.stderr
    assert first.stderr.count("gave up after retrying") == 2
    assert not mirrored(dest, JOB, large).exists()

    # Interrupted again: the parts kept from the first run stay kept.
    missing = (large.name, broken_start, large.size)
    server.traffic.ranges.clear()
    again = run_cli(*sync_args(server, dest, *one_connection))

    assert again.code == 1
    assert set(server.traffic.ranges) == {missing}

    server.call(lambda: setattr(server.faults, "hook", None))
    server.traffic.ranges.clear()
    last = run_cli(*sync_args(server, dest, *one_connection))

    assert last.code == 0, last.stderr
    # Both ranks' copies of the file had that part broken; nothing else is asked for again.
    assert server.traffic.ranges == [missing, missing]
    assert_exact(mirrored(dest, JOB, large), large)


def test_expired_urls_are_refreshed_and_the_file_completes(
    server: ServerThread, dest: Path
) -> None:
    server.faults.url_ttl = 0.3
    server.faults.throttle = 2 << 20  # each 256 KiB part takes ~0.12 s; a file outlives its URL

    result = run_cli(*sync_args(server, dest, "--concurrency", "1", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["url_refreshes"] > 0
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_hostile_paths_are_refused_and_the_rest_lands(server: ServerThread, dest: Path) -> None:
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    stamp = checkpoint.files[0].last_modified
    hostile = [
        "checkpoint-10/../../../escaped.bin",
        "checkpoint-10//etc/passwd",
        "checkpoint-10/a\\b.bin",
        "checkpoint-10/nul\0.bin",
    ]
    for i, name in enumerate(hostile):
        checkpoint.files.append(ServedFile(0, name, 100, stamp, 5000 + i))

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1
    summary = json.loads(result.stdout)
    assert summary["files"]["failed"] == len(hostile)
    assert not list(dest.parent.glob("escaped.bin"))
    assert not list(dest.rglob("escaped.bin"))
    for file in server.files():
        if file.name not in hostile:
            assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("scheme", ["Bearer", "Api-Key"])
def test_both_auth_schemes_are_accepted(server: ServerThread, dest: Path, scheme: str) -> None:
    assert run_cli(*sync_args(server, dest, "--auth-scheme", scheme)).code == 0


def test_a_refused_key_exits_3_with_a_hint_and_no_secret(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASETEN_API_KEY", "wrong-key-abcdef123456")

    result = run_cli(*sync_args(server, dest))

    assert result.code == 3
    assert result.stderr.count("\n") == 1
    assert "check BASETEN_API_KEY" in result.stderr
    assert "wrong-key-abcdef123456" not in result.stderr + result.stdout


def test_a_missing_key_exits_3(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASETEN_API_KEY")

    result = run_cli(*sync_args(server, dest))

    assert result.code == 3
    assert "set BASETEN_API_KEY" in result.stderr
    assert result.stdout == ""  # no summary of zeros that would read like an empty success


@pytest.mark.parametrize("empty", ["", " "])
def test_a_key_variable_set_but_empty_is_named_not_taken_for_no_key(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, empty: str
) -> None:
    # A cron line `CHECKPOINT_SYNC_API_KEY=$KEY` with KEY unset: the key in the config file was
    # silently dropped and the message said to set what was set ("or api_key in the config").
    config = dest.parent / "cs.toml"
    config.write_text(f'api_key = "{API_KEY}"\n')
    monkeypatch.delenv("BASETEN_API_KEY")
    monkeypatch.setenv("CHECKPOINT_SYNC_API_KEY", empty)

    result = run_cli(*sync_args(server, dest, "--config", str(config)))

    assert result.code == 2, result.stderr
    assert "bad setting api_key from CHECKPOINT_SYNC_API_KEY: " in result.stderr
    assert "must not be empty" in result.stderr
    assert server.traffic.api_requests == 0


def test_an_unknown_job_exits_4_naming_it(server: ServerThread, dest: Path) -> None:
    args = sync_args(server, dest)
    args[args.index(JOB)] = "no-such-job"

    result = run_cli(*args)

    assert result.code == 4
    assert "no-such-job" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sync", "--dest", "x"], "choose exactly one source"),
        (["sync", "--project", PROJECT, "--dest", "x"], "--project and --job go together"),
        (["sync", "--project", PROJECT, "--job", JOB], "no destination"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], message: str) -> None:
    result = run_cli(*args)

    assert result.code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--project", PROJECT], 2, "--project and --job go together"),
        (["--loops-checkpoint", "bt://loops:run/weights"], 2, "expected 3"),
        (["--wandb-model", "m", "--minimize"], 2, "--minimize goes with --best"),
        (["--project", PROJECT, "--job", JOB], 3, "no API key: set BASETEN_API_KEY"),
    ],
)
def test_a_source_refused_before_the_run_prints_only_exit_code_and_error(
    args: list[str], code: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for any error found before the run starts (README): no summary of a run that never
    # began, as `list` and `bench` print none either.
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    result = run_cli("sync", *args, "--dest", tmp_path / "mirror", "--json")

    assert result.code == code
    document = json.loads(result.stdout)
    assert document.keys() == {"exit_code", "error"}
    assert document["exit_code"] == code
    assert message in document["error"]
    assert not (tmp_path / "mirror").exists()


def test_config_file_env_and_flags_apply_in_that_order(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cs.toml"
    config.write_text(
        f'api_url = "http://127.0.0.1:9"\ndest = "{tmp_path / "from-config"}"\n'
        'auth_scheme = "Api-Key"\n'
    )
    monkeypatch.setenv("CHECKPOINT_SYNC_API_URL", server.url)  # env beats the file

    result = run_cli(
        "sync", "--config", config, "--project", PROJECT, "--job", JOB, "--node-rank", "0"
    )

    assert result.code == 0, result.stderr
    assert (tmp_path / "from-config" / JOB).is_dir()

    flagged = tmp_path / "from-flag"
    result = run_cli(
        "sync", "--config", config, "--project", PROJECT, "--job", JOB, "--dest", flagged
    )
    assert result.code == 0
    assert (flagged / JOB).is_dir()


def test_a_bad_config_value_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "cs.toml"
    config.write_text('concurrency = "lots"\n')

    result = run_cli("sync", "--config", config, "--project", PROJECT, "--job", JOB)

    assert result.code == 2
    assert "concurrency" in result.stderr


def test_a_read_timeout_no_timer_takes_is_a_usage_error_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHECKPOINT_SYNC_READ_TIMEOUT")  # set by conftest; it would beat the file
    config = tmp_path / "cs.toml"
    config.write_text("read_timeout = 3000000\n")  # 35 days: past poll()'s 2**31 ms
    # Parts of 8 MiB, each sent in ~0.1 s: most of a part's body is spliced into the file (one
    # that came whole would be hashed on the way instead), waiting in poll(read_timeout).
    catalog = job_catalog(checkpoints=1, large_size=16 << 20, small_files=0)
    with ServerThread(catalog, faults=Faults(throttle=100 << 20)) as server:
        mirror = tmp_path / "mirror"
        args: list[str | Path] = ["--dest", mirror, "--part-size", "8MiB", "--config", config]
        result = run_cli(*job_args(server, "sync", *args))
        requests = server.traffic.api_requests

    # It was "internal error (OverflowError: timeout is too large)", exit 1, mid-transfer.
    assert result.code == 2, result.stderr
    assert result.stderr == (
        f"checkpoint-sync: error: bad setting read_timeout in {config}: "
        "Input should be less than or equal to 86400\n"
    )
    assert requests == 0


def test_json_summary_counts_bytes_and_rate(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync_args(server, dest, "--json"))

    summary = json.loads(result.stdout)
    total = sum(f.size for f in server.files())
    assert summary["bytes"]["published"] == total
    assert summary["bytes"]["fetched"] == total
    assert summary["mb_per_s"] > 0
    assert summary["exit_code"] == 0
    assert API_KEY not in result.stdout


def test_parts_spliced_into_their_file_land_exact_and_are_counted(dest: Path) -> None:
    # Plain HTTP parts of 8 MiB, sent slowly enough that most of each body is still to come when
    # its file is ready: the kernel moves it into the file, and the run counts what it moved.
    catalog = job_catalog(checkpoints=1, large_size=12 << 20, small_files=0)
    with ServerThread(catalog, faults=Faults(throttle=64 << 20)) as server:
        files = server.files()
        result = run_cli(*sync_args(server, dest, "--part-size", "8MiB", "--json"))

    assert result.code == 0, result.stderr
    for file in files:
        assert_exact(mirrored(dest, JOB, file), file)
    summary = json.loads(result.stdout)
    total = sum(f.size for f in files)
    assert summary["bytes"]["fetched"] == summary["bytes"]["published"] == total


def test_a_file_deleted_upstream_before_its_refused_url_is_listed_again_fails_alone(
    dest: Path,
) -> None:
    # Its URL refused (as an expired one is), the file is looked for on its page and then in the
    # whole listing: gone from both, it fails with that said, and the other files land.
    with ServerThread(job_catalog(checkpoints=1, large_files=0, small_files=3)) as server:
        checkpoint = server.catalog.jobs[0].checkpoints[0]
        name = checkpoint.files[0].name  # each rank's
        victims = [f for f in checkpoint.files if f.name == name]
        kept = [f for f in checkpoint.files if f.name != name]
        server.faults.denied = {name}

        def delete(offset: int) -> None:
            server.faults.on_page = None
            checkpoint.files = list(kept)

        server.faults.on_page = delete
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr
    failures = json.loads(result.stdout)["failures"]
    assert sorted(f["path"] for f in failures) == sorted(
        mirrored(dest, JOB, f).relative_to(dest).as_posix() for f in victims
    )
    assert {f["error"] for f in failures} == {"its URL expired and it is no longer listed"}
    for file in kept:
        assert_exact(mirrored(dest, JOB, file), file)


def test_past_20_failures_stderr_names_the_first_20_and_counts_the_rest(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 26 files, each failing: a terminal gets 20 lines of them and a count; --json has all.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with ServerThread(job_catalog(checkpoints=1, small_files=12)) as server:
        server.faults.hook = lambda name, start, end: "500"
        result = run_cli(*sync_args(server, dest))
        as_json = run_cli(*sync_args(server, dest, "--json"))
        files = len(server.files())

    assert result.code == as_json.code == 1
    named = [line for line in result.stderr.splitlines() if "gave up without retrying" in line]
    assert len(named) == 20
    assert result.stderr.endswith(f"... and {files - 20} more failures (see --json)\n")
    assert len(json.loads(as_json.stdout)["failures"]) == files


def test_demo_mirrors_then_skips_everything_in_one_json_summary(tmp_path: Path) -> None:
    result = run_cli("demo", "--dest", tmp_path / "demo", "--json")

    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)  # one document, naming where the mirror is
    assert report["dest"] == str(tmp_path / "demo")
    first, second = report["runs"]
    assert first["files"]["fetched"] == first["files"]["listed"] > 0
    assert second["files"]["skipped"] == second["files"]["listed"] == first["files"]["listed"]
    assert second["files"]["fetched"] == 0


def test_the_demo_names_the_command_that_mirrors_the_checkpoint_it_left_out(
    tmp_path: Path,
) -> None:
    result = run_cli("demo", "--dest", tmp_path / "demo")

    assert result.code == 0, result.stderr
    # It said "pass --include-syncing to mirror it", a flag `demo` does not have.
    left_out = [line for line in result.stdout.splitlines() if line.startswith("left out")]
    assert left_out == 2 * [
        "left out, still syncing: demo-job/checkpoint-30 "
        "(checkpoint-sync sync --include-syncing would mirror it)"
    ]


def test_the_help_says_the_demo_mirrors_a_training_job() -> None:
    result = run_cli("--help")

    assert result.code == 0, result.stderr
    # It said "a synthetic checkpoint": the demo's job has three, two of them mirrored.
    assert "demo mirror a synthetic training job" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # It said "print what would be fetched and skipped": a dry run also names what it would
        # check and delete.
        (
            "sync",
            "--dry-run print what would be fetched and skipped (checked with --verify, deleted "
            "with --delete), writing nothing",
        ),
        # It said only "add each checkpoint's local state".
        ("list", "and name the mirrored checkpoints removed upstream"),
    ],
)
def test_the_help_says_what_a_dry_run_and_list_dest_show_of_delete(command: str, said: str) -> None:
    result = run_cli(command, "--help")

    assert result.code == 0, result.stderr
    assert said in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # It said "ranged part size, e.g. 64MiB": the default, given as an example.
        (
            "sync",
            "--part-size PART_SIZE files larger than this go as concurrent ranged parts "
            "of this size (default 64MiB)",
        ),
        ("sync", "--concurrency CONCURRENCY files and connections in flight (default 16)"),
        ("demo", "(default 64MiB)"),
        # It said "e.g. 4,8,16,32" and "e.g. 16MiB,64MiB", the settings bench tries by default.
        ("bench", "--concurrency CONCURRENCIES connection counts to try (default 4,8,16,32)"),
        ("bench", "--part-size PART_SIZES part sizes to try (default 16MiB,64MiB)"),
    ],
)
def test_the_help_names_the_transfer_defaults(command: str, said: str) -> None:
    result = run_cli(command, "--help")

    assert result.code == 0, result.stderr
    assert said in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # It said "source (exactly one)": bench without one measures the built-in server.
        ("bench", "source (at most one; without one, the built-in server):"),
        ("sync", "source (exactly one):"),
        # It said "no progress and no summary", of a command whose table still prints.
        ("bench", "(what is asked for still prints: a dry run's plan, list's table, bench's"),
        ("list", "(what is asked for still prints: a dry run's plan, list's table, bench's"),
    ],
)
def test_the_help_says_which_source_bench_takes_and_what_quiet_keeps(
    command: str, said: str
) -> None:
    result = run_cli(command, "--help")

    assert result.code == 0, result.stderr
    assert said in " ".join(result.stdout.split())


@pytest.fixture
def dead_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """HTTP_PROXY names a port nobody listens on: a request sent there fails."""
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with proxy_named(monkeypatch, "HTTP_PROXY", "http://127.0.0.1:9"):
        yield


@pytest.mark.usefixtures("dead_proxy")
def test_the_demo_never_goes_through_a_proxy(tmp_path: Path) -> None:
    result = run_cli("demo", "--dest", tmp_path / "demo", "--quiet")

    assert result.code == 0, result.stderr


@pytest.mark.usefixtures("dead_proxy")
def test_proxies_false_connects_directly(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli(*sync_args(server, dest)).code != 0  # the proxy is used, and fails

    monkeypatch.setenv("CHECKPOINT_SYNC_PROXIES", "false")
    assert run_cli(*sync_args(server, dest)).code == 0


def sync_past_proxy(scheme: str, dest: Path) -> Result:
    """A sync whose API (a ``scheme`` URL) is never reached: the proxy settings stop it first."""
    api = f"{scheme}://127.0.0.1:1"
    return run_cli("sync", "--api-url", api, "--project", PROJECT, "--job", JOB, "--dest", dest)


@pytest.mark.parametrize(
    ("variable", "scheme", "status", "message"),
    [
        ("HTTP_PROXY", "http", 407, "asked for credentials (HTTP 407)"),
        ("HTTPS_PROXY", "https", 407, "asked for credentials (HTTP 407)"),
        # Its access rules refusing CONNECT: the answer would be the same on every retry.
        ("HTTPS_PROXY", "https", 403, "refused the connection (HTTP 403)"),
    ],
)
def test_a_proxy_that_refuses_us_is_a_configuration_error_not_retried(
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    scheme: str,
    status: int,
    message: str,
) -> None:
    # Its 407 was retried as a transient fault (to CONNECT) or taken for the API's answer.
    requests: list[str] = []

    class WantsCredentials(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.command)
            self.send_response(status)
            self.send_header("Proxy-Authenticate", 'Basic realm="corp"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_CONNECT = do_GET

    with http_serving(WantsCredentials) as origin:
        proxy = origin.replace("://", "://someone:proxy-password@")
        with proxy_named(monkeypatch, variable, proxy):
            result = sync_past_proxy(scheme, dest)

    assert (len(requests), result.code) == (1, 2)
    assert result.stderr.count("\n") == 1
    assert f"the proxy {origin} {message}" in result.stderr
    assert "proxy-password" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "scheme", "all_proxy"),
    [
        ("HTTP_PROXY", "http", None),
        ("HTTPS_PROXY", "https", None),
        ("ALL_PROXY", "https", None),
        ("HTTPS_PROXY", "https", "socks5://127.0.0.1:1"),  # a scheme's own wins over ALL_PROXY
    ],
)
def test_a_proxy_that_cannot_be_reached_is_named(
    dest: Path, monkeypatch: pytest.MonkeyPatch, variable: str, scheme: str, all_proxy: str | None
) -> None:
    # Found by test_cli_inputs.py: "ClientProxyConnectionError talking to <the API's URL>", which
    # blamed the API and did not say why.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    if all_proxy is not None:
        monkeypatch.setenv("ALL_PROXY", all_proxy)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        closed = f"http://someone:proxy-password@127.0.0.1:{listener.getsockname()[1]}"
    with proxy_named(monkeypatch, variable, closed):
        result = sync_past_proxy(scheme, dest)

    assert result.code == 1
    assert result.stderr == (
        f"checkpoint-sync: error: training job {JOB} of project {PROJECT}: cannot connect to the "
        f"proxy {closed.replace('someone:proxy-password@', '')} ({variable}): "
        "Connection refused\n"
    )


@pytest.mark.parametrize(
    ("variable", "scheme", "proxy_scheme"),
    [
        ("HTTP_PROXY", "http", "socks5"),
        ("HTTPS_PROXY", "https", "socks5h"),
        ("http_proxy", "http", "SOCKS4"),
        ("Https_Proxy", "https", "socks5"),  # urllib takes a name in any case
        ("ALL_PROXY", "http", "socks5"),
        ("all_proxy", "https", "socks5h"),
    ],
)
def test_a_socks_proxy_is_refused_before_any_request(
    dest: Path, monkeypatch: pytest.MonkeyPatch, variable: str, scheme: str, proxy_scheme: str
) -> None:
    # It was taken for an HTTP proxy: sent HTTP it cannot read, and retried.
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        proxy = f"{proxy_scheme}://someone:proxy-password@127.0.0.1:{listener.getsockname()[1]}"
        with proxy_named(monkeypatch, variable, proxy):
            result = sync_past_proxy(scheme, dest)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected to it

    assert result.code == 2
    assert result.stderr == (
        f"checkpoint-sync: error: {variable} names a {proxy_scheme}:// proxy; "
        "only http:// and https:// proxies are supported\n"
    )


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        # aiohttp sends Basic credentials in Latin-1 only: "internal error (UnicodeEncodeError)".
        (
            "%E2%82%AC-pw",
            "user name or password, decoded, is not Latin-1 text, which aiohttp cannot send",
        ),
        # aiohttp took "someone" for the host and 123 for its port, and named the API's URL.
        (
            "123/pw",
            'password holds a "/", "?" or "#": write them percent-encoded (%2F, %3F, %23)',
        ),
    ],
)
def test_proxy_credentials_aiohttp_cannot_send_are_refused_before_any_request(
    dest: Path, monkeypatch: pytest.MonkeyPatch, password: str, problem: str
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        proxy = f"http://someone:{password}@127.0.0.1:{listener.getsockname()[1]}"
        with proxy_named(monkeypatch, "HTTP_PROXY", proxy):
            result = sync_past_proxy("http", dest)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected to it

    assert result.code == 2
    assert result.stderr == f"checkpoint-sync: error: HTTP_PROXY: the proxy's {problem}\n"


@pytest.mark.parametrize("upper_first", [False, True], ids=["lower-first", "upper-first"])
def test_of_all_proxy_and_all_proxy_the_lower_case_one_counts(
    dest: Path, monkeypatch: pytest.MonkeyPatch, upper_first: bool
) -> None:
    # As urllib (and so curl's users' scripts) decide it; the message names the one taken,
    # whichever was set first.
    if upper_first:
        monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:1")
    with proxy_named(monkeypatch, "all_proxy", "socks5://someone:proxy-password@127.0.0.1:1"):
        monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:1")
        result = sync_past_proxy("https", dest)

    assert result.code == 2
    assert result.stderr == (
        "checkpoint-sync: error: all_proxy names a socks5:// proxy; "
        "only http:// and https:// proxies are supported\n"
    )


@pytest.mark.parametrize(
    ("repeated", "said"),
    [
        (rb"\1: \2, \2", '"Content-Length: {n}, {n}"'),
        (rb"\1: \2\r\n\1: \2", "Content-Length twice"),
    ],
    ids=["N, N", "two lines"],
)
@pytest.mark.parametrize("where", ["/v1/", "/objects/"])
def test_a_length_said_twice_through_a_proxy_stops_the_run_in_one_line(
    server: ServerThread,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    repeated: bytes,
    said: str,
    where: str,
) -> None:
    # aiohttp refuses it, where the direct path takes the one length: each answer was retried 8
    # times (43 s at the default delays), then "ClientResponseError talking to <URL>", exit 1.
    lengths: list[int] = []

    def repeat(target: str, head: bytes) -> bytes:
        if where not in target:
            return head
        lengths.append(int(re.findall(rb"(?im)^content-length: *(\d+)", head)[0]))
        return re.sub(rb"(?im)^(content-length): *(\d+)", repeated, head)

    proxy = TunnelProxy(repeat)
    with proxy, proxy_named(monkeypatch, "HTTP_PROXY", proxy.url.replace("://", "://u:proxy-pw@")):
        result = run_cli(*sync_args(server, dest))

    assert result.code == 2
    assert result.stderr.count("\n") == 1
    message = (
        f": the answer through the proxy {proxy.url} (HTTP_PROXY) had {{said}}, which aiohttp "
        "(the client of proxied requests) refuses; have the proxy send it once, or reach the host "
        "directly (NO_PROXY)\n"
    )
    assert any(message.format(said=said.format(n=n)) in result.stderr for n in lengths)
    assert "proxy-pw" not in result.stderr
    asked = [target for target in proxy.forwarded if where in target]
    assert len(asked) == len(set(asked)) >= 1  # none asked again


@pytest.mark.parametrize(
    ("proxy", "shown", "problem"),
    [
        (
            "http://someone:proxy-password@proxy.corp:abc",
            "http://proxy.corp:abc",
            "not a valid URL",
        ),
        ("http://someone:proxy-password@[::1", "http://[::1", "not a valid URL"),
        ("http://someone:proxy-password@", "http://", "not an http(s) URL"),
        ("someone:proxy-password@proxy.corp:abc", "http://proxy.corp:abc", "not a valid URL"),
        # A "/", "?" or "#" in a password (not percent-encoded) ends the host to a URL parser.
        (
            "http://someone:proxy/password@proxy.corp:3128",
            "http://proxy.corp:3128",
            "not a valid URL",
        ),
        (
            "http://someone:proxy?password@proxy.corp:3128",
            "http://proxy.corp:3128",
            "not a valid URL",
        ),
        ("someone:proxy#password@proxy.corp:3128", "http://proxy.corp:3128", "not a valid URL"),
    ],
)
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "ALL_PROXY"])
def test_a_malformed_proxy_url_is_a_configuration_error_not_retried(
    dest: Path, monkeypatch: pytest.MonkeyPatch, proxy: str, shown: str, problem: str, variable: str
) -> None:
    # aiohttp's InvalidURL was retried as a transient fault, and named the API's URL (exit 1).
    with proxy_named(monkeypatch, variable, proxy):
        result = sync_past_proxy("https", dest)

    assert result.code == 2
    assert result.stderr == f"checkpoint-sync: error: {variable} is {problem}: {shown}\n"


def test_the_listing_is_read_only_as_far_as_the_workers_need(dest: Path) -> None:
    # 100 files on pages of 5, and every object stalls: the 2 workers hold a file each and the
    # queue 2 more, so a page or two are read, and those asked for ahead, not all 20. (Quiet: a
    # progress display has every page read once more, only to count the files.)
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=50)
    stalled = Faults(hook=lambda *_: "stall", stall_seconds=3.0)
    with ServerThread(catalog, stalled) as server:
        process = run_subprocess(
            *sync_args(server, dest, "--concurrency", "2", "--quiet"),
            env={"CHECKPOINT_SYNC_PAGE_SIZE": "5"},
        )
        try:
            deadline = time.monotonic() + 10
            while server.call(lambda: server.traffic.object_requests) < 2:
                assert time.monotonic() < deadline, "the workers never asked for a file"
                time.sleep(0.01)
            time.sleep(0.5)  # time enough for an unbounded producer to read every page
            api_requests = server.call(lambda: server.traffic.api_requests)
        finally:
            process.kill()
            process.communicate()
    assert api_requests <= 3 + PAGES_AHEAD, api_requests  # the checkpoints, 2 pages, 8 ahead


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_an_empty_destination_is_a_usage_error_not_the_current_directory(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # A cron line's --dest "$MIRROR" with MIRROR unset, or a config template left empty.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args: list[str | Path] = list(job_args(server, "sync"))
    if how == "flag":
        args += ["--dest", ""]
    elif how == "env":
        monkeypatch.setenv("CHECKPOINT_SYNC_DEST", "")
    else:
        config = tmp_path / "c.toml"
        config.write_text('dest = ""\n')
        args += ["--config", config]

    result = run_cli(*args)

    assert result.code == 2
    assert "must not be empty" in result.stderr
    assert list(cwd.iterdir()) == []


def test_the_json_summary_stays_json_whatever_a_listed_name_holds(
    server: ServerThread, dest: Path
) -> None:
    # A name holding a URL with a query and a quote: refused (an empty segment), and its
    # message, redacted, must not break the document.
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    stamp = checkpoint.files[0].last_modified
    checkpoint.files.append(ServedFile(0, 'checkpoint-10/http://evil/x?a"b', 100, stamp, 7000))

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1
    summary = json.loads(result.stdout)
    assert summary["files"]["failed"] == 1
    assert "?<redacted>" in summary["failures"][0]["error"]


def test_control_characters_of_a_listed_name_never_reach_the_terminal(
    server: ServerThread, dest: Path
) -> None:
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    stamp = checkpoint.files[0].last_modified
    name = "checkpoint-10/title\x1b]0;owned\x07\rfake\nline.bin"  # a legal name on Linux
    checkpoint.files.append(ServedFile(0, name, 100, stamp, 7001))

    plan = run_cli(*sync_args(server, dest, "--dry-run"))
    synced = run_cli(*sync_args(server, dest, "--json"))

    assert plan.code == 0, plan.stderr
    assert "title\\x1b]0;owned\\x07\\x0dfake\\x0aline.bin (100 B)" in plan.stdout
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", plan.stdout + plan.stderr)
    assert all(line.startswith(("fetch ", "would fetch")) for line in plan.stdout.splitlines())
    # Mirrored under its real name, which JSON carries escaped in its own way.
    assert synced.code == 0, synced.stderr
    assert (dest / JOB / "checkpoint-10" / "0" / name.partition("/")[2]).stat().st_size == 100


def test_a_listed_name_cannot_read_otherwise_on_the_terminal_than_it_is(
    server: ServerThread, dest: Path
) -> None:
    # Three files that fail with their names in the error line: one whose right-to-left
    # override shows it as "reportexe.pdf", one named with ESC, one with the four characters \x1b.
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    stamp = checkpoint.files[0].last_modified
    spoof, esc, literal = (
        f"checkpoint-10/{name}" for name in ("report\u202efdp.exe", "a\x1b.bin", "a\\x1b.bin")
    )
    for seed, name in enumerate((spoof, esc, literal)):
        checkpoint.files.append(ServedFile(0, name, 100, stamp, 7100 + seed))
    server.faults.unreadable = {spoof, esc, literal}

    human = run_cli(*sync_args(server, dest / "a"))
    machine = run_cli(*sync_args(server, dest / "b", "--json"))

    assert human.code == machine.code == 1, human.stderr + machine.stderr
    shown = human.stdout + human.stderr
    assert "\u202e" not in shown
    errors = [
        line for line in human.stderr.splitlines() if line.startswith("checkpoint-sync: error")
    ]
    assert sorted(line.split(": ")[2] for line in errors) == sorted(
        f"{JOB}/checkpoint-10/0/{name}"
        for name in ("report\\u202efdp.exe", "a\\x1b.bin", "a\\\\x1b.bin")
    )
    # --json is for a program: the real names, escaped as JSON escapes (and all ASCII).
    assert machine.stdout.isascii()
    failed = {failure["path"] for failure in json.loads(machine.stdout)["failures"]}
    assert failed == {
        f"{JOB}/checkpoint-10/0/{name.partition('/')[2]}" for name in (spoof, esc, literal)
    }


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("holds", "pid"),
    [
        ("\x1b]0;owned\x1b\\[blink]x", "unknown"),
        ("4194303\n", "4194303"),  # the highest pid Linux gives (pid_max 2**22): read whole
        ("\u0664\u0662\n", "unknown"),  # digits, but not ASCII ones: no pid
    ],
    ids=["escapes", "pid", "other-digits"],
)
def test_what_the_lock_file_holds_never_reaches_the_terminal(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, holds: str, pid: str
) -> None:
    # The lock file names its holder; what it holds is shown while waiting, in the progress line
    # (which passes ESC on), if it is a pid.
    monkeypatch.setenv("COLUMNS", "200")  # the whole line, not cut to 80
    lock = dest / ".checkpoint-sync" / "lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        held.write(holds)
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(1.0, fcntl.flock, (held, fcntl.LOCK_UN)).start()
        with redirect_stderr(_Terminal()) as terminal, redirect_stdout(io.StringIO()):
            code = main(sync_args(server, dest, "--wait-lock"))

    assert code == 0
    shown = terminal.getvalue()
    assert f"waiting for the mirror's lock, held by another run (pid {pid})" in shown
    assert "\x1b]" not in shown
    # Then it holds the lock, and names itself alone: nothing is left of what it held before.
    assert lock.read_text() == f"{os.getpid()}\n"


def test_an_error_in_the_settings_still_prints_a_json_document(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "many")

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 2
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2
    assert "CHECKPOINT_SYNC_RETRIES" in document["error"]


@pytest.mark.parametrize("flag", ["--json", "--js"])  # argparse takes a prefix too
def test_a_flag_the_parser_cannot_read_still_prints_a_json_document(
    server: ServerThread, dest: Path, flag: str
) -> None:
    result = run_cli(*sync_args(server, dest, "--part-size", "bogus", flag))

    assert result.code == 2
    assert "usage: checkpoint-sync sync" in result.stderr
    assert json.loads(result.stdout) == {
        "exit_code": 2,
        "error": "argument --part-size: 'bogus' is not a size (try 64MiB, 1MiB, 512KiB)",
    }


def left_in_parts(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, *flags: str
) -> None:
    """A sync whose large files fail from their third 256 KiB part on, with no retry: each is
    left in parts, and the run ends with exit 1."""
    leave_in_parts(server, monkeypatch, sync_args(server, dest, *flags), from_byte=512 << 10)


def test_a_rerun_says_it_took_up_the_parts_an_earlier_run_left(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        rerun = run_cli(*sync_args(server, dest, "--node-rank", "0"))

    assert rerun.code == 0, rerun.stderr
    # The large file's first two 256 KiB parts came in the run that failed.
    kept = human_bytes(512 << 10)
    assert f"\nresumed 1 file from the parts an earlier run left ({kept} kept, " in rerun.stdout


def test_the_summary_gives_the_size_of_the_files_fetched_apart_from_the_bytes_received(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that leaves a file in parts received bytes of no file it fetched, and its rerun
    fetched a whole file of which it received only the rest: neither is the files' size."""
    with ServerThread(job_catalog(checkpoints=1, large_size=1 << 20, small_files=1)) as server:
        args = sync_args(server, dest, "--node-rank", "0", "--concurrency", "1")
        monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
        server.faults.hook = lambda name, start, end: "500" if start >= 512 << 10 else None
        failed = run_cli(*args)
        server.faults.hook = None
        rerun = run_cli(*args)

    assert failed.code == 1
    assert rerun.code == 0, rerun.stderr
    half = human_bytes(512 << 10)
    # The small file; the large one failed half way.
    received = human_bytes(3000 + (512 << 10))
    assert failed.stdout.startswith(f"fetched 1 file ({human_bytes(3000)}; {received} received) ")
    assert rerun.stdout.startswith(f"fetched 1 file ({human_bytes(1 << 20)}; {half} received) ")


def test_a_part_out_of_retries_keeps_the_bytes_it_got_for_the_next_run(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its third part's answer ends half way, with no retry left: the rerun asks for that
    part's second half only, and for the parts after it."""
    part = 256 << 10
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with ServerThread(job_catalog(checkpoints=1, small_files=0)) as server:
        (large,) = [f for f in server.files() if f.node_rank == 0]
        cut = first_answers(1, "short")
        server.faults.hook = lambda name, start, end: (
            cut(name, start, end) if start == 2 * part else None
        )
        args = sync_args(server, dest, "--node-rank", "0", "--concurrency", "1")
        assert run_cli(*args).code == 1
        server.faults.hook = None
        asked = len(server.traffic.ranges)

        rerun = run_cli(*args, "--json")

        assert rerun.code == 0, rerun.stderr
        reached = 2 * part + part // 2
        assert server.traffic.ranges[asked:] == [
            (large.name, reached, 3 * part),
            (large.name, 3 * part, 4 * part),
            (large.name, 4 * part, large.size),
        ]
        assert json.loads(rerun.stdout)["bytes"]["resumed"] == reached
        assert_exact(mirrored(dest, JOB, large), large)


def remove_large_files(server: ServerThread) -> None:
    """Take the files of over 1 MiB out of the job's first checkpoint (removed upstream)."""
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    server.call(
        lambda: setattr(checkpoint, "files", [f for f in checkpoint.files if f.size < 1 << 20])
    )


def test_a_file_left_in_parts_and_then_removed_upstream_leaves_no_staging_behind(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large file interrupted half way, then gone from the listing (a shard renamed, say): its
    # staging file, reserved at full size, and its record of parts must not stay for ever.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        left_in_parts(server, dest, monkeypatch, "--node-rank", "1")
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 2  # one large file per rank, left in parts
        remove_large_files(server)

        again = run_cli(*sync_args(server, dest, "--node-rank", "0"))
        assert again.code == 0, again.stderr
        # Rank 1 was not part of this run: its file may yet be listed to it.
        assert len(list(staging.iterdir())) == 1
        assert run_cli(*sync_args(server, dest)).code == 0
        listed = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert list(staging.iterdir()) == []
    assert [c["local"] for c in json.loads(listed.stdout)["checkpoints"]] == ["mirrored"]


def test_a_file_a_changing_listing_did_not_show_is_found_by_walking_it_again(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file deleted upstream while the listing is walked moves the ones after it a place up:
    # the page after it starts one entry too far, and the file then first on it is not shown by
    # that walk. The run walks the listing again, and resumes the file from its parts.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch)
        checkpoint = server.catalog.jobs[0].checkpoints[0]
        # Two pages: rank 0's shard and small file, then rank 1's.
        monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
        shard, deleted, missed = checkpoint.files[:3]

        def delete(offset: int) -> None:
            server.faults.on_page = None
            checkpoint.files.remove(deleted)

        server.faults.on_page = delete
        server.traffic.ranges.clear()
        requests = server.traffic.api_requests
        changed = run_cli(*sync_args(server, dest, "--json"))
        requests = server.traffic.api_requests - requests

    assert changed.code == 0, changed.stderr
    assert json.loads(changed.stdout)["listings_changed"] == []
    assert_exact(mirrored(dest, JOB, missed), missed)
    # The parts the first run fetched of it (and of rank 0's shard) are not fetched again.
    assert sorted((name, start) for name, start, _ in server.traffic.ranges) == sorted(
        (large.name, start)
        for large in (shard, missed)
        for start in range(512 << 10, large.size, 256 << 10)
    )
    assert staged(dest) == set()
    # The checkpoint list, then two walks of two pages (three entries left: 2 + 1).
    assert requests == 1 + 2 * 2


def uploading_while_listed(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> ServedCheckpoint:
    """The first checkpoint of ``server``'s job gains a file with each page of 2 served: every
    walk of its listing sees it grow."""
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    stamp = checkpoint.files[0].last_modified
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")

    def upload(offset: int) -> None:
        n = len(checkpoint.files)
        checkpoint.files.append(ServedFile(0, f"checkpoint-10/new-{n}.bin", 100, stamp, 9000 + n))

    server.faults.on_page = upload
    return checkpoint


def test_a_listing_that_keeps_changing_is_walked_three_times_and_said_so(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files uploaded all the while the listing is walked: every walk sees total_count grow. The
    # run does not walk it for ever; it mirrors what it saw, and says that the listing moved.
    with ServerThread(job_catalog(checkpoints=1, large_files=0, small_files=2)) as server:
        checkpoint = uploading_while_listed(server, monkeypatch)
        unreadable = checkpoint.files[0]
        server.faults.unreadable = {unreadable.name}
        requests = server.traffic.api_requests
        told = run_cli(*sync_args(server, dest))
        requests = server.traffic.api_requests - requests
        as_json = run_cli(*sync_args(server, dest, "--json"))

    assert told.code == as_json.code == 1, told.stderr + as_json.stderr
    assert f"the file listing of {JOB}/checkpoint-10 kept changing while it was read" in told.stdout
    summary = json.loads(as_json.stdout)
    assert summary["listings_changed"] == [f"{JOB}/checkpoint-10"]
    # Once each, not once a walk (the name is each rank's).
    path = unreadable.name.removeprefix("checkpoint-10/")
    assert sorted(f["path"] for f in summary["failures"]) == [
        f"{JOB}/checkpoint-10/{rank}/{path}" for rank in (0, 1)
    ]
    assert requests >= 1 + 3 * 2  # the checkpoint list, then three walks of two pages or more


def test_a_checkpoint_whose_listing_kept_changing_is_not_said_complete(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file it saw landed, and none failed: but a file removed meanwhile may have hidden
    # another, so a restore must not take the checkpoint for whole.
    with ServerThread(job_catalog(checkpoints=1, large_files=0, small_files=2)) as server:
        uploading_while_listed(server, monkeypatch)
        result = run_cli(*sync_args(server, dest, "--json"))
        told = run_cli(*sync_args(server, dest))

    assert result.code == told.code == 0, result.stderr + told.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["failed"] == 0
    assert [c["complete"] for c in summary["checkpoints"]] == [False]
    assert (
        f"checkpoint {JOB}/checkpoint-10 in {dest / JOB / 'checkpoint-10'} is incomplete: its "
        "file listing kept changing while it was read"
    ) in told.stdout


def test_a_staging_file_no_record_leads_to_goes_and_files_in_parts_keep_theirs(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run killed while it fetched files in one piece leaves their staging files, which no
    # record of parts leads to: nothing would resume them, and a file not fetched again (its
    # checkpoint deleted, another --node-rank) kept its room for ever.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        staging = dest / ".checkpoint-sync" / "staging"
        (resumable,) = staging.iterdir()
        killed = staging / staging_name(f"{JOB}/checkpoint-10/1/gone.bin")
        killed.write_bytes(b"x" * 300_000)

        result = run_cli(*sync_args(server, dest, "--node-rank", "1"))

        assert result.code == 0, result.stderr
        assert list(staging.iterdir()) == [resumable]  # rank 0's parts: another run's to resume
        assert staged(dest) == {f"{JOB}/checkpoint-10"}
        assert run_cli(*sync_args(server, dest)).code == 0
    assert list(staging.iterdir()) == []


def test_the_parts_of_a_checkpoint_deleted_upstream_go_whatever_a_later_run_selects(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cron mirror of a job that keeps its last few checkpoints: a shard left in parts of one
    # it deleted since must not keep its staging file, reserved at full size, for ever.
    with ServerThread(job_catalog(checkpoints=3, small_files=1)) as server:
        job = server.catalog.jobs[0]
        for checkpoint in ("checkpoint-10", "checkpoint-20"):
            left_in_parts(server, dest, monkeypatch, "--checkpoint", checkpoint)
        assert staged(dest) == {f"{JOB}/checkpoint-10", f"{JOB}/checkpoint-20"}
        deleted = job.checkpoints[0]
        server.call(lambda: job.checkpoints.remove(deleted))
        # Still listed, though its entry is off the schema for once: its parts may yet be used.
        server.faults.unreadable = {"checkpoint-20"}

        dry = run_cli(*sync_args(server, dest, "--latest", "--dry-run"))
        assert dry.code == 0, dry.stderr
        assert staged(dest) == {f"{JOB}/checkpoint-10", f"{JOB}/checkpoint-20"}
        again = run_cli(*sync_args(server, dest, "--latest"))

    assert again.code == 0, again.stderr
    assert staged(dest) == {f"{JOB}/checkpoint-20"}
    # What was mirrored of it stays mirrored.
    for file in deleted.files:
        if file.size < 1 << 20:
            assert_exact(mirrored(dest, JOB, file), file)


def test_a_checkpoint_list_empty_for_one_run_keeps_the_parts_of_its_files(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty list is more likely the API's bad moment than a job emptied on purpose: --delete
    # holds back on it, and the parts of a shard half fetched must not go on its word either.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch)
        job = server.catalog.jobs[0]
        listed = list(job.checkpoints)
        server.call(job.checkpoints.clear)

        empty = run_cli(*sync_args(server, dest))
        assert empty.code == 0, empty.stderr
        assert staged(dest) == {f"{JOB}/checkpoint-10"}
        server.call(lambda: job.checkpoints.extend(listed))
        server.traffic.ranges.clear()
        again = run_cli(*sync_args(server, dest))

    assert again.code == 0, again.stderr
    # Only the parts the first run had not fetched of each shard.
    assert sorted((name, start) for name, start, _ in server.traffic.ranges) == sorted(
        (large.name, start)
        for large in listed[0].files
        if large.size >= 1 << 20
        for start in range(512 << 10, large.size, 256 << 10)
    )
    assert staged(dest) == set()


def test_a_name_refused_on_every_run_does_not_stop_the_parts_of_removed_files_going(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        checkpoint = server.catalog.jobs[0].checkpoints[0]
        stamp = checkpoint.files[0].last_modified
        refused = ServedFile(0, f"{checkpoint.checkpoint_id}/bad\\name.bin", 10, stamp, 99)
        server.call(lambda: checkpoint.files.append(refused))
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 1
        remove_large_files(server)

        again = run_cli(*sync_args(server, dest, "--node-rank", "0"))

    assert again.code == 1  # the refused name, as on every run
    assert "backslash" in again.stderr
    assert list(staging.iterdir()) == []


def test_a_file_in_parts_whose_entry_is_unreadable_for_one_run_keeps_its_parts(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its entry is off the schema for once: the file fails this run, but it is still listed, so
    # the parts it has are kept for the next.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        large = next(f for f in server.files() if f.size > 1 << 20 and f.node_rank == 0)
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 1
        server.faults.unreadable = {large.name}

        assert run_cli(*sync_args(server, dest, "--node-rank", "0")).code == 1

        assert len(list(staging.iterdir())) == 1
        server.faults.unreadable = set()
        assert run_cli(*sync_args(server, dest, "--node-rank", "0")).code == 0
        assert_exact(mirrored(dest, JOB, large), large)


@pytest.mark.parametrize("extra", [(), ("--dry-run",)], ids=["sync", "dry-run"])
def test_a_node_rank_no_file_has_is_not_found_and_names_the_ranks_there(
    server: ServerThread, dest: Path, extra: tuple[str, ...]
) -> None:
    # A restore on a node whose rank is mistyped must not end as a success with nothing there.
    result = run_cli(*sync_args(server, dest, "--node-rank", "9", *extra))

    assert result.code == 4, result.stderr
    assert "no file of node rank 9 in the selected checkpoints (they have ranks 0, 1)" in (
        result.stderr
    )
    assert server.traffic.object_requests == 0


def test_latest_whose_checkpoint_lacks_the_rank_names_the_checkpoint_it_took(dest: Path) -> None:
    # The newest checkpoint has no file of rank 1: the restore stops, not found, rather than
    # take an older one (the other nodes would restore the newest), and says which checkpoint
    # --latest took, as no summary is printed to tell it.
    with ServerThread(job_catalog(checkpoints=3, small_files=1)) as server:
        newest = server.catalog.jobs[0].checkpoints[-1]
        newest.files = [f for f in newest.files if f.node_rank == 0]
        result = run_cli(*sync_args(server, dest, "--latest", "--node-rank", "1"))

    assert result.code == 4, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"checkpoint-sync: error: no file of node rank 1 in {JOB}/checkpoint-30 (it has ranks 0)\n"
    )
    assert not (dest / JOB).exists()


def test_one_node_rank_no_file_has_among_several_is_not_found_too(
    server: ServerThread, dest: Path
) -> None:
    # README: "a rank no listed file has is exit 4". A restore of ranks 0 and 9 (a typo for 1)
    # must not end as a success with rank 9's files nowhere.
    result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--node-rank", "9", "--json"))

    assert result.code == 4, result.stderr
    assert "no file of node rank 9 in the selected checkpoints (they have ranks 0, 1)" in (
        result.stderr
    )
    assert json.loads(result.stdout)["exit_code"] == 4


def test_verify_fetches_again_the_parts_of_a_file_left_in_parts(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a power loss a part's record may be on disk while its bytes are not, and no digest
    # vouches for a part: --verify, the README's advice then, must not build a file on them.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch, "--node-rank", "0")
        (staging,) = (dest / ".checkpoint-sync" / "staging").iterdir()
        with staging.open("r+b") as f:
            f.write(bytes(256 << 10))  # the first part's bytes, lost

        result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--verify"))

        assert result.code == 0, result.stderr
        for file in server.files():
            if file.node_rank == 0:
                assert_exact(mirrored(dest, JOB, file), file)


def test_files_of_one_part_that_finish_within_a_second_never_touch_the_staging_tables(
    dest: Path,
) -> None:
    """A file of one part gets a record of how far it got only once in flight at two periodic
    records in a row: the many that finish sooner cost the manifest nothing more. Files of
    6 MiB, written from their first 2 MiB on (a connection's buffer), 0.25 s each (a busy
    machine may take four times that), four at a time over 2 s or more of a run: some are part
    written at every record."""
    catalog = job_catalog(checkpoints=1, large_files=20, large_size=6 << 20, small_files=8)
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    note_staging_writes(manifest)
    with ServerThread(catalog, Faults(throttle=24 << 20)) as server:
        args = ("--part-size", "8MiB", "--concurrency", "4", "--json")
        result = run_cli(*sync_args(server, dest, *args))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["seconds"] >= 2 * REACHED_SECONDS
    assert staging_writes(manifest) == []


@pytest.mark.anyio
async def test_a_file_of_one_part_that_waited_for_a_connection_is_timed_from_its_first_request(
    dest: Path,
) -> None:
    """A file of one part waits while another file's parts hold every connection: that wait is
    no transfer to resume. Held for two and a half periodic records, then fetched in about a
    second (half of it, a stall of 1 s across the third record, the rest: half a second from
    each record), it is never recorded."""
    catalog = job_catalog(checkpoints=1, large_files=1, large_size=6 << 20, small_files=0)
    manifest = manifest_path(dest)
    note_staging_writes(manifest)
    with ServerThread(catalog, Faults(stall_seconds=1.0)) as server:
        (file,) = (f for f in server.files() if f.node_rank == 0)
        server.faults.hook = first_answers(1, "stall")
        async with api_client(server.url) as api, HttpClient(NetSettings()) as http:
            source = TrainingJobSource(api, PROJECT, JOB)
            checkpoints = select_checkpoints(await source.checkpoints()).checkpoints
            (listed,) = [
                f
                async for page in source.file_pages(checkpoints)
                for f in page
                if isinstance(f, RemoteFile) and f.node_rank == 0
            ]
            connections = asyncio.Semaphore(1)
            settings = TransferSettings(part_size=8 << 20, retry=RetryPolicy(initial_delay=0))
            prepare_staging_area(dest, fsync=False)
            opened = Manifest(manifest)
            try:
                transfers = Transfers(http, dest, opened, source, connections, Stats(), settings)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(transfers.record_reached_periodically)
                    begun = anyio.current_time()
                    # Another file's parts hold every connection.
                    async with anyio.create_task_group() as fetching, connections:
                        fetching.start_soon(transfers.fetch, listed, mirror_path(listed))
                        await anyio.sleep_until(begun + 2.5 * REACHED_SECONDS)
                    tg.cancel_scope.cancel()
            finally:
                opened.close()

    assert server.traffic.faults == {"stall": 1}
    assert server.traffic.ranges == [
        (file.name, 0, file.size),
        (file.name, file.size // 2, file.size),
    ]
    assert_exact(mirrored(dest, JOB, file), file)
    assert staging_writes(manifest) == []
