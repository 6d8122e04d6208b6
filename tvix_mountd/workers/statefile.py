"""The part of a mount's state that outlives its worker process.

The kernel keeps node IDs (with their lookup counts) and file handles across
a handover to a new worker, so whatever answers for them must outlive the
worker that handed them out. That is this file: a memfd that the supervisor
creates with the mount and keeps open, and that each worker maps in turn.
It holds three regions:

- inode slots: per inode number, its lookup count, the count of children a
  kept listing holds, how many of its parents' kept listings hold it (see
  inodes.py) and the packed node;
- a heap for symlink targets (the only variable-length part of a node);
- the request journal (journal.py): requests in flight, and the ones that
  were in flight when a worker died;
- a log of the root names the kernel was given, for a worker that serves
  the mount from another store to invalidate.

A worker may be SIGKILLed at any instruction, so every change is ordered so
that the file is usable at every instant: a slot is live only while its
lookup count is non-zero, and the count is written last when a slot is
filled and first when it is freed; the heap's end is advanced only after the
record it covers is written. What is not referenced by a live slot (a freed
slot, an unreferenced heap record) is found again by `scan` when the next
worker maps the file. Stores of 8 aligned bytes (the counts, the heap end)
are single instructions on the architectures we run on, so a kill never
leaves one half-written.

The regions are reserved at their largest (a sparse memfd: pages cost
memory only once touched), so the mapping never has to move or grow.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from typing import Final

from tvix_mountd.castore.nodes import PACKED_SYMLINK, PackedNode

MAGIC: Final = b"TVIXMSF1"
HEADER_SIZE: Final = 4096
SLOT_SIZE: Final = 64
# 64 Mi inode numbers; a kernel holding that many inodes would need tens of
# GiB for them itself.
MAX_SLOTS: Final = 1 << 26
HEAP_SIZE: Final = 1 << 32
NAMES_SIZE: Final = 1 << 30
SLOTS_OFFSET: Final = HEADER_SIZE
HEAP_OFFSET: Final = SLOTS_OFFSET + SLOT_SIZE * MAX_SLOTS
NAMES_OFFSET: Final = HEAP_OFFSET + HEAP_SIZE
FILE_SIZE: Final = NAMES_OFFSET + NAMES_SIZE

# Header fields (byte offsets).
_HWM: Final = 8  # u64: slots below this index have been used at least once
_HEAP_END: Final = 16  # u64: bytes of the heap in use (records below it are whole)
_NAMES_END: Final = 24  # u64: bytes of the root-name log in use
JOURNAL_OFFSET: Final = 64  # journal.py's region, up to the end of the header
JOURNAL_SIZE: Final = HEADER_SIZE - JOURNAL_OFFSET

# Slot fields (byte offsets within a slot).
_COUNT: Final = 0  # u64 lookup count; 0 = free
_HELD: Final = 8  # u32: leading children held by a kept listing
_NODE: Final = 15  # the packed node: kind byte, then 32-byte digest and u64 size
_NODE_END: Final = _NODE + 41
# u32: how many of the holds in the count are kept listings' of its parents
# (inodes.py, `forget`). Zero in a file written before it was kept: fewer
# holds than there are is the safe side.
_HELD_BY: Final = _NODE_END
# A symlink's slot: kind byte at _NODE, then the heap offset and length of
# its target; or, for a target that fits (INLINE_TARGET), the kind byte
# _INLINE_SYMLINK, the target's length and the target itself.
_TARGET: Final = struct.Struct("<QI")
_INLINE_SYMLINK: Final = ord("i")
INLINE_TARGET: Final = _NODE_END - _NODE - 2
_HEAP_RECORD: Final = struct.Struct("<I4x")  # the record's capacity; its bytes follow
_NAME_RECORD: Final = struct.Struct("<H")  # a logged root name's length; its bytes follow
_MIN_RECORD: Final = 16

_U64_PER_SLOT: Final = SLOT_SIZE // 8


class StateFileError(Exception):
    """The descriptor is not a state file we can use."""


class StateFile:
    """One mapping of a mount's state file."""

    def __init__(self, fd: int) -> None:
        """Map the state file open as `fd` (which stays the caller's to close)."""
        size = os.fstat(fd).st_size
        if size != FILE_SIZE:
            raise StateFileError(f"state file has {size} bytes, expected {FILE_SIZE}")
        self._map = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if self._map[:8] != MAGIC:
            self._map.close()
            raise StateFileError("not a tvix-mountd state file")
        view = memoryview(self._map)
        self._header = view[:HEADER_SIZE].cast("Q")
        self.journal = view[JOURNAL_OFFSET:HEADER_SIZE]
        self._slots = view[SLOTS_OFFSET:HEAP_OFFSET]
        # Slot i's lookup count is counts[i * 8]: one aligned 8-byte word.
        self._counts = self._slots.cast("Q")
        self._held = self._slots.cast("I")
        self._heap = view[HEAP_OFFSET:NAMES_OFFSET]
        self._names = view[NAMES_OFFSET:]
        # Heap records free for reuse, by capacity (rebuilt by `scan`).
        self._free_records: dict[int, list[int]] = {}
        # The root names logged so far (read by `root_names`).
        self._logged_names: set[bytes] = set()

    @classmethod
    def create(cls, name: str = "tvix-mountd-state") -> int:
        """A new, empty state file: its descriptor (close-on-exec), for the
        process that keeps it (the supervisor, or a mount without one)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, FILE_SIZE)
            os.pwrite(fd, MAGIC + struct.pack("<Q", 2), 0)  # numbers 0 and 1 are never slots
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Unmap, once nothing else holds a view of the mapping (the journal's
        views may outlive this call: then the mapping goes with the last of
        them)."""
        for view in (self._counts, self._held, self._header, self.journal, self._slots):
            view.release()
        self._heap.release()
        self._names.release()
        with contextlib.suppress(BufferError):
            self._map.close()

    # -- slots -------------------------------------------------------------

    @property
    def high_water(self) -> int:
        """One past the highest slot ever used."""
        hwm: int = self._header[_HWM // 8]
        return hwm

    def count(self, ino: int) -> int:
        value: int = self._counts[ino * _U64_PER_SLOT]
        return value

    def set_count(self, ino: int, count: int) -> None:
        self._counts[ino * _U64_PER_SLOT] = count

    def held(self, ino: int) -> int:
        value: int = self._held[ino * (SLOT_SIZE // 4) + _HELD // 4]
        return value

    def set_held(self, ino: int, held: int) -> None:
        self._held[ino * (SLOT_SIZE // 4) + _HELD // 4] = held

    def held_by(self, ino: int) -> int:
        value: int = self._held[ino * (SLOT_SIZE // 4) + _HELD_BY // 4]
        return value

    def set_held_by(self, ino: int, holds: int) -> None:
        self._held[ino * (SLOT_SIZE // 4) + _HELD_BY // 4] = holds

    def fill(self, ino: int, node: PackedNode, count: int) -> None:
        """Make free slot `ino` hold `node` with lookup count `count` (> 0).

        The node and its target first, the count last: until the count is
        written the slot is still free, whatever else was written.
        """
        if ino >= MAX_SLOTS:
            raise StateFileError(f"more than {MAX_SLOTS} inodes")
        base = ino * SLOT_SIZE
        slots = self._slots
        slots[base + _HELD : base + _HELD + 4] = b"\0\0\0\0"
        slots[base + _HELD_BY : base + _HELD_BY + 4] = b"\0\0\0\0"
        if node[0] == PACKED_SYMLINK:
            target = node[1:]
            if len(target) <= INLINE_TARGET:
                slots[base + _NODE] = _INLINE_SYMLINK
                slots[base + _NODE + 1] = len(target)
                slots[base + _NODE + 2 : base + _NODE + 2 + len(target)] = target
            else:
                offset = self._store_target(target)
                slots[base + _NODE] = PACKED_SYMLINK
                _TARGET.pack_into(slots, base + _NODE + 1, offset, len(target))
        else:
            slots[base + _NODE : base + _NODE_END] = node
        if ino >= self.high_water:
            self._header[_HWM // 8] = ino + 1
        self._counts[ino * _U64_PER_SLOT] = count

    def free(self, ino: int) -> None:
        """Free slot `ino`: its count becomes 0; a symlink's target record
        becomes reusable (by this mapping now, by the next one after `scan`)."""
        self._counts[ino * _U64_PER_SLOT] = 0
        base = ino * SLOT_SIZE
        if self._slots[base + _NODE] == PACKED_SYMLINK:
            offset, _ = _TARGET.unpack_from(self._slots, base + _NODE + 1)
            self._release_target(offset)

    def node(self, ino: int) -> PackedNode:
        """The packed node of live slot `ino`."""
        base = ino * SLOT_SIZE
        slots = self._slots
        kind = slots[base + _NODE]
        if kind == _INLINE_SYMLINK:
            start = base + _NODE + 2
            return b"l" + bytes(slots[start : start + slots[base + _NODE + 1]])
        if kind != PACKED_SYMLINK:
            return bytes(slots[base + _NODE : base + _NODE_END])
        offset, length = _TARGET.unpack_from(slots, base + _NODE + 1)
        start = offset + _HEAP_RECORD.size
        return b"l" + bytes(self._heap[start : start + length])

    def scan(self) -> tuple[list[tuple[int, PackedNode, int]], list[int]]:
        """Read a file that another process wrote: the live slots (number,
        node, lookup count) and the free slot numbers below the high-water
        mark. Rebuilds the heap's free records from what the live slots
        reference."""
        stride = _U64_PER_SLOT
        counts = self._counts[: self.high_water * stride : stride].tolist()
        live: list[tuple[int, PackedNode, int]] = []
        free: list[int] = []
        used: set[int] = set()
        slots = self._slots
        for ino in range(2, len(counts)):
            count = counts[ino]
            if not count:
                free.append(ino)
                continue
            live.append((ino, self.node(ino), count))
            if slots[ino * SLOT_SIZE + _NODE] == PACKED_SYMLINK:
                used.add(_TARGET.unpack_from(slots, ino * SLOT_SIZE + _NODE + 1)[0])
        self.root_names()
        self._free_records = {}
        offset, end = 0, self._heap_end()
        while offset < end:
            (capacity,) = _HEAP_RECORD.unpack_from(self._heap, offset)
            if offset not in used:
                self._free_records.setdefault(capacity, []).append(offset)
            offset += _HEAP_RECORD.size + capacity
        return live, free

    # -- the root-name log ---------------------------------------------------------

    def log_root_name(self, name: bytes) -> None:
        """Note that the kernel was told about root entry `name` (a lookup
        answered with it), once per name: a worker serving a changed store
        invalidates every entry the kernel may still cache. Names that no
        longer fit are not logged (the log holds about 17 million)."""
        if name in self._logged_names:
            return
        end: int = self._header[_NAMES_END // 8]
        record_end = end + _NAME_RECORD.size + len(name)
        if record_end > NAMES_SIZE:
            return
        _NAME_RECORD.pack_into(self._names, end, len(name))
        self._names[end + _NAME_RECORD.size : record_end] = name
        # The record first, then the end that covers it.
        self._header[_NAMES_END // 8] = record_end
        self._logged_names.add(name)

    def root_names(self) -> set[bytes]:
        """Every root name logged on this connection."""
        names = set()
        offset, end = 0, self._header[_NAMES_END // 8]
        while offset < end:
            (length,) = _NAME_RECORD.unpack_from(self._names, offset)
            start = offset + _NAME_RECORD.size
            names.add(bytes(self._names[start : start + length]))
            offset = start + length
        self._logged_names = set(names)
        return names

    # -- the heap of symlink targets ---------------------------------------------

    def _heap_end(self) -> int:
        end: int = self._header[_HEAP_END // 8]
        return end

    def _store_target(self, target: bytes) -> int:
        capacity = max(_MIN_RECORD, 1 << (len(target) - 1).bit_length())
        records = self._free_records_of(capacity)
        if records:
            offset = records.pop()
        else:
            offset = self._heap_end()
            if offset + _HEAP_RECORD.size + capacity > HEAP_SIZE:
                raise StateFileError("symlink target heap is full")
            _HEAP_RECORD.pack_into(self._heap, offset, capacity)
        start = offset + _HEAP_RECORD.size
        self._heap[start : start + len(target)] = target
        if offset == self._heap_end():
            # Only now is the record part of the heap (a kill before this
            # leaves it beyond the end, where it is simply written again).
            self._header[_HEAP_END // 8] = start + capacity
        return offset

    def _release_target(self, offset: int) -> None:
        (capacity,) = _HEAP_RECORD.unpack_from(self._heap, offset)
        self._free_records_of(capacity).append(offset)

    def _free_records_of(self, capacity: int) -> list[int]:
        return self._free_records.setdefault(capacity, [])
