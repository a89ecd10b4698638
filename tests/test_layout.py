"""Path mapping and safety: a listed name never leads outside the mirror."""

from __future__ import annotations

import pytest

from checkpoint_sync.errors import UnsafePathError
from checkpoint_sync.layout import (
    is_within,
    mirror_path,
    mirror_path_parts,
    quoted,
    safe_relative_path,
    staging_name,
)
from checkpoint_sync.sources.base import PageRef, RemoteFile


def listed(
    path: str, run: str = "job", checkpoint: str = "checkpoint-10", rank: int = 0
) -> RemoteFile:
    return RemoteFile(run, checkpoint, rank, path, 1, "t", "http://x", PageRef("/l", 0, 1))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("adapter.safetensors", "job/checkpoint-10/0/adapter.safetensors"),
        ("sub/dir/optim.pt", "job/checkpoint-10/0/sub/dir/optim.pt"),
        ("..hidden", "job/checkpoint-10/0/..hidden"),
        ("a..b/c", "job/checkpoint-10/0/a..b/c"),
        ("n" * 255, "job/checkpoint-10/0/" + "n" * 255),
    ],
)
def test_mirror_path(path: str, expected: str) -> None:
    assert mirror_path(listed(path)) == expected
    assert mirror_path_parts(expected) == ("job", "checkpoint-10", 0, path)


@pytest.mark.parametrize(
    ("run", "checkpoint", "rank"),
    [
        # Names up to 255 bytes, whatever their length in characters (254 bytes here).
        ("r" * 255, "c", 0),
        ("job", "é" * 127, 0),
        ("job", "c", (1 << 63) - 1),  # the highest rank the manifest can keep
    ],
)
def test_names_and_ranks_up_to_their_limits_are_mirrored(
    run: str, checkpoint: str, rank: int
) -> None:
    assert mirror_path(listed("f", run, checkpoint, rank)) == f"{run}/{checkpoint}/{rank}/f"


def test_mirror_path_parts_read_back_what_mirror_path_wrote() -> None:
    relative = mirror_path(listed("sub/7/a.bin", "run-1", "weights-step-3", 12))
    assert mirror_path_parts(relative) == ("run-1", "weights-step-3", 12, "sub/7/a.bin")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd", "absolute"),
        ("../escape", "climbs out"),
        ("a/..", "climbs out"),
        ("..", "climbs out"),
        ("a/../../escape", "climbs out"),
        ("a\\..\\b", "backslash"),
        ("a\0b", "NUL"),
        ("", "empty"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("a/", "empty"),
        ("a/./b", "file name 'a/./b' has an empty or '.' segment"),
        ("d/" + "n" * 256, "longer than 255 bytes"),
        ("é" * 128 + "/f", "longer than 255 bytes"),  # 256 bytes in UTF-8
    ],
)
def test_unsafe_relative_paths(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        safe_relative_path(path)


@pytest.mark.parametrize(
    ("run", "checkpoint", "rank", "reason"),
    [
        ("..", "c", 0, "not a usable name"),
        ("a/b", "c", 0, "slash"),
        ("job", "", 0, "not a usable name"),
        ("job", ".", 0, "checkpoint '.' is not a usable name"),  # the run's own directory
        ("a\0b", "c", 0, "run 'a\0b' contains a NUL byte"),
        ("job", "c\\d", 0, "backslash"),
        (".checkpoint-sync", "c", 0, "own state"),
        ("job", "c", -1, "negative"),
        ("job", "c", 1 << 63, "out of range"),
        ("r" * 256, "c", 0, "longer than 255 bytes"),
        ("job", "c" * 256, 0, "longer than 255 bytes"),
        ("job", "\U0001f642" * 64, 0, "longer than 255 bytes"),  # 64 characters, 256 bytes
    ],
)
def test_unsafe_run_checkpoint_or_rank(run: str, checkpoint: str, rank: int, reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        mirror_path(listed("f", run, checkpoint, rank))


@pytest.mark.parametrize(
    ("root", "candidate", "inside"),
    [
        ("/m", "/m", True),
        ("/m", "/m/a/b", True),
        ("/m", "/mirror/a", False),
        ("/m", "/", False),
        ("/", "/anything", True),
    ],
)
def test_is_within(root: str, candidate: str, inside: bool) -> None:
    assert is_within(root, candidate) is inside


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/m/job/c/0/a.bin", "/m/job/c/0/a.bin"),
        ("/m/" + "a" * 252, "/m/" + "a" * 252),  # 255 characters: whole
        ("/m/" + "a" * 253, "/m/" + "a" * 57 + "..." + "a" * 60),
        ("/m/" + "d/" * 3000 + "x.bin", "/m/" + "d/" * 28 + "d..." + "/d" * 27 + "/x.bin"),
    ],
    ids=["short", "longest-whole", "cut", "past-path-max"],
)
def test_a_long_path_is_quoted_by_its_start_and_end(path: str, shown: str) -> None:
    assert quoted(path) == shown


def test_staging_names_are_flat_and_distinct() -> None:
    a = staging_name("job/c/0/a")
    b = staging_name("job/c/1/a")
    assert a != b
    assert "/" not in a
    assert a.endswith(".part")


@pytest.mark.parametrize(
    ("path", "encoding", "lacking"),
    [
        ("模型.bin", "latin-1", "模"),
        ("sub/🚀", "iso8859-1", "🚀"),
        ("café.json", "ascii", "é"),
    ],
)
def test_a_name_the_locale_cannot_write_fails_alone(path: str, encoding: str, lacking: str) -> None:
    with pytest.raises(UnsafePathError, match=f"its encoding \\({encoding}\\) has no '{lacking}'"):
        mirror_path(listed(path), encoding)


@pytest.mark.parametrize(
    ("path", "encoding"),
    [("café.json", "latin-1"), ("模型.bin", "utf-8"), ("plain.bin", "ascii")],
)
def test_a_name_the_locale_can_write_is_mirrored_as_listed(path: str, encoding: str) -> None:
    assert mirror_path(listed(path), encoding) == f"job/checkpoint-10/0/{path}"


@pytest.mark.parametrize(
    "path",
    [
        "/" + "d/" * 3000 + "x.bin",
        "d/" * 3000 + "../x.bin",
        "d/" * 3000 + "a\\b",
        "d/" * 3000 + "a\0b",
        "d/" * 3000 + "/x.bin",
    ],
    ids=["absolute", "climbing", "backslash", "nul", "empty-segment"],
)
def test_a_long_refused_path_is_quoted_by_its_start_and_end(path: str) -> None:
    # Whole, a listed path past PATH_MAX made a failure line of kilobytes.
    with pytest.raises(UnsafePathError) as refused:
        safe_relative_path(path)
    assert quoted(path) in str(refused.value)
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize(("run", "checkpoint"), [("r/" * 3000, "c"), ("job", "c\\" * 3000)])
def test_a_long_refused_run_or_checkpoint_is_quoted_by_its_start_and_end(
    run: str, checkpoint: str
) -> None:
    with pytest.raises(UnsafePathError) as refused:
        mirror_path(listed("f", run, checkpoint, 0))
    assert len(str(refused.value)) < 200
