"""The castore model: nodes and directories, with tvix's validation rules.

A Directory maps names to nodes. Its canonical encoding is tvix's
`tvix.castore.v1.Directory` protobuf (directories, files and symlinks each in
their own list, each sorted by name), and its digest is the BLAKE3 hash of
that encoding, byte for byte what tvix computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import blake3

from tvix_mountd.castore.digests import B3Digest
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


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    """A reference to a Directory; `size` counts every entry below it."""

    digest: B3Digest
    size: int


@dataclass(frozen=True, slots=True)
class FileNode:
    digest: B3Digest
    size: int
    executable: bool = False


@dataclass(frozen=True, slots=True)
class SymlinkNode:
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


class Directory(Mapping[bytes, Node]):
    """An immutable, validated directory: name -> node, iterated in name order.

    Build one with `Directory(entries)` (any order; names validated, duplicates
    rejected) or `Directory.from_proto` / `Directory.decode` (which also
    insist on tvix's canonical ordering, since that is what the digest covers).
    """

    __slots__ = ("_digest", "_entries", "_size")

    def __init__(self, entries: Iterable[tuple[bytes, Node]] = ()) -> None:
        items = sorted(entries, key=lambda e: e[0])
        checked: dict[bytes, Node] = {}
        for name, node in items:
            validate_name(name)
            if name in checked:
                raise ValidationError(f"duplicate name {name!r}")
            if isinstance(node, SymlinkNode):
                validate_symlink_target(node.target)
            else:
                _check_u64(node.size, "size")
            checked[name] = node
        self._entries = checked
        self._digest: B3Digest | None = None
        size = len(checked) + sum(n.size for n in checked.values() if isinstance(n, DirectoryNode))
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
        for kind, items in (
            ("directories", msg.directories),
            ("files", msg.files),
            ("symlinks", msg.symlinks),
        ):
            previous = b""
            for item in items:
                if item.name <= previous and previous:
                    what = "duplicate name" if item.name == previous else "wrong sorting at"
                    raise ValidationError(f"{kind}: {what} {item.name!r}")
                previous = item.name
                if kind == "directories":
                    entries.append(
                        (item.name, DirectoryNode(B3Digest(item.digest), item.size))  # type: ignore[union-attr]
                    )
                elif kind == "files":
                    entries.append(
                        (
                            item.name,
                            FileNode(B3Digest(item.digest), item.size, item.executable),  # type: ignore[union-attr]
                        )
                    )
                else:
                    entries.append((item.name, SymlinkNode(item.target)))  # type: ignore[union-attr]
        return cls(entries)

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
