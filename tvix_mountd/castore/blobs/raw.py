"""raw+file:// blobs: one plain file per blob under a local directory.

Layout under the root given by the address:

    b3/<first 2 hex chars>/<64 hex chars>   the blob's bytes, uncompressed
    tmp/<random>.tmp                        blobs being written
    packs/                                  small blobs stored in batches,
                                            back to back (see packs.py)

This is tvix-mountd's own layout, not tvix's object_store layout (that is
`objectstore+file://`, see objectstore.py): uncompressed whole files are
deliberate, so the FUSE read path serves a read with one pread on the blob
file (or on the pack of a small one), and the kernel's page cache and
readahead do the rest.

Writes are atomic (see localdir.py): a blob is streamed into a temp file while
being hashed, then published under its digest's name; `sync` makes it durable.
A writer that finds its blob already there, with the same size, leaves the
first file in place (one of another size was damaged, and is replaced).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import blake3
import trio

from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter
from tvix_mountd.castore.blobs.localdir import (
    OBJECT_STORE_LAYOUT,
    RAW_LAYOUT,
    LocalRoot,
    ThreadedWriter,
    remove_quietly,
)
from tvix_mountd.castore.blobs.packs import MAX_PACKED, PackedBlobs
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.localfs import start_writeback

# What `prefetch` asks the kernel to read ahead of each blob, at most.
PREFETCH_BYTES = 1 << 20


class RawFileReader(BlobReader):
    """Reads one blob file with pread, in the calling (trio) thread.

    A read of a local file is served from the page cache in microseconds,
    while a hop to a worker thread and back costs tens of microseconds: doing
    the syscall inline makes the common read several times cheaper. The rare
    read that goes to a disk blocks the event loop for one disk access, which
    is the price; a hung local disk would hang the process either way.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._size = os.fstat(fd).st_size

    @property
    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, n: int) -> bytes:
        if self._fd < 0:
            raise StoreError(f"blob file {self._path}: reader is closed")
        if offset < 0 or n < 0:
            raise ValueError(f"invalid read of {n} bytes at {offset}")
        try:
            data = os.pread(self._fd, n, offset)
            # Short only at the end of the file (the size fstat gave): then there
            # is nothing more to read, and a second pread would cost a syscall
            # on every small file's last read.
            if 0 < len(data) < n and offset + len(data) < self._size:
                # A regular file reads short only at its end, but keep the
                # "exactly n bytes" contract even if it does not.
                parts = [data]
                got = len(data)
                while got < n:
                    more = os.pread(self._fd, n - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as e:
            raise StoreError(f"reading blob file {self._path}: {e}") from e
        return data

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class PackedReader(BlobReader):
    """Reads one packed blob with pread on its pack (inline, as RawFileReader)."""

    def __init__(self, fd: int, offset: int, size: int, digest: B3Digest) -> None:
        self._fd = fd  # the pack's, shared: PackedBlobs closes it
        self._offset = offset
        self._size = size
        self._digest = digest

    @property
    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"invalid read of {n} bytes at {offset}")
        n = max(0, min(n, self._size - offset))
        try:
            return os.pread(self._fd, n, self._offset + offset)
        except OSError as e:
            raise StoreError(f"reading blob {self._digest} from its pack: {e}") from e


class RawFileWriter(ThreadedWriter):
    """Streams into a temp file while hashing; `close` publishes it atomically."""

    def __init__(self, service: RawFileBlobService, fd: int, temp_path: str) -> None:
        super().__init__(f"blob temp file {temp_path}")
        self._service = service
        self._fd = fd
        self._temp_path = temp_path
        self._hasher = blake3.blake3()
        self._size = 0

    def _write_sync(self, data: bytes) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        # A large blob's bytes start for the disk as they come, so the sync
        # that makes it durable (after the whole import) finds less to write.
        start_writeback(self._fd, self._size, len(data))
        self._size += len(data)

    def _close_sync(self) -> B3Digest:
        digest = B3Digest(self._hasher.digest())
        target = self._service.blob_path(digest)
        fd, self._fd = self._fd, -1
        try:
            existing_size = os.stat(target).st_size
        except FileNotFoundError:
            existing_size = None
        if existing_size == self._size:
            # Same digest, same bytes: whoever wrote it first wins. (A file
            # of another size was damaged; publishing replaces it.)
            os.close(fd)
            return digest
        self._service.local.publish(fd, self._temp_path, target)
        return digest

    def _after_close(self) -> None:
        # After a successful rename this is a no-op (ENOENT); otherwise it
        # drops the temp file of a duplicate or of a failed publish.
        remove_quietly(self._temp_path)

    async def abort(self) -> None:
        self._done = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        remove_quietly(self._temp_path)


class RawFileBlobService(BlobService):
    """Blobs as files under `root` (see the module docstring for the layout).

    Nothing is touched on construction; the directories are created (and
    stale temp files of dead writers removed) on the first operation.
    """

    local_reads = True
    prefetches = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.local = LocalRoot(root, RAW_LAYOUT, OBJECT_STORE_LAYOUT)
        self._blob_dir = os.path.join(root, "b3")
        self.packs = PackedBlobs(root)

    def blob_path(self, digest: B3Digest) -> str:
        """Where the blob with `digest` lives (whether or not it exists)."""
        hexdigest = digest.hex()
        return os.path.join(self._blob_dir, hexdigest[:2], hexdigest)

    async def has(self, digest: B3Digest) -> bool:
        await self.local.prepare()
        # Inline for the reason RawFileReader reads inline: a local stat is
        # cheaper than the thread hop that would wrap it.
        return self.packs.has(digest) or os.path.exists(self.blob_path(digest))  # noqa: ASYNC240

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        await self.local.prepare()
        place = self.packs.find(digest)
        if place is not None:
            return PackedReader(*place, digest)
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"opening blob file {path}: {e}") from e
        try:
            return RawFileReader(fd, path)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"opening blob file {path}: {e}") from e

    def read_small(self, digest: B3Digest, size: int) -> bytes | None:
        try:
            data = self.packs.read(digest)
            if data is None:
                with open(self.blob_path(digest), "rb", buffering=0) as f:
                    data = f.read(size + 1)
        except (OSError, StoreError):
            return None
        if len(data) != size or blake3.blake3(data).digest() != digest:
            self.packs.forget([digest])  # if packed: its place may have moved
            return None
        return data

    def locate(self, digests: Sequence[B3Digest]) -> None:
        with contextlib.suppress(StoreError):
            self.packs.find_many(digests)

    def prefetch(self, digests: Sequence[B3Digest]) -> None:
        for digest in digests:
            if self.packs.prefetch(digest):
                continue
            try:
                fd = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # missing: the read will say so
            try:
                # Asynchronous in the kernel: this returns before the pages are in.
                os.posix_fadvise(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    async def open_write(self) -> BlobWriter:
        await self.local.prepare()
        fd, temp_path = self.local.create_temp()
        return RawFileWriter(self, fd, temp_path)

    async def put(self, data: bytes) -> B3Digest:
        """A whole blob in one worker-thread hop (check, create, write,
        rename), where a writer costs two and creates its temp file in the
        event loop's thread. A blob stored already is left as it is."""
        await self.local.prepare()
        return await trio.to_thread.run_sync(self._put_sync, data)

    async def put_batch(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Every missing blob of the batch in one worker-thread hop."""
        await self.local.prepare()
        await trio.to_thread.run_sync(self._put_batch_sync, blobs)

    async def sync(self) -> None:
        await self.local.sync()  # one syncfs: the packs and their index too

    async def aclose(self) -> None:
        self.packs.close()

    def _put_sync(self, data: bytes) -> B3Digest:
        digest = B3Digest.of(data)
        self._store_sync(digest, data)
        return digest

    def _put_batch_sync(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """The small blobs into a pack, in their order; the others as files.
        A blob stored already (packed or as a file, of its size) is left."""
        small: list[tuple[B3Digest, bytes]] = []
        # Which are packed already: one query for the batch, not one a blob.
        packed = self.packs.packed_whole(
            [(digest, len(data)) for digest, data in blobs if len(data) <= MAX_PACKED]
        )
        # A small blob may also be a file of its own (stored before packs, or
        # by another process's put): looked for only under the prefix
        # directories there are, one listing rather than a stat a blob (each
        # syscall lets go of the GIL, and taking it back waits for the loop).
        prefixes: set[str] | None
        try:
            prefixes = set(os.listdir(self._blob_dir))
        except FileNotFoundError:
            prefixes = set()
        except OSError:
            prefixes = None  # unlistable: look for each (its stat will say why)
        for digest, data in blobs:
            if len(data) > MAX_PACKED:
                self._store_sync(digest, data)
            elif digest not in packed and not (
                (prefixes is None or digest.hex()[:2] in prefixes)
                and self._stored_as_file(digest, len(data))
            ):
                packed.add(digest)  # once, should the batch hold it twice
                small.append((digest, data))
        self.packs.append(small)

    def _stored(self, digest: B3Digest, size: int) -> bool:
        return self.packs.has(digest, size) or self._stored_as_file(digest, size)

    def _stored_as_file(self, digest: B3Digest, size: int) -> bool:
        try:
            return os.stat(self.blob_path(digest)).st_size == size
        except FileNotFoundError:
            return False

    def _store_sync(self, digest: B3Digest, data: bytes) -> None:
        target = self.blob_path(digest)
        if self._stored(digest, len(data)):
            return  # stored already: nothing to write
        try:
            self.local.write_file(target, data)
        except OSError as e:
            raise StoreError(f"storing blob {digest} in {self.root}: {e}") from e
