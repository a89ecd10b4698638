"""`checkpoint-sync list`: the local state of each checkpoint, as a table or JSON."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from checkpoint_sync.listing import Compared, LocalState, Row, local_state, table
from checkpoint_sync.localserver import Faults, ServedFile
from checkpoint_sync.progress import human_bytes
from checkpoint_sync.redact import printable
from checkpoint_sync.sources.base import Checkpoint, SyncState

from .conftest import JOB, job_args, job_catalog, sync_args
from .support import ServerThread, mirrored, run_cli
from .test_loops import RUN, loops_catalog, with_future_target
from .test_sync import left_in_parts
from .test_wandb import ARTIFACT, MODEL, serve, wandb_catalog


@pytest.mark.parametrize(
    ("compared", "staging", "state"),
    [
        (Compared(matched=2), False, LocalState.MIRRORED),
        (Compared(missing=True), False, LocalState.ABSENT),  # listed, none recorded
        (Compared(), False, LocalState.ABSENT),
        (Compared(matched=1, missing=True), False, LocalState.PARTIAL),
        (Compared(missing=True), True, LocalState.PARTIAL),  # a transfer was left unfinished
        (Compared(matched=1), True, LocalState.PARTIAL),
        (Compared(missing=True, changed=True), False, LocalState.CHANGED),
        (Compared(changed=True), False, LocalState.CHANGED),
        (Compared(matched=1, changed=True), False, LocalState.CHANGED),  # one no longer listed
    ],
)
def test_local_state(compared: Compared, staging: bool, state: LocalState) -> None:
    assert local_state(compared, staging) is state


def row(name: str, *, step: int | None = None, local: LocalState | None = None) -> Row:
    checkpoint = Checkpoint(
        key=name,
        name=name,
        run="run-1",
        created_at=datetime(2026, 11, 1, 9, 30, tzinfo=UTC) if step is None else None,
        size_bytes=None if step is not None else 2048,
        state=SyncState.COMPLETE,
        step=step,
        metrics={"reward": 0.25} if step is not None else {},
    )
    return Row(checkpoint, checkpoint.size_bytes, local)


@pytest.mark.parametrize(
    ("rows", "lines"),
    [
        (
            [row("c-1", local=LocalState.MIRRORED), row("c-22")],
            [
                "RUN    CHECKPOINT  CREATED               SIZE     STATUS    LOCAL",
                "run-1  c-1         2026-11-01 09:30 UTC  2.0 KiB  complete  mirrored",
                "run-1  c-22        2026-11-01 09:30 UTC  2.0 KiB  complete  -",
            ],
        ),
        (
            [row("step-7", step=7)],
            [
                "RUN    CHECKPOINT  STEP  SIZE  STATUS    METRICS",
                "run-1  step-7      7     -     complete  reward=0.25",
            ],
        ),
    ],
)
def test_table_shows_only_the_columns_some_row_fills(rows: list[Row], lines: list[str]) -> None:
    assert table(rows, printable) == lines


@pytest.mark.parametrize(
    ("names", "lines"),
    [
        (  # ESC is shown as the four characters \x1b
            ["c-10\x1b[2J", "c-2"],
            [
                "RUN    CHECKPOINT   CREATED               SIZE     STATUS",
                "run-1  c-10\\x1b[2J  2026-11-01 09:30 UTC  2.0 KiB  complete",
                "run-1  c-2          2026-11-01 09:30 UTC  2.0 KiB  complete",
            ],
        ),
        (  # each of 检查点 takes two columns
            ["检查点-检查点", "c-2"],
            [
                "RUN    CHECKPOINT     CREATED               SIZE     STATUS",
                "run-1  检查点-检查点  2026-11-01 09:30 UTC  2.0 KiB  complete",
                "run-1  c-2            2026-11-01 09:30 UTC  2.0 KiB  complete",
            ],
        ),
        (  # U+0301 combines with the e before it: no column of its own
            ["cafe\u0301-1", "c-2"],
            [
                "RUN    CHECKPOINT  CREATED               SIZE     STATUS",
                "run-1  cafe\u0301-1      2026-11-01 09:30 UTC  2.0 KiB  complete",
                "run-1  c-2         2026-11-01 09:30 UTC  2.0 KiB  complete",
            ],
        ),
    ],
    ids=["escaped", "wide", "combining"],
)
def test_table_columns_line_up_as_shown(names: list[str], lines: list[str]) -> None:
    assert [printable(line) for line in table([row(n) for n in names], printable)] == lines


# --- over HTTP ------------------------------------------------------------------------------------


def sync_job(server: ServerThread, dest: Path, *extra: str) -> int:
    return run_cli(*job_args(server, "sync", "--dest", dest, *extra)).code


def states(result_stdout: str) -> dict[str, str | None]:
    return {r["checkpoint"]: r["local"] for r in json.loads(result_stdout)["checkpoints"]}


def test_list_dest_keeps_nothing_per_listed_file(dest: Path) -> None:
    # Each page is compared with the manifest as it comes: a 1,000,000-entry listing must not
    # be held whole. What the client holds is taken as the 5th and the 20th of 20 pages are
    # answered, but for the server's own memory and the pages read ahead, with their
    # connections (as many as 8, whatever the listing's length): held whole, the 15,000 entries
    # between took 1.9 MB more.
    held: dict[int, int] = {}
    ours = [
        tracemalloc.Filter(False, pattern)
        for pattern in ("*/localserver.py", "*/aiohttp/*", "*/pydantic/*", "*/wire.py")
    ]

    def note(offset: int) -> None:
        if offset in (4_000, 19_000):
            held[offset] = sum(
                s.size
                for s in tracemalloc.take_snapshot().filter_traces(ours).statistics("filename")
            )

    catalog = job_catalog(checkpoints=1, large_files=0, small_files=10_000)
    with ServerThread(catalog, Faults(on_page=note)) as server:
        tracemalloc.start()
        try:
            result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        finally:
            tracemalloc.stop()
    assert result.code == 0, result.stderr
    assert states(result.stdout) == {"checkpoint-10": "absent"}
    assert held[19_000] < held[4_000] + (1 << 19), held


def test_a_job_lists_each_checkpoint_with_its_local_state(dest: Path) -> None:
    with ServerThread(job_catalog(syncing_last=True)) as server:
        assert sync_job(server, dest, "--checkpoint", "checkpoint-10") == 0
        assert sync_job(server, dest, "--checkpoint", "checkpoint-20", "--node-rank", "0") == 0

        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        rank_0 = run_cli(*job_args(server, "list", "--dest", dest, "--json", "--node-rank", "0"))
        text = run_cli(*job_args(server, "list", "--dest", dest))
        quiet = run_cli(*job_args(server, "list", "--dest", dest, "--quiet"))

    assert result.code == rank_0.code == text.code == 0, result.stderr
    assert quiet.stdout == text.stdout  # the table is what was asked for, not progress
    assert states(result.stdout) == {
        "checkpoint-10": "mirrored",
        "checkpoint-20": "partial",
        "checkpoint-30": "absent",
    }
    assert states(rank_0.stdout)["checkpoint-20"] == "mirrored"
    rows = json.loads(result.stdout)["checkpoints"]
    served = {c.checkpoint_id: c for c in server.catalog.jobs[0].checkpoints}
    assert [(r["size_bytes"], r["status"]) for r in rows] == [
        (served["checkpoint-10"].size_bytes, "complete"),
        (served["checkpoint-20"].size_bytes, "complete"),
        (served["checkpoint-30"].size_bytes, "syncing"),
    ]
    header, *lines = text.stdout.splitlines()
    assert header.split() == ["RUN", "CHECKPOINT", "CREATED", "SIZE", "STATUS", "LOCAL"]
    assert [line.split()[-1] for line in lines] == ["mirrored", "partial", "absent"]


def test_times_without_a_zone_are_taken_as_utc_beside_times_with_one() -> None:
    with ServerThread(job_catalog()) as server:
        first = server.catalog.jobs[0].checkpoints[0]
        first.created_at = first.created_at.replace(tzinfo=None)  # served without an offset

        result = run_cli(*job_args(server, "list", "--json"))

    assert result.code == 0, result.stderr
    names = [r["checkpoint"] for r in json.loads(result.stdout)["checkpoints"]]
    assert names == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_a_file_deleted_or_truncated_on_disk_makes_its_checkpoint_partial(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        assert (
            sync_job(server, dest, "--checkpoint", "checkpoint-10", "--checkpoint", "checkpoint-20")
            == 0
        )
        checkpoint_10, checkpoint_20 = (
            dest / "job-1" / name for name in ("checkpoint-10", "checkpoint-20")
        )
        next(p for p in checkpoint_10.rglob("*") if p.is_file()).unlink()
        with next(p for p in checkpoint_20.rglob("*") if p.is_file()).open("r+b") as cut:
            cut.truncate(1)

        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == 0, result.stderr
    assert states(result.stdout) == {
        "checkpoint-10": "partial",
        "checkpoint-20": "partial",
        "checkpoint-30": "absent",
    }


def test_a_directory_swapped_for_a_symlink_out_makes_its_checkpoint_partial(
    dest: Path, tmp_path: Path
) -> None:
    with ServerThread(job_catalog()) as server:
        assert sync_job(server, dest, "--checkpoint", "checkpoint-10") == 0
        rank_1 = dest / "job-1" / "checkpoint-10" / "1"
        rank_1.rename(tmp_path / "elsewhere")  # the same files, outside the mirror
        rank_1.symlink_to(tmp_path / "elsewhere")

        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == 0, result.stderr
    assert states(result.stdout)["checkpoint-10"] == "partial"


# Read by a URI, the manifest's path is quoted: "#", "?" and "%" in it are names there.
@pytest.mark.parametrize("name", ["mirror", "mirror #2?%41"], ids=["plain", "uri-characters"])
def test_a_remote_change_shows_and_list_writes_nothing(tmp_path: Path, name: str) -> None:
    dest = tmp_path / name
    with ServerThread(job_catalog()) as server:
        assert sync_job(server, dest, "--checkpoint", "checkpoint-10") == 0
        manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
        before = manifest.read_bytes()
        changed = server.catalog.jobs[0].checkpoints[0].files[0]
        server.call(lambda: setattr(changed, "last_modified", "2026-11-20T00:00:00+00:00"))

        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        elsewhere = run_cli(*job_args(server, "list", "--dest", dest.parent / "new", "--json"))

    assert result.code == elsewhere.code == 0
    assert states(result.stdout)["checkpoint-10"] == "changed remotely"
    assert manifest.read_bytes() == before
    assert set(states(elsewhere.stdout).values()) == {"absent"}
    assert not (dest.parent / "new").exists()


@pytest.mark.parametrize(
    ("made", "noted"),
    [("nothing", "no such directory"), ("a file", "not a directory"), ("an empty directory", "")],
)
def test_list_at_a_dest_that_is_no_directory_says_there_is_no_mirror(
    dest: Path, made: str, noted: str
) -> None:
    # A mistyped --dest showed every checkpoint absent, and nothing more. An empty directory is
    # a mirror not synced yet.
    if made == "a file":
        dest.write_bytes(b"")
    elif made == "an empty directory":
        dest.mkdir()
    with ServerThread(job_catalog()) as server:
        result = run_cli(*job_args(server, "list", "--dest", dest))
        as_json = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == as_json.code == 0
    assert [line.split()[-1] for line in result.stdout.splitlines()[1:]] == ["absent"] * 3
    assert set(states(as_json.stdout).values()) == {"absent"}
    note = [f"no mirror at {dest}: {noted}"] if noted else []
    assert result.stderr.splitlines() == as_json.stderr.splitlines() == note


def test_without_a_mirror_there_is_no_local_column_and_no_file_listing(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        result = run_cli(*job_args(server, "list"))

        assert result.code == 0
        assert "LOCAL" not in result.stdout
        assert server.traffic.api_requests == 1


@pytest.mark.parametrize("where", ["config", "environment"])
def test_the_mirror_may_be_the_dest_of_the_settings_as_for_sync(
    dest: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # `list` read only --dest: the `dest` a sync took from the settings showed no local state.
    config = dest.parent / "c.toml"
    config.write_text(f'dest = "{dest}"\n' if where == "config" else "")
    if where == "environment":
        monkeypatch.setenv("CHECKPOINT_SYNC_DEST", str(dest))
    with ServerThread(job_catalog()) as server:
        assert run_cli(*job_args(server, "sync", "--config", config, "--latest")).code == 0
        result = run_cli(*job_args(server, "list", "--config", config, "--json"))

    assert result.code == 0, result.stderr
    assert states(result.stdout) == {
        "checkpoint-10": "absent",
        "checkpoint-20": "absent",
        "checkpoint-30": "mirrored",
    }


def test_loops_trainer_and_sampler_states_are_told_apart(dest: Path) -> None:
    with ServerThread(loops_catalog()) as server:
        base = ["--api-url", server.url, "--loops-run", RUN]
        assert run_cli("sync", *base, "--dest", dest, "--target", "sampler").code == 0

        result = run_cli("list", *base, "--dest", dest, "--json")

    assert result.code == 0, result.stderr
    assert states(result.stdout) == {
        "weights-step-10": "absent",
        "sampler_weights-step-10": "mirrored",
        "weights-step-20": "absent",
        "sampler_weights-step-20": "mirrored",
    }


def test_a_loops_checkpoint_of_a_target_the_pages_do_not_name_is_named_as_left_out() -> None:
    catalog = loops_catalog()
    future = with_future_target(catalog)
    with ServerThread(catalog) as server:
        base = ["--api-url", server.url, "--loops-run", RUN]
        text = run_cli("list", *base)
        as_json = run_cli("list", *base, "--json")

    assert text.code == as_json.code == 0, text.stderr
    *table_lines, left_out = text.stdout.splitlines()
    assert len(table_lines) == 1 + 4  # the header, and the trainer and sampler checkpoints
    where = f"{RUN}/step-30 (target reward_model, id {future.id})"
    assert left_out.startswith(f"left out: {where}: its listing entry is unreadable (target:")
    document = json.loads(as_json.stdout)
    assert len(document["checkpoints"]) == 4
    (entry,) = document["left_out"]
    assert (entry["checkpoint"], entry["id"]) == (where, future.id)
    assert entry["error"].endswith("so it cannot be mirrored")


def test_w_and_b_states_need_the_artifact_path(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(wandb_catalog(), monkeypatch)
    try:
        model = ["--wandb-model", MODEL]
        artifact = ["--wandb-artifact", ARTIFACT]
        assert run_cli("sync", *model, *artifact, "--best", "reward", "--dest", dest).code == 0

        result = run_cli("list", *model, *artifact, "--dest", dest, "--json")
        without = run_cli("list", *model, "--dest", dest)
    finally:
        server.__exit__(None, None, None)

    assert result.code == 0, result.stderr
    assert states(result.stdout) == {
        "step-10": "absent",
        "step-20": "absent",
        "step-30": "mirrored",
        "step-40": "absent",
        "step-50": "absent",
    }
    sizes = {r["step"]: r["size_bytes"] for r in json.loads(result.stdout)["checkpoints"]}
    served = {
        c.step: sum(f.size for f in c.files) for c in server.catalog.wandb_models[0].checkpoints
    }
    assert sizes == served
    assert without.code == 2
    assert "pass --wandb-artifact" in without.stderr


def test_list_of_a_node_rank_no_listed_file_has_is_not_found_as_in_sync(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        assert sync_job(server, dest) == 0
        result = run_cli(*job_args(server, "list", "--dest", dest, "--node-rank", "9", "--json"))

    assert result.code == 4, result.stdout
    assert "no file of node rank 9 in the selected checkpoints (they have ranks 0, 1)" in (
        result.stderr
    )
    assert json.loads(result.stdout)["exit_code"] == 4


def test_list_latest_of_a_node_rank_no_listed_file_has_names_the_checkpoint(dest: Path) -> None:
    # As `sync --latest` names it: the user is not otherwise told which checkpoint was looked at.
    with ServerThread(job_catalog(checkpoints=2)) as server:
        assert sync_job(server, dest) == 0
        args = ("list", "--dest", dest, "--latest", "--node-rank", "9")
        result = run_cli(*job_args(server, *args))

    assert result.code == 4, result.stdout
    assert f"no file of node rank 9 in {JOB}/checkpoint-20 (it has ranks 0, 1)" in result.stderr


def test_without_a_mirror_node_rank_changes_nothing(dest: Path) -> None:
    # README: without --dest no file is listed, so --node-rank changes nothing (not even a rank
    # no file has is noticed).
    with ServerThread(job_catalog()) as server:
        plain = run_cli(*job_args(server, "list"))
        ranked = run_cli(*job_args(server, "list", "--node-rank", "9"))

        assert ranked.code == 0, ranked.stderr
        assert ranked.stdout == plain.stdout
        assert server.traffic.api_requests == 2


def test_list_with_node_rank_ignores_files_of_other_ranks_left_in_parts(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ranks' large files are left in parts; rank 0 is then mirrored whole: `list
    # --node-rank 0` says what `sync --node-rank 0` finds, nothing left to do.
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        left_in_parts(server, dest, monkeypatch)
        assert run_cli(*sync_args(server, dest, "--node-rank", "0")).code == 0

        rank_0 = run_cli(*job_args(server, "list", "--dest", dest, "--node-rank", "0", "--json"))
        every_rank = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert [c["local"] for c in json.loads(rank_0.stdout)["checkpoints"]] == ["mirrored"]
    assert [c["local"] for c in json.loads(every_rank.stdout)["checkpoints"]] == ["partial"]


@pytest.mark.parametrize("given", ["config", "flag"])
def test_list_latest_shows_what_sync_latest_takes_with_include_syncing(
    dest: Path, tmp_path: Path, given: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("include_syncing = true\n" if given == "config" else "")
    flags = ["--latest", "--config", str(config)]
    if given == "flag":
        flags.append("--include-syncing")
    with ServerThread(job_catalog(syncing_last=True)) as server:
        synced = run_cli(*sync_args(server, dest, *flags, "--json"))
        listed = run_cli(*job_args(server, "list", *flags, "--json"))

    assert synced.code == 0, synced.stderr
    assert sorted(p.name for p in (dest / "job-1").iterdir()) == ["checkpoint-30"]
    # list --latest showed checkpoint-20: the config's include_syncing was not read there, and
    # list refused the flag that sync takes.
    assert [c["checkpoint"] for c in json.loads(listed.stdout)["checkpoints"]] == ["checkpoint-30"]


@pytest.mark.parametrize(("grown", "state"), [(0, "mirrored"), (10, "partial")])
def test_a_path_listed_twice_counts_as_sync_counts_it(dest: Path, grown: int, state: str) -> None:
    with ServerThread(job_catalog()) as server:
        checkpoint = server.catalog.jobs[0].checkpoints[0]
        first = checkpoint.files[1]
        # The same path again: as the same file, sync mirrors it once without a word; with
        # another size, it mirrors the first entry and fails the second ("listed more than
        # once") on every run.
        checkpoint.files.append(
            ServedFile(
                first.node_rank, first.name, first.size + grown, first.last_modified, seed=9000
            )
        )
        code = 0 if grown == 0 else 1
        assert sync_job(server, dest, "--checkpoint", "checkpoint-10") == code
        assert sync_job(server, dest, "--checkpoint", "checkpoint-10") == code

        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))

    assert result.code == 0, result.stderr
    # For the repeat of another size, it said "changed remotely" before it counted it missing.
    assert states(result.stdout)["checkpoint-10"] == state


def test_a_mirrored_checkpoint_removed_upstream_is_named_until_sync_delete_deletes_it(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        assert sync_job(server, dest) == 0
        job = server.catalog.jobs[0]
        removed = job.checkpoints[0]
        server.call(lambda: job.checkpoints.remove(removed))
        mirrored(dest, JOB, removed.files[-1]).unlink()  # gone from disk: not counted

        text = run_cli(*job_args(server, "list", "--dest", dest))
        as_json = run_cli(*job_args(server, "list", "--dest", dest, "--json", "--node-rank", "1"))
        assert sync_job(server, dest, "--delete") == 0
        after = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        no_mirror = run_cli(*job_args(server, "list", "--json"))

    assert text.code == as_json.code == after.code == 0, text.stderr
    on_disk = removed.files[:-1]
    assert text.stdout.splitlines()[-1] == (
        f"removed upstream, still mirrored: {JOB}/{removed.checkpoint_id} ({len(on_disk)} files, "
        f"{human_bytes(sum(f.size for f in on_disk))}; sync --delete would delete them)"
    )
    rank_1 = [f for f in on_disk if f.node_rank == 1]
    assert json.loads(as_json.stdout)["removed_upstream"] == [
        {
            "checkpoint": f"{JOB}/{removed.checkpoint_id}",
            "files": len(rank_1),
            "size_bytes": sum(f.size for f in rank_1),
        }
    ]
    assert json.loads(after.stdout)["removed_upstream"] == []
    assert "removed_upstream" not in json.loads(no_mirror.stdout)
