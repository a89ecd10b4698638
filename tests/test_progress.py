"""What the plain progress lines and the summary say."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from checkpoint_sync.engine import SyncOptions, sync
from checkpoint_sync.errors import LocalIOError, NotFoundError
from checkpoint_sync.localserver import Faults
from checkpoint_sync.net import NetSettings
from checkpoint_sync.plan import FileFilter, Selection, select_checkpoints
from checkpoint_sync.progress import (
    Listing,
    LogLines,
    Stats,
    Taken,
    bytes_done,
    bytes_total,
    counted_files,
    human_bytes,
    human_rate,
    incompleteness,
    listing_note,
    log_interval,
    status_line,
    summary,
    summary_line,
    terminal_line,
    told_by,
)
from checkpoint_sync.sources.baseten_training import TrainingJobSource
from checkpoint_sync.transfer import TransferSettings
from checkpoint_sync.wire import HttpClient

from .conftest import JOB, PROJECT, job_catalog
from .support import ServerThread, api_client, first_answers, trusted_tls
from .test_local_errors import fill, mounted


@pytest.mark.anyio
async def test_log_lines_report_counts_at_each_interval() -> None:
    stats = Stats(files_fetched=3, files_skipped=2, files_failed=1, bytes_fetched=5 << 20)
    lines: list[str] = []
    with anyio.move_on_after(0.2):
        await LogLines(lines.append, interval=lambda elapsed: 0.05).run(stats)
    assert len(lines) >= 2
    assert "5.0 MiB fetched" in lines[0]
    assert "files 3 done, 2 skipped, 1 failed (still listing)" in lines[0]


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [
        (0, 10),
        (59.9, 10),
        (60, 30),
        (599, 30),
        (600, 60),
        (3599, 60),
        (3600, 300),
        (86_400, 300),
    ],
)
def test_plain_status_lines_come_less_often_as_the_run_goes_on(
    elapsed: float, interval: float
) -> None:
    assert log_interval(elapsed) == interval


def test_a_three_hour_run_writes_about_a_hundred_plain_status_lines() -> None:
    at, lines = 0.0, 0
    while (at := at + log_interval(at)) <= 3 * 3600:
        lines += 1
    assert lines == 6 + 18 + 50 + 24  # not 1,080, one every 10 seconds


@pytest.mark.parametrize(
    ("counts", "total"),
    [
        # Not listed whole, nothing counted ahead: not known.
        ({"bytes_to_fetch": 60, "bytes_walked": 100}, None),
        # Counted ahead: what is planned, and all the planning has not reached, as to fetch.
        ({"bytes_to_fetch": 60, "bytes_walked": 100, "bytes_counted": 300}, (260, "~")),
        # Planned as far as counted (or further: the listing grew meanwhile).
        ({"bytes_to_fetch": 60, "bytes_walked": 100, "bytes_counted": 100}, (60, "~")),
        ({"bytes_to_fetch": 60, "bytes_walked": 120, "bytes_counted": 100}, (60, "~")),
        # Listed whole: what was planned, whatever was counted.
        ({"bytes_to_fetch": 60, "bytes_counted": 300, "listing": Listing.DONE}, (60, "")),
        # The listing failed part way: what was planned is all the run fetches.
        ({"bytes_to_fetch": 60, "bytes_walked": 100, "listing": Listing.FAILED}, (60, "")),
        (
            {
                "bytes_to_fetch": 60,
                "bytes_walked": 100,
                "bytes_counted": 300,
                "listing": Listing.FAILED,
            },
            (60, ""),
        ),
        ({"listing": Listing.DONE}, (0, "")),
        # Stopped with the run (a full disk): no file is planned after those.
        (
            {
                "bytes_to_fetch": 60,
                "bytes_walked": 100,
                "bytes_counted": 300,
                "listing": Listing.STOPPED,
            },
            (60, ""),
        ),
    ],
)
def test_the_bytes_to_fetch_are_estimated_until_the_listing_is_done(
    counts: dict[str, int | Listing], total: tuple[int, str] | None
) -> None:
    stats = Stats()
    for name, count in counts.items():
        setattr(stats, name, count)
    assert bytes_total(stats) == total


@pytest.mark.parametrize(
    ("listing", "note"),
    [
        (Listing.WALKING, " (still listing)"),
        (Listing.DONE, ""),
        (Listing.FAILED, " (listing failed)"),
        (Listing.STOPPED, " (listing stopped)"),
    ],
)
def test_the_note_on_the_files_says_how_the_listing_stands(listing: Listing, note: str) -> None:
    assert listing_note(Stats(listing=listing)) == note


@pytest.mark.parametrize(
    ("ends", "listing"),
    [
        ([], Listing.WALKING),
        ([Listing.STOPPED], Listing.STOPPED),
        # A listing that failed was not walking when the run stopped.
        ([Listing.FAILED, Listing.STOPPED], Listing.FAILED),
        # One walked whole whose checks then failed was walked whole.
        ([Listing.DONE, Listing.FAILED], Listing.DONE),
    ],
)
def test_the_listing_ends_the_first_way_it_ended(ends: list[Listing], listing: Listing) -> None:
    stats = Stats()
    for how in ends:
        stats.end_listing(how)
    assert stats.listing is listing


@asynccontextmanager
async def two_files_a_page(
    server: ServerThread,
) -> AsyncIterator[tuple[TrainingJobSource, Selection, HttpClient]]:
    """The job's listing, two files a page, its checkpoints selected, and a client for files."""
    async with (
        api_client(server.url) as api,
        HttpClient(NetSettings(connect_timeout=5, read_timeout=5)) as http,
    ):
        source = TrainingJobSource(api, PROJECT, JOB, page_size=2)
        yield source, select_checkpoints(await source.checkpoints()), http


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_bytes_of_a_body_still_coming_count_before_a_buffer_of_them_is_written(
    scheme: str, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half of a 1 MiB file comes, then the server stalls: far less than the receive buffer
    # hands on at once, so none of it is written yet, yet the line must not stand at nothing.
    catalog = job_catalog(checkpoints=1, large_files=1, large_size=1 << 20, small_files=0)
    tls = trusted_tls(tmp_path, monkeypatch, "SSL_CERT_FILE") if scheme == "https" else None
    with ServerThread(catalog, Faults(hook=lambda *_: "stall"), tls=tls) as server:
        async with (
            api_client(server.url) as api,
            HttpClient(NetSettings(read_timeout=60)) as http,
        ):
            source = TrainingJobSource(api, PROJECT, JOB)
            selection = select_checkpoints(await source.checkpoints())
            files = FileFilter(ranks=frozenset({0}))
            stats = Stats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sync, source, selection, http, SyncOptions(dest, files=files), stats)
                with anyio.fail_after(20):
                    while bytes_done(stats) < 512 << 10:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                done, written = bytes_done(stats), stats.bytes_fetched
                tg.cancel_scope.cancel()

    assert (done, written) == (512 << 10, 0)


@pytest.mark.anyio
async def test_the_bytes_done_never_go_back_while_a_buffer_is_written_behind(
    dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 8 MiB over HTTPS are decrypted on the loop and written a buffer at a time by a
    # worker thread: while a buffer is written, its bytes must still count, as they did while
    # they were held, until the file has taken them.
    catalog = job_catalog(checkpoints=1, large_files=1, large_size=32 << 20, small_files=0)
    with ServerThread(catalog, tls=trusted_tls(tmp_path, monkeypatch, "SSL_CERT_FILE")) as server:
        async with api_client(server.url) as api, HttpClient(NetSettings()) as http:
            source = TrainingJobSource(api, PROJECT, JOB)
            selection = select_checkpoints(await source.checkpoints())
            options = SyncOptions(
                dest,
                files=FileFilter(ranks=frozenset({0})),
                transfer=TransferSettings(part_size=8 << 20),
            )
            stats = Stats()
            readings: list[int] = []

            async def watch() -> None:
                while True:
                    readings.append(bytes_done(stats))
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await sync(source, selection, http, options, stats)
                tg.cancel_scope.cancel()

    assert stats.files_fetched == 1
    assert readings[-1] == 32 << 20
    assert [(a, b) for a, b in pairwise(readings) if b < a] == []


@pytest.mark.anyio
async def test_a_restore_held_up_by_its_downloads_knows_its_total_while_still_listing(
    dest: Path,
) -> None:
    # Rank 0 of a checkpoint of 1 MiB files, two a page from an API 0.1 s late, two downloads
    # at a time and slow: the queue holds the listing up until the last two files start.
    catalog = job_catalog(checkpoints=1, large_files=6, large_size=1 << 20, small_files=0)
    rank_0 = sum(f.size for f in catalog.files() if f.node_rank == 0)
    with ServerThread(catalog, Faults(api_delay=0.1, throttle=256 << 10)) as server:
        async with two_files_a_page(server) as (source, selection, http):
            files = FileFilter(ranks=frozenset({0}))
            options = SyncOptions(dest=dest, concurrency=2, files=files, count_ahead=True)
            stats = Stats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sync, source, selection, http, options, stats)
                with anyio.fail_after(20):
                    while (total := bytes_total(stats)) is None:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                still_listing = stats.listing is Listing.WALKING
                server.call(lambda: setattr(server.faults, "throttle", None))

    assert still_listing
    assert total == (rank_0, "~")  # none of them mirrored yet: the estimate is the whole
    assert bytes_total(stats) == (rank_0, "")
    assert (stats.files_to_fetch, stats.files_fetched) == (6, 6)
    assert stats.listings_changed == []


@pytest.mark.anyio
async def test_a_listing_that_fails_after_it_was_counted_shows_what_was_planned(
    dest: Path,
) -> None:
    # As above, both ranks: 40 files on 20 pages. Once the count is in, the API refuses the
    # rest of the listing (the job deleted): the files queued still land, and the line shows
    # them as all there is to fetch.
    catalog = job_catalog(checkpoints=1, large_files=20, large_size=256 << 10, small_files=0)
    with ServerThread(catalog, Faults(api_delay=0.1, throttle=512 << 10)) as server:
        async with two_files_a_page(server) as (source, selection, http):
            options = SyncOptions(dest=dest, concurrency=2, count_ahead=True)
            stats = Stats()
            failed: list[NotFoundError] = []

            async def run() -> None:
                try:
                    await sync(source, selection, http, options, stats)
                except NotFoundError as exc:
                    failed.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                with anyio.fail_after(20):
                    while bytes_total(stats) is None:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    server.call(lambda: server.faults.api_faults.extend(["404"] * 20))
                    while stats.listing is not Listing.FAILED:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                shown = status_line(stats), terminal_line(stats, 200)
                landing = stats.files_fetched < stats.files_to_fetch
                server.call(lambda: setattr(server.faults, "throttle", None))

    assert len(failed) == 1  # the listing, reported once the files queued landed
    assert landing  # the line was taken while queued files were still coming
    assert 0 < stats.files_to_fetch == stats.files_fetched < 40
    planned = human_bytes(stats.bytes_to_fetch)
    plain, terminal = shown
    assert f" of {planned}, " in terminal  # not "of ~10.0 MiB", the count's
    assert "~" not in plain + terminal
    assert plain.endswith(" (listing failed)")
    assert terminal.endswith(" (listing failed)")


@pytest.mark.anyio
async def test_a_listing_cut_short_by_a_full_disk_is_not_shown_as_still_listing(
    tmp_path: Path,
) -> None:
    # Two files a page from an API 0.1 s late: the first file queued finds no room (less than
    # the manifest's reserve is free) while the next page is awaited. The run stops; its line
    # must not promise more files.
    catalog = job_catalog(checkpoints=1, large_files=4, large_size=256 << 10, small_files=0)
    with (
        mounted(tmp_path / "disk", "tmpfs", "size=8m") as disk,
        ServerThread(catalog, Faults(api_delay=0.1)) as server,
    ):
        fill(disk, leaving=2 << 20)
        async with two_files_a_page(server) as (source, selection, http):
            stats = Stats()
            with pytest.raises(LocalIOError, match="not enough space"):
                await sync(source, selection, http, SyncOptions(dest=disk / "mirror"), stats)

    assert 0 < stats.files_listed < len(list(catalog.files()))  # cut short
    assert status_line(stats).endswith(" (listing stopped)")
    assert terminal_line(stats, 200).endswith(" (listing stopped)")


@pytest.mark.anyio
async def test_large_parts_spliced_into_their_files_show_as_they_come(dest: Path) -> None:
    # Two 8 MiB parts over plain HTTP, which the kernel moves from the socket into the file:
    # each stalls half way. The display counts the halves in, before either body has ended.
    part = 8 << 20
    catalog = job_catalog(checkpoints=1, large_files=1, large_size=2 * part, small_files=0)
    with ServerThread(catalog, Faults(stall_seconds=30)) as server:
        server.faults.hook = first_answers(2, "stall")
        async with two_files_a_page(server) as (source, selection, http):
            options = SyncOptions(
                dest=dest,
                files=FileFilter(ranks=frozenset({0})),
                transfer=TransferSettings(part_size=part),
            )
            stats = Stats()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sync, source, selection, http, options, stats)
                with anyio.fail_after(20):
                    while bytes_done(stats) < part:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                shown = status_line(stats), terminal_line(stats, 200)
                fetched = stats.bytes_fetched
                tg.cancel_scope.cancel()

    # Counted as received: only what came with each answer's head, before the splice began.
    assert fetched < part // 2
    assert shown[0].startswith("8.0 MiB of 16.0 MiB at ")
    assert " 8.0 MiB of 16.0 MiB, " in shown[1]


def test_status_line_gives_an_eta_once_the_listing_is_done() -> None:
    stats = Stats(bytes_fetched=10 << 20, bytes_to_fetch=20 << 20, listing=Listing.DONE)
    assert "ETA" in status_line(stats)
    assert "still listing" not in status_line(stats)


def test_status_line_gives_an_estimated_eta_while_still_listing() -> None:
    stats = Stats(bytes_fetched=40 * MiB, bytes_to_fetch=60 * MiB, bytes_walked=100 * MiB)
    stats.bytes_counted = 300 * MiB
    stats.started = time.monotonic() - 10
    assert ", ETA ~55s; " in status_line(stats)
    assert status_line(stats).endswith("(still listing)")


MiB = 1 << 20


@pytest.mark.parametrize(
    ("counts", "eta"),
    [
        # A large file half in: its bytes count before it is published.
        ({"bytes_fetched": 40 * MiB}, "ETA 15s"),
        ({"bytes_fetched": 40 * MiB, "bytes_published": 40 * MiB}, "ETA 15s"),
        # Parts kept from an earlier run are done; they are no bytes a second.
        ({"bytes_fetched": 40 * MiB, "bytes_resumed": 40 * MiB}, "ETA 5s"),
        # Nothing received yet: no rate to tell it by.
        ({"bytes_resumed": 40 * MiB}, None),
        # Skipped files neither.
        ({"bytes_fetched": 40 * MiB, "bytes_skipped": 1000 * MiB}, "ETA 15s"),
        # Bytes received twice (a retry) do not make the rest negative.
        ({"bytes_fetched": 110 * MiB}, None),
    ],
)
def test_the_eta_counts_what_is_in_at_the_rate_received(
    counts: dict[str, int], eta: str | None
) -> None:
    stats = Stats(bytes_to_fetch=100 * MiB, listing=Listing.DONE)
    for name, count in counts.items():
        setattr(stats, name, count)
    stats.started = time.monotonic() - 10  # 4 MiB/s for the 40 MiB
    shown = status_line(stats)
    assert (eta in shown) if eta else "ETA" not in shown


@pytest.mark.parametrize(
    ("counts", "shown"),
    [
        # Rates in MB/s, as the summary's and bench's: 40 MiB in 10 seconds.
        (
            {"bytes_fetched": 40 * MiB, "files_fetched": 3},
            "40.0 MiB fetched at 4.2 MB/s; files 3 done, 0 skipped, 0 failed (still listing)",
        ),
        (
            {"listing": Listing.DONE, "files_skipped": 5},
            "0 B fetched at 0 B/s; files 0 done, 5 skipped, 0 failed",
        ),
        # Once the total is known, the bytes done of it, as on a terminal; parts kept from an
        # earlier run are done, though no rate.
        (
            {
                "bytes_fetched": 40 * MiB,
                "bytes_resumed": 20 * MiB,
                "bytes_to_fetch": 100 * MiB,
                "listing": Listing.DONE,
                "files_fetched": 3,
            },
            "60.0 MiB of 100.0 MiB at 4.2 MB/s, ETA 10s; files 3 done, 0 skipped, 0 failed",
        ),
        # Estimated by a walk ahead while still listing: marked "~", as the ETA is.
        (
            {
                "bytes_fetched": 40 * MiB,
                "bytes_to_fetch": 60 * MiB,
                "bytes_walked": 100 * MiB,
                "bytes_counted": 300 * MiB,
                "files_fetched": 3,
            },
            "40.0 MiB of ~260.0 MiB at 4.2 MB/s, ETA ~55s; files 3 done, 0 skipped, 0 failed "
            "(still listing)",
        ),
        # The listing failed: what was planned is the whole.
        (
            {
                "bytes_fetched": 40 * MiB,
                "bytes_to_fetch": 60 * MiB,
                "listing": Listing.FAILED,
                "files_fetched": 3,
            },
            "40.0 MiB of 60.0 MiB at 4.2 MB/s, ETA 5s; files 3 done, 0 skipped, 0 failed "
            "(listing failed)",
        ),
    ],
)
def test_status_line(counts: dict[str, int | Listing], shown: str) -> None:
    stats = Stats(started=time.monotonic() - 10)
    for name, count in counts.items():
        setattr(stats, name, count)
    assert status_line(stats) == shown


@pytest.mark.parametrize(
    ("counts", "dry_run", "shown"),
    [
        (
            {"files_fetched": 3, "bytes_fetched": 40 * MiB, "bytes_published": 40 * MiB},
            False,
            "fetched 3 files (40.0 MiB) into /m in 10.0s at 4.2 MB/s; "
            "skipped 0 unchanged (0 B); 0 failed",
        ),
        # Nothing received: no rate.
        (
            {"files_skipped": 42, "bytes_skipped": 42 * MiB},
            False,
            "fetched 0 files (0 B) into /m in 10.0s; skipped 42 unchanged (42.0 MiB); 0 failed",
        ),
        # A dry run's is a plan, all of it, and its time is the planning's, no forecast.
        (
            {
                "files_to_fetch": 1,
                "bytes_to_fetch": MiB,
                "files_skipped": 42,
                "bytes_skipped": 42 * MiB,
                "files_failed": 2,
            },
            True,
            "would fetch 1 file (1.0 MiB) into /m; would skip 42 unchanged (42.0 MiB); "
            "2 failed; planned in 10.0s",
        ),
    ],
)
def test_summary_line(counts: dict[str, int], dry_run: bool, shown: str) -> None:
    stats = Stats(started=time.monotonic() - 10)
    for name, count in counts.items():
        setattr(stats, name, count)
    assert summary_line(stats, "/m", dry_run=dry_run) == shown


def test_summary_keeps_failures_and_left_out_checkpoints() -> None:
    stats = Stats(syncing_left_out=["job/checkpoint-30"])
    stats.fail("job/c/0/a.bin", "HTTP 500")
    report = summary(stats, None)
    assert report["files"]["failed"] == 1
    assert report["failures"] == [{"path": "job/c/0/a.bin", "error": "HTTP 500"}]
    assert report["syncing_left_out"] == ["job/checkpoint-30"]


def test_a_run_waiting_for_the_lock_says_so_and_whose() -> None:
    stats = Stats(waiting_for="4242")
    assert status_line(stats) == "waiting for the mirror's lock, held by another run (pid 4242)"


def test_a_verify_run_shows_how_far_its_read_back_is() -> None:
    stats = Stats(files_skipped=3, files_to_check=10, files_checked=4, listing=Listing.DONE)
    assert "files 0 done, 3 skipped, 0 failed, 4 of 10 checked" in status_line(stats)
    assert "checked" not in status_line(Stats(files_skipped=3))


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 << 20, "1.5 GiB"),
        (1023 << 30, "1023.0 GiB"),
        ((1 << 20) - 1, "1.0 MiB"),  # not 1024.0 KiB: the unit is the figure's as shown
        (1023.6, "1.0 KiB"),
        (5 << 40, "5.0 TiB"),
        (3 << 50, "3072.0 TiB"),  # no unit past TiB
    ],
)
def test_human_bytes(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        (0, "0 B/s"),
        (999, "999 B/s"),
        (1000, "1.0 kB/s"),
        (20 * 1024, "20.5 kB/s"),  # --limit-rate 20KiB: not 0.0 MB/s
        (999.4, "999 B/s"),
        (999.5, "1.0 kB/s"),  # not 1000 B/s: the unit is chosen by the figure shown
        (999_949, "999.9 kB/s"),
        (999_950, "1.0 MB/s"),  # not 1000.0 kB/s
        (1e6, "1.0 MB/s"),
        (1_524_300_000, "1524.3 MB/s"),  # MB/s as the summary, --json and bench give it
    ],
)
def test_human_rate(rate: float, shown: str) -> None:
    assert human_rate(rate) == shown


@pytest.mark.parametrize(
    ("taken", "told"),
    [
        (Taken("c", "/d/run/c"), ""),  # Baseten's: neither step nor metrics
        (Taken("c", None, 30, {"reward": 0.9, "loss": 0.5}), " (step 30; reward 0.9, loss 0.5)"),
        (Taken("c", None, 0, {}), " (step 0)"),
        (Taken("c", None, None, {"loss": 1 / 3}), " (loss 0.3333)"),
    ],
)
def test_a_checkpoint_taken_is_told_with_what_chose_it(taken: Taken, told: str) -> None:
    assert told_by(taken) == told


@pytest.mark.parametrize(
    ("count", "kind", "said"),
    [
        (0, "", "0 files"),
        (1, "", "1 file"),
        (2, "", "2 files"),
        (1, "mirrored ", "1 mirrored file"),
    ],
)
def test_a_count_of_files_is_said_of_one_or_of_several(count: int, kind: str, said: str) -> None:
    assert counted_files(count, kind) == said


@pytest.mark.parametrize(
    ("stopped", "error", "where", "missing"),
    [
        (False, False, "job/c-30", None),
        (False, False, "job/c-1", None),  # not c-10, whose name it begins
        (True, False, "job/c-30", "the run was stopped"),
        (True, True, "job/c-10", "the run was stopped"),  # the stop was asked for: it is said
        (False, True, "job/c-30", "the run stopped on an error"),
        (False, True, "job/c-10", "the run stopped on an error"),
        (False, False, "job/c-20", "1 file failed"),  # unsure too: its failure says more
        (False, False, "job/c-10", "2 files failed"),
        (False, False, "job/c-40", "its listing kept changing"),  # no failure names it
        (True, False, "job/c-40", "the run was stopped"),
    ],
)
def test_a_run_says_why_a_checkpoint_may_not_be_whole(
    stopped: bool, error: bool, where: str, missing: str | None
) -> None:
    taken = ("job/c-1", "job/c-10", "job/c-20", "job/c-30", "job/c-40")
    stats = Stats(taken={c: Taken(c, None) for c in taken})
    for failed in ("job/c-10/0/a.bin", "job/c-10", "job/c-20/1/b.bin", "job/c-3/0/c.bin"):
        stats.fail(failed, "HTTP 500")  # c-10's listing entry, and a checkpoint not taken
    stats.unsure = {"job/c-40": "its listing kept changing", "job/c-20": "its listing changed"}
    assert incompleteness(stats, where, stopped=stopped, error=error) == missing


@pytest.mark.parametrize(
    ("listing", "where", "missing"),
    [
        # Walked to its end before the stop: a checkpoint none of whose files is still queued
        # is whole; one with a file in flight, or one that failed, is not.
        (Listing.DONE, "job/c-1", None),
        (Listing.DONE, "job/c-10", "the run was stopped"),
        (Listing.DONE, "job/c-20", "1 file failed"),
        (Listing.DONE, "job/c-30", None),  # its files all skipped, or done before the stop
        # Before its end: any checkpoint may have files not listed yet.
        (Listing.WALKING, "job/c-1", "the run was stopped"),
        (Listing.WALKING, "job/c-30", "the run was stopped"),
        (Listing.STOPPED, "job/c-1", "the run was stopped"),
        (Listing.FAILED, "job/c-1", "the run was stopped"),
    ],
)
def test_a_stopped_run_says_whole_only_a_checkpoint_walked_and_landed(
    listing: Listing, where: str, missing: str | None
) -> None:
    stats = Stats(
        taken={c: Taken(c, None) for c in ("job/c-1", "job/c-10", "job/c-20", "job/c-30")}
    )
    stats.end_listing(listing)
    # Queued: one file of c-1 (landed), two of c-10 (one landed) and one of c-20 (failed).
    stats.queued_in.update({"job/c-1": 0, "job/c-10": 1, "job/c-20": 0})
    stats.fail("job/c-20/0/a.bin", "HTTP 500")
    assert incompleteness(stats, where, stopped=True, error=False) == missing
