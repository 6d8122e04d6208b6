"""The castore model: nodes and directories, with tvix's validation rules.

A Directory maps names to nodes. Its canonical encoding is tvix's
`tvix.castore.v1.Directory` protobuf (directories, files and symlinks each in
their own list, each sorted by name), and its digest is the BLAKE3 hash of
that encoding, byte for byte what tvix computes.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from itertools import pairwise, repeat
from operator import attrgetter, itemgetter
from typing import Any, Final, NamedTuple, TypeVar

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
# and hashed and compared in C. A directory of 50,000 entries builds 50,000 of
# them and the inode table hashes each one it hands out, so the frozen
# dataclasses these were cost a third of a cold listing. The three kinds have
# 2, 3 and 1 fields, so no node of one kind ever equals a node of another.


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


_N = TypeVar("_N", bound=tuple[Any, ...])
_entry_name = itemgetter(0)
_DIRECTORY_FIELDS = attrgetter("name", "digest", "size")
_FILE_FIELDS = attrgetter("name", "digest", "size", "executable")
_SYMLINK_FIELDS = attrgetter("name", "target")


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


def _proto_digests(raw: Iterable[bytes]) -> list[B3Digest]:
    digests = list(raw)
    if any(n != B3_LEN for n in set(map(len, digests))):
        for d in digests:
            B3Digest(d)  # raises, saying what is wrong
    # B3Digest's own __new__ would check each length again, in Python.
    return list(map(bytes.__new__, repeat(B3Digest), digests))


def _built(kind: type[_N], fields: Iterable[tuple[Any, ...]]) -> Iterator[_N]:
    """Nodes of `kind` from tuples of their fields, each built in C: tuple.__new__
    skips the NamedTuple's own __new__, a Python function."""
    return map(tuple.__new__, repeat(kind), fields)


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
    """

    __slots__ = ("_digest", "_entries", "_size")

    def __init__(self, entries: Iterable[tuple[bytes, Node]] = ()) -> None:
        items = sorted(entries, key=_entry_name)
        for name, node in items:
            validate_name(name)
            if isinstance(node, SymlinkNode):
                validate_symlink_target(node.target)
            else:
                _check_u64(node.size, "size")
        self._init_checked(items)

    @classmethod
    def _of_checked(cls, items: list[tuple[bytes, Node]]) -> Directory:
        """A Directory of entries already validated one by one, in name order."""
        directory = cls.__new__(cls)
        directory._init_checked(items)
        return directory

    def _init_checked(self, items: list[tuple[bytes, Node]]) -> None:
        entries = dict(items)
        if len(entries) != len(items):
            names = [name for name, _ in items]
            duplicate = next(a for a, b in pairwise(names) if a == b)
            raise ValidationError(f"duplicate name {duplicate!r}")
        self._entries = entries
        self._digest: B3Digest | None = None
        size = len(entries) + sum(n.size for n in entries.values() if type(n) is DirectoryNode)
        if size > U64_MAX:
            raise ValidationError("directory size exceeds 2^64-1")
        self._size = size

    # Mapping protocol
    def __getitem__(self, name: bytes) -> Node:
        return self._entries[name]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # The dict's own views: Mapping's generic ones look every value up by name.
    def keys(self) -> KeysView[bytes]:
        return self._entries.keys()

    def values(self) -> ValuesView[Node]:
        return self._entries.values()

    def items(self) -> ItemsView[bytes, Node]:
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Directory({self.digest}, {len(self)} entries)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directory):
            return NotImplemented
        return self._entries == other._entries

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
        for name, node in self._entries.items():
            if isinstance(node, DirectoryNode):
                yield name, node

    def to_proto(self) -> castore_pb2.Directory:
        msg = castore_pb2.Directory()
        # self._entries is sorted by name, so each list comes out sorted too.
        for name, node in self._entries.items():
            match node:
                case DirectoryNode(digest, size):
                    msg.directories.add(name=name, digest=digest, size=size)
                case FileNode(digest, size, executable):
                    msg.files.add(name=name, digest=digest, size=size, executable=executable)
                case SymlinkNode(target):
                    msg.symlinks.add(name=name, target=target)
        return msg

    def encode(self) -> bytes:
        """The canonical protobuf encoding, the input of the digest."""
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def from_proto(cls, msg: castore_pb2.Directory) -> Directory:
        """Validate a Directory message: each list strictly sorted, names valid and unique."""
        entries: list[tuple[bytes, Node]] = []
        # Proto sizes are uint64 already: no range check.
        if msg.directories:
            names, digests, sizes = zip(*map(_DIRECTORY_FIELDS, msg.directories), strict=True)
            _check_names(list(names), "directories")
            nodes = _built(DirectoryNode, zip(_proto_digests(digests), sizes, strict=True))
            entries += zip(names, nodes, strict=True)
        if msg.files:
            names, digests, sizes, executable = zip(*map(_FILE_FIELDS, msg.files), strict=True)
            _check_names(list(names), "files")
            files = _built(FileNode, zip(_proto_digests(digests), sizes, executable, strict=True))
            entries += zip(names, files, strict=True)
        if msg.symlinks:
            names, targets = zip(*map(_SYMLINK_FIELDS, msg.symlinks), strict=True)
            _check_names(list(names), "symlinks")
            _check_symlink_targets(list(targets))
            entries += zip(names, _built(SymlinkNode, zip(targets, strict=True)), strict=True)
        # Three sorted runs: one merge pass.
        entries.sort(key=_entry_name)
        return cls._of_checked(entries)

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


def validated_directory(msg: castore_pb2.Directory, expected: B3Digest) -> Directory:
    """A Directory message from a backend, checked against the digest it was asked by."""
    directory = Directory.from_proto(msg)
    if directory.digest != expected:
        raise IntegrityError(f"directory {expected} arrived with digest {directory.digest}")
    return directory
