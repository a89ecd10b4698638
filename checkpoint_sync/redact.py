"""Keep secrets out of every message (API keys, proxy passwords, and the userinfo, query string
and fragment of URLs), and the control and invisible formatting characters of names a listing
gives out of the terminal."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
# A URL inside any text (a message, a traceback, a repr): its userinfo (a proxy's or a
# basic-auth password; all before the authority's last "@"), its query string (presigned
# signatures) and its fragment (tokens handed to browsers) go, as in `redact_url`. Each part is
# taken whole, up to a space or a quote, so that a text is scanned once: a lazy match that
# looked ahead for where the text goes on took time quadratic in the length of a run of
# punctuation, and an error page of the API (up to 64 MiB) may be one such run, which
# `Redactor.head` then scans whole.
_URL_IN_TEXT = re.compile(
    r"(https?://)"  # kept
    r"(?:[^\s/?#'\"<>]*@)?"  # userinfo: dropped
    r"([^\s?#'\"<>]*)"  # host, port and path: kept
    rf"(\?(?:{REDACTED}|[^\s#'\"<>]*))?"  # query: redacted, once
    r"(#[^\s'\"<>]*)?",  # fragment: dropped
    re.IGNORECASE,
)
# No part of a URL the pattern takes holds one of these: the URLs of a text cut before one are
# redacted as in the whole text.
_URL_BREAK = re.compile(r"[\s'\"<>]")
# Punctuation that ends the text around a URL rather than the URL, "(see http://h/p#t).": given
# back from the end of a query or fragment (neither ends with one that matters).
_TEXT_GOES_ON = ")]}.,;:!?"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
# What a listed name must not bring to the terminal as it is, by Unicode category: control
# characters (C0 and C1; a tab is kept) could move the cursor, rewrite the line, retitle the
# terminal, hide what follows or, with a newline, forge a line (every message is one line; a
# --debug traceback is shown a line at a time); format characters (bidirectional overrides and
# isolates, zero-width spaces, a BOM) make a line read otherwise than it is ("Trojan Source") or
# two names look alike; a line or paragraph separator breaks the line where a reader honours it;
# a lone surrogate is no character and UTF-8 output refuses it.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Printable ASCII is shown as it is without a look-up, so a plain line costs one scan; the
# backslash is not, as it starts every escape.
_SUSPECT = re.compile(r"[^\t\x20-\x5b\x5d-\x7e]")


def printable(text: str) -> str:
    """``text`` with its control and invisible formatting characters written as Python escapes
    (ESC as ``\\x1b``, U+202E as ``\\u202e``) and a backslash doubled, so that the shown text
    reads back as the text and only as it (a name holding the four characters ``\\x1b`` is
    shown otherwise than one holding ESC)."""
    return _SUSPECT.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    if char == "\\":
        return "\\\\"
    if unicodedata.category(char) not in _HIDDEN:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def redact_url(url: str) -> str:
    """The URL without its userinfo, query string and fragment: passwords, presigned signatures
    and tokens live there."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken IPv6 literal: cut the same parts out by hand
        return without_query(_USERINFO.sub(r"\1", url).partition("#")[0])
    query = REDACTED if parts.query else ""
    host = parts.netloc.rpartition("@")[2]  # as written: an IPv6 address keeps its brackets
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def without_query(text: str) -> str:
    """``text`` with all after its first "?" redacted: for text that may hold a request's
    target without its scheme and host, as an answer echoing the request line does
    (``GET /o?X-Amz-Signature=... HTTP/1.1``), where no URL marks the query string."""
    bare, question, _ = text.partition("?")
    return bare + (f"?{REDACTED}" if question else "")


class Redactor:
    """Scrubs known secrets, and any URL's userinfo, query string and fragment, out of text
    before it is shown."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self._pattern: re.Pattern[str] | None = None
        self._longest = 0  # characters of the longest spelling of a secret: all percent-encoded
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4 and secret not in self._secrets:
            # Longest first, so a secret that contains another is removed whole.
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)
            self._pattern = re.compile("|".join(map(_spelled_any_way, self._secrets)))
            self._longest = max(self._longest, len(_percent_encoded(secret)))

    def __call__(self, text: str) -> str:
        # URLs first: a secret replaced in one (a proxy's password in its userinfo, a key in its
        # query) would end it at the "<" of REDACTED, and its rest would be shown as it is.
        text = _URL_IN_TEXT.sub(_bare_url, text)
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)

    def head(self, text: str, limit: int) -> str:
        """``self(text)[:limit]``, from as little of ``text`` as decides it: an API's error page
        may be 64 MiB, and redacting it whole held the event loop for seconds (30 with near
        misses of a long key).

        The rule, which never shows a part of a secret or of a URL cut short:
        - The secrets' pass looks, at each place, at ``self._longest`` characters at most (a
          secret with every character percent-encoded), and turns at most that many into the
          10 of REDACTED: its first ``limit`` characters come from places before
          ``need - longest`` of what it is given, so the first ``need`` characters decide them.
        - No URL the URLs' pass takes holds a break (`_URL_BREAK`): that pass on the text cut
          before one gives the start of what it gives for the whole text. Queries shrink or grow
          there, so the text is cut further on until that start is ``need`` long, or is all of it.
        A run without a break is scanned to its end once (0.6 s for 64 MiB).
        """
        longest = self._longest
        need = longest + limit * max(1, -(-longest // len(REDACTED)))
        end = need
        while True:
            found = _URL_BREAK.search(text, end) if end < len(text) else None
            cut = len(text) if found is None else found.start()
            bare = _URL_IN_TEXT.sub(_bare_url, text[:cut])
            if cut == len(text) or len(bare) >= need:
                break
            end = 2 * cut
        bare = bare[:need]
        return (bare if self._pattern is None else self._pattern.sub(REDACTED, bare))[:limit]


def _spelled_any_way(secret: str) -> str:
    """A pattern of ``secret`` with any of its characters percent-encoded (in either case of
    hex digits), as a URL, a form or an error page quoting a request may spell it."""
    return "".join(f"(?:{re.escape(char)}|(?i:{_percent_encoded(char)}))" for char in secret)


def _percent_encoded(char: str) -> str:
    # A key read from the environment before it is checked may hold a lone surrogate (bytes of
    # another encoding): it is spelled somehow, not raised.
    return "".join(f"%{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))


def _bare_url(match: re.Match[str]) -> str:
    scheme, rest, query, fragment = match.groups()
    last = (fragment if fragment is not None else query or "")[1:]
    goes_on = last[len(last.rstrip(_TEXT_GOES_ON)) :]
    return f"{scheme}{rest}{f'?{REDACTED}' if query is not None else ''}{goes_on}"
