"""sqlite:// path infos: encoded PathInfos keyed by their store path digest."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos import PathInfoService, check_answer
from tvix_mountd.castore.sqlite_db import SqliteTable

# Rows per query of a listing: large enough that a listing is a few queries,
# small enough that one never holds much in memory.
LIST_PAGE_SIZE = 1000


class SqlitePathInfoService(PathInfoService):
    def __init__(self, path: str, *, timeout: float) -> None:
        self._table = SqliteTable(path, "pathinfos", timeout=timeout)

    @property
    def path(self) -> str:
        return self._table.path

    def _decode(self, digest: bytes, data: bytes) -> PathInfo:
        """A row, checked: it decodes, validates, and is about its key's store path."""
        try:
            info = PathInfo.decode(data)
        except ValidationError as e:
            raise IntegrityError(
                f"sqlite database {self.path}: path info row {digest.hex()}: {e}"
            ) from e
        checked = check_answer(digest, info)
        assert checked is not None
        return checked

    async def get(self, digest: bytes) -> PathInfo | None:
        data = await self._table.get(digest)
        return None if data is None else self._decode(digest, data)

    async def put(self, info: PathInfo) -> PathInfo:
        await self._table.put([(info.store_path.digest, info.encode())], replace=True)
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        # Keyset pagination: each page starts after the last key seen, so rows
        # added during a listing neither shift nor repeat what comes next.
        after: bytes | None = None
        while True:
            rows = await self._table.page(after, LIST_PAGE_SIZE)
            for digest, data in rows:
                yield self._decode(digest, data)
            if len(rows) < LIST_PAGE_SIZE:
                return
            after = rows[-1][0]

    async def aclose(self) -> None:
        await self._table.aclose()
