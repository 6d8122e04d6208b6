"""Node -> inode number for the live inodes, in 8 bytes a slot.

The inode table needs this sharing index (same content, same inode) for
every live inode. As a dict it cost ~80 bytes an entry: the dict's entry
and an int object for each number. Here it is an open-addressing hash table
(linear probing) of inode numbers in one array, 1/8 to 1/2 full; a slot's
key is the node the table's `nodes` list holds at that number, so nothing
but the number is stored. 0 marks an empty slot (inode 0 is never handed
out). Removal shifts the entries after it back (no tombstones), so lookups
never slow down as inodes come and go.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Final

from tvix_mountd.castore.nodes import PackedNode

_MIN_SLOTS: Final = 1024


class NodeIndex:
    __slots__ = ("_len", "_mask", "_nodes", "_slots")

    def __init__(self, nodes: Sequence[PackedNode | None], expected: int = 0) -> None:
        """An empty index whose keys are `nodes[number]` (the caller's list,
        kept up to date by the caller: a number's node may change only while
        the number is not in the index), sized for `expected` numbers (a
        table taken over after a handover: no rehashing while it is filled)."""
        size = _MIN_SLOTS
        while size < 2 * expected:
            size *= 2
        self._nodes = nodes
        self._slots = array("q", bytes(8 * size))
        self._mask = size - 1
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def get(self, node: PackedNode) -> int | None:
        """The number indexed for `node`, if any."""
        return self.probe(node)[0] or None

    def probe(self, node: PackedNode) -> tuple[int, int]:
        """(the number indexed for `node`, its slot), or (0, the slot where
        it would go): for `insert`, so that a miss costs one probe, not two."""
        nodes, slots, mask = self._nodes, self._slots, self._mask
        i = hash(node) & mask
        while ino := slots[i]:
            if nodes[ino] == node:
                return ino, i
            i = (i + 1) & mask
        return 0, i

    def insert(self, ino: int, slot: int) -> None:
        """Index number `ino` (whose node `probe` just did not find) at the
        slot `probe` gave."""
        self._len += 1
        if 2 * self._len > len(self._slots):
            # Four times larger: each resize rehashes every number in Python,
            # so fewer of them matter more than the slots they leave empty.
            self._resize(4 * len(self._slots))
            self._insert(ino)  # the slot moved with the resize
        else:
            self._slots[slot] = ino

    def remove(self, ino: int) -> bool:
        """Take number `ino` out, if it is the one indexed for its node."""
        nodes, slots, mask = self._nodes, self._slots, self._mask
        i = hash(nodes[ino]) & mask
        while (found := slots[i]) != ino:
            if not found:
                return False
            i = (i + 1) & mask
        # Shift back the entries of the run after it that may move, so that
        # each stays reachable from its home slot without a gap.
        j = i
        while True:
            j = (j + 1) & mask
            moved = slots[j]
            if not moved:
                break
            home = hash(nodes[moved]) & mask
            # `moved` may fill the gap at i unless its home is in (i, j].
            if (i < j and not i < home <= j) or (j < i and j < home <= i):
                slots[i] = moved
                i = j
        slots[i] = 0
        self._len -= 1
        return True

    def _insert(self, ino: int) -> None:
        slots, mask = self._slots, self._mask
        i = hash(self._nodes[ino]) & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = ino

    def _resize(self, size: int) -> None:
        """Rehash every number into `size` slots."""
        old = self._slots
        self._slots = array("q", bytes(8 * size))
        self._mask = size - 1
        for ino in old:
            if ino:
                self._insert(ino)
