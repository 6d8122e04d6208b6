"""NAR (Nix ARchive) serialisation of castore trees and of local trees.

The format: length-prefixed strings padded to 8 bytes; directories list their
entries sorted by name, which is the castore order already.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

_PAD = b"\0" * 8


def nar_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + _PAD[: (-len(data)) % 8]


NAR_MAGIC = nar_string(b"nix-archive-1")
OPEN = nar_string(b"(")
CLOSE = nar_string(b")")
TYPE = nar_string(b"type")
REGULAR = nar_string(b"regular")
EXECUTABLE = nar_string(b"executable") + nar_string(b"")
CONTENTS = nar_string(b"contents")
SYMLINK = nar_string(b"symlink")
TARGET = nar_string(b"target")
DIRECTORY = nar_string(b"directory")
ENTRY = nar_string(b"entry")
NAME = nar_string(b"name")
NODE = nar_string(b"node")


class NarWriter:
    """Emits a NAR construct by construct to `sink`, counting its size.

    The sink gets the NAR's pieces in order: small ones for the structure,
    and whatever `write` is given for file contents, as it is (no copy).
    """

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self.size = 0
        self._sink = sink

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._sink(data)

    # Structural helpers: each emits one NAR construct.
    def file_header(self, size: int, executable: bool) -> None:
        self.write(OPEN + TYPE + REGULAR + (EXECUTABLE if executable else b"") + CONTENTS)
        self.write(struct.pack("<Q", size))

    def file_trailer(self, size: int) -> None:
        self.write(_PAD[: (-size) % 8] + CLOSE)

    def symlink(self, target: bytes) -> None:
        self.write(OPEN + TYPE + SYMLINK + TARGET + nar_string(target) + CLOSE)

    def directory_open(self) -> None:
        self.write(OPEN + TYPE + DIRECTORY)

    def entry_open(self, name: bytes) -> None:
        self.write(ENTRY + OPEN + NAME + nar_string(name) + NODE)

    def entry_close(self) -> None:
        self.write(CLOSE)

    def directory_close(self) -> None:
        self.write(CLOSE)


class NarHasher(NarWriter):
    """A NarWriter that also hashes: the NAR's size and sha256 without keeping
    the bytes (`sink`, if given, gets them as well)."""

    def __init__(self, sink: Callable[[bytes], object] | None = None) -> None:
        self._sha = hashlib.sha256()
        if sink is None:
            super().__init__(self._sha.update)
        else:
            super().__init__(self._hash_and_forward)
            self._forward = sink

    def _hash_and_forward(self, data: bytes) -> None:
        self._sha.update(data)
        self._forward(data)

    def digest(self) -> bytes:
        return self._sha.digest()
