"""Blobs kept as a list of chunks: tvix's chunk list, and a reader over it.

tvix describes a chunked blob with `StatBlobResponse.chunks`: each chunk's
BLAKE3 digest and size, in order. A gRPC BlobService sends that list from
Stat; tvix's object_store layout keeps it in a file per blob. Either way a
random read then costs the one or two chunks it touches, each verified against
its own digest before any byte of it is served.
"""

from __future__ import annotations

import bisect
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tvix_mountd.castore.blobs import BlobReader
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.proto import rpc_blobstore_pb2

# Verified chunks a reader keeps: the current one and its neighbour, so that
# reads crossing a boundary or arriving slightly out of order (the kernel's
# readahead) fetch nothing twice.
CHUNK_CACHE: Final = 2


@dataclass(frozen=True, slots=True)
class Chunk:
    digest: B3Digest
    size: int


def chunks_of(stat: rpc_blobstore_pb2.StatBlobResponse) -> list[Chunk]:
    """The chunk list of a StatBlobResponse, checked: ValidationError if malformed."""
    chunks = []
    for i, meta in enumerate(stat.chunks):
        if meta.size == 0:
            raise ValidationError(f"chunk {i} is empty")
        try:
            chunks.append(Chunk(B3Digest(meta.digest), meta.size))
        except ValidationError as e:
            raise ValidationError(f"chunk {i}: {e}") from None
    return chunks


class ChunkedReader(BlobReader):
    """Random access to a blob through its chunks; `_fetch` gets one chunk's bytes.

    Every chunk is checked for its size and digest here, whatever the backend,
    so a backend only has to find the bytes.
    """

    def __init__(self, digest: B3Digest, chunks: list[Chunk]) -> None:
        self._digest = digest
        self._chunks = chunks
        self._starts: list[int] = []
        offset = 0
        for chunk in chunks:
            self._starts.append(offset)
            offset += chunk.size
        self._size = offset
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    @property
    def size(self) -> int:
        return self._size

    @abstractmethod
    async def _fetch(self, i: int, chunk: Chunk) -> bytes:
        """The bytes of chunk `i`; more than `chunk.size` may be returned (and fails)."""

    async def read_at(self, offset: int, n: int) -> bytes:
        end = min(offset + n, self._size)
        if offset >= end:
            return b""
        i = bisect.bisect_right(self._starts, offset) - 1
        parts = []
        while offset < end:
            data = await self._chunk(i)
            start = self._starts[i]
            part = data[offset - start : end - start]
            parts.append(part)
            offset += len(part)
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _chunk(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        chunk = self._chunks[i]
        data = await self._fetch(i, chunk)
        self._check(i, chunk, data)
        self._cache[i] = data
        while len(self._cache) > CHUNK_CACHE:
            self._cache.popitem(last=False)
        return data

    def _check(self, i: int, chunk: Chunk, data: bytes) -> None:
        if len(data) != chunk.size:
            # A backend may stop fetching past the listed size: then only "more" is known.
            found = "more than that" if len(data) > chunk.size else f"{len(data)}"
            raise IntegrityError(
                f"blob {self._digest}: chunk {i} ({chunk.digest}) should have"
                f" {chunk.size} bytes and has {found}"
            )
        actual = B3Digest.of(data)
        if actual != chunk.digest:
            raise IntegrityError(
                f"blob {self._digest}: chunk {i} ({chunk.digest}) has contents hashing to {actual}"
            )

    async def aclose(self) -> None:
        self._cache.clear()
