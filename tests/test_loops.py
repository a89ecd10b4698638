"""Baseten Loops: `bt://` URIs, filters, and trainer/sampler checkpoints kept apart, over HTTP."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from checkpoint_sync.errors import UsageError
from checkpoint_sync.localserver import (
    Catalog,
    Faults,
    ServedCheckpoint,
    ServedFile,
    ServedLoopsCheckpoint,
    synthetic_loops_run,
)
from checkpoint_sync.models import LoopsTarget
from checkpoint_sync.sources.base import LISTINGS_AHEAD, Checkpoint, RemoteFile
from checkpoint_sync.sources.baseten_loops import (
    LoopsSource,
    LoopsUri,
    checkpoint_dir,
    parse_bt_uri,
)

from .support import (
    API_KEY,
    PUSHED_OFF_REQUESTS,
    ServerThread,
    api_client,
    assert_exact,
    first_answers,
    leave_in_parts,
    pushed_off_its_page,
    run_cli,
    staged,
    walk_through,
)

RUN = "k4q95w5"
OTHER_RUN = "p7zq2m1"  # another base model
SIBLING_RUN = "r3"  # the same base model as RUN
BASE_MODEL = "Qwen/Qwen3-8B"
DIR_KIND = {"trainer": "weights", "sampler": "sampler_weights"}


def loops_catalog(*, syncing_last: bool = False) -> Catalog:
    return Catalog(
        api_key=API_KEY,
        loops=[
            *synthetic_loops_run(RUN, BASE_MODEL, ranks=2, syncing_last=syncing_last),
            *synthetic_loops_run(OTHER_RUN, "meta-llama/Llama-3.1-8B", first_seed=150_000),
            *synthetic_loops_run(SIBLING_RUN, BASE_MODEL, names=("step-5",), first_seed=170_000),
        ],
    )


def with_future_target(catalog: Catalog) -> ServedLoopsCheckpoint:
    """Add to RUN its newest checkpoint, of a target the pages do not name (a later API's)."""
    newest = max(c.checkpoint.created_at for c in catalog.loops if c.run_id == RUN)
    files = [ServedFile(0, "head/value.safetensors", 3000, newest.isoformat(), 190_001)]
    checkpoint = ServedCheckpoint("step-30", newest + timedelta(hours=1), files=files)
    future = ServedLoopsCheckpoint(f"lc-{RUN}-rm-30", RUN, "reward_model", BASE_MODEL, checkpoint)
    catalog.loops.append(future)
    return future


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(loops_catalog()) as running:
        yield running


def sync(server: ServerThread, dest: Path, *extra: str) -> list[str]:
    return ["sync", "--api-url", server.url, "--dest", str(dest), "--concurrency", "4", *extra]


def of_run(server: ServerThread, run: str) -> list[ServedLoopsCheckpoint]:
    return [c for c in server.catalog.loops if c.run_id == run]


def landed(dest: Path, checkpoint: ServedLoopsCheckpoint, file: ServedFile) -> Path:
    """The documented layout: <run>/<weights|sampler_weights>-<name>/<rank>/<path>."""
    directory = f"{DIR_KIND[checkpoint.target]}-{checkpoint.checkpoint.checkpoint_id}"
    return dest / checkpoint.run_id / directory / str(file.node_rank) / file.name


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- bt:// URIs and directory names (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("bt://loops:k4q/weights/step-100", LoopsUri("k4q", LoopsTarget.TRAINER, "step-100")),
        ("bt://loops:k4q/sampler_weights/s", LoopsUri("k4q", LoopsTarget.SAMPLER, "s")),
    ],
)
def test_parse_bt_uri(uri: str, parsed: LoopsUri) -> None:
    assert parse_bt_uri(uri) == parsed
    assert str(parsed) == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("k4q/weights/step-1", "is not a bt:// URI"),
        ("https://loops:k4q/weights/step-1", "is not a bt:// URI"),
        ("bt://training:k4q/weights/step-1", "is not a Loops checkpoint"),
        ("bt://loops:k4q/weights", "has 2 part(s) after bt://loops:, expected 3"),
        ("bt://loops:k4q/weights/a/b", "has 4 part(s)"),
        ("bt://loops:/weights/step-1", "has no run id"),
        ("bt://loops:k4q/trainer/step-1", "'trainer' is neither weights (trainer) nor sampler"),
        ("bt://loops:k4q/weights/", "has no checkpoint name"),
    ],
)
def test_malformed_bt_uris_are_usage_errors_saying_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_bt_uri(uri)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("target", "name", "directory"),
    [
        (LoopsTarget.TRAINER, "step-10", "weights-step-10"),
        (LoopsTarget.SAMPLER, "step-10", "sampler_weights-step-10"),
        # A trainer checkpoint named like a sampler directory still cannot meet the sampler's.
        (LoopsTarget.TRAINER, "sampler_weights-x", "weights-sampler_weights-x"),
    ],
)
def test_checkpoint_dir(target: LoopsTarget, name: str, directory: str) -> None:
    assert checkpoint_dir(target, name) == directory


# --- sync over HTTP -------------------------------------------------------------------------------


def test_trainer_and_sampler_sharing_a_name_land_apart_byte_exact(
    server: ServerThread, dest: Path
) -> None:
    result = run_cli(*sync(server, dest, "--loops-run", RUN))

    assert result.code == 0, result.stderr
    expected = {landed(dest, c, f) for c in of_run(server, RUN) for f in c.checkpoint.files}
    assert files_under(dest / RUN) == expected
    for checkpoint in of_run(server, RUN):
        for file in checkpoint.checkpoint.files:
            assert_exact(landed(dest, checkpoint, file), file)
    assert sorted(p.name for p in (dest / RUN).iterdir()) == [
        "sampler_weights-step-10",
        "sampler_weights-step-20",
        "weights-step-10",
        "weights-step-20",
    ]


@pytest.mark.parametrize("required_only", [False, True], ids=["every-field", "required-only"])
def test_each_checkpoints_files_are_walked_page_by_page(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, required_only: bool
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "4")
    # Neither next_page_token nor sync_status is required: left out where null, their default.
    server.faults.required_only = required_only
    checkpoints = of_run(server, RUN)
    checkpoints[0].checkpoint.sync_status = None
    total = sum(len(c.checkpoint.files) for c in checkpoints)

    result = run_cli(*sync(server, dest, "--loops-run", RUN, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["fetched"] == total
    # One checkpoint list, then ceil(6 / 4) = 2 pages for each of the 4 checkpoints.
    assert server.traffic.api_requests == 1 + 4 * 2


def test_an_entry_off_the_schema_fails_as_that_file_under_its_own_checkpoint(
    server: ServerThread, dest: Path
) -> None:
    uri = f"bt://loops:{RUN}/sampler_weights/step-10"
    (sampler,) = [c for c in of_run(server, RUN) if c.uri == uri]
    unreadable = sampler.checkpoint.files[0]
    server.faults.unreadable = {unreadable.name}
    off_schema = [f for f in sampler.checkpoint.files if f.name == unreadable.name]

    result = run_cli(*sync(server, dest, "--loops-checkpoint", uri, "--json"))

    assert result.code == 1
    failures = json.loads(result.stdout)["failures"]
    assert sorted(f["path"] for f in failures) == sorted(
        str(landed(dest, sampler, f).relative_to(dest)) for f in off_schema
    )
    assert files_under(dest / RUN) == {
        landed(dest, sampler, f) for f in sampler.checkpoint.files if f not in off_schema
    }


def test_a_bt_uri_mirrors_that_checkpoint_only(server: ServerThread, dest: Path) -> None:
    uri = f"bt://loops:{RUN}/sampler_weights/step-10"

    result = run_cli(*sync(server, dest, "--loops-checkpoint", uri))

    assert result.code == 0, result.stderr
    assert [p.name for p in (dest / RUN).iterdir()] == ["sampler_weights-step-10"]
    (sampler,) = [c for c in of_run(server, RUN) if c.uri == uri]
    assert files_under(dest / RUN) == {landed(dest, sampler, f) for f in sampler.checkpoint.files}


def test_a_base_model_spans_its_runs(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync(server, dest, "--base-model", BASE_MODEL))

    assert result.code == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir() if p.name != ".checkpoint-sync") == [
        RUN,
        SIBLING_RUN,
    ]
    assert sorted(p.name for p in (dest / SIBLING_RUN).iterdir()) == [
        "sampler_weights-step-5",
        "weights-step-5",
    ]


def test_target_keeps_one_side(server: ServerThread, dest: Path) -> None:
    result = run_cli(*sync(server, dest, "--loops-run", RUN, "--target", "trainer"))

    assert result.code == 0, result.stderr
    assert sorted(p.name for p in (dest / RUN).iterdir()) == ["weights-step-10", "weights-step-20"]


def test_syncing_left_out_and_latest_checkpoint_node_rank_select(dest: Path) -> None:
    with ServerThread(loops_catalog(syncing_last=True)) as server:
        default = run_cli(*sync(server, dest / "a", "--loops-run", RUN))
        latest = run_cli(*sync(server, dest / "b", "--loops-run", RUN, "--latest"))
        latest_trainer = run_cli(
            *sync(server, dest / "c", "--loops-run", RUN, "--latest", "--target", "trainer")
        )
        named = run_cli(
            *sync(
                server,
                dest / "d",
                "--loops-run",
                RUN,
                "--checkpoint",
                "sampler_weights-step-10",
                "--node-rank",
                "1",
            )
        )

    assert default.code == latest.code == latest_trainer.code == named.code == 0
    assert f"still syncing: {RUN}/weights-step-20" in default.stdout
    assert f"still syncing: {RUN}/sampler_weights-step-20" in default.stdout
    assert sorted(p.name for p in (dest / "a" / RUN).iterdir()) == [
        "sampler_weights-step-10",
        "weights-step-10",
    ]
    # The sampler checkpoint was saved a minute after its trainer twin.
    assert [p.name for p in (dest / "b" / RUN).iterdir()] == ["sampler_weights-step-10"]
    assert [p.name for p in (dest / "c" / RUN).iterdir()] == ["weights-step-10"]
    assert [p.name for p in (dest / "d" / RUN).iterdir()] == ["sampler_weights-step-10"]
    assert [p.name for p in (dest / "d" / RUN / "sampler_weights-step-10").iterdir()] == ["1"]


@pytest.mark.parametrize(
    "picked",
    [
        ["--loops-checkpoint", f"bt://loops:{RUN}/weights/step-20"],
        ["--loops-run", RUN, "--checkpoint", "weights-step-20"],
    ],
    ids=["uri", "named"],
)
def test_a_restore_of_a_checkpoint_still_uploading_fails_and_fetches_nothing(
    dest: Path, picked: list[str]
) -> None:
    # Exit 0 with nothing fetched would let `sync ... && resume-training` go on with nothing.
    with ServerThread(loops_catalog(syncing_last=True)) as server:
        refused = run_cli(*sync(server, dest / "a", *picked))
        included = run_cli(*sync(server, dest / "b", *picked, "--include-syncing"))

    assert refused.code == 4
    source = "checkpoint" if picked[0] == "--loops-checkpoint" else "run"
    assert f"nothing to restore from Loops {source}" in refused.stderr
    assert f"{RUN}/weights-step-20 is still uploading" in refused.stderr
    assert "--include-syncing takes it as it is" in refused.stderr
    assert not (dest / "a" / RUN).exists()
    assert included.code == 0, included.stderr
    assert [p.name for p in (dest / "b" / RUN).iterdir()] == ["weights-step-20"]


def test_a_restore_of_a_trainer_checkpoint_names_its_directory_and_unique_id(
    server: ServerThread, dest: Path
) -> None:
    args = ("--loops-run", RUN, "--latest", "--target", "trainer", "--json")
    result = run_cli(*sync(server, dest, *args))

    assert result.code == 0, result.stderr
    path = f"{dest}/{RUN}/weights-step-20"
    assert json.loads(result.stdout)["checkpoints"] == [
        {
            "checkpoint": f"{RUN}/weights-step-20",
            "id": f"lc-{RUN}-trainer-step-20",
            "path": path,
            "step": None,
            "metrics": {},
            "complete": True,
        }
    ]
    assert sorted(p.name for p in Path(path).iterdir()) == ["0", "1"]


@pytest.mark.parametrize("listed", ["as-saved", "reversed"])
def test_latest_of_twins_saved_at_one_instant_takes_the_trainer_whatever_the_api_order(
    dest: Path, listed: str
) -> None:
    # README: of checkpoints made at one instant, --latest takes the last by name: of step-20's
    # trainer and sampler twins, the trainer (weights-step-20), whichever the API lists first.
    catalog = loops_catalog()
    trainer, sampler = (
        c for c in catalog.loops if c.run_id == RUN and c.checkpoint.checkpoint_id == "step-20"
    )
    sampler.checkpoint.created_at = trainer.checkpoint.created_at
    if listed == "reversed":
        catalog.loops.reverse()
    with ServerThread(catalog) as server:
        latest = run_cli(*sync(server, dest, "--loops-run", RUN, "--latest"))

    assert latest.code == 0, latest.stderr
    assert [p.name for p in (dest / RUN).iterdir()] == ["weights-step-20"]
    assert files_under(dest / RUN) == {landed(dest, trainer, f) for f in trainer.checkpoint.files}


def test_a_checkpoint_of_a_target_the_pages_do_not_name_fails_alone(dest: Path) -> None:
    catalog = loops_catalog()
    future = with_future_target(catalog)
    with ServerThread(catalog) as server:
        whole = run_cli(*sync(server, dest / "a", "--loops-run", RUN, "--json"))
        trainer = run_cli(*sync(server, dest / "b", "--loops-run", RUN, "--target", "trainer"))
        latest = run_cli(*sync(server, dest / "c", "--loops-run", RUN, "--latest"))
        named = run_cli(*sync(server, dest / "d", "--loops-run", RUN, "--checkpoint", future.id))

    # The run's other checkpoints land; the one with no directory to land in fails as one entry.
    assert whole.code == 1, whole.stderr
    (failure,) = json.loads(whole.stdout)["failures"]
    assert failure["path"] == f"{RUN}/step-30 (target reward_model, id {future.id})"
    assert "target: Input should be 'trainer' or 'sampler'" in failure["error"]
    mirrorable = [c for c in of_run(server, RUN) if c is not future]
    expected = {landed(dest / "a", c, f) for c in mirrorable for f in c.checkpoint.files}
    assert files_under(dest / "a" / RUN) == expected
    # --target leaves it out as it leaves out the other side, quietly; --latest passes over it,
    # saying so in one line, as it is newer than the one taken.
    assert trainer.code == latest.code == 0, trainer.stderr + latest.stderr
    assert trainer.stderr == ""
    assert [p.name for p in (dest / "c" / RUN).iterdir()] == ["sampler_weights-step-20"]
    assert latest.stderr == (
        f"--latest took {RUN}/sampler_weights-step-20; a newer checkpoint was left out: "
        f"{RUN}/step-30 (target reward_model, id {future.id}): its listing entry is unreadable "
        "(target: Input should be 'trainer' or 'sampler'), so it cannot be mirrored\n"
    )
    # Named by its id, it cannot be mirrored: a usage error in one line, not a traceback.
    assert named.code == 2
    assert named.stderr.count("\n") == 1
    assert f"id {future.id}) in Loops run {RUN}: its listing entry is unreadable" in named.stderr
    assert not (dest / "d").exists()


def test_a_checkpoint_deleted_after_the_list_was_read_fails_alone(
    server: ServerThread, dest: Path
) -> None:
    # The checkpoint list is read, then the checkpoints' files; the second checkpoint's file
    # listing answers 404, as it does once the checkpoint is deleted.
    server.faults.files_gone = {f"lc-{RUN}-sampler-step-10"}
    result = run_cli(*sync(server, dest, "--loops-run", RUN, "--json"))

    # It exited 4, as for an unknown run, and the checkpoints after it were never listed.
    assert result.code == 1, result.stderr
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["path"] == f"{RUN}/sampler_weights-step-10"
    assert failure["error"].startswith("deleted after the checkpoint list was read: ")
    assert failure["error"].endswith("not found (HTTP 404)")
    for checkpoint in of_run(server, RUN):
        gone = checkpoint.id == f"lc-{RUN}-sampler-step-10"
        for file in checkpoint.checkpoint.files:
            if gone:
                assert not landed(dest, checkpoint, file).exists()
            else:
                assert_exact(landed(dest, checkpoint, file), file)

    # `list` shows it as the mirror holds it: once mirrored, no longer listed.
    server.faults.files_gone = set()
    assert run_cli(*sync(server, dest, "--loops-run", RUN)).code == 0
    server.faults.files_gone = {f"lc-{RUN}-sampler-step-10"}
    listed = run_cli("list", "--api-url", server.url, "--loops-run", RUN, "--dest", dest, "--json")
    assert listed.code == 0, listed.stderr
    assert {c["checkpoint"]: c["local"] for c in json.loads(listed.stdout)["checkpoints"]} == {
        "weights-step-10": "mirrored",
        "sampler_weights-step-10": "changed remotely",
        "weights-step-20": "mirrored",
        "sampler_weights-step-20": "mirrored",
    }


def test_latest_passes_over_a_checkpoint_deleted_after_the_list_was_read(
    server: ServerThread, dest: Path
) -> None:
    # The newest trainer checkpoint is deleted once the checkpoint list was read: a rerun,
    # reading the list anew, would restore the one before it, and so does this run.
    server.faults.files_gone = {f"lc-{RUN}-trainer-step-20"}
    restore = ["--loops-run", RUN, "--target", "trainer", "--latest"]
    result = run_cli(*sync(server, dest, *restore, "--node-rank", "1", "--json"))
    requests = server.traffic.api_requests
    listed = run_cli("list", "--api-url", server.url, *restore, "--json")
    server.faults.files_gone.add(f"lc-{RUN}-trainer-step-10")
    none_left = run_cli(*sync(server, dest / "b", *restore))

    gone = (
        f"deleted after the checkpoint list was read: Loops checkpoint {RUN}/weights-step-20: "
        "not found (HTTP 404)"
    )
    note = (
        f"--latest took {RUN}/weights-step-10; a newer checkpoint was left out: "
        f"{RUN}/weights-step-20: {gone}\n"
    )
    assert result.code == listed.code == 0, result.stderr
    assert result.stderr == listed.stderr == note
    document = json.loads(result.stdout)
    assert document["failures"] == []
    assert document["passed_over"] == [{"checkpoint": f"{RUN}/weights-step-20", "error": gone}]
    (taken,) = document["checkpoints"]
    assert taken["checkpoint"] == f"{RUN}/weights-step-10"
    older = next(c for c in of_run(server, RUN) if c.id == f"lc-{RUN}-trainer-step-10")
    rank_1 = [f for f in older.checkpoint.files if f.node_rank == 1]
    assert files_under(Path(taken["path"])) == {landed(dest, older, f) for f in rank_1}
    for file in rank_1:
        assert_exact(landed(dest, older, file), file)
    # The checkpoint list, the deleted one's listing, and the first page of the one taken,
    # read once: looked at first, then mirrored from.
    assert requests == 3
    shown = json.loads(listed.stdout)
    assert [c["checkpoint"] for c in shown["checkpoints"]] == ["weights-step-10"]
    assert [c["checkpoint"] for c in shown["left_out"]] == [f"{RUN}/weights-step-20"]
    # With none left, it is not found, naming the newest and why.
    assert none_left.code == 4
    assert none_left.stderr == f"checkpoint-sync: error: {RUN}/weights-step-20: {gone}\n"
    assert not (dest / "b" / RUN).exists()


def test_latest_asks_again_for_the_page_it_looked_at_once_it_waited_for_the_lock(
    server: ServerThread, dest: Path
) -> None:
    # The first page of files --latest read while looking is read before the lock: after a
    # wait for another run, its URLs may have expired, and each file would cost a refresh.
    server.faults.files_gone = {f"lc-{RUN}-trainer-step-20"}
    server.faults.url_ttl = 0.5
    (dest / ".checkpoint-sync").mkdir(parents=True)
    other_run = os.open(dest / ".checkpoint-sync" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other_run, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [other_run]).start()
    restore = ["--loops-run", RUN, "--target", "trainer", "--latest", "--wait-lock"]

    result = run_cli(*sync(server, dest, *restore, "--json"))

    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["url_refreshes"] == 0
    (taken,) = document["checkpoints"]
    assert taken["checkpoint"] == f"{RUN}/weights-step-10"
    older = next(c for c in of_run(server, RUN) if c.id == f"lc-{RUN}-trainer-step-10")
    for file in older.checkpoint.files:
        assert_exact(landed(dest, older, file), file)
    # The list, the deleted one's listing and the page looked at, then, once the lock was
    # taken, the list and that page again.
    assert server.traffic.api_requests == 5


def test_an_unreadable_checkpoint_named_by_its_name_is_the_usage_error_its_id_is(
    dest: Path,
) -> None:
    catalog = loops_catalog()
    future = with_future_target(catalog)
    with ServerThread(catalog) as server:
        by_id = run_cli(*sync(server, dest, "--loops-run", RUN, "--checkpoint", future.id))
        # Its name as the failure and `list`'s "left out:" line show it: RUN/step-30 (...).
        by_name = run_cli(*sync(server, dest, "--loops-run", RUN, "--checkpoint", "step-30"))

    assert by_id.code == by_name.code == 2, by_name.stderr
    assert by_name.stderr == by_id.stderr
    assert not dest.exists()


def test_an_unreadable_checkpoint_whose_target_is_known_goes_by_its_directory_name(
    dest: Path,
) -> None:
    # Off the schema elsewhere than in its target (a size that is not a number), the entry still
    # tells which directory it would land in, as `list` shows the run's other checkpoints.
    with ServerThread(loops_catalog()) as server:
        newest = max(of_run(server, RUN), key=lambda c: c.checkpoint.created_at)
        assert newest.target == "sampler"
        server.faults.unreadable = {newest.id}
        named = run_cli(
            *sync(server, dest / "a", "--loops-run", RUN, "--checkpoint", "sampler_weights-step-20")
        )
        latest = run_cli(*sync(server, dest / "b", "--loops-run", RUN, "--latest", "--quiet"))
        listed = run_cli("list", "--api-url", server.url, "--loops-run", RUN, "--latest")

    assert named.code == 2, named.stderr
    where = f"{RUN}/step-20 (target sampler, id {newest.id})"
    assert f"error: {where} in Loops run {RUN}: its listing entry is unreadable" in named.stderr
    # --latest takes the newest it can mirror, the trainer twin saved a minute before, and says
    # which newer one it passed over and why, even under --quiet; a success all the same.
    note = f"--latest took {RUN}/weights-step-20; a newer checkpoint was left out: {where}: "
    assert latest.code == listed.code == 0, latest.stderr + listed.stderr
    assert [p.name for p in (dest / "b" / RUN).iterdir()] == ["weights-step-20"]
    for result in (latest, listed):
        (line,) = result.stderr.splitlines()
        assert line.startswith(note + "its listing entry is unreadable (size_bytes:"), line
        assert line.endswith("so it cannot be mirrored")
    assert [line.split()[1] for line in listed.stdout.splitlines()[1:]] == ["weights-step-20"]


def test_a_checkpoint_left_out_as_unreadable_is_one_listed_entry_of_a_run_that_started(
    dest: Path,
) -> None:
    catalog = loops_catalog()
    with_future_target(catalog)
    state = dest / "b" / ".checkpoint-sync"
    state.mkdir(parents=True)
    with ServerThread(catalog) as server, (state / "lock").open("w") as held:
        ran = run_cli(*sync(server, dest / "a", "--loops-run", RUN, "--json"))
        fcntl.flock(held, fcntl.LOCK_EX)
        locked = run_cli(*sync(server, dest / "b", "--loops-run", RUN, "--json"))

    # It fails as one entry of the listing, as a file entry off the schema does: counted listed.
    files = json.loads(ran.stdout)["files"]
    assert files["failed"] == 1
    assert files["listed"] == files["fetched"] + files["failed"]
    # A run that never started (another holds the mirror) listed nothing and failed nothing.
    assert locked.code == 5
    assert json.loads(locked.stdout)["failures"] == []


def test_a_file_a_changing_listing_did_not_show_is_found_by_walking_it_again(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file deleted upstream after the listing's first page: the second page starts one entry
    # too far, and the file that moved up onto the first one is not shown by that walk. The
    # next walk shows it, and it is resumed from its parts, in the same run.
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, size=200_000))
    with ServerThread(catalog) as server:
        uri = f"bt://loops:{RUN}/weights/step-10"
        args = sync(server, dest, "--loops-checkpoint", uri, "--part-size", "64KiB")
        leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        files = of_run(server, RUN)[0].checkpoint.files
        monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "1")
        deleted, missed = files[0], files[1]

        def delete(offset: int) -> None:
            server.faults.on_page = None
            files.remove(deleted)

        server.faults.on_page = delete
        server.traffic.ranges.clear()
        changed = run_cli(*args, "--json")

    assert changed.code == 0, changed.stderr
    assert json.loads(changed.stdout)["listings_changed"] == []
    assert_exact(landed(dest, of_run(server, RUN)[0], missed), missed)
    # Its two parts fetched in the first run are not fetched again.
    assert sorted(start for name, start, _ in server.traffic.ranges if name == missed.name) == list(
        range(128 << 10, missed.size, 64 << 10)
    )
    assert staged(dest) == set()


@pytest.mark.parametrize("unreadable", [False, True], ids=["readable", "a-target-unnamed"])
def test_the_parts_of_a_checkpoint_deleted_upstream_go_and_no_other_ones(
    dest: Path, monkeypatch: pytest.MonkeyPatch, unreadable: bool
) -> None:
    catalog = Catalog(
        api_key=API_KEY,
        loops=[
            *synthetic_loops_run(RUN, BASE_MODEL, size=200_000),
            *synthetic_loops_run(
                OTHER_RUN, "meta-llama/Llama-3.1-8B", size=200_000, first_seed=150_000
            ),
        ],
    )
    if unreadable:
        with_future_target(catalog)  # the run's list does not tell all its directories
    with ServerThread(catalog) as server:
        for run in (RUN, OTHER_RUN):
            args = sync(server, dest, "--loops-run", run, "--part-size", "64KiB")
            leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        assert len(staged(dest)) == 8
        (deleted,) = [c for c in of_run(server, RUN) if c.id == f"lc-{RUN}-trainer-step-10"]
        server.call(lambda: server.catalog.loops.remove(deleted))

        # Its sampler twin, of the same name, is still listed; so is the trainer's step-20,
        # which --target leaves out; another run's list was not read.
        result = run_cli(*sync(server, dest, "--loops-run", RUN, "--target", "sampler", "--latest"))

    assert result.code == 0, result.stderr
    kept = {f"{RUN}/sampler_weights-step-10", f"{RUN}/weights-step-20"}
    kept |= {f"{OTHER_RUN}/{kind}-step-{n}" for kind in DIR_KIND.values() for n in (10, 20)}
    assert staged(dest) == kept | ({f"{RUN}/weights-step-10"} if unreadable else set())


def test_a_checkpoint_deleted_after_the_list_was_read_keeps_its_parts_not_the_others_removed(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its files were not there to list: their parts stay, until a list read whole no longer has
    # it. The others' listings were walked whole: the parts of a file removed from one go.
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, BASE_MODEL, size=200_000))
    with ServerThread(catalog) as server:
        args = sync(server, dest, "--loops-run", RUN, "--part-size", "64KiB")
        leave_in_parts(server, monkeypatch, args, from_byte=128 << 10)
        staging = dest / ".checkpoint-sync" / "staging"
        assert len(list(staging.iterdir())) == 3 * 4
        by_id = {c.id: c for c in of_run(server, RUN)}
        server.faults.files_gone = {f"lc-{RUN}-sampler-step-10"}
        server.call(by_id[f"lc-{RUN}-trainer-step-20"].checkpoint.files.pop)

        result = run_cli(*args, "--json")

    assert result.code == 1, result.stderr
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["path"] == f"{RUN}/sampler_weights-step-10"
    assert staged(dest) == {f"{RUN}/sampler_weights-step-10"}
    assert len(list(staging.iterdir())) == 3


def test_delete_removes_a_trainer_checkpoint_removed_upstream_not_its_sampler_twin(
    dest: Path,
) -> None:
    with ServerThread(loops_catalog()) as server:
        assert run_cli(*sync(server, dest, "--loops-run", RUN)).code == 0
        (deleted,) = [c for c in of_run(server, RUN) if c.id == f"lc-{RUN}-trainer-step-10"]
        server.call(lambda: server.catalog.loops.remove(deleted))
        kept = of_run(server, RUN)
        result = run_cli(*sync(server, dest, "--loops-run", RUN, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["removed_upstream"] == [f"{RUN}/weights-step-10"]
    assert not (dest / RUN / "weights-step-10").exists()
    for checkpoint in kept:
        for file in checkpoint.checkpoint.files:
            assert_exact(landed(dest, checkpoint, file), file)


def test_expired_urls_are_refreshed_through_the_checkpoints_own_listing(dest: Path) -> None:
    catalog = Catalog(
        api_key=API_KEY, loops=synthetic_loops_run(RUN, names=("step-1",), files=1, size=1 << 20)
    )
    with ServerThread(catalog) as server:
        server.faults.url_ttl = 0.3
        server.faults.throttle = 2 << 20  # 4 parts of 256 KiB at ~0.12 s each
        uri = f"bt://loops:{RUN}/weights/step-1"

        result = run_cli(
            *sync(server, dest, "--loops-checkpoint", uri, "--part-size", "256KiB", "--json"),
            "--concurrency",
            "1",
        )

        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["url_refreshes"] > 0
        (trainer,) = [c for c in catalog.loops if c.uri == uri]
        assert_exact(
            landed(dest, trainer, trainer.checkpoint.files[0]), trainer.checkpoint.files[0]
        )


def test_each_page_of_a_checkpoints_listing_is_read_again_once_for_its_files(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 files on two pages of 20. The first four answers stall until every listed URL has
    # expired: one read of each page again serves all its files.
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "20")
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, names=("step-1",), files=40))
    faults = Faults(url_ttl=1.0, hook=first_answers(4, "stall"), stall_seconds=1.5, api_delay=0.3)
    with ServerThread(catalog, faults) as server:
        uri = f"bt://loops:{RUN}/weights/step-1"

        result = run_cli(*sync(server, dest, "--loops-checkpoint", uri, "--json"))

        assert result.code == 0, result.stderr
        (trainer,) = [c for c in catalog.loops if c.uri == uri]
        for file in trainer.checkpoint.files:
            assert_exact(landed(dest, trainer, file), file)
        # The checkpoint list and the two pages, then each page once again.
        assert server.traffic.api_requests == 1 + 2 + 2


def test_a_refused_url_of_a_file_pushed_off_its_page_is_found_further_on_and_lands(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a training job (test_faults.py): four files on two pages of two; the last one's URL
    # is refused once the listing was walked, and a file is added at its start meanwhile. The
    # checkpoint's own listing, looked through, shows it on the next page with a fresh URL.
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, names=("step-1",), files=4))
    uri = f"bt://loops:{RUN}/weights/step-1"
    (trainer,) = [c for c in catalog.loops if c.uri == uri]
    files = trainer.checkpoint.files
    added, refuse_once = pushed_off_its_page(files, "adapter/added.json", 190_500)

    with ServerThread(catalog, Faults(hook=refuse_once)) as server:
        result = run_cli(*sync(server, dest, "--loops-checkpoint", uri, "--json"))

        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["url_refreshes"] == 1
        assert summary["files"]["fetched"] == 4
        for file in files:
            if file is not added:  # listed after the walk: the next run's
                assert_exact(landed(dest, trainer, file), file)
        assert server.traffic.api_requests == PUSHED_OFF_REQUESTS


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loops-checkpoint", "bt://loops:k4q/weight/step-1"], "'weight' is neither"),
        (["--loops-run", RUN, "--base-model", BASE_MODEL], "choose one of --loops-run"),
        (["--target", "sampler"], "choose one of --loops-run"),
        (
            ["--loops-checkpoint", f"bt://loops:{RUN}/weights/step-10", "--target", "sampler"],
            "--target sampler contradicts",
        ),
        (["--loops-run", RUN, "--project", "p", "--job", "j"], "choose exactly one source"),
    ],
)
def test_usage_errors_exit_2_in_one_line(
    server: ServerThread, dest: Path, flags: list[str], message: str
) -> None:
    result = run_cli(*sync(server, dest, *flags))

    assert result.code == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert server.traffic.api_requests == 0


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--loops-run", RUN, "--best", "reward"], "--best (wandb-training)"),
        (["--base-model", BASE_MODEL, "--minimize"], "--minimize (wandb-training)"),
        (["--project", "p", "--job", "j", "--target", "sampler"], "--target (baseten-loops)"),
    ],
)
def test_a_flag_of_another_source_is_named_as_such(
    server: ServerThread, dest: Path, flags: list[str], named: str
) -> None:
    """--best/--minimize are W&B's alone and --target is Loops' alone: mixed into another
    source's flags, the message says which flag belongs to which source (it only said "choose
    exactly one source", to someone who had named one), and no request goes out."""
    result = run_cli(*sync(server, dest, *flags))

    assert result.code == 2
    assert "choose exactly one source" in result.stderr
    assert named in result.stderr
    assert server.traffic.api_requests == 0


def test_the_apis_422_for_the_checkpoint_list_is_shown_and_exits_2(
    server: ServerThread, dest: Path
) -> None:
    # An empty filter, which the API refuses so, is refused before any request (test_sync):
    # the API's own 422 stands in for one it refuses that we cannot tell.
    server.faults.api_faults = ["422"]
    result = run_cli(*sync(server, dest, "--loops-run", RUN))

    assert result.code == 2
    assert "the API rejected the request: page_size is out of range" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "query",
    [
        "",
        f"run_id={RUN}&base_model=Qwen",
        "checkpoint_path=bt://loops:k4q/weights",
    ],
)
def test_the_fake_api_wants_exactly_one_well_formed_filter(
    server: ServerThread, query: str
) -> None:
    request = urllib.request.Request(
        f"{server.url}/v1/loops/checkpoints?{query}",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)

    assert caught.value.code == 422
    detail = json.loads(caught.value.read())["detail"]
    assert detail[0]["loc"] == ["query"]


def test_an_unknown_checkpoint_exits_4(server: ServerThread, dest: Path) -> None:
    uri = f"bt://loops:{RUN}/weights/step-99"

    result = run_cli(*sync(server, dest, "--loops-checkpoint", uri))

    assert result.code == 4
    assert f"Loops checkpoint {uri}: no checkpoints found" in result.stderr


@dataclass
class Growing:
    source: LoopsSource
    selected: list[Checkpoint]
    grow: Callable[[int], None]


@asynccontextmanager
async def a_trainer_listing_that_can_grow() -> AsyncIterator[tuple[ServerThread, Growing]]:
    """A Loops run of one trainer and one sampler checkpoint, its source reading pages of 2 and
    its checkpoints selected; and `grow`, a `Faults.on_page` that uploads a file to the trainer
    checkpoint with each page of a listing read."""
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, names=("step-10",)))
    files = catalog.loops[0].checkpoint.files  # the trainer's
    stamp = files[0].last_modified

    def grow(offset: int) -> None:
        files.append(ServedFile(0, f"new-{len(files)}.bin", 10, stamp, 9000 + len(files)))

    with ServerThread(catalog) as server:
        async with api_client(server.url) as api:
            source = LoopsSource(api, ("run_id", RUN), f"Loops run {RUN}", page_size=2)
            selected = [c for c in await source.checkpoints() if isinstance(c, Checkpoint)]
            yield server, Growing(source, selected, grow)


@pytest.mark.parametrize("moving", [False, True], ids=["planning-walk", "counting-walk"])
@pytest.mark.anyio
async def test_what_moved_is_told_of_the_walk_that_plans_not_of_one_only_to_count(
    moving: bool,
) -> None:
    # The trainer checkpoint's listing grows while one of the two walks reads it (a walk only to
    # count is a progress display's, beside the one that plans): whether the run says it moved
    # is the planning's.
    async with a_trainer_listing_that_can_grow() as (server, run):
        for counting in (False, True):
            grows = run.grow if counting == moving else None
            server.call(partial(setattr, server.faults, "on_page", grows))
            await walk_through(run.source.file_pages(run.selected, counting=counting))
    assert run.source.moved_while_listed() == (set() if moving else {(RUN, "weights-step-10")})


@pytest.mark.parametrize("counting", [False, True], ids=["planning-walk", "counting-walk"])
@pytest.mark.anyio
async def test_a_walk_only_to_count_reads_a_listing_that_keeps_changing_once(
    counting: bool,
) -> None:
    # A file uploaded with each page read: walked again, the walk that counts the progress's
    # total would count the trainer checkpoint's files three times over (it cannot tell a repeat).
    async with a_trainer_listing_that_can_grow() as (server, run):

        async def entries() -> int:
            pages = run.source.file_pages(run.selected, counting=counting)
            async with aclosing(pages):
                return sum([len(page) async for page in pages])

        still = await entries()
        server.call(partial(setattr, server.faults, "on_page", run.grow))
        changing = await entries()
    assert (changing < 2 * still) == counting


@pytest.mark.anyio
async def test_the_next_checkpoints_listings_are_asked_for_while_one_is_planned() -> None:
    names = tuple(f"step-{n}" for n in range(1, 8))  # a trainer and a sampler each: 14
    catalog = Catalog(api_key=API_KEY, loops=synthetic_loops_run(RUN, names=names))
    with ServerThread(catalog, Faults(api_delay=0.05)) as server:  # a far API
        async with api_client(server.url) as api:
            source = LoopsSource(api, ("run_id", RUN), f"Loops run {RUN}")
            selected = [c for c in await source.checkpoints() if isinstance(c, Checkpoint)]
            pages = [page async for page in source.file_pages(selected)]
        # Its latency is paid once for 8 listings, not checkpoint after checkpoint.
        # 8 ahead, and the one being walked if its answer is still to come.
        assert LISTINGS_AHEAD <= server.traffic.api_in_flight.most <= 1 + LISTINGS_AHEAD
        assert server.traffic.api_requests == 1 + 14  # each listing asked for once
    # Each checkpoint's files, in the order of the checkpoints, as if listed one after another.
    listed = [
        (f.checkpoint, f.node_rank, f.path)
        for page in pages
        for f in page
        if isinstance(f, RemoteFile)
    ]
    assert listed == [
        (checkpoint_dir(LoopsTarget(c.target), c.checkpoint.checkpoint_id), f.node_rank, f.name)
        for c in sorted(catalog.loops, key=lambda c: c.checkpoint.created_at)
        for f in c.checkpoint.files
    ]
