"""grpc+unix:// and grpc+http:// blobs: a tvix-store BlobService (tvix.castore.v1).

Reading asks Stat(send_chunks=True) first. A server that keeps the blob in
several chunks lists them, and each chunk is then fetched on its own by its
digest and verified, so a random read costs one chunk, never the blob up to
it. Otherwise (tvix answers an empty list for a blob kept whole) the blob is
streamed with Read, and the stream is followed: sequential reads continue it,
a forward seek skips ahead in it, only a backward seek past the retained tail
re-opens it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import blake3
import trio

from tvix_mountd.castore.addr import StoreAddress
from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter, VerifyingReader
from tvix_mountd.castore.blobs.chunked import Chunk, ChunkedReader, chunks_of
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import IntegrityError, StoreError
from tvix_mountd.castore.grpc_channel import (
    GrpcConnection,
    RequestStream,
    ResponseStream,
    RpcNotFound,
    naming,
    shown_digest,
)
from tvix_mountd.proto import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc

# tonic servers (tvix-store) refuse messages over 4 MiB by default; 1 MiB
# stays well below that whatever sizes callers write.
PUT_CHUNK_SIZE: Final = 1 << 20
# Enough queued upload data to keep the connection busy, bounded so a slow
# server cannot make a writer buffer a whole blob.
_PUT_QUEUE: Final = 8
# Most bytes one worker-thread hop collects from a Read stream.
_MAX_BATCH_BYTES: Final = 4 << 20
# Blobs up to this size whose size is known are read without a Stat first.
_UNSTATED_MAX: Final = 256 << 10
# What a streaming reader keeps behind its position: the kernel's readahead
# issues several reads at once and they may arrive slightly out of order.
STREAM_RETAIN: Final = 1 << 20


def _chunk_len(chunk: rpc_blobstore_pb2.BlobChunk) -> int:
    return len(chunk.data)


class GrpcBlobService(BlobService):
    fetches_ahead = True

    def __init__(self, addr: StoreAddress, *, timeout: float) -> None:
        self._conn = GrpcConnection(addr, timeout=timeout)

    def _stub(self) -> rpc_blobstore_pb2_grpc.BlobServiceStub:
        return self._conn.stub(rpc_blobstore_pb2_grpc.BlobServiceStub)

    async def has(self, digest: B3Digest) -> bool:
        try:
            await self._conn.unary(
                self._stub().Stat,
                rpc_blobstore_pb2.StatBlobRequest(digest=digest),
                what=f"Stat {digest}",
            )
        except RpcNotFound:
            return False
        return True

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        try:
            stat = await self._conn.unary(
                self._stub().Stat,
                rpc_blobstore_pb2.StatBlobRequest(digest=digest, send_chunks=True),
                what=f"Stat {digest}",
            )
        except RpcNotFound:
            return None
        with naming(self._conn.describe(f"Stat {digest}")):
            chunks = chunks_of(stat)
        if len(chunks) > 1:
            return _GrpcChunkedReader(self._open_read, self._conn.addr, digest, chunks)
        # One listed chunk is the whole blob; its size is a hint worth having.
        return _StreamReader(
            self._open_read, self._conn.addr, digest, chunks[0].size if chunks else None
        )

    async def open_read_sized(self, digest: B3Digest, size: int) -> BlobReader | None:
        """A small blob with one Read and no Stat (a round trip less): its
        size is known, and a blob the server keeps in chunks reads whole by
        its own digest all the same. Larger ones as `open_read` (their chunk
        list serves reads at any offset)."""
        if size > _UNSTATED_MAX:
            return await self.open_read(digest)
        stream = _StreamReader(self._open_read, self._conn.addr, digest, size, stated=False)
        return VerifyingReader(stream, digest)

    def _open_read(self, digest: B3Digest) -> ResponseStream[rpc_blobstore_pb2.BlobChunk]:
        return self._conn.open_stream(
            self._stub().Read,
            rpc_blobstore_pb2.ReadBlobRequest(digest=digest),
            what=f"Read {digest}",
        )

    async def open_write(self) -> BlobWriter:
        return _GrpcBlobWriter(
            self._conn.start_upload(self._stub().Put, what="Put blob", max_queued=_PUT_QUEUE)
        )

    async def aclose(self) -> None:
        self._conn.close()


_OpenRead = Callable[[B3Digest], ResponseStream[rpc_blobstore_pb2.BlobChunk]]


class _GrpcChunkedReader(ChunkedReader):
    """Fetches each chunk with its own Read; ChunkedReader checks it."""

    def __init__(
        self, open_read: _OpenRead, where: StoreAddress, digest: B3Digest, chunks: list[Chunk]
    ) -> None:
        super().__init__(digest, chunks)
        self._open_read = open_read
        self._where = where

    async def _fetch(self, i: int, chunk: Chunk) -> bytes:
        stream = self._open_read(chunk.digest)
        parts: list[bytes] = []
        received = 0
        try:
            while batch := await stream.batch(chunk.size - received + 1, _chunk_len):
                for msg in batch:
                    parts.append(msg.data)
                    received += len(msg.data)
                if received > chunk.size:
                    # Stop a lying server early instead of buffering without bound.
                    break
        except RpcNotFound:
            raise StoreError(
                f"blob {self._digest}: chunk {i} ({chunk.digest}) is missing at {self._where}"
            ) from None
        finally:
            stream.cancel()
        return b"".join(parts)


class _StreamReader(BlobReader):
    """Follows one Read stream of the whole blob, re-opening it only to go back.

    `_buf` holds the bytes of the stream at [_buf_start, _buf_start+len(_buf));
    its end is how far the stream has been read. Reads are serialised, since
    the stream has one position.
    """

    def __init__(
        self,
        open_read: _OpenRead,
        where: StoreAddress,
        digest: B3Digest,
        size: int | None,
        *,
        stated: bool = True,
    ) -> None:
        """`size`: what Stat said (or the caller knows); `stated`: whether a
        Stat found the blob (else a missing one is found missing here)."""
        self._open_read = open_read
        self._stated = stated
        self._where = where
        self._digest = digest
        self._size_hint = size
        self._size: int | None = size
        self._lock = trio.Lock()
        self._stream: ResponseStream[rpc_blobstore_pb2.BlobChunk] | None = None
        self._buf = bytearray()
        self._buf_start = 0
        self._eof = False

    @property
    def size(self) -> int | None:
        return self._size

    async def read_at(self, offset: int, n: int) -> bytes:
        async with self._lock:
            if n <= 0 or (self._size is not None and offset >= self._size):
                return b""
            if offset < self._buf_start or self._stream is None:
                self._reopen()
            end = offset + n
            out = bytearray()
            while True:
                buf_end = self._buf_start + len(self._buf)
                if offset < buf_end:
                    part = self._buf[offset - self._buf_start : min(end, buf_end) - self._buf_start]
                    out += part
                    offset += len(part)
                if offset >= end or self._eof:
                    return bytes(out)
                try:
                    await self._fill(offset, end)
                except BaseException:
                    # The stream is unusable now; the next read opens a new
                    # one, so a reader outlives a backend's outage.
                    self._drop_stream()
                    raise

    def _reopen(self) -> None:
        self._drop_stream()
        self._stream = self._open_read(self._digest)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self._buf = bytearray()
        self._buf_start = 0
        self._eof = False

    async def _fill(self, offset: int, end: int) -> None:
        """Read on from the stream; keep the tail, never what `offset` still needs."""
        assert self._stream is not None
        buf_end = self._buf_start + len(self._buf)
        want = min(max(end - buf_end, 1), _MAX_BATCH_BYTES)
        try:
            batch = await self._stream.batch(want, _chunk_len)
        except RpcNotFound:
            if not self._stated:
                raise StoreError(f"blob {self._digest} not found at {self._where}") from None
            raise StoreError(
                f"blob {self._digest} vanished from {self._where} while reading"
            ) from None
        if not batch:
            self._eof = True
            if self._size_hint is not None and buf_end != self._size_hint:
                raise IntegrityError(
                    f"blob {self._digest}: stream ended after {buf_end} bytes,"
                    f" expected {self._size_hint}"
                )
            self._size = buf_end
            return
        for msg in batch:
            self._buf += msg.data
        buf_end = self._buf_start + len(self._buf)
        keep_from = min(offset, buf_end - STREAM_RETAIN)
        if keep_from > self._buf_start:
            del self._buf[: keep_from - self._buf_start]
            self._buf_start = keep_from

    async def aclose(self) -> None:
        self._drop_stream()


class _GrpcBlobWriter(BlobWriter):
    """Streams BlobChunks to Put, hashing locally to check the server's answer."""

    def __init__(
        self, upload: RequestStream[rpc_blobstore_pb2.BlobChunk, rpc_blobstore_pb2.PutBlobResponse]
    ) -> None:
        self._upload = upload
        self._hasher = blake3.blake3()
        self._digest: B3Digest | None = None

    async def write(self, data: bytes) -> None:
        if self._digest is not None:
            raise StoreError(f"{self._upload.what}: write after close")
        view = memoryview(data)
        for start in range(0, len(view), PUT_CHUNK_SIZE):
            part = bytes(view[start : start + PUT_CHUNK_SIZE])
            self._hasher.update(part)
            await self._upload.send(rpc_blobstore_pb2.BlobChunk(data=part))

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        response = await self._upload.finish()
        ours = B3Digest(self._hasher.digest())
        if response.digest != ours:
            raise IntegrityError(
                f"{self._upload.what}: the server stored the blob as"
                f" {shown_digest(response.digest)}, but it is {ours}"
            )
        self._digest = ours
        return ours

    async def abort(self) -> None:
        self._upload.abort()
