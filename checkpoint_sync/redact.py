"""Keep secrets out of every message (API keys and presigned URL query strings), and the
control characters of names a listing gives out of the terminal."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

# A query string inside any text (a URL in a message, a traceback, a repr).
REDACTED = "<redacted>"
_QUERY_IN_TEXT = re.compile(rf"(https?://[^\s?#'\"<>]+)\?(?!{REDACTED})[^\s#'\"<>]*", re.IGNORECASE)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
# C0 and C1 control characters but tab: a listed name printed as it is could move the cursor,
# rewrite the line, retitle the terminal, hide what follows or, with a newline, forge a line
# (every message is one line; a --debug traceback is shown a line at a time).
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with its control characters written as escapes (ESC as ``\\x1b``)."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def redact_url(url: str) -> str:
    """The URL without its query string and userinfo: presigned signatures live there."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # a bad port or IPv6 literal: cut the same parts out by hand
        bare = _USERINFO.sub(r"\1", url).partition("#")[0]
        bare, question, _ = bare.partition("?")
        return bare + (f"?{REDACTED}" if question else "")
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


class Redactor:
    """Scrubs known secrets and any URL query string out of text before it is shown."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is removed whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _QUERY_IN_TEXT.sub(rf"\1?{REDACTED}", text)
