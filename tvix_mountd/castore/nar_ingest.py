"""Ingest a NAR stream into castore: blobs for file contents, Directories, a root node.

The counterpart of `importer.write_nar`, for NARs that arrive from elsewhere
(a Nix binary cache). The NAR is read as it arrives, in blocks, and never
held whole: file contents go to the blob service in pieces of at most
CHUNK_SIZE (small files only if the service lacks them), and what is kept
is one Directory per directory, which the tree needs anyway.

Two things overlap with the parsing, in tasks of one nursery: reading the
next block (decompressing it, for a cache), and storing small files, in
batches (`BlobBatcher`: one `put_batch` per batch of about 4 MiB, one
worker-thread hop for the embedded store, two batches at once). Memory stays
bounded by those: a block or two, and three batches.

The NAR is checked as Nix's parser checks it (tokens, zero padding, names
strictly sorted, no `.`, `..`, `/` or NUL in names, nothing after the end),
and its size and sha256 against what the caller expects. Directories are
stored (`put_tree`, one transaction for the embedded store) only after the
whole NAR was read and matched: a truncated or corrupt NAR leaves at most
unreferenced blobs behind, never a tree that looks complete. Blobs are not
durable when this returns: the caller records the path with `put_durably`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from tvix_mountd.castore.blobs import BlobBatcher, BlobService, BlobUpload
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.errors import IntegrityError, ValidationError, first_error
from tvix_mountd.castore.importer import CHUNK_SIZE
from tvix_mountd.castore.nar import (
    CLOSE,
    CONTENTS,
    NAME,
    NAR_MAGIC,
    NODE,
    OPEN,
    TARGET,
    TYPE,
    nar_string,
)
from tvix_mountd.castore.nodes import (
    MAX_NAME_LEN,
    MAX_TARGET_LEN,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
    validate_symlink_target,
)

# The longest token a NAR has besides names and targets ("executable").
_MAX_TOKEN_LEN: Final = 16
_U64: Final = struct.Struct("<Q")
_ZEROS: Final = bytes(8)
_EMPTY_STRING: Final = nar_string(b"")


class NarError(IntegrityError):
    """The stream is not a well-formed NAR, or not the NAR that was expected."""


@dataclass(frozen=True, slots=True)
class IngestedNar:
    node: Node
    nar_size: int
    nar_sha256: bytes


class _Prefetch:
    """`next_block` called one block ahead, in a task: the next block is read
    (and decompressed) while this one is parsed. Its errors arrive in order,
    where the block would have."""

    def __init__(self, next_block: Callable[[], Awaitable[bytes]], nursery: trio.Nursery) -> None:
        send, self._receive = trio.open_memory_channel[bytes | Exception](1)
        nursery.start_soon(self._pump, next_block, send)

    @staticmethod
    async def _pump(
        next_block: Callable[[], Awaitable[bytes]], send: trio.MemorySendChannel[bytes | Exception]
    ) -> None:
        async with send:
            while True:
                try:
                    block = await next_block()
                except Exception as e:
                    await send.send(e)
                    return
                await send.send(block)
                if not block:
                    return

    async def next_block(self) -> bytes:
        item = await self._receive.receive()
        if isinstance(item, Exception):
            raise item
        return item


class _Reader:
    """The NAR's bytes, in blocks from `next_block`; hashes and counts every byte."""

    def __init__(
        self, next_block: Callable[[], Awaitable[bytes]], max_size: int | None, hashed: bool
    ) -> None:
        """`hashed`: the source hashes the blocks itself (`sha256` stays unused)."""
        self._next_block = next_block
        self._max_size = max_size
        self._buf = b""
        self._pos = 0
        self.sha256 = hashlib.sha256()
        self._hashed = hashed
        self.size = 0

    async def _fill(self) -> bool:
        """Append the next block; False at the end of the stream."""
        block = await self._next_block()
        if not block:
            return False
        if not self._hashed:
            self.sha256.update(block)
        self.size += len(block)
        if self._max_size is not None and self.size > self._max_size:
            raise NarError(f"NAR is longer than the expected {self._max_size} bytes")
        self._buf = self._buf[self._pos :] + block
        self._pos = 0
        return True

    async def _need(self, n: int) -> None:
        while len(self._buf) - self._pos < n:
            if not await self._fill():
                raise NarError(f"NAR ends early, after {self.size} bytes")

    async def read(self, n: int) -> bytes:
        """Exactly `n` bytes (n small, or at most CHUNK_SIZE)."""
        await self._need(n)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    async def read_some(self, n: int) -> bytes:
        """1 to `n` bytes: what is buffered, or the next block's."""
        if self._pos == len(self._buf):
            await self._need(1)
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    @property
    def offset(self) -> int:
        """Bytes of the NAR consumed so far."""
        return self.size - (len(self._buf) - self._pos)

    async def expect(self, token: bytes) -> None:
        data = await self.read(len(token))
        if data != token:
            raise NarError(
                f"NAR: unexpected bytes at {self.offset - len(token)}: {data[:64]!r},"
                f" expected {token[:64]!r}"
            )

    async def u64(self) -> int:
        value: int = _U64.unpack(await self.read(8))[0]
        return value

    async def padding(self, length: int) -> None:
        pad = (-length) % 8
        if pad and await self.read(pad) != _ZEROS[:pad]:
            raise NarError("NAR: padding is not zero")

    async def string(self, limit: int, what: str) -> bytes:
        length = await self.u64()
        if length > limit:
            raise NarError(f"NAR: {what} of {length} bytes, at most {limit} allowed")
        data = await self.read(length)
        await self.padding(length)
        return data

    async def at_end(self) -> bool:
        return self._pos == len(self._buf) and not await self._fill()


@dataclass(slots=True)
class _Frame:
    """A directory being read: its name in the parent and the entries so far."""

    name: bytes
    entries: list[tuple[bytes, Node]] = field(default_factory=list)
    last_name: bytes = b""


class _Ingest:
    def __init__(self, blobs: BlobService, reader: _Reader, uploads: trio.Nursery) -> None:
        self._blobs = blobs
        self._reader = reader
        self.small_files = BlobBatcher(blobs, uploads)
        self.directories: list[Directory] = []

    async def run(self) -> Node:
        r = self._reader
        await r.expect(NAR_MAGIC + OPEN + TYPE)
        stack: list[_Frame] = []
        node = await self._node_body(stack, b"")
        if node is not None:
            return node
        # An explicit stack rather than recursion: a NAR may nest deeper than
        # Python's recursion limit.
        while True:
            frame = stack[-1]
            tag = await r.string(_MAX_TOKEN_LEN, "token")
            if tag == b"entry":
                await r.expect(OPEN + NAME)
                name = await r.string(MAX_NAME_LEN, "entry name")
                try:
                    validate_name(name)
                except ValidationError as e:
                    raise NarError(f"NAR: {e}") from None
                if name <= frame.last_name:
                    raise NarError(f"NAR: entry {name!r} is not sorted after {frame.last_name!r}")
                frame.last_name = name
                await r.expect(NODE + OPEN + TYPE)
                node = await self._node_body(stack, name)
                if node is not None:
                    await r.expect(CLOSE)  # the entry's
                    frame.entries.append((name, node))
            elif tag == b")":
                stack.pop()
                directory = Directory(frame.entries)
                self.directories.append(directory)
                if not stack:
                    return directory.as_node()
                await r.expect(CLOSE)  # the entry's
                stack[-1].entries.append((frame.name, directory.as_node()))
            else:
                raise NarError(f"NAR: unexpected {tag!r} in a directory")

    async def _node_body(self, stack: list[_Frame], name: bytes) -> Node | None:
        """After `( type`: a leaf read through its `)`, or None for a directory
        (pushed onto `stack` to be read entry by entry)."""
        r = self._reader
        kind = await r.string(_MAX_TOKEN_LEN, "node type")
        if kind == b"regular":
            node: Node = await self._file()
        elif kind == b"symlink":
            await r.expect(TARGET)
            target = await r.string(MAX_TARGET_LEN, "symlink target")
            try:
                node = SymlinkNode(validate_symlink_target(target))
            except ValidationError as e:
                raise NarError(f"NAR: {e}") from None
        elif kind == b"directory":
            stack.append(_Frame(name))
            return None
        else:
            raise NarError(f"NAR: unknown node type {kind!r}")
        await r.expect(CLOSE)
        return node

    async def _file(self) -> FileNode:
        r = self._reader
        tag = await r.string(_MAX_TOKEN_LEN, "token")
        executable = tag == b"executable"
        if executable:
            await r.expect(_EMPTY_STRING + CONTENTS)
        elif tag != b"contents":
            raise NarError(f"NAR: expected 'contents', got {tag!r}")
        size = await r.u64()
        if size <= CHUNK_SIZE:
            data = await r.read(size)
            digest = B3Digest.of(data)
            # Stored in the background; every batch is stored before ingest_nar
            # stores a Directory (the nursery waits for them).
            await self.small_files.add(digest, data)
        else:
            digest = await self._streamed(size, f"the file at byte {r.offset} of the NAR")
        await r.padding(size)
        return FileNode(digest, size, executable)

    async def _streamed(self, size: int, what: str) -> B3Digest:
        upload = await BlobUpload.open(self._blobs, what)
        try:
            while upload.size < size:
                await upload.write(
                    await self._reader.read_some(min(size - upload.size, CHUNK_SIZE))
                )
            return await upload.close()
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise


async def ingest_nar(
    blobs: BlobService,
    directories: DirectoryService,
    next_block: Callable[[], Awaitable[bytes]],
    *,
    expected_size: int | None = None,
    expected_sha256: bytes | None = None,
    source_sha256: Callable[[], bytes] | None = None,
) -> IngestedNar:
    """Read a NAR from `next_block` (successive pieces, b"" at the end) into the
    services; returns its root node, size and sha256.

    `source_sha256`: the sha256 of every byte `next_block` gave, once it gave
    b"", from a source that hashes as it produces (off the loop's thread);
    without it the NAR is hashed here.

    NarError if the stream is not a NAR, has anything after it, or does not
    match `expected_size` / `expected_sha256` (checked before any Directory is
    stored); StoreError if a service fails.
    """
    try:
        async with trio.open_nursery() as nursery:
            reader = _Reader(
                _Prefetch(next_block, nursery).next_block,
                expected_size,
                hashed=source_sha256 is not None,
            )
            ingest = _Ingest(blobs, reader, nursery)
            node = await ingest.run()
            if not await reader.at_end():
                raise NarError(f"NAR: data after its end, at byte {reader.size}")
            await ingest.small_files.flush()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    sha256 = reader.sha256.digest() if source_sha256 is None else source_sha256()
    if expected_size is not None and reader.size != expected_size:
        raise NarError(f"NAR has {reader.size} bytes, expected {expected_size}")
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise NarError(f"NAR has sha256 {sha256.hex()}, expected {expected_sha256.hex()}")
    if ingest.directories:
        stored = await directories.put_tree(ingest.directories)
        if not isinstance(node, DirectoryNode) or stored != node.digest:
            raise IntegrityError(f"directory service stored the root as {stored}")
    return IngestedNar(node, reader.size, sha256)
