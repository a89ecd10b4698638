"""The mirror's lock: whether a run that took it may have met another run since it read its
checkpoint list, which it then reads again (`test_delete.py` has what that keeps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checkpoint_sync.lock import LOCK_NAME

from .conftest import sync_args
from .support import ServerThread, run_cli


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
