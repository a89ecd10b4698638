"""The mirror's lock: whether a run that took it may have met another run since it read its
checkpoint list, which it then reads again (`test_delete.py` has what that keeps)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from checkpoint_sync import lock
from checkpoint_sync.errors import LockHeldError
from checkpoint_sync.lock import LOCK_NAME, LockSeen, mirror_lock

from .conftest import JOB, sync_args
from .support import (
    ServerThread,
    assert_exact,
    mirrored,
    new_version,
    run_cli,
    run_subprocess,
    run_without_dac_override,
)
from .test_delete import mirror_then_remove_upstream
from .test_kill import asleep, open_files, wait_for
from .test_local_errors import fill, mounted

# Nanoseconds of a whole second: all a filesystem keeping whole seconds records.
SECOND = 1_700_000_000 * 10**9


def file(inode: int = 7, mtime: int = SECOND, holder: bytes = b"1111\n") -> LockSeen:
    """A lock file as `LockSeen` notes it, holding ``holder`` alone."""
    return LockSeen((inode, mtime, len(holder), holder))


@pytest.mark.parametrize(
    ("seen", "now", "created", "waited", "expected"),
    [
        (file(), file(), False, False, False),  # nothing happened in between
        (file(), file(), False, True, True),  # it waited: the other run may have mirrored
        (None, file(), False, False, False),  # not looked at (bench): only a wait tells
        (LockSeen(None), file(), False, False, True),  # another run made it since
        # Another holder, as long a pid, within the same second.
        (file(), file(holder=b"2222\n"), False, False, True),
        (file(), file(mtime=SECOND + 1), False, False, True),
        (file(), file(inode=8), False, False, True),
        # Made by this run, so empty then, whatever it saw before: unless a run that took the
        # lock before this one named itself in it.
        (LockSeen(None), file(holder=b""), True, False, False),
        (None, file(holder=b""), True, False, False),
        (LockSeen(None), file(holder=b"2222\n"), True, False, True),
        (LockSeen(None), LockSeen(None), True, False, True),  # cannot tell: read again
        # A holder that could not write its pid (a full disk) left the file a byte longer
        # (`unnamed_size`), whether it was empty or named another, or this run had just made it.
        (file(holder=b""), file(holder=b"\0"), False, False, True),
        (file(), file(holder=b"\0" * 6), False, False, True),
        (LockSeen(None), file(holder=b"\0"), True, False, True),
    ],
)
def test_whether_another_run_may_have_held_the_lock_since(
    seen: LockSeen | None, now: LockSeen, created: bool, waited: bool, expected: bool
) -> None:
    assert lock.held_since(seen, now, created=created, waited=waited) is expected


@pytest.mark.anyio
async def test_a_holder_in_the_same_second_as_the_one_before_is_seen(tmp_path: Path) -> None:
    # A filesystem that keeps whole seconds: the run seen last and the one that held the lock
    # since wrote their pids (as long) within one second. The file's time and size are the same.
    state = tmp_path / ".checkpoint-sync"
    state.mkdir()
    path = state / LOCK_NAME
    path.write_text("1111\n")
    os.utime(path, ns=(SECOND, SECOND))
    seen = LockSeen.of(path)
    path.write_text("2222\n")
    os.utime(path, ns=(SECOND, SECOND))

    async with mirror_lock(state, wait=False, seen=seen) as another:
        assert another
    async with mirror_lock(state, wait=False, seen=LockSeen.of(path)) as another:
        assert not another


@pytest.mark.parametrize(
    ("found", "size"),
    [(LockSeen(None), 1), (file(holder=b""), 1), (file(), 6), (file(holder=b"\0"), 2)],
)
def test_a_holder_that_cannot_write_its_pid_leaves_another_size(found: LockSeen, size: int) -> None:
    assert lock.unnamed_size(found) == size


@pytest.mark.anyio
async def test_a_holder_that_cannot_write_its_pid_is_still_seen(tmp_path: Path) -> None:
    # A full disk, on a filesystem that keeps whole seconds: the lock file was empty when a run
    # noted it (made by a run that could not write its pid either), and the run that held the
    # lock since could not write its own.
    with mounted(tmp_path / "disk", "tmpfs", "size=1m") as disk:
        state = disk / ".checkpoint-sync"
        state.mkdir()
        path = state / LOCK_NAME
        path.touch()
        os.utime(path, ns=(SECOND, SECOND))
        seen = LockSeen.of(path)
        fill(disk)
        async with mirror_lock(state, wait=False):
            pass
        os.utime(path, ns=(SECOND, SECOND))

        async with mirror_lock(state, wait=False, seen=seen) as another:
            assert another


def requests_of(server: ServerThread, args: list[str]) -> int:
    """The API requests of a sync that succeeds, quiet: no walk of the listing to count it."""
    before = server.traffic.api_requests
    result = run_cli(*args, "--quiet")
    assert result.code == 0, result.stderr
    return int(server.traffic.api_requests - before)


@pytest.mark.parametrize("link", [False, True], ids=["file", "symlink"])
def test_a_run_that_met_no_other_reads_the_checkpoint_list_once(
    server: ServerThread, dest: Path, tmp_path: Path, link: bool
) -> None:
    # A dry run takes no lock: it reads the list once (and the files' one page). So does a first
    # run, which makes the lock file (where a symlink points, dangling until then: a lock kept on
    # a local disk, say), and a second, which finds it as it was.
    target = tmp_path / "locks" / "mirror.lock"
    if link:
        target.parent.mkdir()
        (dest / ".checkpoint-sync").mkdir(parents=True)
        (dest / ".checkpoint-sync" / LOCK_NAME).symlink_to(target)
    once = requests_of(server, sync_args(server, dest, "--dry-run", "--delete"))

    assert requests_of(server, sync_args(server, dest, "--delete")) == once
    assert requests_of(server, sync_args(server, dest, "--delete")) == once
    if link:
        assert target.read_text() == f"{os.getpid()}\n"


def test_a_file_where_the_state_directory_goes_is_named_not_a_directory(
    server: ServerThread, dest: Path
) -> None:
    # os.makedirs says "File exists" there, as if the lock were the problem.
    dest.mkdir()
    (dest / ".checkpoint-sync").write_text("mine")
    result = run_cli(*sync_args(server, dest))
    assert result.code == 6
    assert result.stderr == (
        f"checkpoint-sync: error: cannot create the lock {dest}/.checkpoint-sync/{LOCK_NAME}: "
        "Not a directory\n"
    )
    assert (dest / ".checkpoint-sync").read_text() == "mine"


@pytest.mark.parametrize("found", ["directory", "unreadable"])
def test_a_lock_there_that_cannot_be_opened_is_not_said_to_be_created(
    server: ServerThread, dest: Path, found: str
) -> None:
    lock_file = dest / ".checkpoint-sync" / LOCK_NAME
    lock_file.parent.mkdir(parents=True)
    if found == "directory":
        lock_file.mkdir()
        result = run_cli(*sync_args(server, dest))
        code, stderr, reason = result.code, result.stderr, "Is a directory"
    else:
        lock_file.touch(mode=0o000)  # another user's, say: as root, only without DAC override
        run = run_without_dac_override(*sync_args(server, dest))
        code, stderr, reason = run.returncode, run.stderr.decode(), "Permission denied"

    assert code == 6
    assert stderr == f"checkpoint-sync: error: cannot open the lock {lock_file}: {reason}\n"
    assert server.traffic.object_requests == 0


# The pid that the lock file of the run holding the mirror names.
HOLDER = 4242


@contextmanager
def held_lock(dest: Path) -> Iterator[Path]:
    """The mirror's lock, held by this process as `flock` holds it, named for a run of pid
    HOLDER; let go on leaving."""
    lock_file = dest / ".checkpoint-sync" / LOCK_NAME
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file.write_text(f"{HOLDER}\n")
    held = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield lock_file
    finally:
        os.close(held)


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root``, with its inode, size and modification time."""
    return {
        str(path.relative_to(root)): (info.st_ino, info.st_size, info.st_mtime_ns)
        for path in root.rglob("*")
        for info in [path.lstat()]
    }


GAVE_UP = (
    f"another checkpoint-sync run (pid {HOLDER}) still held {{dest}} after 0.3 s; this run gave "
    "up waiting (--wait-lock-timeout) and did nothing"
)


@pytest.mark.parametrize(
    ("asked", "as_json"),
    [("flags", False), ("flags", True), ("config", False), ("environment", True)],
)
def test_a_wait_for_the_lock_that_runs_out_exits_5_and_changes_nothing(
    server: ServerThread,
    dest: Path,
    tmp_path: Path,
    asked: str,
    as_json: bool,
) -> None:
    # A mirror with work to do, were the lock let go: a checkpoint removed upstream to delete,
    # a file changed upstream to fetch again.
    mirror_then_remove_upstream(server, dest)
    server.call(lambda: new_version(server.files()[0]))
    wait, env = ["--wait-lock", "--wait-lock-timeout", "0.3"], {}
    if asked == "config":
        config = tmp_path / "c.toml"
        config.write_text("wait_lock = true\nwait_lock_timeout = 0.3\n")
        wait = ["--config", str(config)]
    elif asked == "environment":
        wait, env = ["--wait-lock"], {"CHECKPOINT_SYNC_WAIT_LOCK_TIMEOUT": "0.3"}
    fetched = server.traffic.object_requests

    with held_lock(dest):
        before = tree(dest)
        # A process of its own: a wait that never ends fails the test, not hangs it.
        run = run_subprocess(
            *sync_args(server, dest, "--delete", *wait, *["--json"] * as_json), env=env
        )
        try:
            out, err = run.communicate(timeout=60)
        finally:
            run.kill()
        after = tree(dest)

    assert run.returncode == 5, err
    assert err.decode() == f"checkpoint-sync: error: {GAVE_UP.format(dest=dest)}\n"
    assert after == before
    assert (dest / ".checkpoint-sync" / LOCK_NAME).read_text() == f"{HOLDER}\n"
    assert server.traffic.object_requests == fetched
    if as_json:
        document = json.loads(out)
        assert (document["exit_code"], document["error"]) == (5, GAVE_UP.format(dest=dest))
        assert document["waiting_for_lock"] == {"pid": HOLDER}
        assert set(document["files"].values()) == {0}
        assert document["checkpoints"]
        assert not any(taken["complete"] for taken in document["checkpoints"])
    else:
        assert out == b""


def test_a_wait_for_the_lock_that_ends_in_time_mirrors(server: ServerThread, dest: Path) -> None:
    with held_lock(dest) as lock_file:
        run = run_subprocess(
            *sync_args(server, dest, "--wait-lock", "--wait-lock-timeout", "60", "--json")
        )
        # Let go once it waits: not between its open of the lock and its first try.
        wait_for(run, lambda: str(lock_file) in open_files(run.pid) and asleep(run.pid))
    out, err = run.communicate(timeout=60)

    assert run.returncode == 0, err
    document = json.loads(out)
    assert document["waiting_for_lock"] is None
    assert document["files"]["fetched"] == len(server.files())
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_wait_lock_timeout_in_the_config_does_not_make_a_run_wait(
    server: ServerThread, dest: Path, tmp_path: Path
) -> None:
    # As max_delete without delete: a config shared by cron lines bounds the waits of those
    # that pass --wait-lock, and leaves the others as they were.
    config = tmp_path / "c.toml"
    config.write_text("wait_lock_timeout = 0.3\n")
    with held_lock(dest):
        result = run_cli(*sync_args(server, dest, "--config", str(config)))

    assert result.code == 5
    assert result.stderr == (
        f"checkpoint-sync: error: another checkpoint-sync run (pid {HOLDER}) is mirroring into "
        f"{dest}; pass --wait-lock to wait for it\n"
    )


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--wait-lock-timeout", "5"],
            "--wait-lock-timeout bounds --wait-lock: pass --wait-lock too (or wait_lock in the "
            "config)",
        ),
        (
            ["--wait-lock", "--wait-lock-timeout", "0"],
            "bad setting wait_lock_timeout from --wait-lock-timeout: should be more than 0 "
            "seconds (not to wait, leave out --wait-lock; to wait for ever, leave out the timeout)",
        ),
        (
            ["--wait-lock", "--wait-lock-timeout", "86401"],
            "bad setting wait_lock_timeout from --wait-lock-timeout: Input should be less than "
            "or equal to 86400",
        ),
    ],
    ids=["without-wait-lock", "zero", "over-a-day"],
)
def test_a_wait_lock_timeout_out_of_place_or_range_is_a_usage_error(
    server: ServerThread, dest: Path, flags: list[str], error: str
) -> None:
    result = run_cli(*sync_args(server, dest, *flags))

    assert result.code == 2
    assert result.stderr == f"checkpoint-sync: error: {error}\n"
    assert server.traffic.api_requests == 0
    assert not dest.exists()


@pytest.mark.anyio
async def test_a_wait_tells_each_run_that_holds_the_lock_and_runs_out_naming_the_last(
    tmp_path: Path,
) -> None:
    # The run waited for ended and another took the lock: the progress, --json's
    # waiting_for_lock and a stop's message (all from on_wait) name the pid the error names.
    told: list[str] = []

    def waiting(holder: str) -> None:
        told.append(holder)
        lock_file.write_text(f"{HOLDER + 1}\n")  # another run took over

    with held_lock(tmp_path) as lock_file, pytest.raises(LockHeldError) as raised:
        async with mirror_lock(
            tmp_path / ".checkpoint-sync", wait=True, wait_timeout=0.3, on_wait=waiting
        ):
            pass

    assert told == [str(HOLDER), str(HOLDER + 1)]
    assert str(raised.value).startswith(
        f"another checkpoint-sync run (pid {HOLDER + 1}) still held {tmp_path} after 0.3 s"
    )
