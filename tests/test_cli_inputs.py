"""No argument, setting or environment a user can give ends in a traceback.

A property test: command lines generated from the real parser (each command, any of its flags,
plausible and hostile values), a config file of valid and invalid TOML, odd environment
variables; each run in process against the built-in server, and never past this machine. Every
input it found has a table case of its own (test_config.py, test_sync.py), so that it stays
tested whatever this search tries.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_sync import cli
from checkpoint_sync.config import ENV_PREFIX, Settings
from checkpoint_sync.localserver import Catalog, synthetic_loops_run, synthetic_wandb_model
from checkpoint_sync.net import proxy_for_host

from .conftest import JOB, PROJECT, job_catalog
from .support import API_KEY, ServerThread, run_cli

# The exit codes the README documents.
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 129, 130, 141, 143}
LOOPS_RUN = "run-1"
WANDB_MODEL = "model-1"
WANDB_ARTIFACT = "team/agents/agent-001"

# What no table of cases tries: empty, blank, signs, overflows, non-numbers, characters a
# terminal or a header chokes on, undecodable bytes (as argv and os.environ carry them), options
# where a value goes, and home directories. Not NUL: neither argv nor the environment can hold it.
HOSTILE = [
    "",
    " ",
    "\t",
    "-1",
    "0",
    "-0",
    "1e999",
    "nan",
    "inf",
    "9" * 30,
    "0x10",
    "1_000",
    "ü",
    "名前",
    "\u202e",
    "\x1b[31m",
    "a\nb",
    "\udcff",
    "=",
    "-",
    "--json",
    "~",
    "~/x",
    "~no-such-user/x",
]
hostile = st.sampled_from(HOSTILE) | st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=6
)
SIZES = ["64MiB", "256KiB", "64KiB", "1", "512K", "1GB", "1.5MiB", "0", "0.5", "64 MiB"]
GLOBS = ["*.json", "extra/*", "*", "[", "**", "?", "[!a]*", "adapter/*"]

# Settings whose valid values could make an example wait (a timeout, retries) or leave the machine
# (a URL): drawn only from small, local or invalid values, and given a small, local one when an
# example draws none.
WAITS = {
    "connect_timeout": "2",
    "read_timeout": "2",
    "retries": "2",
    "retry_max_delay": "0.01",
    "retry_deadline": "3",
}
URLS = ("api_url", "wandb_api_url", "wandb_base_url")
KEY_VARIABLES = ("BASETEN_API_KEY", "WANDB_API_KEY", "MY_KEY")


@dataclass(frozen=True)
class Place:
    server: str
    closed: str  # a local port nothing listens on: refused at once
    root: Path


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Place]:
    job = job_catalog(checkpoints=2, large_files=0, small_files=1, small_size=100).jobs[0]
    catalog = Catalog(
        api_key=API_KEY,
        jobs=[job],
        loops=synthetic_loops_run(LOOPS_RUN, files=1, size=100),
        wandb_api_key=API_KEY,
        wandb_models=[synthetic_wandb_model(WANDB_MODEL, {10: {"loss": 1.0}, 20: {"loss": 0.5}})],
    )
    # Bound and never listening, for the whole module: connections are refused at once, and no
    # server of another test (pytest-xdist runs several at once) can take the port meanwhile.
    with socket.socket() as refusing, ServerThread(catalog) as server:
        refusing.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        yield Place(server.url, closed, tmp_path_factory.mktemp("inputs"))


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command of the real parser: a new one, or a new flag, is covered unasked."""
    (commands,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


# `demo` fetches ~400 MB from a server of its own, with no flag to cap it: its transfer flags are
# `sync`'s, drawn there. `bench` is capped (`_argv`).
COMMANDS = {name: parser for name, parser in _commands().items() if name != "demo"}


def _urls(place: Place) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            place.server,
            place.closed,
            f"{place.server}/",
            "ftp://127.0.0.1",
            "http://",
            "http://127.0.0.1:99999",
            "http://[::1",
            "127.0.0.1",
            "http://user:pass@127.0.0.1:1",
        ]
    )


def _paths(work: Path) -> st.SearchStrategy[str]:
    existing = work / "a-file"
    return st.sampled_from(
        [
            str(work / "mirror"),
            str(work / "missing" / "deeper"),
            str(existing),
            str(existing / "under-a-file"),
            str(work),
            "relative/dir",
            ".",
            "~/mirror",
            "~no-such-user/mirror",
            "/dev/null",
            "/proc/self/nope",
        ]
    )


def _plausible(action: argparse.Action, place: Place, work: Path) -> st.SearchStrategy[str]:
    """Values a user might mean for ``action``, by what it holds."""
    if action.choices is not None:
        choices = [str(c) for c in action.choices]
        return st.sampled_from(choices + [c.lower() for c in choices])
    by_dest: dict[str, list[str]] = {
        "project": [PROJECT, "nope"],
        "job": [JOB, "nope"],
        "loops_run": [LOOPS_RUN, "nope"],
        "loops_checkpoint": [
            f"bt://loops:{LOOPS_RUN}/weights/step-10",
            f"bt://loops:{LOOPS_RUN}/sampler_weights/step-20",
            "bt://loops:x/weights/",
            "bt://loops:",
            "bt://",
        ],
        "base_model": ["Qwen/Qwen3-8B", "nope"],
        "wandb_model": [WANDB_MODEL, "nope"],
        "wandb_artifact": [WANDB_ARTIFACT, "team/agents", "a/b/c/d"],
        "best": ["loss", "nope"],
        "checkpoint": ["checkpoint-10", "checkpoint-20", "step-10", "nope"],
        "node_rank": ["0", "1", "7"],
        "include": GLOBS,
        "exclude": GLOBS,
        "concurrency": ["1", "4", "16", "1024", "1025"],
        "concurrencies": ["1", "1,2", "4,", ",", "2,0"],
        "part_size": SIZES,
        "part_sizes": ["64KiB", "64KiB,128KiB", "16MiB", "1KiB"],
        "limit_rate": SIZES,
        "max_delete": ["0", "1", "100"],
        # No lock is held in these examples: a valid timeout is never waited out.
        "wait_lock_timeout": ["0.3", "600", "0", "86401", "nan"],
        "rounds": ["1"],
        "max_bytes": ["64KiB", "1"],
    }
    if action.dest == "api_url":
        return _urls(place)
    if action.dest in ("dest", "scratch", "config"):
        return _paths(work)
    return st.sampled_from(by_dest.get(action.dest, ["x", "1"]))


@st.composite
def _flag(draw: st.DrawFn, parser: argparse.ArgumentParser, place: Place, work: Path) -> list[str]:
    """One of ``parser``'s flags as a user may spell it: in full, abbreviated, with ``=``."""
    actions = [a for a in parser._actions if a.option_strings]
    action = draw(st.sampled_from(actions))
    option = draw(st.sampled_from(action.option_strings))
    if option.startswith("--") and draw(st.integers(0, 7)) == 0:
        option = option[: draw(st.integers(3, len(option)))]  # `--conf`, maybe ambiguous
    if action.nargs == 0:
        # A switch given a value (`--json=yes`) is refused by argparse.
        return [option] if draw(st.integers(0, 19)) else [f"{option}=yes"]
    value = draw(hostile if draw(st.integers(0, 7)) == 0 else _plausible(action, place, work))
    return [f"{option}={value}"] if draw(st.booleans()) else [option, value]


SOURCE_FLAGS = [
    [],
    ["--project", PROJECT, "--job", JOB],
    ["--loops-run", LOOPS_RUN],
    ["--wandb-model", WANDB_MODEL, "--wandb-artifact", WANDB_ARTIFACT],
]


def _rarely(tokens: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """No token in most examples, else one of ``tokens``."""
    return st.integers(0, 9).flatmap(lambda n: tokens.map(lambda t: [t]) if n == 0 else st.just([]))


@st.composite
def _argv(draw: st.DrawFn, place: Place, work: Path) -> list[str]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[name]
    # Mostly a command that could work, for the random flags to reach past the parser.
    start = draw(st.sampled_from(SOURCE_FLAGS[1:] if name == "bench" else SOURCE_FLAGS))
    if name == "sync" and draw(st.booleans()):
        start = [*start, "--dest", str(work / "mirror")]
    flags = draw(st.lists(_flag(parser, place, work), max_size=4))
    stray = draw(_rarely(st.sampled_from(["extra", "-", "--", "-x", "--bogus"])))
    before = draw(_rarely(st.sampled_from(["--version", "-h", "--json", "--bogus"])))
    argv = [*before, name, *start, *[token for flag in flags for token in flag], *stray]
    if name == "bench":  # one trial of one file each, whatever was drawn before
        argv += ["--rounds", "1", "--max-bytes", "64KiB"]
    return argv


def _config_values(place: Place) -> st.SearchStrategy[dict[str, Any]]:
    """A few settings, each right- or wrong-typed."""
    right: dict[str, st.SearchStrategy[Any]] = {
        "api_key": st.sampled_from([API_KEY, f"{API_KEY}\n", "ключ"]),
        "wandb_api_key": st.sampled_from([API_KEY, "ключ"]),
        "api_key_env": st.sampled_from(KEY_VARIABLES),
        "wandb_api_key_env": st.sampled_from(KEY_VARIABLES),
        "auth_scheme": st.sampled_from(["Bearer", "Api-Key", "bearer"]),
        "page_size": st.sampled_from([1, 2, 1000, 10**30]),
        "dest": st.sampled_from(["mirror", "~/mirror", "relative/dir"]),
        "concurrency": st.sampled_from([1, 4, 1024, 1025]),
        "part_size": st.sampled_from(["64KiB", 65536, "64MiB", 10**30, "1e3"]),
        "limit_rate": st.sampled_from([0, "1MiB", 10**30, "0.5"]),
        "max_delete": st.sampled_from([0, 5, 10**30]),
        "wait_lock_timeout": st.sampled_from([0.3, 600.0]),
        "ca_bundle": st.sampled_from(["missing.pem", "a-file", "."]),
        **{name: st.sampled_from([float(v), 0.001]) for name, v in WAITS.items()},
        "retries": st.sampled_from([1, 2]),
        **{name: _urls(place) for name in URLS},
    }
    structured = [[1, 2], {"a": 1}, datetime(2026, 1, 1, tzinfo=UTC)]
    # No large number where it would be a long wait.
    waits = [True, -1, 0, math.nan, math.inf, "x", "", *structured]
    numbers = [True, -1, 0, 2**70, 1.5, math.nan, math.inf, "x", "1e3", "", *structured]
    paths = ["", " ", "a\x00b", "~no-such-user/x", 0, True, *structured]
    texts = ["", " ", "ü", "a\x00b", "\x7f", "a\nb", 0, True, *structured]

    def wrong(key: str) -> list[Any]:
        if key in WAITS:
            return waits
        annotation = Settings.model_fields[key].annotation
        if annotation in (int, float, int | None, float | None):
            return numbers
        if annotation is bool:
            return ["yes", "true", 1, 0, "ü", *structured]
        return paths if annotation == Path | None else texts

    def value(key: str) -> st.SearchStrategy[Any]:
        if key == "no_such_key":
            return st.just(1)
        fitting = right.get(key, st.booleans())
        return fitting if key in URLS else fitting | st.sampled_from(wrong(key))

    keys = [*Settings.model_fields, "no_such_key"]
    return st.lists(st.sampled_from(keys), max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({key: value(key) for key in chosen})
    )


def _toml(value: Any) -> str:
    """``value`` as TOML (JSON's string escapes are TOML's; a lone surrogate's, TOML refuses)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return f"[{', '.join(_toml(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    assert isinstance(value, datetime)
    return value.isoformat()


BROKEN_TOML = [
    b"",
    b"= 1",
    b"concurrency = ",
    b"[[",
    b"\xff\xfe",
    b"concurrency = 1\nconcurrency = 2",
    b"\xef\xbb\xbfconcurrency = 1",
    b"[section]\nconcurrency = 1",
]


@dataclass(frozen=True)
class Config:
    text: bytes | None  # None: a path with no file
    waits_and_urls: frozenset[str]  # the keys of WAITS and URLS it sets


@st.composite
def _config(draw: st.DrawFn, place: Place) -> Config | None:
    kind = draw(st.sampled_from(["none"] * 3 + ["values"] * 5 + ["broken", "missing"]))
    if kind == "none":
        return None
    if kind == "missing":
        return Config(None, frozenset())
    if kind == "broken":
        return Config(draw(st.sampled_from(BROKEN_TOML)), frozenset())
    values = draw(_config_values(place))
    text = "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())
    return Config(text.encode(), frozenset(values) & {*WAITS, *URLS})


@st.composite
def _environment(draw: st.DrawFn, place: Place, work: Path) -> dict[str, str | None]:
    """Odd values for the variables the program reads (None: unset)."""
    env: dict[str, str | None] = {}
    odd = st.lists(st.sampled_from(list(Settings.model_fields)), min_size=1, max_size=3)
    for name in draw(st.integers(0, 2).flatmap(lambda n: odd if n == 0 else st.just([]))):
        if name in WAITS:
            value = draw(st.sampled_from([WAITS[name], "-1", "nan", "x", ""]))
        elif name in URLS:
            value = draw(_urls(place) | st.sampled_from(["", " ", "ü"]))
        else:
            value = draw(hostile)
        env[ENV_PREFIX + name.upper()] = value
    keys = st.sampled_from([API_KEY, "", " ", "\n", f"{API_KEY}\n", "a\x01b", "ключ", "a b"])
    env["BASETEN_API_KEY"] = API_KEY if draw(st.integers(0, 4)) else draw(keys | st.none())
    env["WANDB_API_KEY"] = API_KEY if draw(st.integers(0, 4)) else draw(keys | st.none())
    env["MY_KEY"] = draw(keys | st.none())
    proxies = st.sampled_from(
        [
            place.closed,
            "",
            "127.0.0.1:1",
            "socks5://127.0.0.1:1",
            "http://[::1",
            "http://u:p@127.0.0.1:1",
            "ü",
        ]
    )
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = draw(st.none() | proxies)
    env["NO_PROXY"] = draw(st.none() | st.sampled_from(["", "*", "127.0.0.1", ",,"]))
    certs = st.sampled_from(["", str(work / "missing.pem"), str(work / "a-file"), str(work)])
    env["SSL_CERT_FILE"] = draw(st.none() | certs)
    env["SSL_CERT_DIR"] = draw(st.none() | certs)
    return env


def _wants_json(argv: list[str]) -> bool | None:
    """Whether the parser takes ``argv`` as asking for ``--json``; None if it refuses it or only
    shows help."""
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        try:
            return bool(getattr(cli._parser().parse_args(argv), "json", False))
        except (cli._BadArguments, SystemExit):
            return None


@settings(
    max_examples=1500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_input_ends_in_a_traceback(place: Place, data: st.DataObject) -> None:
    work = Path(tempfile.mkdtemp(dir=place.root))
    (work / "a-file").write_text("not a certificate, not TOML = \n")
    (work / "home").mkdir()
    argv = data.draw(_argv(place, work), label="argv")
    config = data.draw(_config(place), label="config")
    env = data.draw(_environment(place, work), label="environment")
    if config is not None:
        config_file = work / "config.toml"
        if config.text is not None:
            config_file.write_bytes(config.text)
        argv += ["--config", str(config_file)]
    # Nothing waits, nothing leaves the machine: what no draw set is small and local.
    for name, value in {**WAITS, **dict.fromkeys(URLS, place.server)}.items():
        variable = ENV_PREFIX + name.upper()
        if env.get(variable) is None and (config is None or name not in config.waits_and_urls):
            env[variable] = value
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # a relative --dest lands here
        patch.setenv("HOME", str(work / "home"))  # and a `~/mirror` here
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            patch.delenv(name)
        for name, given in env.items():
            if given is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, given)
        proxy_for_host.cache_clear()
        try:
            result = run_cli(*argv)
        finally:
            proxy_for_host.cache_clear()

    for sign in ("Traceback", "internal error", "Task exception", "Exception in"):
        assert sign not in result.stderr, result.stderr
    assert result.code in DOCUMENTED, result
    if result.code == 2:
        assert result.stderr.splitlines()[-1].startswith("checkpoint-sync: error: "), result
    wants = _wants_json(argv)
    if wants or (wants is None and result.code == 2 and result.stdout):
        json.loads(result.stdout)  # one document, nothing before or after it
