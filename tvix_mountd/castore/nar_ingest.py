"""Ingest a NAR stream into castore: blobs for file contents, Directories, a root node.

The counterpart of `importer.write_nar`, for NARs that arrive from elsewhere
(a Nix binary cache). The NAR is read as it arrives, in blocks, and never
held whole: file contents go to the blob service in pieces of at most
CHUNK_SIZE (small files in batches, `put_batch`), and what is kept is one
Directory per directory, which the tree needs anyway.

Two sides, so that the bytes are handled where the GIL is not fought over:

- A thread of its own reads the source (a download and its decompression),
  hashes every byte (sha256), parses the NAR and hashes each file's
  contents (BLAKE3): plain calls on a buffer, a few microseconds a file.
  It hands the trio side coarse pieces of work through a small channel:
  batches of small files of about BATCH_BYTES, and the pieces of each file
  larger than CHUNK_SIZE. Parsed on trio's thread instead, with an await
  per token (~90,000 for 5,000 files), the parse cost ~0.3 s of a 100 MiB
  zstd NAR's ~0.75 s ingest, and the thread that decompressed ahead
  (zstandard holds the GIL) stood while it ran (RESULTS.md, sixteenth
  session). trio's thread stays free for requests meanwhile.
- The trio side stores them (`BlobBatcher`: CONCURRENT_PUTS batches at
  once; a blob writer for each large file), and stores the Directories
  once the whole NAR was read and matched.

Memory stays bounded: the thread's buffer (a block or two), the batch it
gathers, the channel's few pieces, and the batches being stored.

The NAR is checked as Nix's parser checks it (tokens, zero padding, names
strictly sorted, no `.`, `..`, `/` or NUL in names, nothing after the end),
and its size and sha256 against what the caller expects. Directories are
stored (`put_tree`, one transaction for the embedded store) only after the
whole NAR was read and matched: a truncated or corrupt NAR leaves at most
unreferenced blobs behind, never a tree that looks complete. Blobs are not
durable when this returns: the caller records the path with `put_durably`.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

import blake3
import trio

from tvix_mountd.castore.blobs import (
    BATCH_BYTES,
    BATCH_FILES,
    BlobBatcher,
    BlobService,
    BlobWriter,
    check_stored,
)
from tvix_mountd.castore.blocking import ProgressDeadline
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
_ENTRY: Final = b"entry"
_END: Final = b")"
# Pieces of work waiting for the trio side: the thread runs this far ahead
# of the stores at most (a batch is BATCH_BYTES, a large file's piece
# CHUNK_SIZE).
PIECES_AHEAD: Final = 2


class NarError(IntegrityError):
    """The stream is not a well-formed NAR, or not the NAR that was expected."""


@dataclass(frozen=True, slots=True)
class IngestedNar:
    node: Node
    nar_size: int
    nar_sha256: bytes


class NarSource(ABC):
    """Where `ingest_nar` reads a NAR: `read`, `finish` and `close` are called
    in the ingest's thread, one after another; `interrupt` from trio's."""

    @abstractmethod
    def read(self) -> bytes:
        """The next piece of the NAR (blocking), b"" at its end."""

    def finish(self) -> None:  # noqa: B027 - most sources end with the NAR
        """After the NAR's end: check whatever the source has after it (a
        compressed file's trailer, its size and hash). Raises to fail the
        ingest."""

    def close(self) -> None:  # noqa: B027 - optional
        """The thread is done with the source, whatever the outcome."""

    def interrupt(self) -> None:  # noqa: B027 - a source that never blocks long
        """The ingest was given up: make a `read` that waits (on a network)
        fail soon. Called from trio's thread, maybe while `read` runs."""


class BlocksSource(NarSource):
    """A NAR already in memory, in pieces (what the tests feed the ingest)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = list(reversed(pieces))

    def read(self) -> bytes:
        return self._pieces.pop() if self._pieces else b""


# -- what the thread hands over ----------------------------------------------------


@dataclass(slots=True)
class _Batch:
    blobs: list[tuple[B3Digest, bytes]]


@dataclass(slots=True)
class _Piece:
    """Contents of the large file being read, in order."""

    data: bytes


@dataclass(slots=True)
class _FileEnd:
    """The large file whose pieces came last is complete."""

    digest: B3Digest
    what: str


@dataclass(slots=True)
class _Parsed:
    node: Node
    directories: list[Directory]
    size: int
    sha256: bytes


_Handed = _Batch | _Piece | _FileEnd | _Parsed | Exception


class _Stopped(Exception):
    """The trio side went away: the thread stops."""


@dataclass(slots=True)
class _Frame:
    """A directory being read: its name in the parent and the entries so far."""

    name: bytes
    entries: list[tuple[bytes, Node]]
    last_name: bytes = b""


class _Parser:
    """The NAR's syntax, in the calling thread: bytes from `source.read`,
    work out through `hand_over` (blocking while the trio side is busy)."""

    def __init__(
        self,
        source: NarSource,
        max_size: int | None,
        hand_over: _HandOver,
    ) -> None:
        self._source = source
        self._max_size = max_size
        self._hand_over = hand_over
        self._buf = b""
        self._pos = 0
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._batch: list[tuple[B3Digest, bytes]] = []
        self._batch_bytes = 0
        self._directories: list[Directory] = []

    # -- bytes --------------------------------------------------------------

    def _block(self) -> bytes:
        """The source's next block, counted and hashed; b"" at its end."""
        self._hand_over.check()
        block = self._source.read()
        if block:
            self._sha256.update(block)
            self.size += len(block)
            if self._max_size is not None and self.size > self._max_size:
                raise NarError(f"NAR is longer than the expected {self._max_size} bytes")
        return block

    def _fill(self, n: int) -> None:
        """At least `n` bytes in the buffer from `_pos` on."""
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        while have < n:
            block = self._block()
            if not block:
                raise NarError(f"NAR ends early, after {self.size} bytes")
            parts.append(block)
            have += len(block)
        self._buf = b"".join(parts)
        self._pos = 0

    @property
    def _offset(self) -> int:
        """Bytes of the NAR consumed so far."""
        return self.size - (len(self._buf) - self._pos)

    def _expect(self, token: bytes) -> None:
        if len(self._buf) - self._pos < len(token):
            self._fill(len(token))
        if not self._buf.startswith(token, self._pos):
            got = self._buf[self._pos : self._pos + len(token)]
            raise NarError(
                f"NAR: unexpected bytes at {self._offset}: {got[:64]!r}, expected {token[:64]!r}"
            )
        self._pos += len(token)

    def _u64(self) -> int:
        if len(self._buf) - self._pos < 8:
            self._fill(8)
        value: int = _U64.unpack_from(self._buf, self._pos)[0]
        self._pos += 8
        return value

    def _padding(self, length: int) -> None:
        pad = (-length) % 8
        if pad:
            if len(self._buf) - self._pos < pad:
                self._fill(pad)
            if self._buf[self._pos : self._pos + pad] != _ZEROS[:pad]:
                raise NarError("NAR: padding is not zero")
            self._pos += pad

    def _string(self, limit: int, what: str) -> bytes:
        length = self._u64()
        if length > limit:
            raise NarError(f"NAR: {what} of {length} bytes, at most {limit} allowed")
        if len(self._buf) - self._pos < length:
            self._fill(length)
        data = self._buf[self._pos : self._pos + length]
        self._pos += length
        self._padding(length)
        return data

    def _at_end(self) -> bool:
        return self._pos == len(self._buf) and not self._block()

    # -- the grammar ------------------------------------------------------

    def run(self) -> _Parsed:
        self._expect(NAR_MAGIC + OPEN + TYPE)
        stack: list[_Frame] = []
        root = self._node_body(stack, b"")
        while root is None:
            # An explicit stack rather than recursion: a NAR may nest deeper
            # than Python's recursion limit.
            frame = stack[-1]
            tag = self._string(_MAX_TOKEN_LEN, "token")
            if tag == _ENTRY:
                self._expect(OPEN + NAME)
                name = self._string(MAX_NAME_LEN, "entry name")
                try:
                    validate_name(name)
                except ValidationError as e:
                    raise NarError(f"NAR: {e}") from None
                if name <= frame.last_name:
                    raise NarError(f"NAR: entry {name!r} is not sorted after {frame.last_name!r}")
                frame.last_name = name
                self._expect(NODE + OPEN + TYPE)
                node = self._node_body(stack, name)
                if node is not None:
                    self._expect(CLOSE)  # the entry's
                    frame.entries.append((name, node))
            elif tag == _END:
                stack.pop()
                directory = Directory(frame.entries)
                self._directories.append(directory)
                if not stack:
                    root = directory.as_node()
                else:
                    self._expect(CLOSE)  # the entry's
                    stack[-1].entries.append((frame.name, directory.as_node()))
            else:
                raise NarError(f"NAR: unexpected {tag!r} in a directory")
        if not self._at_end():
            raise NarError(f"NAR: data after its end, at byte {self.size}")
        self._hand_over_batch()
        return _Parsed(root, self._directories, self.size, self._sha256.digest())

    def _node_body(self, stack: list[_Frame], name: bytes) -> Node | None:
        """After `( type`: a leaf read through its `)`, or None for a directory
        (pushed onto `stack` to be read entry by entry)."""
        kind = self._string(_MAX_TOKEN_LEN, "node type")
        if kind == b"regular":
            node: Node = self._file()
        elif kind == b"symlink":
            self._expect(TARGET)
            target = self._string(MAX_TARGET_LEN, "symlink target")
            try:
                node = SymlinkNode(validate_symlink_target(target))
            except ValidationError as e:
                raise NarError(f"NAR: {e}") from None
        elif kind == b"directory":
            stack.append(_Frame(name, []))
            return None
        else:
            raise NarError(f"NAR: unknown node type {kind!r}")
        self._expect(CLOSE)
        return node

    def _file(self) -> FileNode:
        tag = self._string(_MAX_TOKEN_LEN, "token")
        executable = tag == b"executable"
        if executable:
            self._expect(_EMPTY_STRING + CONTENTS)
        elif tag != b"contents":
            raise NarError(f"NAR: expected 'contents', got {tag!r}")
        size = self._u64()
        if size <= CHUNK_SIZE:
            if len(self._buf) - self._pos < size:
                self._fill(size)
            data = self._buf[self._pos : self._pos + size]
            self._pos += size
            digest = B3Digest(blake3.blake3(data).digest())
            self._batch.append((digest, data))
            self._batch_bytes += size
            if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_FILES:
                self._hand_over_batch()
        else:
            digest = self._large_file(size)
        self._padding(size)
        return FileNode(digest, size, executable)

    def _large_file(self, size: int) -> B3Digest:
        """Contents over CHUNK_SIZE, handed over in pieces as they arrive."""
        what = f"the file at byte {self._offset} of the NAR"
        hasher = blake3.blake3()
        left = size
        while left:
            if self._pos == len(self._buf):
                block = self._block()
                if not block:
                    raise NarError(f"NAR ends early, after {self.size} bytes")
                self._buf, self._pos = block, 0
            piece = self._buf[self._pos : self._pos + min(left, CHUNK_SIZE)]
            self._pos += len(piece)
            left -= len(piece)
            hasher.update(piece)
            self._hand_over(_Piece(piece))
        digest = B3Digest(hasher.digest())
        self._hand_over(_FileEnd(digest, what))
        return digest

    def _hand_over_batch(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._batch_bytes = 0
            self._hand_over(_Batch(batch))


class _HandOver:
    """The thread's side of the channel to trio: blocking sends that fail
    (`_Stopped`) once the trio side has gone."""

    def __init__(self, send: trio.MemorySendChannel[_Handed], token: trio.lowlevel.TrioToken):
        self._send = send
        self._token = token
        self.stopped = threading.Event()

    def check(self) -> None:
        if self.stopped.is_set():
            raise _Stopped

    def __call__(self, item: _Handed) -> None:
        self.check()
        try:
            trio.from_thread.run(self._send.send, item, trio_token=self._token)
        # Cancelled: the run is shutting down.
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.RunFinishedError,
            trio.Cancelled,
        ):
            raise _Stopped from None


def _parse_in_thread(
    source: NarSource,
    expected_size: int | None,
    expected_sha256: bytes | None,
    hand_over: _HandOver,
) -> None:
    try:
        try:
            parsed = _Parser(source, expected_size, hand_over).run()
            if expected_size is not None and parsed.size != expected_size:
                raise NarError(f"NAR has {parsed.size} bytes, expected {expected_size}")
            if expected_sha256 is not None and parsed.sha256 != expected_sha256:
                raise NarError(
                    f"NAR has sha256 {parsed.sha256.hex()}, expected {expected_sha256.hex()}"
                )
            # The NAR first: a wrong NAR says so, whatever its file's trailer.
            source.finish()
        except _Stopped:
            return
        except Exception as e:  # the NAR's, the source's: the ingest's error
            result: _Handed = e
        else:
            result = parsed
        with contextlib.suppress(_Stopped):
            hand_over(result)
    finally:
        source.close()


async def _store(
    blobs: BlobService,
    receive: trio.MemoryReceiveChannel[_Handed],
    nursery: trio.Nursery,
    deadline: ProgressDeadline | None,
) -> _Parsed:
    """Store what the thread hands over until it hands over the whole NAR."""
    batcher = BlobBatcher(blobs, nursery)
    writer: BlobWriter | None = None
    try:
        while True:
            with contextlib.nullcontext() if deadline is None else deadline.watching():
                item = await receive.receive()
            if isinstance(item, _Batch):
                await batcher.put(item.blobs)
            elif isinstance(item, _Piece):
                if writer is None:
                    writer = await blobs.open_write()
                await writer.write(item.data)
            elif isinstance(item, _FileEnd):
                assert writer is not None
                stored = await writer.close()
                writer = None
                check_stored(item.what, item.digest, stored)
            elif isinstance(item, _Parsed):
                return item
            else:
                raise item
    except BaseException:
        if writer is not None:
            with trio.CancelScope(shield=True):
                await writer.abort()
        raise


async def ingest_nar(
    blobs: BlobService,
    directories: DirectoryService,
    source: NarSource,
    *,
    expected_size: int | None = None,
    expected_sha256: bytes | None = None,
    deadline: ProgressDeadline | None = None,
) -> IngestedNar:
    """Read a NAR from `source` into the services; its root node, size and sha256.

    `deadline`: each wait for the source's next piece of work is under it
    (a download that stops making progress fails; storing is not timed).

    NarError if the stream is not a NAR, has anything after it, or does not
    match `expected_size` / `expected_sha256` (checked before any Directory is
    stored); StoreError if a service or the source fails. On any failure or
    cancellation the thread is told to stop and the source interrupted; the
    thread closes the source when it ends.
    """
    send, receive = trio.open_memory_channel[_Handed](PIECES_AHEAD)
    hand_over = _HandOver(send, trio.lowlevel.current_trio_token())
    done = False
    try:
        async with receive, trio.open_nursery() as nursery:
            trio.lowlevel.start_thread_soon(
                lambda: _parse_in_thread(source, expected_size, expected_sha256, hand_over),
                lambda _outcome: None,
                name="nar ingest",
            )
            parsed = await _store(blobs, receive, nursery, deadline)
        done = True
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        if not done:
            hand_over.stopped.set()
            source.interrupt()
    if parsed.directories:
        stored = await directories.put_tree(parsed.directories)
        if not isinstance(parsed.node, DirectoryNode) or stored != parsed.node.digest:
            raise IntegrityError(f"directory service stored the root as {stored}")
    return IngestedNar(parsed.node, parsed.size, parsed.sha256)
