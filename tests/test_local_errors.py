"""A full or read-only destination, or one refusing locks: exit 6 with one clear line, nothing
already there harmed; and a filesystem without a reported size is not taken for a full one.

A small tmpfs (or a ramfs, or a FUSE filesystem the test serves) is mounted for each test (we
run as root in CI); the test is skipped, saying why, where mounting is not allowed.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from checkpoint_sync.errors import LocalIOError
from checkpoint_sync.filesystem import preallocation_pays
from checkpoint_sync.localserver import Catalog, Faults, ServedCheckpoint, ServedFile, ServedJob
from checkpoint_sync.manifest import OUR_NAMES, SPACE_RESERVE, Manifest, VerifiedFile, foreign_names

from .conftest import JOB, PROJECT, job_args, job_catalog, sync_args
from .support import (
    API_KEY,
    ServerThread,
    assert_exact,
    leave_in_parts,
    mirrored,
    new_version,
    run_cli,
    run_subprocess,
    run_without_dac_override,
)
from .test_kill import assert_records_true
from .test_sync import flip_byte


@contextmanager
def mounted(point: Path, kind: str, options: str, pass_fds: tuple[int, ...] = ()) -> Iterator[Path]:
    """A fresh filesystem of ``kind`` at ``point``; the test is skipped where mounting fails."""
    point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", kind, "-o", options, kind, str(point)],
            check=True,
            capture_output=True,
            pass_fds=pass_fds,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        )
        pytest.skip(f"cannot mount a {kind} here ({detail})")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


@contextmanager
def refusing_flock(point: Path) -> Iterator[Path]:
    """A FUSE filesystem at ``point`` whose one file, ``lock``, refuses ``flock`` (ENOLCK), as
    some NFS and FUSE mounts do; served by a thread of this process."""
    try:
        device = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        pytest.skip(f"no FUSE here ({exc.strerror})")
    options = f"fd={device},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    try:
        with mounted(point, "fuse", options, pass_fds=(device,)):
            # Read only once mounted: before, /dev/fuse refuses reads.
            threading.Thread(target=_serve_fuse, args=(device,), daemon=True).start()
            yield point
    finally:
        os.close(device)


_FUSE_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header: len, opcode, unique, nodeid, ...
_FUSE_OUT = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
# The requests opening and locking ``lock`` brings (linux/fuse.h); others are answered ENOSYS.
_LOOKUP, _GETATTR, _OPEN, _RELEASE, _FLUSH, _INIT, _SETLK, _SETLKW = 1, 3, 14, 18, 25, 26, 32, 33
_UNANSWERED = {2, 42}  # FORGET, BATCH_FORGET
_FLOCK_LOCKS = 1 << 10  # flock goes to the filesystem, not the kernel's own locks


def _fuse_attr(node: int) -> bytes:
    """fuse_attr of the root directory (node 1) or the lock file (node 2), both empty."""
    mode = 0o040755 if node == 1 else 0o100644
    return struct.pack("<6Q10I", node, 0, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def _fuse_answer(request: bytes, opcode: int, node: int) -> tuple[int, bytes]:
    """The error (negative errno, or 0) and the body answering one request."""
    if opcode == _INIT:  # protocol 7.31, max_write 128 KiB
        return 0, struct.pack("<4I2H2I", 7, 31, 0, _FLOCK_LOCKS, 16, 12, 1 << 17, 1).ljust(
            64, b"\0"
        )
    if opcode == _GETATTR:
        return 0, struct.pack("<Q2I", 0, 0, 0) + _fuse_attr(node)
    if opcode == _LOOKUP and request[_FUSE_IN.size :].startswith(b"lock\0"):
        return 0, struct.pack("<4Q2I", 2, 0, 0, 0, 0, 0) + _fuse_attr(2)
    if opcode == _LOOKUP:
        return -errno.ENOENT, b""
    if opcode == _OPEN:
        return 0, struct.pack("<QIi", 1, 0, 0)
    if opcode in (_SETLK, _SETLKW):
        return -errno.ENOLCK, b""
    return (0 if opcode in (_FLUSH, _RELEASE) else -errno.ENOSYS), b""


def _serve_fuse(device: int) -> None:
    """Answer the kernel until it unmounts."""
    while True:
        try:
            request = os.read(device, (1 << 20) + 8192)
        except OSError:  # ENODEV: unmounted
            return
        _, opcode, unique, node, *_ = _FUSE_IN.unpack_from(request)
        if opcode in _UNANSWERED:
            continue
        error, body = _fuse_answer(request, opcode, node)
        with suppress(OSError):  # a request interrupted meanwhile: the next one still comes
            os.write(device, _FUSE_OUT.pack(_FUSE_OUT.size + len(body), error, unique) + body)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs."""
    with mounted(tmp_path / "disk", "tmpfs", "size=8m") as point:
        yield point


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """About 12.5 MB: per checkpoint and rank one 3 MiB file and six 20 kB files."""
    catalog = job_catalog(checkpoints=2, large_size=3 << 20, small_files=6, small_size=20_000)
    with ServerThread(catalog) as running:
        yield running


def mirrored_whole(server: ServerThread, disk: Path) -> Path:
    """``disk`` grown to hold it all, and the whole job mirrored there; the mirror's path."""
    remount(disk, "size=32m")
    dest = disk / "mirror"
    assert run_cli(*sync_args(server, dest)).code == 0
    return dest


def published(server: ServerThread, dest: Path) -> list[Path]:
    """Final paths present, each checked to be the whole, exact file."""
    found = []
    for file in server.files():
        path = mirrored(dest, JOB, file)
        if path.exists():
            assert_exact(path, file)
            found.append(path)
    return found


def test_a_full_disk_stops_with_the_path_and_the_space_needed_and_the_rerun_resumes(
    server: ServerThread, disk: Path
) -> None:
    dest = disk / "mirror"
    total = sum(f.size for f in server.files())

    full = run_cli(*sync_args(server, dest))

    assert full.code == 6
    assert full.stderr.count("\n") == 1
    assert "not enough space for " + str(dest / JOB) in full.stderr
    assert "it needs 3.0 MiB" in full.stderr
    assert "(keeping 4.0 MiB for the manifest)" in full.stderr
    kept = published(server, dest)
    assert kept  # what fitted was published ...
    assert_records_true(dest)  # ... and recorded: the manifest could still be written
    assert f"fetched {len(kept)} files" in full.stdout  # and the summary says so
    assert len(kept) == len(
        [p for p in (dest / JOB).rglob("*") if p.is_file()]
    )  # nothing half-written at a final path

    remount(disk, "size=32m")  # the operator frees space
    again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["skipped"] == len(kept)
    assert len(published(server, dest)) == len(server.files())
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())
    # What was published is not fetched again; at most the parts cut short by the stop are.
    assert server.traffic.object_bytes_sent <= total + 4 * (256 << 10)


def test_parts_kept_from_an_earlier_run_count_as_resumed_only_once_the_rest_fits(
    server: ServerThread, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each 3 MiB file is left with its first MiB; then there is room for one more MiB only.
    remount(disk, "size=32m")
    dest = disk / "mirror"
    leave_in_parts(server, monkeypatch, sync_args(server, dest), from_byte=1 << 20)
    fill(disk, leaving=SPACE_RESERVE + (1 << 20))

    full = run_cli(*sync_args(server, dest, "--json"))

    assert full.code == 6, full.stderr
    assert "it needs 2.0 MiB" in full.stderr
    summary = json.loads(full.stdout)
    # It counted each large file resumed (its MiB kept) before refusing it for want of space.
    assert (summary["files"]["resumed"], summary["bytes"]["resumed"]) == (0, 0)

    (disk / "filler").unlink()
    again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0, again.stderr
    summary = json.loads(again.stdout)
    large = [f for f in server.files() if f.size > 1 << 20]
    assert summary["files"]["resumed"] == len(large)  # the parts were kept for this run
    assert summary["bytes"]["resumed"] == len(large) << 20
    assert len(published(server, dest)) == len(server.files())


def test_a_long_path_that_does_not_fit_is_quoted_by_its_start_and_end(
    server: ServerThread, disk: Path
) -> None:
    dest = disk / ("d" * 120) / ("e" * 120) / "mirror"  # its files' paths: past 280 characters

    result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 6
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"checkpoint-sync: error: not enough space for {str(dest)[:60]}...")
    assert f"is free on {str(dest)[:60]}...{str(dest)[-60:]}" in line
    assert len(line) < 450  # its two paths whole made it about 730
    summary = json.loads(result.stdout)
    assert summary["error"] in line
    assert summary["dest"] == str(dest)  # whole where the document names it


def test_files_in_flight_count_against_free_space_before_they_land(disk: Path) -> None:
    """tmpfs staging files are sparse (reserving them would zero-fill memory), so the space two
    files will take only shows as used once they are fetched: each must count it before."""
    assert not preallocation_pays(str(disk))
    catalog = job_catalog(checkpoints=1, large_size=3 << 20, small_files=0)
    # Both ranks' 3 MiB files go out together and stay in flight a while; only one fits.
    with ServerThread(catalog, Faults(throttle=8 << 20)) as server:
        result = run_cli(*sync_args(server, disk / "mirror", "--json"))

        assert result.code == 6
        assert result.stderr.count("\n") == 1
        assert "not enough space for " in result.stderr
        summary = json.loads(result.stdout)
        assert summary["exit_code"] == 6
        assert summary["error"] in result.stderr  # the reason, for scripts too
        assert "it needs 3.0 MiB" in result.stderr
        assert "of it to files being fetched" in result.stderr
        assert len(published(server, disk / "mirror")) == 1  # the one in flight landed


def test_files_in_flight_when_the_disk_fills_still_land_and_the_rerun_fetches_the_rest(
    disk: Path,
) -> None:
    """Four 1.5 MiB files go out together onto about 3.9 MiB: two fit. The others are refused,
    and the run stops with exit 6, but only once the two in flight have landed; otherwise every
    rerun would start them again and throw them away again."""
    catalog = job_catalog(checkpoints=1, large_files=2, large_size=3 << 19, small_files=0)
    with ServerThread(catalog, Faults(throttle=4 << 20)) as server:
        full = run_cli(*sync_args(server, disk / "mirror"))

        assert full.code == 6
        assert "not enough space for " in full.stderr
        assert len(published(server, disk / "mirror")) == 2
        assert_records_true(disk / "mirror")

        remount(disk, "size=32m")
        again = run_cli(*sync_args(server, disk / "mirror", "--json"))

        assert again.code == 0, again.stderr
        assert json.loads(again.stdout)["files"] == {
            "listed": 4,
            "to_fetch": 2,
            "fetched": 2,
            "skipped": 2,
            "failed": 0,
            "to_check": 0,
            "checked": 0,
            "damaged": 0,
            "to_delete": 0,
            "deleted": 0,
            "resumed": 0,
        }


def test_bytes_that_landed_are_not_counted_twice_against_free_space(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in flight counts only what it has still to write: what landed, the disk shows.

    The first file listed stalls in its last part; the second is listed a page later, while it
    stalls. Both fit (about 7.9 MiB is free past the reserve for 7 MiB); counting the first
    file's landed bytes twice would leave about 1 MiB and refuse the second.
    """
    remount(disk, "size=12m")
    size = 7 << 19  # 3.5 MiB: 14 parts
    last_part = size - (256 << 10)
    stalled: list[int] = []

    def stall_once(name: str, start: int, end: int) -> str | None:
        if start != last_part or stalled:
            return None
        stalled.append(start)
        return "stall"

    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "1")
    faults = Faults(api_delay=0.3, stall_seconds=1.5, hook=stall_once)
    with ServerThread(job_catalog(checkpoints=1, large_size=size, small_files=0), faults) as server:
        result = run_cli(*sync_args(server, disk / "mirror"))

        assert stalled
        assert result.code == 0, result.stderr
        assert len(published(server, disk / "mirror")) == 2


def test_a_filesystem_that_reports_no_capacity_is_written_to(
    server: ServerThread, tmp_path: Path
) -> None:
    """ramfs (like some FUSE mounts) reports 0 blocks, free or total: that is no full disk."""
    with mounted(tmp_path / "ramfs", "ramfs", "mode=0755") as point:
        result = run_cli(*sync_args(server, point / "mirror"))

        assert result.code == 0, result.stderr
        assert len(published(server, point / "mirror")) == len(server.files())


def test_a_dry_run_leaves_the_mirror_untouched_and_works_on_a_read_only_one(
    server: ServerThread, disk: Path
) -> None:
    dest = mirrored_whole(server, disk)
    state = sorted(p.name for p in (dest / ".checkpoint-sync").iterdir())

    planned = run_cli(*sync_args(server, dest, "--dry-run"))

    assert planned.code == 0, planned.stderr
    assert sorted(p.name for p in (dest / ".checkpoint-sync").iterdir()) == state
    remount(disk, "ro")
    read_only = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
    assert read_only.code == 0, read_only.stderr
    assert json.loads(read_only.stdout)["files"] == {
        "listed": len(server.files()),
        "to_fetch": 0,
        "fetched": 0,
        "skipped": len(server.files()),
        "failed": 0,
        "to_check": 0,
        "checked": 0,
        "damaged": 0,
        "to_delete": 0,
        "deleted": 0,
        "resumed": 0,
    }


def records_in_the_wal_only(manifest: Path) -> None:
    """Leave every record of ``manifest`` in a WAL beside it, and no -shm: as a copy of a mirror
    made while a sync held it open, without the -shm (the database file alone holds none)."""
    db = sqlite3.connect(manifest, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TEMP TABLE kept AS SELECT * FROM files")
    db.execute("DELETE FROM files")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("INSERT INTO files SELECT * FROM kept")
    database, wal = manifest.read_bytes(), Path(f"{manifest}-wal").read_bytes()
    db.close()  # which writes the WAL back and removes it, and the -shm
    manifest.write_bytes(database)
    Path(f"{manifest}-wal").write_bytes(wal)


@pytest.mark.parametrize("mount", ["ro", "rw"])
@pytest.mark.parametrize("command", ["dry-run", "list"])
def test_a_manifest_copied_with_its_wal_and_without_its_shm_is_read_whole_creating_nothing(
    server: ServerThread, disk: Path, command: str, mount: str
) -> None:
    # SQLite said only "unable to open database file" on a read-only mount; on another, it made
    # a -shm file in the mirror. Immutable, it would leave the WAL's records out.
    dest = mirrored_whole(server, disk)
    state = dest / ".checkpoint-sync"
    records_in_the_wal_only(state / "manifest.sqlite3")
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    remount(disk, mount)

    if command == "list":
        result = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        assert result.code == 0, result.stderr
        assert {c["local"] for c in json.loads(result.stdout)["checkpoints"]} == {"mirrored"}
    else:
        result = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
        assert result.code == 0, result.stderr
        files = json.loads(result.stdout)["files"]
        assert (files["to_fetch"], files["skipped"]) == (0, len(server.files()))
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("below", ["", "mirror"])
def test_a_dry_run_into_a_file_exits_6_as_the_real_run_would(
    server: ServerThread, tmp_path: Path, below: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    dest = a_file / below if below else a_file

    dry = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
    real = run_cli(*sync_args(server, dest))

    assert (dry.code, real.code) == (6, 6)
    assert f"cannot mirror into {dest}: {a_file} is not a directory" in dry.stderr
    assert json.loads(dry.stdout)["exit_code"] == 6
    assert a_file.read_text() == "not a directory\n"


@pytest.mark.parametrize("below", ["", "mirror"])
def test_a_dry_run_into_a_dangling_symlink_exits_6_as_the_real_run_would(
    server: ServerThread, tmp_path: Path, below: str
) -> None:
    # A mount point's symlink while its volume is away, say: the real run cannot create DEST.
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "unmounted")
    dest = link / below if below else link

    dry = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
    real = run_cli(*sync_args(server, dest))

    # The dry run planned every file as if into an empty mirror, exit 0.
    assert (dry.code, real.code) == (6, 6), dry.stderr
    assert f"cannot mirror into {dest}: {link} is not a directory" in dry.stderr
    assert not (tmp_path / "unmounted").exists()


def test_a_read_only_destination_exits_6_and_the_mirror_stays_as_it_was(
    server: ServerThread, disk: Path
) -> None:
    dest = mirrored_whole(server, disk)
    changed = server.files()[0]
    server.call(lambda: new_version(changed))
    remount(disk, "ro")

    result = run_cli(*sync_args(server, dest))

    assert result.code == 6
    assert result.stderr.count("\n") == 1
    assert "Read-only file system" in result.stderr
    assert str(dest) in result.stderr
    untouched = [f for f in server.files() if f is not changed]
    for file in untouched:
        assert_exact(mirrored(dest, JOB, file), file)

    remount(disk, "rw")
    assert_records_true(dest)  # (SQLite cannot open a WAL database on a read-only mount)
    again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["fetched"] == 1
    assert_exact(mirrored(dest, JOB, changed), changed)


@contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """``chattr +i``: nothing can be created, renamed or removed in it, by root neither."""
    try:
        subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make {directory} immutable here ({exc})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)


def test_a_directory_of_the_mirror_that_refuses_writes_fails_its_files_not_the_run(
    server: ServerThread, disk: Path
) -> None:
    dest = mirrored_whole(server, disk)
    locked, free = (
        next(f for f in server.files() if f.node_rank == rank and f.size < 1 << 20)
        for rank in (0, 1)
    )
    server.call(lambda: new_version(locked, free))

    with immutable(mirrored(dest, JOB, locked).parent):
        result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == 1, result.stderr  # that file failed; the run went on
    summary = json.loads(result.stdout)
    assert (summary["files"]["fetched"], summary["files"]["failed"]) == (1, 1)
    assert "Operation not permitted" in summary["failures"][0]["error"]
    assert_exact(mirrored(dest, JOB, free), free)
    assert_records_true(dest)


def test_a_destination_that_refuses_writes_stops_the_run(server: ServerThread, disk: Path) -> None:
    dest = mirrored_whole(server, disk)
    shutil.rmtree(dest / JOB)  # so that its run directory must be made again

    with immutable(dest):
        result = run_cli(*sync_args(server, dest))

    assert result.code == 6  # every file would fail the same way
    assert result.stderr.count("\n") == 1
    assert "Operation not permitted" in result.stderr


def test_a_staging_area_that_cannot_be_made_stops_the_run(server: ServerThread, dest: Path) -> None:
    # Every file is fetched into it: this is the mirror refusing writes, not one file failing.
    assert run_cli(*sync_args(server, dest)).code == 0
    staging = dest / ".checkpoint-sync" / "staging"
    staging.rmdir()
    staging.write_text("a file of someone else's\n")
    changed = server.files()[0]
    server.call(lambda: new_version(changed))
    requests = server.traffic.object_requests
    result = run_cli(*sync_args(server, dest, "--json"))
    assert result.code == 6, result.stderr
    assert result.stderr == f"checkpoint-sync: error: cannot create {staging}: Not a directory\n"
    assert json.loads(result.stdout)["exit_code"] == 6
    assert server.traffic.object_requests == requests  # nothing fetched to be thrown away
    assert staging.read_text() == "a file of someone else's\n"
    assert_records_true(dest)


def test_a_staging_area_on_another_filesystem_stops_the_run_before_any_fetch(
    server: ServerThread, dest: Path, tmp_path: Path
) -> None:
    # A file is published by a rename, which cannot cross filesystems: each file failed with
    # "Invalid cross-device link" after it was fetched, on every run.
    with mounted(tmp_path / "disk", "tmpfs", "size=32m") as elsewhere:
        staging = dest / ".checkpoint-sync" / "staging"
        staging.parent.mkdir(parents=True)
        staging.symlink_to(elsewhere)

        result = run_cli(*sync_args(server, dest))

        assert result.code == 6, result.stderr
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(
            f"checkpoint-sync: error: cannot stage files in {staging}: it is on another "
            f"mount (tmpfs at {elsewhere}) than the destination ("
        )
        assert "a file is published by a rename, which cannot cross mounts" in result.stderr
        assert server.traffic.object_requests == 0
        assert list(elsewhere.iterdir()) == []
    assert staging.is_symlink()


@pytest.mark.parametrize(
    "in_its_place",
    [
        "a-file-for-staging",
        "a-file-for-state",
        "elsewhere",
        # A symlink leading nowhere (a volume that is away): the run cannot make it either.
        "a-dangling-symlink-for-state",
        "a-dangling-symlink-for-staging",
    ],
)
def test_a_dry_run_stops_where_the_staging_area_would_stop_the_run(
    server: ServerThread, dest: Path, tmp_path: Path, in_its_place: str
) -> None:
    # The dry run planned every file, exit 0, where the run stopped at its start.
    state = dest / ".checkpoint-sync"
    staging = state / "staging"
    with mounted(tmp_path / "disk", "tmpfs", "size=1m") as elsewhere:
        if in_its_place.endswith("-for-state"):
            dest.mkdir()
        else:
            state.mkdir(parents=True)
        in_place = state if in_its_place.endswith("-for-state") else staging
        if in_its_place == "elsewhere":
            staging.symlink_to(elsewhere)
        elif in_its_place.startswith("a-dangling-symlink"):
            in_place.symlink_to(tmp_path / "away")
        else:
            in_place.write_text("a file of someone else's\n")
        before = sorted(str(p) for p in tmp_path.rglob("*"))

        dry = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
        real = run_cli(*sync_args(server, dest))

    assert (dry.code, real.code) == (6, 6), dry.stderr
    assert dry.stderr == real.stderr
    assert dry.stderr.count("\n") == 1
    assert json.loads(dry.stdout)["exit_code"] == 6
    assert server.traffic.object_requests == 0


@contextmanager
def bind_mounted(directory: Path, point: Path) -> Iterator[None]:
    """``directory`` mounted at ``point`` too; the test is skipped where mounting fails."""
    try:
        subprocess.run(
            ["mount", "--bind", str(directory), str(point)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here ({exc})")
    try:
        yield
    finally:
        subprocess.run(["umount", str(point)], check=False)


def test_a_staging_area_bind_mounted_from_dests_own_filesystem_stops_the_run_before_any_fetch(
    server: ServerThread, dest: Path, tmp_path: Path
) -> None:
    # The same device (st_dev) as DEST, yet another mount: every rename out of it failed with
    # "Invalid cross-device link", file after file, each after it was fetched.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = dest / ".checkpoint-sync"
    staging = state / "staging"
    staging.mkdir(parents=True)
    assert os.stat(elsewhere).st_dev == os.stat(dest).st_dev
    with bind_mounted(elsewhere, staging):
        result = run_cli(*sync_args(server, dest))

    assert result.code == 6, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"checkpoint-sync: error: cannot stage files in {staging}: it is on another mount ("
    )
    assert f" at {staging}) than the destination (" in result.stderr
    assert "a file is published by a rename, which cannot cross mounts" in result.stderr
    assert server.traffic.object_requests == 0
    assert list(elsewhere.iterdir()) == []  # nothing of the check is left behind
    assert sorted(p.name for p in state.iterdir()) == ["lock", "staging"]


# Locked with room to spare on its disk, and with a little more than the manifest's reserve:
# neither is the disk's fault, and no space left is noted.
@pytest.mark.parametrize("room", [None, 6 << 20], ids=["roomy", "6-MiB-free"])
def test_a_manifest_locked_by_another_program_exits_6_naming_it(
    server: ServerThread, dest: Path, request: pytest.FixtureRequest, room: int | None
) -> None:
    if room is None:
        assert run_cli(*sync_args(server, dest)).code == 0
    else:
        dest = mirrored_whole(server, request.getfixturevalue("disk"))
        fill(dest.parent, leaving=room)
    changed = next(f for f in server.files() if f.size < 1 << 20)
    server.call(lambda: setattr(changed, "last_modified", "2026-12-01T00:00:00+00:00"))
    other = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # say, someone editing it with the sqlite3 shell
    try:
        result = run_cli(*sync_args(server, dest))
    finally:
        other.close()

    assert result.code == 6
    assert result.stderr.count("\n") == 1
    assert "cannot use the manifest" in result.stderr
    assert result.stderr.endswith(": database is locked\n"), result.stderr

    again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["fetched"] == 1
    assert_exact(mirrored(dest, JOB, changed), changed)


def test_a_filesystem_that_refuses_locks_exits_6_naming_the_lock(
    server: ServerThread, dest: Path
) -> None:
    # flock's ENOLCK (some NFS and FUSE mounts) escaped as an internal error.
    dest.mkdir()
    with refusing_flock(dest / ".checkpoint-sync") as state:
        result = run_cli(*sync_args(server, dest))

    assert result.code == 6
    assert (
        result.stderr
        == f"checkpoint-sync: error: cannot lock {state / 'lock'}: No locks available\n"
    )
    assert server.traffic.object_requests == 0


def test_a_parent_of_dest_that_cannot_be_synced_is_named_not_the_lock(
    server: ServerThread, tmp_path: Path
) -> None:
    # --fsync syncs the parent of each directory it makes. One that can be written to but not
    # read (write and search only): as root, only without the capabilities that override modes.
    parent = tmp_path / "write-only"
    parent.mkdir()
    parent.chmod(0o333)
    dest = parent / "mirror"
    run = run_without_dac_override(*sync_args(server, dest, "--fsync"))

    assert run.returncode == 6
    assert run.stderr.decode() == (
        f"checkpoint-sync: error: cannot sync {parent} to make the new {dest} durable: "
        "Permission denied\n"
    )
    assert (dest / ".checkpoint-sync").is_dir()  # made: only the sync failed


@pytest.mark.parametrize("command", ["dry-run", "list"])
def test_a_mirror_that_cannot_be_entered_is_not_read_and_not_said_to_be_created(
    server: ServerThread, tmp_path: Path, command: str
) -> None:
    # Another user's mirror (mode 700): a dry run and `list --dest` create nothing, yet said
    # "cannot create DEST/.checkpoint-sync".
    dest = tmp_path / "mirror"
    dest.mkdir(mode=0o000)
    args = (
        sync_args(server, dest, "--dry-run")
        if command == "dry-run"
        else job_args(server, "list", "--dest", dest)
    )

    run = run_without_dac_override(*args)

    assert run.returncode == 6
    assert run.stderr.decode() == (
        f"checkpoint-sync: error: cannot read {dest / '.checkpoint-sync'}: Permission denied\n"
    )


@pytest.mark.parametrize("command", ["sync", "dry-run", "list"])
@pytest.mark.parametrize(
    ("in_its_place", "reason"),
    [
        # SQLite said "unable to open database file" (sync) or "disk I/O error" (read only).
        ("a-directory", "it is a directory"),
        # A manifest kept on a volume that is away: sync said "unable to open database file",
        # and where the directory it leads into was there, made a new manifest in it, fetching
        # every file again; --dry-run and list took it for a new one.
        *(
            (
                kind,
                "it is a symlink to {target}, which is not there; restore what it leads to, or "
                "remove the symlink to start a new manifest (every file is then fetched again)",
            )
            for kind in ("a-dangling-symlink", "a-dangling-symlink-into-a-directory")
        ),
        # Not "not there": removing the symlink would fetch every file again.
        (
            "a-symlink-loop",
            "it is a symlink to {target}, which cannot be reached: Too many levels of symbolic "
            "links",
        ),
    ],
    ids=[
        "a-directory",
        "a-dangling-symlink",
        "a-dangling-symlink-into-a-directory",
        "a-symlink-loop",
    ],
)
def test_what_is_no_manifest_in_its_place_is_named_not_sqlites_bare_error(
    server: ServerThread, dest: Path, tmp_path: Path, command: str, in_its_place: str, reason: str
) -> None:
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    target = tmp_path / "away" / "manifest.sqlite3"
    if in_its_place == "a-directory":
        manifest.mkdir(parents=True)
    else:
        manifest.parent.mkdir(parents=True)
        manifest.symlink_to(target)
        if in_its_place.endswith("into-a-directory"):
            target.parent.mkdir()
        elif in_its_place == "a-symlink-loop":
            target.parent.mkdir()
            target.symlink_to(manifest)
    args = (
        job_args(server, "list", "--dest", dest)
        if command == "list"
        else sync_args(server, dest, *(["--dry-run"] if command == "dry-run" else []))
    )

    result = run_cli(*args)

    assert result.code == 6
    assert result.stderr == (
        f"checkpoint-sync: error: cannot use the manifest {manifest}: "
        f"{reason.format(target=target)}\n"
    )
    assert server.traffic.object_requests == 0
    assert not target.exists()


def test_an_immutable_state_directory_is_named_not_sqlites_bare_error(
    server: ServerThread, dest: Path
) -> None:
    # Where SQLite cannot make the manifest's -wal and -shm files it said only "unable to open
    # database file".
    assert run_cli(*sync_args(server, dest)).code == 0
    state = dest / ".checkpoint-sync"
    with immutable(state):
        result = run_cli(*sync_args(server, dest))

    assert result.code == 6
    assert result.stderr == (
        f"checkpoint-sync: error: cannot use the manifest {state / 'manifest.sqlite3'}: "
        f"{state}, where SQLite makes its -wal and -shm files, cannot be written: "
        "Operation not permitted (an immutable directory? see lsattr -d)\n"
    )
    assert sorted(p.name for p in state.iterdir()) == ["lock", "manifest.sqlite3", "staging"]


def fill(disk: Path, leaving: int = 0) -> None:
    """Fill ``disk`` with another program's file, but for ``leaving`` bytes."""
    filler = disk / "filler"
    with suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(bytes(1 << 20))  # until the disk is full
    os.truncate(filler, max(filler.stat().st_size - leaving, 0))


def test_a_first_run_onto_a_full_disk_is_exit_6_not_an_internal_error(
    server: ServerThread, tmp_path: Path
) -> None:
    with mounted(tmp_path / "disk", "tmpfs", "size=8m") as full:
        fill(full)

        result = run_cli(*sync_args(server, full / "mirror"))

    assert result.code == 6, result.stderr
    assert "is full" in result.stderr
    assert "move it aside" not in result.stderr  # the manifest is fine: the disk is not


def test_a_damaged_manifest_is_exit_6_with_the_way_out(server: ServerThread, dest: Path) -> None:
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"not a database, whatever it once was" * 200)

    result = run_cli(*sync_args(server, dest))

    assert result.code == 6, result.stderr
    assert "move it aside to rebuild it" in result.stderr


@pytest.mark.parametrize(
    ("version", "command"), [(0, "sync"), (1, "sync"), (1, "list")], ids=["new", "v1", "list"]
)
def test_a_manifest_of_another_programs_schema_is_exit_6_with_the_way_out(
    server: ServerThread, dest: Path, version: int, command: str
) -> None:
    # Another SQLite database in its place (its own `files` table): no table or column we read
    # is there, so it cannot be used, as a damaged one cannot.
    assert run_cli(*sync_args(server, dest)).code == 0
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    manifest.unlink()
    db = sqlite3.connect(manifest)
    db.execute("CREATE TABLE files (name TEXT, owner TEXT)")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    if command == "list":
        result = run_cli(*job_args(server, "list", "--dest", dest))
    else:
        result = run_cli(*sync_args(server, dest))
    assert result.code == 6, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"manifest {manifest} cannot be used (another program's database: its table files " in (
        result.stderr
    )
    assert "move it aside to rebuild it" in result.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    ("names", "foreign"),
    [
        ([], []),
        (["files", "sqlite_autoindex_files_1", "files_by_checkpoint"], []),  # a run killed
        (sorted(OUR_NAMES), []),
        (["sqlite_sequence", "sqlite_stat1"], []),  # SQLite's own
        (["notes"], ["notes"]),
        (["files", "notes", "by_owner"], ["by_owner", "notes"]),
    ],
)
def test_foreign_names(names: list[str], foreign: list[str]) -> None:
    assert foreign_names(names) == foreign


@pytest.mark.parametrize("command", ["sync", "dry-run", "list"])
@pytest.mark.parametrize(
    ("schema", "version", "reason"),
    [
        pytest.param(
            "CREATE TABLE notes (text TEXT)",
            0,
            "another program's database: it holds notes",
            id="v0",
        ),
        # A table of ours in another shape: not one a run killed while it made the schema left.
        pytest.param(
            "CREATE TABLE files (text TEXT)",
            0,
            "another program's database: its table files has no column path",
            id="a-table-of-ours",
        ),
        # Many programs number their first schema 1, as we do.
        pytest.param(
            "CREATE TABLE files (name TEXT, owner TEXT)",
            1,
            "another program's database: its table files has no column path",
            id="v1",
        ),
        pytest.param(
            "CREATE TABLE notes (text TEXT)",
            1,
            "another program's database: it has no table files",
            id="v1-none-of-ours",
        ),
        # No release gives a manifest a negative one (sync made its tables in it, and the others
        # said "no such table").
        pytest.param(
            "CREATE TABLE notes (text TEXT)",
            -1,
            "another program's database: it has schema version -1",
            id="negative",
        ),
    ],
)
def test_another_programs_database_is_left_as_it_is(
    server: ServerThread, dest: Path, schema: str, version: int, reason: str, command: str
) -> None:
    # Not taken for a manifest: our tables were made in it (at schema version 0), or its journal
    # mode set to WAL (at 1), before a run failed (or none did).
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    manifest.parent.mkdir(parents=True)
    db = sqlite3.connect(manifest)
    db.execute(schema)
    db.execute(f"INSERT INTO {schema.split()[2]} DEFAULT VALUES")  # a row of theirs
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    before = manifest.read_bytes()

    if command == "list":
        result = run_cli(*job_args(server, "list", "--dest", dest))
    else:
        result = run_cli(*sync_args(server, dest, *(["--dry-run"] if command == "dry-run" else [])))

    assert result.code == 6, result.stderr
    assert result.stderr == (
        f"checkpoint-sync: error: manifest {manifest} cannot be used ({reason}); move it aside "
        "to rebuild it (every file is then fetched again)\n"
    )
    assert manifest.read_bytes() == before
    assert not manifest.with_name("manifest.sqlite3-wal").exists()
    db = sqlite3.connect(manifest)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()
    assert server.traffic.object_requests == 0


@pytest.mark.parametrize("made", ["empty-file", "empty-database", "killed-while-made"])
def test_a_database_of_no_other_program_without_a_schema_version_is_a_new_manifest(
    server: ServerThread, dest: Path, made: str
) -> None:
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    if made == "killed-while-made":
        # What a run killed while it made the schema table by table left (before it was made
        # in one transaction): some of our tables, and no schema version.
        Manifest(manifest).close()
        db = sqlite3.connect(manifest)
        for table in ("parts_reached", "staging_etags", "parts", "staging"):
            db.execute(f"DROP TABLE {table}")
        db.execute("PRAGMA user_version = 0")
        db.close()
    else:
        manifest.parent.mkdir(parents=True)
        manifest.touch()
        if made == "empty-database":
            sqlite3.connect(manifest).execute("VACUUM").connection.close()
            assert manifest.stat().st_size > 0

    assert run_cli(*job_args(server, "list", "--dest", dest)).code == 0
    dry = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
    assert dry.code == 0, dry.stderr
    assert json.loads(dry.stdout)["files"]["to_fetch"] == len(server.files())
    assert run_cli(*sync_args(server, dest)).code == 0

    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    fetched = server.traffic.object_requests
    assert run_cli(*sync_args(server, dest)).code == 0
    assert server.traffic.object_requests == fetched  # all recorded in it


def test_a_manifest_with_a_table_a_later_release_made_in_place_is_still_used(
    server: ServerThread, dest: Path
) -> None:
    # As this release made its ETags' and parts' progress tables in a first release's manifest,
    # without a new schema version: a table no manifest of this release makes is no sign of
    # another program's database there.
    assert run_cli(*sync_args(server, dest)).code == 0
    db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
    db.execute("CREATE TABLE later_release (path TEXT)")
    db.commit()
    db.close()
    fetched = server.traffic.object_requests

    assert run_cli(*job_args(server, "list", "--dest", dest)).code == 0
    assert run_cli(*sync_args(server, dest, "--dry-run")).code == 0
    assert run_cli(*sync_args(server, dest)).code == 0
    assert server.traffic.object_requests == fetched  # every file skipped as recorded


@pytest.mark.parametrize("command", ["sync", "dry-run", "list"])
@pytest.mark.parametrize(
    ("made_by", "said"),
    [
        # A mirror a newer checkpoint-sync kept, synced by an older one: that one cannot tell
        # what the newer tables mean, so it writes nothing rather than guess. Nor can it tell
        # that a newer release wrote it: its tables' names are all it has to go by.
        (
            "a-newer-release",
            "has schema version 999, newer than this checkpoint-sync's (1): a newer "
            "checkpoint-sync made it (or another program did); run that one, or move it aside "
            "to rebuild it (every file is then fetched again)",
        ),
        # Not one table a manifest has: not a newer release's.
        (
            "another-program",
            "cannot be used (another program's database: it holds notes, at schema version "
            "999); move it aside to rebuild it (every file is then fetched again)",
        ),
    ],
)
def test_a_database_of_a_newer_schema_is_exit_6_and_left_as_it_is(
    server: ServerThread, dest: Path, command: str, made_by: str, said: str
) -> None:
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    if made_by == "a-newer-release":
        assert run_cli(*sync_args(server, dest)).code == 0
    else:
        manifest.parent.mkdir(parents=True)
    db = sqlite3.connect(manifest)
    if made_by == "another-program":
        db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("PRAGMA user_version = 999")
    db.commit()
    db.close()
    before = manifest.read_bytes()

    if command == "list":
        result = run_cli(*job_args(server, "list", "--dest", dest))
    else:
        result = run_cli(*sync_args(server, dest, *(["--dry-run"] if command == "dry-run" else [])))

    assert result.code == 6, result.stderr
    assert result.stderr == f"checkpoint-sync: error: manifest {manifest} {said}\n"
    assert manifest.read_bytes() == before


@pytest.mark.parametrize(
    "flags",
    [[], ["--dry-run"], ["--verify"], ["--delete"], ["list"]],
    ids=["sync", "dry-run", "verify", "delete", "list"],
)
def test_a_manifest_damaged_past_its_first_page_is_exit_6_with_the_way_out(
    server: ServerThread, dest: Path, flags: list[str]
) -> None:
    # Random bytes on its second and third pages (tables'): opening it reads only the first,
    # whose schema is intact, so the damage shows when a table is read or written, mid-run.
    assert run_cli(*sync_args(server, dest)).code == 0
    manifest = dest / ".checkpoint-sync" / "manifest.sqlite3"
    with manifest.open("r+b") as damaged:
        damaged.seek(4096)
        damaged.write(random.Random(5).randbytes(8192))

    if flags == ["list"]:
        result = run_cli(*job_args(server, "list", "--dest", dest))
    else:
        result = run_cli(*sync_args(server, dest, *flags))

    assert result.code == 6, result.stderr
    assert "internal error" not in result.stderr
    assert "move it aside to rebuild it" in result.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


def test_a_manifest_read_left_unfinished_is_quiet_once_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `list --dest` leaves one when a mirrored file cannot be looked up: the rows' reader
    # goes, the manifest is closed, and the reader is collected after.
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    manifest = Manifest(tmp_path / "manifest.sqlite3")
    for name in ("a", "b"):
        manifest.record_verified(VerifiedFile(f"r/c/0/{name}", "s", "r", "c", 0, 1, "t", "d"))
    rows = manifest.files_in("r", "c")
    next(rows)
    manifest.close()
    del rows
    gc.collect()

    assert unraisable == []


def test_a_manifest_read_while_a_sync_that_just_opened_it_writes_is_not_taken_for_damaged(
    tmp_path: Path,
) -> None:
    def record(manifest: Manifest, numbers: range) -> None:
        for n in numbers:
            checkpoint = f"c{n % 20}"
            path = f"r/{checkpoint}/0/{n:06d}-{'x' * 60}"
            manifest.record_verified(VerifiedFile(path, "s", "r", checkpoint, 0, n, "t", "d" * 64))

    def held(manifest: Manifest) -> int:
        return sum(len(list(manifest.files_in("r", f"c{c}"))) for c in range(20))

    path = tmp_path / "manifest.sqlite3"
    earlier = Manifest(path)
    record(earlier, range(1000))
    earlier.close()  # its WAL checkpointed and removed
    sync = Manifest(path)  # its WAL is empty until its first commit
    # `list --dest` or `--dry-run` meanwhile, which reads on while the sync commits, and writes
    # its WAL back into the database file as it closes.
    reader = Manifest(path, read_only=True)
    assert len(list(reader.files_in("r", "c0"))) == 50
    record(sync, range(1000, 6000))
    sync.close()

    assert held(reader) == 1000  # what was committed when it began reading, whole
    reader.close()
    assert held(Manifest(path, read_only=True)) == 6000


def record_checkpoint(manifest: Manifest, checkpoint: str) -> None:
    for n in range(2000):
        path = f"r/{checkpoint}/0/{n:05d}"
        manifest.record_verified(VerifiedFile(path, "s", "r", checkpoint, 0, n, "t", "d" * 64))


def test_a_query_that_meets_a_syncs_writes_is_asked_again_and_the_paths_listed_stay(
    tmp_path: Path,
) -> None:
    # Between two pages of a listing (no `catch_up`), a sync drops a checkpoint's records,
    # adds another's and writes them back as it closes: the pages the reader then reads from
    # the file no longer fit those it had read, and look damaged. SQLite rolls back its
    # transaction then, with the paths listed since the page began.
    path = tmp_path / "manifest.sqlite3"
    earlier = Manifest(path)
    for checkpoint in ("c10", "c20"):
        record_checkpoint(earlier, checkpoint)
    earlier.close()
    reader = Manifest(path, read_only=True)
    for n in range(0, 4000, 100):
        assert reader.recorded(f"r/c{10 + n // 2000 * 10}/0/{n % 2000:05d}") is not None
    sync = Manifest(path)
    for n in range(2000):
        sync.drop_record(f"r/c10/0/{n:05d}")
    record_checkpoint(sync, "c30")
    sync.close()

    listed = [f"r/c10/0/{n:05d}" for n in range(2000)]
    for listed_path in listed:
        assert reader.first_listing(listed_path, 1)
        reader.recorded(listed_path)

    assert reader.recorded(listed[-1]) is None  # read again: the sync dropped it
    assert reader.recorded("r/c30/0/01999") is not None
    assert [reader.first_listing(p, 1) for p in listed] == [None] * len(listed)
    reader.close()


def test_a_manifest_damaged_since_it_was_opened_is_still_said_damaged(tmp_path: Path) -> None:
    path = tmp_path / "manifest.sqlite3"
    earlier = Manifest(path)
    record_checkpoint(earlier, "c10")
    earlier.close()
    reader = Manifest(path, read_only=True)
    with path.open("r+b") as damaged:  # after it was opened: read again, it is still damaged
        damaged.seek(4096)
        damaged.write(random.Random(5).randbytes(8192))

    with pytest.raises(LocalIOError, match="move it aside to rebuild it"):
        reader.recorded("r/c10/0/01000")
    reader.close()


@pytest.mark.parametrize("writer", ["sync", "held-open"])
@pytest.mark.parametrize("command", ["list", "dry-run"])
def test_a_manifest_written_while_a_listing_is_compared_with_it_is_read_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, writer: str
) -> None:
    # `list --dest` and `--dry-run` take no lock, and read a manifest with no WAL beside it
    # immutable. A cron sync that starts on the mirror meanwhile writes its WAL back into the
    # database file as it closes (or once it holds 4 MiB): read on immutable, the manifest
    # looked damaged ("move it aside") or answered wrong (mirrored files to fetch).
    monkeypatch.setenv("CHECKPOINT_SYNC_PAGE_SIZE", "200")
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "60")  # a page waits for the writer
    dest = tmp_path / "mirror"
    state = dest / ".checkpoint-sync"
    # Pages of 200 entries: checkpoint-10's rank 0, its rank 1, checkpoint-20's rank 0, rank 1.
    catalog = job_catalog(checkpoints=2, large_files=0, small_files=200, small_size=10)
    # Made upstream since: its records go between theirs.
    made = ServedCheckpoint("checkpoint-15", catalog.jobs[0].checkpoints[0].created_at)
    stamp = made.created_at.isoformat()
    made.files = [
        ServedFile(0, f"checkpoint-15/state_{i:04d}.json", 10, stamp, 10_000 + i)
        for i in range(200)
    ]
    wrote: list[int] = []
    held: list[sqlite3.Connection] = []

    def write(offset: int) -> None:
        """Before page 2 is answered: once page 0 was compared, as page 2 is asked for only once
        page 1 is answered (tokens that count pages are not guessed ahead); page 1 holds only
        rank 1, which --node-rank 0 leaves out, so nothing is read while the manifest is
        written."""
        if offset != 400:
            return
        server.faults.on_page = None
        if writer == "sync":
            sync = run_subprocess(*job_args(upstream, "sync", "--dest", dest, "--quiet"))
            wrote.append(sync.wait(timeout=60))
            return
        # Another program, whose writes are written back while it still holds the manifest.
        db = sqlite3.connect(
            state / "manifest.sqlite3", isolation_level=None, check_same_thread=False
        )
        held.append(db)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO files VALUES (?, 's', ?, 'checkpoint-15', 0, 10, ?, 'd', ?)",
            [(f"{JOB}/checkpoint-15/0/{f.name}", JOB, stamp, stamp) for f in made.files],
        )
        db.execute("COMMIT")
        wrote.append(db.execute("PRAGMA wal_checkpoint").fetchone()[0])

    with (
        ServerThread(catalog, Faults(page_numbers=True)) as server,
        ServerThread(Catalog(API_KEY, [ServedJob(PROJECT, JOB, [made])])) as upstream,
    ):
        assert run_cli(*job_args(server, "sync", "--dest", dest)).code == 0
        server.faults.on_page = write
        if command == "list":
            result = run_cli(
                *job_args(server, "list", "--dest", dest, "--node-rank", "0", "--json")
            )
        else:
            result = run_cli(*sync_args(server, dest, "--node-rank", "0", "--dry-run", "--json"))
    for db in held:
        db.close()

    assert wrote == [0]
    assert result.code == 0, result.stderr
    if command == "list":
        local = [c["local"] for c in json.loads(result.stdout)["checkpoints"]]
        assert local == ["mirrored", "mirrored"]
    else:
        files = json.loads(result.stdout)["files"]
        assert (files["to_fetch"], files["skipped"]) == (0, 400)
    # The reader made nothing beside the manifest (the writer's WAL went as it closed).
    assert sorted(p.name for p in state.iterdir()) == ["lock", "manifest.sqlite3", "staging"]


def test_a_manifest_that_cannot_grow_stops_the_run_saying_the_disk_is_full(
    server: ServerThread, disk: Path
) -> None:
    dest = mirrored_whole(server, disk)
    damaged = [f for f in server.files() if f.size < 1 << 20][:4]
    for file in damaged:
        flip_byte(mirrored(dest, JOB, file), 0)
    # Room for SQLite's WAL index (32 KiB), not for the WAL to record the damaged files forgotten.
    fill(disk, leaving=36 << 10)

    result = run_cli(*sync_args(server, dest, "--verify"))

    assert result.code == 6
    assert result.stderr.count("\n") == 1
    # SQLite rolled its transaction back: the closing commit said "no transaction is active".
    assert "database or disk is full" in result.stderr, result.stderr
    for file in server.files():
        if file not in damaged:
            assert_exact(mirrored(dest, JOB, file), file)
    assert run_cli(*job_args(server, "list", "--dest", dest)).code == 0

    (disk / "filler").unlink()
    again = run_cli(*sync_args(server, dest, "--verify", "--json"))

    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["damaged"] == len(damaged)
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    assert_records_true(dest)


def test_a_run_on_a_disk_filled_since_says_so_and_the_mirror_stays(
    server: ServerThread, disk: Path
) -> None:
    dest = mirrored_whole(server, disk)
    changed = server.files()[0]
    server.call(lambda: new_version(changed))
    fill(disk)

    result = run_cli(*sync_args(server, dest))

    assert result.code == 6
    assert result.stderr.count("\n") == 1
    # Opening the manifest, SQLite says only "disk I/O error": its WAL index cannot grow.
    assert "cannot use the manifest" in result.stderr
    assert "(0 B is free on its disk)" in result.stderr, result.stderr
    for file in server.files():
        if file is not changed:
            assert_exact(mirrored(dest, JOB, file), file)
    # The failed opening left an empty WAL: the mirror can still be read, the disk still full.
    listed = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
    assert listed.code == 0, listed.stderr
    local = [c["local"] for c in json.loads(listed.stdout)["checkpoints"]]
    assert local == ["changed remotely", "mirrored"]
    planned = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
    assert planned.code == 0, planned.stderr
    assert json.loads(planned.stdout)["files"]["to_fetch"] == 1

    (disk / "filler").unlink()
    assert_records_true(dest)
    again = run_cli(*sync_args(server, dest, "--json"))

    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["files"]["fetched"] == 1
    assert_exact(mirrored(dest, JOB, changed), changed)
