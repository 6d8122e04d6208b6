"""The castore model: nodes and directories, with tvix's validation rules.

A Directory maps names to nodes. Its canonical encoding is tvix's
`tvix.castore.v1.Directory` protobuf (directories, files and symlinks each in
their own list, each sorted by name), and its digest is the BLAKE3 hash of
that encoding, byte for byte what tvix computes.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from itertools import chain, pairwise, repeat
from operator import attrgetter, itemgetter
from typing import Any, Final, NamedTuple

import blake3

from tvix_mountd.castore.digests import B3_LEN, B3Digest
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.proto import castore_pb2

MAX_NAME_LEN: Final = 255
MAX_TARGET_LEN: Final = 4095
U64_MAX: Final = 2**64 - 1


def validate_name(name: bytes) -> bytes:
    """A path component: non-empty, at most 255 bytes, no `/` or NUL, not `.`/`..`."""
    if not name:
        raise ValidationError("name is empty")
    if name in (b".", b".."):
        raise ValidationError(f"name {name!r} is not allowed")
    if len(name) > MAX_NAME_LEN:
        raise ValidationError(f"name of {len(name)} bytes is longer than {MAX_NAME_LEN}")
    if b"\0" in name:
        raise ValidationError(f"name {name!r} contains NUL")
    if b"/" in name:
        raise ValidationError(f"name {name!r} contains a slash")
    return name


def validate_symlink_target(target: bytes) -> bytes:
    if not target:
        raise ValidationError("symlink target is empty")
    if len(target) > MAX_TARGET_LEN:
        raise ValidationError(f"symlink target longer than {MAX_TARGET_LEN} bytes")
    if b"\0" in target:
        raise ValidationError("symlink target contains NUL")
    return target


def _check_u64(value: int, what: str) -> int:
    if not 0 <= value <= U64_MAX:
        raise ValidationError(f"{what} {value} out of range")
    return value


# Nodes are NamedTuples: immutable, matchable (`case FileNode(digest, size, x)`)
# and hashed and compared in C. The three kinds have 2, 3 and 1 fields, so no
# node of one kind ever equals a node of another. Where many are kept (a
# Directory's entries, a worker's inode table) they are packed instead (below).


class DirectoryNode(NamedTuple):
    """A reference to a Directory; `size` counts every entry below it."""

    digest: B3Digest
    size: int


class FileNode(NamedTuple):
    digest: B3Digest
    size: int
    executable: bool = False


class SymlinkNode(NamedTuple):
    target: bytes


Node = DirectoryNode | FileNode | SymlinkNode


def node_to_proto(name: bytes, node: Node) -> castore_pb2.Node:
    """A `Node` message carrying `node` under `name`."""
    match node:
        case DirectoryNode(digest, size):
            return castore_pb2.Node(
                directory=castore_pb2.DirectoryNode(name=name, digest=digest, size=size)
            )
        case FileNode(digest, size, executable):
            return castore_pb2.Node(
                file=castore_pb2.FileNode(
                    name=name, digest=digest, size=size, executable=executable
                )
            )
        case SymlinkNode(target):
            return castore_pb2.Node(symlink=castore_pb2.SymlinkNode(name=name, target=target))


def node_from_proto(msg: castore_pb2.Node) -> tuple[bytes, Node]:
    """Validate a `Node` message into its (name, node)."""
    kind = msg.WhichOneof("node")
    if kind == "directory":
        d = msg.directory
        return validate_name(d.name), DirectoryNode(B3Digest(d.digest), _check_u64(d.size, "size"))
    if kind == "file":
        f = msg.file
        return validate_name(f.name), FileNode(
            B3Digest(f.digest), _check_u64(f.size, "size"), f.executable
        )
    if kind == "symlink":
        s = msg.symlink
        return validate_name(s.name), SymlinkNode(validate_symlink_target(s.target))
    raise ValidationError("node is empty")


# -- packed nodes -----------------------------------------------------------
#
# A node packed into one bytes object: a kind byte, then the digest and the
# size (u64, little-endian) of a directory or file, or a symlink's target. It
# is ~80 bytes where the NamedTuple with its digest and size objects is ~190,
# and a worker keeps one per live inode (a million after a big walk), so a
# Directory holds its entries packed and a Node is built only on demand.
# Equal nodes pack to equal bytes and different kinds never do, so the packed
# form hashes and compares like the node, in C.

PackedNode = bytes

PACKED_DIRECTORY: Final = ord("d")
PACKED_FILE: Final = ord("f")
PACKED_EXECUTABLE: Final = ord("x")
PACKED_SYMLINK: Final = ord("l")
# The kinds of a regular file, executable or not.
PACKED_FILE_KINDS: Final = (PACKED_FILE, PACKED_EXECUTABLE)
_KIND_DIGEST_SIZE: Final = struct.Struct("<c32sQ")
# The size field alone: `PACKED_SIZE.unpack_from(packed)[0]` reads it in place.
PACKED_SIZE: Final = struct.Struct("<33xQ")
_FILE_KINDS: Final = (b"f", b"x")  # indexed by the executable bit


def pack_node(node: Node) -> PackedNode:
    if type(node) is SymlinkNode:
        return b"l" + node.target
    if type(node) is DirectoryNode:
        return _KIND_DIGEST_SIZE.pack(b"d", node.digest, node.size)
    assert type(node) is FileNode
    return _KIND_DIGEST_SIZE.pack(_FILE_KINDS[node.executable], node.digest, node.size)


def unpack_node(packed: PackedNode) -> Node:
    kind = packed[0]
    if kind == PACKED_SYMLINK:
        return SymlinkNode(packed[1:])
    _, raw_digest, size = _KIND_DIGEST_SIZE.unpack(packed)
    digest = bytes.__new__(B3Digest, raw_digest)  # 32 bytes by construction
    if kind == PACKED_DIRECTORY:
        return DirectoryNode(digest, size)
    return FileNode(digest, size, kind == PACKED_EXECUTABLE)


def packed_digest(packed: PackedNode) -> B3Digest:
    """The digest of a packed directory or file node."""
    return bytes.__new__(B3Digest, packed[1 : 1 + B3_LEN])


_entry_name = itemgetter(0)
_DIRECTORY_FIELDS = attrgetter("name", "digest", "size")
_FILE_FIELDS = attrgetter("name", "digest", "size", "executable")
_SYMLINK_FIELDS = attrgetter("name", "target")
# Entries decoded this many at a time: what a chunk needs per entry (its
# fields as tuples, digests, sizes) is freed before the next chunk, so that a
# 50,000-entry Directory does not hold all of it at once (the worker's peak
# RSS while it decodes one).
DECODE_CHUNK: Final = 1024


def _columns(entries: Sequence[object], fields: attrgetter[Any]) -> Iterator[Any]:
    """`entries`' `fields` as columns (one tuple per field), DECODE_CHUNK
    entries at a time."""
    for start in range(0, len(entries), DECODE_CHUNK):
        yield zip(*map(fields, entries[start : start + DECODE_CHUNK]), strict=True)


# Decoding a Directory is the hot path of every directory a mount reads (a
# 50,000-entry one is 50,000 nodes), so the checks below run over whole lists
# in C (map, join, set, sorted) rather than name by name in Python; only when
# a check fails does a per-item loop run, to say exactly what is wrong.


def _check_names(names: list[bytes], kind: str) -> None:
    """Each name valid, and the list strictly sorted (so no duplicates)."""
    if (
        min(map(len, names)) == 0
        or max(map(len, names)) > MAX_NAME_LEN
        or b"\0" in (joined := b"/".join(names))
        or joined.count(b"/") != len(names) - 1
        or b"." in (unique := set(names))
        or b".." in unique
        or len(unique) != len(names)
        or names != sorted(names)
    ):
        previous = b""
        for name in names:
            validate_name(name)
            if name <= previous:
                what = "duplicate name" if name == previous else "wrong sorting at"
                raise ValidationError(f"{kind}: {what} {name!r}")
            previous = name
        raise AssertionError("unreachable: a list-wide name check failed for no name")


def _check_unique(names: Sequence[bytes]) -> None:
    """No name twice in `names`, which are in order."""
    if len(set(names)) != len(names):
        duplicate = next(a for a, b in pairwise(names) if a == b)
        raise ValidationError(f"duplicate name {duplicate!r}")


def _check_digests(digests: Iterable[bytes]) -> None:
    if any(n != B3_LEN for n in set(map(len, digests))):
        for d in digests:
            B3Digest(d)  # raises, saying what is wrong


def _check_symlink_targets(targets: list[bytes]) -> None:
    if (
        min(map(len, targets)) == 0
        or max(map(len, targets)) > MAX_TARGET_LEN
        or b"\0" in b"".join(targets)
    ):
        for target in targets:
            validate_symlink_target(target)


class Directory(Mapping[bytes, Node]):
    """An immutable, validated directory: name -> node, iterated in name order.

    Build one with `Directory(entries)` (any order; names validated, duplicates
    rejected) or `Directory.from_proto` / `Directory.decode` (which also
    insist on tvix's canonical ordering, since that is what the digest covers).
    Entries are kept packed (see `pack_node`); `packed_entries` hands them out
    as they are, the Mapping interface as Nodes.
    """

    __slots__ = ("_digest", "_names", "_packed", "_size")

    def __init__(self, entries: Iterable[tuple[bytes, Node]] = ()) -> None:
        items = sorted(entries, key=_entry_name)
        for name, node in items:
            validate_name(name)
            if isinstance(node, SymlinkNode):
                validate_symlink_target(node.target)
            else:
                _check_u64(node.size, "size")
        names = tuple(name for name, _ in items)
        _check_unique(names)
        self._init(
            names,
            tuple(pack_node(node) for _, node in items),
            sum(node.size for _, node in items if type(node) is DirectoryNode),
        )

    def _init(self, names: tuple[bytes, ...], packed: tuple[PackedNode, ...], below: int) -> None:
        """`below`: the sizes of the child directories, summed."""
        size = len(names) + below
        if size > U64_MAX:
            raise ValidationError("directory size exceeds 2^64-1")
        self._names = names
        self._packed = packed
        self._size = size
        self._digest: B3Digest | None = None

    # Mapping protocol
    def __getitem__(self, name: bytes) -> Node:
        i = bisect.bisect_left(self._names, name)
        if i == len(self._names) or self._names[i] != name:
            raise KeyError(name)
        return unpack_node(self._packed[i])

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def items(self) -> ItemsView[bytes, Node]:
        return _Items(self)

    def values(self) -> ValuesView[Node]:
        return _Values(self)

    def packed_entries(self) -> tuple[tuple[bytes, ...], tuple[PackedNode, ...]]:
        """Names and packed nodes, both in name order."""
        return self._names, self._packed

    def __repr__(self) -> str:
        return f"Directory({self.digest}, {len(self)} entries)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directory):
            return NotImplemented
        return self._names == other._names and self._packed == other._packed

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def size(self) -> int:
        """Entries plus the sizes of child directories, as tvix counts it."""
        return self._size

    @property
    def digest(self) -> B3Digest:
        if self._digest is None:
            self._digest = B3Digest(blake3.blake3(self.encode()).digest())
        return self._digest

    def as_node(self) -> DirectoryNode:
        return DirectoryNode(self.digest, self.size)

    def child_directories(self) -> Iterator[tuple[bytes, DirectoryNode]]:
        for name, packed in zip(self._names, self._packed, strict=True):
            if packed[0] == PACKED_DIRECTORY:
                node = unpack_node(packed)
                assert type(node) is DirectoryNode
                yield name, node

    def to_proto(self) -> castore_pb2.Directory:
        msg = castore_pb2.Directory()
        # Entries are sorted by name, so each list comes out sorted too.
        for name, packed in zip(self._names, self._packed, strict=True):
            kind = packed[0]
            if kind == PACKED_SYMLINK:
                msg.symlinks.add(name=name, target=packed[1:])
                continue
            _, digest, size = _KIND_DIGEST_SIZE.unpack(packed)
            if kind == PACKED_DIRECTORY:
                msg.directories.add(name=name, digest=digest, size=size)
            else:
                executable = kind == PACKED_EXECUTABLE
                msg.files.add(name=name, digest=digest, size=size, executable=executable)
        return msg

    def encode(self) -> bytes:
        """The canonical protobuf encoding, the input of the digest."""
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def from_proto(cls, msg: castore_pb2.Directory) -> Directory:
        """Validate a Directory message: each list strictly sorted, names valid and unique."""
        # Each list becomes a run of (names, packed nodes), packed in C by
        # struct. Proto sizes are uint64 already: no range check.
        runs: list[tuple[tuple[bytes, ...], tuple[PackedNode, ...]]] = []
        below = 0
        names: list[bytes]
        packed: list[PackedNode]
        if msg.directories:
            names, packed = [], []
            for chunk, digests, sizes in _columns(msg.directories, _DIRECTORY_FIELDS):
                _check_digests(digests)
                below += sum(sizes)
                names += chunk
                packed += map(_KIND_DIGEST_SIZE.pack, repeat(b"d"), digests, sizes)
            _check_names(names, "directories")
            runs.append((tuple(names), tuple(packed)))
        if msg.files:
            names, packed = [], []
            for chunk, digests, sizes, executable in _columns(msg.files, _FILE_FIELDS):
                _check_digests(digests)
                kinds = map(_FILE_KINDS.__getitem__, executable)
                names += chunk
                packed += map(_KIND_DIGEST_SIZE.pack, kinds, digests, sizes)
            _check_names(names, "files")
            runs.append((tuple(names), tuple(packed)))
        if msg.symlinks:
            names, packed = [], []
            for chunk, targets in _columns(msg.symlinks, _SYMLINK_FIELDS):
                _check_symlink_targets(list(targets))
                names += chunk
                packed += map(b"l".__add__, targets)
            _check_names(names, "symlinks")
            runs.append((tuple(names), tuple(packed)))
        directory = cls.__new__(cls)
        if len(runs) == 1:
            directory._init(*runs[0], below)
        elif not runs:
            directory._init((), (), 0)
        else:
            # Sorted runs of different kinds: merged by one sort, then a name
            # may not appear in two of them.
            merged = sorted(
                chain.from_iterable(zip(*run, strict=True) for run in runs), key=_entry_name
            )
            all_names, all_packed = zip(*merged, strict=True)
            _check_unique(all_names)
            directory._init(all_names, all_packed, below)
        return directory

    @classmethod
    def decode(cls, data: bytes, expected: B3Digest | None = None) -> Directory:
        """Parse an encoded Directory; with `expected`, insist it hashes to that.

        The digest is taken over the bytes received, so a backend that sends a
        non-canonical encoding of the right directory is caught as well.
        """
        if expected is not None:
            actual = B3Digest(blake3.blake3(data).digest())
            if actual != expected:
                raise IntegrityError(f"directory {expected} arrived with digest {actual}")
        msg = castore_pb2.Directory()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError or others on garbage
            raise ValidationError(f"undecodable directory: {e}") from e
        directory = cls.from_proto(msg)
        if expected is not None:
            directory._digest = expected
        return directory


class _Items(ItemsView[bytes, Node]):
    """A Directory's items unpacked in one pass, not looked up name by name."""

    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self._directory = directory

    def __iter__(self) -> Iterator[tuple[bytes, Node]]:
        names, packed = self._directory.packed_entries()
        return zip(names, map(unpack_node, packed), strict=True)


class _Values(ValuesView[Node]):
    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self._directory = directory

    def __iter__(self) -> Iterator[Node]:
        return map(unpack_node, self._directory.packed_entries()[1])


def validated_directory(msg: castore_pb2.Directory, expected: B3Digest) -> Directory:
    """A Directory message from a backend, checked against the digest it was asked by."""
    directory = Directory.from_proto(msg)
    if directory.digest != expected:
        raise IntegrityError(f"directory {expected} arrived with digest {directory.digest}")
    return directory
