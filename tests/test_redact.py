from __future__ import annotations

import json
import re
from typing import SupportsIndex

import pytest

from checkpoint_sync.redact import Redactor, printable, redact_url, without_query

from .support import run_cli


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://s3.example/b/k?X-Amz-Signature=abc", "https://s3.example/b/k?<redacted>"),
        ("https://user:pw@host:8443/p", "https://host:8443/p"),
        ("http://host/p", "http://host/p"),
        # An IPv6 host keeps its brackets: without them its port reads as part of the address.
        ("http://[::1]:8080/x?X-Amz-Signature=abc", "http://[::1]:8080/x?<redacted>"),
        ("https://user:pw@[fe80::1]/p", "https://[fe80::1]/p"),
        # A port out of range is shown as written; a broken IPv6 literal, which urlsplit
        # refuses, is cut by hand.
        ("https://user:pw@host:99999/p?sig=1", "https://host:99999/p?<redacted>"),
        ("http://[::1/objects/1?X-Amz-Signature=s", "http://[::1/objects/1?<redacted>"),
        ("https://user:pw@[::1/o#frag", "https://[::1/o"),
        ("http://[::1/o?sig=s?more=t", "http://[::1/o?<redacted>"),  # all after the first "?"
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A request line sent back: its target has no scheme or host to mark it as a URL.
        ("GET /o?X-Amz-Signature=abc HTTP/1.1", "GET /o?<redacted>"),
        ("GET /b/k?", "GET /b/k?<redacted>"),
        ("SSH-2.0-OpenSSH_9.6", "SSH-2.0-OpenSSH_9.6"),
        ("", ""),
    ],
)
def test_without_query(text: str, shown: str) -> None:
    assert without_query(text) == shown


def test_redactor_removes_keys_and_query_strings_once() -> None:
    redact = Redactor(["sekrit-key-123"])
    text = "Bearer sekrit-key-123 got http://h/o?sig=1&x=2 and " + redact_url("http://h/o?s=1")
    assert redact(text) == "Bearer <redacted> got http://h/o?<redacted> and http://h/o?<redacted>"
    assert redact(redact(text)) == redact(text)


def test_short_strings_are_not_treated_as_secrets() -> None:
    redact = Redactor(["ab"])
    redact.add("")
    redact.add(None)  # a setting not given (a proxy without a password)
    redact.add("abc")
    assert redact("abc") == "abc"
    redact.add("abcd")  # the shortest taken
    assert redact("abcd") == "<redacted>"


def test_a_secret_containing_another_is_removed_whole() -> None:
    # Longest first, whichever way they are given or would sort ("abcdefgh" before "bcde"),
    # also where both start at one place (a key and a longer form of it that begins with it).
    for secrets in (["bcde", "abcdefgh"], ["abcdefgh", "bcde"], ["abcd", "abcdefgh"]):
        redact = Redactor(secrets)
        assert redact("key abcdefgh") == "key <redacted>"
    grown = Redactor(["bcde"])
    grown.add("abcdefgh")
    assert grown("key abcdefgh") == "key <redacted>"


@pytest.mark.parametrize(
    "text",
    ["HTTPS://S3.example/b/k?X-Amz-Signature=abc", "Http://h/o?X-Amz-Signature=abc"],
)
def test_query_strings_are_redacted_whatever_the_scheme_case(text: str) -> None:
    # A scheme is case-insensitive: an error page may echo the URL in capitals.
    assert "X-Amz-Signature" not in Redactor()(f"from {text}.")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # An internal error's text, or a traceback's, may quote any URL: its userinfo and
        # fragment go as its query string does; its host, port and path stay.
        ("boom http://u:pw-123@proxy.corp:3128 x", "boom http://proxy.corp:3128 x"),
        ("(https://user:p@ss@h/p)", "(https://h/p)"),  # all before the last "@" is userinfo
        ("'http://u:pw@h:8/a/b?sig=1#tok=2'", "'http://h:8/a/b?<redacted>'"),
        ("see https://h/p#access_token=abc.", "see https://h/p."),
        # Punctuation that ends the text around the URL stays; within its query or fragment,
        # it goes with them.
        ("boom http://u:pw@h/p#tok=x); rerun", "boom http://h/p); rerun"),
        ("(http://h/o?sig=1), and", "(http://h/o?<redacted>), and"),
        ("http://h/o?sig=a)b#c)d e", "http://h/o?<redacted> e"),
        ("http://h/o?a=1#f", "http://h/o?<redacted>"),
        ("(see http://h/o?)", "(see http://h/o?<redacted>)"),  # a query of one character
        ("HTTP://U:PW@H/P", "HTTP://H/P"),
        # An "@" or "#" past the authority, outside any URL, and a status code stay.
        ("http://h/models/a@b/x 404", "http://h/models/a@b/x 404"),
        ("user@example.com #3 HTTP 500", "user@example.com #3 HTTP 500"),
        ("http://[::1]:8080/x?<redacted>", "http://[::1]:8080/x?<redacted>"),
    ],
)
def test_urls_in_text_lose_their_userinfo_query_and_fragment(text: str, shown: str) -> None:
    redact = Redactor()
    assert redact(text) == shown
    assert redact(shown) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A known secret inside a URL does not end it: its user, query and fragment go still.
        ("via http://bob:pw-0a1b2c3d@proxy:3128/x?sig=abc#t", "via http://proxy:3128/x?<redacted>"),
        ("GET http://h/p?token=pw-0a1b2c3d&sig=abc ok", "GET http://h/p?<redacted> ok"),
        ("GET http://h/p?token=pw%2D0a1b2c3d&sig=abc ok", "GET http://h/p?<redacted> ok"),
        ("http://bob:pw-0a1b2c3d@h/p#tok", "http://h/p"),
        # In the part of a URL that stays, the secret alone goes.
        ("http://h/pw-0a1b2c3d/x?sig=abc", "http://h/<redacted>/x?<redacted>"),
    ],
)
def test_a_secret_in_a_url_leaves_the_rest_of_it_redacted(text: str, shown: str) -> None:
    redact = Redactor(["pw-0a1b2c3d"])
    assert redact(text) == shown
    assert redact(shown) == shown


# An API error page may be 64 MiB, and one run without a space that `Redactor.head` scans whole.
# Each of these took minutes at 1 MiB where a lazy match looked ahead over the run of
# punctuation at every character; the suite's timeout fails a return to that.
@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://h?" + "?" * (1 << 20) + "x", "http://h?<redacted>"),
        ("http://h#" + "." * (1 << 20) + "x", "http://h"),
        ("(http://h?" + ")" * (1 << 20) + "x)", "(http://h?<redacted>)"),
    ],
)
def test_a_long_run_of_punctuation_in_a_url_is_redacted_in_one_scan(text: str, shown: str) -> None:
    assert Redactor(["sekrit-key"])(text) == shown


SECRET = "SECRETMARKER123"
ENCODED = "".join(f"%{b:02X}" for b in SECRET.encode())  # its longest spelling: 45 characters


# `head` redacts a text only as far as its first 300 characters shown need. Before them the
# text is shrunk by redaction (percent-encoded secrets, long queries) or grown (short queries):
# a secret, a URL's userinfo or query is placed at every place before, across and after where
# the text is cut for each pass, and what is shown is what redacting it whole would show.
@pytest.mark.parametrize(
    "filler",
    [
        "word ",
        f"{ENCODED} ",  # 46 characters shown as 11: a cut must look further on
        f"{SECRET}-",  # 16 as 11
        "http://h/?a ",  # a query grows 1 character to 10
        "http://h/p?" + "q" * 700 + " ",  # and 700 to 10
        "'http://u:p@h/p#f' ",
    ],
)
@pytest.mark.parametrize(
    "placed",
    [
        SECRET,
        ENCODED,
        f"http://user:{SECRET}@host/p?sig=abc#t",
        f"http://host/p?token={ENCODED}&sig=abc",
        "http://bob:pw-LONGPASSWORD@proxy:3128/x",
        "HTTPS://" + "u" * 400 + ":pw-LONGPASSWORD@proxy/p",  # userinfo longer than shown
    ],
)
def test_the_head_of_a_long_text_is_redacted_as_the_whole_text_would_be(
    filler: str, placed: str
) -> None:
    redact = Redactor([SECRET])
    for at in range(0, 3000, 5):
        before = filler * (at // len(filler)) + "y" * (at % len(filler))
        text = before + placed + " " + filler * 40
        shown = redact.head(text, 300)
        assert shown == redact(text)[:300], at
        for part in (SECRET[:4], ENCODED[:6], "LONGPASS"):
            assert part not in shown, at


def test_the_head_of_a_text_shrunk_by_as_much_as_redaction_can_shrink_it() -> None:
    # A key whose longest spelling (30 characters) is three redactions long, spelled so back to
    # back before the first 300 characters shown: one more spelling, a character or more on,
    # straddles the least of the text that decides them.
    redact = Redactor(["ABCDEFGHIJ"])
    spelled = "%41%42%43%44%45%46%47%48%49%4A"
    for gap in range(12):
        text = spelled * 29 + "x" * gap + spelled + " " + "y" * 40
        shown = redact.head(text, 300)
        assert shown == redact(text)[:300], gap
        assert "%41" not in shown, gap


class Sliced(str):
    """A text that records how far into it each slice of it reaches."""

    reached: list[int]

    def __getitem__(self, key: SupportsIndex | slice) -> str:
        if isinstance(key, slice):
            self.reached.append(len(range(*key.indices(len(self)))))
        return str.__getitem__(self, key)


@pytest.mark.parametrize(
    "unit",
    [
        "http://h/p?sig=1 ",  # URLs: only those before the cut are looked at
        "http://h/p?" + "q" * 700 + " ",  # shown 32 times shorter: the cut goes on, doubling
    ],
)
def test_the_head_of_a_huge_text_reads_little_of_it(unit: str) -> None:
    # An API's error page of 64 MiB: redacted whole (or its URLs by one break more each time),
    # it held the event loop for 5 to 13 s.
    redact = Redactor(["a" * 64])
    text = Sliced(unit * ((64 << 20) // len(unit)))
    text.reached = []
    shown = redact.head(text, 2048)
    assert shown == redact(str.__getitem__(text, slice(0, 1 << 20)))[:2048]
    # The cut doubles as it goes on, so what all the slices read adds up to a few times the last.
    assert sum(text.reached) < 4 * max(text.reached) < len(text) // 4, text.reached


def test_the_head_of_a_text_without_secrets_or_shorter_than_it() -> None:
    redact = Redactor()
    assert redact.head("short http://h/p?sig=1", 300) == "short http://h/p?<redacted>"
    assert redact.head("x" * 1000, 300) == "x" * 300
    assert redact.head("", 300) == ""


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain/name.bin", "plain/name.bin"),
        ("a tab\tkept", "a tab\tkept"),
        ("name\ncheckpoint-sync: error: forged", "name\\x0acheckpoint-sync: error: forged"),
        ("\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),  # retitles a terminal
        ("done\rfake line", "done\\x0dfake line"),  # rewrites the line
        ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
        ("caf\u00e9 \u00a0nbsp", "caf\u00e9 \u00a0nbsp"),  # printable, if not ASCII
        ("\u6a21\u578b e\u0301 \U0001f44d", "\u6a21\u578b e\u0301 \U0001f44d"),  # so is this
        # Bidirectional overrides and isolates: the line would read otherwise than it is
        # ("Trojan Source"); this one shows as "reportexe.pdf".
        ("report\u202efdp.exe", "report\\u202efdp.exe"),
        (
            "\u202a\u202b\u202c\u202d \u2066\u2067\u2068\u2069",
            "\\u202a\\u202b\\u202c\\u202d \\u2066\\u2067\\u2068\\u2069",
        ),
        ("lrm\u200e rlm\u200f", "lrm\\u200e rlm\\u200f"),
        # Other invisible formatting characters (category Cf): two names would look alike.
        (
            "zero\u200bwidth \ufeffbom soft\u00adhyphen",
            "zero\\u200bwidth \\ufeffbom soft\\xadhyphen",
        ),
        ("tag\U000e0041", "tag\\U000e0041"),  # beyond the BMP
        # A line or paragraph separator would break the line where some readers show it.
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        # A lone surrogate: no character at all, and UTF-8 output would refuse to encode it.
        ("half\ud800", "half\\ud800"),
        # A backslash is doubled: else the name that holds these four characters and the one
        # that holds ESC would be shown alike.
        ("literal\\x1b", "literal\\\\x1b"),
        ("dir\\file", "dir\\\\file"),
    ],
)
def test_control_characters_are_shown_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown
    # Unambiguous: what is shown reads back as the text, and only as it.
    assert _read_back(shown) == text


def _read_back(shown: str) -> str:
    """Undo `printable`'s escapes (Python's spelling of them)."""
    escape = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
    return escape.sub(lambda m: "\\" if m[1] == "\\" else chr(int(m[1][1:], 16)), shown)


# A backslash and an ESC: quoted by repr, the terminal showed them escaped twice and --json
# gave the escapes, not the text.
ODD = "a\\b\x1b"


@pytest.mark.parametrize(
    ("flags", "quoted"),
    [
        (["sync", "--dest", "d", "--part-size", f"1{ODD}"], f"'1{ODD}' is not a size"),
        (["bench", "--part-size", f"1MiB,{ODD}"], f"'{ODD}' is not a size"),
        (["bench", "--concurrency", ",\x1f,\x1c"], "',\x1f,\x1c' is not an integer"),
        (["list", "--loops-checkpoint", f"bt:/{ODD}"], f"'bt:/{ODD}' is not a bt:// URI"),
        (["list", "--loops-checkpoint", f"bt://x{ODD}"], f"'bt://x{ODD}' is not a Loops"),
        (
            ["list", "--loops-checkpoint", f"bt://loops:{ODD}/weights/x/y"],
            f"'bt://loops:{ODD}/weights/x/y' has 4 part(s)",
        ),
        (["list", "--loops-checkpoint", f"bt://loops:r/{ODD}/x"], f": '{ODD}' is neither"),
        (["list", "--wandb-artifact", f"e/p{ODD}"], f"'e/p{ODD}' is not ENTITY/PROJECT/NAME"),
        (["list", "--wandb-artifact", f"e/p/n:{ODD}"], f"'e/p/n:{ODD}': leave out the version"),
        # Every integer flag: argparse's own `int` quoted with repr.
        (["sync", "--dest", "d", "--concurrency", ODD], f"'{ODD}' is not an integer"),
        (["demo", "--concurrency", ODD], f"'{ODD}' is not an integer"),
        (["bench", "--concurrency", f"4,{ODD}"], f"'{ODD}' is not an integer"),
        (["sync", "--dest", "d", "--node-rank", ODD], f"'{ODD}' is not an integer"),
        (["list", "--node-rank", ODD], f"'{ODD}' is not an integer"),
        (["bench", "--node-rank", ODD], f"'{ODD}' is not an integer"),
        (["bench", "--rounds", ODD], f"'{ODD}' is not an integer"),
        (["bench", "--rounds", "0"], "'0' is less than 1"),
        (["sync", "--dest", "d", "--node-rank", "-1"], "'-1' is less than 0"),
        (["list", "--node-rank", "-2"], "'-2' is less than 0"),
    ],
)
def test_usage_errors_quote_the_text_given_as_it_is(flags: list[str], quoted: str) -> None:
    # As a listed name is quoted: the terminal shows it escaped once, --json gives the text.
    source = ["--project", "p", "--job", "j"]
    if "--wandb-artifact" in flags:
        source = ["--wandb-model", "m"]
    elif "--loops-checkpoint" in flags or flags[0] == "demo":
        source = []
    shown = run_cli(*flags, *source)
    as_json = run_cli(*flags, *source, "--json")

    assert shown.code == as_json.code == 2
    assert printable(quoted) in shown.stderr
    assert quoted in json.loads(as_json.stdout)["error"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("key SECRET%4DARKER123.", "key <redacted>."),
        ("key SECRET%4dARKER123", "key <redacted>"),  # either case of hex digit
        ("%53%45%43%52%45%54%4D%41%52%4B%45%52%31%32%33", "<redacted>"),  # every character
        ("Bearer%20k3y%2Fw%2Bth%3D", "Bearer%20<redacted>"),  # as quote(safe="") writes it
        ("caf%C3%A9-key-%c3%a9", "<redacted>"),  # a character beyond ASCII, as UTF-8 bytes
        # A lone surrogate (bytes of another encoding, in a key not yet checked) is no error.
        ("h\udcfflf-key", "<redacted>"),
        # Decoded, these are not a secret: they stay.
        (
            "SECRET%4EARKER123 SECRET%4DARKER12 SECRET%4",
            "SECRET%4EARKER123 SECRET%4DARKER12 SECRET%4",
        ),
        ("k3y%2Fw%2Bth", "k3y%2Fw%2Bth"),
    ],
)
def test_a_secret_is_removed_however_it_is_percent_encoded(text: str, shown: str) -> None:
    redact = Redactor(["SECRETMARKER123", "k3y/w+th=", "café-key-é", "h\udcfflf-key"])
    assert redact(text) == shown
