"""The one exception tree of checkpoint-sync.

Every failure the package raises is a `CheckpointSyncError`. aiohttp and OS errors are converted
where they enter (``raise ... from``), so callers never see a library's exception type, and the
messages carry no secret: URLs are redacted before they reach a message.

    CheckpointSyncError
    ├── UsageError                 bad flags, config or selection            (exit 2)
    ├── LockHeldError              another run holds the mirror              (exit 5)
    ├── LocalIOError               disk full, read-only or unwritable DEST   (exit 6)
    ├── ApiError                   the provider's API answered with an error
    │   ├── AuthError              401/403 from the API                      (exit 3)
    │   ├── NotFoundError          404 from the API                          (exit 4)
    │   ├── RequestRejectedError   422 from the API, with the server's text  (exit 2)
    │   └── MalformedResponseError non-JSON or off-schema answer
    ├── TransientError             worth retrying: connection, timeout, 5xx, 429
    └── FileError                  one file failed; the run goes on (exit 1)
        ├── UnsafePathError        a listed path that would escape DEST
        ├── IntegrityError         length or Content-Range does not match
        ├── UrlExpiredError        a presigned URL answered 403
        └── DownloadDeniedError    403 persisted after the URL was refreshed
"""

from __future__ import annotations

import time
from typing import ClassVar


class CheckpointSyncError(Exception):
    """Root of every error this package raises."""

    exit_code: ClassVar[int] = 1


class UsageError(CheckpointSyncError):
    """The command line, the configuration or the selection cannot be carried out."""

    exit_code = 2


class LockHeldError(CheckpointSyncError):
    """Another checkpoint-sync run holds this mirror."""

    exit_code = 5


class LocalIOError(CheckpointSyncError):
    """The destination cannot be written: disk full, read-only, permission denied."""

    exit_code = 6


class ApiError(CheckpointSyncError):
    """The provider's management API answered with an error."""


class AuthError(ApiError):
    """The API refused the credentials."""

    exit_code = 3


class NotFoundError(ApiError):
    """The project, job, run or checkpoint does not exist (or is not visible to this key)."""

    exit_code = 4


class RequestRejectedError(ApiError):
    """The API rejected the request's parameters (422); the message is the server's."""

    exit_code = 2


class MalformedResponseError(ApiError):
    """The API answered something that is not the documented JSON."""


class TransientError(CheckpointSyncError):
    """A failure worth retrying: connection reset, timeout, 5xx, 429."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # When it happened (`time.monotonic`): a ``Retry-After`` counts from there, and a failure
        # may be acted on long after (`sources.base.answer_when_wanted`).
        self.at = time.monotonic()


class FileError(CheckpointSyncError):
    """One file could not be mirrored; the others go on."""


class UnsafePathError(FileError):
    """A listed file name that is absolute, climbs out with ``..`` or would land outside DEST."""


class IntegrityError(FileError):
    """Received bytes do not match the listed size, the requested range or the listed MD5."""


class UrlExpiredError(FileError):
    """A presigned URL answered 403: it must be refreshed by listing again."""


class DownloadDeniedError(FileError):
    """A presigned URL still answers 403 after a fresh one was listed."""


def most_severe(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error of a task group that matters most: fatal ones before a file's own."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return min(leaves, key=lambda exc: isinstance(exc, FileError))
