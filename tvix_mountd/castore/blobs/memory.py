"""memory:// blobs: a dict in this process (tests, single mounts)."""

from __future__ import annotations

import blake3

from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter
from tvix_mountd.castore.digests import B3Digest


class BytesReader(BlobReader):
    """A reader over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    async def read_at(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + n]


class _MemoryWriter(BlobWriter):
    def __init__(self, blobs: dict[B3Digest, bytes]) -> None:
        self._blobs = blobs
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()

    async def write(self, data: bytes) -> None:
        self._parts.append(bytes(data))
        self._hasher.update(data)

    async def close(self) -> B3Digest:
        digest = B3Digest(self._hasher.digest())
        self._blobs.setdefault(digest, b"".join(self._parts))
        self._parts = []
        return digest


class MemoryBlobService(BlobService):
    local_reads = True

    def __init__(self) -> None:
        self.blobs: dict[B3Digest, bytes] = {}

    async def has(self, digest: B3Digest) -> bool:
        return digest in self.blobs

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        data = self.blobs.get(digest)
        return None if data is None else BytesReader(data)

    async def open_write(self) -> BlobWriter:
        return _MemoryWriter(self.blobs)
