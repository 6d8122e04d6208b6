"""Import local trees into a store, and render stored trees back as NARs.

`import_path` gives a tree the store path `nix-store --add` prints and records
it the way tvix-store's import does: blobs for file contents, Directories put
leaves first, and a PathInfo with the NAR's size and sha256, a `nar:sha256`
content address and no references.

How an import runs, so that both cores work and no NAR is ever built:

- A walker, in one worker thread, reads the tree depth first in name order
  (names sort by their bytes in the NAR and in castore alike): it lists each
  directory, opens, stats and reads each file once, feeds every byte to the
  NAR's sha256 and to the file's BLAKE3, and completes each Directory after
  its children (the leaves-first order a tree upload needs). It costs no
  thread hop per file: it is plain blocking code from start to end.
- What it makes travels in batches (small files whole, a large file's
  chunks, the Directories completed) of about BATCH_BYTES, through a channel
  of BATCHES_IN_FLIGHT, to a task in trio that hands each batch to the
  store: the blobs in one `put_batch` (one worker-thread hop for the
  embedded store, whose thread writes the files while the walker reads the
  next ones; two batches at once, see BlobBatcher), the Directories to a
  tree upload. Memory is bounded by that: a few batches, the walker's stack
  of directory listings, and what the tree upload keeps (for the embedded
  store, each Directory's digest).
- On a cold cache, reading small files one after the other leaves the disk
  idle between them (the kernel reads ahead within a file, not across
  files): a prefetcher thread walks the same tree a few hundred files ahead
  and asks the kernel for each (posix_fadvise WILLNEED, which reads in the
  background), so many reads are in flight and the walker finds its files
  in the page cache.
- Durability has one point (`put_durably`). After the walk, the tree upload
  is finished, `blobs.sync()` makes every blob durable (one syncfs for the
  embedded store, not an fsync per file), and only then is the PathInfo put. A crash
  at any moment before leaves blobs and Directories that nothing refers to,
  which are harmless and which the next import of the tree reuses; a crash
  after leaves a PathInfo whose whole tree is on disk.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from typing import Final

import blake3
import trio

from tvix_mountd.castore import storepath
from tvix_mountd.castore.blobs import (
    BATCH_BYTES,
    BATCH_FILES,
    BlobBatcher,
    BlobWriter,
    check_stored,
)
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import TreeUpload
from tvix_mountd.castore.errors import (
    IntegrityError,
    StoreError,
    ValidationError,
    first_error,
)
from tvix_mountd.castore.nar import NAR_MAGIC, NarHasher, NarWriter
from tvix_mountd.castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_mountd.castore.pathinfo import CAHashType, ContentAddress, PathInfo
from tvix_mountd.castore.pathinfos import put_durably
from tvix_mountd.castore.store import Store

# A file up to this size is read whole and stored in a batch; a larger one is
# streamed in pieces of this size through a blob writer.
CHUNK_SIZE: Final = 1 << 20
# Batches are of the BlobBatcher's measure (BATCH_BYTES, BATCH_FILES); one
# also ends after a large file's last piece. The walker may be this many
# batches ahead of the store.
BATCHES_IN_FLIGHT: Final = 2
# Files the prefetcher may be ahead of the walker by, and how much of each
# it asks the kernel for (the rest of a larger file comes with the kernel's
# readahead once the walker reads it).
PREFETCH_FILES: Final = 256
PREFETCH_BYTES: Final = 256 << 10
# The walker reports its progress to the prefetcher every so many files.
_PREFETCH_STEP: Final = 32
# A batch also ends at this many pieces of NAR (a few per entry), so that
# entries without contents (symlinks, directories) are bounded too.
_NAR_PIECES_PER_BATCH: Final = 8 * BATCH_FILES

# O_NONBLOCK: a file swapped for a fifo after the listing must not hang open();
# fstat then rejects it. O_NOFOLLOW: nor may it turn into a symlink we follow.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class ImportSourceError(ValidationError):
    """The local tree holds something Nix cannot archive, or changed while being read."""


@dataclass(slots=True)
class ImportProgress:
    """How far an import got: the walker updates it, a display may read it
    from another thread at any time (each field is one assignment)."""

    files: int = 0
    """Files and symlinks read."""
    bytes_read: int = 0
    """File contents read."""
    current: bytes = b""
    """The path being read."""


class _Kind(Enum):
    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class _Entry:
    name: bytes
    path: bytes
    kind: _Kind
    target: bytes = b""


@dataclass(slots=True)
class _Frame:
    """A directory being walked: its sorted entries and the nodes made so far."""

    name: bytes
    entries: list[_Entry]
    index: int = 0
    nodes: list[tuple[bytes, Node]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _LargeFileEnd:
    """The last piece of a streamed file is in the batch: its digest, as hashed
    by the walker (the blob service's answer must match)."""

    digest: B3Digest
    path: bytes


@dataclass(slots=True)
class _Batch:
    """What the walker hands to the store at once."""

    blobs: list[tuple[B3Digest, bytes]] = field(default_factory=list)
    """Small files, whole."""
    pieces: list[bytes] = field(default_factory=list)
    """In order, pieces of the one large file being streamed."""
    large_end: _LargeFileEnd | None = None
    directories: list[Directory] = field(default_factory=list)
    """Completed, leaves first."""
    nar: list[bytes] = field(default_factory=list)
    """The NAR's next pieces, in order (structure, and the contents above)."""
    size: int = 0
    """Bytes of file contents held."""


def _unsupported(path: bytes, mode: int) -> ImportSourceError:
    kinds = (
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    what = next((name for test, name in kinds if test(mode)), f"of mode {mode:o}")
    # Nix says "file '...' has an unsupported type"; ours also says which.
    return ImportSourceError(
        f"file {os.fsdecode(path)!r} has an unsupported type: it is {what}"
        " (Nix archives only regular files, directories and symlinks)"
    )


def _classify(path: bytes) -> _Entry:
    """The root of an import; runs in a worker thread. OSError if it does not exist."""
    st = os.lstat(path)
    name = os.path.basename(path)
    if stat.S_ISDIR(st.st_mode):
        return _Entry(name, path, _Kind.DIRECTORY)
    if stat.S_ISLNK(st.st_mode):
        return _Entry(name, path, _Kind.SYMLINK, os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return _Entry(name, path, _Kind.FILE)
    raise _unsupported(path, st.st_mode)


def _list_directory(path: bytes) -> list[_Entry]:
    """A directory's entries sorted by name bytes.

    d_type answers the kind without a stat per entry; files are stat'ed later
    through the descriptor they are read from, so size and mode match the
    bytes read.
    """
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_symlink():
                entries.append(_Entry(e.name, e.path, _Kind.SYMLINK, os.readlink(e.path)))
            elif e.is_dir(follow_symlinks=False):
                entries.append(_Entry(e.name, e.path, _Kind.DIRECTORY))
            elif e.is_file(follow_symlinks=False):
                entries.append(_Entry(e.name, e.path, _Kind.FILE))
            else:
                raise _unsupported(e.path, e.stat(follow_symlinks=False).st_mode)
    entries.sort(key=lambda entry: entry.name)
    return entries


def _read_full(fd: int, n: int) -> bytes:
    """Up to `n` bytes, fewer only at end of file (read(2) may return short)."""
    parts = []
    remaining = n
    while remaining:
        data = os.read(fd, remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Prefetcher:
    """Asks the kernel to read files before the walker opens them (see the
    module docstring). `run` is blocking, for its own worker thread; it walks
    the tree in the walker's order and stays at most PREFETCH_FILES files
    ahead. Best effort: whatever fails here is skipped (the walker meets it
    again and reports it)."""

    def __init__(self) -> None:
        self._room = threading.Semaphore(PREFETCH_FILES)
        self._stopped = False

    def consumed(self, files: int) -> None:
        """The walker opened `files` more files."""
        self._room.release(files)

    def stop(self) -> None:
        self._stopped = True
        self._room.release(PREFETCH_FILES)  # wakes a `run` waiting for room

    @staticmethod
    def _sorted(path: bytes) -> Iterator[os.DirEntry[bytes]]:
        try:
            with os.scandir(path) as it:
                return iter(sorted(it, key=_entry_name))
        except OSError:
            return iter(())

    def run(self, root: bytes) -> None:
        stack = [self._sorted(root)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(self._sorted(entry.path))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            self._room.acquire()
            if self._stopped:
                return
            try:
                fd = os.open(entry.path, _OPEN_FLAGS)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


_entry_name = attrgetter("name")


class _Walker:
    """The reading half of an import; `run` is blocking, for one worker thread.

    `send` hands a batch to the store's side (and blocks while the store is
    BATCHES_IN_FLIGHT behind); it raises if the import was cancelled.
    """

    def __init__(
        self,
        send: Callable[[_Batch], None],
        progress: ImportProgress,
        prefetcher: _Prefetcher | None,
    ) -> None:
        self.nar = NarWriter(self._nar_piece)
        self._send = send
        self._progress = progress
        self._prefetcher = prefetcher
        self._opened = 0
        self._batch = _Batch()

    def run(self, root: _Entry) -> Node:
        self.nar.write(NAR_MAGIC)
        node = self._leaf(root) if root.kind is not _Kind.DIRECTORY else self._tree(root)
        self._flush()
        return node

    def _tree(self, root: _Entry) -> DirectoryNode:
        self.nar.directory_open()
        stack = [_Frame(root.name, _list_directory(root.path))]
        # An explicit stack rather than recursion: trees deeper than Python's
        # recursion limit are legal on disk.
        while True:
            if len(self._batch.nar) >= _NAR_PIECES_PER_BATCH:
                self._flush()  # a tree of symlinks and directories sends batches too
            frame = stack[-1]
            if frame.index < len(frame.entries):
                entry = frame.entries[frame.index]
                frame.index += 1
                self.nar.entry_open(entry.name)
                if entry.kind is _Kind.DIRECTORY:
                    self.nar.directory_open()
                    stack.append(_Frame(entry.name, _list_directory(entry.path)))
                else:
                    frame.nodes.append((entry.name, self._leaf(entry)))
                    self.nar.entry_close()
                continue
            stack.pop()
            self.nar.directory_close()
            directory = Directory(frame.nodes)
            self._batch.directories.append(directory)
            node = directory.as_node()
            if not stack:
                return node
            self.nar.entry_close()
            stack[-1].nodes.append((frame.name, node))

    def _leaf(self, entry: _Entry) -> Node:
        progress = self._progress
        progress.current = entry.path
        progress.files += 1
        if entry.kind is _Kind.SYMLINK:
            self.nar.symlink(entry.target)
            return SymlinkNode(entry.target)
        return self._file(entry.path)

    def _file(self, path: bytes) -> FileNode:
        fd = os.open(path, _OPEN_FLAGS)
        self._opened += 1
        if self._prefetcher is not None and self._opened % _PREFETCH_STEP == 0:
            self._prefetcher.consumed(_PREFETCH_STEP)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _unsupported(path, st.st_mode)
            size = st.st_size
            # Nix's rule (archive.cc): the owner's x bit alone decides.
            executable = bool(st.st_mode & stat.S_IXUSR)
            self.nar.file_header(size, executable)
            if size <= CHUNK_SIZE:
                digest = self._small_file(fd, size, path)
            else:
                digest = self._large_file(fd, size, path)
        finally:
            os.close(fd)
        self.nar.file_trailer(size)
        return FileNode(digest, size, executable)

    def _small_file(self, fd: int, size: int, path: bytes) -> B3Digest:
        # One read(2) of a byte more than fstat said: it returns short at the
        # end of the file, and a file that grew since the fstat shows it.
        data = os.read(fd, size + 1)
        if len(data) < size:
            data += _read_full(fd, size + 1 - len(data))
        if len(data) != size:
            raise ImportSourceError(f"file {os.fsdecode(path)!r} changed size while read")
        self.nar.write(data)
        self._progress.bytes_read += size
        digest = B3Digest(blake3.blake3(data).digest())
        batch = self._batch
        batch.blobs.append((digest, data))
        batch.size += size
        if batch.size >= BATCH_BYTES or len(batch.blobs) >= BATCH_FILES:
            self._flush()
        return digest

    def _large_file(self, fd: int, size: int, path: bytes) -> B3Digest:
        """Streamed in pieces of CHUNK_SIZE, each sent on as soon as a batch is full."""
        hasher = blake3.blake3()
        read = 0
        while True:
            piece = _read_full(fd, CHUNK_SIZE)
            read += len(piece)
            if read > size:
                raise ImportSourceError(f"file {os.fsdecode(path)!r} grew while read")
            if piece:
                self.nar.write(piece)
                hasher.update(piece)
                self._progress.bytes_read += len(piece)
                self._batch.pieces.append(piece)
                self._batch.size += len(piece)
            if len(piece) < CHUNK_SIZE:
                break
            if self._batch.size >= BATCH_BYTES:
                self._flush()
        if read != size:
            raise ImportSourceError(f"file {os.fsdecode(path)!r} shrank while read")
        digest = B3Digest(hasher.digest())
        self._batch.large_end = _LargeFileEnd(digest, path)
        # A batch holds pieces of one file only.
        self._flush()
        return digest

    def _nar_piece(self, data: bytes) -> None:
        self._batch.nar.append(data)

    def _flush(self) -> None:
        batch, self._batch = self._batch, _Batch()
        if batch.blobs or batch.pieces or batch.large_end or batch.directories or batch.nar:
            self._send(batch)


async def _hash_nar(
    pieces: trio.MemoryReceiveChannel[list[bytes]], update: Callable[[bytes], object]
) -> None:
    """The NAR's sha256 (`update`), in a worker thread of its own: hashing is
    the largest part of reading a large file, and here it runs beside the
    reading."""

    def hash_batch(batch: list[bytes]) -> None:
        for piece in batch:
            update(piece)

    async with pieces:
        async for batch in pieces:
            await trio.to_thread.run_sync(hash_batch, batch)


async def _store_batches(
    store: Store,
    batches: trio.MemoryReceiveChannel[_Batch],
    tree: TreeUpload,
    nar: trio.MemorySendChannel[list[bytes]],
) -> None:
    """The storing half of an import: each batch to the store; small blobs
    CONCURRENT_PUTS batches at once, a large file's pieces and the
    Directories in order; the NAR's pieces on to `nar`, in order."""
    writer: BlobWriter | None = None
    try:
        async with batches, nar, trio.open_nursery() as puts:
            batcher = BlobBatcher(store.blobs, puts)
            async for batch in batches:
                if batch.nar:
                    await nar.send(batch.nar)
                if batch.blobs:
                    await batcher.put(batch.blobs)
                for piece in batch.pieces:
                    if writer is None:
                        writer = await store.blobs.open_write()
                    await writer.write(piece)
                if batch.large_end is not None:
                    assert writer is not None, "a large file ends after its pieces"
                    finished, writer = writer, None
                    what = repr(os.fsdecode(batch.large_end.path))
                    check_stored(what, batch.large_end.digest, await finished.close())
                if batch.directories:
                    await tree.add(batch.directories)
    finally:
        if writer is not None:
            with trio.CancelScope(shield=True):
                await writer.abort()


def _normalise(path: str | os.PathLike[str]) -> bytes:
    # Bytes throughout: names that are not UTF-8 are legal on disk and in NARs.
    # Lexical `..` and trailing slashes, as Nix's canonPath: a trailing slash
    # does not make it follow a symlink.
    return os.fsencode(os.path.normpath(os.fspath(path)))


def _store_name(path: bytes, name: str | None) -> str:
    if name is None:
        raw = os.path.basename(path)
        if not raw:
            raise ValidationError(
                f"cannot name a store path after {os.fsdecode(path)!r}; pass a name"
            )
    else:
        raw = os.fsencode(name)
    try:
        return storepath.validate_name(raw)
    except ValidationError as e:
        raise ValidationError(
            f"cannot import {os.fsdecode(path)!r}: {os.fsdecode(raw)!r} is not a valid"
            f" store path name: {e}"
        ) from e


async def import_path(
    store: Store,
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    progress: ImportProgress | None = None,
) -> PathInfo:
    """Import the tree at `path` and register it under the store path
    `nix-store --add` would give it (`name` defaults to the basename).

    `path` itself may be a directory, a regular file or a symlink (not
    followed). `progress`, if given, is kept up to date while the tree is
    read. Raises ValidationError for a bad name (before reading anything),
    ImportSourceError for a fifo, socket or device, or a file changing while
    read, OSError if the tree cannot be read, and StoreError if the store
    fails.
    """
    raw_path = _normalise(path)
    store_name = _store_name(raw_path, name)
    root = await trio.to_thread.run_sync(_classify, raw_path)
    send, receive = trio.open_memory_channel[_Batch](BATCHES_IN_FLIGHT)
    prefetcher = _Prefetcher() if root.kind is _Kind.DIRECTORY else None
    walker = _Walker(
        lambda batch: trio.from_thread.run(send.send, batch),
        progress if progress is not None else ImportProgress(),
        prefetcher,
    )
    tree = store.directories.open_tree_upload()
    nar_sha256 = hashlib.sha256()
    nar_send, nar_receive = trio.open_memory_channel[list[bytes]](BATCHES_IN_FLIGHT)
    walked: list[Node] = []

    async def walk() -> None:
        try:
            async with send:
                walked.append(await trio.to_thread.run_sync(walker.run, root))
        finally:
            if prefetcher is not None:
                prefetcher.stop()

    try:
        async with trio.open_nursery() as nursery:
            if prefetcher is not None:
                nursery.start_soon(trio.to_thread.run_sync, prefetcher.run, root.path)
            nursery.start_soon(walk)
            nursery.start_soon(_hash_nar, nar_receive, nar_sha256.update)
            await _store_batches(store, receive, tree, nar_send)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    (node,) = walked
    if isinstance(node, DirectoryNode):
        stored = await tree.finish()
        if stored != node.digest:
            raise IntegrityError(f"directory service stored the root as {stored}")
    digest = nar_sha256.digest()
    info = PathInfo(
        store_path=storepath.source_store_path(digest, store_name),
        node=node,
        nar_size=walker.nar.size,
        nar_sha256=digest,
        ca=ContentAddress(CAHashType.NAR_SHA256, digest),
    )
    return await put_durably(store.blobs, store.path_infos, info)


async def write_nar(store: Store, node: Node, sink: Callable[[bytes], object]) -> tuple[int, bytes]:
    """Write the NAR of the tree at `node` to `sink`; returns its size and sha256.

    `sink` is called with successive pieces (about 1 MiB at most); if it
    returns an awaitable (a trio stream's `send_all`, say), that is awaited
    before the next piece, so a slow consumer slows the rendering down rather
    than letting it pile up. Raises StoreError if a Directory or blob is
    missing, IntegrityError if one does not match what its parent says.
    """
    pending: list[bytes] = []
    nar = NarHasher(pending.append)

    async def flush() -> None:
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        result = sink(data)
        if inspect.isawaitable(result):
            await result

    async def visit(node: Node) -> Iterator[tuple[bytes, Node]] | None:
        """Emit a leaf, or open a directory and return its entries to walk."""
        match node:
            case SymlinkNode(target):
                nar.symlink(target)
            case FileNode(digest, size, executable):
                await write_file(digest, size, executable)
            case DirectoryNode(digest, size):
                directory = await store.directories.get(digest)
                if directory is None:
                    raise StoreError(f"directory {digest} not found")
                if directory.size != size:
                    raise IntegrityError(
                        f"directory {digest} has size {directory.size}, its parent said {size}"
                    )
                nar.directory_open()
                return iter(directory.items())
        return None

    async def write_file(digest: B3Digest, size: int, executable: bool) -> None:
        reader = await store.blobs.open_read(digest)
        if reader is None:
            raise StoreError(f"blob {digest} not found")
        try:
            nar.file_header(size, executable)
            offset = 0
            # Read until a short read: that is when the verifying reader checks
            # the digest, even for a size that is a multiple of the chunk.
            while True:
                data = await reader.read_at(offset, CHUNK_SIZE)
                offset += len(data)
                if offset > size:
                    raise IntegrityError(f"blob {digest} is longer than its node's {size} bytes")
                nar.write(data)
                await flush()
                if len(data) < CHUNK_SIZE:
                    break
            if offset != size:
                raise IntegrityError(f"blob {digest} has {offset} bytes, its node says {size}")
            nar.file_trailer(size)
        finally:
            await reader.aclose()

    nar.write(NAR_MAGIC)
    stack: list[Iterator[tuple[bytes, Node]]] = []
    entries = await visit(node)
    if entries is not None:
        stack.append(entries)
    while stack:
        await flush()
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            nar.directory_close()
            if stack:
                nar.entry_close()
            continue
        name, child = entry
        nar.entry_open(name)
        entries = await visit(child)
        if entries is None:
            nar.entry_close()
        else:
            stack.append(entries)
    await flush()
    return nar.size, nar.digest()
