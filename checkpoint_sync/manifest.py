"""The local manifest: an embedded SQLite database under ``DEST/.checkpoint-sync/``.

It records every verified file (source, run, checkpoint, rank, size, last_modified, digest, when)
and, of transfers still under way, the parts finished and how far the others got. Writes go into
an open transaction that is committed in batches (`maybe_commit`, `commit`): a crash loses at
most the last batch, which only means some work is done again. A file is recorded only after it
was verified and published, so the manifest never claims a file that is not there.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import quote

from .errors import LocalIOError
from .filesystem import make_directories
from .plan import Recorded, Staged
from .progress import human_bytes

SCHEMA_VERSION = 1
# Left free on the destination, so that when the data has filled the disk the manifest can still
# record what was done (its WAL grows by up to ~4 MiB between checkpoints).
SPACE_RESERVE = 4 << 20
_SCHEMA = """
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
"""
# The object's strong ETag as the answers for a file's recorded parts gave it: a later run must
# not add the parts of another version (replaced while the listing did not change). Made in
# place, not by a new schema version: earlier versions still open the manifest, and their
# deleting a file's staging record drops its ETag too.
_ETAGS = """
CREATE TABLE IF NOT EXISTS staging_etags (
    path TEXT PRIMARY KEY REFERENCES staging (path) ON DELETE CASCADE,
    etag TEXT NOT NULL
)
"""
# How far an unfinished part got, recorded every second while it is in flight and when it
# stops (a stop, a network that kept failing): the next run asks only for the rest. Made in
# place too, as `_ETAGS`.
_REACHED = """
CREATE TABLE IF NOT EXISTS parts_reached (
    path TEXT NOT NULL REFERENCES staging (path) ON DELETE CASCADE,
    part INTEGER NOT NULL,
    reached INTEGER NOT NULL,
    PRIMARY KEY (path, part)
)
"""

# The tables and indexes a manifest makes, read from the statements that make them. One without a
# schema version may hold some of them: earlier releases made them one by one, and a run killed
# meanwhile left those it had made.
OUR_NAMES = frozenset(
    re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA + _ETAGS + _REACHED)
)
# The tables every manifest at `SCHEMA_VERSION` holds: they are made with it, in one transaction.
SCHEMA_TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


def foreign_names(names: Iterable[str]) -> list[str]:
    """Of the names in a database's schema, those no manifest makes (SQLite's own, ``sqlite_``,
    are not another program's)."""
    return sorted(
        name for name in names if name not in OUR_NAMES and not name.startswith("sqlite_")
    )


@dataclass(frozen=True)
class VerifiedFile:
    path: str
    source: str
    run: str
    checkpoint: str
    node_rank: int
    size: int
    last_modified: str
    digest: str


class Manifest:
    """One open manifest; used from the event loop thread only (each call is microseconds)."""

    def __init__(
        self,
        db_path: Path,
        *,
        durable: bool = False,
        read_only: bool = False,
        batch_seconds: float = 1.0,
    ) -> None:
        """Open (creating) the manifest; ``read_only`` touches nothing on disk (dry runs)."""
        self.path = db_path
        self._read_only = read_only
        self._batch_seconds = batch_seconds
        self._last_commit = time.monotonic()
        # For a reader that reads the manifest without a -shm (`_attach`): the file as it was
        # then, and the paths listed since the last commit (`catch_up`).
        self._read_as: _FileState | None = None
        self._uncommitted: list[tuple[str, int | None]] = []
        db: sqlite3.Connection | None = None
        try:
            _refuse_a_dangling_symlink(db_path)
            if read_only:
                # Its own database in memory, which holds the temporary table of paths listed,
                # with the manifest attached (unqualified names resolve to its tables): the
                # manifest can then be attached again, through the WAL, once a sync writes it.
                db = self._db = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
                self._attach()
            else:
                make_directories(db_path.parent)
                _create(db_path)
                db = self._db = sqlite3.connect(db_path, isolation_level=None)
            self._db.execute("PRAGMA foreign_keys=ON")
            if not read_only:
                # Before WAL mode is set: that is a write too, which another program's database
                # must not get.
                self._migrate()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._db.execute(_ETAGS)
                self._db.execute(_REACHED)
            # Most mirrors have no file in parts: then recording a file need not clear its parts.
            self._any_staging = (
                self._db.execute("SELECT 1 FROM staging LIMIT 1").fetchone() is not None
            )
            self._db.execute("CREATE TEMP TABLE listed (path TEXT PRIMARY KEY, version INTEGER)")
            self._db.execute("BEGIN")
        except BaseException as exc:
            if db is not None:
                db.close()  # now: a file left open keeps its filesystem busy
            if isinstance(exc, sqlite3.DatabaseError | OSError):
                raise _unusable(db_path, exc, read_only=read_only) from exc
            raise

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        _refuse_foreign(self._db, self.path, version)
        if version < SCHEMA_VERSION:
            # In one transaction: a script that fails still (a table by our index's name)
            # leaves nothing behind.
            self._db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )

    def _attach(self) -> None:
        """Attach the manifest to be read, leaving the mirror as it was (dry runs, `list`).

        With no WAL file beside it, no writer has it open, and it is attached immutable: nothing
        is created next to it (a WAL reader would add -wal and -shm files), and a mirror on a
        read-only mount can be read at all; `catch_up` follows a sync that writes it since. With
        a WAL but no -shm (a mirror copied without it, or a snapshot), no writer has it open
        either: it is read through its WAL, whose commits immutable would leave out, with the
        WAL's index in memory, not in a -shm file (which a read-only mount refuses), and
        followed alike. With both, even an empty WAL (a sync that just opened the manifest has
        one until it commits), it is read through the WAL as a sync's other readers are, as of
        the first read, a view that what the sync writes meanwhile leaves whole. Only where a
        WAL reader cannot attach it (on a full disk its index cannot grow: a run that could not
        open the manifest there left an empty WAL) is an empty WAL, which holds no commit,
        passed over. A manifest not there, or with no schema yet (a run was killed while it
        created it), records nothing: an empty one is made in memory, as creating the schema
        would fail in the read-only file.
        """
        found = _file_state(self.path)
        self._read_as = None
        if found.database is None:
            self._migrate()
            return
        how: _Reading = (
            "immutable" if found.wal_size is None else "shared" if found.shm else "private"
        )
        try:
            version = self._attached(how)
        except sqlite3.OperationalError:
            if found.wal_size != 0:
                raise
            how = "immutable"
            version = self._attached(how)
        _refuse_foreign(self._db, self.path, version, "manifest")
        if version == 0:
            self._db.execute("DETACH DATABASE manifest")
            self._migrate()
            return
        self._read_as = None if how == "shared" else found

    def _attached(self, how: _Reading) -> int:
        """Attach the manifest (`_attach`); its schema version, read: the first read is where a
        WAL reader's index is made."""
        # The locking mode of the databases attached after it. Exclusive, SQLite keeps a WAL's
        # index in memory; the VFS without locks then takes none, as an immutable reader.
        exclusive = how == "private"
        self._db.execute(f"PRAGMA locking_mode={'EXCLUSIVE' if exclusive else 'NORMAL'}")
        mode = {"immutable": "ro&immutable=1", "private": "ro&vfs=unix-none", "shared": "ro"}[how]
        self._db.execute(
            "ATTACH DATABASE ? AS manifest", (f"file:{quote(str(self.path))}?mode={mode}",)
        )
        try:
            (version,) = self._db.execute("PRAGMA manifest.user_version").fetchone()
        except BaseException:
            self._db.execute("DETACH DATABASE manifest")
            raise
        return int(version)

    def catch_up(self) -> None:
        """For a reader of the manifest read without a -shm, once per page of a listing and before
        each query of many rows (SQLite gives no warning: a sync writes its first pages back
        into the database file once its WAL holds 4 MiB, or as it closes, and read immutable
        they would look damaged, or answer wrong). The paths listed so far are committed, and
        a manifest a sync has written since is attached again (`_read_again`)."""
        if self._read_as is None:
            return
        try:
            self._db.execute("COMMIT")
            self._uncommitted.clear()
            if self._changed():
                self._db.execute("DETACH DATABASE manifest")
                self._attach()
            self._db.execute("BEGIN")
        except (sqlite3.DatabaseError, OSError) as exc:
            raise _unusable(self.path, exc, read_only=True) from exc

    def _read_again(self) -> None:
        """Attach again the manifest a sync has written since it was attached without a -shm,
        where SQLite met what looked like damage: it then rolls back, the paths listed since the
        last `catch_up` too, which are listed again."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.execute("DETACH DATABASE manifest")
            self._attach()
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO listed (path, version) VALUES (?, ?)", self._uncommitted
            )
        except (sqlite3.DatabaseError, OSError) as exc:
            raise _unusable(self.path, exc, read_only=True) from exc

    def _changed(self) -> bool:
        """Whether the manifest read without a -shm is no longer the file it was then."""
        try:
            return self._read_as is not None and _file_state(self.path) != self._read_as
        except OSError as exc:
            raise _unusable(self.path, exc, read_only=True) from exc

    # --- reading ---------------------------------------------------------------------------------

    def recorded(self, path: str) -> Recorded | None:
        row = self._row("SELECT size, last_modified FROM files WHERE path = ?", (path,))
        return Recorded(row[0], row[1]) if row else None

    def digest(self, path: str) -> str | None:
        row = self._row("SELECT digest FROM files WHERE path = ?", (path,))
        return row[0] if row else None

    def staged(self, path: str, bytes_on_disk: int | None) -> Staged | None:
        row = self._row(
            "SELECT size, last_modified, part_size, etag FROM staging "
            "LEFT JOIN staging_etags USING (path) WHERE path = ?",
            (path,),
        )
        if row is None:
            return None
        done = frozenset(
            part for (part,) in self._rows("SELECT part FROM parts WHERE path = ?", (path,))
        )
        reached = dict(
            self._rows("SELECT part, reached FROM parts_reached WHERE path = ?", (path,))
        )
        return Staged(row[0], row[1], row[2], done, bytes_on_disk, row[3], reached)

    def files_in(self, run: str, checkpoint: str) -> Iterator[VerifiedFile]:
        """The records of a checkpoint, by path. Its paths all start "<run>/<checkpoint>/" ('/'
        comes just before '0'): walked in the index of paths as a range of it, and not by the
        index of checkpoints (its '+' keeps SQLite from taking that one), whose rows a sort
        would have to hold, a million of them for a large checkpoint."""
        rows = self._rows(
            "SELECT path, source, run, checkpoint, node_rank, size, last_modified, digest "
            "FROM files WHERE +run = ? AND +checkpoint = ? AND path >= ? AND path < ? "
            "ORDER BY path",
            (run, checkpoint, f"{run}/{checkpoint}/", f"{run}/{checkpoint}0"),
        )
        for row in rows:
            yield VerifiedFile(*row)

    def unlisted_in(self, run: str, checkpoint: str) -> Iterator[VerifiedFile]:
        """The records of a checkpoint whose paths this run's listing did not show
        (`first_listing`)."""
        rows = self._rows(
            "SELECT path, source, run, checkpoint, node_rank, size, last_modified, digest "
            "FROM files WHERE run = ? AND checkpoint = ? "
            "AND path NOT IN (SELECT path FROM listed)",
            (run, checkpoint),
        )
        for row in rows:
            yield VerifiedFile(*row)

    def checkpoints_of(self, run: str) -> list[str]:
        """The checkpoint directories of ``run`` that hold recorded files."""
        rows = self._rows("SELECT DISTINCT checkpoint FROM files WHERE run = ?", (run,))
        return [checkpoint for (checkpoint,) in rows]

    def staged_not_listed(self) -> list[str]:
        """Paths of files left in parts that this run's listing did not show."""
        rows = self._rows("SELECT path FROM staging WHERE path NOT IN (SELECT path FROM listed)")
        return [path for (path,) in rows]

    def staged_under(self, prefix: str) -> list[str]:
        """Paths under ``prefix`` of files left in parts."""
        rows = self._rows(
            "SELECT path FROM staging WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
        )
        return [path for (path,) in rows]

    def _rows(self, sql: str, parameters: tuple[object, ...] = ()) -> Iterator[Any]:
        """The rows of a query that may return many (a checkpoint's), from the manifest as it
        is now (`catch_up`: a stat or two per query, not per file)."""
        self.catch_up()
        return self._read(sql, parameters)

    def _row(self, sql: str, parameters: tuple[object, ...]) -> Any:
        """The first row of a query, or None."""
        return next(self._read(sql, parameters), None)

    def _read(self, sql: str, parameters: tuple[object, ...]) -> Iterator[Any]:
        """The rows of a query, as they are read; a manifest damaged where they lie (random
        bytes on a page that opening it did not touch) is an error of ours, not SQLite's. Read
        immutable, what looks damaged may be a sync's writes since: the query is asked again
        of the manifest as it is now, or, with rows already handed on (which may be neither
        the manifest's before nor after), the run is told to start again."""
        while True:
            handed_on = False
            try:
                for row in self._db.execute(sql, parameters):
                    handed_on = True
                    yield row
                return
            except sqlite3.DatabaseError as exc:
                if not self._changed():
                    raise _unusable(self.path, exc, read_only=self._read_only) from exc
                if handed_on:
                    raise LocalIOError(
                        f"manifest {self.path} was written by a sync while it was read; run again"
                    ) from exc
            self._read_again()

    # --- writing (batched) -----------------------------------------------------------------------

    def first_listing(self, path: str, version: int | None = None) -> bool | None:
        """Whether this run sees ``path`` for the first time (a listing may repeat a path); None
        where the listing repeats it as it listed it before, in the same ``version``."""
        # A write too (a temporary table, spilled to a temporary file past the page cache).
        inserted = self._write(
            "INSERT OR IGNORE INTO listed (path, version) VALUES (?, ?)", (path, version)
        )
        if inserted.rowcount == 1:
            if self._read_as is not None:
                self._uncommitted.append((path, version))
            return True
        row = self._row("SELECT version FROM listed WHERE path = ?", (path,))
        return None if version is not None and (version,) == row else False

    def _write(self, sql: str, parameters: tuple[object, ...]) -> sqlite3.Cursor:
        """One write into the open transaction; another program's lock, a full disk or a damaged
        page is ours."""
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.DatabaseError) -> LocalIOError:
        """The error for a failed statement. On a full disk SQLite rolls the open transaction
        back: the next is opened, or the writes after it (a file in flight that lands) would each
        commit alone, and the closing commit would fail with "no transaction is active", in
        place of the error that stopped the run."""
        if not self._db.in_transaction:
            with suppress(sqlite3.DatabaseError):
                self._db.execute("BEGIN")
        return _unusable(self.path, exc, read_only=self._read_only)

    def begin_staging(self, path: str, size: int, last_modified: str, part_size: int) -> None:
        """Start a new record of ``path``'s parts, forgetting the old one now (committed): it
        must be gone before its staging file is reset, or a crash in between leaves it vouching
        for parts that are no longer there."""
        self.stage(path, size, last_modified, part_size)
        self.commit()

    def stage(self, path: str, size: int, last_modified: str, part_size: int) -> None:
        """A new record of ``path``'s parts in place of any old one, with the caller's commit."""
        self._write("DELETE FROM staging WHERE path = ?", (path,))
        self._any_staging = True
        self._write(
            "INSERT INTO staging (path, size, last_modified, part_size) VALUES (?, ?, ?, ?)",
            (path, size, last_modified, part_size),
        )

    def part_done(self, path: str, part: int) -> None:
        self._write("INSERT OR IGNORE INTO parts (path, part) VALUES (?, ?)", (path, part))
        self.maybe_commit()

    def part_reached(self, path: str, part: int, reached: int) -> None:
        """Part ``part`` of ``path`` got as far as ``reached``, its bytes before that written
        (none is kept for a file that has no staging record: its parts were dropped while the
        part was under way)."""
        self._write(
            "INSERT OR REPLACE INTO parts_reached (path, part, reached) "
            "SELECT path, ?, ? FROM staging WHERE path = ?",
            (part, reached, path),
        )

    def staging_etag(self, path: str, etag: str) -> None:
        """The ETag of the object whose parts of ``path`` are being recorded (none is kept for a
        file that has no staging record)."""
        self._write(
            "INSERT OR REPLACE INTO staging_etags (path, etag) "
            "SELECT path, ? FROM staging WHERE path = ?",
            (etag, path),
        )
        self.maybe_commit()

    def drop_staging(self, path: str) -> None:
        self._write("DELETE FROM staging WHERE path = ?", (path,))
        self.maybe_commit()

    def forget(self, path: str) -> None:
        """Drop the record of ``path`` now (committed): its file is about to be replaced."""
        self.drop_record(path)
        self.commit()

    def drop_record(self, path: str) -> None:
        """Drop the record of ``path``, whose file is gone, with the caller's next commit."""
        self._write("DELETE FROM files WHERE path = ?", (path,))

    def record_verified(self, entry: VerifiedFile) -> None:
        """Record a published file and forget its staging progress, in one transaction."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(
            "INSERT OR REPLACE INTO files (path, source, run, checkpoint, node_rank, size, "
            "last_modified, digest, verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.path,
                entry.source,
                entry.run,
                entry.checkpoint,
                entry.node_rank,
                entry.size,
                entry.last_modified,
                entry.digest,
                now,
            ),
        )
        if (
            self._any_staging
            and self._write("DELETE FROM staging WHERE path = ?", (entry.path,)).rowcount
        ):
            self.commit()  # a file fetched in parts is large: a crash must not cost it again
        else:
            self.maybe_commit()

    def maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self._batch_seconds:
            self.commit()

    def commit(self) -> None:
        """Commit the open transaction, and open the next."""
        try:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from exc
        self._last_commit = time.monotonic()

    def close(self) -> None:
        try:
            # A reader has only its temporary table to drop, and SQLite may have ended its
            # transaction already (on what looked like damage).
            if not self._read_only:
                self.commit()
                self._write("COMMIT", ())
        finally:
            self._db.close()


def _create(db_path: Path) -> None:
    """Make a new manifest file 0o666 before the umask, as every file of ours: SQLite would
    make it 0o644 whatever the umask, and its ``-wal`` and ``-shm`` files take the database
    file's mode, so that another member of a group sharing the mirror (umask 002) could not
    write them."""
    with suppress(FileExistsError):
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _refuse_a_dangling_symlink(db_path: Path) -> None:
    """A manifest kept elsewhere through a symlink, whose volume is away, say: read, it would
    be taken for a new one, and written, SQLite would make one where it leads, if it could, and
    every file would be fetched again. One that leads somewhere that cannot be reached (a loop,
    a directory not to be entered) is said so: removing it is not the remedy there."""
    if not os.path.islink(db_path):
        return
    try:
        if _stat(db_path) is not None:
            return
        problem = (
            "which is not there; restore what it leads to, or remove the symlink to start a new "
            "manifest (every file is then fetched again)"
        )
    except OSError as exc:
        problem = f"which cannot be reached: {exc.strerror or exc}"
    raise LocalIOError(
        f"cannot use the manifest {db_path}: it is a symlink to {os.readlink(db_path)}, {problem}"
    )


def _unusable(
    db_path: Path, exc: sqlite3.DatabaseError | OSError, *, read_only: bool = False
) -> LocalIOError:
    if isinstance(exc, OSError):
        # A dry run or `list --dest` creates nothing: a mirror it may not enter is not read.
        doing = "read" if read_only else "create"
        return LocalIOError(f"cannot {doing} {db_path.parent}: {exc.strerror}")
    code = getattr(exc, "sqlite_errorcode", 0)  # extended: its primary code is the low byte
    damaged = code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    # A table or column of ours missing: another program's database is in its place.
    if damaged or str(exc).startswith(("no such table", "no such column")):
        return _cannot_be_used(db_path, str(exc))
    # SQLite says only "unable to open database file" or "disk I/O error" where its file is a
    # directory, or where it cannot make its -wal and -shm files beside it.
    if code & 0xFF in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR):
        if db_path.is_dir():
            return LocalIOError(f"cannot use the manifest {db_path}: it is a directory")
        if not read_only and (refused := _directory_refused(db_path)):
            return refused
    # A full disk, a read-only mount, an I/O error, met writing or reading: the manifest
    # itself is fine.
    return LocalIOError(f"cannot use the manifest {db_path}: {exc}{_space_left(db_path.parent)}")


def _cannot_be_used(db_path: Path, reason: str) -> LocalIOError:
    return LocalIOError(
        f"manifest {db_path} cannot be used ({reason}); move it aside to rebuild it "
        "(every file is then fetched again)"
    )


def _refuse_foreign(
    db: sqlite3.Connection, db_path: Path, version: int, schema: str = "main"
) -> None:
    """Refuse, before anything is written to it, a database of a newer schema (`_newer`), or
    another program's: at a negative schema version, which no release gives a manifest (below
    ours, it would be taken for one to make the schema in); at schema version 0, one that holds
    a table or index no manifest makes, or a table of a manifest's name without its columns (a
    new manifest is an empty file or database, or one a run killed while it made the schema
    left); at ours, one without the tables and columns a manifest is made with. Other tables are
    no sign there: a later release may make one in place, as this one made `_ETAGS` and
    `_REACHED`. The same for `sync`, `--dry-run` and `list --dest`."""
    if version < 0:
        reason = f"another program's database: it has schema version {version}"
        raise _cannot_be_used(db_path, reason)
    names = [name for (name,) in db.execute(f"SELECT name FROM {schema}.sqlite_master")]  # noqa: S608 (ours)
    if version > SCHEMA_VERSION:
        raise _newer(db_path, version, names)
    if version == 0 and (foreign := foreign_names(names)):
        raise _cannot_be_used(db_path, f"another program's database: it holds {', '.join(foreign)}")
    for table, columns in _our_columns().items():
        if table not in names:
            continue
        theirs = _columns(db, table, schema)
        if lacking := [column for column in columns if column not in theirs]:
            raise _cannot_be_used(
                db_path, f"another program's database: its table {table} has no column {lacking[0]}"
            )
    if version == SCHEMA_VERSION and (
        missing := [table for table in SCHEMA_TABLES if table not in names]
    ):
        raise _cannot_be_used(db_path, f"another program's database: it has no table {missing[0]}")


def _newer(db_path: Path, version: int, names: list[str]) -> LocalIOError:
    """The error for a database of a schema version above ours. A newer release's manifest may
    have other tables than ours, yet surely some (its files' records): with one, it is most
    likely that; with none, another program's."""
    if OUR_NAMES.isdisjoint(names):
        held = ", ".join(foreign_names(names)) or "no table"
        return _cannot_be_used(
            db_path, f"another program's database: it holds {held}, at schema version {version}"
        )
    return LocalIOError(
        f"manifest {db_path} has schema version {version}, newer than this checkpoint-sync's "
        f"({SCHEMA_VERSION}): a newer checkpoint-sync made it (or another program did); run that "
        "one, or move it aside to rebuild it (every file is then fetched again)"
    )


@cache
def _our_columns() -> dict[str, list[str]]:
    """The columns of each table a manifest makes, in the order it makes them."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(";".join((_SCHEMA, _ETAGS, _REACHED)))
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {table: _columns(db, table) for (table,) in tables}
    finally:
        db.close()


def _columns(db: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    return [column for (_, column, *_) in db.execute(f"PRAGMA {schema}.table_info({table})")]


def refuse_a_directory_that_refuses_writes(db_path: Path) -> None:
    """`LocalIOError` where the manifest at ``db_path`` could not be opened to be written, its
    directory refusing SQLite's -wal and -shm files: for `--delete`, which opens it so only once
    it deleted (on a full disk, what opening needs is the room it frees), and must not delete in
    a run that then stops."""
    if refused := _directory_refused(db_path):
        raise refused


def _directory_refused(db_path: Path) -> LocalIOError | None:
    if refused := _unwritable(db_path.parent):
        return LocalIOError(
            f"cannot use the manifest {db_path}: {db_path.parent}, where SQLite makes its -wal "
            f"and -shm files, cannot be written: {refused}"
        )
    return None


def _unwritable(directory: Path) -> str | None:
    """Why no file can be made in ``directory``, or None where one can. `os.access` first: a
    directory that takes files gets none of ours; one that does not is asked with a file it
    refuses, for the reason (EPERM: an immutable flag, which as root is all that keeps one out).
    """
    if os.access(directory, os.W_OK):
        return None
    probe = directory / f".checkpoint-sync-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        immutable = " (an immutable directory? see lsattr -d)" if exc.errno == errno.EPERM else ""
        return f"{exc.strerror}{immutable}"
    with suppress(OSError):
        os.unlink(probe)  # access() asks for the real uid, which may not be the effective
    return None


def _space_left(directory: Path) -> str:
    """A note of the space left where it is short of what the manifest is kept: opened on a full
    disk, SQLite says only "disk I/O error" (its WAL index cannot grow)."""
    try:
        info = os.statvfs(directory)
    except OSError:
        return ""
    free = info.f_bavail * info.f_frsize
    if info.f_blocks == 0 or free >= SPACE_RESERVE:
        return ""  # no capacity reported (ramfs), or room enough: the error is another
    return f" ({human_bytes(free)} is free on its disk)"


# How the manifest is attached to be read (`Manifest._attach`).
_Reading = Literal["immutable", "private", "shared"]


class _FileState(NamedTuple):
    """What tells a manifest file changed, without reading it: its identity, size and time of
    change, the size of its WAL (None: none there), and whether a -shm file is there (a writer
    that opens it makes one)."""

    database: tuple[int, int, int, int] | None  # None: not there
    wal_size: int | None
    shm: bool


def _file_state(db_path: Path) -> _FileState:
    found = _stat(db_path)
    wal = _stat(Path(f"{db_path}-wal"))
    return _FileState(
        None if found is None else (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns),
        None if wal is None else wal.st_size,
        _stat(Path(f"{db_path}-shm")) is not None,
    )


def _stat(path: Path) -> os.stat_result | None:
    """``path``'s status, None where there is no such file (`OSError` where it cannot be told)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
