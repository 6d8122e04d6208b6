"""sqlite:// directories: canonical Directory encodings keyed by digest.

Rows hold exactly the bytes the digest covers, so every read is checked by
hashing the row (`Directory.decode(data, expected=digest)`): a damaged or
undecodable row is an IntegrityError for that one directory, never a crash.

A tree uploaded in pieces (`open_tree_upload`) is written in transactions of
about FLUSH_BYTES as it comes, so an import keeps no more of it in memory
than that (and each Directory's digest and size, for the closure check).
Rows of an upload that never finished stay behind unreferenced: harmless,
and reused by the next upload of the same tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import ClosureChecker, DirectoryService, TreeUpload
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.castore.nodes import Directory
from tvix_mountd.castore.sqlite_db import SqliteTable

# Encoded Directories written per transaction by a tree upload.
FLUSH_BYTES: Final = 4 << 20


class SqliteDirectoryService(DirectoryService):
    def __init__(self, path: str, *, timeout: float) -> None:
        self._table = SqliteTable(path, "directories", timeout=timeout)

    @property
    def path(self) -> str:
        return self._table.path

    async def get(self, digest: B3Digest) -> Directory | None:
        data = await self._table.get(digest)
        if data is None:
            return None
        return self._decode(digest, data)

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """One query, decoded and checked in its worker thread."""
        rows = await self._table.get_many(digests, self._decode)
        return {B3Digest(digest): directory for digest, directory in rows.items()}

    def _decode(self, key: bytes, data: bytes) -> Directory:
        # Keys are the digests asked for (rows are found by them).
        digest = key if isinstance(key, B3Digest) else B3Digest(key)
        try:
            return Directory.decode(data, expected=digest)
        except ValidationError as e:
            # Whatever is wrong with a stored row, the store holds bad data.
            raise IntegrityError(f"sqlite database {self.path}: directory row {digest}: {e}") from e

    async def put(self, directory: Directory) -> B3Digest:
        await self._table.put([(directory.digest, directory.encode())], replace=False)
        return directory.digest

    async def put_tree(self, directories: Iterable[Directory]) -> B3Digest:
        """Validate the whole upload first, then store it in one transaction, so
        a tree is either there completely or not at all."""
        checker = ClosureChecker()
        for directory in directories:
            checker.add(directory)
        root = checker.root()
        await self._table.put([(d.digest, d.encode()) for d in checker.ordered], replace=False)
        return root

    def open_tree_upload(self) -> TreeUpload:
        return _SqliteTreeUpload(self, self._table)

    async def aclose(self) -> None:
        await self._table.aclose()


class _SqliteTreeUpload(TreeUpload):
    """Checks each piece as it comes and writes it within FLUSH_BYTES."""

    def __init__(self, service: SqliteDirectoryService, table: SqliteTable) -> None:
        super().__init__(service)
        self._table = table
        self._checker = ClosureChecker(keep=False)
        self._rows: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0

    async def add(self, directories: Sequence[Directory]) -> None:
        for directory in directories:
            if self._checker.add(directory):
                data = directory.encode()
                self._rows.append((directory.digest, data))
                self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self._pending_bytes = 0
        if rows:
            await self._table.put(rows, replace=False)

    async def finish(self) -> B3Digest:
        root = self._checker.last()
        await self._flush()
        return root
