"""benchmarks/run.py, the parts that can be run without nginx and the peers."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load_run()


class _Writer:
    """A tool that writes a file into its destination, then takes its time."""

    name = "writer"
    is_peer = True

    def problem(self) -> str | None:
        return None

    def tuning(self) -> str:
        return ""

    def command(self, job: object, dest: Path) -> object:
        script = f"head -c 1048576 /dev/zero > {dest}/part && sleep 30"
        return run.Command(["sh", "-c", script])


def test_an_interrupted_run_leaves_no_destination_behind(tmp_path: Path) -> None:
    gnu_time = run.find_binary("time")
    if gnu_time is None:
        pytest.skip("GNU time is not installed")
    dest, logs = tmp_path / "dest", tmp_path / "logs"
    logs.mkdir()
    profile = run.Profile("p", 1, (run.FileSpec("0/checkpoint-1/part", 1 << 20),))
    job = run.Job(profile, "http", "http://127.0.0.1:1/p/", tmp_path / "ca.pem", tmp_path)
    settings = run.Settings(1, 60, tmp_path / "data", tmp_path, logs, gnu_time)

    def ctrl_c_once_written() -> None:
        deadline = time.monotonic() + 20
        while not (dest / "part").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if (dest / "part").exists():  # else bench() has ended: a SIGINT would stop the suite
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_written, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run.bench([run.Case("writer", _Writer())], job, dest, settings, {})

    # The destination (by default in /dev/shm: RAM) was left with the interrupted run's files.
    assert not dest.exists()


def _row(label: str, walls: list[float], error: str | None = None) -> object:
    samples = [run.Sample(wall, 1.0, 10.0) for wall in walls]
    return run.Row(label, True, True, samples, error=error)


def test_a_peer_that_failed_a_round_is_not_the_fastest_peer() -> None:
    # aria2c's round 2 failed verification (wrong output) after a fast round 1: its one
    # surviving sample made it the reference every other row's ratio was taken against.
    failed = _row("aria2c (1 ok, then failed)", [1.0], error="verify: x differs from the source")
    rclone = _row("rclone", [2.0, 2.1, 1.9])
    assert run.fastest_peer([failed, rclone]) is rclone
