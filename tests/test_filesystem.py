"""Which filesystem a path is on, read from mountinfo text: a table of cases; and whether a
directory of the mirror leads to its own place, on a tree of real directories and symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checkpoint_sync.filesystem import Places, mount_of

MOUNTINFO = "\n".join(
    [
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        "23 22 0:21 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw,size=12g",
        "24 22 0:22 / /mnt/my\\040disk rw shared:3 - xfs /dev/vdb rw",
        # Optional fields before the separator vary in number.
        "25 22 0:23 / /data rw master:4 shared:5 propagate_from:1 - btrfs /dev/vdc rw",
        # Mounted over /data later: it hides the btrfs mount.
        "26 25 0:24 / /data rw - tmpfs tmpfs rw",
        "27 22 0:25 / /data/inner rw - nfs4 server:/export rw",
        "not a mount line",
    ]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", ("/", "ext4")),
        ("/home/user/mirror", ("/", "ext4")),
        ("/dev/shm", ("/dev/shm", "tmpfs")),
        ("/dev/shm/mirror/.checkpoint-sync/staging", ("/dev/shm", "tmpfs")),
        ("/dev/shmx/mirror", ("/", "ext4")),  # a longer name, not a path below the mount point
        ("/mnt/my disk/mirror", ("/mnt/my disk", "xfs")),  # octal escapes in mount points
        ("/mnt/my\\040disk/mirror", ("/", "ext4")),
        ("/data/mirror", ("/data", "tmpfs")),  # the last mount at a point wins
        ("/data/inner/mirror", ("/data/inner", "nfs4")),
    ],
)
def test_the_filesystem_of_a_path_is_its_deepest_mount(
    path: str, expected: tuple[str, str]
) -> None:
    assert mount_of(MOUNTINFO, path) == expected


def test_no_mount_line_means_no_answer() -> None:
    assert mount_of("garbage\n\n1 2 3", "/anything") is None


@pytest.mark.parametrize(
    ("dest", "directory", "elsewhere"),
    [
        ("mirror", "", None),
        ("mirror", "run/a", None),
        ("mirror", "run/not-made-yet", None),
        ("./mirror/", "run/a", None),  # as a user may spell it
        ("link-to-mirror", "run/a", None),  # DEST itself reached through a symlink
        ("mirror", "run/b", "leads to run/a in the mirror, not to its own place (a symlink?)"),
        ("mirror", "run/b/0", "leads to run/a/0 in the mirror, not to its own place (a symlink?)"),
        ("mirror", "run/out", "leads outside the destination (a symlink?)"),
        ("mirror", "run/up", "leads to DEST itself, not to its own place (a symlink?)"),
        (
            "link-to-mirror",
            "run/b",
            "leads to run/a in the mirror, not to its own place (a symlink?)",
        ),
    ],
)
def test_a_directory_of_the_mirror_leads_to_its_own_place(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dest: str,
    directory: str,
    elsewhere: str | None,
) -> None:
    (tmp_path / "mirror" / "run" / "a" / "0").mkdir(parents=True)
    (tmp_path / "mirror" / "run" / "b").symlink_to(tmp_path / "mirror" / "run" / "a")
    (tmp_path / "mirror" / "run" / "out").symlink_to(tmp_path)
    (tmp_path / "mirror" / "run" / "up").symlink_to(tmp_path / "mirror")
    (tmp_path / "link-to-mirror").symlink_to(tmp_path / "mirror")
    monkeypatch.chdir(tmp_path)
    places = Places(Path(dest))

    assert places.elsewhere(directory) == elsewhere
    assert places.own(directory) is (elsewhere is None)


def test_the_root_directory_as_dest_has_its_directories_in_place(tmp_path: Path) -> None:
    places = Places(Path("/"))
    assert places.own("")
    assert places.own(os.path.relpath(os.path.realpath(tmp_path), "/"))
