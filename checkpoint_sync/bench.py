"""``checkpoint-sync bench``: download throughput of an endpoint on this machine, and the settings
that get the most of it.

Each trial is a real sync, through the same engine, of a byte budget of the selected files into a
fresh scratch directory that is removed afterwards; trials differ in concurrency and part size.
Every setting is tried once a round, the rounds one after the other, so that a link or a machine
that slows down for a while weighs on every setting alike; a setting is judged by its median.
The files are listed before each trial, outside its clock, which runs only while it fetches: a
listing made once for all would hand later trials presigned URLs expired since.
Requests are timed on the way (`Stats.timed`): time to first byte, and each connection's rate.
A trial that ends with an error is one the table shows as failed, unless the error ends every
trial to come (`stops_bench`) or came as a signal stopped the bench.
Settings the files cannot tell apart (parts larger than every file, more connections than parts)
fetch alike (`transfer_of`): the larger is shown as the same as the smaller, and recommended
only where the smaller had a file or a round fail.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence, Set
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import anyio

from .engine import SyncOptions, sync
from .errors import (
    AuthError,
    CheckpointSyncError,
    LocalIOError,
    NotFoundError,
    RequestRejectedError,
    UsageError,
)
from .net import NetSettings
from .plan import FileFilter, Selection, Tally
from .progress import Stats
from .retry import RetryPolicy
from .sources.base import (
    Available,
    Checkpoint,
    FileKey,
    FilePages,
    Listed,
    Relisted,
    RemoteFile,
    Source,
    UnreadableEntry,
    file_key,
)
from .transfer import TransferSettings
from .wire import HttpClient

# A request carrying less than this says more about latency than about the connection's rate.
RATE_MIN_BYTES = 1 << 20
# Trials within this share of the fastest count as equal; the one asking less of the host wins.
TIE = 0.05


class Transfer(NamedTuple):
    """What a trial's setting does with its files."""

    in_flight: int  # the most requests it has in flight
    cut: int | None  # the size it cuts files by; None: it cuts none, every file is one part
    # Its files' sizes, hashed: trials that listed other files (a checkpoint made meanwhile)
    # fetched otherwise, however alike the rest.
    sizes: int


def transfer_of(concurrency: int, part_size: int, sizes: Sequence[int]) -> Transfer:
    """How a trial of ``concurrency`` and ``part_size`` fetches files of ``sizes``. A part size
    above every file's cuts none of them, as any other such does; connections beyond the parts
    (an empty file is one) are never used."""
    parts = sum(max(1, -(-size // part_size)) for size in sizes)
    cut = part_size if any(size > part_size for size in sizes) else None
    return Transfer(min(concurrency, parts), cut, hash(tuple(sorted(sizes))))


@dataclass(frozen=True)
class Trial:
    concurrency: int
    part_size: int
    files: int
    failed: int
    bytes: int
    seconds: float
    cpu_seconds: float
    first_byte_ms: float | None  # median over requests
    connection_mb_s: float | None  # median over requests of at least RATE_MIN_BYTES
    # "path: why" of the trial's first failed file: a count alone does not say what to fix.
    first_failure: str | None = None
    # Requests that failed and were asked again: their waits are in the seconds, and a setting
    # whose MB/s they lowered would otherwise look merely slow.
    retries: int = 0
    # `transfer_of` its files: trials alike in it differ only by chance.
    transfer: Transfer | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class FailedTrial:
    """A trial that an error ended (the listing's retries used up, a full scratch disk): it
    measured nothing."""

    concurrency: int
    part_size: int
    error: CheckpointSyncError


@dataclass(frozen=True)
class Setting:
    """One (concurrency, part size) pair and its trials, one a round: a row of the table. Its
    figures are of the rounds measured (None where none was)."""

    trials: tuple[Trial | FailedTrial, ...]

    @property
    def concurrency(self) -> int:
        return self.trials[0].concurrency

    @property
    def part_size(self) -> int:
        return self.trials[0].part_size

    @property
    def measured(self) -> list[Trial]:
        return measured(self.trials)

    @property
    def errors(self) -> list[tuple[int, CheckpointSyncError]]:
        """The rounds (from 1) that an error ended, and the error."""
        return [(n, t.error) for n, t in enumerate(self.trials, 1) if isinstance(t, FailedTrial)]

    @property
    def middle(self) -> Trial | None:
        """The round whose figures its row shows: `middle_round`."""
        return middle_round(self.measured)

    @property
    def mb_per_s(self) -> float | None:
        middle = self.middle
        return None if middle is None else middle.mb_per_s

    @property
    def spread(self) -> tuple[float, float] | None:
        """The slowest and the fastest round's MB/s."""
        rates = [t.mb_per_s for t in self.measured]
        return (min(rates), max(rates)) if rates else None

    @property
    def failed(self) -> int | None:
        """Files that failed in its worst round (each round fetches the same files)."""
        return max((t.failed for t in self.measured), default=None)

    @property
    def first_failure(self) -> str | None:
        return next((t.first_failure for t in self.measured if t.first_failure), None)

    @property
    def transfer(self) -> Transfer | None:
        """Its rounds' `Trial.transfer`, None unless they measured one and the same."""
        transfers = {t.transfer for t in self.measured}
        return transfers.pop() if len(transfers) == 1 else None


def measured(trials: Iterable[Trial | FailedTrial]) -> list[Trial]:
    """The trials that ended with figures."""
    return [t for t in trials if isinstance(t, Trial)]


def middle_round(trials: Sequence[Trial]) -> Trial | None:
    """The round of median MB/s (of the two in the middle, the slower), None of none.

    A setting's row shows this one round's figures, its files and bytes with its MB/s: medians
    taken figure by figure can pair the files of one round with the bytes of another, a round
    that never was. By MB/s, not seconds: a round where a file failed fetched fewer bytes in
    fewer seconds, and MB/s is what settings are ranked by."""
    by_rate = sorted(trials, key=lambda t: t.mb_per_s)
    return by_rate[(len(by_rate) - 1) // 2] if by_rate else None


def stops_bench(error: CheckpointSyncError) -> bool:
    """Whether ``error``, ending one trial, makes every trial after it pointless: the key is
    refused, the source or the selection is not there, the API or the configuration refuses
    what every trial would ask. Anything else (retries used up, a full scratch disk, an answer
    off the API's schema) may be that trial's alone: the others go on."""
    return isinstance(error, AuthError | NotFoundError | RequestRejectedError | UsageError)


def grid(concurrencies: Sequence[int], part_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Every (concurrency, part size) pair, once, in a stable order."""
    return list(dict.fromkeys((c, p) for p in part_sizes for c in concurrencies))


def settings_of(trials: Sequence[Trial | FailedTrial]) -> list[Setting]:
    """``trials`` grouped by setting, in the order the settings were first tried."""
    grouped: dict[tuple[int, int], list[Trial | FailedTrial]] = {}
    for trial in trials:
        grouped.setdefault((trial.concurrency, trial.part_size), []).append(trial)
    return [Setting(tuple(group)) for group in grouped.values()]


def same_as(settings: Sequence[Setting]) -> dict[tuple[int, int], Setting]:
    """Each setting that fetched its files as one with fewer connections or smaller parts did
    (its `Setting.transfer`), by (concurrency, part size), and the least of those: its figures
    differ from that one's only by chance."""
    least: dict[Transfer, Setting] = {}
    for setting in sorted(settings, key=lambda s: (s.concurrency, s.part_size)):
        if setting.transfer is not None:
            least.setdefault(setting.transfer, setting)
    return {
        (s.concurrency, s.part_size): alike
        for s in settings
        if s.transfer is not None and (alike := least[s.transfer]) is not s
    }


def _eligible(settings: Sequence[Setting]) -> list[tuple[float, Setting]]:
    """The settings whose every trial ended, with their median MB/s; of them the clean ones,
    where any is; of those, none that fetched as another of them with fewer connections or
    smaller parts did (`same_as`)."""
    ended = [(rate, s) for s in settings if not s.errors and (rate := s.mb_per_s) is not None]
    clean = [(rate, s) for rate, s in ended if not s.failed] or ended
    alike = same_as([s for _, s in clean])
    return [(rate, s) for rate, s in clean if (s.concurrency, s.part_size) not in alike]


def recommend(settings: Sequence[Setting]) -> Setting | None:
    """Of the settings whose every trial ended (none if none did), the fastest clean one (by
    median); of those within `TIE` of it, the fewest connections and parts. Never one that
    fetched as a smaller one of those did: its larger parts or connections went unused."""
    eligible = _eligible(settings)
    if not eligible:
        return None
    best = max(rate for rate, _ in eligible)
    close = [s for rate, s in eligible if rate >= best * (1 - TIE)]
    return min(close, key=lambda s: (s.concurrency, -s.part_size))


def fastest_not_recommended(settings: Sequence[Setting]) -> Setting | None:
    """The fastest of the settings `recommend` chooses from, where it chose another within
    `TIE` of it: a row faster than the one recommended, which the recommendation must explain."""
    chosen = recommend(settings)
    top = max(_eligible(settings), key=lambda entry: entry[0], default=(0.0, None))[1]
    return None if top is chosen or top is None or chosen is None else top


def request_medians(
    timings: Sequence[tuple[float, int, float]],
) -> tuple[float | None, float | None]:
    """Median time to first byte (ms) and median per-connection rate (MB/s)."""
    if not timings:
        return None, None
    first_byte = statistics.median(t[0] for t in timings) * 1000
    rates = [n / 1e6 / s for _, n, s in timings if n >= RATE_MIN_BYTES and s > 0]
    return first_byte, statistics.median(rates) if rates else None


async def budgeted_pages(
    source: Source, selection: Selection, budget: int, wanted: FileFilter
) -> list[list[Listed]]:
    """The listing of the selected checkpoints cut to its first ``budget`` bytes of the files
    ``wanted`` (at least one file), each file once: its first entry, the one `sync` mirrors."""
    pages: list[list[Listed]] = []
    taken = 0
    tally = Tally(wanted)
    # By its place in the mirror, as `sync` tells a file (`Manifest.first_listing`): a listing
    # walked again shows the files of the walks before it again, and each is fetched once.
    seen: set[tuple[str, FileKey]] = set()
    # Closed once the budget is spent: the pages asked for ahead go then, not along with the
    # trial that follows.
    async with aclosing(source.file_pages(selection.checkpoints)) as listing:
        async for page in listing:
            kept: list[Listed] = []
            pages.append(kept)
            for file in page:
                if isinstance(file, UnreadableEntry):
                    if tally.takes(file.node_rank, file.name):
                        kept.append(file)  # no bytes: it fails as a file in the trial
                    continue
                if not tally.takes(file.node_rank, file.path):
                    continue
                key = file.run, file_key(file)
                if key in seen:
                    continue
                seen.add(key)
                if taken and taken + file.size > budget:
                    return pages
                kept.append(file)
                taken += file.size
    # Read to its end: a rank asked for that no file has is named with those there are, as
    # `sync` names it (a trial measures whichever of the ranks asked for are there).
    tally.check(each=False, named=selection.named)
    return pages


class _Listed:
    """``source`` with its files as listed just before a trial: the trial does not count the
    listing's requests in its seconds."""

    def __init__(self, source: Source, pages: list[list[Listed]]) -> None:
        self._source = source
        self._pages = pages
        self.name = source.name
        self.description = source.description
        self.picked = source.picked

    async def checkpoints(self) -> Sequence[Available]:
        return await self._source.checkpoints()

    def listed_whole(self) -> Mapping[str, frozenset[str]]:
        return self._source.listed_whole()

    async def file_pages(
        self, selected: Sequence[Checkpoint], *, counting: bool = False
    ) -> FilePages:
        for page in self._pages:
            yield page

    def moved_while_listed(self) -> Set[tuple[str, str]]:
        return self._source.moved_while_listed()  # the walk that listed the pages

    async def relist(self, file: RemoteFile) -> dict[FileKey, Relisted]:
        return await self._source.relist(file)  # a URL that expired since: counted, as in sync

    async def look_for(self, file: RemoteFile) -> Relisted | None:
        return await self._source.look_for(file)


async def run_trials(
    source: Source,
    selection: Selection,
    pairs: Sequence[tuple[int, int]],
    *,
    rounds: int,
    budget: int,
    scratch: Path,
    net: NetSettings,
    retry: RetryPolicy,
    wanted: FileFilter,
    started: Callable[[], None],
) -> AsyncGenerator[Trial | FailedTrial, None]:
    """One sync per (concurrency, part size) a round, each on fresh connections into a fresh
    directory, each handed on as it ends (a bench stopped later still shows it); a trial that an
    error ends is a `FailedTrial`, unless the error `stops_bench` or came as the bench was
    stopped. ``started`` is called once, when the first trial has its listing (or has failed
    without one): a selection with nothing to measure ends the bench before it, as it ends
    `sync` before anything is said."""
    said = False

    def start() -> None:
        nonlocal said
        if not said:
            said = True
            started()

    for concurrency, part_size in [pair for _ in range(rounds) for pair in pairs]:
        trial: Trial | FailedTrial
        try:
            trial = await _trial(
                source,
                selection,
                concurrency,
                part_size,
                budget=budget,
                scratch=scratch,
                net=net,
                retry=retry,
                wanted=wanted,
                listed=start,
            )
        except CheckpointSyncError as exc:
            # One met as a signal stopped the bench (a manifest that could not record how far
            # a part got) is no trial's failure: the stop's to say, as `sync` says it.
            if stops_bench(exc) or anyio.current_effective_deadline() == -math.inf:
                raise
            trial = FailedTrial(concurrency, part_size, exc)
        start()
        yield trial


async def _trial(
    source: Source,
    selection: Selection,
    concurrency: int,
    part_size: int,
    *,
    budget: int,
    scratch: Path,
    net: NetSettings,
    retry: RetryPolicy,
    wanted: FileFilter,
    listed: Callable[[], None],
) -> Trial:
    # Listed outside the trial's clock: a listing that takes a second (a slow API, many
    # pages) made a trial of a 20 ms transfer read 1 MB/s. And listed for each trial, not
    # once for all: presigned URLs expire, and a later trial would count the listing again
    # in its seconds, one file at a time, as each expired URL is refused and replaced.
    listing = await budgeted_pages(source, selection, budget, wanted)
    listed()
    pages = _Listed(source, listing)
    sizes = [f.size for page in listing for f in page if not isinstance(f, UnreadableEntry)]
    try:
        dest = Path(tempfile.mkdtemp(prefix="checkpoint-sync-bench-", dir=scratch))
    except OSError as exc:
        raise LocalIOError(f"cannot write into {scratch}: {exc.strerror or exc}") from exc
    options = SyncOptions(
        dest=dest,
        concurrency=concurrency,
        files=wanted,
        complete_listing=False,  # cut at the budget
        transfer=TransferSettings(part_size=part_size, retry=retry),
        net=net,
    )
    cpu = time.process_time()
    try:
        async with HttpClient(dataclasses.replace(net, connections=concurrency)) as http:
            stats = Stats()  # the clock starts once the client is open
            await sync(pages, selection, http, options, stats)
            # Read before the connections close and the scratch files go: not the trial's.
            seconds, cpu_seconds = stats.seconds, time.process_time() - cpu
    except LocalIOError as exc:
        # It names a path in the trial's directory, gone by the time it is read.
        raise LocalIOError(
            f"{exc} (each bench trial writes up to --max-bytes, at least one whole file, "
            f"into {scratch})"
        ) from exc
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    first_byte, per_connection = request_medians(stats.timings)
    return Trial(
        concurrency=concurrency,
        part_size=part_size,
        files=stats.files_fetched,
        failed=stats.files_failed,
        bytes=stats.bytes_fetched,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        first_byte_ms=first_byte,
        connection_mb_s=per_connection,
        first_failure=": ".join(stats.failures[0]) if stats.failures else None,
        retries=stats.retries,
        transfer=transfer_of(concurrency, part_size, sizes),
    )
