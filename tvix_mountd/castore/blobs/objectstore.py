"""objectstore+file:// blobs: tvix's object_store layout, in a local directory.

What tvix's ObjectStoreBlobService (tvix castore/src/blobservice/object_store.rs)
writes through object_store's LocalFileSystem under the directory the address
names, and reads back:

    blobs/b3/<hhhh>/<64 hex>    the blob index: a tvix.castore.v1.StatBlobResponse
                                (protobuf) listing the blob's chunks, digest and
                                size, in order; the list is empty (the file is
                                empty) when the blob is a single chunk
    chunks/b3/<hhhh>/<64 hex>   one chunk's bytes, zstd-compressed

A digest is written as lower-case hex and sharded by its first two *bytes*,
four hex characters (`HEXLOWER.encode(&digest[..2])` in tvix; the example in
tvix's doc comment shows two characters, its code has always written four).

Reading follows tvix's open_read: the empty blob needs no file; a chunk file
named by the digest is the whole blob (a blob of one chunk, or a chunk of
another blob), read, decompressed and checked at open; otherwise the blob
index lists the chunks and a read fetches only the chunks it touches, each
checked against its digest and size before any of its bytes is served (and a
sequential reader still gets the whole blob checked by VerifyingReader).
Damaged data is an error naming the file, never a crash: a chunk that does not
decompress, decompresses to more than it should (no decompression bombs), or
hashes wrong; an index that does not parse; a chunk the index lists that is
missing.

Writing produces what tvix's reader accepts: chunks of CHUNK_SIZE bytes (the
last one shorter), each stored zstd-compressed under its digest unless already
there, then the blob index (an empty chunk list for a single chunk, as tvix
writes it). tvix cuts chunks with FastCDC, whose boundaries depend on the
content; its reader takes any boundaries, and a FastCDC in Python would cost a
loop per byte, so ours are fixed. What that loses: chunks shared with blobs
tvix wrote, and between versions of a blob with inserted bytes. Chunks are
published before the index, each atomically (localdir.py), so a reader never
finds an index whose chunks are not all there; temp files live under `tmp/`,
where tvix never looks. `sync` makes what was published durable. Nothing is
created until the first write, so a tvix store's directory can be read
without write access to it.

Reads are inline in the calling thread, as for raw+file: a chunk is at most a
few hundred KiB and decompresses in well under a millisecond.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import blake3
import trio
import zstandard
from google.protobuf.message import DecodeError

from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter
from tvix_mountd.castore.blobs.chunked import Chunk, ChunkedReader, chunks_of
from tvix_mountd.castore.blobs.localdir import (
    OBJECT_STORE_LAYOUT,
    RAW_LAYOUT,
    LocalRoot,
    ThreadedWriter,
)
from tvix_mountd.castore.blobs.memory import BytesReader
from tvix_mountd.castore.digests import EMPTY_BLOB_DIGEST, B3Digest
from tvix_mountd.castore.errors import IntegrityError, StoreError, ValidationError
from tvix_mountd.proto import rpc_blobstore_pb2

# Our chunk size: tvix's average (it cuts between half and twice that).
CHUNK_SIZE: Final = 256 * 1024
# zstd::DEFAULT_COMPRESSION_LEVEL, what tvix compresses with.
ZSTD_LEVEL: Final = 3
# The largest chunk a reader accepts, decompressed: tvix's largest with its
# default settings is 512 KiB, and its avg_chunk_size is configurable, so
# allow far more, but not so much that a hostile file could exhaust memory.
MAX_CHUNK_SIZE: Final = 64 << 20
# The largest blob index a reader accepts: about 1.5 million chunks, a blob
# of some 400 GiB at tvix's chunk size.
MAX_INDEX_SIZE: Final = 64 << 20


def _compressed_limit(size: int) -> int:
    """How large a chunk file of `size` bytes' content may be: zstd's worst
    case is the content plus a small overhead, and twice that is surely not
    a chunk of it."""
    return 2 * size + (64 << 10)


def _shard(digest: B3Digest) -> str:
    hexdigest = digest.hex()
    return os.path.join(hexdigest[:4], hexdigest)


def _read_file(path: str, limit: int, what: str) -> bytes | None:
    """The bytes of file `path` (None if absent); IntegrityError past `limit` bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise IntegrityError(f"{what} {path} is larger than {limit} bytes")
            # Sized by the file, not the limit: a read of `limit` bytes would
            # allocate them all first.
            data = f.read(size + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"reading {what} {path}: {e}") from e
    if len(data) > limit:  # grew since the fstat
        raise IntegrityError(f"{what} {path} is larger than {limit} bytes")
    return data


# Output is taken from the decompressor in pieces of at most this: each read
# allocates what it asks for, and a chunk is mostly far below the limit.
_DECOMPRESS_STEP: Final = 1 << 20


def _decompress(compressed: bytes, limit: int, path: str) -> bytes:
    """The zstd frames in `compressed`, decompressed, at most `limit` + 1 bytes
    of them (more is wrong, and the caller says so; a bomb stops here)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
        parts = []
        total = 0
        while total <= limit:
            part = reader.read(min(limit + 1 - total, _DECOMPRESS_STEP))
            if not part:
                break
            parts.append(part)
            total += len(part)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk file {path} is not valid zstd: {e}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ObjectStoreBlobService(BlobService):
    """tvix's object_store blob layout under `root` (see the module docstring)."""

    local_reads = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.local = LocalRoot(root, OBJECT_STORE_LAYOUT, RAW_LAYOUT)
        self._blobs_dir = os.path.join(root, "blobs", "b3")
        self._chunks_dir = os.path.join(root, "chunks", "b3")

    def blob_index_path(self, digest: B3Digest) -> str:
        return os.path.join(self._blobs_dir, _shard(digest))

    def chunk_path(self, digest: B3Digest) -> str:
        return os.path.join(self._chunks_dir, _shard(digest))

    async def has(self, digest: B3Digest) -> bool:
        # Inline: a local stat is cheaper than the thread hop that would wrap it.
        self.local.check_layout()
        return self._has_sync(digest)

    def _has_sync(self, digest: B3Digest) -> bool:
        # As tvix: a blob index or a chunk file.
        return os.path.exists(self.blob_index_path(digest)) or os.path.exists(
            self.chunk_path(digest)
        )

    def read_chunk(self, digest: B3Digest, limit: int) -> bytes | None:
        """The decompressed chunk file of `digest`, unchecked, at most `limit` + 1
        bytes; None if there is no such file."""
        path = self.chunk_path(digest)
        compressed = _read_file(path, _compressed_limit(limit), "chunk file")
        if compressed is None:
            return None
        return _decompress(compressed, limit, path)

    def _read_index(self, digest: B3Digest) -> list[Chunk] | None:
        path = self.blob_index_path(digest)
        data = _read_file(path, MAX_INDEX_SIZE, "blob index")
        if data is None:
            return None
        try:
            chunks = chunks_of(rpc_blobstore_pb2.StatBlobResponse.FromString(data))
        except (DecodeError, ValidationError) as e:
            raise IntegrityError(f"blob index {path} is not a chunk list: {e}") from None
        for i, chunk in enumerate(chunks):
            if chunk.size > MAX_CHUNK_SIZE:
                raise IntegrityError(
                    f"blob index {path}: chunk {i} has {chunk.size} bytes,"
                    f" more than the {MAX_CHUNK_SIZE} this reader accepts"
                )
        return chunks

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        self.local.check_layout()
        if digest == EMPTY_BLOB_DIGEST:
            return BytesReader(b"")
        whole = self.read_chunk(digest, MAX_CHUNK_SIZE)
        if whole is not None:
            path = self.chunk_path(digest)
            if len(whole) > MAX_CHUNK_SIZE:
                raise IntegrityError(f"chunk file {path} holds more than {MAX_CHUNK_SIZE} bytes")
            actual = B3Digest.of(whole)
            if actual != digest:
                raise IntegrityError(f"chunk file {path} has contents hashing to {actual}")
            return BytesReader(whole)
        chunks = self._read_index(digest)
        if chunks is None:
            return None
        if not chunks:
            raise StoreError(
                f"blob {digest}: its index lists no chunks, so it is one chunk,"
                f" but {self.chunk_path(digest)} is missing"
            )
        return _ChunkFileReader(self, digest, chunks)

    async def open_write(self) -> BlobWriter:
        await self.local.prepare()
        return ObjectStoreBlobWriter(self)

    async def put_batch(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Every missing blob of the batch in one worker-thread hop."""
        await self.local.prepare()
        await trio.to_thread.run_sync(self._put_batch_sync, blobs)

    def _put_batch_sync(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        for digest, data in blobs:
            if self._has_sync(digest):
                continue
            try:
                chunks = [
                    self.store_chunk(data[start : start + CHUNK_SIZE], compressor)
                    for start in range(0, len(data), CHUNK_SIZE)
                ]
                self.store_index(digest, chunks)
            except OSError as e:
                raise StoreError(f"blob store {self.root}: storing blob {digest}: {e}") from e

    async def sync(self) -> None:
        await self.local.sync()

    def store_chunk(self, data: bytes, compressor: zstandard.ZstdCompressor) -> Chunk:
        """Store `data` as a chunk unless it is there (blocking)."""
        digest = B3Digest.of(data)
        target = self.chunk_path(digest)
        if not os.path.exists(target):
            self.local.write_file(target, compressor.compress(data))
        return Chunk(digest, len(data))

    def store_index(self, digest: B3Digest, chunks: list[Chunk]) -> None:
        """Store the index of blob `digest` unless it is there (blocking)."""
        target = self.blob_index_path(digest)
        if os.path.exists(target):
            return
        # One chunk is the blob itself: tvix lists no chunks then.
        listed = chunks if len(chunks) > 1 else []
        index = rpc_blobstore_pb2.StatBlobResponse(
            chunks=[
                rpc_blobstore_pb2.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size)
                for c in listed
            ]
        )
        self.local.write_file(target, index.SerializeToString())


class _ChunkFileReader(ChunkedReader):
    """A blob read through its index: chunk files fetched one by one, inline."""

    def __init__(
        self, service: ObjectStoreBlobService, digest: B3Digest, chunks: list[Chunk]
    ) -> None:
        super().__init__(digest, chunks)
        self._service = service

    async def _fetch(self, i: int, chunk: Chunk) -> bytes:
        data = self._service.read_chunk(chunk.digest, chunk.size)
        if data is None:
            raise StoreError(
                f"blob {self._digest}: chunk {i} is missing:"
                f" no file {self._service.chunk_path(chunk.digest)}"
            )
        return data


class ObjectStoreBlobWriter(ThreadedWriter):
    """Cuts what is written into chunks and stores each full one as it goes;
    `close` stores the last chunk and then the index.

    The last chunk is always cut by `close`, never by `write`: a blob that
    fits in one chunk is stored under its own digest (its chunk file is the
    blob), so an unfinished writer must not have stored it.
    """

    def __init__(self, service: ObjectStoreBlobService) -> None:
        super().__init__(f"blob store {service.root}")
        self._service = service
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._hasher = blake3.blake3()
        self._buffer = bytearray()
        self._chunks: list[Chunk] = []

    def _write_sync(self, data: bytes) -> None:
        self._hasher.update(data)
        self._buffer += data
        if len(self._buffer) <= CHUNK_SIZE:
            return
        # Whole chunks, keeping at least one byte back for `close` to cut.
        cut = (len(self._buffer) - 1) // CHUNK_SIZE * CHUNK_SIZE
        view = memoryview(self._buffer)
        try:
            for start in range(0, cut, CHUNK_SIZE):
                piece = bytes(view[start : start + CHUNK_SIZE])
                self._chunks.append(self._service.store_chunk(piece, self._compressor))
        finally:
            view.release()
        del self._buffer[:cut]

    def _close_sync(self) -> B3Digest:
        if self._buffer:
            self._chunks.append(self._service.store_chunk(bytes(self._buffer), self._compressor))
            self._buffer.clear()
        digest = B3Digest(self._hasher.digest())
        self._service.store_index(digest, self._chunks)
        return digest

    async def abort(self) -> None:
        # Chunks already stored stay, referenced by no index (as tvix's writer
        # leaves them): they are content-addressed, so harmless, and another
        # blob may come to use them.
        self._done = True
        self._buffer = bytearray()
