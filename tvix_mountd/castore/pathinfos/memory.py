"""memory:// path infos: a dict in this process (tests, single mounts)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos import PathInfoService


class MemoryPathInfoService(PathInfoService):
    def __init__(self) -> None:
        self.infos: dict[bytes, PathInfo] = {}

    async def get(self, digest: bytes) -> PathInfo | None:
        return self.infos.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        self.infos[info.store_path.digest] = info
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        # A snapshot, so puts during a listing do not break the iteration.
        for info in list(self.infos.values()):
            yield info
