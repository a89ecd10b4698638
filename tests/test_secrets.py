"""Secrets never show, --debug included; and --fsync really reaches the disk.

Every in-process run (`support.run_cli`) already asserts that neither the API key nor a presigned
signature was printed; the tests here drive the paths most likely to leak them.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from checkpoint_sync.localserver import Faults
from checkpoint_sync.net import as_sent, credentials_problem, proxy_credentials

from .conftest import JOB, job_catalog, sync_args
from .support import (
    API_KEY,
    ServerThread,
    TunnelProxy,
    assert_exact,
    assert_no_secret,
    http_serving,
    mirrored,
    proxy_named,
    run_cli,
    send_answer,
)


def break_one_file(server: ServerThread, how: str) -> None:
    victim = server.files()[0]  # a multi-part file
    if how == "denied":
        server.faults.denied = {victim.name}
    elif how == "server errors":
        server.faults.hook = lambda name, start, end: "500" if name == victim.name else None
    elif how == "shifted range":
        server.faults.shift_content_range = 7
    elif how == "stall":
        server.faults.hook = lambda name, start, end: "stall" if name == victim.name else None
        server.faults.stall_seconds = 2
    elif how == "bad url":
        victim.external_url = "http://[::1/objects/1?X-Amz-Signature=s3cr3t&X-Amz-Date=1"


@pytest.mark.parametrize(
    ("how", "shown"),
    [
        ("denied", "?<redacted>"),
        ("server errors", "?<redacted>"),
        ("stall", "?<redacted>"),
        ("shifted range", "does not match the requested bytes"),
        ("bad url", "its presigned URL is not a valid URL"),
        ("expiry", None),
    ],
)
def test_failures_under_debug_name_urls_without_their_query(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, how: str, shown: str | None
) -> None:
    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "2")
    monkeypatch.setenv("CHECKPOINT_SYNC_READ_TIMEOUT", "0.3")
    if how == "expiry":
        server.faults.url_ttl = 0.2
        server.faults.throttle = 4 << 20
    else:
        break_one_file(server, how)

    result = run_cli(*sync_args(server, dest, "--debug", "--json"))

    output = result.stdout + result.stderr
    assert_no_secret(output)
    assert "s3cr3t" not in output
    if shown is not None:
        assert result.code == 1
        assert shown in output
    # No URL anywhere in the output keeps a query string.
    assert not re.search(r"https?://[^\s\"']*\?(?!<redacted>)", output)


def test_a_host_that_sends_the_request_back_is_not_shown_its_query(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A port that answers with what it was sent (an echo service, a misrouted balancer): the
    # answer's first line, quoted as it is no status line, is the request line, whose target
    # holds the presigned signature with no scheme or host before it.
    class Echoing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.wfile.write(f"{self.requestline}\r\n\r\n".encode())

    monkeypatch.setenv("CHECKPOINT_SYNC_RETRIES", "1")
    with http_serving(Echoing) as echo:
        server.files()[0].external_url = f"{echo}/o?X-Amz-Signature=s3cr3t&X-Amz-Date=1"
        shown = run_cli(*sync_args(server, dest))
        as_json = run_cli(*sync_args(server, dest, "--json"))

    assert shown.code == as_json.code == 1
    assert "not an HTTP/1.x status line: 'GET /o?<redacted>'" in shown.stderr
    (failure,) = json.loads(as_json.stdout)["failures"]
    assert "not an HTTP/1.x status line: 'GET /o?<redacted>'" in failure["error"]
    for result in (shown, as_json):
        assert "s3cr3t" not in result.stdout + result.stderr


def test_a_refused_key_is_not_shown_even_under_debug(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASETEN_API_KEY", "refused-key-9f8e7d6c5b4a")

    result = run_cli(*sync_args(server, dest, "--debug", "--json"))

    assert result.code == 3
    assert "refused-key-9f8e7d6c5b4a" not in result.stdout + result.stderr


def test_a_key_read_with_a_trailing_newline_works(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASETEN_API_KEY", f"  {API_KEY}\n")

    result = run_cli(*sync_args(server, dest, "--debug"))

    assert result.code == 0, result.stderr
    assert_exact(mirrored(dest, JOB, server.files()[0]), server.files()[0])


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "through-a-proxy"])
def test_a_key_with_a_non_ascii_character_is_a_usage_error_before_any_request(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, proxied: bool
) -> None:
    # Through a proxy it was sent as UTF-8, and the server's refusal read as a wrong key (3).
    monkeypatch.setenv("BASETEN_API_KEY", "\u043a\u043b\u044e\u0447-key")
    with TunnelProxy() as proxy:
        named = proxy_named(monkeypatch, "HTTP_PROXY", proxy.url) if proxied else nullcontext()
        with named:
            result = run_cli(*sync_args(server, dest))

    assert result.code == 2, result.stderr
    assert "the key contains a non-ASCII character" in result.stderr
    assert "\u043a" not in result.stderr
    assert server.traffic.api_requests == 0
    assert proxy.forwarded == []


def test_a_key_with_a_control_character_is_a_usage_error_that_hides_it(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASETEN_API_KEY", "half-a-key\r\nX-Injected: 1")

    result = run_cli(*sync_args(server, dest, "--debug"))

    assert result.code == 2
    assert "the key contains a control character" in result.stderr
    assert "half-a-key" not in result.stderr
    assert "Traceback" not in result.stderr


@functools.cache
def _why_strace_cannot_trace() -> str | None:
    """Why this machine cannot run the CLI under strace, if it cannot (not installed, or
    ptrace refused, as in some containers): asked of `true`, so that a run of ours that fails
    under strace fails its test instead of skipping it."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    done = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True)
    return None if done.returncode == 0 else f"strace cannot trace here: {done.stderr[-200:]!r}"


@pytest.fixture
def strace() -> None:
    if (why := _why_strace_cannot_trace()) is not None:
        pytest.skip(why)


def _strace(server: ServerThread, dest: Path, calls: str, *extra: str) -> str:
    """The trace of the system ``calls`` (strace's ``-e trace=``) of a CLI sync into ``dest``;
    `subprocess.CalledProcessError` if it failed."""
    trace = dest.parent / f"trace-{dest.name}"
    subprocess.run(
        [
            *("strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(trace)),
            *(sys.executable, "-m", "checkpoint_sync", *sync_args(server, dest, *extra)),
        ],
        check=True,
        capture_output=True,
    )
    return trace.read_text()


def _fsync_calls(server: ServerThread, dest: Path, *extra: str) -> dict[str, int]:
    """How often the CLI, run under strace, called fsync and fdatasync, and fdatasync on
    staging files (``parts``: one per part recorded as done)."""
    text = _strace(server, dest, "fsync,fdatasync", *extra)
    calls = re.findall(r"\b(fsync|fdatasync)\(", text)
    counts = {name: calls.count(name) for name in ("fsync", "fdatasync")}
    counts["parts"] = len(re.findall(r"\bfdatasync\(\d+<[^>]*/staging/", text))
    return counts


@pytest.mark.usefixtures("strace")
def test_fsync_makes_files_and_their_directories_durable(
    server: ServerThread, tmp_path: Path
) -> None:
    plain = _fsync_calls(server, tmp_path / "plain")
    durable = _fsync_calls(server, tmp_path / "durable", "--fsync")

    published = len(server.files())
    assert plain["fsync"] == 0  # by default the page cache is trusted
    assert durable["fsync"] >= 2 * published  # each file, then its directory after the rename
    assert durable["fdatasync"] > plain["fdatasync"]  # part data, and the manifest's commits
    for file in server.files():
        assert_exact(mirrored(tmp_path / "durable", JOB, file), file)


@pytest.mark.usefixtures("strace")
def test_every_part_recorded_as_done_was_made_durable(server: ServerThread, tmp_path: Path) -> None:
    clean = _fsync_calls(server, tmp_path / "clean", "--fsync")
    answered: set[tuple[str, int, int]] = set()

    def first_answer_unterminated(name: str, start: int, end: int) -> str | None:
        # All of a part's bytes, then a broken end: the part is done without a second request.
        first = (name, start, end) not in answered
        answered.add((name, start, end))
        return "unterminated" if first else None

    server.call(lambda: setattr(server.faults, "hook", first_answer_unterminated))
    broken = _fsync_calls(server, tmp_path / "broken", "--fsync")

    assert clean["parts"] > 0
    assert broken["parts"] == clean["parts"]


@pytest.mark.usefixtures("strace")
@pytest.mark.parametrize("killed", [False, True], ids=["deleting", "after-a-killed-run"])
def test_fsync_makes_deletions_durable_before_their_records_go(
    tmp_path: Path, killed: bool
) -> None:
    # A file --delete deleted must not come back after a power loss once its record is gone: it
    # would stay for ever, taken for a user's. Each directory that lost an entry (a file
    # deleted, a directory removed) and is still there is synced once, before that commit;
    # also where a run killed before its sync and commit removed them.
    plain, durable = tmp_path / "plain", tmp_path / "durable"
    with ServerThread(job_catalog()) as server:
        for dest in (plain, durable):
            assert run_cli(*sync_args(server, dest)).code == 0
            # A user's file keeps its directory, which lost only files, and so the rank's and
            # the checkpoint's.
            (dest / JOB / "checkpoint-20" / "1" / "extra" / "mine").write_text("mine")
        if killed:
            shutil.rmtree(durable / JOB / "checkpoint-10")
        job = server.catalog.jobs[0]
        kept = [
            c for c in job.checkpoints if c.checkpoint_id not in ("checkpoint-10", "checkpoint-20")
        ]
        server.call(lambda: setattr(job, "checkpoints", kept))
        without = _strace(server, plain, "fsync,fdatasync", "--delete")
        text = _strace(
            server, durable, "unlink,unlinkat,rmdir,fsync,fdatasync", "--delete", "--fsync"
        )

    assert "fsync(" not in without  # by default the page cache is trusted
    assert not (durable / JOB / "checkpoint-10").exists()
    removals: list[tuple[int, str]] = []  # (line, directory that lost an entry), in order
    syncs: list[tuple[int, str]] = []  # (line, file or directory synced)
    for number, line in enumerate(text.splitlines()):
        if not line.endswith(" = 0"):
            continue  # failed: a directory that is not empty stays
        if removal := re.search(
            r'\b(?:unlink|rmdir)(?:at)?\((?:AT_FDCWD<[^>]*>, )?"([^"]+)"', line
        ):
            if Path(removal[1]).is_relative_to(durable / JOB):
                removals.append((number, str(Path(removal[1]).parent)))
        elif sync := re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>", line):
            syncs.append((number, sync[1]))
    assert removals
    # The commit that drops the records: the manifest's first sync after the deletions.
    commit = min(n for n, path in syncs if n > removals[-1][0] and path.endswith("-wal"))
    # Of the directories that stay: those that lost a directory (the run's, checkpoint-20's,
    # which lost rank 0's) and those that lost only files (rank 1's and its extra/).
    stay = ("", "/checkpoint-20", "/checkpoint-20/1", "/checkpoint-20/1/extra")
    lost = {f"{durable}/{JOB}{d}" for d in stay}
    assert {directory for _, directory in removals if Path(directory).is_dir()} <= lost
    for directory in lost:
        synced = [n for n, path in syncs if path == directory]
        assert len(synced) == 1, directory  # once, not once a file
        removed = [n for n, where in removals if where == directory]
        assert max(removed, default=-1) < synced[0] < commit, directory


@pytest.mark.usefixtures("strace")
@pytest.mark.parametrize(
    ("dest_under", "existing"),
    [("", True), ("", False), ("new/newer", False)],
    ids=["existing-dest", "dest", "dest-and-parents"],
)
def test_fsync_makes_the_directories_it_creates_durable(
    tmp_path: Path, dest_under: str, existing: bool
) -> None:
    # A file survives power loss only if the names leading to it do: each directory made by
    # the run (DEST's missing parents too, or only its .checkpoint-sync) is an entry in its
    # parent, which must be synced; so is a staging file's name before its parts are recorded.
    dest = tmp_path / dest_under / "mirror"
    if existing:
        dest.mkdir()
    trace = tmp_path / "trace"
    with ServerThread(job_catalog(checkpoints=1, small_files=1)) as server:
        done = subprocess.run(
            [
                *("strace", "-f", "-qq", "-y", "-e", "trace=mkdir,mkdirat,fsync,fdatasync"),
                *("-o", str(trace), sys.executable, "-m", "checkpoint_sync"),
                *sync_args(server, dest, "--fsync"),
            ],
            capture_output=True,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        for file in server.files():
            assert_exact(mirrored(dest, JOB, file), file)
    made: dict[str, int] = {}  # directory -> the line of the trace that made it
    syncs: list[tuple[int, str]] = []  # (line, file or directory synced)
    for number, line in enumerate(trace.read_text().splitlines()):
        if mkdir := re.search(r'mkdir(?:at)?\((?:AT_FDCWD<[^>]*>, )?"([^"]+)".*\) = 0$', line):
            made[mkdir[1]] = number
        elif sync := re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>", line):
            syncs.append((number, sync[1]))
    assert (str(dest) in made) is not existing
    assert str(dest / ".checkpoint-sync") in made
    assert any(Path(d).is_relative_to(dest / JOB) for d in made)

    def first_after(at: int, lines: list[int]) -> int | None:
        return next((n for n in lines if n > at), None)

    # Its parent synced after a directory was made, and before the manifest's next sync: no
    # record then made durable vouches for a file under a name a power loss could take. (A
    # later sync of the parent, for a directory made beside it, must not pass for this one.)
    manifest_syncs = [n for n, path in syncs if "/manifest.sqlite3" in path]
    unsynced = []
    for directory, at in made.items():
        parent_syncs = [n for n, path in syncs if path == str(Path(directory).parent)]
        parent, manifest = first_after(at, parent_syncs), first_after(at, manifest_syncs)
        if parent is None or (manifest is not None and manifest < parent):
            unsynced.append(directory)
    assert unsynced == []
    assert any(path == str(dest / ".checkpoint-sync/staging") for _, path in syncs)


@pytest.mark.usefixtures("strace")
def test_fsync_makes_a_one_part_files_staging_name_durable_before_it_is_recorded(
    tmp_path: Path,
) -> None:
    # A file of one part gets its record of parts only once in flight for over a second (3 MiB
    # at 1 MiB/s): that record must not vouch for a staging file whose name a power loss could
    # take. One file of one part only, so no file in parts has the staging directory synced on
    # its behalf.
    catalog = job_catalog(checkpoints=1, large_files=0, small_files=1, small_size=3 << 20)
    dest = tmp_path / "mirror"
    one_part = ["--node-rank", "0", "--part-size", "64MiB"]
    with ServerThread(catalog, Faults(throttle=1 << 20)) as server:
        trace = _strace(server, dest, "openat,fsync,fdatasync", "--fsync", *one_part)
        (file,) = [f for f in server.files() if f.node_rank == 0]
        assert_exact(mirrored(dest, JOB, file), file)
    staging = re.escape(str(dest / ".checkpoint-sync" / "staging"))
    lines = trace.splitlines()

    def first(after: int, pattern: str) -> int | None:
        return next(
            (n for n, line in enumerate(lines) if n > after and re.search(pattern, line)), None
        )

    opened = first(-1, rf'"{staging}/[^"]+", O_RDWR')
    assert opened is not None
    flushed = first(opened, rf"\bfdatasync\(\d+<{staging}/")  # its bytes, before its record
    assert flushed is not None
    # The staging directory, synced as the run began, again once the file's name is in it; and
    # before the manifest's commit that holds the record.
    named = first(opened, rf"\bfsync\(\d+<{staging}>")
    committed = first(flushed, r"sync\(\d+<[^>]*manifest\.sqlite3")
    assert named is not None
    assert committed is None or named < committed


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("variable", ["BASETEN_API_KEY", "WANDB_API_KEY", "MY_KEY"])
def test_a_key_quoted_in_a_refused_argument_is_not_shown(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, variable: str, as_json: bool
) -> None:
    # A script handing the key to a flag there is not (`--api-key "$BASETEN_API_KEY"`): argparse
    # quotes what it refuses, before any setting has been read.
    monkeypatch.delenv("BASETEN_API_KEY")
    if variable == "MY_KEY":
        monkeypatch.setenv("CHECKPOINT_SYNC_API_KEY_ENV", "MY_KEY")
    monkeypatch.setenv(variable, f"{API_KEY}\n")

    result = run_cli(*sync_args(server, dest, "--api-key", API_KEY, *["--json"] * as_json))

    assert result.code == 2
    assert "unrecognized arguments: --api-key <redacted>" in result.stderr
    assert "Traceback" not in result.stderr


@contextmanager
def server_quoting(header: str, status: int, who: str) -> Iterator[str]:
    """A server answering ``status`` with a long ``detail`` that ends quoting the request's
    ``header``, as some gateways' debug pages and proxies' error pages do; yields its origin."""

    class Quoting(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            # The header's value starts a little before the 300th character, where messages are
            # cut.
            detail = f"refused by the {who}".ljust(260, ".") + f" {header}: {self.headers[header]}"
            send_answer(self, status, json.dumps({"detail": detail}).encode(), "application/json")

    with http_serving(Quoting) as origin:
        yield origin


@pytest.mark.parametrize(("status", "code"), [(422, 2), (400, 1)])
def test_a_key_the_api_quotes_where_its_message_is_cut_shows_no_part(
    dest: Path, status: int, code: int
) -> None:
    with server_quoting("Authorization", status, "gateway") as api:
        args: list[str | Path] = ["sync", "--api-url", api, "--project", "p", "--job", "j"]
        result = run_cli(*args, "--dest", dest, "--json")

    assert result.code == code
    assert json.loads(result.stdout)["exit_code"] == code
    assert "refused by the gateway" in result.stderr
    output = result.stdout + result.stderr
    assert API_KEY[:8] not in output, "a part of the key was printed"


def _config_holding_the_key(
    where: Path, setting: str, monkeypatch: pytest.MonkeyPatch, key: str
) -> Path:
    """A config file that gives ``key`` by ``setting``; for ``api_key_env``, in a variable the
    file names. No key comes from the environment otherwise."""
    monkeypatch.delenv("BASETEN_API_KEY")
    config = where / "c.toml"
    if setting == "api_key_env":
        monkeypatch.setenv("MY_KEY", key)
        config.write_text('api_key_env = "MY_KEY"\n')
    else:
        config.write_text(f"{setting} = {json.dumps(key)}\n")  # a TOML basic string too
    return config


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("setting", ["api_key", "wandb_api_key", "api_key_env"])
def test_a_key_from_the_config_file_quoted_in_a_refused_argument_is_not_shown(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, setting: str, as_json: bool
) -> None:
    # The key is in the file, or in a variable only the file names: argparse refuses the
    # argument before the settings are read.
    config = _config_holding_the_key(dest.parent, setting, monkeypatch, f"{API_KEY}\n")

    result = run_cli(
        *sync_args(
            server, dest, "--config", str(config), "--api-key", API_KEY, *["--json"] * as_json
        )
    )

    assert result.code == 2
    assert "unrecognized arguments: --api-key <redacted>" in result.stderr
    if as_json:
        assert json.loads(result.stdout)["error"] == "unrecognized arguments: --api-key <redacted>"


@pytest.mark.parametrize("config", ["missing", "not-toml", "directory"])
def test_an_unreadable_config_file_leaves_a_refused_argument_as_it_is(
    server: ServerThread, dest: Path, config: str
) -> None:
    path = dest.parent / "c.toml"
    if config == "not-toml":
        path.write_text("api_key = [\n")
    elif config == "directory":
        path.mkdir()

    result = run_cli(*sync_args(server, dest, f"--config={path}", "--bogus", "x"))

    assert result.code == 2
    assert result.stderr.endswith("checkpoint-sync: error: unrecognized arguments: --bogus x\n")
    assert "Traceback" not in result.stderr


def test_the_keys_of_a_config_file_named_with_a_tilde_are_redacted_too(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASETEN_API_KEY")
    monkeypatch.setenv("HOME", str(dest.parent))
    (dest.parent / "c.toml").write_text(f'api_key = "{API_KEY}"\n')

    result = run_cli(*sync_args(server, dest, "--conf=~/c.toml", "--api-key", API_KEY))

    assert result.code == 2
    assert "unrecognized arguments: --api-key <redacted>" in result.stderr


@pytest.mark.parametrize("setting", ["api_key", "wandb_api_key", "api_key_env"])
def test_a_key_from_the_config_file_quoted_in_a_refused_setting_is_not_shown(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    # The key given to --api-url, taken for --api-key: the setting is refused quoting its value
    # before the settings, and so the file's keys, are read.
    config = _config_holding_the_key(dest.parent, setting, monkeypatch, API_KEY)
    args = [*sync_args(server, dest, "--config", str(config)), "--api-url", API_KEY]

    shown = run_cli(*args)
    as_json = run_cli(*args, "--json")

    refused = (
        "bad setting api_url from --api-url: is not an http(s) URL "
        "(the value is not shown: it may be a key)"
    )
    assert shown.code == as_json.code == 2
    assert refused in shown.stderr
    assert json.loads(as_json.stdout)["error"] == refused


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_password_in_a_refused_url_argument_is_not_shown(dest: Path, as_json: bool) -> None:
    # `--proxy "$HTTPS_PROXY"`, a flag there is not: argparse quotes the URL, credentials and
    # all, and no setting names that password. Its host is what the user needs to see.
    proxy = "http://user:pw-0a1b2c3d@proxy.corp:3128/#token=t-9f8e7d6c"
    args = ["list", "--project", "p", "--job", "j", "--proxy", proxy, *["--json"] * as_json]

    result = run_cli(*args)

    assert result.code == 2
    assert "unrecognized arguments: --proxy http://proxy.corp:3128/\n" in result.stderr
    output = result.stdout + result.stderr
    assert "pw-0a1b2c3d" not in output
    assert "t-9f8e7d6c" not in output


def _basic(credentials: str) -> str:
    return base64.b64encode(credentials.encode("latin-1")).decode()


@pytest.mark.parametrize(
    ("environ", "forms"),
    [
        ({"HTTPS_PROXY": "http://user:pw-1234@proxy:3128"}, ["pw-1234", _basic("user:pw-1234")]),
        # Written percent-encoded, sent decoded: both are secrets.
        (
            {"http_proxy": "http://u%40corp:p%2Fss-1@proxy:3128/"},
            ["p%2Fss-1", "p/ss-1", _basic("u@corp:p/ss-1")],
        ),
        # All before the last "@" is credentials, even a "@", "/" or "#" left as it is.
        ({"ALL_PROXY": "https://u:a@b/c#d@proxy"}, ["a@b/c#d", _basic("u:a@b/c#d")]),
        ({"all_proxy": "u:pw-5678@proxy:3128"}, ["pw-5678", _basic("u:pw-5678")]),  # no scheme
        # A user name given alone is the credential: a token, as some proxies take.
        ({"HTTP_PROXY": "http://token-only@proxy"}, ["token-only", _basic("token-only:")]),
        ({"HTTP_PROXY": "http://tok%2Fen@proxy"}, ["tok%2Fen", "tok/en", _basic("tok/en:")]),
        # An escape of no UTF-8 character goes as written, in capitals (see `as_sent`).
        ({"HTTP_PROXY": "http://u:p%ff-1@proxy"}, ["p%ff-1", "p%FF-1", _basic("u:p%FF-1")]),
        ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "a@b", "MY_KEY": "x:y@z"}, []),
    ],
)
def test_the_credentials_of_proxies_are_secrets(environ: dict[str, str], forms: list[str]) -> None:
    assert proxy_credentials(environ) == forms


@pytest.mark.parametrize(
    ("proxy", "problem"),
    [
        ("http://proxy:3128", None),
        ("http://user:pw@proxy:3128/", None),
        ("http://u%40corp:p%2Fss@proxy:3128", None),  # percent-encoded, as it should be
        ("http://u:p@ss@proxy:3128", None),  # aiohttp takes all before the last "@" (README)
        ("http://%C3%A9t%C3%A9:pw@proxy", None),  # decodes to Latin-1 text
        ("http://user:123/pw@proxy", "password holds"),  # aiohttp: host "user", port 123
        ("http://u:p?w@proxy", "password holds"),
        ("http://u:p#w@proxy", "password holds"),
        ("https://u:a@b/c#d@proxy", "password holds"),  # aiohttp: host "b"
        ("http://u:%E2%82%AC@proxy", "not Latin-1"),
        ("http://u:%FF@proxy", None),  # no UTF-8: sent as "%FF"
        ("http://u:%E2%82@proxy", None),
        ("http://u:%FF%E2%82%AC@proxy", "not Latin-1"),  # "%FF€"
        ("http://u%3Ax:pw@proxy", 'user name holds a ":"'),
        ("http://u%3ax@proxy", 'user name holds a ":"'),  # a user name alone, as a token
        ("http://u:p%3Aw@proxy", None),  # a password may hold one
    ],
)
def test_proxy_credentials_aiohttp_can_send(proxy: str, problem: str | None) -> None:
    found = credentials_problem(proxy)
    assert found is None if problem is None else problem in (found or "")


@pytest.mark.parametrize(
    "written",
    ["p%FF", "p%ff%fe", "%C3%A9t%C3%A9", "p%C3", "p%C3%28", "%E2%82%AC%FF", "%ED%A0%80", "p%2541"],
)
def test_proxy_credentials_are_decoded_as_aiohttp_decodes_them(written: str) -> None:
    yarl = pytest.importorskip("yarl")  # aiohttp's URLs
    assert as_sent(written) == yarl.URL(f"http://u:{written}@proxy").password


def test_a_proxy_password_holding_an_escape_of_no_character_is_sent_and_is_a_secret(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "%ff" decodes to no UTF-8 character: aiohttp sends it as written, "%FF", in the
    # Proxy-Authorization it makes. It was refused as "not Latin-1".
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            credentials = self.headers["Proxy-Authorization"]
            seen.append(credentials)
            decoded = base64.b64decode(credentials.removeprefix("Basic ")).decode("latin-1")
            send_answer(
                self, 400, json.dumps({"detail": f"refused {credentials} ({decoded})"}).encode()
            )

    with http_serving(Proxy) as proxy:
        url = proxy.replace("http://", "http://user:p%ffss-0a1b2c3d@")
        with proxy_named(monkeypatch, "HTTP_PROXY", url):
            result = run_cli(*sync_args(server, dest, "--json"))

    assert set(seen) == {f"Basic {_basic('user:p%FFss-0a1b2c3d')}"}
    assert result.code == 1
    assert "refused Basic <redacted> (user:<redacted>)" in json.loads(result.stdout)["error"]
    output = result.stdout + result.stderr
    for form in ("ss-0a1b2c3d", _basic("user:p%FFss-0a1b2c3d")[:8]):
        assert form not in output, "a part of the proxy's credentials was printed"


@pytest.mark.parametrize(("status", "code"), [(400, 1), (422, 2)])
def test_a_proxy_password_the_proxy_quotes_back_is_not_shown(
    server: ServerThread, dest: Path, monkeypatch: pytest.MonkeyPatch, status: int, code: int
) -> None:
    with server_quoting("Proxy-Authorization", status, "proxy") as proxy:
        url = proxy.replace("http://", "http://user:p%40ss-0a1b2c3d@")
        with proxy_named(monkeypatch, "HTTP_PROXY", url):
            result = run_cli(*sync_args(server, dest, "--json"))

    assert result.code == code
    assert "refused by the proxy" in result.stderr
    output = result.stdout + result.stderr
    for form in ("ss-0a1b2c3d", _basic("user:p@ss-0a1b2c3d")[:8]):
        assert form not in output, "a part of the proxy's credentials was printed"


def test_a_key_the_api_quotes_percent_encoded_is_not_shown(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key of base64's alphabet, quoted back as a URL or form would spell it ("/" as %2F).
    key = "k3y/0a1b+2c3d/4e5f=="
    monkeypatch.setenv("BASETEN_API_KEY", key)

    class Quoting(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            quoted = urllib.parse.quote(self.headers["Authorization"], safe="")
            body = json.dumps({"detail": f"refused: authorization={quoted}"}).encode()
            send_answer(self, 400, body, "application/json")

    with http_serving(Quoting) as api:
        result = run_cli("list", "--api-url", api, "--project", "p", "--job", "j", "--json")

    assert result.code == 1
    assert "refused: authorization=Bearer%20<redacted>" in result.stderr
    output = result.stdout + result.stderr
    for part in key.split("/"):
        assert part[:4] not in output, "a part of the key was printed"


def test_a_huge_error_page_is_shown_by_its_start_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 64 MiB of near misses of a key of one repeated character (redacted whole before its start
    # was shown, the page took 13 s of the event loop): the start shown is the page's, with no
    # part of the key.
    key = "a" * 64
    monkeypatch.setenv("BASETEN_API_KEY", key)
    page = (b"a" * 63 + b"b ") * ((64 << 20) // 65)

    class Huge(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            send_answer(self, 400, page)

    with http_serving(Huge) as api:
        result = run_cli("list", "--api-url", api, "--project", "p", "--job", "j", "--json")

    assert result.code == 1
    assert ": HTTP 400 from the API: " + "a" * 63 + "b a" in json.loads(result.stdout)["error"]
    assert key not in result.stdout + result.stderr
