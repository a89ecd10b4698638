"""The built-in server: its own command line (`python -m checkpoint_sync.localserver`), and
where it answers as the provider pages (``shared/api``) say the real services do."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from checkpoint_sync.localserver import (
    Catalog,
    Faults,
    Joined,
    ServedCheckpoint,
    ServedFile,
    ServedJob,
    synthetic_wandb_model,
    tree_catalog,
)

from .conftest import JOB, PROJECT
from .support import API_KEY, ServerThread


def _get_json(server: ServerThread, path: str) -> Any:
    """The JSON answer of the built-in server's API at ``path``, asked with the test key."""
    connection = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        answer = connection.getresponse()
        assert answer.status == 200
        return json.loads(answer.read())
    finally:
        connection.close()


def test_a_presigned_url_refuses_head_and_serves_get_on_the_same_connection(
    server: ServerThread,
) -> None:
    # NOTES.md: presigned URLs are signed for GET only, and HEAD may be refused. The server
    # answered a HEAD as a GET, body and all, which then stood where the next answer's head
    # should be.
    listing = _get_json(server, f"/v1/training_projects/{PROJECT}/jobs/{JOB}/checkpoint_files")
    url = urlsplit(listing["presigned_urls"][0]["url"])
    connection = http.client.HTTPConnection(url.netloc, timeout=10)
    try:
        connection.request("HEAD", f"{url.path}?{url.query}")
        head = connection.getresponse()
        assert (head.status, head.read()) == (403, b"")

        connection.request("GET", f"{url.path}?{url.query}", headers={"Range": "bytes=0-9"})
        ranged = connection.getresponse()
        assert (ranged.status, len(ranged.read())) == (206, 10)
    finally:
        connection.close()


def test_serve_tree_lists_ranks_checkpoints_and_paths(tmp_path: Path) -> None:
    (tmp_path / "1" / "ckpt-5" / "sub").mkdir(parents=True)
    (tmp_path / "1" / "ckpt-5" / "sub" / "w.bin").write_bytes(b"abc")

    (job,) = tree_catalog(tmp_path, "http://files/", "p", "j", "k").jobs
    (checkpoint,) = job.checkpoints
    (file,) = checkpoint.files
    assert (checkpoint.checkpoint_id, file.node_rank, file.name, file.size) == (
        "ckpt-5",
        1,
        "ckpt-5/sub/w.bin",
        3,
    )
    assert file.external_url == "http://files/1/ckpt-5/sub/w.bin"


def test_serve_tree_quotes_the_urls_of_names_a_url_cannot_hold(tmp_path: Path) -> None:
    # As a store's presigned URLs are: the client refuses a URL with spaces or non-ASCII
    # characters, so every such file of the tree failed to mirror.
    (tmp_path / "0" / "检查点").mkdir(parents=True)
    (tmp_path / "0" / "检查点" / "a b#1%.bin").write_bytes(b"abc")

    (job,) = tree_catalog(tmp_path, "http://files/", "p", "j", "k").jobs
    (file,) = job.checkpoints[0].files

    assert file.name == "检查点/a b#1%.bin"
    assert file.external_url == "http://files/0/%E6%A3%80%E6%9F%A5%E7%82%B9/a%20b%231%25.bin"


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        ("stray.txt", "is not at <node_rank>/<checkpoint_id>/<path>"),
        ("0/only-two-levels.txt", "is not at <node_rank>/<checkpoint_id>/<path>"),
        ("rank-a/ckpt/f.txt", "is not at <node_rank>/<checkpoint_id>/<path>"),
        (None, "is not a directory"),
    ],
)
def test_serve_tree_refuses_a_tree_it_cannot_list(
    tmp_path: Path, layout: str | None, problem: str
) -> None:
    root = tmp_path / "tree"
    if layout is not None:
        (root / layout).parent.mkdir(parents=True, exist_ok=True)
        (root / layout).write_text("x")

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoint_sync.localserver",
            "serve-tree",
            "--root",
            str(root),
            "--file-base-url",
            "http://files",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "checkpoint_sync.localserver",
                "serve-synthetic",
                "--port",
                str(port),
                "--large-files",
                "0",
                "--small-files",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_stopped_by_ctrl_c_mid_transfer_prints_no_server_traceback(tmp_path: Path) -> None:
    # The in-process server's handlers were writing when the client went away: aiohttp logged
    # each reset with its traceback. The moment varies, so several are tried (each one that
    # lands mid-transfer showed it before the fix; none can show it after).
    for delay in (0.3, 0.4, 0.5):
        demo = subprocess.Popen(
            [sys.executable, "-m", "checkpoint_sync", "demo", "--dest", str(tmp_path / str(delay))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=60)
        assert "Traceback" not in err, err


def test_a_job_without_checkpoints_is_listed_with_the_times_its_page_requires() -> None:
    # TrainingJobV1's created_at and updated_at are required date-times; both were "" here.
    with ServerThread(Catalog(api_key=API_KEY, jobs=[ServedJob(PROJECT, "new-job")])) as server:
        answer = _get_json(server, f"/v1/training_projects/{PROJECT}/jobs/new-job/checkpoints")

    assert answer["checkpoints"] == []
    job = answer["training_job"]
    for key in ("created_at", "updated_at"):
        assert datetime.fromisoformat(job[key]).tzinfo is not None, key


def _checkpoints(*sizes: int) -> list[ServedCheckpoint]:
    """Checkpoints ``c0``, ``c1``... of so many files each, named ``cN/fM``."""
    made = datetime(2026, 11, 1)
    return [
        ServedCheckpoint(
            f"c{n}", made, files=[ServedFile(0, f"c{n}/f{m}", 1, "t", m) for m in range(size)]
        )
        for n, size in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    "wanted",
    [
        *(slice(0, 3), slice(3, 6), slice(4, 9), slice(9, 12), slice(10, 20), slice(11, 14)),
        *(slice(-3, None), slice(-20, 2), slice(2, 2), slice(5, 1), slice(None, None)),
    ],
)
def test_a_jobs_checkpoints_are_sliced_as_one_list(wanted: slice) -> None:
    parts = [c.files for c in _checkpoints(4, 0, 5, 2)]
    whole = [f for files in parts for f in files]
    joined = Joined(parts)
    assert joined[wanted] == whole[wanted]
    assert len(joined) == len(whole)


@pytest.mark.parametrize("index", [0, 3, 4, 10, -1, -11])
def test_a_jobs_checkpoints_are_indexed_and_walked_as_one_list(index: int) -> None:
    parts = [c.files for c in _checkpoints(4, 0, 5, 2)]
    whole = [f for files in parts for f in files]
    joined = Joined(parts)
    assert joined[index] == whole[index]
    assert list(joined) == whole
    for past in (11, -12):
        with pytest.raises(IndexError):
            joined[past]


def test_a_jobs_listing_pages_run_across_its_checkpoints() -> None:
    job = ServedJob(PROJECT, JOB, _checkpoints(4, 0, 5, 2))
    listing = f"/v1/training_projects/{PROJECT}/jobs/{JOB}/checkpoint_files?page_size=3"
    names: list[str] = []
    totals: set[int] = set()
    token = 0
    with ServerThread(Catalog(api_key=API_KEY, jobs=[job])) as server:
        while token is not None:
            page = _get_json(server, f"{listing}&page_token={token}")
            names += [entry["relative_file_name"] for entry in page["presigned_urls"]]
            token, totals = page["next_page_token"], totals | {page["total_count"]}

    assert names == [f.name for c in job.checkpoints for f in c.files]
    assert totals == {11}


def test_required_only_leaves_out_the_fields_the_pages_do_not_require() -> None:
    job = ServedJob(PROJECT, JOB, _checkpoints(1, 1))
    job.checkpoints[0].sync_status = None
    model = synthetic_wandb_model("m", {10: {"reward": 0.5}})
    catalog = Catalog(api_key=API_KEY, wandb_api_key=API_KEY, jobs=[job], wandb_models=[model])
    base = f"/v1/training_projects/{PROJECT}/jobs/{JOB}"
    with ServerThread(catalog, Faults(required_only=True)) as server:
        checkpoints = _get_json(server, f"{base}/checkpoints")["checkpoints"]
        first, last = (
            _get_json(server, f"{base}/checkpoint_files?page_size=1&page_token={token}")
            for token in (0, 1)
        )
        wandb = _get_json(server, "/v1/preview/models/m/checkpoints")

    # Null, their default, where left out; what a value says stays.
    assert [c.get("sync_status", "left out") for c in checkpoints] == ["left out", "COMPLETE"]
    assert [page.get("next_page_token", "left out") for page in (first, last)] == [1, "left out"]
    assert sorted(wandb) == ["data", "has_more"]
