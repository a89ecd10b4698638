"""A mirror the first release of checkpoint-sync made, taken over by this one.

Users upgrade between runs of a cron job, and sometimes roll back. The manifest has been schema 1
since the first release; what came later (the ETag of a file in parts, how far a part got) are
tables made in place, so that a mirror an earlier release made needs no migration, and an
earlier release still opens one this release wrote. The layout is built here from the first
release's own SQL and conventions (commit cdf768b), copied as data, not by installing it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import xxhash

from checkpoint_sync.engine import manifest_path
from checkpoint_sync.layout import staging_name
from checkpoint_sync.localserver import ServedFile, content

from .conftest import JOB, job_args, job_catalog, sync_args
from .support import ServerThread, assert_exact, mirrored, run_cli

# The first release's manifest, as its manifest.py made it (SCHEMA_VERSION = 1).
FIRST_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    run TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    node_rank INTEGER NOT NULL,
    size INTEGER NOT NULL,
    last_modified TEXT NOT NULL,
    digest TEXT NOT NULL,
    verified_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_checkpoint ON files (run, checkpoint);
CREATE TABLE IF NOT EXISTS staging (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_modified TEXT NOT NULL,
    part_size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    path TEXT NOT NULL REFERENCES staging (path) ON DELETE CASCADE,
    part INTEGER NOT NULL,
    PRIMARY KEY (path, part)
);
PRAGMA user_version=1;
"""
PART = 256 << 10  # sync_args' --part-size


def relative(file: ServedFile) -> str:
    checkpoint, _, rest = file.name.partition("/")
    return f"{JOB}/{checkpoint}/{file.node_rank}/{rest}"


def first_release_mirror(dest: Path, server: ServerThread) -> tuple[ServedFile, ServedFile]:
    """checkpoint-10 mirrored whole; of checkpoint-20, rank 0's large file stopped with its first
    two parts done and a small file stopped before any, as the first release left them: a
    staging row for every file it fetched (one-part files too), each staging file reserved at
    full size (zeros where nothing was written). The large and the small file."""
    db_path = manifest_path(dest)
    (db_path.parent / "staging").mkdir(parents=True)
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(FIRST_RELEASE_SCHEMA)
    for file in server.files():
        if file.name.startswith("checkpoint-10/"):
            data = content(file.seed, 0, file.size)
            mirrored(dest, JOB, file).parent.mkdir(parents=True, exist_ok=True)
            mirrored(dest, JOB, file).write_bytes(data)
            digest = xxhash.xxh3_128_hexdigest(data)
            db.execute(
                "INSERT INTO files VALUES (?, 'baseten-training', ?, 'checkpoint-10', ?, ?, ?, ?,"
                " '2026-11-22T15:51:43+00:00')",
                (relative(file), JOB, file.node_rank, file.size, file.last_modified, digest),
            )
    rank_0 = [f for f in server.files() if f.name.startswith("checkpoint-20/") and f.node_rank == 0]
    large = next(f for f in rank_0 if f.size > PART)
    small = next(f for f in rank_0 if f.size <= PART)
    for file, done in ((large, 2), (small, 0)):
        staging = db_path.parent / "staging" / staging_name(relative(file))
        staging.write_bytes(content(file.seed, 0, done * PART).ljust(file.size, b"\0"))
        db.execute(
            "INSERT INTO staging VALUES (?, ?, ?, ?)",
            (relative(file), file.size, file.last_modified, PART),
        )
        db.executemany(
            "INSERT INTO parts VALUES (?, ?)", [(relative(file), part) for part in range(done)]
        )
    db.commit()
    db.close()
    return large, small


def columns(db: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: db.execute(f"PRAGMA table_info({table})").fetchall()
        for table in ("files", "staging", "parts")
    }


def test_a_first_release_mirror_is_skipped_and_its_parts_resumed_byte_exact(dest: Path) -> None:
    with ServerThread(job_catalog(checkpoints=2)) as server:
        first_release_mirror(dest, server)
        recorded = [f for f in server.files() if f.name.startswith("checkpoint-10/")]

        result = run_cli(*sync_args(server, dest, "--json"))
        sent = server.traffic.object_bytes_sent
        server.traffic.object_requests = 0
        again = run_cli(*sync_args(server, dest, "--json"))

        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["files"]["skipped"] == len(recorded)
        assert summary["files"]["fetched"] == len(server.files()) - len(recorded)
        assert summary["files"]["resumed"] == 1
        assert summary["bytes"]["resumed"] == 2 * PART
        # All but the two parts done; the small file whole (its staging file holds only the
        # zeros it was reserved with).
        assert sent == sum(f.size for f in server.files() if f not in recorded) - 2 * PART
        for file in server.files():
            assert_exact(mirrored(dest, JOB, file), file)
        assert json.loads(again.stdout)["files"]["skipped"] == len(server.files())
        assert server.traffic.object_requests == 0
    assert not list((manifest_path(dest).parent / "staging").iterdir())
    # A rollback: the first release still opens the manifest and reads the tables it knew.
    old = sqlite3.connect(":memory:")
    old.executescript(FIRST_RELEASE_SCHEMA)
    db = sqlite3.connect(manifest_path(dest))
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    assert columns(db) == columns(old)


def test_list_and_a_dry_run_read_a_first_release_mirror_and_delete_takes_only_what_it_should(
    dest: Path,
) -> None:
    with ServerThread(job_catalog(checkpoints=3)) as server:
        first_release_mirror(dest, server)
        own = dest / JOB / "checkpoint-10" / "0" / "notes.txt"
        own.write_text("mine\n")
        listed = run_cli(*job_args(server, "list", "--dest", dest, "--json"))
        dry = run_cli(*sync_args(server, dest, "--dry-run", "--json"))
        server.call(lambda: server.catalog.jobs[0].checkpoints.pop(0))
        deleted = run_cli(*sync_args(server, dest, "--delete", "--json"))
        kept = server.files()

    assert listed.code == dry.code == 0, listed.stderr + dry.stderr
    local = {r["checkpoint"]: r["local"] for r in json.loads(listed.stdout)["checkpoints"]}
    assert local == {
        "checkpoint-10": "mirrored",
        "checkpoint-20": "partial",
        "checkpoint-30": "absent",
    }
    assert json.loads(dry.stdout)["files"]["skipped"] == len(kept) // 2
    assert deleted.code == 0, deleted.stderr
    assert json.loads(deleted.stdout)["files"]["deleted"] == len(kept) // 2
    left = (dest / JOB / "checkpoint-10").rglob("*")
    assert [p.relative_to(dest) for p in left if p.is_file()] == [own.relative_to(dest)]
    assert own.read_text() == "mine\n"
    for file in kept:
        assert_exact(mirrored(dest, JOB, file), file)
