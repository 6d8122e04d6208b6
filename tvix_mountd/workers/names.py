"""A directory's entry names, packed: one bytes object and their offsets.

Cached as a tuple of bytes objects, a million names cost ~56 bytes each (the
object's header and its slot in the tuple) on top of their length; packed,
they cost their length plus 5. Names are NUL-separated (a castore name never
contains NUL), so a run of them, as a readdir hands out, comes back from one
`split` in C; a single name, as bisect asks for ~log2(n) times per lookup, is
one slice.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Sequence
from itertools import accumulate
from typing import overload


class PackedNames(Sequence[bytes]):
    __slots__ = ("_blob", "_starts")

    def __init__(self, names: Collection[bytes]) -> None:
        blob = b"\0".join(names)
        if blob.count(b"\0") != max(len(names) - 1, 0):
            raise ValueError("a name contains NUL")
        self._blob = blob
        # Where each name starts, plus where one more would: name i is
        # blob[starts[i] : starts[i + 1] - 1]. "I" (4 bytes) holds it: a
        # Directory, names included, is one protobuf message, far below 4 GiB.
        self._starts = array("I", accumulate((len(name) + 1 for name in names), initial=0))

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        starts = self._starts
        count = len(starts) - 1
        if isinstance(index, slice):
            start, stop, step = index.indices(count)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            if start >= stop:
                return []
            return self._blob[starts[start] : starts[stop] - 1].split(b"\0")
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("name index out of range")
        return self._blob[starts[index] : starts[index + 1] - 1]

    def __repr__(self) -> str:
        return f"PackedNames({len(self)} names)"
