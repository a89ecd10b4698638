"""A real ``python -m checkpoint_sync`` killed, interrupted or overlapped: nothing lost or corrupt.

Each test runs the CLI as a subprocess against a throttled server, so that it is still working
when the test kills it, signals it or starts a second run beside it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import xxhash

from checkpoint_sync.engine import SyncOptions, manifest_path, sync
from checkpoint_sync.localserver import Faults, ServedFile, content
from checkpoint_sync.manifest import Manifest, VerifiedFile
from checkpoint_sync.net import NetSettings
from checkpoint_sync.plan import FileFilter, select_checkpoints
from checkpoint_sync.progress import Stats
from checkpoint_sync.sources.baseten_training import TrainingJobSource
from checkpoint_sync.transfer import TransferSettings
from checkpoint_sync.wire import FLUSH_AT, LARGE_BODY, RECV_BUFFER, HttpClient

from .conftest import JOB, PROJECT, job_catalog, sync_args
from .support import (
    Result,
    ServerThread,
    api_client,
    assert_exact,
    assert_no_secret,
    first_answers,
    http_serving,
    mirrored,
    new_version,
    run_cli,
    run_subprocess,
    stop_while_the_manifest_is_held,
)
from .test_hosts import range_asked
from .test_sync import left_in_parts

pytestmark = pytest.mark.slow

PART = 128 << 10
CONCURRENCY = 2
# Small pages and a slow API, so that a run can be caught still listing.
ENV = {"CHECKPOINT_SYNC_PAGE_SIZE": "3"}


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """About 8.5 MB: per checkpoint and rank one 2 MiB file in 17 parts and six 20 kB files."""
    catalog = job_catalog(
        checkpoints=2, large_size=(2 << 20) + 4321, small_files=6, small_size=20_000
    )
    # ~2 MiB/s over two connections: a whole run takes about 4 s.
    faults = Faults(throttle=1 << 20, api_delay=0.05)
    with ServerThread(catalog, faults) as running:
        yield running


def args(server: ServerThread, dest: Path) -> list[str]:
    return sync_args(server, dest, "--part-size", "128KiB", "--concurrency", str(CONCURRENCY))


def run_scripted(
    script: str, server: ServerThread, dest: Path, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    """A sync of ``dest`` by ``script``: the CLI, with some of its internals made to crash or
    signal at a chosen point."""
    return subprocess.run(
        [sys.executable, "-c", script, *args(server, dest), *extra],
        env={**os.environ, **ENV},
        capture_output=True,
        timeout=60,
    )


def start(server: ServerThread, dest: Path, *extra: str) -> subprocess.Popen[bytes]:
    return run_subprocess(*args(server, dest), *extra, env=ENV)


def wait_for(
    process: subprocess.Popen[bytes], condition: Callable[[], bool], every: float = 0.001
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; the run must still be going
    then."""
    deadline = time.monotonic() + 30
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the condition never came"
        time.sleep(every)


def kill_when(
    server: ServerThread, dest: Path, condition: Callable[[], bool]
) -> set[tuple[Path, int, int]]:
    """Kill a run once ``condition`` holds; each file it left published but not recorded (path,
    inode, size): the next run fetches it again whole."""
    process = start(server, dest)
    wait_for(process, condition)
    process.kill()
    process.communicate()
    recorded = {dest / path for path, *_ in manifest_rows(dest)}
    published = [p for p in (dest / JOB).rglob("*") if p.is_file()] if (dest / JOB).exists() else []
    return {(p, p.stat().st_ino, p.stat().st_size) for p in published if p not in recorded}


def manifest_rows(dest: Path) -> list[tuple[str, int, str]]:
    db = sqlite3.connect(dest / ".checkpoint-sync" / "manifest.sqlite3")
    try:
        return db.execute("SELECT path, size, digest FROM files").fetchall()
    finally:
        db.close()


def assert_records_true(dest: Path) -> None:
    """Every file the manifest records is on disk, whole, with the recorded digest."""
    for path, size, digest in manifest_rows(dest):
        data = (dest / path).read_bytes()
        assert len(data) == size, f"{path} recorded at {size} bytes, is {len(data)}"
        assert xxhash.xxh3_128_hexdigest(data) == digest, f"{path} differs from its record"


def assert_consistent(server: ServerThread, dest: Path) -> None:
    """What a crash may leave: final paths hold only whole, exact files; records tell the truth."""
    assert_records_true(dest)
    listed = {mirrored(dest, JOB, f): f for f in server.files()}
    for path in (dest / JOB).rglob("*") if (dest / JOB).exists() else ():
        if path.is_file():
            assert path in listed, f"unexpected {path}"
            assert_exact(path, listed[path])


def assert_completes_unthrottled(server: ServerThread, dest: Path, *extra: str) -> Result:
    """A run at full speed after the interrupted ones ends with every file exact (no stale lock
    either: each stop freed it); its output."""
    server.call(lambda: setattr(server.faults, "throttle", None))
    final = run_cli(*args(server, dest), *extra)
    assert final.code == 0, final.stderr
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
    return final


def test_killed_at_any_moment_the_next_run_finishes_with_little_fetched_twice(
    server: ServerThread, dest: Path
) -> None:
    total = server.data_size()
    large = [mirrored(dest, JOB, f) for f in server.files() if f.size > PART]

    def sent_since_start(share: float) -> Callable[[], bool]:
        first = server.traffic.object_bytes_sent
        return lambda: server.traffic.object_bytes_sent - first >= share * total

    def a_large_file_published() -> Callable[[], bool]:
        before = sum(p.exists() for p in large)
        return lambda: sum(p.exists() for p in large) > before

    unrecorded = kill_when(server, dest, lambda: server.traffic.api_requests >= 3)  # page 2 of 10
    assert_consistent(server, dest)
    unrecorded |= kill_when(server, dest, sent_since_start(0.25))  # parts being written
    assert_consistent(server, dest)
    unrecorded |= kill_when(server, dest, a_large_file_published())  # a publish just happened
    assert_consistent(server, dest)
    unrecorded |= kill_when(server, dest, sent_since_start(0.2))
    assert_consistent(server, dest)

    assert_completes_unthrottled(server, dest)
    assert len(manifest_rows(dest)) == len(server.files())
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())
    # A kill between a publish and its record (committed at once for a file in parts, see the
    # test below; within 0.2 s for the others) costs that file: whether one came is timing.
    fetched_again = sum(size for *_, size in unrecorded)
    assert server.traffic.object_bytes_sent <= 1.3 * total + fetched_again


# The CLI, killed (SIGKILL) the moment its first file is renamed into the mirror (not the empty
# file renamed into the state directory at its start, to tell that renames can be made).
CRASH_AT_FIRST_PUBLISH = """
import os, signal, sys
rename = os.replace
def rename_then_die(source, target):
    rename(source, target)
    if "/.checkpoint-sync/" not in str(target):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = rename_then_die
from checkpoint_sync.cli import main
main(sys.argv[1:])
"""


def test_a_record_never_outlives_the_file_it_describes(server: ServerThread, dest: Path) -> None:
    server.call(lambda: setattr(server.faults, "throttle", None))
    assert run_cli(*args(server, dest)).code == 0
    small = next(f for f in server.files() if f.size < PART)
    path = mirrored(dest, JOB, small)

    server.call(lambda: new_version(small))
    crashed = run_scripted(CRASH_AT_FIRST_PUBLISH, server, dest)

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert_exact(path, small)  # the new version took the old one's place ...
    assert_records_true(dest)  # ... and the old record was gone before it did


# The CLI, killed (SIGKILL) the moment the record of its first file fetched in parts is written.
CRASH_AT_FIRST_RECORD_OF_A_FILE_IN_PARTS = f"""
import os, signal, sys
from checkpoint_sync.manifest import Manifest
record_verified = Manifest.record_verified
def record_then_die(self, entry):
    record_verified(self, entry)
    if entry.size > {PART}:
        os.kill(os.getpid(), signal.SIGKILL)
Manifest.record_verified = record_then_die
from checkpoint_sync.cli import main
main(sys.argv[1:])
"""


def test_a_file_fetched_in_parts_is_recorded_the_moment_it_is_published(
    server: ServerThread, dest: Path
) -> None:
    # Committed at once, not within the 0.2 s of the other records: a kill then would cost the
    # whole file again.
    server.call(lambda: setattr(server.faults, "throttle", None))
    crashed = run_scripted(CRASH_AT_FIRST_RECORD_OF_A_FILE_IN_PARTS, server, dest)

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    recorded = {dest / path for path, *_ in manifest_rows(dest)}
    published = [p for p in (mirrored(dest, JOB, f) for f in server.files()) if p.exists()]
    assert [p for p in published if p.stat().st_size > PART and p not in recorded] == []
    assert any(p.stat().st_size > PART for p in published)


def test_parts_recorded_by_an_old_run_never_vouch_for_a_reset_staging_file(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts 0 and 1 are recorded; a one-stream attempt leaves the staging file short; the next
    run resets it (zeros at full size) and is killed before any part lands. The old record must
    not have survived that reset, or the last run would publish zeros as verified."""
    catalog = job_catalog(checkpoints=1, large_size=(1 << 20) + 12345, small_files=0)
    in_parts = ("--part-size", "256KiB", "--concurrency", "1")
    with ServerThread(catalog) as server:
        left_in_parts(server, dest, monkeypatch, *in_parts)
        server.faults.hook = lambda name, start, end: "short"
        assert run_cli(*sync_args(server, dest, "--part-size", "2MiB")).code == 1

        killed: list[subprocess.Popen[bytes]] = []

        def kill_at_first_request(name: str, start: int, end: int) -> str:
            killed[0].kill()
            return "stall"

        server.faults.hook = kill_at_first_request
        killed.append(run_subprocess(*sync_args(server, dest, *in_parts)))
        killed[0].communicate(timeout=60)
        server.faults.hook = None
        final = run_cli(*sync_args(server, dest, *in_parts))

        assert final.code == 0, final.stderr
        for file in server.files():
            assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_a_signal_stops_promptly_keeps_progress_and_the_rerun_resumes(
    server: ServerThread, dest: Path, signum: signal.Signals, code: int
) -> None:
    if signal.getsignal(signum) == signal.SIG_IGN:  # these tests run under `nohup`: so would it
        pytest.skip(f"{signum.name} is ignored here")
    total = server.data_size()
    process = start(server, dest)
    wait_for(process, lambda: server.traffic.object_bytes_sent >= 0.4 * total)

    process.send_signal(signum)
    stopped = time.monotonic()
    out, err = process.communicate(timeout=10)

    assert process.returncode == code, err
    assert_no_secret(out.decode() + err.decode())
    assert time.monotonic() - stopped < 2
    assert "fetched " in out.decode()  # the summary of what was done
    assert f"stopped by {signum.name}; rerun to resume" in err.decode()
    assert_consistent(server, dest)

    sent = server.traffic.object_bytes_sent
    rerun = json.loads(assert_completes_unthrottled(server, dest, "--json").stdout)
    # Little is fetched again: what the server had sent unread (a file of one part in flight
    # when the signal came goes on from where it got, as a part of a larger file does).
    assert server.traffic.object_bytes_sent <= total + CONCURRENCY * PART
    # The rerun says what it took up from the parts left: none of their bytes came again.
    assert rerun["files"]["resumed"] >= 1
    assert 0 < rerun["bytes"]["resumed"] < rerun["bytes"]["to_fetch"]
    assert rerun["bytes"]["fetched"] == rerun["bytes"]["to_fetch"] - rerun["bytes"]["resumed"]
    assert server.traffic.object_bytes_sent - sent == rerun["bytes"]["fetched"]


@pytest.mark.parametrize("flags", [[], ["--fsync"]], ids=["", "fsync"])
def test_a_signal_keeps_how_far_the_part_in_flight_got(dest: Path, flags: list[str]) -> None:
    """A part whose answer stalls half way when the run is stopped: the rerun asks for the rest
    of that part only, and the file is exact."""
    catalog = job_catalog(checkpoints=1, large_size=(2 << 20) + 4321, small_files=1)
    with ServerThread(catalog, Faults(stall_seconds=20)) as server:
        stall = first_answers(1, "stall")
        server.faults.hook = lambda name, start, end: (
            stall(name, start, end) if start == 5 * PART else None
        )
        process = start(server, dest, *flags)
        wait_for(process, lambda: server.traffic.faults.get("stall") == 1)
        (name, _, end) = next(r for r in server.traffic.ranges if r[1] == 5 * PART)
        # The half before the stall is received, the rest of the run is done meanwhile.
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 130, err
        asked = len(server.traffic.ranges)

        assert_completes_unthrottled(server, dest)

        assert server.traffic.ranges[asked:] == [(name, 5 * PART + PART // 2, end)]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_manifest_that_cannot_record_how_far_a_stopped_part_got_leaves_the_signals_exit(
    dest: Path, signum: signal.Signals, code: int
) -> None:
    """Stopped while a part stalls half way, and another program holds the manifest then: the
    stop cannot record how far the part got. Said in one line, yet the exit is the signal's."""
    catalog = job_catalog(checkpoints=1, large_size=(2 << 20) + 4321, small_files=1)
    with ServerThread(catalog, Faults(stall_seconds=30)) as server:
        stall = first_answers(1, "stall")
        server.faults.hook = lambda name, start, end: (
            stall(name, start, end) if start == 5 * PART else None
        )
        process = start(server, dest, "--json")
        wait_for(process, lambda: server.traffic.faults.get("stall") == 1)
        time.sleep(0.5)  # the rest of the run is done and committed meanwhile
        out, err = stop_while_the_manifest_is_held(process, manifest_path(dest), signum)

        assert process.returncode == code, err
        manifest = f"cannot use the manifest {manifest_path(dest)}: database is locked"
        assert err.decode().splitlines() == [
            f"checkpoint-sync: error: {manifest}",
            f"checkpoint-sync: error: stopped by {signum.name}; rerun to resume",
        ]
        summary = json.loads(out)
        assert (summary["exit_code"], summary["error"]) == (code, manifest)
        assert_completes_unthrottled(server, dest)


def test_a_listing_that_failed_before_the_stop_is_still_said(dest: Path) -> None:
    """The listing's second page cannot be read while a part of a file from its first stalls:
    the run waits for the files listed, and is stopped then. The listing's error is said and is
    the summary's, yet the exit is the signal's."""
    catalog = job_catalog(checkpoints=1, large_size=(2 << 20) + 4321, small_files=1)
    # Four files, three a page (ENV): a large one is on the first page.
    with ServerThread(catalog, Faults(stall_seconds=30, page_faults={3: "not-json"})) as server:
        stall = first_answers(1, "stall")
        server.faults.hook = lambda name, start, end: (
            stall(name, start, end) if start == 5 * PART else None
        )
        process = start(server, dest, "--json")
        wait_for(
            process,
            lambda: server.traffic.faults.get("stall") == 1 and not server.faults.page_faults,
        )
        time.sleep(0.5)  # the rest of the files listed land meanwhile
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)

    assert process.returncode == 130, err
    (said, stopped) = err.decode().removeprefix("checkpoint-sync: error: ").splitlines()
    assert said.endswith(": the API answered with something not JSON"), said
    assert stopped == "checkpoint-sync: error: stopped by SIGINT; rerun to resume"
    summary = json.loads(out)
    assert (summary["exit_code"], summary["error"]) == (130, said)


def parts_left(dest: Path) -> tuple[set[int], dict[int, int]]:
    """The parts of the one file a run holds in parts: those done, and how far others got."""
    db = sqlite3.connect(manifest_path(dest))
    try:
        done = {part for (part,) in db.execute("SELECT part FROM parts")}
        reached = dict(db.execute("SELECT part, reached FROM parts_reached"))
        return done, reached
    finally:
        db.close()


@pytest.mark.anyio
async def test_with_fsync_parts_in_flight_are_recorded_while_splices_hold_every_thread(
    dest: Path,
) -> None:
    # Every place in the worker threads' pool is held by a splice stalled half way, as 40
    # connections' large parts over plain HTTP hold anyio's 40 (here the pool is made 2, and
    # so are the connections). How far each got is still recorded every second, flushed first.
    part = 8 << 20
    catalog = job_catalog(checkpoints=1, large_files=1, large_size=2 * part, small_files=0)
    with ServerThread(catalog, Faults(stall_seconds=30)) as server:
        server.faults.hook = first_answers(2, "stall")
        async with (
            api_client(server.url) as api,
            HttpClient(NetSettings(connect_timeout=5, read_timeout=60)) as http,
        ):
            source = TrainingJobSource(api, PROJECT, JOB)
            selection = select_checkpoints(await source.checkpoints())
            options = SyncOptions(
                dest=dest,
                concurrency=2,
                files=FileFilter(ranks=frozenset({0})),
                transfer=TransferSettings(part_size=part, fsync=True),
            )
            pool = anyio.to_thread.current_default_thread_limiter()
            places, pool.total_tokens = pool.total_tokens, 2

            def stalled_holding_the_pool() -> bool:
                return server.traffic.faults.get("stall") == 2 and not pool.available_tokens

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sync, source, selection, http, options, Stats())
                    with anyio.fail_after(20):  # the stalls end after 30 s
                        while not stalled_holding_the_pool():  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                        while len(recorded := parts_left(dest)[1]) < 2:  # noqa: ASYNC110
                            await anyio.sleep(0.05)
                    held = pool.available_tokens == 0  # the splices still had every place
                    tg.cancel_scope.cancel()
            finally:
                pool.total_tokens = places

    assert held
    assert 0 < recorded[0] <= part // 2
    assert part < recorded[1] <= part + part // 2


# A part that goes through the sink (shorter than a body spliced or written behind), half of
# which fills a connection's buffer past the mark where it is written: a stall half way leaves
# bytes in the file.
SINK_PART = LARGE_BODY - (64 << 10)
assert FLUSH_AT < SINK_PART // 2


@pytest.mark.parametrize(
    ("part", "unwritten", "flags"),
    [
        (8 << 20, 0, []),
        (8 << 20, 0, ["--fsync"]),
        (SINK_PART, RECV_BUFFER, []),
    ],
    ids=["spliced", "spliced-fsync", "through-the-sink"],
)
def test_a_kill_costs_the_rerun_only_what_each_part_in_flight_had_not_written(
    dest: Path, part: int, unwritten: int, flags: list[str]
) -> None:
    """Two parts stall half way while the rest of the run is done: killed with SIGKILL then,
    the run has recorded how far each got, and the rerun asks for the rest of each only. A
    part of 8 MiB is spliced into its file, one of `SINK_PART` goes through the sink, whose
    connection holds up to ``unwritten`` bytes it received and did not write yet."""
    catalog = job_catalog(checkpoints=1, large_size=4 * part + 4321, small_files=1)
    stalled = {part, 2 * part}
    with ServerThread(catalog, Faults(stall_seconds=60)) as server:
        hook = first_answers(2, "stall")
        server.faults.hook = lambda name, start, end: (
            hook(name, start, end) if start in stalled else None
        )
        one_rank = ("--node-rank", "0", "--concurrency", "3", *flags)
        # Not given up for silence, and fetched again whole, before the kill.
        patient = {"CHECKPOINT_SYNC_READ_TIMEOUT": "60"}
        process = run_subprocess(
            *sync_args(server, dest, "--part-size", str(part), *one_rank), env=patient
        )

        def only_the_stalled_parts_left() -> bool:
            if server.traffic.faults.get("stall") != 2 or not manifest_path(dest).exists():
                return False
            done, reached = parts_left(dest)
            # Done, but for the two stalled, each recorded once it wrote all it could.
            return done == {0, 3, 4} and all(
                reached.get(start // part, 0) >= start + part // 2 - unwritten for start in stalled
            )

        wait_for(process, only_the_stalled_parts_left, every=0.05)
        process.kill()
        process.communicate()
        _, reached = parts_left(dest)
        (name,) = {name for name, start, _ in server.traffic.ranges if start in stalled}
        asked, sent = len(server.traffic.ranges), server.traffic.object_bytes_sent
        final = run_cli(*sync_args(server, dest, "--part-size", str(part), *one_rank))

        assert final.code == 0, final.stderr
        # A record never claims a byte not written: the half sent before the stall at most.
        for start in stalled:
            assert reached[start // part] <= start + part // 2
        rest = [(name, reached[start // part], start + part) for start in sorted(stalled)]
        assert sorted(server.traffic.ranges[asked:]) == rest
        assert server.traffic.object_bytes_sent - sent == sum(end - at for _, at, end in rest)
        for file in server.files():
            if file.node_rank == 0:
                assert_exact(mirrored(dest, JOB, file), file)


def test_a_kill_leaves_no_record_into_an_answer_perhaps_compressed_on_the_way(
    dest: Path,
) -> None:
    """An answer that says Content-Encoding and no length brings the object's bytes only if
    they come to the length asked for: while it is read, how far its part got is not recorded
    (cut short, the part rewinds to where it began). Killed while that part and a plain one
    stall half way, the run has recorded the plain one only, in a record made after the coded
    part's bytes were written; the rerun asks for the coded part whole."""
    part = SINK_PART
    catalog = job_catalog(checkpoints=1, large_size=4 * part + 4321, small_files=0)
    coded, plain = part, 2 * part
    released = threading.Event()  # until set, answers to both parts stall half way
    plain_goes = threading.Event()
    asked: list[str] = []
    with ServerThread(catalog) as server:
        (large,) = (file for file in server.files() if file.node_rank == 0)

        class Stalling(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                start, end = range_asked(self, asked)
                stalls = not released.is_set() and start in (coded, plain)
                if stalls and start == plain:
                    plain_goes.wait(60)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{large.size}")
                if stalls and start == coded:
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Connection", "close")  # no length: the body tells
                else:
                    self.send_header("Content-Length", str(end - start))
                self.end_headers()
                cut = start + (end - start) // 2 if stalls else end
                self.wfile.write(content(large.seed, start, cut - start))
                self.wfile.flush()
                if stalls:
                    released.wait(60)

        with http_serving(Stalling) as origin:
            large.external_url = f"{origin}/large?X-Amz-Signature=s"
            in_parts = ("--part-size", str(part), "--node-rank", "0", "--concurrency", "3")
            process = run_subprocess(
                *sync_args(server, dest, *in_parts), env={"CHECKPOINT_SYNC_READ_TIMEOUT": "60"}
            )
            staging = dest / ".checkpoint-sync" / "staging"
            first = content(large.seed, coded, 4096)

            def coded_bytes_written() -> bool:
                files = list(staging.iterdir()) if staging.exists() else []
                if len(files) != 1:
                    return False
                with files[0].open("rb") as staged:
                    staged.seek(coded)
                    return staged.read(4096) == first

            wait_for(process, coded_bytes_written, every=0.05)
            plain_goes.set()

            def plain_recorded() -> bool:
                done, reached = parts_left(dest)
                threshold = plain + part // 2 - RECV_BUFFER
                return done == {0, 3, 4} and reached.get(plain // part, 0) >= threshold

            wait_for(process, plain_recorded, every=0.05)
            process.kill()
            process.communicate()
            released.set()
            _, reached = parts_left(dest)
            before = len(asked)
            final = run_cli(*sync_args(server, dest, *in_parts))

        assert final.code == 0, final.stderr
        assert list(reached) == [plain // part]
        assert sorted(asked[before:], key=lambda asked: int(asked.split("-")[0])) == [
            f"{coded}-{coded + part - 1}",
            f"{reached[plain // part]}-{plain + part - 1}",
        ]
        assert_exact(mirrored(dest, JOB, large), large)


# A file of one part (6 MiB, of an 8 MiB --part-size), hashed as it arrives: half of it
# fills a connection's buffer past the mark where it is written.
ONE_PART = (6 << 20) + 4321
assert FLUSH_AT < ONE_PART // 2


@pytest.fixture
def one_part_server() -> Iterator[ServerThread]:
    """Per rank a file of one part, whose first answer stalls half way, and a small file."""
    catalog = job_catalog(checkpoints=1, large_size=ONE_PART, small_files=1)
    with ServerThread(catalog, Faults(stall_seconds=60)) as server:
        (large,) = (f for f in server.files() if f.size == ONE_PART and f.node_rank == 0)
        stall = first_answers(1, "stall")
        server.faults.hook = lambda name, start, end: (
            stall(name, start, end) if name == large.name else None
        )
        yield server


def one_part_args(server: ServerThread, dest: Path, *extra: str) -> list[str]:
    return sync_args(server, dest, "--part-size", "8MiB", "--node-rank", "0", *extra)


def stop_a_one_part_file_half_way(
    server: ServerThread, dest: Path, signum: signal.Signals, *flags: str
) -> int:
    """A run stopped by ``signum`` while the one-part file's answer stalls half way (the rest of
    the run done): SIGKILL once a periodic record said how far it got. That byte, recorded."""
    process = run_subprocess(
        *one_part_args(server, dest, *flags), env={"CHECKPOINT_SYNC_READ_TIMEOUT": "60"}
    )

    def recorded() -> bool:
        if server.traffic.faults.get("stall") != 1 or not manifest_path(dest).exists():
            return False
        return parts_left(dest)[1].get(0, 0) >= ONE_PART // 2 - RECV_BUFFER

    if signum == signal.SIGKILL:
        wait_for(process, recorded, every=0.05)
    else:
        wait_for(process, lambda: server.traffic.faults.get("stall") == 1)
        time.sleep(0.5)  # the half before the stall is received
    process.send_signal(signum)
    _, err = process.communicate(timeout=10)
    assert process.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), err
    done, reached = parts_left(dest)
    assert done == set()
    return reached[0]


@pytest.mark.parametrize(
    ("signum", "flags"),
    [(signal.SIGTERM, []), (signal.SIGKILL, []), (signal.SIGKILL, ["--fsync"])],
    ids=["sigterm", "sigkill", "sigkill-fsync"],
)
def test_a_one_part_file_stopped_half_way_resumes_with_the_rest_only(
    one_part_server: ServerThread, dest: Path, signum: signal.Signals, flags: list[str]
) -> None:
    """As a part of a large file does: stopped, it keeps what it wrote (all that came, by a
    signal; by a kill, what the record made every second says); the rerun asks for the rest
    and verifies the whole file read back."""
    server = one_part_server
    (large,) = (f for f in server.files() if f.size == ONE_PART and f.node_rank == 0)
    reached = stop_a_one_part_file_half_way(server, dest, signum, *flags)
    asked, sent = len(server.traffic.ranges), server.traffic.object_bytes_sent

    rerun = run_cli(*one_part_args(server, dest, "--json"))

    assert rerun.code == 0, rerun.stderr
    if signum == signal.SIGTERM:
        assert reached == ONE_PART // 2
    # A record never claims a byte not written: the half sent before the stall at most.
    assert FLUSH_AT <= reached <= ONE_PART // 2
    assert server.traffic.ranges[asked:] == [(large.name, reached, ONE_PART)]
    assert server.traffic.object_bytes_sent - sent == ONE_PART - reached
    summary = json.loads(rerun.stdout)
    assert (summary["files"]["resumed"], summary["bytes"]["resumed"]) == (1, reached)
    assert_exact(mirrored(dest, JOB, large), large)
    assert parts_left(dest) == (set(), {})
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())


def replace_bytes(file: ServedFile) -> None:
    """The object replaced, its listing unchanged: only its ETag tells."""
    file.seed += 1000


@pytest.mark.parametrize("change", ["new-version", "new-etag", "ignores-range", "verify"], ids=str)
def test_a_one_part_file_left_half_way_is_not_resumed_into_another_object(
    one_part_server: ServerThread, dest: Path, change: str
) -> None:
    """Left half way by a stop, then: a new version listed (another last_modified), the object
    replaced under the same listing (its ETag, recorded with the half, differs), a server that
    now ignores Range, or a --verify run, which resumes nothing. The file lands exact from one
    object, its first half never stitched onto another's second."""
    server = one_part_server
    (large,) = (f for f in server.files() if f.size == ONE_PART and f.node_rank == 0)
    stop_a_one_part_file_half_way(server, dest, signal.SIGTERM)
    asked = len(server.traffic.ranges)
    whole = (large.name, 0, ONE_PART)
    extra = ["--verify"] if change == "verify" else []
    if change == "new-version":
        server.call(lambda: new_version(large))
    elif change == "new-etag":
        server.call(lambda: replace_bytes(large))
    elif change == "ignores-range":
        server.faults.ignore_range = True

    rerun = run_cli(*one_part_args(server, dest, "--json", *extra))

    summary = json.loads(rerun.stdout)
    assert (summary["files"]["resumed"], summary["bytes"]["resumed"]) == (0, 0)
    if change == "new-etag":
        # As for the parts of a large file: it fails, its half dropped; the next run starts over.
        assert rerun.code == 1, rerun.stderr
        (failure,) = summary["failures"]
        assert "changed while it was being fetched (ETag" in failure["error"]
        assert server.traffic.ranges[asked:] == [(large.name, ONE_PART // 2, ONE_PART)]
        assert parts_left(dest) == (set(), {})
        asked = len(server.traffic.ranges)
        rerun = run_cli(*one_part_args(server, dest))
        assert server.traffic.ranges[asked:] == [whole]
    elif change == "ignores-range":
        # Asked for from the half (answered whole, not taken), then whole: two requests.
        assert server.traffic.ranges[asked:] == [whole, whole]
    else:
        assert server.traffic.ranges[asked:] == [whole]
    assert rerun.code == 0, rerun.stderr
    assert_exact(mirrored(dest, JOB, large), large)
    assert not any((dest / ".checkpoint-sync" / "staging").iterdir())


def test_a_one_part_file_taken_whole_in_place_of_its_rest_is_recorded_as_it_comes(
    one_part_server: ServerThread, dest: Path
) -> None:
    """Left half way, then asked for from the half by a run whose server now ignores Range: its
    record of the half is dropped and the whole answer taken, which is recorded as it comes, as
    a one-part file's first fetch is. Stopped half way again, the next run asks for the rest."""
    server = one_part_server
    (large,) = (f for f in server.files() if f.size == ONE_PART and f.node_rank == 0)
    stop_a_one_part_file_half_way(server, dest, signal.SIGTERM)
    server.faults.ignore_range = True
    server.call(lambda: server.traffic.faults.pop("stall"))
    answered: list[str] = []

    def stall_the_second(name: str, start: int, end: int) -> str | None:
        # The first, to the half's request, is the whole file, not taken; the second is taken.
        answered.append(name)
        return "stall" if len(answered) == 2 else None

    server.faults.hook = stall_the_second

    # Without that record, the run stopped here left nothing: the next started over.
    assert stop_a_one_part_file_half_way(server, dest, signal.SIGTERM) == ONE_PART // 2
    server.faults.ignore_range, server.faults.hook = False, None
    asked = len(server.traffic.ranges)
    rerun = run_cli(*one_part_args(server, dest, "--json"))

    assert rerun.code == 0, rerun.stderr
    assert server.traffic.ranges[asked:] == [(large.name, ONE_PART // 2, ONE_PART)]
    summary = json.loads(rerun.stdout)
    assert (summary["files"]["resumed"], summary["bytes"]["resumed"]) == (1, ONE_PART // 2)
    assert_exact(mirrored(dest, JOB, large), large)


def test_no_record_vouches_for_an_answer_that_proved_longer_than_its_range(dest: Path) -> None:
    """An answer told no length may prove longer than its range once read: its bytes are not
    the ones asked for, and its file fails. Read for seconds before that shows, how far its part
    got is not recorded meanwhile: a later run asks for the part from its start."""
    part = 3 << 20  # past the receive buffer: its bytes are written while it is read
    catalog = job_catalog(checkpoints=1, large_size=2 * part, small_files=0)

    faults = Faults(throttle=3 << 19)  # 2 s a part: a record is made while the second is read

    def second_part_longer(name: str, start: int, end: int) -> str | None:
        # One answer at a time (--concurrency 1): the first part's is as asked for.
        longer = start == part
        faults.overlong_body = 100 if longer else 0
        return "chunked" if longer else None

    def plain() -> None:
        faults.hook, faults.overlong_body = None, 0

    faults.hook = second_part_longer
    with ServerThread(catalog, faults) as server:
        one = ("--part-size", str(part), "--node-rank", "0", "--concurrency", "1", "--json")
        result = run_cli(*sync_args(server, dest, *one))

        assert result.code == 1, result.stderr
        (failure,) = json.loads(result.stdout)["failures"]
        assert "server sent more than the range it answered with" in failure["error"]
        done, reached = parts_left(dest)
        assert done == {0}
        assert 1 not in reached
        server.call(plain)
        asked = len(server.traffic.ranges)
        assert run_cli(*sync_args(server, dest, *one)).code == 0

        (large,) = (file for file in server.files() if file.node_rank == 0)
        assert server.traffic.ranges[asked:] == [(large.name, part, 2 * part)]
        assert_exact(mirrored(dest, JOB, large), large)


def test_how_far_a_part_got_is_kept_only_for_a_file_still_in_parts(tmp_path: Path) -> None:
    # A record of how far a part got may come once its file's parts were dropped (an object
    # replaced, a file that failed its check): with --fsync, the record of the parts in flight
    # waits for their files' flush meanwhile. It must neither fail the run nor outlive them.
    manifest = Manifest(tmp_path / "manifest.sqlite3")
    manifest.begin_staging("r/c/0/a", 30, "t", 10)
    manifest.part_reached("r/c/0/a", 1, 15)
    manifest.drop_staging("r/c/0/a")
    manifest.part_reached("r/c/0/a", 2, 25)
    manifest.begin_staging("r/c/0/a", 30, "t", 10)
    staged = manifest.staged("r/c/0/a", 30)
    manifest.close()

    assert staged is not None
    assert staged.reached == {}


def test_a_signal_stops_a_verify_run_in_the_middle_of_reading_back_a_large_file(
    dest: Path,
) -> None:
    # A sparse 32 GiB file, recorded as mirrored: reading it back takes seconds.
    size = 32 << 30
    with ServerThread(job_catalog(checkpoints=1, large_size=size, small_files=0)) as server:
        file = next(f for f in server.files() if f.node_rank == 0)
        final = mirrored(dest, JOB, file)
        final.parent.mkdir(parents=True)
        with final.open("wb") as sparse:
            sparse.truncate(size)
        relative = str(final.relative_to(dest))
        manifest = Manifest(manifest_path(dest))
        manifest.record_verified(
            VerifiedFile(
                path=relative,
                source="baseten-training",
                run=JOB,
                checkpoint=file.name.partition("/")[0],
                node_rank=0,
                size=size,
                last_modified=file.last_modified,
                digest="0" * 32,
            )
        )
        manifest.close()
        process = run_subprocess(*sync_args(server, dest, "--verify", "--node-rank", "0", "--json"))
        wait_for(process, lambda: str(final) in open_files(process.pid))

        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        out, err = process.communicate(timeout=120)

    assert time.monotonic() - stopped < 2
    assert process.returncode == 130, err
    summary = json.loads(out)
    # Not read to its end: neither checked nor found damaged, and still recorded.
    assert (summary["files"]["checked"], summary["files"]["damaged"]) == (0, 0)
    assert [path for path, *_ in manifest_rows(dest)] == [relative]


def open_files(pid: int) -> set[str]:
    """What process ``pid`` has open (nothing once it has ended)."""
    found = set()
    with suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):  # closed meanwhile
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def asleep(pid: int) -> bool:
    """Whether process ``pid``'s main thread sleeps (waits on something), as opposed to running
    or ready to run: once it has opened the lock, the first sleep is its wait's."""
    with suppress(FileNotFoundError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] == "S"
    return False


def test_a_second_run_on_the_same_mirror_exits_5_at_once(server: ServerThread, dest: Path) -> None:
    holder = start(server, dest)
    lock = dest / ".checkpoint-sync" / "lock"
    wait_for(holder, lambda: lock.exists() and lock.read_text().strip() == str(holder.pid))

    began = time.monotonic()
    second = run_cli(*args(server, dest))

    assert second.code == 5
    assert time.monotonic() - began < 2
    assert f"another checkpoint-sync run (pid {holder.pid}) is mirroring into {dest}" in (
        second.stderr
    )
    assert "--wait-lock" in second.stderr
    holder.kill()
    holder.communicate()


def test_wait_lock_waits_for_the_other_run_then_finds_nothing_to_do(
    server: ServerThread, dest: Path
) -> None:
    holder = start(server, dest)
    wait_for(holder, lambda: (dest / ".checkpoint-sync" / "lock").exists())

    began = time.monotonic()
    second = run_cli(*args(server, dest), "--wait-lock", "--json")
    waited = time.monotonic() - began

    assert holder.wait(timeout=10) == 0  # it was left to finish its work
    assert second.code == 0, second.stderr
    assert '"fetched": 0' in second.stdout
    # Its own time counts from the lock: the other run's work (seconds of it) is not its own.
    assert waited > 1
    assert json.loads(second.stdout)["seconds"] < waited - 1
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)


@pytest.mark.parametrize(
    ("signum", "as_json"), [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["text", "json"]
)
def test_a_run_stopped_while_waiting_for_the_lock_says_so_not_a_summary_of_zeros(
    server: ServerThread, dest: Path, signum: signal.Signals, as_json: bool
) -> None:
    holder = start(server, dest)
    lock = dest / ".checkpoint-sync" / "lock"
    wait_for(holder, lambda: lock.exists() and lock.read_text().strip() == str(holder.pid))
    server.call(lambda: setattr(server.faults, "throttle", 1024))  # it holds the lock till killed
    waiting = start(server, dest, "--wait-lock", *(["--json"] if as_json else []))
    # The lock open is the wait begun: nothing awaits between its open and the first try.
    wait_for(waiting, lambda: str(lock) in open_files(waiting.pid))

    waiting.send_signal(signum)
    out, err = waiting.communicate(timeout=20)
    holder.kill()
    holder.communicate()

    assert waiting.returncode == 128 + signum, err
    assert err.decode().splitlines() == [
        f"checkpoint-sync: error: stopped by {signum.name} while waiting for the lock of another "
        f"run (pid {holder.pid}) on this mirror; this run did nothing"
    ]
    if as_json:
        document = json.loads(out)
        assert document["waiting_for_lock"] == {"pid": holder.pid}
        assert document["exit_code"] == 128 + signum
    else:
        assert out == b""


@pytest.mark.parametrize(
    ("signum", "as_json"), [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["text", "json"]
)
def test_a_restore_stopped_half_way_does_not_read_as_restored(
    server: ServerThread, dest: Path, signum: signal.Signals, as_json: bool
) -> None:
    # The summary named the checkpoint and its directory as a finished restore does: a script
    # handing `.checkpoints[0].path` on, or a user reading the line, took it for one.
    process = start(server, dest, "--latest", *(["--json"] if as_json else []))
    staging = dest / ".checkpoint-sync" / "staging"
    wait_for(process, lambda: staging.is_dir() and any(staging.iterdir()))
    process.send_signal(signum)
    out, err = process.communicate(timeout=20)
    again = run_cli(*args(server, dest), "--latest", "--json")

    assert process.returncode == 128 + signum, err
    where, path = f"{JOB}/checkpoint-20", f"{dest}/{JOB}/checkpoint-20"
    if as_json:
        (taken,) = json.loads(out)["checkpoints"]
        assert taken == {
            "checkpoint": where,
            "id": "checkpoint-20",
            "path": path,
            "step": None,
            "metrics": {},
            "complete": False,
        }
    else:
        assert f"\ncheckpoint {where} in {path} is incomplete: the run was stopped\n" in (
            out.decode()
        )
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["checkpoints"][0]["complete"] is True


def test_the_lock_of_a_killed_run_does_not_block(server: ServerThread, dest: Path) -> None:
    holder = start(server, dest)
    lock = dest / ".checkpoint-sync" / "lock"
    wait_for(holder, lambda: lock.exists() and lock.read_text().strip() == str(holder.pid))
    holder.kill()
    holder.communicate()
    server.call(lambda: setattr(server.faults, "throttle", None))

    result = run_cli(*args(server, dest))

    assert result.code == 0, result.stderr
    assert lock.read_text().strip() != str(holder.pid)  # a dead pid left in the file is harmless


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_list_json_stopped_by_a_signal_still_prints_one_document(
    signum: signal.Signals, code: int
) -> None:
    # Every API answer takes 3 s: the run is still listing when the signal comes.
    with ServerThread(job_catalog(), Faults(api_delay=3.0)) as slow:
        process = run_subprocess(
            "list", "--api-url", slow.url, "--project", PROJECT, "--job", JOB, "--json"
        )
        wait_for(process, lambda: slow.traffic.api_requests > 0)
        time.sleep(0.3)
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)

    assert process.returncode == code, err
    assert json.loads(out) == {"exit_code": code, "error": f"stopped by {signum.name}"}
    assert err.decode().splitlines() == [f"checkpoint-sync: error: stopped by {signum.name}"]


def test_demo_json_stopped_after_an_error_names_it_as_sync_does(tmp_path: Path) -> None:
    """As `sync`'s: stopped while another program holds the manifest, the stop cannot record
    how far the parts in flight got. Said in its line before the stop's, and the document's
    `error`, yet the exit is the signal's."""
    dest = tmp_path / "mirror"
    # An 8 MiB part of the first shard at 256 KiB/s: it fills its connection's buffer (written
    # at FLUSH_AT) only after seconds, so nothing records how far it got until the stop writes
    # what it received.
    process = run_subprocess(
        *("demo", "--dest", dest, "--json", "--concurrency", "1"),
        *("--part-size", "8MiB", "--limit-rate", "256KiB"),
    )
    staging = dest / ".checkpoint-sync" / "staging"
    wait_for(process, lambda: staging.is_dir() and any(staging.iterdir()))
    time.sleep(0.5)  # the first answers are in, and what they told committed
    out, err = stop_while_the_manifest_is_held(process, manifest_path(dest))

    assert process.returncode == 130, err
    manifest = f"cannot use the manifest {manifest_path(dest)}: database is locked"
    assert err.decode().splitlines() == [
        f"checkpoint-sync: error: {manifest}",
        "checkpoint-sync: error: stopped by SIGINT",
    ]
    assert json.loads(out) == {"dest": str(dest), "runs": [], "error": manifest}


# The CLI, sent SIGINT once its first part is recorded, and again while it winds down (the
# manifest being closed): a user pressing Ctrl-C twice.
SIGINT_TWICE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as for a run started from a shell
from checkpoint_sync.manifest import Manifest
part_done, close = Manifest.part_done, Manifest.close
def interrupt_once_a_part_is_done(self, path, part):
    part_done(self, path, part)
    Manifest.part_done = part_done
    os.kill(os.getpid(), signal.SIGINT)
def interrupt_again_while_closing(self):
    os.kill(os.getpid(), signal.SIGINT)
    close(self)
Manifest.part_done = interrupt_once_a_part_is_done
Manifest.close = interrupt_again_while_closing
from checkpoint_sync.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigint_while_the_run_winds_down_changes_nothing(
    server: ServerThread, dest: Path
) -> None:
    interrupted = run_scripted(SIGINT_TWICE, server, dest)

    err = interrupted.stderr.decode()
    assert interrupted.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped by SIGINT; rerun to resume" in err
    assert_consistent(server, dest)
    assert_completes_unthrottled(server, dest)


# The CLI, sent SIGINT once its first part is recorded, and SIGNAL once the run is over, before
# the process has exited (the interpreter's shutdown takes tens of milliseconds): Ctrl-C pressed
# twice, or a scheduler's SIGTERM after its SIGINT.
SIGNAL_AFTER_THE_RUN = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as for a run started from a shell
from checkpoint_sync.manifest import Manifest
part_done = Manifest.part_done
def interrupt_once_a_part_is_done(self, path, part):
    part_done(self, path, part)
    Manifest.part_done = part_done
    os.kill(os.getpid(), signal.SIGINT)
Manifest.part_done = interrupt_once_a_part_is_done
from checkpoint_sync.cli import main
code = main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGNAL)
sys.exit(code)
"""


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_signal_after_the_run_changes_nothing(
    server: ServerThread, dest: Path, second: str
) -> None:
    interrupted = run_scripted(SIGNAL_AFTER_THE_RUN.replace("SIGNAL", second), server, dest)

    err = interrupted.stderr.decode()
    assert interrupted.returncode == 130, err  # not killed by the second signal
    assert "Traceback" not in err
    assert "stopped by SIGINT; rerun to resume" in err


# The CLI, sent SIGNAL at MOMENT: as its event loop is about to start, before it listens for
# signals ("start"); once the run is over, as the loop winds down, its tasks, threads and
# asynchronous generators, for milliseconds ("end"); as it writes the run's JSON document, and
# again once `main` has returned, in the interpreter's shutdown ("report"). A Ctrl-C, or a
# scheduler's SIGTERM, at an edge of the run.
SIGNAL_AT_AN_EDGE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as for a run started from a shell
import anyio
from checkpoint_sync import cli
options, run, write_json = cli.loop_options, anyio.run, cli._Output.json
def signalled_as_the_loop_starts():
    os.kill(os.getpid(), signal.SIGNAL)
    return options()
async def signalled_once_over(main):
    await main()
    os.kill(os.getpid(), signal.SIGNAL)
def signalled_as_it_reports(self, payload):
    os.kill(os.getpid(), signal.SIGNAL)
    write_json(self, payload)
if MOMENT == "start":
    cli.loop_options = signalled_as_the_loop_starts
elif MOMENT == "end":
    anyio.run = lambda main, **options: run(signalled_once_over, main, **options)
else:
    cli._Output.json = signalled_as_it_reports
code = cli.main(sys.argv[1:])
if MOMENT == "report":
    os.kill(os.getpid(), signal.SIGNAL)
sys.exit(code)
"""


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["start", "end", "report"])
def test_a_signal_at_an_edge_of_the_run_stops_it_or_changes_nothing(
    server: ServerThread, dest: Path, stop: str, moment: str
) -> None:
    script = SIGNAL_AT_AN_EDGE.replace("SIGNAL", stop).replace("MOMENT", repr(moment))
    ended = run_scripted(script, server, dest, "--json")

    # It was killed, or ended in an internal error ("Cannot close a running event loop"), in
    # "interrupted" (with a traceback, in a second document) after a document that said 0.
    err = ended.stderr.decode()
    if moment == "start":  # before anything was asked for: stopped, as at any other moment
        code = 128 + getattr(signal, stop)
        assert ended.returncode == code, err
        assert err == f"checkpoint-sync: error: stopped by {stop}; rerun to resume\n"
        assert json.loads(ended.stdout)["exit_code"] == code
        assert server.traffic.object_requests == 0
        assert not dest.exists()
    else:  # the run was over: what it ended with stands
        assert ended.returncode == 0, err
        assert err == ""
        assert json.loads(ended.stdout)["exit_code"] == 0
        assert_consistent(server, dest)


# Ctrl-C while the CLI's modules are still loading (the first tenth of a second of a run), as
# MODULE is first imported. `_signal`, not `signal`: the wrapper must not load a module the CLI
# loads itself, or the Ctrl-C could never come while that one loads.
SIGINT_WHILE_LOADING = """
import _signal, importlib.abc, sys
_signal.signal(_signal.SIGINT, _signal.default_int_handler)  # as for a run started from a shell
assert MODULE not in sys.modules, MODULE
class CtrlCWhenItLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:  # once, as a user presses Ctrl-C once
            sys.meta_path.remove(self)
            _signal.raise_signal(_signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlCWhenItLoads())
"""


@pytest.mark.parametrize(
    "module",
    [
        "signal",  # the first module the entry point needs, besides the built-in `sys`
        "checkpoint_sync.cli",  # the first thing `run` does
        "anyio",  # in the middle of the CLI's imports
        # Loaded by pydantic-core's Rust code as it loads: an interrupt there was its panic.
        "datetime",
    ],
)
@pytest.mark.parametrize(
    "entry",
    [
        "import runpy; runpy.run_module('checkpoint_sync', run_name='__main__', alter_sys=True)",
        # What the installed `checkpoint-sync` script does (pyproject's [project.scripts]).
        "from checkpoint_sync.__main__ import run; sys.exit(run())",
    ],
    ids=["python-m", "script"],
)
def test_sigint_while_the_modules_load_is_exit_130_without_a_traceback(
    entry: str, module: str, dest: Path
) -> None:
    script = f"MODULE = {module!r}" + SIGINT_WHILE_LOADING + entry
    interrupted = subprocess.run(
        [sys.executable, "-c", script, "sync", "--dest", str(dest)],
        capture_output=True,
        timeout=60,
    )

    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr == b""
    assert not dest.exists()


# A parent that starts the CLI with SIGNAL blocked, or ignored (`cmd &` in a script ignores
# SIGINT): the mask and the ignored signals survive exec.
EXEC_WITH_SIGNAL_KEPT = """
import os, signal, sys
signum, how = getattr(signal, sys.argv.pop(1)), sys.argv.pop(1)
if how == "blocked":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
else:
    signal.signal(signum, signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "checkpoint_sync", *sys.argv[1:]])
"""


@pytest.mark.parametrize(
    ("name", "how"),
    [("SIGINT", "blocked"), ("SIGINT", "ignored"), ("SIGTERM", "ignored"), ("SIGHUP", "ignored")],
)
def test_a_signal_the_parent_kept_from_the_run_does_not_stop_it(name: str, how: str) -> None:
    # The entry point holds SIGINT back while its modules load; it must give back the mask it
    # was started with, not unblock a signal its parent chose to keep from it. Nor may the run
    # listen for one its parent had it ignore: a Ctrl-C in the terminal is not for a job that
    # a script started in the background.
    with ServerThread(job_catalog(), Faults(api_delay=1.0)) as slow:
        listing = ["list", "--json", "--api-url", slow.url, "--project", PROJECT, "--job", JOB]
        process = subprocess.Popen(
            [sys.executable, "-c", EXEC_WITH_SIGNAL_KEPT, name, how, *listing],
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for(process, lambda: slow.traffic.api_requests > 0)
        process.send_signal(getattr(signal, name))
        out, err = process.communicate(timeout=30)

    assert process.returncode == 0, err
    assert err == b""
    assert json.loads(out)["checkpoints"]


# The CLI, killed (SIGKILL) once it has created the manifest, before it wrote the schema into it.
CRASH_BEFORE_THE_SCHEMA = """
import os, signal, sys
from checkpoint_sync.manifest import Manifest
def die(self):
    os.kill(os.getpid(), signal.SIGKILL)
Manifest._migrate = die
from checkpoint_sync.cli import main
main(sys.argv[1:])
"""


def test_a_manifest_left_without_its_schema_reads_as_empty(dest: Path) -> None:
    with ServerThread(job_catalog(checkpoints=1)) as server:
        crashed = run_scripted(CRASH_BEFORE_THE_SCHEMA, server, dest)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        assert (dest / ".checkpoint-sync" / "manifest.sqlite3").exists()

        dry_run = run_cli(*args(server, dest), "--dry-run", "--json")
        listed = run_cli(
            "list",
            "--api-url",
            server.url,
            "--project",
            PROJECT,
            "--job",
            JOB,
            "--dest",
            str(dest),
            "--json",
        )

        assert dry_run.code == 0, dry_run.stderr
        assert json.loads(dry_run.stdout)["files"]["to_fetch"] == len(server.files())
        assert listed.code == 0, listed.stderr
        assert {c["local"] for c in json.loads(listed.stdout)["checkpoints"]} == {"absent"}
        assert run_cli(*args(server, dest)).code == 0


@pytest.mark.parametrize(
    "argv",
    [["sync", "--json"], ["sync", "--no-such-flag", "--json"], ["--version"]],
    ids=["usage-error-json", "bad-argument-json", "version"],
)
def test_a_closed_stdout_exits_quietly_whatever_was_to_be_printed(argv: list[str]) -> None:
    # `checkpoint-sync ... | head -0`: the reader is gone before the first byte is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "checkpoint_sync", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)

    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"Exception ignored" not in done.stderr


def test_a_stopped_run_says_which_checkpoints_landed_whole(dest: Path) -> None:
    # A stop read every checkpoint the run took as incomplete, even one whose files had all
    # landed once the job's listing was walked to its end; one with a file still in flight is.
    with ServerThread(job_catalog(checkpoints=2), Faults(stall_seconds=60)) as server:
        # The last one listed, of each rank (they share a name).
        stalled = server.files()[-1].name
        server.faults.hook = lambda name, start, end: "stall" if name == stalled else None
        process = start(server, dest, "--json")
        others = [f for f in server.files() if f.name != stalled]
        wait_for(process, lambda: all(mirrored(dest, JOB, f).exists() for f in others))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)

    assert process.returncode == 130, err
    complete = {c["checkpoint"]: c["complete"] for c in json.loads(out)["checkpoints"]}
    assert complete == {f"{JOB}/checkpoint-10": True, f"{JOB}/checkpoint-20": False}
    assert stalled.startswith("checkpoint-20/")
    assert not any(mirrored(dest, JOB, f).exists() for f in server.files() if f.name == stalled)
