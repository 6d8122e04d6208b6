"""sqlite:// directories: canonical Directory encodings keyed by digest.

Rows hold exactly the bytes the digest covers, so every read is checked by
hashing the row (`Directory.decode(data, expected=digest)`): a damaged or
undecodable row is an IntegrityError for that one directory, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import ClosureChecker, DirectoryService
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.castore.nodes import Directory
from tvix_mountd.castore.sqlite_db import SqliteTable


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

    async def aclose(self) -> None:
        await self._table.aclose()
