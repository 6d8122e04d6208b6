"""PathInfoService: PathInfos by store path digest, chosen by address (`from_addr`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from tvix_mountd.castore.addr import PATH_INFO_SCHEMES, parse_address
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.errors import IntegrityError
from tvix_mountd.castore.pathinfo import PathInfo


class PathInfoService(ABC):
    @abstractmethod
    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo for the store path with this 20-byte digest, or None."""

    @abstractmethod
    async def put(self, info: PathInfo) -> PathInfo: ...

    @abstractmethod
    def list(self) -> AsyncIterator[PathInfo]:
        """Every PathInfo, streamed (never all loaded at once)."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""


def check_answer(digest: bytes, info: PathInfo | None) -> PathInfo | None:
    """A backend's answer to get(digest) must be about that store path."""
    if info is not None and info.store_path.digest != digest:
        raise IntegrityError(
            f"asked for store path digest {digest.hex()}, got {info.store_path.basename}"
        )
    return info


def from_addr(raw: str, *, timeout: float = DEFAULT_TIMEOUT) -> PathInfoService:
    addr = parse_address(raw, PATH_INFO_SCHEMES)
    if addr.scheme == "memory":
        from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService

        return MemoryPathInfoService()
    if addr.scheme == "sqlite":
        from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService

        return SqlitePathInfoService(addr.path, timeout=timeout)
    from tvix_mountd.castore.pathinfos.grpc import GrpcPathInfoService

    return GrpcPathInfoService(addr, timeout=timeout)
