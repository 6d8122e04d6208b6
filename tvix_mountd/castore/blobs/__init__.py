"""BlobService: content-addressed blobs, chosen by address (`from_addr`).

Every reader handed out is wrapped in `VerifyingReader`, so no backend's
bytes reach a caller unchecked: reading a blob to its end in order verifies
its BLAKE3 digest, and a blob shorter or longer than it claims is an error.

Writing is fast and durability is a separate, batched step: a blob is
readable once written, and durable once `sync` returned. Record nothing that
refers to a blob (a PathInfo) before that; `put_batch` stores many small
blobs in one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Final

import blake3
import trio

from tvix_mountd.castore.addr import BLOB_SCHEMES, parse_address
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import IntegrityError, StoreError
from tvix_mountd.castore.gather import gather_found


class BlobReader(ABC):
    """Random access to one blob's bytes."""

    @property
    @abstractmethod
    def size(self) -> int | None:
        """The blob's size, when the backend knows it before reading to the end."""

    @abstractmethod
    async def read_at(self, offset: int, n: int) -> bytes:
        """Exactly `n` bytes from `offset`, fewer only at the end of the blob."""

    async def aclose(self) -> None:  # noqa: B027 - optional for backends holding nothing
        """Release what the reader holds (file descriptors, streams)."""


class BlobWriter(ABC):
    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def close(self) -> B3Digest:
        """Finish the blob; it is readable under the returned digest afterwards."""

    async def abort(self) -> None:  # noqa: B027 - optional
        """Drop a half-written blob."""


class VerifyingReader(BlobReader):
    """Hashes what is read in order from offset 0; checks the digest at the end.

    Random reads pass through unhashed (they cannot be verified without reading
    everything before them); a sequential reader, the common case, gets every
    byte verified once it reaches the end.
    """

    def __init__(self, inner: BlobReader, digest: B3Digest) -> None:
        self._inner = inner
        self._digest = digest
        self._hasher: blake3.blake3 | None = blake3.blake3()
        self._hashed_upto = 0
        self._verified = False

    @property
    def size(self) -> int | None:
        return self._inner.size

    async def read_at(self, offset: int, n: int) -> bytes:
        data = await self._inner.read_at(offset, n)
        if len(data) > n:
            raise IntegrityError(f"blob {self._digest}: backend returned more than asked")
        if self._hasher is not None and offset == self._hashed_upto:
            self._hasher.update(data)
            self._hashed_upto += len(data)
            size = self._inner.size
            if len(data) < n or (size is not None and self._hashed_upto >= size):
                self._finish()
        elif self._verified and len(data) < n and offset + len(data) != self._hashed_upto:
            raise IntegrityError(f"blob {self._digest}: size changed between reads")
        return data

    def _finish(self) -> None:
        assert self._hasher is not None
        actual = B3Digest(self._hasher.digest())
        self._hasher = None
        if actual != self._digest:
            raise IntegrityError(f"blob {self._digest} has contents hashing to {actual}")
        size = self._inner.size
        if size is not None and size != self._hashed_upto:
            raise IntegrityError(
                f"blob {self._digest}: {self._hashed_upto} bytes, backend said {size}"
            )
        self._verified = True

    async def aclose(self) -> None:
        await self._inner.aclose()


class BlobService(ABC):
    # Reads are local syscalls or memory copies done inline: they cannot wait
    # on a peer, and a deadline could not interrupt them anyway, so callers
    # skip the deadline (trio's CancelScope costs as much as a cached read).
    local_reads: ClassVar[bool] = False
    # Whether `prefetch` does anything (and `read_small`, `locate`: a local
    # store, read ahead from worker threads).
    prefetches: ClassVar[bool] = False
    # Whether reading ahead with `read_many` pays: a store a round trip away,
    # where files read one after another would each wait for it.
    fetches_ahead: ClassVar[bool] = False

    @abstractmethod
    async def has(self, digest: B3Digest) -> bool: ...

    @abstractmethod
    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        """The backend's reader, or None if the blob is absent."""

    @abstractmethod
    async def open_write(self) -> BlobWriter: ...

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await self._open_raw(digest)
        return None if reader is None else VerifyingReader(reader, digest)

    async def open_read_sized(self, digest: B3Digest, size: int) -> BlobReader | None:
        """`open_read` of a blob whose size the caller knows (from its node):
        a backend a round trip away may skip asking for it. Its reads check
        that size and the digest as `open_read`'s do; a blob that is missing
        may then only fail on the first read."""
        return await self.open_read(digest)

    async def put(self, data: bytes) -> B3Digest:
        writer = await self.open_write()
        try:
            await writer.write(data)
        except BaseException:
            await writer.abort()
            raise
        return await writer.close()

    async def put_batch(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Store each `(digest, data)` whose blob is missing, in as few calls
        to the backend as it allows (a local store: one worker-thread hop).

        The digests are the caller's, hashed from the data in this process:
        a local store names the files after them without hashing again (and
        its readers check every digest), a remote one is checked as `put` is.
        """
        for digest, data in blobs:
            if not await self.has(digest):
                check_stored(f"blob {digest}", digest, await self.put(data))

    async def sync(self) -> None:  # noqa: B027 - nothing to do for most backends
        """Make every blob written so far durable, before something that
        refers to them is recorded. A no-op here: memory holds nothing
        durable, and a remote store answers a write once it has stored it."""

    async def read_all(self, digest: B3Digest) -> bytes | None:
        """The whole blob, verified. For small blobs and tests."""
        chunks: list[bytes] = []
        if not await self._read_through(digest, chunks.append):
            return None
        return b"".join(chunks)

    async def check(self, digest: B3Digest) -> bool:
        """Read the whole blob and check it, keeping nothing: whether it
        exists. IntegrityError (or another StoreError) if it is wrong."""
        return await self._read_through(digest, lambda chunk: None)

    async def _read_through(self, digest: B3Digest, take: Callable[[bytes], None]) -> bool:
        # In order from 0: the verifying reader checks the digest at the end.
        reader = await self.open_read(digest)
        if reader is None:
            return False
        try:
            offset = 0
            while True:
                chunk = await reader.read_at(offset, 1 << 20)
                take(chunk)
                offset += len(chunk)
                if len(chunk) < 1 << 20:
                    return True
        finally:
            await reader.aclose()

    async def read_many(self, wanted: Sequence[tuple[B3Digest, int]]) -> dict[B3Digest, bytes]:
        """Those of the small blobs `(digest, size)` that could be read whole
        and match their digest and size, all read at once, by digest: for
        reading ahead, so a missing or wrong one is left out (its read will
        fail and say why), not an error."""
        sizes = dict(wanted)

        async def read(digest: B3Digest) -> bytes | None:
            size = sizes[digest]
            try:
                reader = await self.open_read_sized(digest, size)
                if reader is None:
                    return None
                try:
                    # One byte more than the size: the end is seen, the digest checked.
                    data = await reader.read_at(0, size + 1)
                finally:
                    await reader.aclose()
            except StoreError:
                return None
            return data if len(data) == size else None

        return await gather_found(sizes, read)

    def prefetch(self, digests: Sequence[B3Digest]) -> None:  # noqa: B027 - optional
        """Hint that these blobs will be read soon, from their start.

        Blocking and best effort (errors are ignored): call it from a worker
        thread. A local store has the kernel read them into its page cache
        meanwhile; by default nothing happens.
        """

    def locate(self, digests: Sequence[B3Digest]) -> None:  # noqa: B027 - optional
        """Hint that these blobs are about to be read with `read_small`:
        a store that must look each one up may look them up together.
        Blocking and best effort, as `prefetch`; by default nothing happens."""

    def read_small(self, digest: B3Digest, size: int) -> bytes | None:
        """The `size` bytes of a small blob, verified, read in the calling
        thread (blocking: call it from a worker thread), or None if this
        store cannot do that cheaply or the blob is missing or wrong (the
        normal read path then says why). By default None."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""


def check_stored(what: str, computed: B3Digest, stored: B3Digest) -> B3Digest:
    """The backend computes its own digest; a remote one is checked, not trusted."""
    if stored != computed:
        raise IntegrityError(
            f"blob service stored {what} as {stored}, its contents hash to {computed}"
        )
    return computed


# Small blobs stored per `put_batch` call by a BlobBatcher (and batches made
# elsewhere to its measure): bytes, and files (many empty files cost little
# memory but each is work for the store).
BATCH_BYTES: Final = 4 << 20
BATCH_FILES: Final = 1024
# Batches being stored at once: creating a file waits on the disk whenever
# the file system's metadata is not cached, and two threads keep the disk
# busy where one leaves it idle in between.
CONCURRENT_PUTS: Final = 2


class BlobBatcher:
    """Small blobs stored in batches, in the background: `add` gathers them
    into batches of about BATCH_BYTES, `put` hands a batch to a task of
    `nursery` running `put_batch`, waiting while CONCURRENT_PUTS run already.

    Memory: the batch being gathered and CONCURRENT_PUTS being stored. Leave
    the nursery only after `flush`: then every blob added is stored (or its
    task's error is the nursery's).
    """

    def __init__(self, blobs: BlobService, nursery: trio.Nursery) -> None:
        self._blobs = blobs
        self._nursery = nursery
        self._slots = trio.Semaphore(CONCURRENT_PUTS)
        self._pending: list[tuple[B3Digest, bytes]] = []
        self._pending_bytes = 0

    async def add(self, digest: B3Digest, data: bytes) -> None:
        self._pending.append((digest, data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= BATCH_BYTES or len(self._pending) >= BATCH_FILES:
            await self.flush()

    async def flush(self) -> None:
        """Start storing what `add` gathered."""
        batch, self._pending = self._pending, []
        self._pending_bytes = 0
        if batch:
            await self.put(batch)

    async def put(self, batch: list[tuple[B3Digest, bytes]]) -> None:
        """Start storing `batch` once fewer than CONCURRENT_PUTS run."""
        await self._slots.acquire()
        self._nursery.start_soon(self._put, batch)

    async def _put(self, batch: list[tuple[B3Digest, bytes]]) -> None:
        try:
            await self._blobs.put_batch(batch)
        finally:
            self._slots.release()


class BlobUpload:
    """One blob streamed to a writer piece by piece, and hashed here as well.

    Hashing first and uploading only if missing would read the source twice;
    a writer that finds its blob already stored just drops its temp file,
    which costs less. `abort` (also on cancellation) drops a half-written blob.
    """

    def __init__(self, writer: BlobWriter, what: str) -> None:
        self._writer = writer
        self._hasher = blake3.blake3()
        self._what = what
        self.size = 0

    @classmethod
    async def open(cls, blobs: BlobService, what: str) -> BlobUpload:
        return cls(await blobs.open_write(), what)

    async def write(self, data: bytes) -> None:
        if data:
            self._hasher.update(data)
            self.size += len(data)
            await self._writer.write(data)

    async def close(self) -> B3Digest:
        """Finish the blob; IntegrityError if the backend stored other bytes."""
        stored = await self._writer.close()
        return check_stored(self._what, B3Digest(self._hasher.digest()), stored)

    async def abort(self) -> None:
        await self._writer.abort()


def from_addr(raw: str, *, timeout: float = DEFAULT_TIMEOUT) -> BlobService:
    """The BlobService an address names. Raises AddressError for a bad address."""
    addr = parse_address(raw, BLOB_SCHEMES)
    if addr.scheme == "memory":
        from tvix_mountd.castore.blobs.memory import MemoryBlobService

        return MemoryBlobService()
    if addr.scheme == "raw+file":
        from tvix_mountd.castore.blobs.raw import RawFileBlobService

        return RawFileBlobService(addr.path)
    if addr.scheme == "objectstore+file":
        from tvix_mountd.castore.blobs.objectstore import ObjectStoreBlobService

        return ObjectStoreBlobService(addr.path)
    from tvix_mountd.castore.blobs.grpc import GrpcBlobService

    return GrpcBlobService(addr, timeout=timeout)
