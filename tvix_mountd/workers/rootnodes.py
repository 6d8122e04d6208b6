"""RootNodes: what the names in a mount's root are (store path basenames).

The filesystem knows only this interface; behind it is the store's
PathInfoService, a static map (tests), or the shared rootcache service.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping

from tvix_mountd.castore.blocking import past_caller_deadline
from tvix_mountd.castore.errors import ValidationError
from tvix_mountd.castore.nodes import Node
from tvix_mountd.castore.pathinfos import PathInfoService
from tvix_mountd.castore.storepath import StorePath


class RootNodes(ABC):
    @abstractmethod
    async def get_by_basename(self, name: bytes) -> Node | None:
        """The root node named `name`, None if there is none; StoreError on failure."""

    @abstractmethod
    def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        """Every (basename, node), streamed."""


class StaticRootNodes(RootNodes):
    def __init__(self, nodes: Mapping[bytes, Node]) -> None:
        self._nodes = dict(sorted(nodes.items()))

    async def get_by_basename(self, name: bytes) -> Node | None:
        return self._nodes.get(name)

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        for item in list(self._nodes.items()):
            yield item


class PathInfoRootNodes(RootNodes):
    """Root nodes straight from a PathInfoService."""

    def __init__(self, path_infos: PathInfoService) -> None:
        self._path_infos = path_infos

    async def get_by_basename(self, name: bytes) -> Node | None:
        try:
            store_path = StorePath.parse(name)
        except ValidationError:
            return None
        # Same digest, other name: a different path as far as the user is
        # concerned (None).
        if self._path_infos.waits_for_progress:
            # A binary cache may download for longer than the caller's deadline;
            # it fails by itself once the download stalls.
            info = await past_caller_deadline(lambda: self._path_infos.get_store_path(store_path))
        else:
            info = await self._path_infos.get_store_path(store_path)
        return None if info is None else info.node

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        async for info in self._path_infos.list():
            yield info.store_path.basename.encode(), info.node
