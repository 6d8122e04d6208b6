"""Small blobs of a raw+file store, packed: many blobs back to back in one file.

A small blob kept as a file of its own costs a cold read a path walk and an
inode read in the file system, and an import a file creation. Packed in the
order they were stored (an import's or a NAR's order, which is the order
readers of a tree meet them), a cold read of many is one file read mostly
in sequence, and storing them is an append. Measured before this was built
(benchmarks/RESULTS.md, what-if `packsmall`): a cold `cat` of 100k small
files -25%, a copy-read -40%, a program's cold start-up -14%.

Layout under the store's root:

    packs/<random>.pack    blobs back to back
    packs/index.sqlite     digest -> (pack, offset, size)

Only blobs of at most MAX_PACKED bytes stored in batches (`put_batch`: an
import, a NAR ingest) are packed; every other blob is a file under b3/, and
a store written before packs existed reads as before. A digest is looked up
in the index first, then as a file.

Durability as for files (localdir.py): a batch is appended and indexed at
once, and made durable by the store's `sync` (one syncfs, which covers the
packs and the index). After an OS crash an index row may name bytes its
pack lost; `has` says no for a row its pack is too short for, so the blob is
stored again (a new row replaces the old), and every read checks the digest.

Concurrency: a process appends only to packs it created (random names),
one batch at a time; readers in other processes see a batch once its rows
are committed, after its bytes were written. Two processes storing one blob
both append it; either row is right.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.localfs import make_dirs
from tvix_mountd.castore.sqlite_db import (
    ConnectionPool,
    WholeFileReadAhead,
    in_list,
    power_of_two_pieces,
)

# Blobs this small are packed (the read-ahead's whole-file size, so a packed
# file is one pread).
MAX_PACKED: Final = 64 << 10
# A pack this large takes no more appends: the next batch starts another.
PACK_LIMIT: Final = 1 << 30
PACK_SUFFIX: Final = ".pack"
# Seconds a write of the index waits for another process's.
INDEX_TIMEOUT: Final = 10.0
# Each index connection's page cache: a lookup touches a few pages, and
# the file system caches the index anyway; SQLite's 2 MiB a connection, for
# the read-ahead's threads and the loop's, cost a worker 10 MB.
INDEX_CACHE_KIB: Final = 64
# Places of blobs found recently: a file read ahead (read_small, in a
# thread) is often opened right after (its READ came first), and its place
# is then not asked of SQLite again. Only what was found is remembered: a
# blob packed by another process later is found the next time it is asked.
PLACES: Final = 256
# Index rows written per INSERT statement at most (4 parameters each;
# SQLite allows 32,766 parameters a statement since 3.32, 999 before).
_ROWS_PER_INSERT: Final = 128
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS packed ("
    " digest BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,"
    " size INTEGER NOT NULL) WITHOUT ROWID"
)


def _whole(place: tuple[int, int, int], size: int | None) -> bool:
    """Whether a blob's place in its pack holds it whole (of `size` bytes, if
    given): a pack cut short (a crash before its data reached the disk)
    does not."""
    fd, offset, packed_size = place
    if size is not None and packed_size != size:
        return False
    return offset + packed_size <= os.fstat(fd).st_size


class PackedBlobs:
    """The packs of one store root: lookups from any thread, appends from
    the store's writer threads."""

    def __init__(self, root: str) -> None:
        self._dir = os.path.join(root, "packs")
        self._index_path = os.path.join(self._dir, "index.sqlite")
        self._index = ConnectionPool(self._index_path, _SCHEMA, INDEX_TIMEOUT, INDEX_CACHE_KIB)
        self._places: OrderedDict[bytes, tuple[int, int, int]] = OrderedDict()
        self._indexed = False  # whether the index exists (looking creates nothing)
        # Digests are random keys: lookups touch the index's pages at random.
        self._read_index_ahead = WholeFileReadAhead(self._index_path)
        # Lookups share one connection, one at a time (each is a few
        # microseconds): a connection per thread cost ~0.4 MB each.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._fds: dict[str, int] = {}  # pack name -> descriptor for reading
        self._lock = threading.Lock()  # the descriptors
        self._append_lock = threading.Lock()
        self._pack: tuple[str, int] | None = None  # (name, fd) being appended to

    def _query(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        self._read_index_ahead()
        with self._reader_lock:
            try:
                if self._reader is None:
                    self._reader = self._index.acquire()
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"pack index {self._index_path}: {e}") from e

    def find(self, digest: B3Digest) -> tuple[int, int, int] | None:
        """(descriptor of its pack, offset, size) of a packed blob."""
        with self._lock:
            place = self._places.get(digest)
        if place is not None:
            return place
        return self.find_many([digest]).get(digest)

    def find_many(self, digests: Sequence[B3Digest]) -> dict[bytes, tuple[int, int, int]]:
        """Look up those of `digests` not at hand in one query, and keep
        their places at hand for `find`; the places found by the query."""
        found: dict[bytes, tuple[int, int, int]] = {}
        with self._lock:
            wanted = [d for d in digests if d not in self._places]
        if not wanted or not self._index_exists():
            return found
        marks, params = in_list(wanted)
        rows = self._query(
            f"SELECT digest, pack, offset, size FROM packed WHERE digest IN ({marks})", params
        )
        for digest, pack, offset, size in rows:
            if not (
                isinstance(digest, bytes)
                and isinstance(pack, str)
                and isinstance(offset, int)
                and isinstance(size, int)
            ):
                raise StoreError(f"pack index {self._index_path}: a damaged row for {digest!r}")
            place = found[digest] = (self._pack_fd(pack), offset, size)
            with self._lock:
                self._places[digest] = place
                if len(self._places) > PLACES:
                    self._places.popitem(last=False)
        return found

    def _index_exists(self) -> bool:
        """Whether anything was ever packed here (looking creates nothing)."""
        if not self._indexed:
            self._indexed = os.path.exists(self._index_path)
        return self._indexed

    def _pack_fd(self, pack: str) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                if os.sep in pack or not pack.endswith(PACK_SUFFIX):
                    raise StoreError(f"pack index {self._index_path} names pack {pack!r}")
                path = os.path.join(self._dir, pack)
                try:
                    fd = self._fds[pack] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise StoreError(f"opening pack {path}: {e}") from e
            return fd

    def has(self, digest: B3Digest, size: int | None = None) -> bool:
        """Whether the blob is packed whole (and is `size` bytes, if given)."""
        place = self.find(digest)
        return place is not None and _whole(place, size)

    def packed_whole(self, sized: Sequence[tuple[B3Digest, int]]) -> set[bytes]:
        """Those of the (digest, size) pairs packed whole at that size: `has`
        for a batch, in one query of the index (a store's dedup check)."""
        with self._lock:
            places: dict[bytes, tuple[int, int, int]] = {
                d: place for d, _ in sized if (place := self._places.get(d))
            }
        places.update(self.find_many([digest for digest, _ in sized]))
        return {d for d, size in sized if (place := places.get(d)) and _whole(place, size)}

    def read(self, digest: B3Digest) -> bytes | None:
        """A packed blob's bytes as stored (unchecked), or None if not packed."""
        place = self.find(digest)
        if place is None:
            return None
        fd, offset, size = place
        try:
            return os.pread(fd, size, offset)
        except OSError as e:
            raise StoreError(f"reading blob {digest} from its pack: {e}") from e

    def append(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Pack `blobs` (each at most MAX_PACKED bytes), in their order."""
        if not blobs:
            return
        with self._append_lock:
            name, fd = self._writable_pack()
            # Where this process's appends land (O_APPEND, only it writes
            # here): the pack's size now, whatever happened to it before.
            offset = os.fstat(fd).st_size
            rows = []
            for digest, data in blobs:
                rows.append((digest, name, offset, len(data)))
                offset += len(data)
            data = b"".join(data for _, data in blobs)
            try:
                written = os.write(fd, data)
                while written < len(data):
                    written += os.write(fd, memoryview(data)[written:])
            except OSError as e:
                raise StoreError(f"appending to pack {name} in {self._dir}: {e}") from e
            db = self._index.acquire()
            try:
                db.execute("BEGIN IMMEDIATE")
                # A statement of many rows, not executemany's one a row:
                # each statement lets go of the GIL and takes it back, and
                # while the loop's thread runs Python that take waits.
                for chunk in power_of_two_pieces(rows, _ROWS_PER_INSERT):
                    db.execute(
                        "INSERT OR REPLACE INTO packed (digest, pack, offset, size) VALUES "
                        + ",".join(["(?, ?, ?, ?)"] * len(chunk)),
                        [field for row in chunk for field in row],
                    )
                db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"pack index {self._index_path}: {e}") from e
            finally:
                self._index.release(db)  # rolls back what did not commit
            self.forget([digest for digest, _ in blobs])

    def forget(self, digests: Sequence[B3Digest]) -> None:
        """Ask the index again for these next time (stored anew, or found damaged)."""
        with self._lock:
            for digest in digests:
                self._places.pop(digest, None)

    def _writable_pack(self) -> tuple[str, int]:
        if self._pack is not None:
            if os.fstat(self._pack[1]).st_size < PACK_LIMIT:
                return self._pack
            os.close(self._pack[1])
        make_dirs(self._dir, 0o755)
        name = secrets.token_hex(16) + PACK_SUFFIX
        path = os.path.join(self._dir, name)
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
        except OSError as e:
            raise StoreError(f"creating pack {path}: {e}") from e
        self._pack = (name, fd)
        return self._pack

    def prefetch(self, digest: B3Digest) -> bool:
        """Have the kernel read a packed blob ahead; False if it is not packed."""
        place = self.find(digest)
        if place is None:
            return False
        fd, offset, size = place
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        return True

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._index.release(self._reader)
                self._reader = None
        self._index.close()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._pack is not None:
            os.close(self._pack[1])
            self._pack = None
