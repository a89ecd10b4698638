"""Hostile or broken listings and API errors: a clear error for that entry or that run.

Nothing is ever written outside DEST, and the files the listing did describe well still land.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import pytest

from checkpoint_sync.engine import PlannedFile, SyncOptions, sync
from checkpoint_sync.errors import TransientError
from checkpoint_sync.localserver import ServedFile
from checkpoint_sync.models import CheckpointFile, CheckpointFilesPage, Unreadable
from checkpoint_sync.net import NetSettings, url_problem
from checkpoint_sync.plan import select_checkpoints
from checkpoint_sync.progress import Stats
from checkpoint_sync.sources.base import PageRef
from checkpoint_sync.sources.baseten_pages import PAGES_AHEAD, Walked, file_pages, walked
from checkpoint_sync.sources.baseten_training import TrainingJobSource
from checkpoint_sync.wire import HttpClient

from .conftest import JOB, PROJECT, job_args, sync_args
from .support import (
    ServerThread,
    api_client,
    assert_exact,
    job_listing_checkpoints,
    mirrored,
    pages_being_read,
    run_cli,
    walk_through,
)

Page = tuple[PageRef, list[CheckpointFile | Unreadable]]


def landed(server: ServerThread, dest: Path, ignored: ServedFile | None = None) -> list[ServedFile]:
    """The listed files now at their final path, each checked byte for byte."""
    found = []
    for file in server.catalog.files():
        path = mirrored(dest, JOB, file)
        if file is not ignored and path.exists():
            assert_exact(path, file)
            found.append(file)
    return found


def add_file(server: ServerThread, name: str, size: int, *, rank: int = 0) -> ServedFile:
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    added = ServedFile(rank, name, size, checkpoint.files[0].last_modified, seed=9000)
    checkpoint.files.append(added)
    return added


@pytest.mark.parametrize("there", [True, False], ids=["outside", "dangling"])
def test_symlinks_in_the_mirror_leading_outside_are_refused(
    server: ServerThread, dest: Path, tmp_path: Path, there: bool
) -> None:
    # A link to where nothing is (a volume not mounted) leads outside too: taken for a missing
    # directory, mkdir failed its files through it ("No such file or directory").
    outside = tmp_path / "outside"
    if there:
        outside.mkdir()
    (dest / JOB / "checkpoint-20").mkdir(parents=True)
    (dest / JOB / "checkpoint-10").symlink_to(outside)  # a whole checkpoint
    (dest / JOB / "checkpoint-20" / "1").symlink_to(outside)  # one rank of another
    misled = [
        f
        for f in server.catalog.files()
        if f.name.startswith("checkpoint-10/")
        or (f.name.startswith("checkpoint-20/") and f.node_rank)
    ]

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1
    failures = json.loads(result.stdout)["failures"]
    assert len(failures) == len(misled)
    assert all("leads outside the destination" in f["error"] for f in failures)
    # Not even a directory was made through the links.
    assert list(outside.iterdir()) == [] if there else not outside.exists()
    assert len(landed(server, dest)) == len(list(server.catalog.files())) - len(misled)


@pytest.mark.parametrize("leads_to", ["outside", "another checkpoint"])
def test_a_mirrored_directory_replaced_by_a_symlink_is_not_taken_as_current(
    server: ServerThread, dest: Path, tmp_path: Path, leads_to: str
) -> None:
    # Checkpoints of a job share their file names and sizes: through a link to checkpoint-10,
    # checkpoint-20's files would land on its files, and their records vouch for its bytes.
    assert run_cli(*sync_args(server, dest)).code == 0
    replaced = dest / JOB / "checkpoint-20"
    if leads_to == "outside":
        target = tmp_path / "outside"
        replaced.rename(target)  # same names, same sizes, now elsewhere
        error = "leads outside the destination (a symlink?)"
    else:
        target = dest / JOB / "checkpoint-10"
        shutil.rmtree(replaced)
        error = "in the mirror, not to its own place (a symlink?)"
    replaced.symlink_to(target)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    misled = [f for f in server.catalog.files() if f.name.startswith("checkpoint-20/")]

    result = run_cli(*sync_args(server, dest, "--json"))
    listed = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == 1
    summary = json.loads(result.stdout)
    assert summary["files"]["skipped"] == len(list(server.catalog.files())) - len(misled)
    assert len(summary["failures"]) == len(misled)
    assert all(f["error"].endswith(error) for f in summary["failures"]), summary["failures"]
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    # `list --dest` finds them missing, as the sync did.
    local = {row["checkpoint"]: row["local"] for row in json.loads(listed.stdout)["checkpoints"]}
    assert local == {
        "checkpoint-10": "mirrored",
        "checkpoint-20": "absent",
        "checkpoint-30": "mirrored",
    }


def test_a_symlink_to_another_place_in_the_mirror_is_named_where_it_leads(
    server: ServerThread, dest: Path
) -> None:
    (dest / JOB / "checkpoint-10").mkdir(parents=True)
    (dest / JOB / "checkpoint-20").symlink_to(dest / JOB / "checkpoint-10")
    misled = [f for f in server.catalog.files() if f.name.startswith("checkpoint-20/")]

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1
    failures = json.loads(result.stdout)["failures"]
    assert len(failures) == len(misled)
    # Named from the deepest directory there, which checkpoint-10's own files may have made.
    where = re.compile(
        rf".*/{JOB}/checkpoint-20(/.+)? leads to {JOB}/checkpoint-10(/.+)? in the mirror, not to "
        r"its own place \(a symlink\?\)"
    )
    assert all(where.fullmatch(f["error"]) for f in failures), failures
    for file in server.catalog.files():
        if file not in misled:  # checkpoint-10's own, which checkpoint-20's did not overwrite
            assert_exact(mirrored(dest, JOB, file), file)


def test_a_path_listed_twice_is_mirrored_once_from_its_first_entry(
    server: ServerThread, dest: Path
) -> None:
    first = server.catalog.jobs[0].checkpoints[0].files[1]
    second = add_file(server, first.name, first.size + 10, rank=first.node_rank)

    result = run_cli(*sync_args(server, dest))

    assert result.code == 1
    assert "listed more than once; only its first entry is mirrored" in result.stderr
    assert_exact(mirrored(dest, JOB, first), first)
    assert len(landed(server, dest, ignored=second)) == len(list(server.catalog.files())) - 1


def test_a_path_listed_twice_as_the_same_file_is_mirrored_once_without_a_word(
    server: ServerThread, dest: Path
) -> None:
    # Pages read while files are added or removed upstream: their offsets shift, and an entry
    # may come twice. The same size and last_modified: the same file, not a conflict.
    first = server.catalog.jobs[0].checkpoints[0].files[1]
    again = ServedFile(first.node_rank, first.name, first.size, first.last_modified, first.seed)
    server.catalog.jobs[0].checkpoints[0].files.append(again)

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)["files"]
    assert summary["listed"] == summary["fetched"] == len(list(server.catalog.files())) - 1
    assert_exact(mirrored(dest, JOB, first), first)


def test_a_refused_name_is_shown_once_escaped_and_given_whole_in_json(
    server: ServerThread, dest: Path
) -> None:
    # A backslash and a BEL: the terminal shows the escapes that read back as the name (the
    # backslash doubled, BEL as \x07), once; JSON gives the name itself.
    name = "bad\\name\x07.bin"
    add_file(server, f"checkpoint-10/{name}", 10)

    shown = run_cli(*sync_args(server, dest))
    as_json = run_cli(*sync_args(server, dest, "--json"))

    assert shown.code == as_json.code == 1
    assert "file name 'bad\\\\name\\x07.bin' contains a backslash\n" in shown.stderr
    (failure,) = json.loads(as_json.stdout)["failures"]
    assert failure["error"] == f"file name '{name}' contains a backslash"


def test_a_path_deeper_than_the_os_takes_fails_alone_on_a_short_line(
    server: ServerThread, dest: Path
) -> None:
    # 25 names of 200 characters: each one fits, the whole is past PATH_MAX (4096 bytes).
    deep = add_file(server, "checkpoint-10/" + "/".join(["d" * 200] * 25) + "/x.bin", 10)

    shown = run_cli(*sync_args(server, dest))
    as_json = run_cli(*sync_args(server, dest, "--json"))

    assert shown.code == as_json.code == 1
    (line,) = shown.stderr.splitlines()
    start = f"checkpoint-sync: error: {JOB}/checkpoint-10/0/dddd"
    assert line.startswith(start)
    assert line.endswith("ddd: File name too long")
    assert len(line) < 400
    (failure,) = json.loads(as_json.stdout)["failures"]
    assert failure["path"] == f"{JOB}/{deep.name.replace('/', '/0/', 1)}"  # whole
    assert failure["error"].startswith(f"cannot write {str(dest)[:40]}")
    assert failure["error"].endswith("ddd: File name too long")
    assert "..." in failure["error"]
    assert len(failure["error"]) < 200
    assert len(landed(server, dest, ignored=deep)) == len(list(server.catalog.files())) - 1


def test_an_entry_off_the_schema_fails_that_file_and_the_rest_of_its_page_lands(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    checkpoint = server.catalog.jobs[0].checkpoints[0]
    unreadable = checkpoint.files[1]  # the second entry of the first page
    server.faults.unreadable = {unreadable.name}

    result = run_cli(*sync_args(server, dest, "--json"))
    listed = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == 1
    # Both node ranks list a file of that name.
    off_schema = [f for f in server.catalog.files() if f.name == unreadable.name]
    failures = json.loads(result.stdout)["failures"]
    assert sorted(f["path"] for f in failures) == sorted(
        str(mirrored(Path(), JOB, f)) for f in off_schema
    )
    for failure in failures:
        assert failure["error"].startswith(
            "its listing entry is unreadable (size_bytes: Input should be a valid integer"
        )
    assert len(landed(server, dest)) == len(list(server.catalog.files())) - len(off_schema)
    assert not any(mirrored(dest, JOB, f).exists() for f in off_schema)
    rank_0 = run_cli(*sync_args(server, dest, "--json", "--node-rank", "0"))
    assert [f["path"] for f in json.loads(rank_0.stdout)["failures"]] == [
        str(mirrored(Path(), JOB, f)) for f in off_schema if f.node_rank == 0
    ]
    assert listed.code == 0, listed.stderr
    states = {r["checkpoint"]: r["local"] for r in json.loads(listed.stdout)["checkpoints"]}
    assert states[checkpoint.checkpoint_id] == "partial"


def test_an_unreadable_entry_that_tells_no_name_fails_whatever_checkpoint_is_selected(
    server: ServerThread, dest: Path
) -> None:
    # checkpoint-10's second file is listed without its relative_file_name (both ranks' copies):
    # it may be of any checkpoint, so it fails under --checkpoint checkpoint-20 too.
    unnamed = server.catalog.jobs[0].checkpoints[0].files[1]
    server.faults.nameless = {unnamed.name}
    where = [f"{JOB}/?/{rank}/(unnamed entry)" for rank in (0, 1)]

    whole = run_cli(*sync_args(server, dest / "a", "--json"))
    named = run_cli(*sync_args(server, dest / "b", "--checkpoint", "checkpoint-20"))

    assert whole.code == 1, whole.stderr
    failures = json.loads(whole.stdout)["failures"]
    assert sorted(f["path"] for f in failures) == where
    for failure in failures:
        assert failure["error"].startswith(
            "its listing entry is unreadable (relative_file_name: Field required"
        )
    # It may be of any checkpoint of the job: none is said to be whole.
    assert [c["complete"] for c in json.loads(whole.stdout)["checkpoints"]] == [False] * 3
    assert landed(server, dest / "a", unnamed) == [
        f for f in server.catalog.files() if f.name != unnamed.name
    ]
    assert named.code == 1
    assert all(f"{path}: its listing entry is unreadable" in named.stderr for path in where)
    assert [p.name for p in (dest / "b" / JOB).iterdir()] == ["checkpoint-20"]


def test_an_unreadable_entry_of_a_checkpoint_not_selected_is_passed_over_without_a_word(
    server: ServerThread, dest: Path
) -> None:
    # Its name tells its checkpoint, which --checkpoint leaves out, as it does its other files.
    unreadable = server.catalog.jobs[0].checkpoints[0].files[1]
    server.faults.unreadable = {unreadable.name}

    result = run_cli(*sync_args(server, dest, "--checkpoint", "checkpoint-20", "--json"))

    assert result.code == 0, result.stdout
    summary = json.loads(result.stdout)
    assert summary["failures"] == []
    in_20 = [f for f in server.catalog.files() if f.name.startswith("checkpoint-20/")]
    assert summary["files"]["listed"] == summary["files"]["fetched"] == len(in_20)
    assert result.stderr == ""
    assert landed(server, dest) == in_20


def test_a_checkpoint_off_the_schema_fails_alone_and_the_rest_of_the_job_lands(
    server: ServerThread, dest: Path
) -> None:
    # The newest checkpoint's entry in the job's checkpoint list has a size that is not a number.
    # It failed the whole listing; now it is left out and fails as one entry, as in Loops and W&B.
    newest = server.catalog.jobs[0].checkpoints[-1]
    server.faults.unreadable = {newest.checkpoint_id}
    where = f"{JOB}/{newest.checkpoint_id}"

    whole = run_cli(*sync_args(server, dest / "a", "--json"))
    latest = run_cli(*sync_args(server, dest / "b", "--latest", "--quiet"))
    latest_json = run_cli(*sync_args(server, dest / "b", "--latest", "--json"))
    listed_latest = run_cli(*job_args(server, "list", "--latest", "--json"))
    named = run_cli(*sync_args(server, dest / "c", "--checkpoint", newest.checkpoint_id))
    as_text = run_cli(*job_args(server, "list"))
    as_json = run_cli(*job_args(server, "list", "--json"))

    assert whole.code == 1, whole.stderr
    (failure,) = json.loads(whole.stdout)["failures"]
    assert failure["path"] == where
    assert failure["error"].startswith(
        "its listing entry is unreadable (size_bytes: Input should be a valid integer"
    )
    assert failure["error"].endswith("so it cannot be mirrored")
    mirrorable = [f for c in server.catalog.jobs[0].checkpoints[:-1] for f in c.files]
    assert landed(server, dest / "a") == mirrorable
    # --latest takes the newest it can mirror and names the newer one it passed over, under
    # --quiet too; a success all the same.
    assert latest.code == 0, latest.stderr
    assert [p.name for p in (dest / "b" / JOB).iterdir()] == ["checkpoint-20"]
    assert latest.stderr == (
        f"--latest took {JOB}/checkpoint-20; a newer checkpoint was left out: "
        f"{where}: {failure['error']}\n"
    )
    # A program reading --json is told as well: the sync's summary, and list's left_out.
    assert latest_json.code == listed_latest.code == 0, latest_json.stderr
    passed_over = json.loads(latest_json.stdout)["passed_over"]
    assert passed_over == [{"checkpoint": where, "error": failure["error"]}]
    assert json.loads(listed_latest.stdout)["left_out"] == [
        {"checkpoint": where, "id": newest.checkpoint_id, "error": failure["error"]}
    ]
    # Named, it cannot be mirrored: a usage error in one line, before anything is written.
    assert named.code == 2
    in_job = f"in training job {JOB} of project {PROJECT}"
    assert named.stderr == f"checkpoint-sync: error: {where} {in_job}: {failure['error']}\n"
    assert not (dest / "c").exists()
    assert as_text.code == as_json.code == 0, as_text.stderr + as_json.stderr
    *table_lines, left_out = as_text.stdout.splitlines()
    assert [line.split()[1] for line in table_lines[1:]] == ["checkpoint-10", "checkpoint-20"]
    assert left_out == f"left out: {where}: {failure['error']}"
    document = json.loads(as_json.stdout)
    assert [c["checkpoint"] for c in document["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]
    assert document["left_out"] == [
        {"checkpoint": where, "id": newest.checkpoint_id, "error": failure["error"]}
    ]


def test_a_checkpoint_listed_with_a_null_size_is_mirrored_and_its_size_unknown(
    server: ServerThread, dest: Path
) -> None:
    # Its entry was taken as unreadable: left out, though its files tell their sizes.
    middle = server.catalog.jobs[0].checkpoints[1]
    server.faults.sizeless = {middle.checkpoint_id}

    result = run_cli(*sync_args(server, dest))
    as_text = run_cli(*job_args(server, "list"))
    as_json = run_cli(*job_args(server, "list", "--json"))

    assert result.code == as_text.code == as_json.code == 0, result.stderr
    assert landed(server, dest) == server.files()
    sizes = {line.split()[1]: line.split()[5] for line in as_text.stdout.splitlines()[1:]}
    assert sizes[middle.checkpoint_id] == "-"
    rows = {c["checkpoint"]: c["size_bytes"] for c in json.loads(as_json.stdout)["checkpoints"]}
    assert rows[middle.checkpoint_id] is None


def test_two_unreadable_checkpoints_without_an_id_are_told_apart(dest: Path) -> None:
    # A readable entry, then two that give no checkpoint_id.
    stamp = "2026-11-01T00:00:00Z"
    readable = {"checkpoint_id": "checkpoint-10", "created_at": stamp}
    nameless = [{"created_at": stamp, "size_bytes": size} for size in (1, 2)]
    with job_listing_checkpoints(JOB, [readable, *nameless]) as api:
        args = ["--api-url", api, "--project", PROJECT, "--job", JOB]
        result = run_cli("sync", *args, "--dest", dest, "--json")

    assert result.code == 1, result.stderr
    # Both were named "job-1/?".
    assert [f["path"] for f in json.loads(result.stdout)["failures"]] == [
        f"{JOB}/? (entry 2 of the checkpoint list)",
        f"{JOB}/? (entry 3 of the checkpoint list)",
    ]


def test_unreadable_checkpoints_left_out_by_checkpoint_are_passed_over_without_a_word(
    dest: Path,
) -> None:
    # One without an id and one of another id: --checkpoint names a readable one, which neither
    # can be; they fail only in a run of the whole job.
    stamp = "2026-11-01T00:00:00Z"
    readable = {"checkpoint_id": "checkpoint-10", "created_at": stamp}
    unreadable = [{"created_at": stamp, "size_bytes": "?"}, {"checkpoint_id": "checkpoint-20"}]
    with job_listing_checkpoints(JOB, [readable, *unreadable]) as api:
        args: list[str | Path] = ["sync", "--api-url", api, "--project", PROJECT, "--job", JOB]
        named = run_cli(*args, "--dest", dest, "--json", "--checkpoint", "checkpoint-10")
        whole = run_cli(*args, "--dest", dest, "--json")

    # The checkpoint named lists no file here (exit 4, saying only that): nothing else is said.
    assert named.code == 4, named.stdout
    assert named.stderr == (
        f"checkpoint-sync: error: no file is listed in {JOB}/checkpoint-10: there is nothing to "
        "mirror\n"
    )
    summary = json.loads(named.stdout)
    assert (summary["failures"], summary["passed_over"]) == ([], [])
    assert whole.code == 1
    assert [f["path"] for f in json.loads(whole.stdout)["failures"]] == [
        f"{JOB}/? (entry 2 of the checkpoint list)",
        f"{JOB}/checkpoint-20",
    ]


def test_latest_passes_over_an_older_unreadable_checkpoint_without_a_word(
    server: ServerThread, dest: Path
) -> None:
    oldest = server.catalog.jobs[0].checkpoints[0]
    server.faults.unreadable = {oldest.checkpoint_id}

    latest = run_cli(*sync_args(server, dest, "--latest", "--json"))

    assert latest.code == 0, latest.stderr
    assert latest.stderr == ""
    assert json.loads(latest.stdout)["passed_over"] == []
    assert [p.name for p in (dest / JOB).iterdir()] == ["checkpoint-30"]


@pytest.mark.parametrize(
    ("created_at", "moment"),
    [
        ("2026-11-01T02:00:00+00:00", datetime(2026, 11, 1, 2, tzinfo=UTC)),
        ("2026-11-01T04:00:00+02:00", datetime(2026, 11, 1, 2, tzinfo=UTC)),
        ("2026-11-01T02:00:00Z", datetime(2026, 11, 1, 2, tzinfo=UTC)),
        ("2026-11-01T02:00:00", datetime(2026, 11, 1, 2, tzinfo=UTC)),  # no zone: UTC, as Moment
        ("yesterday", None),
        ("", None),
        (1793498400, None),  # not ISO 8601
        (None, None),
    ],
)
def test_an_unreadable_entry_tells_its_time_as_a_readable_one_would(
    created_at: object, moment: datetime | None
) -> None:
    # --latest weighs it against the checkpoint it takes: "newer" or "may be newer".
    entry = Unreadable({"checkpoint_id": "checkpoint-30", "created_at": created_at}, "size_bytes")
    assert entry.moment("created_at") == moment
    assert Unreadable("not even a mapping", "entry").moment("created_at") is None


@pytest.mark.parametrize("size", [-1, 1 << 60])
def test_implausible_listed_sizes_are_refused(server: ServerThread, dest: Path, size: int) -> None:
    add_file(server, "checkpoint-10/odd.bin", size)

    result = run_cli(*sync_args(server, dest))

    assert result.code == 1
    assert f"listed size {size} is not a plausible file size" in result.stderr
    assert not (dest / JOB / "checkpoint-10" / "0" / "odd.bin").exists()
    assert len(landed(server, dest)) == len(list(server.catalog.files())) - 1


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1/objects/1?X-Amz-Signature=s3cr3t", "not a valid URL"),
        ("http://127.0.0.1:99999/objects/1?X-Amz-Signature=s3cr3t", "not a valid URL"),
        ("ftp://127.0.0.1/objects/1?X-Amz-Signature=s3cr3t", "not an http(s) URL"),
        ("objects/1?X-Amz-Signature=s3cr3t", "not an http(s) URL"),
    ],
)
def test_an_unusable_presigned_url_fails_its_file_alone(
    server: ServerThread, dest: Path, url: str, problem: str
) -> None:
    broken = server.catalog.jobs[0].checkpoints[0].files[1]
    broken.external_url = url

    result = run_cli(*sync_args(server, dest, "--debug"))

    assert result.code == 1
    assert problem in result.stderr
    assert "internal error" not in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    assert len(landed(server, dest)) == len(list(server.catalog.files())) - 1


@pytest.mark.parametrize(
    ("faults", "endless", "message", "pages_landed"),
    [
        ({0: "not-json"}, None, "the API answered with something not JSON", 0),
        ({8: "truncated"}, None, "unexpected API answer (body: Invalid JSON", 2),
        ({}, "stuck", "next_page_token 0 does not advance past 0", 1),
        ({}, "repeat", "the listing goes on past its total_count", 8),
    ],
)
def test_a_broken_listing_stops_the_run_after_the_files_it_did_list(
    server: ServerThread,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    faults: dict[int, str],
    endless: str | None,
    message: str,
    pages_landed: int,
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    server.faults.page_faults = faults
    server.faults.endless_listing = endless

    result = run_cli(*sync_args(server, dest))

    assert result.code == 1
    assert message in result.stderr.splitlines()[-1]
    # The pages read before the broken one are mirrored in full (the listing has 30 files).
    assert len(landed(server, dest)) == min(4 * pages_landed, 30)
    assert server.traffic.api_requests < 20


def test_a_later_page_the_api_redirects_stops_the_run_after_the_files_listed_before_it(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    server.faults.page_faults = {8: "308"}

    result = run_cli(*sync_args(server, dest))

    assert result.code == 2
    assert "the API redirected (HTTP 308)" in result.stderr.splitlines()[-1]
    # The two pages before it are mirrored in full, not cancelled half way.
    assert len(landed(server, dest)) == 8


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        ("401", 3, "the API refused the key (HTTP 401); check BASETEN_API_KEY"),
        ("403", 3, "the API refused the key (HTTP 403); check BASETEN_API_KEY"),
        ("404", 4, "training job job-1 of project proj: not found (HTTP 404)"),
        ("422", 2, "the API rejected the request: page_size is out of range for this listing"),
        (
            "308",
            2,
            "the API redirected (HTTP 308) to https://elsewhere.example/v1/training_projects?"
            "<redacted>; check its URL",
        ),
        # Not a redirect (we ask nothing conditional), nor a wrong URL.
        ("304", 1, "unexpected answer (HTTP 304) from the API"),
    ],
)
@pytest.mark.parametrize("failing", ["checkpoints", "files"])
def test_api_errors_exit_with_their_code_and_a_one_line_message(
    server: ServerThread, dest: Path, status: str, code: int, message: str, failing: str
) -> None:
    server.faults.api_faults = [status] if failing == "checkpoints" else [None, status]

    result = run_cli(*sync_args(server, dest))

    assert result.code == code
    assert result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert server.traffic.api_requests == (1 if failing == "checkpoints" else 2)  # no retries


@pytest.mark.parametrize("status", ["500", "502", "503", "429"])
def test_api_5xx_and_429_are_retried(server: ServerThread, dest: Path, status: str) -> None:
    server.faults.api_faults = [status, None, status, status]

    # Quiet: a progress display's walk ahead to count the files would take some of the faults.
    result = run_cli(*sync_args(server, dest, "--quiet"))

    assert result.code == 0, result.stderr
    assert server.traffic.api_requests == 2 + 3
    assert len(landed(server, dest)) == 30


@pytest.mark.parametrize(
    ("retries", "max_delay"),
    [
        (3, None),
        # retries has no ceiling: with no delay, an API down for good goes past attempt 1025,
        # where the backoff 2.0 ** attempt no longer fits a float (an internal error).
        (1030, "0"),
    ],
)
def test_api_5xx_that_persists_is_reported_after_the_allowed_attempts(
    server: ServerThread,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    retries: int,
    max_delay: str | None,
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", str(retries))
    if max_delay is not None:
        monkeypatch.setenv("CHECKPOINT_SYNC_RETRY_MAX_DELAY", max_delay)
    server.faults.api_faults = ["503"] * retries

    result = run_cli(*sync_args(server, dest))

    assert result.code == 1
    assert "training job job-1 of project proj: HTTP 503 from the API" in result.stderr
    assert server.traffic.api_requests == retries


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=1", None),
        ("http://127.0.0.1:8080/objects/1", None),
        ("http://[::1]:8080/objects/1", None),
        ("http://[::1/objects/1", "not a valid URL"),
        ("http://127.0.0.1:99999/", "not a valid URL"),
        ("http://api..example.com/v1", "not a valid host name"),
        ("http://" + "a" * 64 + ".example.com/", "not a valid host name"),
        ("ftp://host/file", "not an http(s) URL"),
        ("localhost:8080", "not an http(s) URL"),
        ("/objects/1", "not an http(s) URL"),
        ("http:///objects/1", "not an http(s) URL"),
        ("http://host/a b", "not a valid URL (spaces, control or non-ASCII characters)"),
        (
            "http://host/a\r\nX-Injected: 1",
            "not a valid URL (spaces, control or non-ASCII characters)",
        ),
        ("http://host/caf\u00e9", "not a valid URL (spaces, control or non-ASCII characters)"),
    ],
)
def test_url_problem(url: str, problem: str | None) -> None:
    assert url_problem(url) == problem


@pytest.mark.parametrize("api_url", ["localhost:8080", "http://127.0.0.1:99999", "ftp://api"])
def test_an_unusable_api_url_is_a_usage_error_at_once(dest: Path, api_url: str) -> None:
    result = run_cli("sync", "--api-url", api_url, "--project", "p", "--job", "j", "--dest", dest)

    assert result.code == 2
    assert "bad setting api_url from --api-url: is not" in result.stderr
    assert api_url not in result.stderr  # it may be a key pasted there
    assert result.stderr.count("\n") == 1


@asynccontextmanager
async def job_files(
    server: ServerThread, *, attempts: int = 1
) -> AsyncIterator[AsyncGenerator[Page, None]]:
    """The test job's file listing, four files a page, read straight from its source module by a
    client that makes ``attempts`` at each request."""
    async with api_client(server.url, attempts=attempts) as api:
        listing = f"/v1/training_projects/{PROJECT}/jobs/{JOB}/checkpoint_files"
        async with aclosing(file_pages(api, listing, 4, "the job")) as pages:
            yield pages


async def files_walked(server: ServerThread) -> list[tuple[int, str]]:
    """The rank and name of each file one walk of the test job's listing hands on, in order."""
    async with job_files(server) as pages:
        return [
            (entry.node_rank, entry.relative_file_name)
            async for _, page in pages
            for entry in page
            if isinstance(entry, CheckpointFile)
        ]


async def api_requests_reach(server: ServerThread, count: int) -> None:
    with anyio.fail_after(10):
        # The server counts on a thread of its own: there is no event of this loop to wait on.
        while server.traffic.api_requests < count:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def read_ahead_settled() -> None:
    """Until no page is being read: the one asked for ahead has its answer, or its error."""
    with anyio.fail_after(10):
        # Only the task itself tells when it is done: the server has answered long before.
        while any(  # noqa: ASYNC110
            getattr(task.get_coro(), "__qualname__", None) == "read_page"
            for task in asyncio.all_tasks()
        ):
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_the_next_page_is_asked_for_while_the_caller_works_on_this_one(
    server: ServerThread,
) -> None:
    async with job_files(server) as pages:
        await anext(pages)
        # The caller has not asked for the second page yet: the request is out all the same.
        await api_requests_reach(server, 2)
        await anext(pages)
        await api_requests_reach(server, 3)
        assert len([page async for page in pages]) == 6  # 30 files, 4 a page: 8 pages in all
    assert server.traffic.api_requests == 8  # the last page says there is no next one


@pytest.mark.anyio
async def test_a_page_asked_for_ahead_that_fails_unseen_is_not_reported(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    server.faults.api_faults = [None, "not-json"]
    async with job_files(server) as pages:
        await anext(pages)
        await read_ahead_settled()
    gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.anyio
async def test_a_page_asked_for_ahead_that_gave_up_before_it_was_wanted_is_asked_for_again(
    server: ServerThread,
) -> None:
    # The API is down while the caller works on the first page, and back once it wants the next:
    # without the read-ahead, the outage would not have been seen.
    server.faults.api_faults = [None, "503"]
    async with job_files(server) as pages:
        await anext(pages)
        await read_ahead_settled()
        assert len([page async for page in pages]) == 7
    assert server.traffic.api_requests == 9  # 8 pages, one of them asked for twice


@pytest.mark.parametrize("busy", [0.0, 1.0])
@pytest.mark.anyio
async def test_a_page_asked_for_ahead_is_asked_for_again_once_its_retry_after_has_gone_by(
    server: ServerThread, busy: float
) -> None:
    # The page kept ahead was refused (429, Retry-After: 1): asked for again at once, it would
    # be refused again. A walk busy for that second meanwhile has waited enough.
    server.faults.api_faults = [None, "429"]
    server.faults.retry_after = "1"
    async with job_files(server) as pages:
        started = time.monotonic()
        await anext(pages)
        await read_ahead_settled()
        await anyio.sleep(busy)
        await anext(pages)
        took = time.monotonic() - started
    # The 429 came after `started`, the page asked for again a second after it at least; a walk
    # busy for that second has it at once.
    assert took >= 1.0
    if busy:
        assert took < busy + 0.5


@pytest.mark.anyio
async def test_pages_asked_for_ahead_are_retried_only_once_they_are_wanted(
    server: ServerThread,
) -> None:
    # An API that refuses every page but the first (429): the pages asked for ahead do not each
    # retry meanwhile, multiplying the requests of a walk that will stop at the first of them.
    server.faults.api_faults = [None] + ["429"] * 100
    async with job_files(server, attempts=3) as pages:
        await anext(pages)
        await read_ahead_settled()
        assert server.traffic.api_requests == 1 + 1  # the page kept ahead, once
        with pytest.raises(TransientError, match="HTTP 429 from the API"):
            await anext(pages)
    assert server.traffic.api_requests == 1 + 1 + 3  # the page wanted, with retries of its own


@pytest.mark.parametrize("moving", [False, True], ids=["planning-walk", "counting-walk"])
@pytest.mark.anyio
async def test_what_moved_is_told_of_the_walk_that_plans_not_of_one_only_to_count(
    server: ServerThread, moving: bool
) -> None:
    # The listing grows while one of the two walks reads it (a walk only to count is a progress
    # display's, beside the one that plans): whether the run says it moved is the planning's.

    def upload(offset: int) -> None:
        add_file(server, f"checkpoint-10/new-{offset}.bin", 10)

    async with api_client(server.url) as api:
        source = TrainingJobSource(api, PROJECT, JOB, page_size=4)
        selected = select_checkpoints(await source.checkpoints()).checkpoints
        for counting in (False, True):
            grows = upload if counting == moving else None
            server.call(partial(setattr, server.faults, "on_page", grows))
            await walk_through(source.file_pages(selected, counting=counting))
    told = {(JOB, c.name) for c in selected} if not moving else set()
    assert source.moved_while_listed() == told


@pytest.mark.parametrize("counting", [False, True], ids=["planning-walk", "counting-walk"])
@pytest.mark.anyio
async def test_a_walk_only_to_count_reads_a_listing_that_keeps_changing_once(
    server: ServerThread, counting: bool
) -> None:
    # A file uploaded with each page read: the planning walk walks the listing three times and
    # counts each file once itself; the walk that counts the progress's total cannot tell a
    # repeat, and walked again would count most files three times over.
    uploaded = iter(range(1000))

    def upload(offset: int) -> None:
        add_file(server, f"checkpoint-10/new-{next(uploaded)}.bin", 10)

    async def entries() -> int:
        pages = source.file_pages(selected, counting=counting)
        async with aclosing(pages):
            return sum([len(page) async for page in pages])

    async with api_client(server.url) as api:
        source = TrainingJobSource(api, PROJECT, JOB, page_size=4)
        selected = select_checkpoints(await source.checkpoints()).checkpoints
        still = await entries()
        server.call(partial(setattr, server.faults, "on_page", upload))
        changing = await entries()
    assert (changing < 2 * still) == counting


def add_pages(server: ServerThread) -> None:
    for n in range(30):  # 60 files, 4 a page: 15 pages
        add_file(server, f"checkpoint-10/more-{n}.bin", 10)


@pytest.mark.anyio
async def test_a_dry_run_stopped_by_its_output_lets_go_of_the_pages_asked_for_ahead(
    server: ServerThread, dest: Path
) -> None:
    # `sync --dry-run | head -1`: printing the first planned file raises BrokenPipeError. The
    # next page is asked for then, and a far API is still answering it: it is not wanted, even
    # while something (a traceback) still holds the stopped walk.
    add_pages(server)
    server.faults.api_delay = 0.5

    def reader_gone(planned: PlannedFile) -> None:
        raise BrokenPipeError

    async with (
        api_client(server.url) as api,
        HttpClient(NetSettings(connect_timeout=5, read_timeout=5)) as http,
    ):
        source = TrainingJobSource(api, PROJECT, JOB, page_size=4)
        selection = select_checkpoints(await source.checkpoints())
        options = SyncOptions(dest=dest, dry_run=True)
        with pytest.raises(BrokenPipeError):
            await sync(source, selection, http, options, Stats(), reader_gone)
        assert pages_being_read() == 0


@pytest.mark.anyio
async def test_a_walk_that_waits_for_its_pages_asks_for_up_to_8_at_once(
    server: ServerThread,
) -> None:
    # A far API: the walk plans a page long before the next one is answered. Its latency is
    # then paid once for 8 pages, not page after page.
    add_pages(server)
    server.faults.api_delay = 0.05
    async with job_files(server) as pages:
        assert len([page async for page in pages]) == 15
    assert server.traffic.api_in_flight.most == PAGES_AHEAD
    assert server.traffic.api_requests == 15  # each page asked for once, at the offset it had


@pytest.mark.anyio
async def test_a_walk_held_up_elsewhere_keeps_one_page_ahead(server: ServerThread) -> None:
    # The downloads hold the walk up: pages asked for further ahead would be answered long
    # before they are wanted, and their presigned URLs would only age there.
    add_pages(server)
    ahead: list[int] = []
    async with job_files(server) as pages:
        async for _ in pages:
            await read_ahead_settled()
            ahead.append(server.traffic.api_requests - (len(ahead) + 1))
            await anyio.sleep(0.1)  # the walk is busy: a page is answered in far less
    assert ahead == [*[1] * 14, 0]


@pytest.mark.anyio
async def test_a_listing_whose_tokens_run_on_past_its_files_ends_at_the_empty_page(
    server: ServerThread,
) -> None:
    # NOTES.md: a client stops on an empty page. The token after the last file is not a listing
    # that goes on past its total_count.
    server.faults.endless_listing = "empty"
    assert await files_walked(server) == [(f.node_rank, f.name) for f in server.catalog.files()]


@pytest.mark.parametrize(
    ("page_length", "page_numbers", "requests"),
    [
        # An API that caps page_size: the tokens are still offsets, three apart.
        (lambda offset, size: min(size, 3), False, 10),
        # Pages that end where the server likes: a guessed offset is sometimes wrong.
        (lambda offset, size: min(size, 7 - offset % 7), False, None),
        # Tokens that count pages: no offset is guessed at all.
        (None, True, 8),
    ],
    ids=["capped", "uneven", "page-numbers"],
)
@pytest.mark.anyio
async def test_the_pages_handed_on_are_those_the_tokens_name_whatever_was_guessed(
    server: ServerThread,
    page_length: Callable[[int, int], int] | None,
    page_numbers: bool,
    requests: int | None,
) -> None:
    server.faults.page_length = page_length
    server.faults.page_numbers = page_numbers
    assert await files_walked(server) == [(f.node_rank, f.name) for f in server.catalog.files()]
    if requests is not None:  # where the tokens are as guessed, no request goes to waste
        assert server.traffic.api_requests == requests


UNREADABLE = Unreadable({"relative_file_name": "u"}, "size_bytes: not an integer")


def listed_page(total: int, *entries: str | tuple[str, int] | Unreadable) -> CheckpointFilesPage:
    """A page announcing ``total`` files, of these entries: a name (rank 0), name and rank, or
    one off the schema."""
    files = [(e, 0) if isinstance(e, str) else e for e in entries]
    return CheckpointFilesPage(
        presigned_urls=[
            e
            if isinstance(e, Unreadable)
            else CheckpointFile(
                url="u", relative_file_name=e[0], node_rank=e[1], size_bytes=1, last_modified="t"
            )
            for e in files
        ],
        total_count=total,
    )


@pytest.mark.parametrize(
    ("pages", "held_still"),
    [
        ([listed_page(2, "a", "b")], True),
        ([listed_page(4, "a", "b"), listed_page(4, "c", "d")], True),
        # "a" removed after the first page: "c" moved onto it, and was never shown.
        ([listed_page(4, "a", "b"), listed_page(3, "d")], False),
        # One added before "b" and one removed past it: the second page starts at "b" again.
        ([listed_page(4, "a", "b"), listed_page(4, "b", "c")], False),
        ([listed_page(4, "a", "b"), listed_page(4, "c", "b")], False),  # anywhere on it
        # The same name of another rank is another file.
        ([listed_page(4, "a", "b"), listed_page(4, ("b", 1), "c")], True),
        # Fewer entries than announced.
        ([listed_page(3, "a", "b")], False),
        ([listed_page(3, "a", "b"), listed_page(3)], False),
        # An empty page ends the walk: its count counts too.
        ([listed_page(2, "a", "b"), listed_page(2)], True),
        ([listed_page(2, "a", "b"), listed_page(1)], False),
        # An entry off the schema is listed all the same; the last file before it comes again.
        ([listed_page(4, "a", UNREADABLE), listed_page(4, "c", "d")], True),
        ([listed_page(4, "a", UNREADABLE), listed_page(4, "a", "c")], False),
        # A change once seen stays seen.
        ([listed_page(6, "a", "b"), listed_page(5, "d", "e"), listed_page(5, "f")], False),
        # Not told: "a" removed as "e" is added, between the same two pages ("c" unseen).
        ([listed_page(4, "a", "b"), listed_page(4, "d", "e")], True),
    ],
)
def test_a_walk_tells_whether_the_listing_held_still(
    pages: list[CheckpointFilesPage], held_still: bool
) -> None:
    walk = Walked()
    for page in pages:
        walk = walked(walk, page)
    assert walk.held_still is held_still


def pages_held() -> int:
    """How many page requests (done or not) anything still holds, and so their pages."""
    gc.collect()
    return sum(
        isinstance(thing, asyncio.Task)
        and getattr(thing.get_coro(), "__qualname__", None) == "read_page"
        for thing in gc.get_objects()
    )


@pytest.mark.anyio
async def test_a_listing_whose_guesses_go_wrong_is_walked_by_its_tokens_alone(
    server: ServerThread,
) -> None:
    # A far API whose pages end where it likes: nearly every guess at an offset would be wrong,
    # each wrong one cancelled and replaced by up to 7 more (7.6 requests a page), and the
    # guesses answered before their token proved them wrong were held, with their pages, as
    # long as the listing was walked.
    for n in range(300):
        add_file(server, f"checkpoint-10/more-{n}.bin", 10)
    server.faults.page_length = lambda offset, size: min(size, 7 - offset % 7)
    server.faults.api_delay = 0.01
    async with job_files(server) as pages:
        walked = 0
        async for _ in pages:
            walked += 1
            if walked == 80:
                # Those kept ahead, the one handed on, those cancelled and still winding down.
                assert pages_held() <= 2 * PAGES_AHEAD + 1
    assert server.traffic.api_requests <= walked + PAGES_AHEAD  # the guesses before one failed


# Python keeps the bytes of an argument that is not valid UTF-8 as lone surrogates.
NOT_UTF8 = b"job-\xff".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "flags",
    [
        ("--project", PROJECT, "--job", NOT_UTF8),
        ("--project", NOT_UTF8, "--job", JOB),
        ("--loops-run", NOT_UTF8),
        ("--base-model", NOT_UTF8),
        ("--loops-checkpoint", f"bt://loops:{NOT_UTF8}/weights/step-10"),
    ],
)
def test_an_id_that_is_not_utf8_is_asked_for_as_given_and_not_found(
    server: ServerThread, dest: Path, flags: tuple[str, ...]
) -> None:
    # The bytes given go to the API percent-encoded, for it to judge as it does any id it does
    # not know: not an internal error from encoding the request.
    result = run_cli("sync", "--api-url", server.url, "--dest", dest, *flags)

    assert result.code == 4, result.stderr
    assert "found" in result.stderr  # "not found", or Loops' "no checkpoints found"
    assert "internal error" not in result.stderr
    assert server.traffic.api_requests == 1
