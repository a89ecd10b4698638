"""A real ``python -m checkpoint_sync`` whose standard streams are as cron jobs, scripts and
daemons leave them: closed (``>&-``) or full (``> /dev/full``), and under locales whose
encoding lacks the characters of names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from checkpoint_sync.localserver import Catalog, ServedCheckpoint, ServedFile, ServedJob

from .conftest import JOB, PROJECT, job_args, sync_args
from .support import API_KEY, ServerThread, assert_exact, assert_no_secret, mirrored

pytestmark = pytest.mark.slow

LOST = "checkpoint-sync: error: cannot write standard output: "


def run_with(
    argv: list[str],
    *,
    stdout: int | None = None,
    stderr: int | None = None,
    closed: str = "",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The CLI with ``stdout``/``stderr`` (a descriptor; the default: captured), the streams
    named in ``closed`` ("1", "2") closed, as a shell's ``>&-`` leaves them, and ``env`` added
    to the environment."""
    script = "".join(f"exec {fd}>&-; " for fd in closed) + 'exec "$@"'
    done = subprocess.run(
        ["sh", "-c", script, "sh", sys.executable, "-m", "checkpoint_sync", *argv],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE if stderr is None else stderr,
        env={**os.environ, **(env or {})},
        text=True,
        timeout=120,
    )
    assert_no_secret((done.stdout or "") + (done.stderr or ""))
    return done


@pytest.mark.parametrize("flags", [[], ["--json"], ["--dry-run"]], ids=["text", "json", "plan"])
def test_a_full_stdout_is_one_line_and_exit_1(
    server: ServerThread, dest: Path, flags: list[str]
) -> None:
    with open("/dev/full", "w") as full:
        done = run_with(sync_args(server, dest, *flags), stdout=full.fileno())

    assert done.returncode == 1, done.stderr
    assert done.stderr == f"{LOST}No space left on device\n"
    if not flags:  # what the run was for is done
        for file in server.files():
            assert_exact(mirrored(dest, "job-1", file), file)


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["sync", "--help"]], ids=["version", "help", "sync-help"]
)
def test_help_or_version_into_a_full_stdout_is_one_line_and_exit_1(argv: list[str]) -> None:
    # argparse prints these itself, before the output of a command exists.
    with open("/dev/full", "w") as full:
        done = run_with(argv, stdout=full.fileno())

    assert done.returncode == 1, done.stderr
    assert done.stderr == f"{LOST}No space left on device\n"


def test_a_closed_stdout_neither_aborts_nor_writes_into_the_mirror(
    server: ServerThread, dest: Path
) -> None:
    done = run_with(sync_args(server, dest), closed="1")

    assert done.returncode == 1, done.stderr
    assert done.stderr == f"{LOST}Bad file descriptor\n"
    for file in server.files():
        assert_exact(mirrored(dest, "job-1", file), file)
    again = run_with(sync_args(server, dest, "--verify", "--json"))
    assert json.loads(again.stdout)["files"]["damaged"] == 0


@pytest.mark.parametrize("closed", ["0", "2", "012"])
def test_a_closed_stdin_or_stderr_is_no_failure(
    server: ServerThread, dest: Path, closed: str
) -> None:
    # --quiet prints nothing on stdout: nothing is lost when it is closed too.
    done = run_with(sync_args(server, dest, "--quiet"), closed=closed)

    assert done.returncode == 0, done.stderr
    for file in server.files():
        assert_exact(mirrored(dest, "job-1", file), file)


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "full"])
def test_an_unwritable_stderr_keeps_the_exit_code_and_stdout_clean(
    server: ServerThread, dest: Path, closed: bool
) -> None:
    argv = sync_args(server, dest, "--checkpoint", "no-such", "--json")
    if closed:
        done = run_with(argv, closed="2")
    else:
        with open("/dev/full", "w") as full:
            done = run_with(argv, stderr=full.fileno())

    assert done.returncode == 4
    assert json.loads(done.stdout)["exit_code"] == 4


@pytest.fixture
def named_in_chinese() -> Iterator[ServerThread]:
    """A checkpoint and a file whose names are Chinese, and one with an emoji."""
    files = [
        ServedFile(0, "检查点-1/模型.bin", 1000, "2026-11-01T00:00:00+00:00", seed=1),
        ServedFile(0, "检查点-1/🚀.json", 10, "2026-11-01T00:00:00+00:00", seed=2),
    ]
    checkpoint = ServedCheckpoint("检查点-1", datetime(2026, 11, 1, tzinfo=UTC), files=files)
    with ServerThread(Catalog(API_KEY, [ServedJob(PROJECT, JOB, [checkpoint])])) as running:
        yield running


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize(
    ("command", "code", "escaped"),
    [
        # The summary names the mirror, 镜像.
        (["sync"], 0, "\\u955c\\u50cf"),
        (["sync", "--dry-run"], 0, "\\u6a21\\u578b.bin"),  # 模型.bin
        (["sync", "--dry-run"], 0, "\\U0001f680.json"),  # 🚀.json
        (["list"], 0, "\\u68c0\\u67e5\\u70b9-1"),  # 检查点-1
        (["sync", "--checkpoint", "模型"], 4, "\\u68c0\\u67e5\\u70b9-1"),  # it has: ...
    ],
    ids=["summary", "plan", "emoji", "list", "error"],
)
def test_names_the_output_cannot_encode_are_shown_escaped(
    named_in_chinese: ServerThread,
    tmp_path: Path,
    encoding: str,
    command: list[str],
    code: int,
    escaped: str,
) -> None:
    dest = tmp_path / "镜像"
    argv = [str(a) for a in job_args(named_in_chinese, *command, "--dest", dest)]
    done = run_with(argv, env={"PYTHONIOENCODING": encoding})

    assert done.returncode == code, done.stderr
    assert escaped in done.stdout + done.stderr


@pytest.fixture
def latin1_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a Latin-1 locale, as older systems' cron jobs have, compiled here."""
    where = tmp_path_factory.mktemp("locales")
    try:
        subprocess.run(
            ["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(where / "en_US.ISO-8859-1")],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("localedef cannot compile a Latin-1 locale here")
    return {"LOCPATH": str(where), "LANG": "en_US.ISO-8859-1", "LC_ALL": "en_US.ISO-8859-1"}


def test_a_name_a_latin1_locale_cannot_write_fails_alone(
    named_in_chinese: ServerThread, dest: Path, latin1_locale: dict[str, str]
) -> None:
    done = run_with(sync_args(named_in_chinese, dest, "--json"), env=latin1_locale)

    assert done.returncode == 1, done.stderr
    failures = json.loads(done.stdout)["failures"]
    assert len(failures) == 2
    assert all("LANG=C.UTF-8" in failure["error"] for failure in failures)
    assert "internal error" not in done.stderr


def test_a_mirror_read_under_a_latin1_locale_keeps_what_it_cannot_name(
    dest: Path, latin1_locale: dict[str, str]
) -> None:
    # Mirrored under UTF-8, then listed and pruned by a Latin-1 cron job.
    chinese = ServedCheckpoint(
        "检查点-1",
        datetime(2026, 11, 1, tzinfo=UTC),
        files=[
            ServedFile(0, "检查点-1/模型.bin", 1000, "2026-11-01T00:00:00+00:00", seed=1),
            ServedFile(0, "检查点-1/🚀.json", 10, "2026-11-01T00:00:00+00:00", seed=2),
        ],
    )
    plain = ServedCheckpoint(
        "checkpoint-2",
        datetime(2026, 11, 2, tzinfo=UTC),
        files=[ServedFile(0, "checkpoint-2/a.bin", 100, "2026-11-02T00:00:00+00:00", seed=3)],
    )
    with ServerThread(Catalog(API_KEY, [ServedJob(PROJECT, JOB, [chinese, plain])])) as server:
        assert run_with(sync_args(server, dest)).returncode == 0
        list_args = [str(a) for a in job_args(server, "list", "--dest", dest)]
        listed = run_with(list_args, env=latin1_locale)
        job = server.catalog.jobs[0]
        server.call(lambda: job.checkpoints.remove(chinese))
        listed_removed = run_with([*list_args, "--json"], env=latin1_locale)
        kept = run_with(sync_args(server, dest, "--delete", "--json"), env=latin1_locale)
        for file in chinese.files:
            assert_exact(mirrored(dest, JOB, file), file)
        # A UTF-8 run deletes them: the Latin-1 one kept their records.
        deleted = run_with(sync_args(server, dest, "--delete", "--json"))

    unnamed = "cannot look up 2 mirrored files of job-1/\\u68c0\\u67e5\\u70b9-1: "
    for done in (listed, listed_removed):
        assert done.returncode == 0, done.stderr
        (note,) = [line for line in done.stderr.splitlines() if line.startswith(unnamed)]
        assert note.endswith("; run with a UTF-8 one (LANG=C.UTF-8)")
    states = {line.split()[1]: line.split()[-1] for line in listed.stdout.splitlines()[1:]}
    assert states == {"\\u68c0\\u67e5\\u70b9-1": "absent", "checkpoint-2": "mirrored"}
    # Not counted as still mirrored, nor as deleted.
    assert json.loads(listed_removed.stdout)["removed_upstream"] == []

    assert kept.returncode == 1, kept.stderr
    summary = json.loads(kept.stdout)
    assert summary["files"]["deleted"] == 0
    assert len(summary["failures"]) == 2
    assert all("LANG=C.UTF-8" in failure["error"] for failure in summary["failures"])
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["files"]["deleted"] == 2
    assert not (dest / JOB / "检查点-1").exists()


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_list_columns_line_up_when_the_output_escapes_names(tmp_path: Path, encoding: str) -> None:
    # 检查点-1 is written as \u68c0\u67e5\u70b9-1, twenty columns, not the eight it takes on a
    # UTF-8 terminal: the columns after it moved by twelve.
    checkpoints = [
        ServedCheckpoint(
            name,
            datetime(2026, 11, day, tzinfo=UTC),
            files=[ServedFile(0, f"{name}/a.bin", 10, "2026-11-01T00:00:00+00:00", seed=day)],
        )
        for day, name in enumerate(["检查点-1", "c-2"], start=1)
    ]
    with ServerThread(Catalog(API_KEY, [ServedJob(PROJECT, JOB, checkpoints)])) as server:
        argv = [str(a) for a in job_args(server, "list", "--dest", tmp_path)]
        done = run_with(argv, env={"PYTHONIOENCODING": encoding})

    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "\\u68c0\\u67e5\\u70b9-1" in done.stdout
    assert {line.index("2026-11-") for line in lines} == {header.index("CREATED")}
