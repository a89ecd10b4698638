"""Which filesystem a path is on, read from mountinfo text: a table of cases."""

from __future__ import annotations

import pytest

from checkpoint_sync.filesystem import filesystem_type

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
        ("/", "ext4"),
        ("/home/user/mirror", "ext4"),
        ("/dev/shm", "tmpfs"),
        ("/dev/shm/mirror/.checkpoint-sync/staging", "tmpfs"),
        ("/dev/shmx/mirror", "ext4"),  # a longer name, not a path below the mount point
        ("/mnt/my disk/mirror", "xfs"),  # octal escapes in mount points
        ("/mnt/my\\040disk/mirror", "ext4"),
        ("/data/mirror", "tmpfs"),  # the last mount at a point wins
        ("/data/inner/mirror", "nfs4"),
    ],
)
def test_the_filesystem_of_a_path_is_its_deepest_mount(path: str, expected: str) -> None:
    assert filesystem_type(MOUNTINFO, path) == expected


def test_no_mount_line_means_no_answer() -> None:
    assert filesystem_type("garbage\n\n1 2 3", "/anything") is None
