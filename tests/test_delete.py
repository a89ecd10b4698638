"""``--delete``: the mirrored files of checkpoints removed upstream go, and nothing else does."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from checkpoint_sync.engine import manifest_path
from checkpoint_sync.errors import LocalIOError
from checkpoint_sync.localserver import ServedCheckpoint, ServedFile
from checkpoint_sync.manifest import Manifest, VerifiedFile
from checkpoint_sync.plan import FileFilter
from checkpoint_sync.prune import Deletion, Going, Pruner, deletions, kept

from .conftest import JOB, PROJECT, job_catalog, sync_args
from .support import (
    ServerThread,
    assert_exact,
    job_listing_checkpoints,
    leave_in_parts,
    mirrored,
    run_cli,
    run_subprocess,
    staged,
)
from .test_kill import asleep, assert_records_true, manifest_rows, open_files, wait_for
from .test_local_errors import fill, immutable, mounted

DELETED = "checkpoint-10"


def recorded_checkpoints(dest: Path) -> set[str]:
    db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
    try:
        return {checkpoint for (checkpoint,) in db.execute("SELECT checkpoint FROM files")}
    finally:
        db.close()


def mirror_then_remove_upstream(server: ServerThread, dest: Path, *extra: str) -> ServedCheckpoint:
    """Mirror the job (``extra`` narrowing it), then remove its oldest checkpoint upstream."""
    assert run_cli(*sync_args(server, dest, *extra)).code == 0
    job = server.catalog.jobs[0]
    (removed,) = [c for c in job.checkpoints if c.checkpoint_id == DELETED]
    server.call(lambda: job.checkpoints.remove(removed))
    return removed


def remove_upstream_all_but_the_newest(server: ServerThread) -> ServedCheckpoint:
    """Remove every checkpoint of the job upstream but its newest, which is returned."""
    job = server.catalog.jobs[0]
    newest = job.checkpoints[-1]
    server.call(lambda: setattr(job, "checkpoints", [newest]))
    return newest


def still_listed(server: ServerThread) -> list[ServedFile]:
    return [f for c in server.catalog.jobs[0].checkpoints for f in c.files]


def test_the_files_of_a_checkpoint_removed_upstream_go_with_their_directories(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        kept = still_listed(server)
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))
        again = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["deleted"] == summary["files"]["to_delete"] == len(removed.files)
    assert summary["bytes"]["deleted"] == sum(f.size for f in removed.files)
    assert summary["files"]["fetched"] == 0
    assert summary["removed_upstream"] == [f"{JOB}/{DELETED}"]
    assert summary["delete_held_back"] == []
    assert not (dest / JOB / DELETED).exists()
    assert DELETED not in recorded_checkpoints(dest)
    for file in kept:
        assert_exact(mirrored(dest, JOB, file), file)
    # Done once: the next run has nothing to delete and fetches nothing.
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["to_delete"] == 0
    assert json.loads(again.stdout)["files"]["fetched"] == 0


def test_a_runs_directory_stays_when_its_last_mirrored_checkpoint_goes(dest: Path) -> None:
    # The job deleted its mirrored checkpoints while its newest is still uploading: the
    # directories go up to each checkpoint's own, not the run's (made by a user, say, with the
    # owner and mode its mirror should have).
    with ServerThread(job_catalog(syncing_last=True)) as server:
        assert run_cli(*sync_args(server, dest)).code == 0
        remove_upstream_all_but_the_newest(server)  # still uploading
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["removed_upstream"] == [f"{JOB}/checkpoint-10", f"{JOB}/checkpoint-20"]
    assert summary["files"]["fetched"] == 0
    assert (dest / JOB).is_dir()
    assert list((dest / JOB).iterdir()) == []


def test_without_delete_a_checkpoint_removed_upstream_stays_mirrored(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["to_delete"] == 0
    assert json.loads(result.stdout)["removed_upstream_kept"] == [f"{JOB}/{DELETED}"]
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    ("extra", "kept"),
    [
        ((), [f"{JOB}/{DELETED}"]),
        (("--dry-run",), [f"{JOB}/{DELETED}"]),
        # What --delete would delete: none of a rank the mirror does not hold...
        (("--node-rank", "1"), []),
        (("--node-rank", "0", "--include", "*.safetensors"), [f"{JOB}/{DELETED}"]),
        # ... and, with it, nothing is kept.
        (("--delete",), []),
    ],
)
def test_a_run_without_delete_tells_the_checkpoints_removed_upstream_it_keeps(
    dest: Path, extra: tuple[str, ...], kept: list[str]
) -> None:
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest, "--node-rank", "0")
        result = run_cli(*sync_args(server, dest, "--json", *extra))
        text = run_cli(*sync_args(server, dest, *extra))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["removed_upstream_kept"] == kept
    told = [line for line in text.stdout.splitlines() if "no longer listed upstream" in line]
    verb = "would keep" if "--dry-run" in extra else "kept"
    assert told == (
        [
            f"{verb} 1 mirrored checkpoint no longer listed upstream (--delete would delete "
            "its files; list --dest names them)"
        ]
        if kept
        else []
    )


def test_a_checkpoint_removed_upstream_whose_files_are_gone_is_not_told_as_kept(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        shutil.rmtree(dest / JOB / DELETED)  # by hand: --delete would only drop its records
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["removed_upstream_kept"] == []


def test_the_records_of_a_checkpoint_removed_by_hand_are_not_walked_on_every_run(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without --delete its records stay: a run looked at each of their files (200,000 records
    # took 1.8 s of every run), to find none there.
    manifest = Manifest(manifest_path(dest))
    try:
        for where in ("job/gone", "job/there"):
            for name in ("a", "b"):
                path = f"{where}/0/{name}"
                run, checkpoint, _, _ = path.split("/", 3)
                manifest.record_verified(
                    VerifiedFile(path, "baseten-training", run, checkpoint, 0, 1, "t", "d")
                )
        (dest / "job/there/0").mkdir(parents=True)
        (dest / "job/there/0/b").write_bytes(b"x")
        looked_at: list[str] = []
        lstat = os.lstat

        def looking(path: str) -> os.stat_result:
            looked_at.append(path)
            return lstat(path)

        monkeypatch.setattr(os, "lstat", looking)
        held = kept(manifest, FileFilter(), {"job": frozenset({"new"})}, Pruner(str(dest)))
    finally:
        manifest.close()

    assert held == ["job/there"]
    assert [path for path in looked_at if "/job/gone/" in path] == []


def test_delete_in_the_config_deletes(dest: Path, tmp_path: Path) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text("delete = true\n")
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        result = run_cli(*sync_args(server, dest, "--config", str(config)))

    assert result.code == 0, result.stderr
    assert not (dest / JOB / DELETED).exists()
    assert f"of checkpoints removed upstream: {JOB}/{DELETED}" in result.stdout


def test_a_dry_run_names_what_it_would_delete_and_deletes_nothing(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        dry = run_cli(*sync_args(server, dest, "--delete", "--dry-run"))

    assert dry.code == 0, dry.stderr
    planned = {line.split()[1] for line in dry.stdout.splitlines() if line.startswith("delete ")}
    assert planned == {str(mirrored(dest, JOB, f).relative_to(dest)) for f in removed.files}
    assert f"would delete {len(removed.files)} mirrored files" in dry.stdout
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)
    assert DELETED in recorded_checkpoints(dest)


def test_a_dry_run_names_what_it_would_delete_by_path(dest: Path) -> None:
    # Rank 1 mirrored before rank 0, so its records come first; two checkpoints removed.
    with ServerThread(job_catalog()) as server:
        assert run_cli(*sync_args(server, dest, "--node-rank", "1")).code == 0
        assert run_cli(*sync_args(server, dest)).code == 0
        kept = remove_upstream_all_but_the_newest(server)
        dry = run_cli(*sync_args(server, dest, "--delete", "--dry-run"))

    assert dry.code == 0, dry.stderr
    planned = [line.split()[1] for line in dry.stdout.splitlines() if line.startswith("delete ")]
    assert len(planned) == 2 * len(kept.files)
    assert planned == sorted(planned)


def test_what_goes_is_walked_by_path_whatever_the_names_and_the_order_recorded(
    dest: Path,
) -> None:
    # "a-b/" sorts before "a/" ('-' before '/'), though run "a" sorts before "a-b"; so do the
    # checkpoints; and rank "10" sorts before "2", as its paths do.
    paths = sorted(
        f"{run}/{checkpoint}/{rank}/{name}"
        for run in ("a", "a-b")
        for checkpoint in ("c", "c-d")
        for rank in (1, 2, 10)
        for name in ("x", "sub/y", "z")
    )
    manifest = Manifest(manifest_path(dest))
    try:
        for path in reversed(paths):
            run, checkpoint, rank, _ = path.split("/", 3)
            manifest.record_verified(
                VerifiedFile(path, "baseten-training", run, checkpoint, int(rank), 1, "t", "d")
            )
        listed = {"a": frozenset({"new"}), "a-b": frozenset({"new"})}
        walked = [doomed.path for doomed in deletions(manifest, FileFilter(), listed)]
    finally:
        manifest.close()

    assert walked == paths


def test_only_the_ranks_and_paths_the_run_takes_are_deleted(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        result = run_cli(
            *sync_args(server, dest, "--delete", "--node-rank", "0", "--exclude", "*.safetensors")
        )

    assert result.code == 0, result.stderr
    for file in removed.files:
        path = mirrored(dest, JOB, file)
        if file.node_rank == 0 and not file.name.endswith(".safetensors"):
            assert not path.exists()
        else:
            assert_exact(path, file)


def test_files_the_manifest_does_not_record_stay_and_so_do_their_directories(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        notes = dest / JOB / DELETED / "0" / "notes.txt"
        notes.write_text("mine")
        # A mirrored file the user swapped for a link to a copy of their own.
        swapped = mirrored(dest, JOB, removed.files[0])  # rank 0's weights
        swapped.unlink()
        swapped.symlink_to(notes)
        # And one for a link as long as the file was (a link's size is its target's length):
        # only its type tells it from the file. Its extra slashes lead to the same notes.
        small = mirrored(dest, JOB, removed.files[1])  # rank 0's first small file
        target = "." + "/" * (small.stat().st_size - len("./../notes.txt")) + "/../notes.txt"
        small.unlink()
        small.symlink_to(target)
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["deleted"] == len(removed.files) - 2
    assert notes.read_text() == small.read_text() == "mine"
    assert swapped.is_symlink()
    left = {p.relative_to(dest) for p in (dest / JOB / DELETED).rglob("*")}
    kept = (notes, swapped, small.parent, small)
    assert left == {Path(JOB, DELETED, "0"), *(path.relative_to(dest) for path in kept)}


def test_nothing_is_deleted_through_a_symlink_to_another_checkpoint(dest: Path) -> None:
    # A user who linked the old checkpoint's directory to a newer one: its recorded paths now
    # lead to the newer checkpoint's files, which must not go.
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        kept = still_listed(server)
        directory = dest / JOB / DELETED
        for path in sorted(directory.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        directory.rmdir()
        directory.symlink_to("checkpoint-20")
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["deleted"] == 0
    assert DELETED not in recorded_checkpoints(dest)
    for file in kept:
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_checkpoint_moved_elsewhere_and_linked_back_is_left_whole(
    dest: Path, tmp_path: Path
) -> None:
    # A user who moved the old checkpoint to other storage, linked it back, and emptied a
    # directory of it there: nothing under the link is the mirror's, an empty directory neither.
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        archive = tmp_path / "archive"
        archive.mkdir()
        shutil.move(dest / JOB / DELETED, archive)
        (dest / JOB / DELETED).symlink_to(archive / DELETED)
        for file in removed.files:
            if "/extra/" in file.name and file.node_rank == 0:
                mirrored(dest, JOB, file).unlink()
        before = sorted(archive.rglob("*"))
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["deleted"] == 0
    assert DELETED not in recorded_checkpoints(dest)
    assert sorted(archive.rglob("*")) == before
    assert (archive / DELETED / "0" / "extra").is_dir()


def test_another_jobs_mirror_in_the_same_directory_is_left_alone(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        # As if another job of that name had mirrored it: this source's list is not its list.
        db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
        with db:
            db.execute("UPDATE files SET run = 'job-2' WHERE checkpoint = ?", (DELETED,))
        db.close()
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["to_delete"] == 0
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    "failing",
    [["--include", "no-such-file*"], ["--node-rank", "7"]],
    ids=["pattern-took-nothing", "rank-not-listed"],
)
def test_a_rank_or_pattern_that_takes_nothing_deletes_nothing(
    dest: Path, failing: list[str]
) -> None:
    # Deletions come before the files are listed (and this choice found wanting): what they
    # take is what the choice takes, here nothing.
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        result = run_cli(*sync_args(server, dest, "--delete", *failing))

    assert result.code == 4, result.stderr
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_checkpoint_list_that_does_not_name_every_checkpoint_deletes_nothing(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        assert run_cli(*sync_args(server, dest)).code == 0
        mirrored_files = server.files()
    # checkpoint-20, and an entry without its id: it could be any checkpoint that seems gone.
    stamp = "2026-11-01T00:00:00Z"
    named = {"checkpoint_id": "checkpoint-20", "created_at": stamp}
    with job_listing_checkpoints(JOB, [named, {"created_at": stamp}]) as api:
        args = ["--api-url", api, "--project", PROJECT, "--job", JOB, "--dest", str(dest)]
        result = run_cli("sync", *args, "--delete", "--json")

    assert result.code == 1, result.stderr
    assert json.loads(result.stdout)["files"]["to_delete"] == 0
    for file in mirrored_files:
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize("mirrored_before", [True, False], ids=["mirrored", "nothing-mirrored"])
def test_a_job_listed_with_no_checkpoint_left_deletes_nothing_and_says_so(
    dest: Path, mirrored_before: bool
) -> None:
    with ServerThread(job_catalog()) as server:
        if mirrored_before:
            assert run_cli(*sync_args(server, dest)).code == 0
        mirrored_files = server.files() if mirrored_before else []
        server.call(server.catalog.jobs[0].checkpoints.clear)
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))
        said = run_cli(*sync_args(server, dest, "--delete"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["to_delete"] == 0
    # Only a list that leaves mirrored files unaccounted for is held back: of a job with none,
    # there was nothing to hold.
    assert summary["delete_held_back"] == ([JOB] if mirrored_before else [])
    held = f"deleted nothing of {JOB}: its checkpoint list is empty"
    assert (held in said.stdout) is mirrored_before
    for file in mirrored_files:
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_deletion_cut_short_before_its_records_went_is_finished_by_the_next_run(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        # As a run killed after unlinking the files, before its records were committed and its
        # directories removed, leaves the mirror.
        for file in removed.files:
            mirrored(dest, JOB, file).unlink()
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["deleted"] == 0
    assert DELETED not in recorded_checkpoints(dest)
    assert not (dest / JOB / DELETED).exists()


@pytest.mark.parametrize(
    "refusal",
    [
        "staging-a-file-in-its-place",
        "staging-on-another-filesystem",
        "an-immutable-state-directory",
    ],
)
def test_a_run_that_stops_at_its_start_deletes_nothing(
    dest: Path, tmp_path: Path, refusal: str
) -> None:
    # Checked only once --delete had deleted: a run that then stopped (exit 6) had removed a
    # checkpoint all the same. The manifest is opened to be written only after the deletions
    # (they may free the room that needs): a state directory where SQLite cannot make its -wal
    # and -shm files is asked before.
    with ServerThread(job_catalog()) as server, contextlib.ExitStack() as stack:
        removed = mirror_then_remove_upstream(server, dest)
        state = dest / ".checkpoint-sync"
        if refusal == "an-immutable-state-directory":
            stack.enter_context(immutable(state))
            named = f"{state}, where SQLite makes its -wal and -shm files, cannot be written"
        else:
            area = state / "staging"
            named = f"{area}"
            area.rmdir()
            if refusal == "staging-a-file-in-its-place":
                area.write_text("a file of someone else's\n")
            else:
                area.symlink_to(stack.enter_context(mounted(tmp_path / "disk", "tmpfs", "size=8m")))
        result = run_cli(*sync_args(server, dest, "--delete"))

    assert result.code == 6, result.stderr
    assert result.stderr.count("\n") == 1
    assert named in result.stderr
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)
    assert DELETED in recorded_checkpoints(dest)
    assert_records_true(dest)


def test_a_run_directory_removed_by_hand_leaves_fsync_nothing_to_make_durable(
    dest: Path,
) -> None:
    # `rm -rf` of a run's mirror, then a checkpoint of it removed upstream: its records go with
    # nothing to delete, and the run's directory, gone, has no deletion to sync.
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        kept = still_listed(server)
        shutil.rmtree(dest / JOB)
        result = run_cli(*sync_args(server, dest, "--delete", "--fsync", "--json"))

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["deleted"] == 0
    assert summary["files"]["fetched"] == len(kept)
    assert DELETED not in recorded_checkpoints(dest)
    assert not (dest / JOB / DELETED).exists()


@contextmanager
def no_file_descriptor_left() -> Iterator[None]:
    """Every file opened meanwhile fails (EMFILE): the limit is the lowest free descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The directory that lost entries: the run's, that lost the checkpoint's; or, where a file of
# yours keeps the checkpoint's directory, that one, which stays (the first synced).
@pytest.mark.parametrize(
    ("yours", "unsynced"), [(None, JOB), (f"{DELETED}/0/notes.txt", f"{JOB}/{DELETED}")]
)
def test_deletions_that_cannot_be_made_durable_keep_their_records_for_the_next_run(
    dest: Path, yours: str | None, unsynced: str
) -> None:
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        if yours is not None:
            (dest / JOB / yours).write_text("mine")
        listed = {JOB: frozenset(c.checkpoint_id for c in server.catalog.jobs[0].checkpoints)}
        # `--delete --fsync`, whose directory that lost entries cannot be opened to be synced.
        # Its deletions may not survive a power loss: were their records dropped, files that
        # came back would stay for ever, as files of your own.
        manifest = Manifest(manifest_path(dest), durable=True)
        try:
            pruner = Pruner(str(dest), fsync=True)
            for doomed in list(deletions(manifest, FileFilter(), listed)):
                pruner.delete(doomed, goes=pruner.goes(doomed))
            with (
                no_file_descriptor_left(),
                pytest.raises(
                    LocalIOError, match=f"deletions in {dest}/{unsynced} durable: Too many"
                ),
            ):
                pruner.finish(manifest, deletions(manifest, FileFilter(), listed))
        finally:
            manifest.close()
        assert (dest / JOB / DELETED).exists() is (yours is not None)
        assert DELETED in recorded_checkpoints(dest)

        result = run_cli(*sync_args(server, dest, "--delete", "--fsync"))

    assert result.code == 0, result.stderr
    assert DELETED not in recorded_checkpoints(dest)
    if yours is not None:
        assert (dest / JOB / yours).read_text() == "mine"


# The CLI, killed (SIGKILL) when it first removes a directory: every file of the checkpoint
# removed upstream is unlinked, each taking {unlink_seconds} s (a slow disk: past the 0.2 s of a
# batch of records, which must not commit the records dropped so far before the directories go).
KILLED_AT_FIRST_RMDIR = """
import os, signal, sys, time
unlink = os.unlink
def slow_unlink(path):
    time.sleep({unlink_seconds})
    unlink(path)
os.unlink = slow_unlink
os.rmdir = lambda path: os.kill(os.getpid(), signal.SIGKILL)
from checkpoint_sync.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("unlink_seconds", [0, 0.25], ids=["fast-disk", "slow-disk"])
def test_a_run_killed_while_deleting_leaves_the_next_run_no_empty_directory(
    dest: Path, unlink_seconds: float
) -> None:
    script = KILLED_AT_FIRST_RMDIR.format(unlink_seconds=unlink_seconds)
    with ServerThread(job_catalog()) as server:
        mirror_then_remove_upstream(server, dest)
        killed = subprocess.run(
            [sys.executable, "-c", script, *sync_args(server, dest, "--delete")],
            capture_output=True,
            timeout=60,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert not (dest / JOB / DELETED).exists()
    assert DELETED not in recorded_checkpoints(dest)


def test_a_dry_run_names_only_the_files_the_run_would_delete(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        # A mirrored file the user swapped for a link to a file of their own: a run keeps it.
        swapped = mirrored(dest, JOB, removed.files[0])
        swapped.unlink()
        swapped.symlink_to(mirrored(dest, JOB, removed.files[1]))
        dry = run_cli(*sync_args(server, dest, "--delete", "--dry-run", "--json"))
        real = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert dry.code == real.code == 0, dry.stderr + real.stderr
    would, did = json.loads(dry.stdout), json.loads(real.stdout)
    assert would["files"]["to_delete"] == did["files"]["deleted"] == len(removed.files) - 1
    assert would["bytes"]["to_delete"] == did["bytes"]["deleted"]
    assert swapped.is_symlink()


def test_a_file_changed_by_hand_is_not_deleted(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        changed = mirrored(dest, JOB, removed.files[1])
        changed.write_text("my notes, not the checkpoint's")
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["files"]["deleted"] == len(removed.files) - 1
    assert changed.read_text() == "my notes, not the checkpoint's"
    assert DELETED not in recorded_checkpoints(dest)


def mirror_removed_upstream(dest: Path, checkpoints: int, files: int) -> None:
    """A mirror of JOB holding ``files`` one-byte files in each of ``checkpoints`` checkpoints
    its provider no longer lists, recorded as a sync records them."""
    manifest = Manifest(manifest_path(dest))
    try:
        for c in range(checkpoints):
            (dest / JOB / f"old-{c}" / "0").mkdir(parents=True)
            for i in range(files):
                path = f"{JOB}/old-{c}/0/f{i}"
                (dest / path).write_bytes(b"x")
                verified = VerifiedFile(path, "baseten-training", JOB, f"old-{c}", 0, 1, "t", "d")
                manifest.record_verified(verified)
    finally:
        manifest.close()


def test_delete_keeps_nothing_per_file_that_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that lost a million files upstream: they are counted against --max-delete, deleted
    # and forgotten by walks of the manifest, not kept in a list (99,500 took 32 MiB). What the
    # run holds as it deletes its first file, with 500 files to delete and with 3,500, after a
    # first run (its imports, first models and caches): held in a list, the 3,000 more took
    # 0.8 MB more.
    held: list[int] = []
    unlink = os.unlink

    def note_first(path: str) -> None:
        if len(held) < run:
            held.append(tracemalloc.get_traced_memory()[0])
        unlink(path)

    monkeypatch.setattr(os, "unlink", note_first)
    with ServerThread(job_catalog(checkpoints=1, large_files=0, small_files=1)) as server:
        for run, files in enumerate((10, 50, 350), 1):
            dest = tmp_path / str(run)
            mirror_removed_upstream(dest, 10, files)
            tracemalloc.start()
            try:
                result = run_cli(*sync_args(server, dest, "--delete", "--json"))
            finally:
                tracemalloc.stop()
            assert result.code == 0, result.stderr
            assert json.loads(result.stdout)["files"]["deleted"] == 10 * files
            assert recorded_checkpoints(dest) == {"checkpoint-10"}
            assert os.listdir(dest / JOB) == ["checkpoint-10"]
    assert held[2] < held[1] + (1 << 18), held


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_more_files_to_delete_than_max_delete_holds_every_deletion_back(
    dest: Path, dry_run: bool
) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        args = ["--delete", "--max-delete", str(len(removed.files) - 1), "--json"]
        result = run_cli(*sync_args(server, dest, *args, *(["--dry-run"] if dry_run else [])))
        at_the_limit = run_cli(*sync_args(server, dest, "--delete", "--max-delete", "10"))

    assert result.code == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"]["to_delete"] == summary["files"]["deleted"] == 0
    assert summary["failures"] == [
        {
            "path": "--delete",
            "error": f"{len(removed.files)} files would go, more than --max-delete "
            f"{len(removed.files) - 1}: none was deleted",
        }
    ]
    # Nothing was touched: the next run, allowed them all, deletes them all.
    assert at_the_limit.code == 0, at_the_limit.stderr
    assert "deleted 10 mirrored files" in at_the_limit.stdout
    assert not (dest / JOB / DELETED).exists()


def test_max_delete_in_the_config_holds_deletions_back(dest: Path, tmp_path: Path) -> None:
    config = tmp_path / "mirror.toml"
    config.write_text("delete = true\nmax_delete = 0\n")
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        result = run_cli(*sync_args(server, dest, "--config", str(config)))

    assert result.code == 1
    assert "--delete: 10 files would go, more than --max-delete 0: none was deleted" in (
        result.stderr
    )
    for file in removed.files:
        assert_exact(mirrored(dest, JOB, file), file)


def test_max_delete_without_delete_is_a_usage_error(dest: Path) -> None:
    with ServerThread(job_catalog()) as server:
        result = run_cli(*sync_args(server, dest, "--max-delete", "5"))

    assert result.code == 2
    assert "--max-delete limits --delete: pass --delete too" in result.stderr
    assert not dest.exists()


def test_a_mirror_whose_disk_the_removed_checkpoint_fills_makes_room_for_the_new_one(
    tmp_path: Path,
) -> None:
    # A disk sized for two checkpoints of 6 MiB (and the 4 MiB kept free): the job deleted the
    # older of the two mirrored and wrote a newer one. Deleting only after fetching, the run
    # would stop on the full disk before it, every time.
    catalog = job_catalog(checkpoints=3, large_size=3 << 20, small_files=0)
    with mounted(tmp_path / "disk", "tmpfs", "size=20m") as disk, ServerThread(catalog) as server:
        dest = disk / "mirror"
        two = ["--checkpoint", "checkpoint-10", "--checkpoint", "checkpoint-20"]
        assert run_cli(*sync_args(server, dest, *two)).code == 0
        job = server.catalog.jobs[0]
        server.call(lambda: job.checkpoints.pop(0))
        result = run_cli(*sync_args(server, dest, "--delete"))

        assert result.code == 0, result.stderr
        assert not (dest / JOB / DELETED).exists()
        for file in still_listed(server):  # the disk goes with the block
            assert_exact(mirrored(dest, JOB, file), file)


@contextmanager
def filled_after_mirroring(tmp_path: Path) -> Iterator[tuple[ServerThread, Path, ServedCheckpoint]]:
    """Two checkpoints mirrored on a 10 MiB tmpfs, the older then removed upstream, and the disk
    filled to its last byte by another program. Yields the server, the mirror, the removed."""
    catalog = job_catalog(checkpoints=2)
    with mounted(tmp_path / "disk", "tmpfs", "size=10m") as disk, ServerThread(catalog) as server:
        dest = disk / "mirror"
        removed = mirror_then_remove_upstream(server, dest)
        fill(disk)
        assert shutil.disk_usage(disk).free == 0
        yield server, dest, removed


def assert_only_the_kept_checkpoint_mirrored(server: ServerThread, dest: Path) -> None:
    assert not (dest / JOB / DELETED).exists()
    kept = still_listed(server)
    for file in kept:
        assert_exact(mirrored(dest, JOB, file), file)
    assert len(manifest_rows(dest)) == len(kept)
    assert_records_true(dest)


def test_a_disk_another_program_filled_is_freed_by_delete(tmp_path: Path) -> None:
    # Opening the manifest to be written needs room (SQLite's WAL index): only once the files
    # of the removed checkpoint are gone is there any.
    with filled_after_mirroring(tmp_path) as (server, dest, removed):
        planned = run_cli(*sync_args(server, dest, "--delete", "--dry-run"))
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))
        again = run_cli(*sync_args(server, dest, "--delete", "--json"))

        assert planned.code == 0, planned.stderr
        assert f"would delete {len(removed.files)} mirrored files" in planned.stdout
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["files"]["deleted"] == len(removed.files)
        assert_only_the_kept_checkpoint_mirrored(server, dest)
        assert again.code == 0, again.stderr
        files = json.loads(again.stdout)["files"]
        assert (files["to_delete"], files["fetched"]) == (0, 0)
        assert files["skipped"] == len(still_listed(server))


def test_a_run_killed_between_freeing_a_full_disk_and_dropping_the_records_is_repaired(
    tmp_path: Path,
) -> None:
    script = KILLED_AT_FIRST_RMDIR.format(unlink_seconds=0)
    with filled_after_mirroring(tmp_path) as (server, dest, removed):
        killed = subprocess.run(
            [sys.executable, "-c", script, *sync_args(server, dest, "--delete")],
            capture_output=True,
            timeout=60,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # The files are gone, their records not yet: the next run drops them.
        assert not any(mirrored(dest, JOB, file).exists() for file in removed.files)
        assert DELETED in recorded_checkpoints(dest)
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["files"]["fetched"] == 0
        assert_only_the_kept_checkpoint_mirrored(server, dest)


@pytest.mark.parametrize("max_delete", [[], ["--max-delete", "9"]], ids=["deleted", "held-back"])
def test_a_run_whose_listing_then_fails_still_says_what_its_deletions_did(
    dest: Path, max_delete: list[str]
) -> None:
    # The deletions come first: a listing that fails after them must not leave them unsaid.
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        server.faults.api_faults = [None, "404"]  # the checkpoint list, then its files
        result = run_cli(*sync_args(server, dest, "--delete", *max_delete))

    assert result.code == 4, result.stderr
    if max_delete:
        assert "--delete: 10 files would go, more than --max-delete 9" in result.stderr
    else:
        assert not (dest / JOB / DELETED).exists()
        assert f"deleted {len(removed.files)} mirrored files " in result.stdout
        assert f"of checkpoints removed upstream: {JOB}/{DELETED}" in result.stdout


# The CLI with one file's lstat refused (EACCES) on the walk of --delete that WHEN names: the
# first (the count), the second (the deleting), counted from the calls on that file.
LOOKED_AT_ONCE = """
import errno, os, sys
lstat_ = os.lstat
calls = 0
def refused_once(path, *args, **kwargs):
    global calls
    if str(path).endswith(os.environ["FILE"]):
        calls += 1
        if str(calls) in os.environ["WHEN"].split(","):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return lstat_(path, *args, **kwargs)
os.lstat = refused_once
from checkpoint_sync.cli import main
sys.exit(main(sys.argv[1:]))
"""


# The walks that look at the file: 1 counts, 2 deletes, 3 drops the records of what went.
@pytest.mark.parametrize(
    "when", [(1,), (2,), (2, 3)], ids=["counting", "deleting", "deleting-and-dropping"]
)
def test_a_file_unreadable_in_one_walk_of_delete_neither_passes_the_count_nor_goes_unsaid(
    dest: Path, when: tuple[int, ...]
) -> None:
    # --delete counts what goes against --max-delete, then looks at each file again to delete
    # it. Refused in the count, then readable, it was deleted beyond the count (past a limit
    # exactly at it), after it was reported failed; refused only when deleted, it was kept
    # without a word and the run said all was well.
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        refused = removed.files[0]
        others = len(removed.files) - 1
        # Counted without it, the limit is exactly at the count; counted with it, all may go.
        limit = others if when == (1,) else len(removed.files)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                LOOKED_AT_ONCE,
                *sync_args(server, dest, "--delete", "--max-delete", str(limit), "--json"),
            ],
            env={
                **os.environ,
                "FILE": f"/{mirrored(dest, JOB, refused).relative_to(dest)}",
                "WHEN": ",".join(map(str, when)),
            },
            capture_output=True,
            text=True,
            check=False,
        )
        left = [f for f in removed.files if mirrored(dest, JOB, f).exists()]
        # Its record kept, the next run deletes it: dropped, it would stay as a file of yours.
        rerun = run_cli(*sync_args(server, dest, "--delete"))

    summary = json.loads(result.stdout)
    # Never more deleted than counted: the one file over waits for the next run.
    assert summary["files"]["deleted"] == others
    assert len(left) == 1
    assert rerun.code == 0, rerun.stderr
    assert not mirrored(dest, JOB, refused).exists()
    if when == (1,):  # readable when it mattered: no failure
        assert result.returncode == 0, result.stderr
        assert summary["failures"] == []
    else:
        assert result.returncode == 1, result.stderr
        assert left == [refused]
        [failure] = summary["failures"]
        assert failure == {
            "path": str(mirrored(dest, JOB, refused).relative_to(dest)),
            "error": f"cannot delete {mirrored(dest, JOB, refused)}: Permission denied",
        }


# The CLI held up (swapped out, say) where HOLD says: just before it opens the lock to take it
# ("before-the-lock"), or just after it made the lock file ("after-making-the-lock"). It says
# so, then goes on once the file named by GO exists.
HELD_UP_AT_THE_LOCK = """
import os, sys, time
open_ = os.open
def held_up():
    print("at the lock", file=sys.stderr, flush=True)
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.01)
def held_up_open(path, flags, *args, **kwargs):
    taking = str(path).endswith("/.checkpoint-sync/lock") and flags & os.O_RDWR
    if taking and os.environ["HOLD"] == "before-the-lock":
        held_up()
    fd = open_(path, flags, *args, **kwargs)
    if taking and flags & os.O_EXCL and os.environ["HOLD"] == "after-making-the-lock":
        held_up()
    return fd
os.open = held_up_open
from checkpoint_sync.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("held_up", ["waiting", "before-the-lock", "after-making-the-lock"])
@pytest.mark.parametrize("delete", [True, False], ids=["its-files", "its-parts"])
def test_a_run_that_took_the_lock_after_another_keeps_what_that_one_mirrored_meanwhile(
    dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delete: bool, held_up: str
) -> None:
    # A cron run reads the checkpoint list; a later run, whose list has a checkpoint new since,
    # takes the lock first and mirrors it (or leaves it in parts), while the first waits for
    # the lock (--wait-lock), or, held up before it tried the lock, never waits. So too where
    # there was no lock file (two runs started together, or it was removed): the first made it,
    # and was held up before it tried it. The provider still lists that checkpoint: the first
    # run must not take it for one removed upstream.
    with ServerThread(job_catalog()) as server:
        job = server.catalog.jobs[0]
        newest = job.checkpoints[-1]
        server.call(lambda: job.checkpoints.remove(newest))
        assert run_cli(*sync_args(server, dest)).code == 0
        flags = ["--delete", "--json"] if delete else ["--json"]
        go = tmp_path / "go"
        if held_up != "waiting":
            if held_up == "after-making-the-lock":
                (dest / ".checkpoint-sync" / "lock").unlink()
            first = subprocess.Popen(
                [sys.executable, "-c", HELD_UP_AT_THE_LOCK, *sync_args(server, dest, *flags)],
                env={**os.environ, "GO": str(go), "HOLD": held_up},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert first.stderr is not None
            assert first.stderr.readline() == b"at the lock\n"  # its list read
        else:
            lock = dest / ".checkpoint-sync" / "lock"
            held = os.open(lock, os.O_RDWR)
            fcntl.flock(held, fcntl.LOCK_EX)
            first = run_subprocess(*sync_args(server, dest, *flags, "--wait-lock"))
            # Stopped between the lock's open and its first try, it would take the lock at once
            # when let go, not having waited: so not before it sleeps in its wait.
            wait_for(first, lambda: str(lock) in open_files(first.pid) and asleep(first.pid))
            first.send_signal(signal.SIGSTOP)  # the later run gets the lock first
            os.close(held)
        server.call(lambda: job.checkpoints.append(newest))
        if delete:
            assert run_cli(*sync_args(server, dest)).code == 0
        else:
            leave_in_parts(server, monkeypatch, sync_args(server, dest), from_byte=512 << 10)
        if held_up != "waiting":
            go.touch()
        else:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)

    assert first.returncode == 0, err
    assert json.loads(out)["files"]["to_delete"] == 0
    if delete:
        for file in newest.files:
            assert_exact(mirrored(dest, JOB, file), file)
    else:
        assert staged(dest) == {f"{JOB}/{newest.checkpoint_id}"}


# The CLI on a slow disk: each unlink of a file of the checkpoint removed upstream takes half a
# second, and says when it starts; each look at one says so too. Others are not slowed, nor said:
# the run's start unlinks a probe file of its own (`_rename_crosses`), before it deletes anything.
SLOW_UNLINKS = """
import os, sys, time
unlink, lstat = os.unlink, os.lstat
def slow_unlink(path):
    if "/checkpoint-10/" in str(path):
        print("unlinking", file=sys.stderr, flush=True)
        time.sleep(0.5)
    unlink(path)
def noted_lstat(path, *args, **kwargs):
    if "/checkpoint-10/" in str(path):
        print("looking", file=sys.stderr, flush=True)
    return lstat(path, *args, **kwargs)
os.unlink, os.lstat = slow_unlink, noted_lstat
from checkpoint_sync.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_while_deleting_stops_the_run_at_once_and_the_next_run_finishes(
    dest: Path,
) -> None:
    with ServerThread(job_catalog()) as server:
        removed = mirror_then_remove_upstream(server, dest)
        deleting = subprocess.Popen(
            [sys.executable, "-c", SLOW_UNLINKS, *sync_args(server, dest, "--delete")],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert deleting.stderr is not None
        while (line := deleting.stderr.readline()) != b"unlinking\n":
            assert line, "the run ended before it deleted"
        deleting.send_signal(signal.SIGTERM)
        _, err = deleting.communicate(timeout=60)
        result = run_cli(*sync_args(server, dest, "--delete", "--json"))

    assert deleting.returncode == 143, err
    # The unlink under way when the signal came, and the two begun while it went through the
    # loop (its handler, then the task that stops the run); not every file. Counted, not timed:
    # on a busy machine those 1.5 s of unlinks and the exit took over the 2 s once allowed.
    unlinks = 1 + err.count(b"unlinking\n")  # the first was read already
    assert unlinks <= 3 < len(removed.files), err
    # Each file reached looked at before it went and once more before its record was dropped;
    # not each of those still to go: of a million, on a slow disk, a wait of minutes.
    assert err.count(b"looking\n") <= 2 * unlinks, err
    assert result.code == 0, result.stderr
    assert not (dest / JOB / DELETED).exists()
    assert DELETED not in recorded_checkpoints(dest)


class _Counted(str):
    """A checkpoint name that counts how often it is compared with another."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        _Counted.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([], []),
        (["j/c-10", "j/c-10", "j/c-20"], ["j/c-10", "j/c-20"]),
        (["j/c-20", "j/c-10", "j/c-20"], ["j/c-20", "j/c-10"]),
        (["a/c-10", "b/c-10"], ["a/c-10", "b/c-10"]),
    ],
)
def test_the_checkpoints_removed_upstream_are_named_once_each_in_order(
    names: list[str], expected: list[str]
) -> None:
    going = Going()
    for i, name in enumerate(names):
        going.add(Deletion(f"{name}/0/f{i}", i, name))
    assert going.checkpoints == expected
    assert (going.files, going.bytes) == (len(names), sum(range(len(names))))


def test_naming_the_checkpoints_removed_upstream_compares_each_file_once_at_most() -> None:
    # A job that saved every 100 steps for weeks loses thousands of checkpoints at once: a
    # walk of those named so far, for each file, would compare some 15,000 times here.
    doomed = [
        Deletion(f"j/c-{c}/0/f{i}", 1, _Counted(f"j/c-{c}")) for c in range(100) for i in range(3)
    ]
    _Counted.compared = 0
    going = Going()
    for each in doomed:
        going.add(each)
    assert len(going.checkpoints) == 100
    assert _Counted.compared <= len(doomed)
