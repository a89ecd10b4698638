"""The command line: the only module that prints or chooses an exit code.

Exit codes: 0 everything present and verified (also "nothing to do"), 1 some files failed
(`bench`: or some trials), 2 usage or configuration error, 3 authentication refused, 4 not
found, 5 another run holds the mirror, 6 the destination cannot be written, 129/130/143 stopped
by SIGHUP/SIGINT/SIGTERM, 141 standard output closed by its reader.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import anyio
from pydantic import SecretStr

from . import __version__
from .config import (
    Settings,
    check_setting,
    expand_home,
    format_size,
    from_flag,
    known_secrets,
    load_settings,
    parse_size,
)
from .engine import PlannedFile, SyncOptions, lock_path, sync
from .errors import CheckpointSyncError, NotFoundError, UsageError, most_severe
from .layout import quoted
from .lock import LockSeen
from .net import NetSettings, loop_options
from .plan import FileFilter, Selection, is_newer, select_checkpoints
from .progress import (
    Display,
    LogLines,
    NoDisplay,
    Stats,
    TerminalLine,
    counted_files,
    human_bytes,
    incompleteness,
    summary,
    summary_line,
    told_by,
)
from .redact import Redactor, printable
from .retry import RetryPolicy
from .sources import SOURCES, Source, SourceRecipe, SourceSpec
from .sources.base import UnreadableCheckpoint, not_empty
from .sources.baseten_training import TrainingJobs
from .transfer import TransferSettings
from .wire import HttpClient

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from .bench import FailedTrial, Setting, Trial
    from .listing import Row

EXIT_OK = 0
EXIT_FILES_FAILED = 1
FAILURES_SHOWN = 20

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    _hold_standard_streams()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A name the output's encoding lacks (a Chinese one under PYTHONIOENCODING=ascii
            # or a Latin-1 locale) is written as the escape `printable` writes for a control
            # character, not raised as an error that ends the run.
            stream.reconfigure(errors="backslashreplace")
    try:
        return _main(argv)
    # Caught around everything, not just the command: `--version`, or the error document of a
    # run that failed, written to a reader already gone, raised it past every other handler.
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        _silence_stdout(sys.stdout)
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # The settings are not read yet, but a refused argument or setting may be quoted, and may be
    # a key; those the settings add (the config file's) are added once they are read.
    redact = Redactor(known_secrets())
    try:
        args = parser.parse_args(argv)
    except _BadArguments as bad:
        given = sys.argv[1:] if argv is None else argv
        # The argument quoted may be a key the config file holds, or names the variable of:
        # read what of the file can be read (argparse stopped before anything read it).
        for secret in known_secrets(_config_given(given)):
            redact.add(secret)
        wants_json = any(_spelled(token, "--json", 4) for token in given)
        refused = _Output(redact, as_json=wants_json)
        refused.lines([bad.parser.format_usage()])
        return refused.finish(refused.failed(bad.message, UsageError.exit_code))
    except BrokenPipeError:  # `main` ends the run quietly
        raise
    except OSError as exc:  # `--help` or `--version` into a stdout that cannot take it
        _silence_stdout(sys.stdout)
        return _Output(redact, stdout_lost=exc.strerror or str(exc)).finish(EXIT_OK)
    out = _Output(redact, quiet=getattr(args, "quiet", False), as_json=getattr(args, "json", False))
    return out.finish(_handled(args, out))


def _handled(args: argparse.Namespace, out: _Output) -> int:
    """The command's exit code, its errors reported."""
    try:
        code: int = args.handler(args, out)
    except CheckpointSyncError as exc:
        return out.failed(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return out.failed("interrupted", 128 + signal.SIGINT)
    except BrokenPipeError:  # not a bug: `main` ends the run quietly
        raise
    except Exception as exc:  # a bug: say so in one line, the traceback only when asked
        if args.debug:
            out.lines(traceback.format_exception(exc))
        return out.failed(
            f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for details",
            EXIT_FILES_FAILED,
        )
    return code


def _hold_standard_streams() -> None:
    """Take the numbers of the standard streams the caller closed (`>&-`, `2>&-`, as cron jobs
    and daemons may) with /dev/null. Left free, the next file opened gets one (the event loop's,
    a socket, the manifest, a mirrored file): a print would write into it, and uvloop aborts the
    process when it closes it. Stdout is held read-only, so that what was asked for is not lost
    unsaid (`_Output.finish`); a closed stderr has no reader to tell."""
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, flags)  # the lowest free number: the lower ones are held
    # Python has no stream for a number that was closed when it started.
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 -- lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 -- lives as long as the process


# --- output ---------------------------------------------------------------------------------------


def _silence_stdout(stdout: TextIO) -> None:
    """Let /dev/null take what ``stdout`` still holds, once it could not be written: its flush
    at exit would fail again and make the exit code 120."""
    with suppress(OSError, ValueError):  # a stream with no descriptor (tests)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stdout.fileno())
        os.close(null)


@dataclass
class _Output:
    """Every line the program prints passes through here, and through the redactor."""

    redact: Redactor
    quiet: bool = False
    as_json: bool = False
    json_printed: bool = False
    # Why standard output could not be written (/dev/full, closed), once it could not.
    stdout_lost: str | None = None
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    # The progress line on stderr's terminal: erased before any line is printed, on stdout too
    # (the same terminal, most often), so that no line starts after half of it.
    live: TerminalLine | None = None

    def info(self, text: str) -> None:
        """Progress and summaries: not under ``--quiet``."""
        if not self.quiet:
            self.answer(text)

    def answer(self, text: str) -> None:
        """What the command was asked for (a dry run's plan, `list`'s table, `bench`'s results):
        not progress or a summary, so shown under ``--quiet`` too; ``--json`` has its own
        document."""
        if not self.as_json:
            self._print(self.shown(text))

    def status(self, text: str) -> None:
        self._print_error(self.shown(text))

    def progress(self, text: str) -> None:
        """A line of progress on stderr, as `LogLines` writes: not under ``--quiet`` or
        ``--json``, which show no progress."""
        if not (self.quiet or self.as_json):
            self.status(text)

    def error(self, text: str) -> None:
        self._print_error(f"checkpoint-sync: error: {self.shown(text)}")

    def warning(self, text: str) -> None:
        """Something the user should fix that does not stop the run: under ``--quiet`` and
        ``--json`` too, as an error would be (cron mails stderr)."""
        self._print_error(f"checkpoint-sync: warning: {self.shown(text)}")

    def _print(self, text: str) -> None:
        """A line to stdout; one it cannot take does not stop the run, whose work is done or
        still to do, but its exit code (`finish`). A reader gone (`| head`) does (`main`)."""
        if self.stdout_lost is not None:
            return
        self._clear_live()
        try:
            print(text, file=self.stdout, flush=True)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.stdout_lost = exc.strerror or str(exc)
            _silence_stdout(self.stdout)

    def _print_error(self, text: str) -> None:
        self._clear_live()
        with suppress(OSError):  # stderr cannot be written: nowhere left to say so
            print(text, file=self.stderr, flush=True)

    def _clear_live(self) -> None:
        if self.live is not None:
            self.live.clear()

    def finish(self, code: int) -> int:
        """The command's exit code, once it is said that stdout lost what it was given: a run
        whose plan, table or document was not printed did not do what it was asked."""
        if self.stdout_lost is None:
            return code
        self.error(f"cannot write standard output: {self.stdout_lost}")
        return code or EXIT_FILES_FAILED

    def lines(self, chunks: Iterable[str]) -> None:
        """Text of several lines (a traceback) to stderr, each line shown as one."""
        for line in "".join(chunks).splitlines():
            self.status(line)

    def shown(self, text: str) -> str:
        """Text fit for a terminal (JSON has escapes of its own)."""
        return printable(self.redact(text))

    def as_written(self, text: str) -> str:
        """``text`` as it reaches standard output: shown, with each character its encoding
        lacks as the escape the stream writes for it (`main`), for `list` to measure."""
        encoding = getattr(self.stdout, "encoding", None) or "utf-8"
        return self.shown(text).encode(encoding, "backslashreplace").decode(encoding)

    def json(self, payload: dict[str, Any]) -> None:
        # Each string is redacted before it is encoded: cutting a query string out of the
        # encoded text could take an escape with it and leave JSON that does not parse. The
        # strings are not passed through `printable`: a program reading the document must get
        # the real names. json.dumps writes every character beyond ASCII as an escape
        # (ensure_ascii, its default), so a name's control, bidirectional or invisible characters
        # reach no terminal this way either: keep that default.
        text = json.dumps(self._redacted(payload), indent=2, allow_nan=False)
        self._print(text)
        self.json_printed = True

    def _redacted(self, value: Any) -> Any:
        """``value`` fit to print: strings redacted, keys too (a W&B metric's name is one), NaN
        and infinities as null (JSON has none; a W&B metric may be NaN, and strict parsers
        refuse the whole document over it)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {self._redacted(key): self._redacted(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._redacted(item) for item in value]
        return value

    def failed(self, message: str, code: int) -> int:
        """Report an error that ends the command; with ``--json``, stdout still gets one
        document (``exit_code`` and ``error``) if the command printed none."""
        self.error(message)
        if self.as_json and not self.json_printed:
            self.json({"exit_code": code, "error": message})
        return code

    def display(self) -> Display:
        if self.quiet or self.as_json:
            return NoDisplay()
        # A dumb terminal (TERM=dumb: Emacs' shell, some CI consoles) may not erase a line.
        if self.stderr.isatty() and os.environ.get("TERM") != "dumb":
            self.live = TerminalLine(self.stderr)
            return self.live
        return LogLines(self.status)


# --- arguments ------------------------------------------------------------------------------------


class _BadArguments(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse's, but an argument it cannot use goes back to `main`, which reports it like any
    other usage error (with ``--json``, as a document too), and so does a help text that
    stdout cannot take (argparse drops it and exits 0)."""

    def error(self, message: str) -> NoReturn:
        raise _BadArguments(self, message)

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            stream = file or sys.stderr
            stream.write(message)
            if isinstance(stream, io.IOBase):  # now, so that a stdout that fails says so
                stream.flush()


def _spelled(token: str, option: str, shortest: int) -> bool:
    """Whether ``token`` (``--name`` or ``--name=value``) names ``option`` as argparse reads it:
    ``shortest`` is the length of its shortest unambiguous prefix (--js is --json)."""
    name = token.partition("=")[0]
    return len(name) >= shortest and option.startswith(name)


def _config_given(tokens: list[str]) -> Path | None:
    """The config file of arguments argparse refused: the last ``--config F`` (or ``--conf F``,
    ``--config=F``), as argparse takes it."""
    given = None
    for token, following in itertools.pairwise([*tokens, ""]):
        if _spelled(token, "--config", 6):
            given = token.partition("=")[2] if "=" in token else following
    try:
        return _path(given) if given else None
    except argparse.ArgumentTypeError:  # no file to read keys from: argparse's error is the one
        return None


def _path(text: str) -> Path:
    """A path argument, ``~`` expanded (`--dest=~/x` reaches us as it is); an empty one (an unset
    variable in a script) is not the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        return expand_home(Path(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _file_filter(args: argparse.Namespace) -> FileFilter:
    """The files ``--node-rank``, ``--include`` and ``--exclude`` select (``demo`` has none)."""
    return FileFilter(
        frozenset(getattr(args, "node_rank", [])),
        tuple(getattr(args, "include", [])),
        tuple(getattr(args, "exclude", [])),
    )


class _Version(argparse.Action):
    """``--version``: ours, and the OpenSSL that HTTPS runs on (the `cryptography` wheel's,
    not the system's), which decides its speed. Loaded only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from .tls import openssl_version

        print(f"checkpoint-sync {__version__} (HTTPS: {openssl_version()})", flush=True)
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="checkpoint-sync",
        description="Mirror ML training checkpoints to local disk: fast, resumable, verified.",
        epilog="Exit codes: 0 ok, 1 some files (or bench trials) failed, 2 usage, 3 auth, "
        "4 not found, 5 mirror locked by another run, 6 destination not writable, "
        "129/130/143 interrupted (SIGHUP/SIGINT/SIGTERM), 141 output closed by its reader.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="show the version, and the TLS library's"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync_cmd = commands.add_parser("sync", help="mirror checkpoints into a local directory")
    _add_source_arguments(sync_cmd)
    _add_selection_arguments(
        sync_cmd, "also mirror checkpoints still uploading (their file list is not final)"
    )
    sync_cmd.add_argument("--dest", type=_path, help="mirror directory (or `dest` in the config)")
    _add_transfer_arguments(sync_cmd)
    sync_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be fetched and skipped (checked with --verify, deleted with "
        "--delete), writing nothing",
    )
    sync_cmd.add_argument(
        "--verify",
        action="store_true",
        help="read back every mirrored file and fetch again those whose bytes no longer match "
        "the digest recorded when they were verified (after a crash, a power loss, a bad disk)",
    )
    sync_cmd.add_argument(
        "--delete",
        action="store_true",
        default=None,
        help="delete the mirrored files of checkpoints the provider no longer lists "
        "(or `delete` in the config)",
    )
    sync_cmd.add_argument(
        "--max-delete",
        type=_at_least(0),
        metavar="N",
        help="with --delete: if more than N files would go, delete none and fail (exit 1), "
        "as rsync and rclone do (or `max_delete` in the config)",
    )
    _add_common_arguments(sync_cmd)
    sync_cmd.set_defaults(handler=_sync_command)

    list_cmd = commands.add_parser(
        "list", help="show checkpoints: created or step, size, status, and the mirror's state"
    )
    _add_source_arguments(list_cmd)
    _add_selection_arguments(
        list_cmd, "with --latest, take a checkpoint still uploading, as sync would with it"
    )
    list_cmd.add_argument(
        "--dest",
        type=_path,
        help="mirror directory (or `dest` in the config): add each checkpoint's local state, "
        "and name the mirrored checkpoints removed upstream",
    )
    _add_common_arguments(list_cmd)
    list_cmd.set_defaults(handler=_list_command)

    bench = commands.add_parser(
        "bench",
        help="measure download throughput and recommend settings "
        "(of a source, or of the built-in server)",
    )
    _add_source_arguments(bench, "source (at most one; without one, the built-in server)")
    _add_selection_arguments(bench, "also measure checkpoints still uploading")
    bench.add_argument(
        "--concurrency",
        dest="concurrencies",
        type=_list_of(_integer),
        default=[4, 8, 16, 32],
        help="connection counts to try (default 4,8,16,32)",
    )
    bench.add_argument(
        "--part-size",
        dest="part_sizes",
        type=_list_of(parse_size),
        default=[16 << 20, 64 << 20],
        help="part sizes to try (default 16MiB,64MiB)",
    )
    bench.add_argument(
        "--rounds",
        type=_at_least(1),
        default=3,
        help="times each setting is tried, in turns; the table shows the round of median MB/s "
        "and the range (default 3)",
    )
    bench.add_argument(
        "--max-bytes",
        type=_size_arg,
        default=1 << 30,
        help="bytes per trial: the first files of the selection up to this, but at least one "
        "whole file (default 1GiB)",
    )
    bench.add_argument("--scratch", type=_path, help="where trials write (default: the temp dir)")
    bench.add_argument(
        "--discard",
        action="store_true",
        help="keep the disk out of it: trials write to RAM (/dev/shm) and are dropped",
    )
    _add_common_arguments(bench)
    bench.set_defaults(handler=_bench_command)

    demo = commands.add_parser(
        "demo", help="mirror a synthetic training job from a built-in local server, twice"
    )
    demo.add_argument("--dest", type=_path, help="where to mirror (default: a new temporary dir)")
    _add_transfer_arguments(demo)
    _add_common_arguments(demo)
    demo.set_defaults(handler=_demo_command)
    return parser


def _add_source_arguments(
    parser: argparse.ArgumentParser, title: str = "source (exactly one)"
) -> None:
    group = parser.add_argument_group(title)
    for spec in SOURCES:
        spec.add_arguments(group)
    group.add_argument("--api-url", help="Baseten API base URL (CHECKPOINT_SYNC_API_URL)")
    group.add_argument("--auth-scheme", choices=["Bearer", "Api-Key"], help="default: Bearer")


def _add_selection_arguments(parser: argparse.ArgumentParser, syncing_help: str) -> None:
    group = parser.add_argument_group("selection")
    group.add_argument(
        "--checkpoint",
        action="append",
        type=not_empty,
        default=[],
        metavar="ID",
        help="only this checkpoint (repeat for several)",
    )
    group.add_argument("--latest", action="store_true", help="only the newest complete checkpoint")
    group.add_argument(
        "--node-rank",
        action="append",
        # No listed rank is negative (the layout refuses one): no need to ask the API.
        type=_at_least(0),
        default=[],
        metavar="N",
        help="only this rank (repeat for several)",
    )
    group.add_argument(
        "--include",
        action="append",
        type=not_empty,
        default=[],
        metavar="PATTERN",
        help=(
            "only files whose path within their rank matches, e.g. '*.safetensors' (* matches /;"
            " repeat for several: any may match)"
        ),
    )
    group.add_argument(
        "--exclude",
        action="append",
        type=not_empty,
        default=[],
        metavar="PATTERN",
        help="leave out files whose path within their rank matches (repeat for several)",
    )
    group.add_argument("--include-syncing", action="store_true", default=None, help=syncing_help)


def _add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transfer")
    # The defaults are the settings' (a flag left out leaves the config's value, or that).
    defaults = Settings.model_fields
    group.add_argument(
        "--concurrency",
        type=_integer,
        help=f"files and connections in flight (default {defaults['concurrency'].default})",
    )
    group.add_argument(
        "--part-size",
        type=_size_arg,
        help="files larger than this go as concurrent ranged parts of this size "
        f"(default {format_size(defaults['part_size'].default)})",
    )
    group.add_argument(
        "--limit-rate",
        type=_size_arg,
        metavar="SIZE",
        help="at most SIZE bytes a second over all connections, e.g. 50MiB (0: no limit)",
    )
    group.add_argument(
        "--fsync", action="store_true", default=None, help="make data durable across power loss"
    )
    group.add_argument(
        "--wait-lock",
        action="store_true",
        default=None,
        help="wait for another run on the same mirror instead of exiting with 5",
    )
    group.add_argument(
        "--wait-lock-timeout",
        metavar="SECONDS",
        help="with --wait-lock: exit with 5 if the other run still holds the mirror after "
        "SECONDS (or `wait_lock_timeout` in the config)",
    )


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=_path, help="TOML settings file")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress and no summary (what is asked for still prints: a dry run's plan, "
        "list's table, bench's results)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of internal errors (redacted)"
    )


def _list_of(parse: Callable[[str], int]) -> Callable[[str], list[int]]:
    def parse_list(text: str) -> list[int]:
        # One with no value is refused as the one-value flag of `sync` refuses it.
        items = [item for item in text.split(",") if item.strip()] or [text]
        try:
            return [parse(item) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_list


def _integer(text: str) -> int:
    """An integer flag's value; argparse's own `int` would quote a bad one with repr."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"'{text}' is less than {minimum}")
        return value

    return parse


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(args: argparse.Namespace, out: _Output) -> Settings:
    flags = {
        name: getattr(args, name, None)
        for name in (
            "api_url",
            "auth_scheme",
            "dest",
            "concurrency",
            "part_size",
            "limit_rate",
            "include_syncing",
            "fsync",
            "wait_lock",
            "wait_lock_timeout",
            "delete",
            "max_delete",
        )
    }
    # A setting refused may quote its value, which may be a key the file holds pasted into the
    # wrong place (`--api-url` for a key): its keys are secrets before the settings are read.
    settings = load_settings(args.config, flags, on_secret=out.redact.add, on_unread=out.warning)
    for secret in settings.secrets():
        out.redact.add(secret)
    if getattr(args, "wait_lock_timeout", None) is not None and not settings.wait_lock:
        raise UsageError(
            "--wait-lock-timeout bounds --wait-lock: pass --wait-lock too (or wait_lock in the "
            "config)"
        )
    return settings


def _recipe(settings: Settings, args: argparse.Namespace, spec: SourceSpec) -> SourceRecipe:
    return SourceRecipe.build(
        functools.partial(spec.build, args), settings, _net(settings), _retry(settings)
    )


def _options(settings: Settings, dest: Path, args: argparse.Namespace) -> SyncOptions:
    return SyncOptions(
        dest=dest.absolute(),
        concurrency=settings.concurrency,
        files=_file_filter(args),
        dry_run=getattr(args, "dry_run", False),
        verify=getattr(args, "verify", False),
        delete=settings.delete,
        max_delete=settings.max_delete,
        wait_lock=settings.wait_lock,
        wait_lock_timeout=settings.wait_lock_timeout,
        transfer=TransferSettings(
            part_size=settings.part_size, fsync=settings.fsync, retry=_retry(settings)
        ),
        net=_net(settings),
    )


def _retry(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.retries,
        max_delay=settings.retry_max_delay,
        deadline=settings.retry_deadline,
    )


def _built_in(settings: Settings, url: str, key: str) -> Settings:
    """``settings`` for the built-in server at ``url``: on this machine, so never proxied."""
    return settings.model_copy(update={"api_url": url, "api_key": SecretStr(key), "proxies": False})


def _net(settings: Settings) -> NetSettings:
    return NetSettings(
        connections=settings.concurrency,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        ca_bundle=settings.ca_bundle,
        proxies=settings.proxies,
        limit_rate=settings.limit_rate or None,
    )


# --- sync -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    names: tuple[str, ...] = ()
    latest: bool = False


@asynccontextmanager
async def _selected(
    recipe: SourceRecipe, wanted: _Selection, out: _Output, *, every_status: bool = False
) -> AsyncIterator[tuple[HttpClient, Source, Selection]]:
    """Open the source and narrow its checkpoints to those wanted; those still syncing only with
    ``include_syncing`` (flag or config, read here so that every command takes it alike), those
    of another status not at all, unless ``every_status``."""
    async with recipe.open() as (http, source):
        selection = select_checkpoints(
            await source.checkpoints(),
            names=wanted.names,
            latest=wanted.latest,
            include_syncing=recipe.settings.include_syncing,
            every_status=every_status,
            picked=source.picked,
            what=source.description,
        )
        # Said on stderr, under --quiet and --json too, yet no failure (the exit code stands): a
        # restore that took an older checkpoint should know, all the more as no rerun will
        # mirror one unreadable, unlike one still syncing.
        for skipped in selection.passed_over:
            (taken,) = selection.checkpoints
            told = is_newer(skipped, taken)
            newer = "a newer checkpoint" if told else "a checkpoint that may be newer"
            out.status(
                f"--latest took {taken.run}/{taken.name}; {newer} was left out: "
                f"{skipped.where}: {skipped.problem}"
            )
        yield http, source, selection


async def _mirror(
    recipe: SourceRecipe, wanted: _Selection, options: SyncOptions, stats: Stats, out: _Output
) -> None:
    """List, select and mirror, showing progress; the heart of `sync` and `demo`."""

    def show_plan(planned: PlannedFile) -> None:
        out.answer(f"{planned.action:6} {planned.path} ({human_bytes(planned.size)})")

    # Before the list is read: a run that takes the lock after another held it since reads the
    # list again (what that run mirrored is not removed upstream).
    seen = LockSeen.of(lock_path(options.dest))
    async with (
        _selected(recipe, wanted, out) as (http, source, selection),
        anyio.create_task_group() as tg,
    ):
        display = out.display()
        tg.start_soon(display.run, stats)
        await sync(
            source,
            selection,
            http,
            replace(options, count_ahead=display.estimates, lock_seen=seen),
            stats,
            show_plan if options.dry_run else None,
        )
        tg.cancel_scope.cancel()


def _sync_command(args: argparse.Namespace, out: _Output) -> int:
    settings = _settings(args, out)
    spec = _chosen_source(args)
    if settings.dest is None:
        raise UsageError("no destination: pass --dest DIR (or set dest in the config)")
    if args.max_delete is not None and not settings.delete:
        raise UsageError(
            "--max-delete limits --delete: pass --delete too (or delete in the config)"
        )
    recipe = _recipe(settings, args, spec)
    options = _options(settings, settings.dest, args)
    stats = Stats()
    wanted = _Selection(tuple(args.checkpoint), args.latest)
    return _run_and_report(
        lambda: _mirror(recipe, wanted, options, stats, out), stats, options, out
    )


def _chosen_source(args: argparse.Namespace) -> SourceSpec:
    chosen = [spec for spec in SOURCES if spec.given(args)]
    see = f"see checkpoint-sync {args.command} --help"
    if not chosen:
        names = "; ".join(spec.name for spec in SOURCES)
        raise UsageError(f"choose exactly one source ({names}); {see}")
    if len(chosen) > 1:
        # Name the flags: "--loops-run ... --best" reads as one source with a W&B-only flag,
        # and a list of source names would not tell which flag is out of place.
        mixed = " and ".join(f"{' '.join(spec.given(args))} ({spec.name})" for spec in chosen)
        raise UsageError(f"choose exactly one source: {mixed} are flags of different ones; {see}")
    return chosen[0]


def _run_and_report(
    job: Callable[[], Awaitable[None]], stats: Stats, options: SyncOptions, out: _Output
) -> int:
    """Run ``job`` with signal handling; print the summary (the text one only if the run got as
    far as listing files, or ``--delete`` did something first, and never if it ended still
    waiting for the lock: a line of zeros would read like an empty success)."""
    try:
        stopped = _run(job)
        error = None if stopped is None else stopped.error
    except CheckpointSyncError as exc:
        error, stopped = exc, None
    code = _exit_code(stats, stopped, error)
    holder = stats.waiting_for  # still set: the run ended before it had the lock (--wait-lock)
    missing = functools.partial(
        incompleteness, stats, stopped=stopped is not None, error=error is not None
    )
    payload: dict[str, Any] | None = None
    if out.as_json:
        payload = summary(stats, None if options.dry_run else missing)
        payload["dest"] = str(options.dest)
        payload["dry_run"] = options.dry_run
        payload["waiting_for_lock"] = (
            None if holder is None else {"pid": int(holder) if holder.isdigit() else None}
        )
        payload["exit_code"] = code
        if error is not None:
            payload["error"] = str(error)
    elif holder is None and (
        error is None or stats.files_listed or stats.files_to_delete or stats.files_failed
    ):
        _print_summary(stats, options, out, missing)
    if stopped is not None:
        if holder is None:
            return stopped.end(out, payload, "; rerun to resume")
        return stopped.end(
            out,
            payload,
            f" while waiting for the lock of another run (pid {holder}) on this mirror; "
            "this run did nothing",
        )
    if payload is not None:
        out.json(payload)
    if error is not None:
        raise error
    return code


def _exit_code(stats: Stats, stopped: _Stopped | None, error: CheckpointSyncError | None) -> int:
    if stopped is not None:
        return stopped.code
    if error is not None:
        return error.exit_code
    return EXIT_FILES_FAILED if stats.files_failed else EXIT_OK


# How to mirror a checkpoint left out as still syncing. `demo` has no --include-syncing: it
# names the command that has.
_SYNC_SYNCING_HINT = "pass --include-syncing to mirror it"
_DEMO_SYNCING_HINT = "checkpoint-sync sync --include-syncing would mirror it"


def _print_summary(
    stats: Stats,
    options: SyncOptions,
    out: _Output,
    missing: Callable[[str], str | None],
    syncing_hint: str = _SYNC_SYNCING_HINT,
) -> None:
    """The text summary; ``missing``: why a checkpoint taken may not be whole
    (`incompleteness`)."""
    out.info(summary_line(stats, str(options.dest), dry_run=options.dry_run))
    if stats.files_resumed:
        out.info(
            f"resumed {counted_files(stats.files_resumed)} from the parts an earlier run left "
            f"({human_bytes(stats.bytes_resumed)} kept, not fetched again)"
        )
    if len(stats.taken) == 1:
        # A restore's one checkpoint: where the trainer is to find it, unless it is not all
        # there, which a script or a user reading only this line must not take for a restore.
        ((where, taken),) = stats.taken.items()
        why = None if options.dry_run else missing(where)
        short = f" is incomplete: {why}" if why else ""
        out.info(
            f"checkpoint {where}{told_by(taken)}"
            + (f" in {taken.path}" if taken.path else "")
            + short
        )
    if options.dry_run and stats.files_to_check:
        out.info(
            f"would check {counted_files(stats.files_to_check, 'mirrored ')} "
            f"({human_bytes(stats.bytes_to_check)}) against their recorded digests"
        )
    if stats.files_checked:
        found = (
            f"checked {counted_files(stats.files_checked, 'mirrored ')} against their recorded "
            f"digests: {stats.files_damaged} no longer matched"
        )
        if stats.files_restored == stats.files_damaged > 0:
            found += f" and {'was' if stats.files_damaged == 1 else 'were'} fetched again"
        elif stats.files_damaged:
            found += f", {stats.files_restored} of them fetched again"
        out.info(found)
    if stats.files_to_delete:
        deleted = counted_files(
            stats.files_to_delete if options.dry_run else stats.files_deleted, "mirrored "
        )
        out.info(
            f"{'would delete' if options.dry_run else 'deleted'} {deleted} "
            f"({human_bytes(stats.bytes_to_delete if options.dry_run else stats.bytes_deleted)}) "
            f"of checkpoints removed upstream: {', '.join(stats.removed_upstream)}"
        )
    if kept := len(stats.removed_upstream_kept):
        out.info(
            f"{'would keep' if options.dry_run else 'kept'} {kept} mirrored "
            f"checkpoint{'' if kept == 1 else 's'} no longer listed upstream (--delete would "
            f"delete {'its' if kept == 1 else 'their'} files; list --dest names them)"
        )
    for run in stats.delete_held_back:
        out.info(
            f"deleted nothing of {run}: its checkpoint list is empty (if its checkpoints are "
            f"gone, delete {options.dest}/{run} yourself)"
        )
    for name in stats.syncing_left_out:
        out.info(f"left out, still syncing: {name} ({syncing_hint})")
    for name, status in stats.status_left_out:
        out.info(f"left out, status {status}: {name} (neither complete nor still syncing)")
    for name in stats.listings_changed:
        out.info(
            f"the file listing of {name} kept changing while it was read: a file removed "
            "upstream meanwhile may have hidden another, which the next run mirrors"
        )
    for where, message in stats.failures[:FAILURES_SHOWN]:
        out.error(f"{quoted(where)}: {message}")  # --json has the whole path
    if stats.files_failed > FAILURES_SHOWN:
        out.error(f"... and {stats.files_failed - FAILURES_SHOWN} more failures (see --json)")


@dataclass(frozen=True)
class _Stopped:
    """A command stopped by a signal, and the error stopping met, if any (a manifest that could
    not record how far a part got). Its exit code is the signal's whatever that error: a user
    who pressed Ctrl-C, a script that sent SIGTERM or a closed terminal, is told by 130, 143 or
    129 that the stop was theirs; the error is still said."""

    signum: int
    error: CheckpointSyncError | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def code(self) -> int:
        return 128 + self.signum

    def end(self, out: _Output, document: dict[str, Any] | None = None, then: str = "") -> int:
        """End the command stopped, as every command does (README, Exit codes: 129/130/143); its
        exit code. With ``--json``, its ``document`` (by default one of `exit_code` and
        `error` alone, as for any error) is printed, the error met as its `error`. On stderr,
        that error in its line, then `stopped by SIG...` and ``then``."""
        met = {} if self.error is None else {"error": str(self.error)}
        if out.as_json:
            stop = {"exit_code": self.code, "error": f"stopped by {self.name}"}
            out.json((stop if document is None else document) | met)
        if self.error is not None:
            out.error(str(self.error))
        out.error(f"stopped by {self.name}{then}")
        return self.code


# SIGHUP too: a terminal closed or an ssh session dropped killed the run, which lost the last
# second of each part in flight (and every file of one part a second old), as a SIGKILL does.
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The stop signals, but one the process was started ignoring: a script's `cmd &` ignores SIGINT
# so that a Ctrl-C in its terminal is not for that job, as `nohup` ignores SIGHUP. Noted as the
# CLI loads, before `_run` ignores them itself once its job is over.
_HEEDED = [s for s in _STOPS if signal.getsignal(s) != signal.SIG_IGN]


def _run(job: Callable[[], Awaitable[None]]) -> _Stopped | None:
    """Run ``job`` on an event loop (uvloop when installed); how a signal stopped it, if one did.
    An error it ended with is raised, but for one met once a signal came (`_Stopped`)."""
    received: int | None = None
    # Until the loop listens for them, a stop is noted, and heeded once it does: raised as
    # KeyboardInterrupt while the loop starts (or SIGTERM's default action), it ended in an
    # internal error ("Cannot close a running event loop"), or killed the process.
    early: list[int] = []
    for signum in _HEEDED:
        signal.signal(signum, lambda signum, _: early.append(signum))

    async def main() -> None:
        nonlocal received
        try:
            # Caught until the job has wound down, not just until the first: a second Ctrl-C
            # while it commits its progress and closes the manifest would raise
            # KeyboardInterrupt in the middle of that (progress lost, a traceback, exit 1).
            with anyio.open_signal_receiver(*_HEEDED) as signals:
                if early:
                    received = early[0]
                    return
                async with anyio.create_task_group() as tg:

                    async def watch_signals() -> None:
                        nonlocal received
                        async for signum in signals:
                            received = signum
                            tg.cancel_scope.cancel()
                            return

                    tg.start_soon(watch_signals)
                    await job()
                    tg.cancel_scope.cancel()
        finally:
            # As the receiver lets them go, not once the loop has closed: that takes
            # milliseconds, with Python's own handlers back meanwhile.
            _ignore_stops()

    try:
        try:
            anyio.run(main, backend_options=loop_options())
        except ExceptionGroup as group:
            raise most_severe(group) from None
    except CheckpointSyncError as exc:
        if received is None:
            raise
        return _Stopped(received, exc)
    finally:
        _ignore_stops()  # where the loop ended before `main` did
    return None if received is None else _Stopped(received)


def _ignore_stops() -> None:
    """The job is over, and what it ended with stands: past the receiver, up to the process's
    exit (the summary, the interpreter's shutdown: tens of milliseconds), a signal would still
    kill it (-SIGTERM, or a KeyboardInterrupt traceback), or say "interrupted" after a summary
    that said otherwise. A process's next job (`demo`'s) heeds them again."""
    for signum in _STOPS:
        signal.signal(signum, signal.SIG_IGN)


# --- list -----------------------------------------------------------------------------------------


def _list_command(args: argparse.Namespace, out: _Output) -> int:
    # Imported here: only `list` surveys the mirror; the other commands skip its import.
    from .listing import RemovedUpstream, removed_upstream, row_json, survey, table

    settings = _settings(args, out)
    spec = _chosen_source(args)
    rows: list[Row] = []
    unreadable: list[UnreadableCheckpoint] = []
    passed_over: list[UnreadableCheckpoint] = []
    kept: list[RemovedUpstream] = []
    description = ""

    async def survey_source() -> None:
        nonlocal description
        recipe = _recipe(settings, args, spec)
        wanted = _Selection(tuple(args.checkpoint), args.latest)
        # A listing shows every checkpoint, those still uploading too (their status says so), but
        # with --latest the one `sync --latest` would take: the newest complete one, unless the
        # config's include_syncing (list has no flag for it) lets sync take a newer one.
        opened = _selected(recipe, wanted, out, every_status=not args.latest)
        async with opened as (_, source, selection):
            description = source.description
            dest = settings.dest.absolute() if settings.dest else None
            rows.extend(await survey(source, selection, dest, _file_filter(args)))
            if dest is not None:
                kept.extend(removed_upstream(dest, source.listed_whole(), _file_filter(args)))
            unreadable.extend(selection.unreadable)
            # --latest passed these over, as stderr says; a program reading --json is told too.
            passed_over.extend(selection.passed_over)

    stopped = _run(survey_source)
    if stopped is not None:
        return stopped.end(out)
    if settings.dest is not None and not settings.dest.is_dir():
        # Else a mistyped --dest reads as a mirror holding nothing. No error: a sync creates it.
        what = "not a directory" if settings.dest.exists() else "no such directory"
        out.status(f"no mirror at {settings.dest.absolute()}: {what}")
    for note in [r.unreachable for r in rows] + [k.unreachable for k in kept]:
        if note is not None:
            out.status(note)
    kept = [k for k in kept if k.files]  # one holding only files it could not look up
    if out.as_json:
        payload = {"source": spec.name, "description": description}
        left_out = [
            {"checkpoint": c.where, "id": c.key, "error": c.problem}
            for c in [*unreadable, *passed_over]
        ]
        removed = [
            {"checkpoint": k.where, "files": k.files, "size_bytes": k.size_bytes} for k in kept
        ]
        out.json(
            payload
            | {"checkpoints": [row_json(row) for row in rows], "left_out": left_out}
            | ({"removed_upstream": removed} if settings.dest is not None else {})
        )
        return EXIT_OK
    if rows:
        for line in table(rows, out.as_written):
            out.answer(line)
    elif not unreadable:
        out.answer(f"no checkpoints in {description}")
    # Part of the answer: a checkpoint the run has, which a sync would fail.
    for checkpoint in unreadable:
        out.answer(f"left out: {checkpoint.where}: {checkpoint.problem}")
    for k in kept:
        out.answer(
            f"removed upstream, still mirrored: {k.where} ({counted_files(k.files)}, "
            f"{human_bytes(k.size_bytes)}; sync --delete would delete them)"
        )
    return EXIT_OK


# --- demo -----------------------------------------------------------------------------------------


def _demo_command(args: argparse.Namespace, out: _Output) -> int:
    # Imported here: the server (aiohttp.web) costs every other command memory and start-up time.
    from .localserver import LocalServer, demo_catalog

    settings = _settings(args, out)
    dest = args.dest or Path(tempfile.mkdtemp(prefix="checkpoint-sync-demo-"))
    catalog = demo_catalog()
    job = catalog.jobs[0]
    job_args = argparse.Namespace(project=job.project_id, job=job.job_id)
    codes: list[int] = []
    runs: list[dict[str, object]] = []

    async def run_twice() -> None:
        async with LocalServer(catalog) as server:
            local = _built_in(settings, server.url, catalog.api_key)
            for attempt, title in enumerate(("first run", "second run: nothing changed")):
                out.info(f"--- demo {title}: {server.url} -> {dest}")
                stats = Stats()
                options = _options(local, dest, args)
                recipe = _recipe(local, job_args, TrainingJobs())
                await _mirror(recipe, _Selection(), options, stats, out)
                codes.append(_exit_code(stats, None, None))
                missing = functools.partial(incompleteness, stats, stopped=False, error=False)
                runs.append({"run": attempt + 1, **summary(stats, missing)})
                if not out.as_json:
                    _print_summary(stats, options, out, missing, _DEMO_SYNCING_HINT)

    stopped = _run(run_twice)
    document = {"dest": str(dest), "runs": runs}
    out.info(f"the mirror is in {dest}")
    if stopped is not None:
        return stopped.end(out, document)
    if out.as_json:
        out.json(document)
    return max(codes, default=EXIT_OK)


# --- bench ----------------------------------------------------------------------------------------


def _bench_command(args: argparse.Namespace, out: _Output) -> int:
    from .bench import FailedTrial, grid, measured, run_trials, settings_of

    # What the link can do is measured: a limit_rate from the config would measure the limit.
    settings = _settings(args, out).model_copy(update={"limit_rate": 0})
    for concurrency in args.concurrencies:
        check_setting("concurrency", concurrency, from_flag("concurrency"))
    for part_size in args.part_sizes:
        check_setting("part_size", part_size, from_flag("part_size"))
    pairs = grid(args.concurrencies, args.part_sizes)
    if args.discard and args.scratch:
        raise UsageError("--scratch and --discard each choose where trials write: choose one")
    scratch = _SHM if args.discard else (args.scratch or Path(tempfile.gettempdir()))
    if not scratch.is_dir():
        if scratch.exists():
            raise UsageError(f"scratch {scratch} is not a directory")
        raise UsageError(f"scratch directory {scratch} does not exist")
    trials: list[Trial | FailedTrial] = []

    async def measure() -> None:
        wanted = _Selection(tuple(args.checkpoint), args.latest)
        # The listing has its own client: each trial opens fresh connections for the files.
        async with (
            _bench_target(args, settings) as recipe,
            _selected(recipe, wanted, out) as (_, source, selection),
        ):
            settings_count = f"{len(pairs)} setting{'s' if len(pairs) > 1 else ''}"
            total = len(pairs) * args.rounds

            def started() -> None:
                # Progress, as the trials' lines are: stdout holds only the results.
                out.progress(
                    f"benchmarking {source.description}: {settings_count}, each tried "
                    f"{'once' if args.rounds == 1 else f'{args.rounds} times in turn'}: "
                    f"{total} trial{'s' if total > 1 else ''}"
                )

            trials_run = run_trials(
                source,
                selection,
                pairs,
                rounds=args.rounds,
                budget=args.max_bytes,
                scratch=scratch,
                net=recipe.net,
                retry=recipe.retry,
                wanted=_file_filter(args),
                started=started,
            )
            async with aclosing(trials_run):
                async for trial in trials_run:
                    trials.append(trial)
                    # As each ends: a bench takes minutes, and a silent one looks hung.
                    out.progress(_trial_done(trial, len(trials), total, len(pairs)))

    try:
        signalled = _run(measure)
    except CheckpointSyncError as exc:  # one no later trial could escape
        # The trials measured before the bench stopped are still shown.
        if measured(trials):
            _bench_report(trials, args.rounds, out, stopped=str(exc))
        raise
    if signalled is not None:
        if not measured(trials):
            return signalled.end(out)
        if not out.as_json:
            _bench_report(trials, args.rounds, out, stopped=signalled.name)
        return signalled.end(out, _bench_document(trials, args.rounds, signalled.name))
    ended = measured(trials)
    if not ended:
        # A table of rows that all failed would only say it again, trial after trial.
        raise next(t.error for t in trials if isinstance(t, FailedTrial))
    # Empty files fetched measure nothing: every setting would tie at 0 MB/s.
    if not any(t.files and t.bytes for t in ended):
        # No table names the trials that failed: these lines do.
        for tried in settings_of(trials):
            for line in _failed_rounds(tried):
                out.error(line)
        failure = next((t.first_failure for t in ended if t.first_failure), None)
        if failure is not None:
            # Files were there, every one failed: that is not an empty selection (exit 4).
            return out.failed(f"no file could be fetched; the first: {failure}", EXIT_FILES_FAILED)
        if len(ended) < len(trials):
            # Exit 1, as for any trial that failed: the trials that failed never showed what
            # the selection holds, and exit 4 would send the user to change a selection that
            # may be right, and tell a script that a rerun is pointless.
            return out.failed(
                f"nothing measured: {len(trials) - len(ended)} of {len(trials)} trials failed; "
                "the others fetched no file, or only empty ones",
                EXIT_FILES_FAILED,
            )
        raise NotFoundError("nothing to measure: the selection has no file, or only empty ones")
    return _bench_report(trials, args.rounds, out)


def _bench_report(
    trials: list[Trial | FailedTrial], rounds: int, out: _Output, *, stopped: str | None = None
) -> int:
    """The table (or ``--json``'s document) of ``trials`` and the settings recommended, none if
    the bench ``stopped`` (why) before its end; the exit code of a bench that ended."""
    from .bench import TIE, fastest_not_recommended, measured, recommend, same_as, settings_of

    if out.as_json:
        out.json(_bench_document(trials, rounds, stopped))
    else:
        settings_tried = settings_of(trials)
        best = None if stopped else recommend(settings_tried)
        for line in _bench_table(settings_tried):
            out.answer(line)
        alike = same_as(settings_tried)
        for tried in settings_tried:
            if (like := alike.get((tried.concurrency, tried.part_size))) is not None:
                out.answer(f"{_flags(tried)} fetched as {_flags(like)} did: {_unused(tried)}")
        for tried in settings_tried:
            for line in _failed_rounds(tried):
                out.error(line)
            if tried.first_failure is not None:
                out.error(
                    f"{_trial_flags(tried)}: {tried.failed} failed, the first: "
                    f"{tried.first_failure}"
                )
        if stopped:
            out.answer("recommended: none (the bench stopped before its end)")
        elif best is None:
            out.answer("recommended: none (a trial of every setting failed)")
        else:
            faster = fastest_not_recommended(settings_tried)
            why = (
                ""
                if faster is None
                else f"; within {TIE:.0%} of the fastest, {_flags(faster)} at "
                f"{faster.mb_per_s:.1f} MB/s, with fewer connections or larger parts"
            )
            out.answer(f"recommended: {_flags(best)} ({best.mb_per_s:.1f} MB/s{why})")
    # Not a clean run: a trial that failed, or a file in one.
    ended = measured(trials)
    failed = len(ended) < len(trials) or any(t.failed for t in ended)
    return EXIT_FILES_FAILED if failed else EXIT_OK


def _bench_document(
    trials: list[Trial | FailedTrial], rounds: int, stopped: str | None
) -> dict[str, Any]:
    """``--json``'s document of ``trials`` (`_bench_report`)."""
    from .bench import recommend, same_as, settings_of

    settings_tried = settings_of(trials)
    best = None if stopped else recommend(settings_tried)
    alike = same_as(settings_tried)
    return {
        "rounds": rounds,
        "trials": [
            {**_bench_row(s), "same_as": _pair(alike.get((s.concurrency, s.part_size)))}
            for s in settings_tried
        ],
        "recommended": _pair(best),
        "stopped": stopped,
    }


def _pair(tried: Setting | None) -> dict[str, int] | None:
    return (
        None if tried is None else {"concurrency": tried.concurrency, "part_size": tried.part_size}
    )


def _unused(tried: Setting) -> str:
    """What of ``tried``'s setting its files left unused, where it fetched as a smaller one."""
    assert tried.transfer is not None
    in_flight = tried.transfer.in_flight
    unused = [] if tried.transfer.cut else ["parts larger than every file, each file one part"]
    if in_flight < tried.concurrency:
        unused.append(f"{in_flight} part{'' if in_flight == 1 else 's'}, so no more connections")
    return "; ".join(unused)


def _flags(tried: Setting | Trial | FailedTrial) -> str:
    """The flags that ask for ``tried``'s setting, as they can be passed back."""
    return f"--concurrency {tried.concurrency} --part-size {format_size(tried.part_size)}"


def _trial_flags(tried: Setting) -> str:
    return f"trial {_flags(tried)}"


def _trial_done(trial: Trial | FailedTrial, done: int, total: int, settings: int) -> str:
    """The progress line of the ``done``-th of ``total`` trials, ``settings`` a round."""
    from .bench import FailedTrial

    where = f"trial {done} of {total} (round {(done - 1) // settings + 1}): {_flags(trial)}"
    if isinstance(trial, FailedTrial):
        return f"{where}: failed: {trial.error}"
    said = f"{where}: {trial.mb_per_s:.1f} MB/s, {trial.failed} failed"
    if trial.retries:
        said += f", {trial.retries} request{'' if trial.retries == 1 else 's'} retried"
    return said


def _failed_rounds(tried: Setting) -> list[str]:
    """A line for each round of ``tried`` that an error ended."""
    return [f"{_trial_flags(tried)} failed in round {n}: {error}" for n, error in tried.errors]


def _bench_row(tried: Setting) -> dict[str, Any]:
    """A setting for ``--json``: the figures of its middle round, its failures, the range of its
    MB/s, and each round."""
    slowest, fastest = tried.spread or (None, None)
    middle = _trial_figures(tried.middle) if tried.middle else {}
    return {
        "concurrency": tried.concurrency,
        "part_size": tried.part_size,
        "files": middle.get("files"),
        "bytes": middle.get("bytes"),
        "failed": tried.failed,
        "first_failure": tried.first_failure,
        "mb_per_s": _rounded(tried.mb_per_s),
        "mb_per_s_min": _rounded(slowest),
        "mb_per_s_max": _rounded(fastest),
        "seconds": middle.get("seconds"),
        "cpu_seconds": middle.get("cpu_seconds"),
        "first_byte_ms": middle.get("first_byte_ms"),
        "connection_mb_s": middle.get("connection_mb_s"),
        "retries": middle.get("retries"),
        "rounds": [_bench_round(t) for t in tried.trials],
    }


def _bench_round(trial: Trial | FailedTrial) -> dict[str, Any]:
    from .bench import FailedTrial

    if isinstance(trial, FailedTrial):
        return {
            "concurrency": trial.concurrency,
            "part_size": trial.part_size,
            "error": str(trial.error),
        }
    return {**_trial_figures(trial), "error": None}


def _trial_figures(trial: Trial) -> dict[str, Any]:
    """A trial's figures as ``--json`` gives them: rates to a tenth of a MB/s, as the table
    shows them, and times to the millisecond (the first byte to 10 us), as `sync --json`'s."""
    figures = asdict(trial)
    del figures["transfer"]  # the row's same_as says what it told
    first_byte = trial.first_byte_ms
    return {
        **figures,
        "mb_per_s": round(trial.mb_per_s, 1),
        "seconds": round(trial.seconds, 3),
        "cpu_seconds": round(trial.cpu_seconds, 3),
        "first_byte_ms": None if first_byte is None else round(first_byte, 2),
        "connection_mb_s": _rounded(trial.connection_mb_s),
    }


def _rounded(mb_per_s: float | None) -> float | None:
    return None if mb_per_s is None else round(mb_per_s, 1)


# RAM-backed on Linux: --discard measures the network, not the disk.
_SHM = Path("/dev/shm")  # noqa: S108


def _bench_table(settings_tried: list[Setting]) -> list[str]:
    """One row a setting, as in ``--json``: the figures of its middle round, the range of its
    MB/s, its failures; after its files, bytes and retries, their range where its rounds had
    different amounts; "-" for what no round measured."""
    lines = [
        # The bytes too: a first file larger than --max-bytes is fetched whole.
        f"{'concurrency':>11} {'part size':>10} {'files':>6} {'bytes':>10} {'MB/s':>8} "
        f"{'range':>13} {'first byte':>11} {'per conn.':>11} {'CPU s':>6} {'failed':>6} "
        f"{'retries':>7}"
    ]
    for tried in settings_tried:
        rounds = tried.measured
        # The middle round's own figures, not --json's rounded ones: rounded twice, a first
        # byte of 0.048 ms showed as 0.1 ms.
        middle: dict[str, Any] = asdict(tried.middle) if tried.middle else {}
        lines.append(
            f"{tried.concurrency:>11} {human_bytes(tried.part_size):>10} "
            f"{_amount(middle.get('files'), [t.files for t in rounds], str):>6} "
            f"{_amount(middle.get('bytes'), [t.bytes for t in rounds], human_bytes):>10} "
            f"{_shown(tried.mb_per_s, '{:.1f}'.format):>8} "
            f"{_shown(tried.spread, lambda r: f'{r[0]:.1f}-{r[1]:.1f}'):>13} "
            f"{_shown(middle.get('first_byte_ms'), '{:.1f} ms'.format):>11} "
            f"{_shown(middle.get('connection_mb_s'), '{:.1f} MB/s'.format):>11} "
            f"{_shown(middle.get('cpu_seconds'), '{:.2f}'.format):>6} "
            f"{_shown(tried.failed, str):>6} "
            f"{_amount(middle.get('retries'), [t.retries for t in rounds], str):>7}"
        )
    return lines


def _shown(value: T | None, show: Callable[[T], str]) -> str:
    return "-" if value is None else show(value)


def _amount(middle: int | None, rounds: list[int], show: Callable[[int], str]) -> str:
    """The middle round's files, bytes or retries, and the fewest and the most of its rounds
    where they show different ("9 (9-10)")."""
    if middle is None:
        return "-"
    fewest, most = show(min(rounds)), show(max(rounds))
    return show(middle) if fewest == most else f"{show(middle)} ({fewest}-{most})"


@asynccontextmanager
async def _bench_target(
    args: argparse.Namespace, settings: Settings
) -> AsyncIterator[SourceRecipe]:
    """The source the flags name, or the built-in server in a process of its own."""
    if any(spec.given(args) for spec in SOURCES):
        yield _recipe(settings, args, _chosen_source(args))
        return
    command = [
        sys.executable,
        "-m",
        "checkpoint_sync.localserver",
        "serve-synthetic",
        "--until-stdin-closes",  # so it ends with bench, even a bench killed with SIGKILL
    ]
    async with await anyio.open_process(command) as server:
        assert server.stdout is not None
        ready = (await server.stdout.receive()).decode().split()
        if ready[:1] != ["ready"]:
            raise CheckpointSyncError("the built-in server did not start")
        local = _built_in(settings, ready[1], "bench")
        job_args = argparse.Namespace(project="bench", job="job")
        try:
            yield _recipe(local, job_args, TrainingJobs())
        finally:
            server.terminate()
