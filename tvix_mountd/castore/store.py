"""A store: the three services a mount needs, opened from their addresses."""

from __future__ import annotations

from dataclasses import dataclass

from tvix_mountd.castore import blobs, directories, pathinfos
from tvix_mountd.castore.blobs import BlobService
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.pathinfos import PathInfoService


@dataclass
class Store:
    blobs: BlobService
    directories: DirectoryService
    path_infos: PathInfoService

    @classmethod
    def from_addrs(
        cls,
        blob_service_addr: str,
        directory_service_addr: str,
        path_info_service_addr: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prefetch_references: int = 0,
    ) -> Store:
        """Open all three; AddressError (naming the address) if one is bad.

        A Nix binary cache as the path-info service ingests into the other two
        (and prefetches references, see `run`).
        """
        blob_service = blobs.from_addr(blob_service_addr, timeout=timeout)
        directory_service = directories.from_addr(directory_service_addr, timeout=timeout)
        path_info_service = pathinfos.from_addr(
            path_info_service_addr,
            timeout=timeout,
            blobs=blob_service,
            directories=directory_service,
            prefetch_references=prefetch_references,
        )
        return cls(blob_service, directory_service, path_info_service)

    async def run(self) -> None:
        """The services' background work, until cancelled (see PathInfoService.run)."""
        await self.path_infos.run()

    async def aclose(self) -> None:
        await self.blobs.aclose()
        await self.directories.aclose()
        await self.path_infos.aclose()
