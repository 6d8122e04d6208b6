"""objectstore+file:// blobs: one plain file per blob under a local directory.

Layout under the root given by the address:

    b3/<first 2 hex chars>/<64 hex chars>   the blob's bytes, uncompressed
    tmp/<random>.tmp                        blobs being written

This is *not* tvix's object_store layout (which stores zstd-compressed chunks
and a chunk index per blob), so a directory written by one cannot be read by
the other. Uncompressed whole files are deliberate: the FUSE read path serves
a read with one pread on the blob file, and the kernel's page cache and
readahead do the rest.

Writes are atomic: a blob is streamed into a temp file while being hashed,
fsynced, then renamed to its digest's name (and the directory fsynced), so a
reader sees either no blob or all of it, also after a crash. Concurrent
writers of the same content are harmless: the second rename (or the early
"already there" check) leaves the same bytes in place.

Directories the store creates: the root (if missing) 0700, so a fresh store is
private; the subdirectories below it 0755, so access is decided by the root's
mode alone and an operator can share a store by creating the root with the
mode they want.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time

import blake3
import trio

from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError

# A temp file untouched for this long belongs to a writer that died (every
# write bumps its mtime), so it may be removed on start.
STALE_TEMP_AGE = 3600.0
_TEMP_SUFFIX = ".tmp"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobReader(BlobReader):
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


class FileBlobWriter(BlobWriter):
    """Streams into a temp file while hashing; `close` publishes it atomically.

    Disk writes and fsyncs run in a worker thread (they can take milliseconds
    and must not stall the event loop). Those threads are never abandoned:
    the file descriptor they use must stay theirs until they return.
    """

    def __init__(self, service: FileBlobService, fd: int, temp_path: str) -> None:
        self._service = service
        self._fd = fd
        self._temp_path = temp_path
        self._hasher = blake3.blake3()
        self._size = 0
        self._done = False

    def _check_open(self) -> None:
        if self._done:
            raise StoreError("blob writer is already closed")

    def _write_sync(self, data: bytes) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    async def write(self, data: bytes) -> None:
        self._check_open()
        if not data:
            return
        try:
            await trio.to_thread.run_sync(self._write_sync, data)
        except OSError as e:
            await self.abort()
            raise StoreError(f"writing blob temp file {self._temp_path}: {e}") from e

    def _publish_sync(self) -> B3Digest:
        digest = B3Digest(self._hasher.digest())
        target = self._service.blob_path(digest)
        fd, self._fd = self._fd, -1
        try:
            try:
                existing_size = os.stat(target).st_size
            except FileNotFoundError:
                existing_size = None
            if existing_size == self._size:
                # Same digest, same bytes: whoever wrote it first wins. (A file
                # of another size was damaged; the rename below repairs it.)
                return digest
            os.fchmod(fd, 0o444)
            os.fsync(fd)
        finally:
            os.close(fd)
        parent = os.path.dirname(target)
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass
        else:
            _fsync_dir(os.path.dirname(parent))
        os.rename(self._temp_path, target)
        _fsync_dir(parent)
        return digest

    async def close(self) -> B3Digest:
        self._check_open()
        self._done = True
        try:
            return await trio.to_thread.run_sync(self._publish_sync)
        except OSError as e:
            raise StoreError(f"storing blob from {self._temp_path}: {e}") from e
        finally:
            # After a successful rename this is a no-op (ENOENT); otherwise it
            # drops the temp file of a duplicate or of a failed publish.
            _remove_quietly(self._temp_path)

    async def abort(self) -> None:
        self._done = True
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        _remove_quietly(self._temp_path)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class FileBlobService(BlobService):
    """Blobs as files under `root` (see the module docstring for the layout).

    Nothing is touched on construction; the directories are created (and
    stale temp files of dead writers removed) on the first operation.
    """

    local_reads = True

    def __init__(self, root: str) -> None:
        self.root = root
        self._blob_dir = os.path.join(root, "b3")
        self._temp_dir = os.path.join(root, "tmp")
        self._ready = False

    def blob_path(self, digest: B3Digest) -> str:
        """Where the blob with `digest` lives (whether or not it exists)."""
        hexdigest = digest.hex()
        return os.path.join(self._blob_dir, hexdigest[:2], hexdigest)

    def _prepare_sync(self) -> None:
        for path, mode in ((self.root, 0o700), (self._blob_dir, 0o755), (self._temp_dir, 0o700)):
            try:
                os.makedirs(path, mode=mode, exist_ok=True)
            except OSError as e:
                raise StoreError(
                    f"blob store {self.root}: cannot create directory {path}: {e}"
                ) from e
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_AGE
        try:
            entries = list(os.scandir(self._temp_dir))
        except OSError:
            return
        for entry in entries:
            # Best effort: another process may remove the same file, or the
            # store may be read-only; neither should stop this one.
            with contextlib.suppress(OSError):
                if entry.name.endswith(_TEMP_SUFFIX) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    async def _prepare(self) -> None:
        if not self._ready:
            await trio.to_thread.run_sync(self._prepare_sync)
            self._ready = True

    async def has(self, digest: B3Digest) -> bool:
        await self._prepare()
        # Inline for the reason FileBlobReader reads inline: a local stat is
        # cheaper than the thread hop that would wrap it.
        return os.path.exists(self.blob_path(digest))  # noqa: ASYNC240

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        await self._prepare()
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"opening blob file {path}: {e}") from e
        try:
            return FileBlobReader(fd, path)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"opening blob file {path}: {e}") from e

    async def put(self, data: bytes) -> B3Digest:
        """A whole blob in one worker-thread hop (check, create, write, fsync,
        rename), where a writer costs two and creates its temp file in the event
        loop's thread, which waits there while other threads' fsyncs hold the
        journal. A blob stored already is left as it is."""
        await self._prepare()
        return await trio.to_thread.run_sync(self._put_sync, data)

    def _put_sync(self, data: bytes) -> B3Digest:
        digest = B3Digest.of(data)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.blob_path(digest)).st_size == len(data):
                return digest  # stored already: nothing to write
        writer = self._new_writer()
        try:
            writer._write_sync(data)
            return writer._publish_sync()
        except OSError as e:
            raise StoreError(f"storing blob from {writer._temp_path}: {e}") from e
        finally:
            if writer._fd >= 0:  # a failed write; publishing closes it
                os.close(writer._fd)
            _remove_quietly(writer._temp_path)

    async def open_write(self) -> BlobWriter:
        await self._prepare()
        return self._new_writer()

    def _new_writer(self) -> FileBlobWriter:
        temp_path = os.path.join(self._temp_dir, secrets.token_hex(16) + _TEMP_SUFFIX)
        try:
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ENOENT:
                # Someone removed tmp/ under us; recreate it on the next call.
                self._ready = False
            raise StoreError(f"blob store {self.root}: cannot create {temp_path}: {e}") from e
        return FileBlobWriter(self, fd, temp_path)
