"""PathInfoService: PathInfos by store path digest, chosen by address (`from_addr`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from tvix_mountd.castore.addr import (
    NIX_CACHE_SCHEMES,
    PATH_INFO_SCHEMES,
    parse_address,
    prefetch_problem,
)
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.errors import AddressError, IntegrityError
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.storepath import StorePath

if TYPE_CHECKING:
    from tvix_mountd.castore.blobs import BlobService
    from tvix_mountd.castore.directories import DirectoryService


class PathInfoService(ABC):
    # True for a service whose `get` may take long while making progress (a
    # download) and fails by itself once it stalls for its backend timeout:
    # callers must not cut it short with a total-time deadline of their own.
    waits_for_progress: ClassVar[bool] = False

    @abstractmethod
    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo for the store path with this 20-byte digest, or None."""

    async def get_store_path(self, path: StorePath) -> PathInfo | None:
        """The PathInfo of exactly `path`: None also for its digest under another name."""
        info = await self.get(path.digest)
        return info if info is not None and info.store_path.name == path.name else None

    @abstractmethod
    async def put(self, info: PathInfo) -> PathInfo: ...

    @abstractmethod
    def list(self) -> AsyncIterator[PathInfo]:
        """Every PathInfo, streamed (never all loaded at once)."""

    async def run(self) -> None:  # noqa: B027 - optional
        """The service's background work (a binary cache's prefetch of
        references), for its owner to run in a nursery until it closes the
        service; returns at once where there is none."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""


async def put_durably(blobs: BlobService, path_infos: PathInfoService, info: PathInfo) -> PathInfo:
    """The durability point of a path added to a store (an import, a NAR
    fetched): every blob it refers to is made durable (`blobs.sync`, one
    syncfs for the embedded store) before the PathInfo is put, so after a
    crash no PathInfo refers to a blob that did not reach the disk. Its
    Directories are durable already (a directory service's put is)."""
    await blobs.sync()
    return await path_infos.put(info)


def check_answer(digest: bytes, info: PathInfo | None) -> PathInfo | None:
    """A backend's answer to get(digest) must be about that store path."""
    if info is not None and info.store_path.digest != digest:
        raise IntegrityError(
            f"asked for store path digest {digest.hex()}, got {info.store_path.basename}"
        )
    return info


def from_addr(
    raw: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    blobs: BlobService | None = None,
    directories: DirectoryService | None = None,
    prefetch_references: int = 0,
) -> PathInfoService:
    """The PathInfoService an address names. A Nix binary cache (nix+...) also
    needs the store's `blobs` and `directories`, which NARs are ingested into
    (the service uses them, the caller closes them), and prefetches that many
    references of what it fetched at a time (in `run`; 0: none)."""
    addr = parse_address(raw, PATH_INFO_SCHEMES)
    problem = prefetch_problem(raw, prefetch_references)
    if problem:
        raise AddressError(raw, problem)
    if addr.scheme in NIX_CACHE_SCHEMES:
        if blobs is None or directories is None:
            raise AddressError(
                raw, "a Nix binary cache needs the store's blob and directory services"
            )
        from tvix_mountd.castore.pathinfos.nixcache import NixCachePathInfoService

        return NixCachePathInfoService(
            addr, blobs, directories, timeout=timeout, prefetch_references=prefetch_references
        )
    if addr.scheme == "memory":
        from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService

        return MemoryPathInfoService()
    if addr.scheme == "sqlite":
        from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService

        return SqlitePathInfoService(addr.path, timeout=timeout)
    from tvix_mountd.castore.pathinfos.grpc import GrpcPathInfoService

    return GrpcPathInfoService(addr, timeout=timeout)
