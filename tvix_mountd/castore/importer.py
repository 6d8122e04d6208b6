"""Import local trees into a store, and render stored trees back as NARs.

`import_path` gives a tree the store path `nix-store --add` prints and records
it the way tvix-store's import does: blobs for file contents, Directories put
leaves first in one `put_tree` call, and a PathInfo with the NAR's size and
sha256, a `nar:sha256` content address and no references.

One depth-first walk in name order does all of it. Names sort by their bytes
in the NAR and in castore alike, so the NAR stream comes out in order while
each Directory is completed after its children (exactly the leaves-first order
`put_tree` needs). Every file is read once: each chunk feeds the NAR hash, our
own BLAKE3 hash and the blob writer (files up to one chunk are uploaded only
if the blob service lacks them). No NAR is ever built in memory.

Blocking file system calls run in worker threads: one hop per directory
(listing plus readlink of its symlinks) and one per file up to 1 MiB, then one
per further MiB.
"""

from __future__ import annotations

import inspect
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import trio

from tvix_mountd.castore import storepath
from tvix_mountd.castore.blobs import BlobUpload, put_if_missing
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import IntegrityError, StoreError, ValidationError
from tvix_mountd.castore.nar import NAR_MAGIC, NarHasher
from tvix_mountd.castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_mountd.castore.pathinfo import CAHashType, ContentAddress, PathInfo
from tvix_mountd.castore.store import Store

CHUNK_SIZE: Final = 1 << 20

# O_NONBLOCK: a file swapped for a fifo after the listing must not hang open();
# fstat then rejects it. O_NOFOLLOW: nor may it turn into a symlink we follow.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class ImportSourceError(ValidationError):
    """The local tree holds something Nix cannot archive, or changed while being read."""


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
    """A directory's entries sorted by name bytes; runs in a worker thread.

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


def _open_file(path: bytes) -> tuple[int | None, os.stat_result, bytes]:
    """Open, stat and read the first chunk in one thread hop.

    A file that fits in one chunk is closed here already (fd None), so a small
    file costs a single hop.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsupported(path, st.st_mode)
        first = _read_full(fd, CHUNK_SIZE)
    except BaseException:
        os.close(fd)
        raise
    if len(first) < CHUNK_SIZE:
        os.close(fd)
        return None, st, first
    return fd, st, first


class _Importer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.nar = NarHasher()
        self.directories: list[Directory] = []

    async def run(self, root: _Entry) -> Node:
        self.nar.write(NAR_MAGIC)
        if root.kind is not _Kind.DIRECTORY:
            return await self._leaf(root)
        self.nar.directory_open()
        stack = [_Frame(root.name, await trio.to_thread.run_sync(_list_directory, root.path))]
        # An explicit stack rather than recursion: trees deeper than Python's
        # recursion limit are legal on disk.
        while True:
            frame = stack[-1]
            if frame.index < len(frame.entries):
                entry = frame.entries[frame.index]
                frame.index += 1
                self.nar.entry_open(entry.name)
                if entry.kind is _Kind.DIRECTORY:
                    self.nar.directory_open()
                    listing = await trio.to_thread.run_sync(_list_directory, entry.path)
                    stack.append(_Frame(entry.name, listing))
                else:
                    frame.nodes.append((entry.name, await self._leaf(entry)))
                    self.nar.entry_close()
                continue
            stack.pop()
            self.nar.directory_close()
            directory = Directory(frame.nodes)
            self.directories.append(directory)
            if not stack:
                return directory.as_node()
            self.nar.entry_close()
            stack[-1].nodes.append((frame.name, directory.as_node()))

    async def _leaf(self, entry: _Entry) -> Node:
        if entry.kind is _Kind.SYMLINK:
            self.nar.symlink(entry.target)
            return SymlinkNode(entry.target)
        return await self._file(entry.path)

    async def _file(self, path: bytes) -> FileNode:
        fd, st, first = await trio.to_thread.run_sync(_open_file, path)
        try:
            size = st.st_size
            # Nix's rule (archive.cc): the owner's x bit alone decides.
            executable = bool(st.st_mode & stat.S_IXUSR)
            self.nar.file_header(size, executable)
            if fd is None:
                digest = await self._small_blob(path, first, size)
            else:
                digest = await self._streamed_blob(path, fd, first, size)
        finally:
            if fd is not None:
                os.close(fd)
        self.nar.file_trailer(size)
        return FileNode(digest, size, executable)

    async def _small_blob(self, path: bytes, data: bytes, size: int) -> B3Digest:
        """A file read whole in its first chunk: upload it only if missing."""
        if len(data) != size:
            raise ImportSourceError(f"file {os.fsdecode(path)!r} changed size while read")
        self.nar.write(data)
        return await put_if_missing(self._store.blobs, data, repr(os.fsdecode(path)))

    async def _streamed_blob(self, path: bytes, fd: int, first: bytes, size: int) -> B3Digest:
        """A file larger than a chunk: streamed through a writer as it is read."""
        upload = await BlobUpload.open(self._store.blobs, repr(os.fsdecode(path)))
        try:
            chunk = first
            while True:
                if upload.size + len(chunk) > size:
                    raise ImportSourceError(f"file {os.fsdecode(path)!r} grew while read")
                self.nar.write(chunk)
                await upload.write(chunk)
                if len(chunk) < CHUNK_SIZE:
                    break
                chunk = await trio.to_thread.run_sync(_read_full, fd, CHUNK_SIZE)
            if upload.size != size:
                raise ImportSourceError(f"file {os.fsdecode(path)!r} shrank while read")
            return await upload.close()
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise


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
    store: Store, path: str | os.PathLike[str], name: str | None = None
) -> PathInfo:
    """Import the tree at `path` and register it under the store path
    `nix-store --add` would give it (`name` defaults to the basename).

    `path` itself may be a directory, a regular file or a symlink (not
    followed). Raises ValidationError for a bad name (before reading
    anything), ImportSourceError for a fifo, socket or device, or a file
    changing while read, OSError if the tree cannot be read, and StoreError
    if the store fails.
    """
    raw_path = _normalise(path)
    store_name = _store_name(raw_path, name)
    root = await trio.to_thread.run_sync(_classify, raw_path)
    importer = _Importer(store)
    node = await importer.run(root)
    if importer.directories:
        stored = await store.directories.put_tree(importer.directories)
        if not isinstance(node, DirectoryNode) or stored != node.digest:
            raise IntegrityError(f"directory service stored the root as {stored}")
    nar_sha256 = importer.nar.digest()
    info = PathInfo(
        store_path=storepath.source_store_path(nar_sha256, store_name),
        node=node,
        nar_size=importer.nar.size,
        nar_sha256=nar_sha256,
        ca=ContentAddress(CAHashType.NAR_SHA256, nar_sha256),
    )
    return await store.path_infos.put(info)


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
