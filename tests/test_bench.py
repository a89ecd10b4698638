"""`checkpoint-sync bench`: its decisions by table, and a real run against the built-in server."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from checkpoint_sync import cli
from checkpoint_sync.bench import (
    FailedTrial,
    Setting,
    Trial,
    budgeted_pages,
    fastest_not_recommended,
    grid,
    middle_round,
    recommend,
    request_medians,
    same_as,
    settings_of,
    stops_bench,
    transfer_of,
)
from checkpoint_sync.engine import manifest_path
from checkpoint_sync.errors import (
    ApiError,
    AuthError,
    CheckpointSyncError,
    IntegrityError,
    LocalIOError,
    LockHeldError,
    MalformedResponseError,
    NotFoundError,
    RequestRejectedError,
    TransientError,
    UsageError,
)
from checkpoint_sync.localserver import Faults, ServedFile
from checkpoint_sync.plan import FileFilter, select_checkpoints
from checkpoint_sync.progress import human_bytes
from checkpoint_sync.sources.baseten_training import TrainingJobSource

from .conftest import (
    JOB,
    PROJECT,
    job_args,
    job_catalog,
    job_with_a_file_pushed_off_its_page,
    sync_args,
)
from .support import (
    PUSHED_OFF_REQUESTS,
    ServerThread,
    api_client,
    first_answers,
    pages_being_read,
    run_cli,
    run_subprocess,
    stop_while_the_manifest_is_held,
)
from .test_kill import wait_for
from .test_local_errors import immutable, mounted


def errors(stderr: str) -> list[str]:
    """The error lines of ``stderr``, without the line each trial's end adds."""
    return [line for line in stderr.splitlines() if line.startswith("checkpoint-sync: error: ")]


def trial(concurrency: int, part_size: int, mb: float, failed: int = 0) -> Trial:
    return Trial(concurrency, part_size, 1, failed, int(mb * 1e6), 1.0, 0.1, None, None)


def fetched(concurrency: int, part_size: int, mb: float, sizes: list[int]) -> Trial:
    """A `trial` of files of ``sizes``."""
    return dataclasses.replace(
        trial(concurrency, part_size, mb), transfer=transfer_of(concurrency, part_size, sizes)
    )


def failed_trial(concurrency: int, part_size: int) -> FailedTrial:
    return FailedTrial(concurrency, part_size, TransientError("HTTP 503 from the API"))


def test_grid_tries_every_pair_once() -> None:
    assert grid([4, 8, 4], [1, 2]) == [(4, 1), (8, 1), (4, 2), (8, 2)]


@pytest.mark.parametrize(
    ("trials", "chosen"),
    [
        ([trial(4, 1, 100), trial(8, 1, 200)], (8, 1)),
        ([trial(4, 1, 196), trial(8, 1, 200)], (4, 1)),  # within 5%: fewer connections
        ([trial(4, 1, 200), trial(4, 2, 199)], (4, 2)),  # then fewer, larger parts
        ([trial(4, 1, 100), trial(8, 1, 300, failed=1)], (4, 1)),  # a trial that failed loses
        # By the median of its rounds: one fast round does not make a setting fast.
        ([*[trial(4, 1, 100), trial(8, 1, 90)] * 2, trial(4, 1, 100), trial(8, 1, 500)], (4, 1)),
        # A round that failed makes its setting one that failed.
        (
            [trial(4, 1, 100), trial(8, 1, 200), trial(4, 1, 100), trial(8, 1, 200, failed=1)],
            (4, 1),
        ),
        # A trial an error ended makes its setting one that did not work, however fast its
        # other rounds: it is recommended on no account, not even over failed files.
        ([trial(4, 1, 100), trial(8, 1, 300), failed_trial(8, 1)], (4, 1)),
        ([trial(4, 1, 100, failed=1), failed_trial(8, 1), trial(8, 1, 300)], (4, 1)),
        ([trial(4, 1, 100), failed_trial(8, 1), failed_trial(4, 1), trial(8, 1, 300)], None),
        ([failed_trial(4, 1)], None),
    ],
)
def test_recommend(trials: list[Trial | FailedTrial], chosen: tuple[int, int] | None) -> None:
    best = recommend(settings_of(trials))
    assert (best and (best.concurrency, best.part_size)) == chosen


@pytest.mark.parametrize(
    ("trials", "faster"),
    [
        ([trial(4, 1, 100), trial(8, 1, 200)], None),  # the fastest is recommended
        # Within 5%: 4 connections recommended, the faster row named so that it says why.
        ([trial(4, 1, 196), trial(8, 1, 200)], (8, 1)),
        ([trial(4, 1, 200), trial(4, 2, 199)], (4, 1)),  # larger parts recommended
        ([trial(4, 1, 200), trial(4, 2, 195), trial(8, 1, 201)], (8, 1)),
        # A faster row with a failed file is no setting to choose: its failures say why.
        ([trial(4, 1, 100), trial(8, 1, 300, failed=1)], None),
        ([trial(4, 1, 100), trial(8, 1, 300), failed_trial(8, 1)], None),
        ([failed_trial(4, 1)], None),
    ],
)
def test_fastest_not_recommended(
    trials: list[Trial | FailedTrial], faster: tuple[int, int] | None
) -> None:
    top = fastest_not_recommended(settings_of(trials))
    assert (top and (top.concurrency, top.part_size)) == faster


@pytest.mark.parametrize(
    ("concurrency", "part_size", "sizes", "transfer"),
    [
        (4, 100, [250, 100], (4, 100)),  # 3 parts and 1: all 4 in flight, files cut
        (8, 100, [250, 100], (4, 100)),  # 4 connections left unused
        (2, 100, [250, 100], (2, 100)),
        (4, 250, [250, 100], (2, None)),  # a file as large as a part is one part
        (4, 1000, [250, 100], (2, None)),  # as any larger part size
        (4, 249, [250, 100], (3, 249)),
        (4, 100, [0, 0, 0], (3, None)),  # an empty file is one part
        (1, 100, [1000], (1, 100)),
    ],
)
def test_transfer_of(
    concurrency: int, part_size: int, sizes: list[int], transfer: tuple[int, int | None]
) -> None:
    found = transfer_of(concurrency, part_size, sizes)
    assert (found.in_flight, found.cut) == transfer


def test_a_transfer_is_of_the_files_sizes() -> None:
    # In any order; but other files fetch otherwise, as few parts and connections as they take.
    assert transfer_of(2, 300, [300, 200]) == transfer_of(2, 300, [200, 300])
    assert transfer_of(2, 300, [300, 200]) != transfer_of(2, 300, [250, 100])


SMALL = [300, 200]  # a part size of 300 or more cuts neither; 2 connections fetch both at once


@pytest.mark.parametrize(
    ("trials", "alike", "chosen"),
    [
        # Parts larger than every file: the smaller part size, though the larger was faster.
        (
            [fetched(2, 300, 100, SMALL), fetched(2, 1000, 104, SMALL)],
            {(2, 1000): (2, 300)},
            (2, 300),
        ),
        # More connections than parts: the fewer, though the more were much faster by chance.
        ([fetched(2, 100, 100, SMALL), fetched(4, 100, 150, SMALL)], {}, (4, 100)),  # 5 parts
        (
            [fetched(2, 300, 100, SMALL), fetched(8, 300, 150, SMALL)],
            {(8, 300): (2, 300)},
            (2, 300),
        ),
        # Both: every larger one is the least's.
        (
            [fetched(c, p, mb, SMALL) for c, p, mb in [(2, 300, 90), (4, 300, 99), (4, 400, 99)]],
            {(4, 300): (2, 300), (4, 400): (2, 300)},
            (2, 300),
        ),
        # Grid order is the user's: the least is by size, not by place.
        (
            [fetched(8, 400, 150, SMALL), fetched(2, 300, 100, SMALL)],
            {(8, 400): (2, 300)},
            (2, 300),
        ),
        # Other files (a checkpoint made during the bench), though as many parts and none cut.
        ([fetched(2, 300, 100, SMALL), fetched(2, 1000, 200, [250, 100])], {}, (2, 1000)),
        # A file above the part size: the part sizes differ, so do the settings.
        ([fetched(2, 300, 100, [301]), fetched(2, 400, 200, [301])], {}, (2, 400)),
        # Rounds that listed different files tell no transfer: nothing is the same as another.
        (
            [
                fetched(2, 300, 100, SMALL),
                fetched(2, 300, 100, [1000]),
                fetched(2, 400, 200, SMALL),
            ],
            {},
            (2, 400),
        ),
        # The least failed a file: the larger one that did not is the one recommended.
        (
            [
                dataclasses.replace(fetched(2, 300, 200, SMALL), failed=1),
                fetched(2, 400, 100, SMALL),
            ],
            {(2, 400): (2, 300)},
            (2, 400),
        ),
    ],
)
def test_settings_that_fetch_alike_are_the_least_of_them(
    trials: list[Trial | FailedTrial],
    alike: dict[tuple[int, int], tuple[int, int]],
    chosen: tuple[int, int],
) -> None:
    settings = settings_of(trials)
    same = {pair: (s.concurrency, s.part_size) for pair, s in same_as(settings).items()}
    assert same == alike
    best = recommend(settings)
    assert best is not None
    assert (best.concurrency, best.part_size) == chosen
    assert fastest_not_recommended(settings) not in [
        s for s in settings if (s.concurrency, s.part_size) in alike
    ]


def test_a_setting_is_its_rounds_median_and_range() -> None:
    rounds = [trial(4, 1, 100, failed=1), trial(4, 1, 300), trial(4, 1, 150, failed=2)]
    (setting,) = settings_of(rounds)
    assert setting == Setting(tuple(rounds))
    assert setting.mb_per_s == pytest.approx(150)
    assert setting.spread == pytest.approx((100, 300))
    assert setting.failed == 2  # the files of its worst round
    assert setting.middle == rounds[2]  # the round its MB/s is, whose files and bytes it shows


def test_a_setting_is_the_rounds_it_measured_and_names_those_that_failed() -> None:
    error = failed_trial(4, 1)
    (setting,) = settings_of([error, trial(4, 1, 100), trial(4, 1, 300), trial(4, 1, 200)])
    assert setting.errors == [(1, error.error)]
    assert setting.mb_per_s == pytest.approx(200)  # the round that failed is no 0 MB/s
    assert setting.spread == pytest.approx((100, 300))
    assert setting.failed == 0

    (none_measured,) = settings_of([error, error])
    assert none_measured.errors == [(1, error.error), (2, error.error)]
    assert (none_measured.mb_per_s, none_measured.spread, none_measured.failed) == (None,) * 3


def round_of(files: int, size: int, seconds: float) -> Trial:
    return Trial(4, 1, files, 0, size, seconds, 0.1, None, None)


@pytest.mark.parametrize(
    ("rounds", "middle"),
    [
        ([], None),
        ([round_of(3, 30, 1)], 0),
        # Medians figure by figure said 4 files and 20 bytes: no round fetched that.
        ([round_of(3, 30, 1), round_of(4, 10, 1), round_of(5, 20, 1)], 2),
        # By MB/s, not seconds: the round of median seconds (0.8 s) is the fastest.
        ([round_of(5, 50, 0.5), round_of(10, 100, 2), round_of(10, 100, 0.8)], 0),
        # Of two in the middle, the slower: a real round, not the mean of two.
        ([round_of(1, 100, 1), round_of(1, 300, 1), round_of(1, 200, 1), round_of(1, 400, 1)], 2),
    ],
)
def test_middle_round(rounds: list[Trial], middle: int | None) -> None:
    assert middle_round(rounds) is (None if middle is None else rounds[middle])


@pytest.mark.parametrize(
    ("error", "stops"),
    [
        # Every trial after it would fail alike.
        (AuthError("HTTP 401 from the API"), True),
        (NotFoundError("training job job-1 not found"), True),
        (RequestRejectedError("page_size: too large"), True),
        (UsageError("the proxy asks for credentials"), True),
        # May be this trial's alone: the API or the link down for a while, a disk filled by
        # something else meanwhile, one answer off the schema.
        (TransientError("HTTP 503 from the API"), False),
        (MalformedResponseError("the API answered with something not JSON"), False),
        (ApiError("HTTP 400 from the API"), False),
        (LocalIOError("not enough space"), False),
        (LockHeldError("held by pid 7"), False),
        (IntegrityError("length does not match"), False),
        (CheckpointSyncError("anything else"), False),
    ],
)
def test_stops_bench(error: CheckpointSyncError, stops: bool) -> None:
    assert stops_bench(error) is stops


@pytest.mark.parametrize(
    ("timings", "first_byte_ms", "rate"),
    [
        ([], None, None),
        ([(0.001, 100, 0.1)], 1.0, None),  # too small to tell a rate
        ([(0.001, 2_000_000, 1.0), (0.003, 4_000_000, 1.0), (0.002, 10, 1.0)], 2.0, 3.0),
        ([(0.002, 1 << 20, 0.5)], 2.0, 2.097152),  # 1 MiB, the least that tells a rate
        # A request timed at no time at all (a coarse clock) tells no rate.
        ([(0.001, 2_000_000, 0.0), (0.003, 4_000_000, 2.0)], 2.0, 2.0),
    ],
)
def test_request_medians(
    timings: list[tuple[float, int, float]], first_byte_ms: float | None, rate: float | None
) -> None:
    assert request_medians(timings) == (
        pytest.approx(first_byte_ms) if first_byte_ms else None,
        pytest.approx(rate) if rate else None,
    )


def test_bench_runs_each_trial_within_its_budget_and_cleans_up(
    server: ServerThread, tmp_path: Path
) -> None:
    result = run_cli(
        *job_args(
            server,
            "bench",
            "--concurrency",
            "2,4",
            "--part-size",
            "256KiB",
            "--max-bytes",
            "2MiB",
            "--scratch",
            tmp_path,
            "--json",
        )
    )

    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [t["concurrency"] for t in report["trials"]] == [2, 4]
    for t in report["trials"]:
        assert t["failed"] == 0
        assert 0 < t["bytes"] <= 2 << 20
        assert t["first_byte_ms"] > 0
    assert report["recommended"]["concurrency"] in (2, 4)
    assert list(tmp_path.iterdir()) == []


def test_bench_without_a_source_measures_the_built_in_server() -> None:
    result = run_cli(
        "bench", "--concurrency", "2", "--part-size", "1MiB", "--max-bytes", "4MiB", "--json"
    )

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert only["bytes"] > 0
    assert only["failed"] == 0


def test_bench_node_rank_fetches_and_budgets_only_that_rank(tmp_path: Path) -> None:
    catalog = job_catalog()
    for checkpoint in catalog.jobs[0].checkpoints:  # rank 0 without its large file
        checkpoint.files = [f for f in checkpoint.files if f.node_rank or f.size < 1 << 20]
    with ServerThread(catalog) as server:
        synced = run_cli(*sync_args(server, tmp_path / "mirror", "--node-rank", "1", "--json"))
        rank_1 = json.loads(synced.stdout)
        result = run_cli(
            *job_args(
                server,
                "bench",
                "--node-rank",
                "1",
                "--concurrency",
                "4",
                "--part-size",
                "256KiB",
                "--max-bytes",
                str(rank_1["bytes"]["fetched"]),  # all of rank 1: none to spare for rank 0
                "--json",
            )
        )

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert (only["files"], only["bytes"]) == (
        rank_1["files"]["fetched"],
        rank_1["bytes"]["fetched"],
    )


@pytest.mark.parametrize(
    ("config", "flags", "taken"),
    [
        ("", [], "checkpoint-20"),
        ("true", [], "checkpoint-30"),
        ("", ["--include-syncing"], "checkpoint-30"),
    ],
)
def test_bench_latest_takes_the_checkpoint_sync_latest_would(
    tmp_path: Path, config: str, flags: list[str], taken: str
) -> None:
    settings = tmp_path / "cs.toml"
    settings.write_text(f"include_syncing = {config}\n" if config else "")
    with ServerThread(job_catalog(syncing_last=True)) as server:  # checkpoint-30 is syncing
        args = ["--latest", "--concurrency", "2", "--part-size", "256KiB", *flags]
        result = run_cli(*job_args(server, "bench", *args, "--config", settings))
        fetched = {name.partition("/")[0] for name, _, _ in server.traffic.ranges}

    assert result.code == 0, result.stderr
    # With include_syncing = true in the config it measured checkpoint-20 all the same.
    assert fetched == {taken}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", ","], "argument --concurrency: ',' is not an integer"),
        (
            ["--concurrency", "4,2000"],
            "bad setting concurrency from --concurrency: Input should be less than or equal to",
        ),
        (["--part-size", "1KiB"], "bad setting part_size from --part-size: Input should be"),
        (["--scratch", "/nonexistent/scratch"], "scratch directory /nonexistent/scratch"),
        (["--scratch", "/dev/null"], "scratch /dev/null is not a directory"),  # it exists
    ],
)
def test_bench_refuses_settings_sync_would_refuse(
    server: ServerThread, flags: list[str], message: str
) -> None:
    result = run_cli(*job_args(server, "bench", *flags))

    assert result.code == 2
    assert message in result.stderr
    assert "internal error" not in result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--concurrency", "0"],
        ["--concurrency", "2000"],
        ["--part-size", "1KiB"],
        ["--concurrency", ""],
        ["--part-size", ""],
        ["--part-size", "1x"],
        ["--node-rank", "-1"],
    ],
)
def test_bench_and_sync_refuse_a_bad_value_in_the_same_words(
    server: ServerThread, tmp_path: Path, flags: list[str]
) -> None:
    # Each was worded twice: "bad concurrency 0: ..." beside sync's "bad setting concurrency
    # from --concurrency: ...", and "no value in ''" beside "'' is not an integer".
    said = []
    for json_flag in ([], ["--json"]):
        for command in (["bench"], ["sync", "--dest", str(tmp_path / "mirror")]):
            result = run_cli(*job_args(server, *command, *flags, *json_flag))
            assert result.code == 2, result.stderr
            said.append(json.loads(result.stdout)["error"] if json_flag else errors(result.stderr))
    bench, sync, bench_json, sync_json = said
    assert bench == sync == [f"checkpoint-sync: error: {bench_json}"]
    assert bench_json == sync_json


def test_a_scratch_too_small_for_a_trial_says_what_bench_writes_there(
    server: ServerThread, tmp_path: Path
) -> None:
    # The trial's path that the error names is gone with its directory once it is read: the
    # user must learn what to change, --max-bytes or the place.
    with mounted(tmp_path / "small", "tmpfs", "size=1m") as small:
        result = run_cli(*job_args(server, "bench", "--scratch", small, "--rounds", "1"))
        assert list(small.iterdir()) == []

    assert result.code == 6
    (line,) = errors(result.stderr)
    assert "not enough space for" in line
    assert line.endswith(
        f"(each bench trial writes up to --max-bytes, at least one whole file, into {small})"
    )


def test_bench_refuses_discard_with_a_scratch_directory(
    server: ServerThread, tmp_path: Path
) -> None:
    # --discard took /dev/shm, and the --scratch given went unused without a word. A checkpoint
    # the job lacks: had both flags been taken, the run would stop before any trial wrote.
    flags: list[str | Path] = ["--discard", "--scratch", tmp_path, "--checkpoint", "checkpoint-99"]
    result = run_cli(*job_args(server, "bench", *flags))

    assert result.code == 2
    assert result.stderr.splitlines() == [
        "checkpoint-sync: error: --scratch and --discard each choose where trials write: choose one"
    ]


@pytest.mark.parametrize(
    ("chosen", "where"),
    [((), "the selected checkpoints (they have"), (("--latest",), f"{JOB}/checkpoint-30 (it has")],
)
def test_bench_of_a_rank_no_file_has_names_the_ranks_there_are(
    server: ServerThread, chosen: tuple[str, ...], where: str
) -> None:
    result = run_cli(*job_args(server, "bench", "--node-rank", "7", "--concurrency", "2", *chosen))

    assert result.code == 4
    # Alone: no plan ("benchmarking ...: 2 trials") of a bench that never starts.
    assert result.stderr.splitlines() == [
        f"checkpoint-sync: error: no file of node rank 7 in {where} ranks 0, 1)"
    ]


def test_bench_measures_only_the_files_a_pattern_selects(server: ServerThread) -> None:
    shards = [f for f in server.files() if f.name.endswith(".safetensors")]
    result = run_cli(
        *job_args(server, "bench", "--include", "*.safetensors", "--concurrency", "2"),
        *("--part-size", "256KiB", "--json"),
    )

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert (only["files"], only["bytes"]) == (len(shards), sum(f.size for f in shards))


def test_settings_the_files_cannot_tell_apart_are_shown_alike_and_the_least_recommended(
    server: ServerThread,
) -> None:
    # Files of about 3 KB: parts of 64 KiB and of 1 MiB cut none of them.
    small = ["--include", "extra/*", "--concurrency", "2", "--part-size", "1MiB,64KiB"]
    result = run_cli(*job_args(server, "bench", *small, "--rounds", "1"))
    as_json = run_cli(*job_args(server, "bench", *small, "--rounds", "1", "--json"))

    assert result.code == as_json.code == 0, result.stderr + as_json.stderr
    assert result.stdout.splitlines()[-2:] == [
        "--concurrency 2 --part-size 1MiB fetched as --concurrency 2 --part-size 64KiB did: "
        "parts larger than every file, each file one part",
        result.stdout.splitlines()[-1],
    ]
    assert result.stdout.splitlines()[-1].startswith(
        "recommended: --concurrency 2 --part-size 64KiB ("
    )
    report = json.loads(as_json.stdout)
    assert [t["same_as"] for t in report["trials"]] == [
        {"concurrency": 2, "part_size": 64 << 10},
        None,
    ]
    assert report["recommended"] == {"concurrency": 2, "part_size": 64 << 10}


def test_bench_of_a_pattern_no_file_matches_is_not_found(server: ServerThread) -> None:
    result = run_cli(*job_args(server, "bench", "--exclude", "*", "--concurrency", "2"))

    assert result.code == 4
    assert result.stderr.splitlines() == [
        "checkpoint-sync: error: no listed file matches --exclude '*' in the selected "
        f"checkpoints ({len(server.files())} left out)"
    ]


def test_bench_says_its_plan_before_its_first_trial_ends(server: ServerThread) -> None:
    args = ("--concurrency", "2", "--part-size", "256KiB", "--rounds", "2")
    result = run_cli(*job_args(server, "bench", "--include", "*.safetensors", *args))

    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("benchmarking training job ")
    assert lines[0].endswith(": 1 setting, each tried 2 times in turn: 2 trials")
    assert sum(line.startswith("benchmarking") for line in lines) == 1
    assert len(lines) == 3  # then each trial's line


def test_bench_measures_the_link_not_the_configured_rate_limit(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 KiB a second would make the trial's megabyte take a quarter of an hour.
    monkeypatch.setenv("CHECKPOINT_SYNC_LIMIT_RATE", "1KiB")
    args = ["--concurrency", "2", "--part-size", "256KiB", "--max-bytes", "2MiB", "--json"]

    result = run_cli(*job_args(server, "bench", *args))

    assert result.code == 0, result.stderr
    (trial,) = json.loads(result.stdout)["trials"]
    assert trial["bytes"] > 1 << 19
    assert trial["mb_per_s"] > 0.1  # a hundred times the limit


@pytest.mark.parametrize(("concurrency", "part_size"), [(1, 256 << 10), (3, 512 << 10)])
def test_a_trial_fetches_with_its_own_concurrency_and_part_size(
    tmp_path: Path, concurrency: int, part_size: int
) -> None:
    # Throttled, so that a trial's requests overlap as far as its concurrency lets them: a
    # trial run on the defaults (16, 64 MiB) would be measured under another setting's name.
    catalog = job_catalog(checkpoints=1, small_files=0)  # two files of 1 MiB and a bit
    with ServerThread(catalog, faults=Faults(throttle=2_000_000)) as server:
        flags = ["--concurrency", str(concurrency), "--part-size", str(part_size), "--rounds", "1"]
        result = run_cli(*job_args(server, "bench", *flags, "--scratch", tmp_path, "--json"))

    assert result.code == 0, result.stderr
    assert server.traffic.objects_in_flight.most == concurrency
    assert max(end - start for _, start, end in server.traffic.ranges) == part_size
    # The trial's own CPU time, not the process's since it started (a second and more here).
    (row,) = json.loads(result.stdout)["trials"]
    assert 0 < row["cpu_seconds"] <= row["seconds"] * (os.cpu_count() or 1) + 0.2


def test_the_recommended_part_size_is_the_one_measured(server: ServerThread) -> None:
    args = ["--concurrency", "2", "--part-size", "1000000", "--max-bytes", "2MiB"]
    result = run_cli(*job_args(server, "bench", *args))

    assert result.code == 0, result.stderr
    assert "recommended: --concurrency 2 --part-size 1000000 " in result.stdout


def test_the_recommended_rate_is_the_one_its_row_shows(tmp_path: Path) -> None:
    # A link under 1 MB/s: 0.2 MB/s a response, one file of 3,000 bytes at a time.
    with ServerThread(job_catalog(checkpoints=1), faults=Faults(throttle=200_000)) as server:
        args = ["--include", "extra/*", "--concurrency", "1", "--part-size", "1MiB"]
        result = run_cli(*job_args(server, "bench", *args, "--rounds", "1", "--scratch", tmp_path))

    assert result.code == 0, result.stderr
    row, recommended = result.stdout.splitlines()[1:3]
    rate, spread = row.split()[6:8]
    # The row said 0.2 MB/s, its range "0-0" and the recommendation "(0 MB/s)".
    assert spread == f"{rate}-{rate}", row  # one round: its slowest and fastest
    assert recommended.endswith(f"({rate} MB/s)"), recommended


def test_bench_into_a_scratch_directory_that_refuses_writes_is_exit_6(
    server: ServerThread, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with immutable(scratch):
        result = run_cli(*job_args(server, "bench", "--scratch", scratch, "--concurrency", "4"))

    assert result.code == 6, result.stderr
    assert f"cannot write into {scratch}" in result.stderr


def test_a_budget_that_ends_before_a_wanted_rank_is_listed_is_no_missing_rank(
    server: ServerThread,
) -> None:
    # The budget is spent on rank 0's files, listed first: rank 1 is there, just not reached.
    ranks = ["--node-rank", "0", "--node-rank", "1"]
    result = run_cli(
        *job_args(server, "bench", *ranks, "--concurrency", "2", "--part-size", "256KiB"),
        "--max-bytes",
        "1MiB",
        "--json",
    )

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert only["files"] > 0


def test_a_listing_walked_again_spends_the_budget_on_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file uploaded ahead of the others once the first page is read moves them a place down:
    # the walk shows one of them twice, and is walked again, which shows them all once more.
    # Each repeat took its bytes from the budget: the files listed last were left out.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=3)
    checkpoint = catalog.jobs[0].checkpoints[0]
    first = checkpoint.files[0]
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "2")
    with ServerThread(catalog) as server:

        def upload(offset: int) -> None:
            server.faults.on_page = None
            new = ServedFile(0, "checkpoint-10/uploaded.bin", first.size, first.last_modified, 9)
            checkpoint.files.insert(0, new)

        server.faults.on_page = upload
        every_file = sum(f.size for f in checkpoint.files) + first.size  # and the one uploaded
        args = ["--concurrency", "2", "--part-size", "256KiB", "--rounds", "1"]
        result = run_cli(
            *job_args(server, "bench", *args, "--max-bytes", str(every_file), "--json"),
            "--scratch",
            tmp_path,
        )
        fetched = sorted(name for name, _, _ in server.traffic.ranges)

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert (only["files"], only["bytes"]) == (len(checkpoint.files), every_file)
    assert fetched == sorted(f.name for f in checkpoint.files)  # each once


def test_a_slow_listing_is_not_counted_in_the_trials_seconds(tmp_path: Path) -> None:
    # Every API request waits a second; the 2 MiB of files take a few milliseconds on loopback.
    with ServerThread(job_catalog(), faults=Faults(api_delay=1.0)) as server:
        result = run_cli(
            *job_args(server, "bench", "--concurrency", "2,4", "--part-size", "256KiB"),
            *("--rounds", "1", "--max-bytes", "2MiB", "--scratch", tmp_path, "--json"),
        )

    assert result.code == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert all(t["seconds"] < 0.9 for t in trials), trials  # was 1.02 s: 1.1 MB/s
    assert trials[0]["files"] == trials[1]["files"]  # and both trials fetched the same files


def test_a_selection_of_empty_files_is_nothing_to_measure(tmp_path: Path) -> None:
    catalog = job_catalog(checkpoints=1)
    for file in catalog.jobs[0].checkpoints[0].files:
        file.size = 0
    with ServerThread(catalog) as server:
        args = ["--concurrency", "2,4", "--part-size", "256KiB"]
        result = run_cli(*job_args(server, "bench", *args, "--scratch", tmp_path))

    # It showed 0.0 MB/s for each setting and recommended the first (0 MB/s), exit 0.
    assert result.code == 4, result.stdout
    assert "recommended" not in result.stdout
    assert "nothing to measure: the selection has no file, or only empty ones" in result.stderr


def test_a_bench_whose_every_file_fails_says_why_and_is_exit_1(tmp_path: Path) -> None:
    with ServerThread(job_catalog()) as server:
        server.faults.denied = {f.name for f in server.files()}  # every download answers 403
        args = ["--concurrency", "2", "--part-size", "256KiB", "--max-bytes", "2MiB"]
        result = run_cli(*job_args(server, "bench", *args, "--scratch", tmp_path, "--json"))

    # It said "nothing to measure: no file of the selection was fetched", exit 4 (not found).
    assert result.code == 1, result.stderr
    assert "access denied" in json.loads(result.stdout)["error"]
    assert "nothing to measure" not in result.stderr


def test_a_trial_with_failures_names_the_first(tmp_path: Path) -> None:
    with ServerThread(job_catalog()) as server:
        (denied, *_) = server.files()
        server.faults.denied = {denied.name}
        args = ["--concurrency", "2", "--part-size", "256KiB", "--max-bytes", "2MiB"]
        result = run_cli(*job_args(server, "bench", *args, "--scratch", tmp_path))

    assert result.code == 1, result.stderr
    assert "trial --concurrency 2 --part-size 256KiB: 1 failed, the first: " in result.stderr
    assert "access denied" in result.stderr


def test_a_first_file_larger_than_the_budget_is_fetched_whole_and_the_table_says_so(
    tmp_path: Path,
) -> None:
    catalog = job_catalog(checkpoints=1, large_size=8 << 20, small_files=0)
    with ServerThread(catalog) as server:
        args = ["--concurrency", "2", "--part-size", "1MiB", "--max-bytes", "1MiB"]
        result = run_cli(*job_args(server, "bench", *args, "--scratch", tmp_path))

    # 8 MiB fetched for a budget of 1 MiB, and nothing on the table said so.
    assert result.code == 0, result.stderr
    header, row = result.stdout.splitlines()[0:2]
    assert "bytes" in header.split()
    assert "8.0 MiB" in row


def test_later_trials_do_not_fetch_through_urls_expired_since_the_listing(tmp_path: Path) -> None:
    # Each trial takes about a second (1 MiB/s per response); URLs work for 1.6 s after they are
    # listed.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=8, small_size=256 << 10)
    faults = Faults(url_ttl=1.6, throttle=1 << 20)
    with ServerThread(catalog, faults=faults) as server:
        result = run_cli(
            *job_args(server, "bench", "--concurrency", "4", "--part-size", "1MiB"),
            *("--rounds", "3", "--max-bytes", "8MiB", "--scratch", tmp_path, "--json"),
        )
        # Every request the server answers with bytes is in `ranges`; the others were refused.
        refused = server.traffic.object_requests - len(server.traffic.ranges)

    assert result.code == 0, result.stderr
    (only,) = json.loads(result.stdout)["trials"]
    assert [t["files"] for t in only["rounds"]] == [len(catalog.jobs[0].checkpoints[0].files)] * 3
    # Listed once before the first trial, the later trials' URLs had expired: each of their
    # files was refused and listed again inside the trial's clock. Counted, not timed: a busy
    # machine stretches every trial.
    assert refused == 0


ROUNDED = {
    "mb_per_s": 1,
    "seconds": 3,
    "cpu_seconds": 3,
    "first_byte_ms": 2,
    "connection_mb_s": 1,
}


def test_each_setting_is_tried_once_a_round_and_shown_by_its_median_and_range(
    server: ServerThread, tmp_path: Path
) -> None:
    args = ["--concurrency", "2,4", "--part-size", "256KiB", "--max-bytes", "1MiB"]
    result = run_cli(*job_args(server, "bench", *args, "--rounds", "3", "--scratch", tmp_path))
    as_json = run_cli(*job_args(server, "bench", *args, "--rounds", "2", "--json"))

    assert result.code == as_json.code == 0, result.stderr + as_json.stderr
    assert "2 settings, each tried 3 times in turn" in result.stderr
    header, *rows = result.stdout.splitlines()[0:3]
    assert "range" in header.split()
    for row in rows:  # "... 1.0 MiB   812.3   790.1-845.0 ..."
        assert re.search(r" [0-9.]+ +[0-9.]+-[0-9.]+ ", row), row
    report = json.loads(as_json.stdout)
    assert report["rounds"] == 2
    for setting in report["trials"]:
        rates = [r["mb_per_s"] for r in setting["rounds"]]
        assert len(rates) == 2
        assert (setting["mb_per_s_min"], setting["mb_per_s_max"]) == (min(rates), max(rates))
        # Rounded (rates as the table shows them, times as sync's), not 0.40955681199920946.
        for figures in [setting, *setting["rounds"]]:
            for name, places in ROUNDED.items():
                figure = figures[name]
                assert figure is None or figure == round(figure, places), (name, figure)


def cell(table: list[str], name: str) -> str:
    """What the table's one row shows in the column ``name`` (its cells are right-aligned)."""
    header, row = table
    end = header.index(name) + len(name)
    return row[:end].rsplit("  ", 1)[-1].strip()


@pytest.mark.parametrize(
    ("first_byte_ms", "connection_mb_s", "cpu_seconds", "shown"),
    [
        # --json's 0.05 ms and 0.005 s, rounded again, would show as 0.1 ms and 0.01.
        (0.048, 12.34, 0.0047, ("0.0 ms", "12.3 MB/s", "0.00")),
        (0.051, 12.36, 0.0051, ("0.1 ms", "12.4 MB/s", "0.01")),
        (None, None, 0.5, ("-", "-", "0.50")),
    ],
)
def test_the_table_rounds_each_figure_once(
    first_byte_ms: float | None,
    connection_mb_s: float | None,
    cpu_seconds: float,
    shown: tuple[str, str, str],
) -> None:
    measured = Trial(4, 1 << 20, 1, 0, 10**6, 1.0, cpu_seconds, first_byte_ms, connection_mb_s)
    table = cli._bench_table(settings_of([measured]))

    assert (cell(table, "first byte"), cell(table, "per conn."), cell(table, "CPU s")) == shown


def test_the_trials_to_come_and_each_as_it_ends_are_told_on_stderr_in_order(
    server: ServerThread, tmp_path: Path
) -> None:
    args = ["--concurrency", "2,4", "--part-size", "256KiB", "--max-bytes", "1MiB"]
    result = run_cli(*job_args(server, "bench", *args, "--rounds", "2", "--scratch", tmp_path))

    assert result.code == 0, result.stderr
    # Progress, as every command's: stdout holds the results alone, the table first.
    assert result.stdout.splitlines()[0].split()[:3] == ["concurrency", "part", "size"]
    assert len(result.stdout.splitlines()) == 4  # its header, a row a setting, the settings
    announced, *told = result.stderr.splitlines()
    assert announced.endswith(": 2 settings, each tried 2 times in turn: 4 trials")
    assert [re.sub(r": [0-9.]+ MB/s, ", ": * MB/s, ", line) for line in told] == [
        f"trial {n} of 4 (round {round}): --concurrency {c} --part-size 256KiB: * MB/s, 0 failed"
        for n, (round, c) in enumerate([(1, 2), (1, 4), (2, 2), (2, 4)], 1)
    ]
    # The MB/s told is the trial's own, the one the table's range is made of.
    rounds = [float(line.split(": ")[2].split()[0]) for line in told]
    for row, measured in zip(
        result.stdout.splitlines()[1:3], (rounds[::2], rounds[1::2]), strict=True
    ):
        assert row.split()[7] == f"{min(measured):.1f}-{max(measured):.1f}", row


def test_a_trial_told_as_it_ends_comes_before_the_next_trial_ends(tmp_path: Path) -> None:
    # Once the first trial's page is answered, the API answers 30 s late: the second trial
    # waits for its page while the first one's line is read.
    with ServerThread(job_catalog(checkpoints=1)) as server:
        server.faults.on_page = lambda offset: setattr(server.faults, "api_delay", 30)
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--scratch", tmp_path)
        process = run_subprocess(*bench)
        try:
            assert process.stderr is not None
            process.stderr.readline()  # how many trials there are
            first = process.stderr.readline().decode()
            assert process.poll() is None
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=60)

    assert first.startswith("trial 1 of 6 (round 1): --concurrency 2 --part-size 256KiB: ")
    assert first.endswith(" MB/s, 0 failed\n")


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_no_trial_is_told_with_quiet_or_json(server: ServerThread, flag: str) -> None:
    args = ["--concurrency", "2,4", "--part-size", "256KiB", "--max-bytes", "1MiB", "--rounds", "1"]
    result = run_cli(*job_args(server, "bench", *args, flag))

    assert result.code == 0, result.stderr
    assert result.stderr == ""
    if flag == "--json":
        assert len(json.loads(result.stdout)["trials"]) == 2
    else:  # the table and the settings recommended, as asked for
        assert len(result.stdout.splitlines()) == 4
        assert result.stdout.splitlines()[-1].startswith("recommended: --concurrency ")


def test_a_trial_that_an_error_ends_is_told_failed_as_it_ends(tmp_path: Path) -> None:
    with ServerThread(job_catalog(checkpoints=1)) as server:
        server.faults.api_faults = [None, None, "not-json"]  # the listing of the second trial
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--rounds", "1")
        result = run_cli(*bench, "--scratch", tmp_path)

    assert result.code == 1, result.stderr
    told = [line for line in result.stderr.splitlines() if line not in errors(result.stderr)][1:]
    assert len(told) == 2
    assert told[0].startswith("trial 1 of 2 (round 1): --concurrency 2 --part-size 256KiB: ")
    assert told[1] == (
        "trial 2 of 2 (round 1): --concurrency 4 --part-size 256KiB: failed: training job "
        "job-1 of project proj: the API answered with something not JSON"
    )


@pytest.mark.parametrize("rounds", ["0", "-1", "x"])
def test_rounds_must_be_a_whole_number_of_at_least_one(server: ServerThread, rounds: str) -> None:
    result = run_cli(*job_args(server, "bench", "--rounds", rounds))

    assert result.code == 2
    assert result.stderr.splitlines()[-1].startswith("checkpoint-sync: error: argument --rounds: ")


def test_the_built_in_server_goes_when_bench_is_killed(tmp_path: Path) -> None:
    # SIGKILL (the OOM killer, say) runs no `finally`: the server bench started kept running,
    # a process holding a port that nobody would stop.
    bench = run_subprocess("bench", "--scratch", tmp_path, "--concurrency", "4", "--rounds", "9")
    server = None
    try:
        wait_for(bench, lambda: any(tmp_path.iterdir()))  # a trial is fetching from it
        (server,) = children(bench.pid)
        bench.kill()
        bench.communicate()
        deadline = time.monotonic() + 10
        while running(server):
            assert time.monotonic() < deadline, "the built-in server outlived bench"
            time.sleep(0.05)
    finally:
        bench.kill()
        bench.communicate()
        if server is not None and running(server):
            os.kill(server, signal.SIGKILL)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan waits for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# The bench lists the checkpoints once, then each trial lists the files of the one checkpoint in
# one request: the third API request is the second trial's.
ONE_CHECKPOINT_TRIALS = ["--concurrency", "2,4", "--part-size", "256KiB", "--max-bytes", "1MiB"]


@pytest.mark.parametrize(
    ("faults", "error"),
    [
        (["not-json"], "the API answered with something not JSON"),
        # The page asked for ahead, in one attempt, then again with its retries.
        (["503"] * 3, "HTTP 503 from the API"),
    ],
)
def test_a_trial_that_fails_is_shown_failed_and_the_others_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: list[str], error: str
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    with ServerThread(job_catalog(checkpoints=1)) as server:
        server.faults.api_faults = [None, None, *faults]  # the listing of the second trial
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS)
        result = run_cli(*bench, "--rounds", "1", "--scratch", tmp_path)
        server.faults.api_faults = [None, None, *faults]
        as_json = run_cli(*bench, "--rounds", "2", "--json")

    # The bench ended with the second trial's error: the first trial's figures were lost.
    assert result.code == as_json.code == 1, result.stderr + as_json.stderr
    measured, failed, recommended = result.stdout.splitlines()[1:4]
    assert measured.split()[:3] == ["2", "256.0", "KiB"]
    assert float(measured.split()[6]) > 0  # MB/s
    assert failed.split() == ["4", "256.0", "KiB", *["-"] * 9]  # nothing measured
    assert errors(result.stderr) == [
        "checkpoint-sync: error: trial --concurrency 4 --part-size 256KiB failed in round 1: "
        f"training job job-1 of project proj: {error}"
    ]
    assert recommended.startswith("recommended: --concurrency 2 --part-size 256KiB (")
    assert list(tmp_path.iterdir()) == []
    # Its second round measured the setting: still, the one with no failed trial is chosen.
    report = json.loads(as_json.stdout)
    twos, fours = report["trials"]
    assert [r["error"] for r in twos["rounds"]] == [None, None]
    assert fours["rounds"][0]["error"] == f"training job job-1 of project proj: {error}"
    assert fours["rounds"][1]["error"] is None
    assert fours["mb_per_s"] == fours["rounds"][1]["mb_per_s"] > 0  # of the round measured
    assert report["recommended"] == {"concurrency": 2, "part_size": 256 << 10}


@pytest.mark.parametrize(
    ("files", "outcome"),
    [
        (
            "empty",
            "nothing measured: 1 of 2 trials failed; the others fetched no file, or only "
            "empty ones",
        ),
        ("denied", "no file could be fetched; the first: "),
    ],
)
def test_trials_that_failed_where_nothing_was_measured_are_named_and_exit_1(
    files: str, outcome: str
) -> None:
    catalog = job_catalog(checkpoints=1)
    if files == "empty":
        for file in catalog.jobs[0].checkpoints[0].files:
            file.size = 0
    with ServerThread(catalog) as server:
        if files == "denied":  # every download answers 403
            server.faults.denied = {f.name for f in server.files()}
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--rounds", "1")
        server.faults.api_faults = [None, "not-json"]  # the listing of the first trial
        result = run_cli(*bench)
        server.faults.api_faults = [None, "not-json"]
        as_json = run_cli(*bench, "--json")

    # Of empty files, it said "nothing to measure: the selection has no file, or only empty
    # ones", exit 4; neither outcome named the trial that failed.
    assert result.code == as_json.code == 1, result.stderr + as_json.stderr
    trial_failed = (
        "checkpoint-sync: error: trial --concurrency 2 --part-size 256KiB failed in round 1: "
        "training job job-1 of project proj: the API answered with something not JSON"
    )
    named, told = errors(result.stderr)
    assert named == trial_failed
    assert told.startswith(f"checkpoint-sync: error: {outcome}")
    assert "recommended" not in result.stdout
    assert as_json.stderr.splitlines()[0] == trial_failed
    assert json.loads(as_json.stdout)["error"].startswith(outcome)


def test_a_listing_entry_off_the_schema_fails_as_a_file_in_every_trial(tmp_path: Path) -> None:
    # No bytes to fetch: it fails in each trial as in sync (rank 0's copy, in the budget), the
    # other files are measured, and the settings are still ranked (each had a failed file).
    with ServerThread(job_catalog(checkpoints=1)) as server:
        unreadable = server.files()[1]
        server.faults.unreadable = {unreadable.name}
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--rounds", "1")
        result = run_cli(*bench, "--scratch", tmp_path)
        as_json = run_cli(*bench, "--json")

    assert result.code == as_json.code == 1, result.stderr + as_json.stderr
    where = f"{JOB}/{unreadable.name.replace('/', '/0/', 1)}"
    assert errors(result.stderr) == [
        f"checkpoint-sync: error: trial --concurrency {c} --part-size 256KiB: 1 failed, the "
        f"first: {where}: its listing entry is unreadable (size_bytes: Input should be a valid "
        "integer)"
        for c in (2, 4)
    ]
    assert result.stdout.splitlines()[-1].startswith("recommended: --concurrency ")
    report = json.loads(as_json.stdout)
    assert [t["failed"] for t in report["trials"]] == [1, 1]
    assert all(t["first_failure"].startswith(f"{where}: ") for t in report["trials"])
    assert all(t["files"] > 0 and t["mb_per_s"] > 0 for t in report["trials"])
    assert report["recommended"] is not None


def test_a_refused_url_of_a_file_pushed_off_its_page_is_found_and_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in sync (test_faults.py): the trial looks for the refused file through the listing,
    # finds it on the next page, and fetches it.
    with job_with_a_file_pushed_off_its_page(monkeypatch) as (server, added):
        bench = ["--concurrency", "2", "--part-size", "256KiB", "--rounds", "1", "--json"]
        result = run_cli(*job_args(server, "bench", *bench, "--scratch", tmp_path))

        assert result.code == 0, result.stderr
        (row,) = json.loads(result.stdout)["trials"]
        assert (row["files"], row["failed"]) == (4, 0)
        assert row["bytes"] == sum(f.size for f in server.files() if f is not added)
        assert server.traffic.api_requests == PUSHED_OFF_REQUESTS
    assert list(tmp_path.iterdir()) == []


def test_a_trial_of_every_setting_failed_recommends_none_and_is_exit_1(tmp_path: Path) -> None:
    with ServerThread(job_catalog(checkpoints=1)) as server:
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--rounds", "2")
        # The listings of the first round's two trials; the second round's are answered.
        server.faults.api_faults = [None, "not-json", "not-json"]
        result = run_cli(*bench, "--scratch", tmp_path)
        server.faults.api_faults = [None, "not-json", "not-json"]
        as_json = run_cli(*bench, "--json")

    assert result.code == as_json.code == 1, result.stderr + as_json.stderr
    *_, twos, fours, recommended = result.stdout.splitlines()
    for row, concurrency in ((twos, "2"), (fours, "4")):
        assert row.split()[:4] == [concurrency, "256.0", "KiB", "1"]  # its second round's
        assert float(row.split()[6]) > 0  # MB/s
    assert recommended == "recommended: none (a trial of every setting failed)"
    assert errors(result.stderr) == [
        f"checkpoint-sync: error: trial --concurrency {c} --part-size 256KiB failed in round 1: "
        "training job job-1 of project proj: the API answered with something not JSON"
        for c in (2, 4)
    ]
    report = json.loads(as_json.stdout)
    assert report["recommended"] is None
    assert report["stopped"] is None
    assert [[r["error"] is None for r in t["rounds"]] for t in report["trials"]] == [
        [False, True],
        [False, True],
    ]


@pytest.mark.parametrize(("status", "code"), [("401", 3), ("404", 4)])
def test_an_error_no_later_trial_could_pass_stops_the_bench_at_once(status: str, code: int) -> None:
    with ServerThread(job_catalog(checkpoints=1)) as server:
        # The second trial fails on its own; the third is refused (a key revoked meanwhile, the
        # job deleted).
        server.faults.api_faults = [None, None, "not-json", status]
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--rounds", "3")
        result = run_cli(*bench)
        requests = server.traffic.api_requests
        server.faults.api_faults = [None, None, "not-json", status]
        as_json = run_cli(*bench, "--json")

    assert result.code == as_json.code == code, result.stderr
    assert requests == 4  # no trial after it listed
    # The trials before it are shown, with no recommendation: the grid was not tried through.
    measured, failed, recommended = result.stdout.splitlines()[1:4]
    assert measured.split()[:3] == ["2", "256.0", "KiB"]
    assert failed.split() == ["4", "256.0", "KiB", *["-"] * 9]
    assert recommended == "recommended: none (the bench stopped before its end)"
    first, stop = errors(result.stderr)
    assert first.startswith("checkpoint-sync: error: trial --concurrency 4 --part-size 256KiB")
    assert f"HTTP {status}" in stop
    report = json.loads(as_json.stdout)
    assert [len(row["rounds"]) for row in report["trials"]] == [1, 1]
    assert report["recommended"] is None
    assert f"HTTP {status}" in report["stopped"]


def test_a_bench_interrupted_shows_the_trials_it_measured(tmp_path: Path) -> None:
    # Each trial lists its files first. Once the first trial's page is answered, the API
    # answers 30 s late: the SIGINT comes while the second trial waits for its page.
    with ServerThread(job_catalog(checkpoints=1)) as server:
        server.faults.on_page = lambda offset: setattr(server.faults, "api_delay", 30)
        bench = job_args(server, "bench", *ONE_CHECKPOINT_TRIALS, "--scratch", tmp_path)
        process = run_subprocess(*bench, "--json")
        wait_for(process, lambda: server.traffic.api_requests >= 3)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["stopped"] == "SIGINT"
    assert report["recommended"] is None
    (row,) = report["trials"]
    assert row["concurrency"] == 2
    assert row["mb_per_s"] > 0
    assert stderr.decode().splitlines()[-1] == "checkpoint-sync: error: stopped by SIGINT"
    assert list(tmp_path.iterdir()) == []


def test_a_bench_json_stopped_after_an_error_names_it_as_sync_does(tmp_path: Path) -> None:
    """As `sync`'s: stopped while a part of the second trial stalls half way and another
    program holds that trial's manifest, the stop cannot record how far the part got. That is
    no failed trial: the error is said in its line before the stop's and is the document's
    `error`, beside the trial measured before; the exit is the signal's."""
    part = 256 << 10
    asked = 0

    def stall_in_the_second_trial(name: str, start: int, end: int) -> str | None:
        nonlocal asked
        if start == 4 * part:
            asked += 1  # once a rank in each trial
            return "stall" if asked == 3 else None
        return None

    catalog = job_catalog(checkpoints=1, large_size=(2 << 20) + 4321, small_files=1)
    with ServerThread(catalog, Faults(stall_seconds=30)) as server:
        server.faults.hook = stall_in_the_second_trial
        bench = job_args(server, "bench", "--concurrency", "2", "--part-size", "256KiB")
        process = run_subprocess(*bench, "--rounds", "2", "--scratch", tmp_path, "--json")
        wait_for(process, lambda: server.traffic.faults.get("stall") == 1)
        time.sleep(0.5)  # the rest of the trial is done and committed meanwhile
        (trial,) = tmp_path.iterdir()  # the first trial's directory is removed
        out, err = stop_while_the_manifest_is_held(process, manifest_path(trial))

    assert process.returncode == 130, err
    (said, stopped) = err.decode().splitlines()
    manifest = f"cannot use the manifest {manifest_path(trial)}: database is locked"
    assert said.startswith(f"checkpoint-sync: error: {manifest} "), said
    assert stopped == "checkpoint-sync: error: stopped by SIGINT"
    report = json.loads(out)
    assert report["error"] == said.removeprefix("checkpoint-sync: error: ")
    assert report["stopped"] == "SIGINT"
    (row,) = report["trials"]
    assert [r["error"] for r in row["rounds"]] == [None]  # the first, measured
    assert row["mb_per_s"] > 0
    assert list(tmp_path.iterdir()) == []


def test_a_setting_whose_rounds_fetched_different_amounts_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with ServerThread(job_catalog(checkpoints=1)) as server:
        small = next(f for f in server.files() if f.size < 1 << 20)
        refused: list[str] = []

        def first_trial_only(name: str, start: int, end: int) -> str | None:
            if name == small.name and not refused:  # a file fails in the first round alone
                refused.append(name)
                return "500"
            return None

        bench = job_args(server, "bench", "--concurrency", "2", "--part-size", "256KiB")
        server.faults.hook = first_trial_only
        result = run_cli(*bench, "--rounds", "3", "--scratch", tmp_path)
        refused.clear()
        as_json = run_cli(*bench, "--rounds", "3", "--json")
        all_files, all_bytes = len(server.files()), server.data_size()

    assert result.code == as_json.code == 1, result.stderr + as_json.stderr
    # The row took its files and bytes from the first round: 9 files, with the MB/s of rounds
    # that fetched 10. Now they are those of the round its MB/s is, and the range follows.
    row = result.stdout.splitlines()[1].split()
    assert row[3] in (str(all_files - 1), str(all_files))
    assert row[4] == f"({all_files - 1}-{all_files})"
    assert row[5:7] == human_bytes(all_bytes).split()  # 3,000 bytes fewer shows the same
    (only,) = json.loads(as_json.stdout)["trials"]
    assert [(r["files"], r["bytes"], r["failed"]) for r in only["rounds"]] == [
        (all_files - 1, all_bytes - small.size, 1),
        (all_files, all_bytes, 0),
        (all_files, all_bytes, 0),
    ]
    # Rounded, two rounds may share figures: then they fetched alike, either is the middle.
    timed = (only["seconds"], only["mb_per_s"])
    middles = [r for r in only["rounds"] if (r["seconds"], r["mb_per_s"]) == timed]
    assert middles
    assert all((m["files"], m["bytes"]) == (only["files"], only["bytes"]) for m in middles)
    assert only["mb_per_s"] == sorted(r["mb_per_s"] for r in only["rounds"])[1]
    assert only["failed"] == 1  # of its worst round


@pytest.mark.parametrize(
    ("fault", "count", "said"),
    [
        ("503", 3, "3 requests retried"),
        ("reset", 3, "3 requests retried"),
        ("503", 1, "1 request retried"),
    ],
)
def test_requests_retried_in_a_trial_are_counted_where_its_figures_are(
    tmp_path: Path, fault: str, count: int, said: str
) -> None:
    with ServerThread(job_catalog(checkpoints=1)) as server:
        bench = job_args(server, "bench", "--concurrency", "2", "--part-size", "256KiB")
        server.faults.hook = first_answers(count, fault)  # in the first round alone
        result = run_cli(*bench, "--rounds", "2", "--scratch", tmp_path)
        server.faults.hook = first_answers(count, fault)
        as_json = run_cli(*bench, "--rounds", "2", "--json")

    # Every file came in the end: the requests asked again showed nowhere, though their waits
    # were in the round's seconds.
    assert result.code == as_json.code == 0, result.stderr + as_json.stderr
    header, row = result.stdout.splitlines()[0:2]
    assert header.split()[-1] == "retries"
    ranged = f"(0-{count})"
    # The middle round's, and its range.
    assert row.split()[-2:] in (["0", ranged], [str(count), ranged])
    assert result.stderr.count(f", {said}\n") == 1
    (only,) = json.loads(as_json.stdout)["trials"]
    assert [r["retries"] for r in only["rounds"]] == [count, 0]
    # Rounded, two rounds may share figures: either may be the middle then.
    timed = (only["seconds"], only["mb_per_s"])
    middles = [r for r in only["rounds"] if (r["seconds"], r["mb_per_s"]) == timed]
    assert only["retries"] in [m["retries"] for m in middles]


@pytest.mark.anyio
async def test_the_pages_asked_for_ahead_of_the_budget_are_let_go_once_it_is_spent() -> None:
    # A far API: when the budget is spent on the first page, the pages after it are still being
    # read. They are not wanted, and the trial that follows must not share the API with them.
    with ServerThread(job_catalog(), faults=Faults(api_delay=0.2)) as server:
        async with api_client(server.url) as api:
            source = TrainingJobSource(api, PROJECT, JOB, page_size=2)
            selection = select_checkpoints(await source.checkpoints())
            pages = await budgeted_pages(source, selection, 1, FileFilter())
            assert [len(page) for page in pages] == [1]
            assert pages_being_read() == 0
