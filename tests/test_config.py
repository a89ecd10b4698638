"""Settings: sizes, precedence, and the example file that documents every key."""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path

import pytest

from checkpoint_sync.config import (
    MAX_SECONDS,
    Settings,
    check_setting,
    format_size,
    load_settings,
    parse_size,
    unread_variables,
)
from checkpoint_sync.errors import UsageError
from checkpoint_sync.net import NetSettings, ssl_context

from .conftest import JOB, PROJECT, job_args
from .support import API_KEY, ServerThread, assert_exact, mirrored, run_cli

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 << 20),
        ("1MiB", 1 << 20),
        ("512KiB", 512 << 10),
        ("512K", 512 << 10),
        ("1G", 1 << 30),
        ("1GB", 1_000_000_000),
        ("1.5MiB", 3 << 19),
        ("4096", 4096),
        (" 8 MiB ", 8 << 20),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "64XB", "-1MiB", "MiB", "9" * 400 + "MiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a size|too large"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0.5", "0.0001K"])
def test_a_size_of_less_than_a_byte_is_refused_not_taken_for_none(text: str) -> None:
    # Rounded down it was 0, which as --limit-rate means no limit at all.
    with pytest.raises(ValueError, match="less than a byte"):
        parse_size(text)


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('concurrency = 3\npart_size = "1MiB"\napi_url = "http://file"\n')
    environ = {"CHECKPOINT_SYNC_CONCURRENCY": "5", "CHECKPOINT_SYNC_API_URL": "http://env"}

    settings = load_settings(config, {"api_url": "http://flag", "concurrency": None}, environ)

    assert settings.part_size == 1 << 20  # file
    assert settings.concurrency == 5  # env beats file
    assert settings.api_url == "http://flag"  # flag beats env


@pytest.mark.parametrize(
    ("given", "limit"),
    [
        ({}, 0),  # no limit
        ({"CHECKPOINT_SYNC_LIMIT_RATE": "50MiB"}, 50 << 20),
        ({"CHECKPOINT_SYNC_LIMIT_RATE": "512KB"}, 512_000),
        ({"CHECKPOINT_SYNC_LIMIT_RATE": "0"}, 0),
    ],
)
def test_a_rate_limit_is_a_size_a_second(given: dict[str, str], limit: int) -> None:
    assert load_settings(None, {}, given).limit_rate == limit


def test_api_key_comes_from_the_named_variable() -> None:
    settings = load_settings(None, {}, {"BASETEN_API_KEY": "k1", "MY_KEY": "k2"})
    assert settings.baseten_key() == "k1"
    renamed = load_settings(None, {}, {"CHECKPOINT_SYNC_API_KEY_ENV": "MY_KEY", "MY_KEY": "k2"})
    assert renamed.baseten_key() == "k2"
    assert "k2" not in repr(renamed)


@pytest.mark.parametrize(
    ("toml", "environ", "key"),
    [
        ('api_key = "file"', {}, "file"),
        ('api_key = "file"', {"CHECKPOINT_SYNC_API_KEY": "prefixed"}, "prefixed"),
        ('api_key = "file"', {"CHECKPOINT_SYNC_API_KEY": "prefixed", "BASETEN_API_KEY": "b"}, "b"),
        ("", {"CHECKPOINT_SYNC_API_KEY": "prefixed", "BASETEN_API_KEY": ""}, "prefixed"),
        ('api_key_env = "MINE"', {"BASETEN_API_KEY": "b", "MINE": "mine"}, "mine"),
    ],
)
def test_the_key_in_the_named_variable_wins(
    tmp_path: Path, toml: str, environ: dict[str, str], key: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(toml)
    assert load_settings(config, {}, environ).baseten_key() == key


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("concurrency = 0", "concurrency"),
        ("no_such_key = 1", "no_such_key"),
        ('part_size = "huge"', "part_size"),
        ('limit_rate = "fast"', "limit_rate"),
        ("limit_rate = -1", "limit_rate"),
        ('auth_scheme = "Basic"', "auth_scheme"),
        ("concurrency = [", "not valid TOML"),
        ('dest = "\xff"', "not valid TOML"),  # not UTF-8
        ("api_key_env = 5", "api_key_env"),
        # Found by test_cli_inputs.py: pydantic's "Extra inputs are not permitted".
        ("concurency = 4", "concurency in .*: no such setting"),
        ("[network]\nretries = 2", "network in .*: no such setting .*none is in a \\[table\\]"),
        # Found by test_cli_inputs.py: "Input is not a valid path for <class 'pathlib.Path'>".
        ("dest = 0", r"dest in .*: should be a path \(a string\)$"),
        ("ca_bundle = true", r"ca_bundle in .*: should be a path \(a string\)$"),
        # Each was an internal error (ValueError: embedded null byte).
        ('dest = "a\\u0000b"', "dest in .*: must not contain a NUL character"),
        ('ca_bundle = "a\\u0000b"', "ca_bundle in .*: must not contain a NUL"),
    ],
)
def test_bad_config_is_a_usage_error(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(toml.encode("latin-1") + b"\n")
    with pytest.raises(UsageError, match=message):
        load_settings(config, {}, {})


@pytest.mark.parametrize(
    ("env", "flags", "named"),
    [
        ({}, {}, "concurrency in "),
        ({"CHECKPOINT_SYNC_CONCURRENCY": "0"}, {}, "concurrency from CHECKPOINT_SYNC_CONCURRENCY"),
        ({}, {"concurrency": 0}, "concurrency from --concurrency"),
    ],
)
def test_a_bad_value_is_named_where_it_came_from(
    tmp_path: Path, env: dict[str, str], flags: dict[str, int], named: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("concurrency = 5\n" if env or flags else "concurrency = -1\n")
    with pytest.raises(UsageError, match=f"bad setting {named}"):
        load_settings(config, flags, env)


DURATIONS = [
    "connect_timeout",
    "read_timeout",
    "retry_max_delay",
    "retry_deadline",
    "wait_lock_timeout",
]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        (0.001, True),
        (MAX_SECONDS, True),
        (MAX_SECONDS + 0.5, False),
        (2**31 / 1000, False),  # past what poll() takes: was an internal error mid-transfer
        (1e10, False),
        (math.inf, False),
        (math.nan, False),
        (-1, False),
    ],
)
def test_every_duration_is_bounded(name: str, value: float, allowed: bool) -> None:
    if allowed:
        check_setting(name, value, "in config.toml")
    else:
        with pytest.raises(UsageError, match=f"^bad setting {name} in config.toml: "):
            check_setting(name, value, "in config.toml")


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "1e400"])
def test_a_duration_that_is_no_number_of_seconds_is_named_so(name: str, text: str) -> None:
    # "nan" was refused as "should be less than or equal to 86400", which it is not above.
    variable = f"CHECKPOINT_SYNC_{name.upper()}"
    with pytest.raises(UsageError, match=f"bad setting {name} from {variable}: .*finite number"):
        load_settings(None, {}, {variable: text})


NUMBERS = [
    "page_size",
    "concurrency",
    "part_size",
    "limit_rate",
    "retries",
    "max_delete",
    *DURATIONS,
]


@pytest.mark.parametrize("name", NUMBERS)
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_is_no_number(tmp_path: Path, name: str, value: str) -> None:
    # TOML's `read_timeout = true` was taken as 1 (a one-second timeout), `false` as 0 or as
    # "should be greater than 0": Python counts a bool as an int, and pydantic's lax mode did.
    config = tmp_path / "c.toml"
    config.write_text(f"{name} = {value}\n")
    with pytest.raises(UsageError, match=f"bad setting {name} in .*: .*a number, not {value}$"):
        load_settings(config, {}, {})


def test_a_boolean_for_a_number_is_exit_2_in_one_line(tmp_path: Path) -> None:
    # Not read_timeout: the tests' environment sets it, and the environment overrides the file.
    config = tmp_path / "c.toml"
    config.write_text('connect_timeout = true\napi_url = "http://127.0.0.1:9"\n')
    result = run_cli("list", "--config", config, "--project", "P", "--job", "J")
    assert result.code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "bad setting connect_timeout in " in result.stderr


@pytest.mark.parametrize("name", ["api_key_env", "wandb_api_key_env"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_key_variable_name_is_refused_where_it_was_set(
    tmp_path: Path, name: str, value: str
) -> None:
    # It read the default variable's key and, with none there, said "no API key: set  (or ...)".
    config = tmp_path / "c.toml"
    config.write_text(f'{name} = "{value}"\n')
    named = f"^bad setting {name} in {config}: .*an environment variable"
    with pytest.raises(UsageError, match=named):
        load_settings(config, {}, {"BASETEN_API_KEY": "k1", "WANDB_API_KEY": "k2"})
    variable = f"CHECKPOINT_SYNC_{name.upper()}"
    with pytest.raises(UsageError, match=f"^bad setting {name} from {variable}: "):
        load_settings(None, {}, {variable: value})


@pytest.mark.parametrize("name", ["api_key_env", "wandb_api_key_env"])
@pytest.mark.parametrize("value", [API_KEY, "abcd1234.efgh5678", "1KEY", "MY KEY", "MY_KEY="])
def test_a_key_given_for_its_variable_name_is_refused_unshown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # The key put where its variable's name goes was quoted: "no API key: set <the key> ...".
    monkeypatch.delenv("BASETEN_API_KEY")
    config = tmp_path / "c.toml"
    config.write_text(f'{name} = "{value}"\napi_url = "http://127.0.0.1:9"\n')

    result = run_cli("list", "--config", config, "--project", "P", "--job", "J", "--json")

    assert result.code == 2
    assert f"bad setting {name} in {config}: " in result.stderr
    assert value not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1


def test_an_empty_key_variable_name_is_exit_2_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('api_key_env = ""\napi_url = "http://127.0.0.1:9"\n')
    result = run_cli("list", "--config", config, "--project", "P", "--job", "J")
    assert result.code == 2
    assert result.stderr.count("\n") == 1
    assert f"bad setting api_key_env in {config}: " in result.stderr


@pytest.mark.parametrize("name", ["dest", "ca_bundle"])
@pytest.mark.parametrize("where", ["file", "environment", "flag"])
def test_a_path_setting_from_anywhere_expands_a_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, where: str
) -> None:
    # As the shell would have: `dest = "~/mirror"` was taken for ./~/mirror (only --dest and
    # the config's dest were expanded, by the CLI, and ca_bundle never).
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text(f'{name} = "~/there"\n' if where == "file" else "")
    environ = {f"CHECKPOINT_SYNC_{name.upper()}": "~/there"} if where == "environment" else {}
    flags = {name: Path("~/there")} if where == "flag" else {}

    settings = load_settings(config, flags, environ)

    assert getattr(settings, name) == tmp_path / "there"


@pytest.mark.parametrize("name", ["dest", "ca_bundle"])
@pytest.mark.parametrize(
    ("where", "value", "taken"),
    [
        # A cron job starts elsewhere: the file's relative path was taken from there.
        ("file", "mirror", "etc/mirror"),
        ("file", "../mirror", "etc/../mirror"),
        ("file", "/srv/mirror", "/srv/mirror"),
        ("environment", "mirror", "mirror"),
        ("flag", "mirror", "mirror"),
    ],
)
def test_a_relative_path_in_the_file_is_taken_from_the_files_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    where: str,
    value: str,
    taken: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    config = Path("etc/c.toml")
    config.write_text(f'{name} = "{value}"\n' if where == "file" else "")
    environ = {f"CHECKPOINT_SYNC_{name.upper()}": value} if where == "environment" else {}
    flags = {name: Path(value)} if where == "flag" else {}

    settings = load_settings(config, flags, environ)

    assert getattr(settings, name) == Path(taken)


@pytest.mark.parametrize(
    ("environ", "flags", "named"),
    [
        ({"CHECKPOINT_SYNC_PART_SIZE": "\udcff"}, {}, "part_size from CHECKPOINT_SYNC_PART_SIZE"),
        ({"CHECKPOINT_SYNC_API_URL": "http://\udcff"}, {}, "api_url from CHECKPOINT_SYNC_API_URL"),
        # pydantic put U+FFFD in its place: another directory.
        ({"CHECKPOINT_SYNC_DEST": "/data/\udcffx"}, {}, "dest from CHECKPOINT_SYNC_DEST"),
        ({"BASETEN_API_KEY": "key\udcff"}, {}, "api_key from BASETEN_API_KEY"),
        ({}, {"api_url": "http://\udcff"}, "api_url from --api-url"),
    ],
)
def test_a_setting_that_is_not_utf8_is_refused_where_it_was_set(
    environ: dict[str, str], flags: dict[str, str], named: str
) -> None:
    # Bytes of a Latin-1 environment or command line reach Python as lone surrogates.
    with pytest.raises(UsageError) as refused:
        load_settings(None, flags, environ)

    assert str(refused.value) == f"bad setting {named}: not UTF-8 text"


def test_a_setting_that_is_not_utf8_is_exit_2_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by test_cli_inputs.py: "internal error (UnicodeEncodeError: 'utf-8' codec can't
    # encode character '\udcff' ...)", exit 1.
    monkeypatch.setenv("CHECKPOINT_SYNC_PART_SIZE", "\udcff")

    result = run_cli("bench", "--project", "proj", "--job", "job-1", "--rounds", "1")

    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == (
        "checkpoint-sync: error: bad setting part_size from CHECKPOINT_SYNC_PART_SIZE: "
        "not UTF-8 text\n"
    )


def _given_by(where: str, name: str, value: str) -> tuple[dict[str, str], dict[str, Path]]:
    """``value`` for setting ``name`` from the environment or a flag, as ``where`` says (the
    environment and the flags to load the settings with)."""
    environ = {f"CHECKPOINT_SYNC_{name.upper()}": value} if where == "environment" else {}
    flags = {name: Path(value)} if where == "flag" else {}
    return environ, flags


@pytest.mark.parametrize("name", ["dest", "ca_bundle"])
@pytest.mark.parametrize(
    ("where", "named"),
    [("file", "in "), ("environment", "from CHECKPOINT_SYNC_"), ("flag", "from --")],
)
def test_a_path_setting_under_no_users_home_is_a_usage_error(
    tmp_path: Path, name: str, where: str, named: str
) -> None:
    # Found by test_cli_inputs.py: `ca_bundle = "~no-such-user/x"` ended in "internal error
    # (RuntimeError: Could not determine home directory.)", exit 1.
    config = tmp_path / "c.toml"
    config.write_text(f'{name} = "~no-such-user/x"\n' if where == "file" else "")
    environ, flags = _given_by(where, name, "~no-such-user/x")

    with pytest.raises(UsageError) as refused:
        load_settings(config, flags, environ)

    assert str(refused.value).startswith(f"bad setting {name} {named}")
    assert str(refused.value).endswith(
        "~no-such-user is no user's home directory (in ~no-such-user/x)"
    )


@pytest.mark.parametrize(
    ("command", "option"),
    [("sync", "--dest"), ("sync", "--config"), ("bench", "--scratch"), ("list", "--config")],
)
def test_path_options_expand_a_tilde(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, option: str
) -> None:
    # `--scratch=~/x` (or a quoted ~) reaches the program as it is; --dest was expanded, and
    # --scratch and --config were refused as directories or files that do not exist.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text("concurrency = 2\n")
    (tmp_path / "mirror").mkdir()
    value = {"--dest": "~/mirror", "--config": "~/c.toml", "--scratch": "~/mirror"}[option]
    extra = ["--max-bytes", "1MiB", "--concurrency", "2"] if command == "bench" else []
    if command == "sync" and option != "--dest":
        extra = ["--dest", str(tmp_path / "mirror")]

    result = run_cli(*job_args(server, command, option, value, *extra))

    assert result.code == 0, result.stderr
    assert not (tmp_path / "~").exists()
    if command == "sync":
        assert (tmp_path / "mirror" / JOB).is_dir()


def test_an_unusable_ca_bundle_is_a_usage_error(unusable_ca_bundle: Path) -> None:
    with pytest.raises(UsageError, match=f"ca_bundle {unusable_ca_bundle} cannot be used"):
        ssl_context(NetSettings(ca_bundle=unusable_ca_bundle))


def test_one_trust_store_per_ca_bundle_whatever_the_other_settings() -> None:
    # `bench` trials differ in connections: none may pay for loading the store inside its time.
    assert ssl_context(NetSettings(connections=4)) is ssl_context(NetSettings(connections=16))
    assert ssl_context(NetSettings(read_timeout=1)) is ssl_context(NetSettings())


@pytest.mark.parametrize(
    ("field", "url", "message"),
    [
        ("api_url", "https://user:hunter2@api.example.com:99999/", "is not a valid URL"),
        (
            "api_url",
            "https://user:hunter2@api.example.com/",
            r"holds a user name or password \(not shown\)",
        ),
        (
            "api_url",
            "https://hunter2@api.example.com",
            r"holds a user name or password \(not shown\)",
        ),
        (
            "wandb_api_url",
            "http://u:hunter2@127.0.0.1:8000/v1",
            r"holds a user name or password \(not shown\)",
        ),
        (
            "api_url",
            "https://api.example.com/?token=hunter2",
            r"has a query string or fragment \(not shown\)",
        ),
        (
            "wandb_base_url",
            "https://api.example.com#hunter2",
            r"has a query string or fragment \(not shown\)",
        ),
    ],
)
def test_a_bad_url_is_refused_without_its_password(field: str, url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        load_settings(None, {field: url}, {})
    assert "hunter2" not in str(caught.value)


# A key pasted where a URL goes. No setting names it, so no redactor knows it: the message must
# not quote the value at all, whichever URL setting it is and wherever it was set.
PASTED_KEY = "sk-0a1b2c3d4e5f6a7b"


@pytest.mark.parametrize("field", ["api_url", "wandb_api_url", "wandb_base_url"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (PASTED_KEY, "is not an http(s) URL"),
        (f"https:{PASTED_KEY}", "is not an http(s) URL"),
        (f"ftp://{PASTED_KEY}", "is not an http(s) URL"),
        (f"https://api.example.com:{PASTED_KEY}/", "is not a valid URL"),
        (f"https://api.example.com/{PASTED_KEY} x", "is not a valid URL (spaces,"),
    ],
)
@pytest.mark.parametrize("origin", ["flag", "environment", "config"])
def test_a_url_setting_that_is_no_usable_url_is_refused_without_its_value(
    tmp_path: Path, field: str, value: str, problem: str, origin: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"{field} = {json.dumps(value)}\n")
    where = {
        "flag": f"from --{field.replace('_', '-')}",
        "environment": f"from CHECKPOINT_SYNC_{field.upper()}",
        "config": f"in {config}",
    }[origin]

    with pytest.raises(UsageError) as caught:
        load_settings(
            config if origin == "config" else None,
            {field: value} if origin == "flag" else {},
            {f"CHECKPOINT_SYNC_{field.upper()}": value} if origin == "environment" else {},
        )

    message = str(caught.value)
    assert message.startswith(f"bad setting {field} {where}: {problem}"), message
    assert "not shown: it may be a key" in message
    assert PASTED_KEY not in message


def test_a_key_given_to_api_url_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    for as_json in ([], ["--json"]):
        result = run_cli(
            "list", "--project", PROJECT, "--job", JOB, "--api-url", PASTED_KEY, *as_json
        )

        assert result.code == 2
        assert "bad setting api_url from --api-url" in result.stderr
        assert PASTED_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("environ", "lines"),
    [
        (
            {"CHECKPOINT_SYNC_CONCURENCY": "4"},
            [
                "CHECKPOINT_SYNC_CONCURENCY names no setting and is ignored "
                "(did you mean CHECKPOINT_SYNC_CONCURRENCY?)"
            ],
        ),
        # Another case than the settings' own: no setting reads it either (the environment is
        # case-sensitive).
        (
            {"checkpoint_sync_dest": "/m", "CHECKPOINT_SYNC_api_url": "http://h"},
            [
                "CHECKPOINT_SYNC_api_url names no setting and is ignored "
                "(did you mean CHECKPOINT_SYNC_API_URL?)",
                "checkpoint_sync_dest names no setting and is ignored "
                "(did you mean CHECKPOINT_SYNC_DEST?)",
            ],
        ),
        (
            {"CHECKPOINT_SYNC_FOO": "1"},
            [
                "CHECKPOINT_SYNC_FOO names no setting and is ignored "
                "(config.example.toml lists the settings)"
            ],
        ),
        # Every setting's own variable, the keys' too, and others' variables, say nothing.
        ({f"CHECKPOINT_SYNC_{name.upper()}": "x" for name in Settings.model_fields}, []),
        ({"BASETEN_API_KEY": "k", "CHECKPOINT_SYNCER": "x", "HOME": "/root"}, []),
    ],
    ids=["typo", "case", "far-from-any", "every-setting", "other-variables"],
)
def test_a_variable_named_as_a_setting_that_no_setting_reads_is_named(
    environ: dict[str, str], lines: list[str]
) -> None:
    assert unread_variables(environ) == lines


def test_a_key_variable_named_as_a_setting_is_read_not_named(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `api_key_env` may name a CHECKPOINT_SYNC_* variable, from the environment or the config
    # file: its key was read, yet a warning said the variable was ignored.
    config = tmp_path / "config.toml"
    config.write_text('wandb_api_key_env = "CHECKPOINT_SYNC_WANDB_KEY"\n')
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    monkeypatch.setenv("CHECKPOINT_SYNC_API_KEY_ENV", "CHECKPOINT_SYNC_KEY")
    monkeypatch.setenv("CHECKPOINT_SYNC_KEY", API_KEY)
    monkeypatch.setenv("CHECKPOINT_SYNC_WANDB_KEY", "unused here")

    result = run_cli(*job_args(server, "list", "--config", config))

    assert (result.code, result.stderr) == (0, "")


@pytest.mark.parametrize("output", [[], ["--quiet"], ["--json"]], ids=["plain", "quiet", "json"])
def test_a_misspelled_variable_is_a_warning_that_does_not_stop_the_run(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, output: list[str]
) -> None:
    # A crontab's environment may be shared with another version, which reads a variable this
    # one does not know: its runs go on, and its stderr (cron's mail) says what it ignored.
    monkeypatch.setenv("CHECKPOINT_SYNC_CONCURENCY", "64")

    result = run_cli(*job_args(server, "list", *output))

    assert result.code == 0, result.stderr
    assert result.stderr == (
        "checkpoint-sync: warning: CHECKPOINT_SYNC_CONCURENCY names no setting and is ignored "
        "(did you mean CHECKPOINT_SYNC_CONCURRENCY?)\n"
    )
    if output == ["--json"]:
        assert json.loads(result.stdout)["checkpoints"]


@pytest.mark.parametrize("url", ["https://api.example.com/a@b", "http://127.0.0.1:8000/p/@"])
def test_an_at_sign_past_the_host_is_no_password(url: str) -> None:
    assert load_settings(None, {"api_url": url}, {}).api_url == url


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["sync", "--config"], "argument --config: expected one argument"),
        (["sync", "--conf=x.toml", "--bogus"], "unrecognized arguments: --bogus"),
        (["--json"], "the following arguments are required: COMMAND"),
        # Found by test_cli_inputs.py: each ended in a RuntimeError traceback (Path.expanduser).
        (
            ["sync", "--dest", "~no-such-user/mirror"],
            "argument --dest: ~no-such-user is no user's home directory (in ~no-such-user/mirror)",
        ),
        (
            ["sync", "--concurrency", "x", "--config", "~no-such-user/c.toml"],
            "argument --concurrency: 'x' is not an integer",
        ),
    ],
    ids=[
        "nothing",
        "config-without-file",
        "config-and-bogus",
        "json-alone",
        "dest-of-no-user",
        "config-of-no-user-after-a-refused-one",
    ],
)
def test_arguments_argparse_refuses_are_usage_errors(argv: list[str], message: str) -> None:
    # The config file named among them is read for keys to redact: even when nothing is named.
    result = run_cli(*argv)

    assert result.code == 2
    assert result.stderr.startswith("usage: checkpoint-sync")
    assert result.stderr.endswith(f"checkpoint-sync: error: {message}\n")


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", {}, {})


def test_example_config_documents_every_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    for name in Settings.model_fields:
        assert f"{name} =" in text, f"config.example.toml does not mention {name}"
    assert Settings.model_validate(tomllib.loads(text)) == Settings()


@pytest.mark.parametrize("name", ["api_url", "wandb_api_url", "wandb_base_url"])
def test_every_service_url_must_be_http(name: str) -> None:
    with pytest.raises(UsageError, match=name):
        load_settings(None, {name: "ftp://example"}, {})


@pytest.mark.parametrize("tail", ["/?x=1", "#top"])
def test_an_api_url_with_a_query_or_fragment_is_a_usage_error_not_a_job_not_found(
    server: ServerThread, tail: str
) -> None:
    # The paths were appended after the query or the fragment: every request asked for another
    # path, and the job was reported not found (exit 4).
    result = run_cli("list", "--api-url", server.url + tail, "--project", PROJECT, "--job", JOB)
    assert result.code == 2
    assert "has a query string or fragment" in result.stderr


@pytest.mark.parametrize(
    ("size", "shown"),
    [(64 << 20, "64MiB"), (1 << 30, "1GiB"), (512 << 10, "512KiB"), (1000000, "1000000"), (0, "0")],
)
def test_format_size_reads_back_exactly(size: int, shown: str) -> None:
    assert format_size(size) == shown
    assert parse_size(shown) == size


@pytest.mark.parametrize("name", ["dest", "ca_bundle"])
@pytest.mark.parametrize("where", ["environment", "flag"])
def test_a_relative_path_under_a_removed_working_directory_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, where: str
) -> None:
    # A shell whose directory was removed (`cd x; rm -r ../x`): taking the path from there
    # ended in "internal error (FileNotFoundError ...)", exit 1.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    environ, flags = _given_by(where, name, "mirror")

    with pytest.raises(UsageError) as refused:
        load_settings(None, flags, environ)

    assert str(refused.value).startswith(f"bad setting {name} ")
    assert str(refused.value).endswith(
        "is relative, and the working directory was removed: give an absolute path"
    )
    # An absolute one is still taken: the working directory is not needed for it.
    assert getattr(load_settings(None, {name: tmp_path / "mirror"}), name) == tmp_path / "mirror"


@pytest.mark.parametrize("command", ["sync", "demo"])
def test_a_relative_dest_under_a_removed_working_directory_is_exit_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    source = ["--project", PROJECT, "--job", JOB, "--api-url", "http://127.0.0.1:9"]

    result = run_cli(command, *(source if command == "sync" else []), "--dest", "mirror")

    assert (result.code, result.stdout) == (2, "")
    assert result.stderr == (
        "checkpoint-sync: error: bad setting dest from --dest: is relative, and "
        "the working directory was removed: give an absolute path\n"
    )


def test_a_config_file_that_can_be_read_only_once_gives_its_settings(
    server: ServerThread, dest: Path
) -> None:
    # `--config <(vault read ...)`: a pipe, which keeps a key off the disk, reads once. Read for
    # its keys (to redact) and then again for the settings, it gave them none: no dest (exit 2),
    # or another API than its api_url, asked with the environment's key.
    read, write = os.pipe()
    os.write(write, f'dest = "{dest}"\n'.encode())
    os.close(write)
    try:
        result = run_cli(*job_args(server, "sync", "--config", f"/dev/fd/{read}", "--json"))
    finally:
        os.close(read)

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["dest"] == str(dest)
    for file in server.files():
        assert_exact(mirrored(dest, JOB, file), file)
