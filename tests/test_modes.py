"""The modes of what a run makes in the mirror: ``0o666 & ~umask`` for a file, ``0o777 & ~umask``
for a directory, as ``cp`` and ``rclone`` make them, so that a group sharing a mirror (umask 002)
can each run on it.

Each run is a subprocess with its own umask: setting it here would change this whole process's.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpoint_sync.engine import manifest_path
from checkpoint_sync.layout import STATE_DIR
from checkpoint_sync.localserver import Faults

from .conftest import JOB, job_catalog, sync_args
from .support import ServerThread, assert_exact, mirrored, run_subprocess, run_without_dac_override
from .test_kill import wait_for

pytestmark = pytest.mark.slow

# Another member of the mirror's group: the files the first run made are given to this uid, and
# the second runs as root without the capabilities that override modes, so only the group's
# bits let it in.
OTHER_UID = 4321


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """Per rank a 2 MiB file that takes seconds (~1 MiB/s), so that a run can be killed with it
    in staging, small files already published and the manifest open."""
    catalog = job_catalog(checkpoints=1, large_size=(2 << 20) + 4321, small_size=20_000)
    with ServerThread(catalog, Faults(throttle=1 << 20)) as running:
        yield running


def killed_half_way(server: ServerThread, dest: Path, umask: int) -> None:
    """A sync of ``dest`` with ``umask``, killed once it left everything it makes there: files in
    staging and published, the manifest with its ``-wal`` and ``-shm``."""
    process = run_subprocess(*sync_args(server, dest), umask=umask)
    manifest = manifest_path(dest)
    staging = dest / STATE_DIR / "staging"

    def all_made() -> bool:
        published = dest.joinpath(JOB).exists() and any(
            p.is_file() for p in dest.joinpath(JOB).rglob("*")
        )
        return (
            published
            and Path(f"{manifest}-wal").exists()
            and Path(f"{manifest}-shm").exists()
            and any(staging.iterdir())
        )

    wait_for(process, all_made, every=0.01)
    process.kill()
    process.communicate()


@pytest.mark.parametrize("umask", [0o002, 0o077], ids=["002", "077"])
def test_every_file_and_directory_made_honours_the_umask(
    server: ServerThread, tmp_path: Path, umask: int
) -> None:
    top = tmp_path / "made"  # DEST's parent is made by the run too
    dest = top / "mirror"

    killed_half_way(server, dest, umask)

    made = [top, *top.rglob("*")]
    modes = {str(p.relative_to(top)): stat.S_IMODE(p.lstat().st_mode) for p in made}
    assert modes == {
        str(p.relative_to(top)): (0o777 if p.is_dir() else 0o666) & ~umask for p in made
    }
    names = {p.name for p in made}
    state = {"lock", manifest_path(dest).name, f"{manifest_path(dest).name}-wal", "staging"}
    assert state | {f"{manifest_path(dest).name}-shm", STATE_DIR, JOB} <= names
    assert any(name.endswith(".part") for name in names)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another uid needs root")
def test_another_member_of_the_group_can_run_on_a_mirror_made_with_umask_002(
    server: ServerThread, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    dest = shared / "mirror"
    killed_half_way(server, dest, 0o002)
    for path in [shared, *shared.rglob("*")]:
        os.chown(path, OTHER_UID, -1, follow_symlinks=False)  # made by them, our group's

    run = run_without_dac_override(*sync_args(server, dest), umask=0o002)

    assert run.returncode == 0, run.stderr.decode()
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
