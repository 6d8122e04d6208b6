"""SQLite files of the embedded store, used from trio.

Both sqlite:// services (directories, path infos) keep one key-value table,
`(digest BLOB PRIMARY KEY, data BLOB)`; `SqliteTable` is that table, and the
single home of opening and creating the file, its pragmas, and running
queries in worker threads with the backend timeout.

Concurrency: several processes (the workers, the rootcache, an import) open
the same file. WAL mode lets readers proceed while one writer commits, and
`busy_timeout` makes a writer wait for another instead of failing at once.
Within a process every query runs in a worker thread on a connection taken
from a small pool, so concurrent FUSE requests read in parallel rather than
queueing on one connection. The exception is the hot path, `get`: it first
reads inline, on a connection that never waits (see `SqliteTable.get`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

import trio

from tvix_mountd.castore.blocking import run_blocking
from tvix_mountd.castore.errors import BackendUnavailable, IntegrityError, StoreError
from tvix_mountd.castore.localfs import make_dirs

T = TypeVar("T")

# Enough idle connections for a burst of parallel requests; more than this
# are closed when returned rather than kept open.
_MAX_IDLE = 16
# A new connection's set-up (WAL, the schema) takes the database's exclusive
# lock while the file is new, and two connections doing it at once may
# deadlock: SQLite then answers one "database is locked" at once, without
# waiting (busy_timeout does not cover it). So within a process one
# connection is set up at a time, and another process's is waited out,
# retrying this often until the pool's timeout.
_SETUP_LOCK = threading.Lock()
_SETUP_RETRY = 0.005
# The page cache of each connection that only reads a table (the loop
# thread's, and those reading ahead): the file system caches the file
# anyway, and SQLite's default (2 MiB a connection, filled by a walk) is
# memory a worker keeps, ~2 MB of its RSS after a walk of 100k files for no
# time saved (RESULTS.md, fourteenth session). A table's B-tree above its
# leaves fits. Writers keep the default: a transaction larger than its
# cache spills to the WAL before it commits.
_READ_CACHE_KIB = 128
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
# A database keyed by digests is read at random: on a cold page cache each
# lookup is a disk read or more of its own. A file up to this size is asked
# of the disk as a whole instead when lookups start (the pack index, where a
# cold `cat` makes one lookup per file); a larger one is left to its
# lookups, since reading it all would take longer than they do and push out
# what others cache.
WHOLE_FILE_MAX: Final = 64 << 20
# ... and asked again at most this often while lookups go on (a no-op for
# pages still cached, and so cheap): what memory pressure dropped comes back.
WHOLE_FILE_INTERVAL: Final = 1.0


class WholeFileReadAhead:
    """Has the kernel read a small database file into its page cache, in
    the background (posix_fadvise WILLNEED), at most once an interval."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last = -WHOLE_FILE_INTERVAL  # monotonic time of the last one

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last < WHOLE_FILE_INTERVAL:
            return
        self._last = now
        # A file missing or unreadable: the lookup itself will say so.
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size <= WHOLE_FILE_MAX:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


class ConnectionPool:
    """Connections to one database file, each used by one thread at a time.

    Connections are opened with check_same_thread=False because trio's worker
    threads come and go: a connection outlives the thread that opened it, but
    the pool hands it to one thread at a time, which is all SQLite needs.
    """

    def __init__(
        self, path: str, schema: str, timeout: float, cache_kib: int | None = None
    ) -> None:
        """`cache_kib`: each connection's page cache (SQLite's default, 2 MiB,
        if None)."""
        self._path = path
        self._schema = schema
        self._timeout = timeout
        self._cache_kib = cache_kib
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._schema_ready = False
        self._closed = False

    def _open(self) -> sqlite3.Connection:
        try:
            make_dirs(os.path.dirname(self._path), 0o700)
        except OSError as e:
            raise StoreError(
                f"sqlite database {self._path}: cannot create its directory: {e}"
            ) from e
        try:
            conn = sqlite3.connect(
                self._path,
                # Wait for another writer's lock, but give up a little before
                # the caller's deadline: a write still waiting when run_blocking
                # abandons its thread would otherwise land after its caller was
                # told it failed.
                timeout=self._timeout * 0.8,
                isolation_level=None,  # autocommit; writes BEGIN explicitly
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"sqlite database {self._path}: cannot open: {e}") from e
        deadline = time.monotonic() + self._timeout * 0.8
        try:
            while True:
                try:
                    with _SETUP_LOCK:
                        self._set_up(conn)
                    return conn
                except sqlite3.Error as e:
                    if not (_is_busy(e) and time.monotonic() < deadline):
                        raise _store_error(self._path, "setting up a connection", e) from e
                time.sleep(_SETUP_RETRY)
        except BaseException:
            conn.close()
            raise

    def _set_up(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns. With NORMAL a power
        # loss may drop the last commits of one file but not the other's
        # (a path info surviving the directories it points to).
        conn.execute("PRAGMA synchronous=FULL")
        if self._cache_kib is not None:
            conn.execute(f"PRAGMA cache_size=-{int(self._cache_kib)}")
        if not self._schema_ready:
            conn.execute(self._schema)
            self._schema_ready = True

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreError(f"sqlite database {self._path} is closed")
            if self._idle:
                return self._idle.pop()
        return self._open()

    def release(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # Only after an error: never hand out a connection mid-transaction.
            try:
                conn.rollback()
            except sqlite3.Error:
                conn.close()
                return
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def power_of_two_pieces(items: Sequence[T], cap: int) -> Iterator[Sequence[T]]:
    """`items` in consecutive pieces of power-of-two lengths, at most `cap`
    (a power of two) each, for statements of many rows.

    Each distinct statement text is compiled and kept in the connection's
    statement cache (Python's sqlite3 keeps 128), and one of hundreds of
    rows takes tens of KiB there: pieces of any length grew a pack-writing
    process by ~10 MB. Powers of two keep a connection at a few shapes."""
    start = 0
    while start < len(items):
        size = min(cap, 1 << ((len(items) - start).bit_length() - 1))
        yield items[start : start + size]
        start += size


def in_list(keys: Sequence[object]) -> tuple[str, list[object]]:
    """The placeholders of `IN (...)` for `keys` (at least one) and their
    parameters, padded to a power of two by repeating the last key (an IN
    list takes no notice): a statement a length, as in `power_of_two_pieces`,
    without splitting a lookup into several."""
    params = list(keys)
    params += params[-1:] * ((1 << (len(params) - 1).bit_length()) - len(params))
    return ",".join("?" * len(params)), params


def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _store_error(path: str, what: str, e: sqlite3.Error) -> StoreError:
    if _is_busy(e):
        return BackendUnavailable(f"sqlite database {path}: {what}: {e}")
    return StoreError(f"sqlite database {path}: {what}: {e}")


def _blob(value: object, path: str, what: str) -> bytes:
    """A column that must hold a BLOB; anything else is a damaged row."""
    if not isinstance(value, bytes):
        raise IntegrityError(
            f"sqlite database {path}: {what}: expected a blob, found {type(value).__name__}"
        )
    return value


class SqliteTable:
    """The `(digest BLOB PRIMARY KEY, data BLOB)` table `name` in the file `path`.

    Nothing is opened on construction: the file (and its parent directories,
    0700) is created on the first query, so a bad location fails there with
    a StoreError naming it.
    """

    def __init__(self, path: str, name: str, *, timeout: float) -> None:
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"invalid table name {name!r}")
        self.path = path
        self._name = name
        self._timeout = timeout
        schema = (
            f"CREATE TABLE IF NOT EXISTS {name}"
            " (digest BLOB PRIMARY KEY NOT NULL, data BLOB NOT NULL) WITHOUT ROWID"
        )
        self._pool = ConnectionPool(path, schema, timeout)
        self._ahead_pool = ConnectionPool(path, schema, timeout, _READ_CACHE_KIB)
        self._get_sql = f"SELECT data FROM {name} WHERE digest = ?"
        self._inline: sqlite3.Connection | None = None
        self._inline_thread: int | None = None
        self._inline_ready = False
        self._inline_failed = False

    def _with_connection(
        self, fn: Callable[[sqlite3.Connection], T], what: str, pool: ConnectionPool
    ) -> T:
        try:
            conn = pool.acquire()
            try:
                return fn(conn)
            finally:
                pool.release(conn)
        except sqlite3.Error as e:
            raise _store_error(self.path, what, e) from e

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, *, ahead: bool = False
    ) -> T:
        return await run_blocking(
            self._with_connection,
            fn,
            what,
            self._ahead_pool if ahead else self._pool,
            timeout=self._timeout,
            what=f"sqlite database {self.path}: {what}",
        )

    async def get(self, key: bytes) -> bytes | None:
        """The data stored under `key`, or None.

        Read inline first, on a connection of the event loop's thread: in WAL
        mode a reader does not wait for writers, so this is a ~20 us query
        where a round trip through a worker thread costs ~500 us (a cold
        directory walk makes one per directory). A page not yet cached blocks
        the loop for one disk read, the price FileBlobReader pays too. Should
        SQLite have to wait after all (a lock held through WAL recovery), the
        inline connection, whose busy timeout is 0, fails at once and the read
        goes through a worker thread with the deadline, like every other query.
        """
        sql = self._get_sql
        params = (bytes(key),)

        def query(conn: sqlite3.Connection) -> object:
            # fetchall, not fetchone: stepping to the end ends the read
            # transaction, so later inline reads see what other processes wrote.
            rows = conn.execute(sql, params).fetchall()
            return rows[0][0] if rows else None

        value: object = None
        inline = self._inline_connection()
        if inline is not None:
            try:
                value = query(inline)
            except sqlite3.Error as e:
                if not _is_busy(e):
                    raise _store_error(self.path, self._row_what(key), e) from e
                inline = None  # busy: through a worker thread instead
        if inline is None:
            value = await self._run(query, self._row_what(key))
            # The threaded query created the file and its table if they were
            # missing; from now on reads may go inline.
            self._inline_ready = True
        if value is None or type(value) is bytes:
            return value
        return _blob(value, self.path, self._row_what(key))

    async def get_many(
        self, keys: Sequence[bytes], convert: Callable[[bytes, bytes], T]
    ) -> dict[bytes, T]:
        """`convert(key, data)` of the rows stored under those of `keys` that
        are there, by key: one query, and the conversion in the same worker
        thread (for reading ahead: the loop's thread is not kept waiting)."""
        wanted = [bytes(key) for key in keys]
        if not wanted:
            return {}
        marks, params = in_list(wanted)
        sql = f"SELECT digest, data FROM {self._name} WHERE digest IN ({marks})"
        what = f"reading {len(wanted)} {self._name} rows"

        def query(conn: sqlite3.Connection) -> dict[bytes, T]:
            found: dict[bytes, T] = {}
            for key, data in conn.execute(sql, params).fetchall():
                key = _blob(key, self.path, what)
                found[key] = convert(key, _blob(data, self.path, what))
            return found

        return await self._run(query, what, ahead=True)

    def _row_what(self, key: bytes) -> str:
        # Formatted only when needed: the hot path would pay a hex encode.
        return f"reading {self._name} row {key.hex()}"

    def _inline_connection(self) -> sqlite3.Connection | None:
        """The non-waiting read connection, opened by the first caller after a
        threaded query succeeded. None in other threads (a connection belongs
        to one) and if it cannot be opened: then reads go through threads."""
        if not self._inline_ready or self._inline_failed:
            return None
        if self._inline is None:
            try:
                conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                conn.execute("PRAGMA query_only = 1")
                conn.execute(f"PRAGMA cache_size=-{_READ_CACHE_KIB}")
            except sqlite3.Error:
                self._inline_failed = True
                return None
            self._inline = conn
            self._inline_thread = threading.get_ident()
        return self._inline if threading.get_ident() == self._inline_thread else None

    async def put(self, rows: Sequence[tuple[bytes, bytes]], *, replace: bool) -> None:
        """Store all `rows` in one transaction; `replace` decides who wins on a
        key that exists already (the new row, or the old one)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        params = [(bytes(key), bytes(data)) for key, data in rows]

        def write(conn: sqlite3.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so waiting for another
            # writer happens in the busy handler rather than failing mid-way.
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(f"{verb} INTO {self._name} (digest, data) VALUES (?, ?)", params)
            conn.execute("COMMIT")

        await self._run(write, f"writing {len(params)} {self._name} rows")

    async def page(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` rows with keys after `after` (None: from the start), by key."""
        what = f"listing {self._name}"

        def query(conn: sqlite3.Connection) -> list[tuple[object, object]]:
            if after is None:
                cursor = conn.execute(
                    f"SELECT digest, data FROM {self._name} ORDER BY digest LIMIT ?", (limit,)
                )
            else:
                cursor = conn.execute(
                    f"SELECT digest, data FROM {self._name} WHERE digest > ?"
                    " ORDER BY digest LIMIT ?",
                    (bytes(after), limit),
                )
            return cursor.fetchall()

        rows = await self._run(query, what)
        return [(_blob(k, self.path, what), _blob(v, self.path, what)) for k, v in rows]

    async def aclose(self) -> None:
        inline, self._inline = self._inline, None
        self._inline_ready = False
        if inline is not None:
            with contextlib.suppress(sqlite3.ProgrammingError):  # another thread's
                inline.close()
        # Closing the last connection checkpoints the WAL: file I/O, so in a
        # thread (without the timeout: it must finish to leave a clean file).
        await trio.to_thread.run_sync(self._ahead_pool.close)
        await trio.to_thread.run_sync(self._pool.close)
