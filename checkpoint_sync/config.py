"""Settings: a TOML file, then the environment, then command-line flags, each overriding the last.

Every key of `Settings` may appear at the top level of the TOML file (``config.example.toml``
documents them) and as an environment variable ``CHECKPOINT_SYNC_<KEY>``. API keys are read
from the variable their ``*_key_env`` setting names (``BASETEN_API_KEY``, ``WANDB_API_KEY``).
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import UsageError
from .net import origin_end, proxy_credentials, url_problem
from .redact import redact_url
from .retry import RetryPolicy

ENV_PREFIX = "CHECKPOINT_SYNC_"
# The longest any timeout or delay may be: a day. Much longer is surely a typo, and timers
# refuse it (poll() takes at most 2**31 ms, about 24.8 days: an internal error mid-transfer).
MAX_SECONDS = 24 * 60 * 60
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``64MiB``, ``1MiB``, ``512K``, ``1GB`` or a plain count.

    Binary units (KiB, MiB...) and bare letters (K, M, as rclone and aria2 read them) count in
    1024s; decimal units (KB, MB...) in 1000s.
    """
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a size (try 64MiB, 1MiB, 512KiB)")
    number, unit, binary = match.groups()
    spelled_decimal = bool(unit) and not binary and text.strip().upper().endswith("B")
    base = 1000 if spelled_decimal else 1024
    power = " KMGT".index(unit.upper() or " ")
    size = float(number) * base**power
    if not math.isfinite(size):
        raise ValueError(f"'{text}' is too large a size")
    if 0 < size < 1:  # rounded down it would be 0: as a rate limit, none at all
        raise ValueError(f"'{text}' is less than a byte")
    return int(size)


# The settings that name a place on disk.
_PATHS = ("dest", "ca_bundle")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = "https://api.baseten.co"
    api_key: SecretStr | None = None
    api_key_env: str = "BASETEN_API_KEY"
    auth_scheme: Literal["Bearer", "Api-Key"] = "Bearer"
    page_size: int = Field(default=1000, ge=1)
    wandb_api_url: str = "https://api.training.wandb.ai"
    # W&B's own API (GraphQL), where the checkpoints' artifact files are listed.
    wandb_base_url: str = "https://api.wandb.ai"
    wandb_api_key: SecretStr | None = None
    wandb_api_key_env: str = "WANDB_API_KEY"
    dest: Path | None = None
    concurrency: int = Field(default=16, ge=1, le=1024)
    part_size: int = Field(default=64 << 20, ge=1 << 16)
    # Bytes per second over all of a run's connections; 0: no limit.
    limit_rate: int = Field(default=0, ge=0)
    include_syncing: bool = False
    fsync: bool = False
    wait_lock: bool = False
    # With wait_lock: seconds to wait before giving up (None: for ever).
    wait_lock_timeout: float | None = Field(default=None, le=MAX_SECONDS, allow_inf_nan=False)
    # sync: delete the mirrored files of checkpoints removed upstream, unless more than
    # max_delete files would go (None: no limit).
    delete: bool = False
    max_delete: int | None = Field(default=None, ge=0)
    # Finite: NaN was refused as "should be less than or equal to 86400", which it is not above.
    connect_timeout: float = Field(default=30.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    read_timeout: float = Field(default=60.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    # The retry policy's own defaults, so that the two cannot drift apart.
    retries: int = Field(default=RetryPolicy.attempts, ge=1)
    retry_max_delay: float = Field(
        default=RetryPolicy.max_delay, ge=0, le=MAX_SECONDS, allow_inf_nan=False
    )
    retry_deadline: float = Field(
        default=RetryPolicy.deadline, gt=0, le=MAX_SECONDS, allow_inf_nan=False
    )
    ca_bundle: Path | None = None
    proxies: bool = True  # false: ignore HTTP(S)_PROXY and ALL_PROXY, connect directly

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # TOML's `read_timeout = true` is a bool, which Python counts as the int 1 and pydantic's
        # lax mode took as 1 second. Strict mode would also refuse the environment's strings.
        # An optional number is one too: `max_delete = false`, meant as no limit, was taken as 0
        # and held back every deletion.
        kind = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(value, bool) and {int, float} & {kind, *get_args(kind)}:
            raise ValueError(f"should be a number, not {str(value).lower()}")
        return value

    @field_validator("wait_lock_timeout")
    @classmethod
    def _a_wait(cls, value: float | None) -> float | None:
        # 0 reads as "do not wait" to users of flock -w and apt, as "no limit" to those of
        # curl --max-time, coreutils' timeout or our own limit_rate: taken either way, it would
        # do the opposite of what some meant. Each has its own spelling already.
        if value is not None and value <= 0:
            raise ValueError(
                "should be more than 0 seconds (not to wait, leave out --wait-lock; to wait for "
                "ever, leave out the timeout)"
            )
        return value

    @field_validator("part_size", "limit_rate", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator(*_PATHS, mode="before")
    @classmethod
    def _usable_path(cls, value: Any) -> Any:
        # TOML's `dest = 0`: pydantic's own words were "Input is not a valid path for <class
        # 'pathlib.Path'>". A ValueError: pydantic reports no TypeError as the value's fault.
        if not isinstance(value, str | Path):
            raise ValueError("should be a path (a string)")  # noqa: TRY004
        # Path("") is the current directory: an empty value is a mistake, not a place.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        # TOML can write one ("\u0000"); every file call would raise ValueError on it, a bug's
        # "internal error".
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("api_key_env", "wandb_api_key_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        # Not quoted: what is no variable's name is most likely the key itself, put in the
        # wrong setting, and "no API key: set <it>" would show it. An empty one would be named
        # as nothing ("set  (or ...)").
        if not _VARIABLE.fullmatch(value):
            raise ValueError("should name an environment variable (letters, digits and _)")
        return value

    @field_validator(*_PATHS)
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        # As the shell would: a quoted `~/x`, or one in the file or the environment, is no
        # directory named ~ (every path option is expanded alike, in cli._path).
        if value is None:
            return None
        path = expand_home(value)
        if not path.is_absolute():
            # The working directory it is under may have been removed while the shell stood
            # in it: every later use of the path (`Path.absolute`) was an internal error.
            try:
                os.getcwd()
            except FileNotFoundError:
                raise ValueError(
                    "is relative, and the working directory was removed: give an absolute path"
                ) from None
        return path

    @field_validator("api_url", "wandb_api_url", "wandb_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if problem := url_problem(value):
            # Not quoted, even redacted: what is no URL at all is most likely a key pasted into
            # the wrong setting, and a URL's redaction keeps all but its query and userinfo.
            raise ValueError(f"is {problem} (the value is not shown: it may be a key)")
        if "@" in value[: origin_end(value)]:
            # Never sent (the APIs take their keys in headers): dropped without a word, or through
            # a proxy an internal error of aiohttp's, which will not send both.
            raise ValueError(
                f"'{redact_url(value)}' holds a user name or password (not shown), which is not "
                "sent: the API's key goes in its variable or the config"
            )
        if "?" in value or "#" in value:
            # The API's paths are appended to it: they went into the query or the fragment, and
            # every request asked for another path, answered "not found" (exit 4).
            # Shown without them, as they may hold a token: a fragment leaves no trace.
            raise ValueError(
                f"'{redact_url(value)}' has a query string or fragment (not shown), which the "
                "API's paths would follow"
            )
        return value

    @field_validator("api_key", "wandb_api_key", mode="before")
    @classmethod
    def _clean_key(cls, value: Any) -> Any:
        # A key read from a file often ends with a newline; no control character can travel in
        # a header. The message never shows the key.
        if isinstance(value, str):
            value = value.strip()
            if not value:
                # A variable set to nothing would otherwise drop the config file's key, and the
                # run would end with "no API key" pointing at the wrong place.
                raise ValueError("must not be empty")
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ValueError("the key contains a control character")
            if not value.isascii():
                # A header carries ASCII: our client refused it at its first request, while
                # through a proxy aiohttp sent it as UTF-8 and the refusal read as a wrong key.
                raise ValueError("the key contains a non-ASCII character")
        return value

    def baseten_key(self) -> str | None:
        return _key(self.api_key)

    def wandb_key(self) -> str | None:
        return _key(self.wandb_api_key)

    def wandb_basic_credentials(self) -> str | None:
        """W&B's GraphQL API takes the key as HTTP Basic credentials ``api:<key>``."""
        key = self.wandb_key()
        return base64.b64encode(f"api:{key}".encode()).decode() if key else None

    def secrets(self) -> list[str]:
        """Every form of a key, or of a proxy's password, that may travel, and so must never be
        shown."""
        forms = (self.baseten_key(), self.wandb_key(), self.wandb_basic_credentials())
        return [*(form for form in forms if form), *proxy_credentials()]


def expand_home(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; `ValueError` if it names no home
    directory (Path.expanduser raises RuntimeError, which no caller expects of a user's typo)."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise ValueError(f"{path.parts[0]} is no user's home directory (in {path})") from None


def check_setting(name: str, value: Any, origin: str) -> None:
    """`UsageError` unless ``value`` (from ``origin``, as `from_flag` names it) is allowed for
    setting ``name``: values tried one by one, as `bench` does, obey the same limits as a
    setting, and are refused in the same words."""
    try:
        Settings.__pydantic_validator__.validate_assignment(Settings.model_construct(), name, value)
    except ValidationError as exc:
        raise _refused(name, origin, exc.errors()[0]["msg"]) from None


def from_flag(name: str) -> str:
    """Where a value of setting ``name`` came from when its flag gave it."""
    return f"from --{name.replace('_', '-')}"


def _refused(where: str, origin: str | None, why: str) -> UsageError:
    """The one wording of a setting's value refused, whichever command reads it: where it came
    from, not the value (it may be a key). pydantic's "Value error, " before what one of our
    validators said is no part of the reason."""
    reason = why.removeprefix("Value error, ")
    return UsageError(f"bad setting {where}{f' {origin}' if origin else ''}: {reason}")


def format_size(size: int) -> str:
    """``size`` as `parse_size` reads it back exactly: ``64MiB``, ``512KiB`` or a byte count."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


# Each API key's setting, and the setting naming the environment variable that may hold it.
_KEYS = (("api_key", "api_key_env"), ("wandb_api_key", "wandb_api_key_env"))


def known_secrets(
    config_file: Path | None = None, environ: Mapping[str, str] = os.environ
) -> list[str]:
    """The API keys the environment and ``config_file`` hold, for what is shown before the
    settings are read: an argument argparse refuses is quoted as it was given, and may be a key.
    A file that cannot be read adds none (its error is not the one to report)."""
    config: dict[str, Any] = {}
    if config_file is not None:
        with contextlib.suppress(UsageError):
            config = _read_toml(config_file)
    return _secrets_in(config, environ)


def _secrets_in(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """The API keys the environment and the settings of a config file (``config``) hold."""
    found = []
    for key_field, env_field in _KEYS:
        default = Settings.model_fields[env_field].default
        env_name = environ.get(ENV_PREFIX + env_field.upper()) or config.get(env_field) or default
        found.append(config.get(key_field))
        found.append(environ.get(ENV_PREFIX + key_field.upper()))
        found.append(environ.get(env_name) if isinstance(env_name, str) else None)
    # Stripped as `Settings` strips them: `"$BASETEN_API_KEY"` quoted in argv may keep a newline.
    return [key.strip() for key in found if isinstance(key, str) and key.strip()]


def _key(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret else None


def load_settings(
    config_file: Path | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    *,
    on_secret: Callable[[str], None] = lambda _: None,
    on_unread: Callable[[str], None] = lambda _: None,
) -> Settings:
    """Merge the config file, the environment and the flags (None means: flag not given).
    ``on_secret`` is given each API key they hold before any value is judged: one refused may
    quote a key pasted into the wrong setting (`--api-url`). ``on_unread`` is given each line of
    `unread_variables` then too: a variable misspelled may be why a value is refused."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # where each value came from, to name it in an error

    def take(name: str, value: Any, where: str) -> None:
        values[name], origin[name] = value, where

    # Read once: it may be a pipe (`--config <(...)`), which a second read finds empty.
    config = _read_toml(config_file) if config_file is not None else {}
    for secret in _secrets_in(config, environ):
        on_secret(secret)
    if config_file is not None:
        for name, value in config.items():
            if name in _PATHS and isinstance(value, str) and value and value[0] != "~":
                # Read where the file is, not where the run started: a cron job's working
                # directory is not the one the file was written in. An absolute one stays.
                value = os.path.join(config_file.parent, value)
            take(name, value, f"in {config_file}")
    for name in Settings.model_fields:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            take(name, env_value, f"from {ENV_PREFIX + name.upper()}")
    for name, value in flags.items():
        if value is not None:
            take(name, value, from_flag(name))
    key_variables = []
    for key_field, env_field in _KEYS:
        # One that is no name (5, "") reads no key, and is refused with its origin below.
        env_name = values.get(env_field, Settings.model_fields[env_field].default)
        if isinstance(env_name, str):
            key_variables.append(env_name)
            if environ.get(env_name):
                take(key_field, environ[env_name], f"from {env_name}")
    for line in unread_variables(environ, key_variables):
        on_unread(line)
    for name, value in values.items():
        if isinstance(value, str) and not _is_utf8(value):
            # Bytes of another encoding (Python keeps them as lone surrogates): pydantic raised
            # UnicodeEncodeError on them (an internal error), or put U+FFFD in their place, and
            # `dest` named another directory. Not shown: the value may be a key.
            raise _refused(name, origin[name], "not UTF-8 text")
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        source = origin.get(str(first["loc"][0])) if first["loc"] else None
        # pydantic's "Extra inputs are not permitted" for a mistyped key, or a [table]'s name.
        unknown = "no such setting (config.example.toml lists them; none is in a [table])"
        why = unknown if first["type"] == "extra_forbidden" else first["msg"]
        raise _refused(where, source, why) from None


def unread_variables(environ: Mapping[str, str], key_variables: Collection[str] = ()) -> list[str]:
    """A line for each variable named as a setting's would be (``CHECKPOINT_SYNC_``, in any
    case) that no setting reads, nor is one of ``key_variables`` (those `api_key_env` and
    `wandb_api_key_env` name), with the nearest name that one does: a typo in a crontab
    (CHECKPOINT_SYNC_CONCURENCY) was ignored without a word. A warning, not an error, unlike an
    unknown key in the config file: an environment may be shared with another version of the
    tool, which reads a setting this one does not know, and must not stop this one's runs."""
    settings = [name.upper() for name in Settings.model_fields]
    lines = []
    for variable in sorted(environ):
        prefix, setting = variable[: len(ENV_PREFIX)], variable[len(ENV_PREFIX) :]
        if (
            prefix.upper() != ENV_PREFIX
            or (prefix == ENV_PREFIX and setting in settings)
            or variable in key_variables
        ):
            continue
        # Of the setting's part alone: the prefix they share would make any name look near.
        nearest = difflib.get_close_matches(setting.upper(), settings, n=1)
        hint = (
            f"did you mean {ENV_PREFIX}{nearest[0]}?"
            if nearest
            else "config.example.toml lists the settings"
        )
        lines.append(f"{variable} names no setting and is ignored ({hint})")
    return lines


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # lazy: only a run with --config reads TOML (~2 ms of start-up otherwise)

    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
