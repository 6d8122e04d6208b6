"""Unit tests of the store model: digests, nixbase32, nodes, store paths,
path infos and addresses, checked against known answers, hand-built wire
encodings and the real Nix tools where they are installed."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tvix_mountd.castore import blobs, directories, nixbase32, pathinfos
from tvix_mountd.castore import nodes as nodes_mod
from tvix_mountd.castore.addr import (
    BLOB_SCHEMES,
    DIRECTORY_SCHEMES,
    PATH_INFO_SCHEMES,
    StoreAddress,
    parse_address,
)
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.blobs.objectstore import ObjectStoreBlobService
from tvix_mountd.castore.blobs.raw import RawFileBlobService
from tvix_mountd.castore.digests import EMPTY_BLOB_DIGEST, B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
from tvix_mountd.castore.errors import AddressError, IntegrityError, ValidationError
from tvix_mountd.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    node_from_proto,
    node_to_proto,
    pack_node,
    packed_digest,
    unpack_node,
    validate_name,
    validate_symlink_target,
)
from tvix_mountd.castore.pathinfo import (
    CAHashType,
    ContentAddress,
    PathInfo,
    Signature,
)
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService
from tvix_mountd.castore.storepath import (
    STORE_DIR,
    StorePath,
    make_store_path,
    source_store_path,
)
from tvix_mountd.castore.storepath import validate_name as validate_store_path_name
from tvix_mountd.proto import castore_pb2, pathinfo_pb2

EMPTY_DIGEST_HEX = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
DUMMY = B3Digest(bytes(32))
DUMMY_2 = B3Digest(b"\x10" + bytes(31))

needs_nix = pytest.mark.skipif(
    shutil.which("nix-hash") is None or shutil.which("nix-store") is None,
    reason="Nix's command line tools are not installed",
)


# ---------------------------------------------------------------- protobuf by hand


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def varint_field(field: int, value: int) -> bytes:
    """A proto3 scalar: the default (0/false) is left out entirely."""
    return varint(field << 3) + varint(value) if value else b""


# ---------------------------------------------------------------- digests


def test_empty_blob_digest_is_blake3_of_nothing() -> None:
    assert EMPTY_BLOB_DIGEST.hex() == EMPTY_DIGEST_HEX
    assert B3Digest.of(b"") == bytes.fromhex(EMPTY_DIGEST_HEX)


def test_b3_digest_prints_as_b3_and_standard_base64() -> None:
    assert str(EMPTY_BLOB_DIGEST) == "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="
    # Standard (not URL-safe) alphabet: 0xfb 0xff encodes with '+' and '/'.
    digest = B3Digest(b"\xfb\xff" * 16)
    assert "+" in str(digest) and "/" in str(digest)
    assert repr(digest) == f"B3Digest({digest})"


@pytest.mark.parametrize("seed", range(5))
def test_b3_digest_parse_roundtrip(seed: int) -> None:
    raw = random.Random(seed).randbytes(32)
    digest = B3Digest(raw)
    assert B3Digest.parse(str(digest)) == raw
    assert isinstance(B3Digest.parse(str(digest)), B3Digest)


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_b3_digest_wrong_length(length: int) -> None:
    with pytest.raises(ValidationError, match="length"):
        B3Digest(bytes(length))
    with pytest.raises(ValidationError):
        B3Digest.parse("b3:" + base64.b64encode(bytes(length)).decode())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=",  # no prefix
        "b4:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=",
        "sha256:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=",
        "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI",  # padding missing
        "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI*",
        "b3:" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # URL-safe alphabet
        "b3:" + EMPTY_DIGEST_HEX,
    ],
)
def test_b3_digest_parse_rejects(text: str) -> None:
    with pytest.raises(ValidationError):
        B3Digest.parse(text)


# ---------------------------------------------------------------- nixbase32


def nix_hash_to_base32(hash_type: str, data: bytes) -> str:
    out = subprocess.run(
        ["nix-hash", "--type", hash_type, "--to-base32", data.hex()],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@needs_nix
@pytest.mark.parametrize(
    ("hash_type", "size"), [("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)]
)
def test_nixbase32_matches_nix_hash(hash_type: str, size: int) -> None:
    rng = random.Random(size)
    samples = [bytes(size), b"\xff" * size, bytes(size - 1) + b"\x01"]
    samples += [rng.randbytes(size) for _ in range(5)]
    for data in samples:
        expected = nix_hash_to_base32(hash_type, data)
        assert nixbase32.encode(data) == expected, data.hex()
        assert len(expected) == nixbase32.encoded_len(size)
        assert nixbase32.decode(expected, size) == data
        assert nixbase32.decode(expected.encode()) == data


def test_nixbase32_known_answers() -> None:
    # Pinned from `nix-hash --to-base32`, so this runs without Nix too.
    # The last byte is the most significant: it comes out first.
    assert (
        nixbase32.encode(bytes(31) + b"\x01")
        == "0080000000000000000000000000000000000000000000000000"
    )
    assert (
        nixbase32.encode(bytes.fromhex("0102030405060708090a0b0c0d0e0f1011121314"))
        == "2h9i448h1w70s30b184hh1q60l2060h1"
    )
    assert nixbase32.decode("1" + "0" * 51) == bytes(31) + b"\x80"
    assert nixbase32.encode(b"") == ""
    assert nixbase32.decode("") == b""


@pytest.mark.parametrize(
    ("text", "size", "match"),
    [
        ("2h9i448h1w70s30b184hh1q60l2060he", 20, "character 'e'"),  # e, o, u, t: not in it
        ("2h9i448h1w70s30b184hh1q60l2060ho", 20, "character 'o'"),
        ("2h9i448h1w70s30b184hh1q60l2060hu", 20, "character 'u'"),
        ("2h9i448h1w70s30b184hh1q60l2060ht", 20, "character 't'"),
        ("2H9I448H1W70S30B184HH1Q60L2060H1", 20, "character"),  # upper case
        ("2h9i448h1w70s30b184hh1q60l2060h", 20, "length"),
        ("2h9i448h1w70s30b184hh1q60l2060h11", 20, "length"),
        ("2h9i448h1w70s30b184hh1q60l2060h1", 32, "length"),
        # 52 characters carry 260 bits for 256: the top 4 must be zero, so
        # the first character may only be 0 or 1.
        ("2" + "0" * 51, 32, "trailing bits"),
        ("z" + "0" * 51, 32, "trailing bits"),
    ],
)
def test_nixbase32_decode_errors(text: str, size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nixbase32.decode(text, size)


def test_nixbase32_decode_rejects_non_ascii_bytes() -> None:
    with pytest.raises(ValueError):
        nixbase32.decode(b"\xff" * 32)


# ---------------------------------------------------------------- names and targets


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (b"", "empty"),
        (b".", "not allowed"),
        (b"..", "not allowed"),
        (b"a/b", "slash"),
        (b"/", "slash"),
        (b"a\0b", "NUL"),
        (b"\0", "NUL"),
        (b"x" * 256, "longer than 255"),
    ],
)
def test_node_name_rejected(name: bytes, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        validate_name(name)
    # ...and wherever a name enters: constructing a Directory, or from the wire.
    with pytest.raises(ValidationError):
        Directory([(name, SymlinkNode(b"t"))])
    for msg in (
        castore_pb2.Directory(symlinks=[castore_pb2.SymlinkNode(name=name, target=b"t")]),
        castore_pb2.Directory(files=[castore_pb2.FileNode(name=name, digest=DUMMY)]),
        castore_pb2.Directory(directories=[castore_pb2.DirectoryNode(name=name, digest=DUMMY)]),
    ):
        with pytest.raises(ValidationError, match=match):
            Directory.from_proto(msg)


@pytest.mark.parametrize("name", [b"x" * 255, b"...", b".a", b"a.", b"\xff\xfe", b" ", b"\\"])
def test_node_name_accepted(name: bytes) -> None:
    assert validate_name(name) == name
    assert name in Directory([(name, SymlinkNode(b"t"))])


@pytest.mark.parametrize(
    ("target", "match"),
    [(b"", "empty"), (b"a\0b", "NUL"), (b"x" * 4096, "longer than 4095")],
)
def test_symlink_target_rejected(target: bytes, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        validate_symlink_target(target)
    with pytest.raises(ValidationError):
        Directory([(b"l", SymlinkNode(target))])
    with pytest.raises(ValidationError):
        node_from_proto(castore_pb2.Node(symlink=castore_pb2.SymlinkNode(name=b"l", target=target)))


@pytest.mark.parametrize("target", [b"x" * 4095, b"/", b"..", b"../a/./b", b"a//b", b"\xff"])
def test_symlink_target_accepted(target: bytes) -> None:
    assert validate_symlink_target(target) == target


# ---------------------------------------------------------------- nodes


# One of each kind, at the edges of their fields.
SAMPLE_NODES: list[Node] = [
    DirectoryNode(DUMMY, 7),
    FileNode(DUMMY_2, 2**64 - 1, True),
    FileNode(DUMMY, 0, False),
    SymlinkNode(b"/nix/store/x"),
    SymlinkNode(b"f" * 41),  # as long as a packed file node
]


@pytest.mark.parametrize("node", SAMPLE_NODES)
def test_node_proto_roundtrip(node: Node) -> None:
    assert node_from_proto(node_to_proto(b"name", node)) == (b"name", node)


@pytest.mark.parametrize("node", SAMPLE_NODES)
def test_packed_node_roundtrip(node: Node) -> None:
    packed = pack_node(node)
    assert unpack_node(packed) == node
    assert type(unpack_node(packed)) is type(node)
    if not isinstance(node, SymlinkNode):
        assert packed_digest(packed) == node.digest
        assert type(packed_digest(packed)) is B3Digest


def test_packed_nodes_are_equal_exactly_when_the_nodes_are() -> None:
    # The inode table keys by packed node: a directory and a file with the
    # same digest and size, or a symlink whose target spells a file's fields,
    # must not share an inode.
    file = FileNode(DUMMY, 3)
    lookalike = SymlinkNode(pack_node(file)[1:])
    nodes: list[Node] = [
        DirectoryNode(DUMMY, 3),
        file,
        FileNode(DUMMY, 3, True),
        FileNode(DUMMY, 4),
        FileNode(DUMMY_2, 3),
        SymlinkNode(DUMMY),
        lookalike,
    ]
    packed = [pack_node(n) for n in nodes]
    assert len(set(packed)) == len(nodes)
    assert pack_node(FileNode(DUMMY, 3)) == packed[1]


def test_node_from_proto_rejects_empty_and_bad_digests() -> None:
    with pytest.raises(ValidationError, match="empty"):
        node_from_proto(castore_pb2.Node())
    with pytest.raises(ValidationError, match="length"):
        node_from_proto(
            castore_pb2.Node(file=castore_pb2.FileNode(name=b"f", digest=b"\0\x42", size=1))
        )
    with pytest.raises(ValidationError, match="length"):
        node_from_proto(castore_pb2.Node(directory=castore_pb2.DirectoryNode(name=b"d")))


def test_from_proto_rejects_bad_digest_lengths() -> None:
    for msg in (
        castore_pb2.Directory(files=[castore_pb2.FileNode(name=b"f", digest=b"\0" * 31)]),
        castore_pb2.Directory(directories=[castore_pb2.DirectoryNode(name=b"d", digest=b"")]),
    ):
        with pytest.raises(ValidationError, match="length"):
            Directory.from_proto(msg)


def test_nodes_of_different_kinds_never_compare_equal() -> None:
    # The inode table keys by node: a directory and a file with the same
    # digest and size must not share an inode.
    nodes: list[Node] = [DirectoryNode(DUMMY, 0), FileNode(DUMMY, 0), SymlinkNode(DUMMY)]
    for a in nodes:
        for b in nodes:
            assert (a == b) == (a is b)
    assert len({*nodes}) == 3


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (DirectoryNode(DUMMY, 0), FileNode(DUMMY, 0)),
        (DirectoryNode(DUMMY, 0), SymlinkNode(b"t")),
        (FileNode(DUMMY, 0), SymlinkNode(b"t")),
        (FileNode(DUMMY, 0), FileNode(DUMMY_2, 1)),
    ],
)
def test_duplicate_names_rejected(first: Node, second: Node) -> None:
    with pytest.raises(ValidationError, match="duplicate"):
        Directory([(b"a", first), (b"a", second)])


def test_from_proto_rejects_duplicates_across_kinds() -> None:
    msg = castore_pb2.Directory(
        directories=[castore_pb2.DirectoryNode(name=b"a", digest=DUMMY, size=1)],
        symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"b")],
    )
    with pytest.raises(ValidationError, match="duplicate"):
        Directory.from_proto(msg)


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_from_proto_rejects_unsorted_and_duplicates_within_a_list(kind: str) -> None:
    def message(names: list[bytes]) -> castore_pb2.Directory:
        msg = castore_pb2.Directory()
        for name in names:
            if kind == "directories":
                msg.directories.add(name=name, digest=DUMMY, size=0)
            elif kind == "files":
                msg.files.add(name=name, digest=DUMMY, size=0)
            else:
                msg.symlinks.add(name=name, target=b"t")
        return msg

    assert list(Directory.from_proto(message([b"a", b"b", b"c"]))) == [b"a", b"b", b"c"]
    with pytest.raises(ValidationError, match="wrong sorting"):
        Directory.from_proto(message([b"b", b"a"]))
    with pytest.raises(ValidationError, match="wrong sorting"):
        Directory.from_proto(message([b"a", b"c", b"b"]))
    with pytest.raises(ValidationError, match="duplicate"):
        Directory.from_proto(message([b"a", b"a"]))
    # Byte order, not text order: b"B" (0x42) sorts before b"a" (0x61).
    with pytest.raises(ValidationError, match="wrong sorting"):
        Directory.from_proto(message([b"a", b"B"]))


@pytest.mark.parametrize("kind", ["directories", "files", "symlinks"])
def test_from_proto_of_a_list_longer_than_a_decode_chunk(kind: str) -> None:
    # Lists are decoded DECODE_CHUNK entries at a time; the checks still see
    # the whole list (here: across the chunks' boundary).
    count = 2 * nodes_mod.DECODE_CHUNK + 7
    names = [b"n%06d" % i for i in range(count)]

    def message(names: list[bytes], bad: int | None = None) -> castore_pb2.Directory:
        msg = castore_pb2.Directory()
        for i, name in enumerate(names):
            digest = DUMMY[:-1] if i == bad else DUMMY
            if kind == "directories":
                msg.directories.add(name=name, digest=digest, size=i)
            elif kind == "files":
                msg.files.add(name=name, digest=digest, size=i, executable=i % 3 == 0)
            else:
                target = b"" if i == bad else b"t%d" % i
                msg.symlinks.add(name=name, target=target)
        return msg

    msg = message(names)
    directory = Directory.from_proto(msg)
    assert list(directory) == names
    assert directory.to_proto() == msg
    assert Directory.decode(directory.encode()) == directory
    if kind == "directories":
        assert directory.size == count + sum(range(count))
    edge = nodes_mod.DECODE_CHUNK
    swapped = [*names[: edge - 1], names[edge], names[edge - 1], *names[edge + 1 :]]
    with pytest.raises(ValidationError, match="wrong sorting"):
        Directory.from_proto(message(swapped))
    with pytest.raises(ValidationError):
        Directory.from_proto(message(names, bad=edge + 3))


def test_from_proto_accepts_each_list_sorted_on_its_own() -> None:
    msg = castore_pb2.Directory(
        directories=[
            castore_pb2.DirectoryNode(name=b"b", digest=DUMMY, size=42),
            castore_pb2.DirectoryNode(name=b"c", digest=DUMMY, size=42),
        ],
        symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"foo")],
    )
    directory = Directory.from_proto(msg)
    assert list(directory) == [b"a", b"b", b"c"]
    assert directory.to_proto() == msg


def test_directory_size_counts_entries_and_child_sizes() -> None:
    assert Directory().size == 0
    assert Directory([(b"foo", DirectoryNode(DUMMY, 0))]).size == 1
    assert Directory([(b"foo", DirectoryNode(DUMMY, 4))]).size == 5
    assert Directory([(b"foo", FileNode(DUMMY, 42))]).size == 1
    assert Directory([(b"foo", SymlinkNode(b"bar"))]).size == 1
    mixed = Directory(
        [
            (b"a", DirectoryNode(DUMMY, 3)),
            (b"b", DirectoryNode(DUMMY_2, 10)),
            (b"c", FileNode(DUMMY, 1000)),
            (b"d", SymlinkNode(b"x")),
        ]
    )
    assert mixed.size == 4 + 3 + 10
    assert mixed.as_node() == DirectoryNode(mixed.digest, 17)


def test_directory_size_overflow_rejected() -> None:
    with pytest.raises(ValidationError):
        Directory([(b"a", DirectoryNode(DUMMY, 2**64 - 1))])
    with pytest.raises(ValidationError, match="out of range"):
        Directory([(b"a", FileNode(DUMMY, 2**64))])
    with pytest.raises(ValidationError, match="out of range"):
        Directory([(b"a", FileNode(DUMMY, -1))])


def test_directory_iterates_in_byte_order_whatever_the_input_order() -> None:
    entries: list[tuple[bytes, Node]] = [
        (b"\xff", SymlinkNode(b"t")),
        (b"b", FileNode(DUMMY, 1)),
        (b"B", DirectoryNode(DUMMY, 0)),
        (b"a", FileNode(DUMMY, 2)),
    ]
    forward = Directory(entries)
    backward = Directory(reversed(entries))
    assert list(forward) == [b"B", b"a", b"b", b"\xff"]
    assert dict(forward.items()) == dict(entries)
    assert list(forward.values()) == [forward[name] for name in forward]
    assert forward[b"b"] == FileNode(DUMMY, 1)
    assert b"c" not in forward
    with pytest.raises(KeyError):
        forward[b"c"]
    decoded = Directory.decode(forward.encode(), forward.digest)
    assert decoded == forward
    assert dict(decoded.items()) == dict(entries)
    assert forward == backward
    assert forward.encode() == backward.encode()
    assert hash(forward) == hash(backward)
    assert [name for name, _ in forward.child_directories()] == [b"B"]


# Known answers: the encodings below are written from the protobuf wire format
# (tag = field << 3 | wire type; 2 = length-delimited, 0 = varint), not produced
# by the protobuf library, so they pin the canonical form tvix hashes.


def test_empty_directory_digest() -> None:
    assert Directory().encode() == b""
    assert Directory().digest.hex() == EMPTY_DIGEST_HEX


KEEP_FILE = (
    b"\x0a\x05.keep"  # name (field 1)
    + b"\x12\x20"  # digest (field 2), 32 bytes
    + bytes.fromhex(EMPTY_DIGEST_HEX)
    # size 0 and executable false: proto3 leaves default scalars out
)
DIRECTORY_WITH_KEEP = Directory([(b".keep", FileNode(EMPTY_BLOB_DIGEST, 0, False))])


def test_keep_directory_encoding_and_digest() -> None:
    expected = b"\x12" + bytes([len(KEEP_FILE)]) + KEEP_FILE  # files (field 2)
    assert len(KEEP_FILE) == 41
    assert DIRECTORY_WITH_KEEP.encode() == expected
    assert DIRECTORY_WITH_KEEP.digest == blake3.blake3(expected).digest()
    assert DIRECTORY_WITH_KEEP.size == 1
    assert Directory.decode(expected, expected=DIRECTORY_WITH_KEEP.digest) == DIRECTORY_WITH_KEEP


def test_complicated_directory_encoding_and_digest() -> None:
    # tvix's castore/src/fixtures.rs DIRECTORY_COMPLICATED.
    directory = Directory(
        [
            (b"keep", DirectoryNode(DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size)),
            (b".keep", FileNode(EMPTY_BLOB_DIGEST, 0, False)),
            (b"aa", SymlinkNode(b"/nix/store/somewhereelse")),
        ]
    )
    keep_dir = (
        b"\x0a\x04keep" + b"\x12\x20" + DIRECTORY_WITH_KEEP.digest + b"\x18\x01"  # size 1
    )
    symlink = b"\x0a\x02aa" + b"\x12\x18/nix/store/somewhereelse"
    expected = (
        b"\x0a" + bytes([len(keep_dir)]) + keep_dir  # directories (field 1)
        + b"\x12" + bytes([len(KEEP_FILE)]) + KEEP_FILE  # files (field 2)
        + b"\x1a" + bytes([len(symlink)]) + symlink  # symlinks (field 3)
    )  # fmt: skip
    assert directory.encode() == expected
    assert directory.digest == blake3.blake3(expected).digest()
    assert directory.size == 3 + 1
    assert Directory.decode(expected, expected=directory.digest) == directory


def test_executable_file_with_size_encoding() -> None:
    digest = B3Digest.of(b"#!/bin/sh\n")
    directory = Directory([(b"run", FileNode(digest, 300, True))])
    # 300 = 0b10_0101100: low seven bits with the continuation bit, then 2.
    inner = b"\x0a\x03run" + b"\x12\x20" + digest + b"\x18\xac\x02" + b"\x20\x01"
    expected = b"\x12" + bytes([len(inner)]) + inner
    assert directory.encode() == expected
    assert directory.digest == blake3.blake3(expected).digest()
    # Large sizes take up to ten varint bytes; check against the helper.
    big = Directory([(b"big", FileNode(digest, 2**64 - 1, False))])
    big_inner = (
        length_delimited(1, b"big") + length_delimited(2, digest) + varint_field(3, 2**64 - 1)
    )
    assert varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    assert big.encode() == length_delimited(2, big_inner)


def test_decode_checks_digest_and_rejects_garbage() -> None:
    data = DIRECTORY_WITH_KEEP.encode()
    with pytest.raises(IntegrityError):
        Directory.decode(data, expected=EMPTY_BLOB_DIGEST)
    with pytest.raises(ValidationError, match="undecodable"):
        Directory.decode(b"\x12\xff\xff")
    # A valid protobuf whose lists are not sorted: canonical form is enforced.
    unsorted = length_delimited(
        2, length_delimited(1, b"b") + length_delimited(2, DUMMY)
    ) + length_delimited(2, length_delimited(1, b"a") + length_delimited(2, DUMMY))
    with pytest.raises(ValidationError, match="sorting"):
        Directory.decode(unsorted, expected=B3Digest.of(unsorted))


# ---------------------------------------------------------------- store paths

NET_TOOLS = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"
HASH = NET_TOOLS[:32]


def test_store_path_parse_and_format() -> None:
    path = StorePath.parse(NET_TOOLS)
    assert path.name == "net-tools-1.60_p20170221182432"
    assert path.digest == nixbase32.decode(HASH, 20)
    assert path.basename == NET_TOOLS == str(path)
    assert path.absolute == f"{STORE_DIR}/{NET_TOOLS}"
    assert StorePath.parse(NET_TOOLS.encode()) == path
    assert StorePath.parse_absolute(path.absolute) == path


@pytest.mark.parametrize(
    "absolute", [NET_TOOLS, "/nix/store" + NET_TOOLS, f"/nix/storex/{NET_TOOLS}", f"/x/{NET_TOOLS}"]
)
def test_store_path_parse_absolute_rejects(absolute: str) -> None:
    with pytest.raises(ValidationError):
        StorePath.parse_absolute(absolute)


@pytest.mark.parametrize(
    "basename",
    [
        "",
        HASH,
        HASH + "-",  # empty name
        HASH + "_foo",  # no dash
        "e" + HASH[1:] + "-foo",  # 'e' is not nixbase32
        HASH.upper() + "-foo",
        HASH[:-1] + "-foo",  # hash too short
        HASH + "-foo/bar",
        HASH + "-foo bar",
        HASH + "-foo@bar",
        HASH + "-f\u00f6\u00f6",
        HASH + "-" + "a" * 212,
        HASH + "-.",
        HASH + "-..",
        HASH + "-.-foo",
        HASH + "-..-foo",
    ],
)
def test_store_path_parse_rejects(basename: str) -> None:
    with pytest.raises(ValidationError):
        StorePath.parse(basename)


@pytest.mark.parametrize(
    "name",
    ["a" * 211, ".foo", "..foo", "...", ".x-y", "foo-", "+-_?=.09AZaz", "-foo", "foo."],
)
def test_store_path_names_accepted(name: str) -> None:
    path = StorePath.parse(f"{HASH}-{name}")
    assert path.name == name
    assert validate_store_path_name(name.encode()) == name


def test_store_path_digest_length() -> None:
    with pytest.raises(ValidationError):
        StorePath(bytes(19), "foo")
    with pytest.raises(ValidationError):
        StorePath(bytes(21), "foo")
    with pytest.raises(ValidationError):
        StorePath(bytes(20), "")


def test_make_store_path_known_answer() -> None:
    # The construction spelled out independently: sha256 of the fingerprint,
    # XOR-folded to 20 bytes (bytes 20..31 onto 0..11). The real oracle is
    # the `nix-store --add` test below; this one runs without Nix.
    inner = hashlib.sha256(b"x").digest()
    fingerprint = f"source:sha256:{inner.hex()}:/nix/store:foo".encode()
    full = hashlib.sha256(fingerprint).digest()
    folded = bytes(full[i] ^ full[i + 20] if i < 12 else full[i] for i in range(20))
    assert make_store_path("source", inner, "foo") == StorePath(folded, "foo")
    assert source_store_path(inner, "foo") == StorePath(folded, "foo")
    with pytest.raises(ValidationError):
        source_store_path(inner, "bad/name")


def _make_tree(root: Path) -> None:
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run").chmod(0o755)
    (root / "link").symlink_to("hello.txt")
    (root / "sub").mkdir()
    (root / "sub" / "empty").mkdir()
    (root / "sub" / "data").write_bytes(bytes(range(256)) * 100)


def nix_store_add(store: Path, path: Path) -> str:
    """`nix-store --add` into a private chroot store, so /nix/store stays untouched."""
    out = subprocess.run(
        ["nix-store", "--store", str(store), "--add", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _nar_sha256(path: Path) -> bytes:
    dump = subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True)
    return hashlib.sha256(dump.stdout).digest()


@needs_nix
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("tree", _make_tree),
        ("plain-file", lambda p: p.write_bytes(b"just a file\n")),
        ("empty-file", lambda p: p.write_bytes(b"")),
        ("exec-file.sh", lambda p: (p.write_bytes(b"#!/bin/sh\n"), p.chmod(0o755))),
        ("empty_dir", lambda p: p.mkdir()),
        ("symlink", lambda p: p.symlink_to("/nowhere")),
    ],
)
def test_source_store_path_matches_nix_store_add(
    tmp_path: Path, name: str, make: Callable[[Path], object]
) -> None:
    src = tmp_path / name
    make(src)
    printed = nix_store_add(tmp_path / "store", src)
    assert printed.startswith(STORE_DIR + "/")
    expected = StorePath.parse_absolute(printed)
    assert expected.name == name
    assert source_store_path(_nar_sha256(src), name) == expected


# ---------------------------------------------------------------- path infos

REF_A = StorePath.parse(NET_TOOLS)
REF_B = StorePath.parse("dxjjq32sacvx26nzbl4wr3hqjmkmyb2m-hello-2.12")


def full_path_info() -> PathInfo:
    return PathInfo(
        store_path=StorePath.parse("4m1vhs2pvpkqkh0yj8x0cqa1smi3cdkn-tree"),
        node=DirectoryNode(DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
        nar_size=1234,
        nar_sha256=hashlib.sha256(b"nar").digest(),
        references=(REF_A, REF_B),
        signatures=(Signature("cache.example.org-1", bytes(range(64))),),
        # tvix's wire format leaves the ".drv" suffix out of the deriver's name.
        deriver=StorePath.parse("2vbx1x6n7z1y7zwnqsqfxq0fs7r7i9w8-tree"),
        ca=ContentAddress(CAHashType.NAR_SHA256, hashlib.sha256(b"nar").digest()),
    )


@pytest.mark.parametrize(
    "info",
    [
        full_path_info(),
        PathInfo(
            store_path=REF_B,
            node=FileNode(EMPTY_BLOB_DIGEST, 0, True),
            nar_size=0,
            nar_sha256=bytes(32),
        ),
        PathInfo(
            store_path=REF_A,
            node=SymlinkNode(b"/nix/store/elsewhere"),
            nar_size=2**64 - 1,
            nar_sha256=b"\xff" * 32,
            ca=ContentAddress(CAHashType.FLAT_MD5, bytes(16)),
        ),
    ],
)
def test_path_info_roundtrip(info: PathInfo) -> None:
    msg = info.to_proto()
    assert msg.node.WhichOneof("node") in ("directory", "file", "symlink")
    assert PathInfo.from_proto(msg) == info
    assert PathInfo.decode(info.encode()) == info
    assert info.encode() == msg.SerializeToString(deterministic=True)


def test_path_info_proto_fields() -> None:
    msg = full_path_info().to_proto()
    assert msg.node.directory.name == b"4m1vhs2pvpkqkh0yj8x0cqa1smi3cdkn-tree"
    assert list(msg.references) == [REF_A.digest, REF_B.digest]
    assert list(msg.narinfo.reference_names) == [REF_A.basename, REF_B.basename]
    assert msg.narinfo.deriver.name == "tree"
    assert msg.narinfo.deriver.digest == nixbase32.decode("2vbx1x6n7z1y7zwnqsqfxq0fs7r7i9w8")
    assert msg.narinfo.ca.type == pathinfo_pb2.NARInfo.CA.NAR_SHA256


@pytest.mark.parametrize(("ca_type", "length"), [(t, t.digest_len) for t in CAHashType])
def test_ca_digest_lengths(ca_type: CAHashType, length: int) -> None:
    assert ContentAddress(ca_type, bytes(length)).digest == bytes(length)
    with pytest.raises(ValidationError):
        ContentAddress(ca_type, bytes(length + 1))


def _broken(mutate: Callable[[pathinfo_pb2.PathInfo], object]) -> pathinfo_pb2.PathInfo:
    msg = full_path_info().to_proto()
    mutate(msg)
    return msg


def _rename_node(msg: pathinfo_pb2.PathInfo) -> None:
    msg.node.directory.name = b"not-a-store-path"


def _drop_reference_name(msg: pathinfo_pb2.PathInfo) -> None:
    del msg.narinfo.reference_names[-1]


def _swap_reference_names(msg: pathinfo_pb2.PathInfo) -> None:
    names = list(msg.narinfo.reference_names)
    del msg.narinfo.reference_names[:]
    msg.narinfo.reference_names.extend(reversed(names))


def _short_reference(msg: pathinfo_pb2.PathInfo) -> None:
    msg.references[0] = bytes(19)


def _bad_reference_name(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.reference_names[0] = "foo"


def _ca_wrong_length(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.ca.digest = bytes(20)


def _ca_unknown_type(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.ca.type = 99  # type: ignore[assignment]


def _nar_sha256_short(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.nar_sha256 = bytes(31)


def _no_nar_sha256(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.nar_sha256 = b""


def _bad_signature(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.signatures[0].data = bytes(63)


def _bad_deriver(msg: pathinfo_pb2.PathInfo) -> None:
    msg.narinfo.deriver.name = "bad/name"


def _bad_node_digest(msg: pathinfo_pb2.PathInfo) -> None:
    msg.node.directory.digest = bytes(31)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_broken(lambda m: m.ClearField("node")), "no node"),
        (_broken(lambda m: m.ClearField("narinfo")), "no narinfo"),
        (_broken(_rename_node), "store path"),
        (_broken(_bad_node_digest), "digest length"),
        (_broken(_drop_reference_name), "2 references but 1 reference names"),
        (_broken(_swap_reference_names), "does not match its digest"),
        (_broken(_short_reference), "digest of 19 bytes"),
        (_broken(_bad_reference_name), "too short"),
        (_broken(_ca_wrong_length), "digest of 20 bytes, expected 32"),
        (_broken(_ca_unknown_type), "unknown content address type 99"),
        (_broken(_nar_sha256_short), "nar_sha256 of 31 bytes"),
        (_broken(_no_nar_sha256), "nar_sha256 of 0 bytes"),
        (_broken(_bad_signature), "63 bytes, expected 64"),
        (_broken(_bad_deriver), "invalid character"),
    ],
)
def test_path_info_validation(msg: pathinfo_pb2.PathInfo, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PathInfo.from_proto(msg)
    with pytest.raises(ValidationError, match=match):
        PathInfo.decode(msg.SerializeToString())


def test_path_info_decode_garbage() -> None:
    with pytest.raises(ValidationError, match="undecodable"):
        PathInfo.decode(b"\x0a\xff\xff\xff")


def test_path_info_constructor_checks_nar_sha256() -> None:
    with pytest.raises(ValidationError, match="nar_sha256"):
        PathInfo(REF_A, SymlinkNode(b"x"), 0, bytes(20))


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("raw", "scheme", "path", "host", "port"),
    [
        ("memory://", "memory", "", "", 0),
        ("grpc+unix:///run/tvix/s.sock", "grpc+unix", "/run/tvix/s.sock", "", 0),
        ("grpc+http://localhost:8000", "grpc+http", "", "localhost", 8000),
        ("grpc+http://127.0.0.1:1/", "grpc+http", "", "127.0.0.1", 1),
        ("grpc+http://[::1]:9000", "grpc+http", "", "::1", 9000),
        ("objectstore+file:///var/lib/blobs", "objectstore+file", "/var/lib/blobs", "", 0),
        ("objectstore+file:///var/lib/blobs/", "objectstore+file", "/var/lib/blobs", "", 0),
        ("raw+file:///var/lib/blobs", "raw+file", "/var/lib/blobs", "", 0),
        ("raw+file:///var//lib/./blobs/", "raw+file", "/var/lib/blobs", "", 0),
        ("sqlite:///var/lib/d.sqlite", "sqlite", "/var/lib/d.sqlite", "", 0),
        ("sqlite:///var//lib/x/../d.sqlite", "sqlite", "/var/lib/d.sqlite", "", 0),
    ],
)
def test_address_good(raw: str, scheme: str, path: str, host: str, port: int) -> None:
    addr = parse_address(raw)
    assert addr == StoreAddress(raw, scheme, path=path, host=host, port=port)
    assert str(addr) == raw


def test_grpc_targets() -> None:
    assert parse_address("grpc+unix:///run/s.sock").grpc_target == "unix:///run/s.sock"
    assert parse_address("grpc+http://localhost:8000").grpc_target == "localhost:8000"
    assert parse_address("grpc+http://[::1]:9000").grpc_target == "[::1]:9000"
    with pytest.raises(AddressError, match="sqlite:///x"):
        _ = parse_address("sqlite:///x").grpc_target


@pytest.mark.parametrize(
    ("raw", "allowed", "match"),
    [
        ("redis://localhost", BLOB_SCHEMES | DIRECTORY_SCHEMES, "unsupported scheme 'redis'"),
        ("objectstore+s3://bucket/x", BLOB_SCHEMES, "unsupported scheme"),
        ("grpc+https://host:443", BLOB_SCHEMES, "unsupported scheme"),
        ("sqlite:///x.sqlite", BLOB_SCHEMES, "unsupported scheme 'sqlite'"),
        ("objectstore+file:///x", DIRECTORY_SCHEMES, "unsupported scheme 'objectstore\\+file'"),
        ("objectstore+file:///x", PATH_INFO_SCHEMES, "unsupported scheme"),
        ("raw+file:///x", DIRECTORY_SCHEMES, "unsupported scheme 'raw\\+file'"),
        ("raw+file://host/x", BLOB_SCHEMES, "got host 'host'"),
        ("raw+file://relative", BLOB_SCHEMES, "no host"),
        ("raw+file:///x?compress=zstd", BLOB_SCHEMES, "query"),
        ("objectstore+file:///x?opt=1", BLOB_SCHEMES, "query"),
        ("", BLOB_SCHEMES, "expected <scheme>://"),
        ("memory", BLOB_SCHEMES, "expected <scheme>://"),
        ("/var/lib/blobs", BLOB_SCHEMES, "expected <scheme>://"),
        ("sqlite:relative.sqlite", DIRECTORY_SCHEMES, "expected <scheme>://"),
        ("sqlite://relative.sqlite", DIRECTORY_SCHEMES, "no host"),
        ("sqlite://./relative.sqlite", DIRECTORY_SCHEMES, "no host"),
        ("sqlite://", DIRECTORY_SCHEMES, "absolute"),
        ("sqlite:///", DIRECTORY_SCHEMES, "not /"),
        ("sqlite://localhost/var/d.sqlite", DIRECTORY_SCHEMES, "got host 'localhost'"),
        ("objectstore+file://host/var/blobs", BLOB_SCHEMES, "got host 'host'"),
        ("objectstore+file://", BLOB_SCHEMES, "absolute"),
        ("grpc+unix://host/run/s.sock", BLOB_SCHEMES, "got host 'host'"),
        ("grpc+unix://run/s.sock", BLOB_SCHEMES, "no host"),
        ("grpc+http://localhost", BLOB_SCHEMES, "host:port"),
        ("grpc+http://:8000", BLOB_SCHEMES, "host:port"),
        ("grpc+http://localhost:8000/path", BLOB_SCHEMES, "no path"),
        ("grpc+http://user:pw@localhost:8000", BLOB_SCHEMES, "credentials"),
        ("grpc+http://localhost:http", BLOB_SCHEMES, "(?i)port"),
        ("grpc+http://localhost:70000", BLOB_SCHEMES, "(?i)port"),
        ("memory:///some/path", BLOB_SCHEMES, "no host or path"),
        ("memory://somehost", BLOB_SCHEMES, "no host or path"),
        ("sqlite:///d.sqlite?mode=ro", DIRECTORY_SCHEMES, "query"),
        ("memory://#frag", BLOB_SCHEMES, "fragment"),
    ],
)
def test_address_bad(raw: str, allowed: frozenset[str], match: str) -> None:
    with pytest.raises(AddressError, match=match) as info:
        parse_address(raw, allowed)
    assert info.value.addr == raw
    assert repr(raw) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_addr_picks_the_embedded_backends(tmp_path: Path) -> None:
    assert isinstance(blobs.from_addr("memory://"), MemoryBlobService)
    assert isinstance(directories.from_addr("memory://"), MemoryDirectoryService)
    assert isinstance(pathinfos.from_addr("memory://"), MemoryPathInfoService)
    raw_blobs = blobs.from_addr(f"raw+file://{tmp_path}/raw")
    assert isinstance(raw_blobs, RawFileBlobService)
    assert raw_blobs.root == f"{tmp_path}/raw"
    tvix_blobs = blobs.from_addr(f"objectstore+file://{tmp_path}/objects")
    assert isinstance(tvix_blobs, ObjectStoreBlobService)
    assert tvix_blobs.root == f"{tmp_path}/objects"
    sqlite_dirs = directories.from_addr(f"sqlite://{tmp_path}/d.sqlite", timeout=3)
    assert isinstance(sqlite_dirs, SqliteDirectoryService)
    assert sqlite_dirs.path == f"{tmp_path}/d.sqlite"
    sqlite_infos = pathinfos.from_addr(f"sqlite://{tmp_path}/p.sqlite")
    assert isinstance(sqlite_infos, SqlitePathInfoService)
    assert sqlite_infos.path == f"{tmp_path}/p.sqlite"
    # Opening is lazy: nothing exists until the first operation.
    assert os.listdir(tmp_path) == []
    with pytest.raises(AddressError, match="sqlite:///x"):
        blobs.from_addr("sqlite:///x")
    with pytest.raises(AddressError, match="objectstore"):
        pathinfos.from_addr("objectstore+file:///x")
