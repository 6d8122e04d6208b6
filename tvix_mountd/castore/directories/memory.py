"""memory:// directories: a dict in this process (tests, single mounts)."""

from __future__ import annotations

from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.nodes import Directory


class MemoryDirectoryService(DirectoryService):
    def __init__(self) -> None:
        self.directories: dict[B3Digest, Directory] = {}

    async def get(self, digest: B3Digest) -> Directory | None:
        return self.directories.get(digest)

    async def put(self, directory: Directory) -> B3Digest:
        self.directories.setdefault(directory.digest, directory)
        return directory.digest
