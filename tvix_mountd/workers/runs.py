"""Where entries sit in their directories, and whether they are used in name order.

Programs that go through a directory's entries one after another (a `cat *`,
a copy, `find`, `os.walk`) use them in name order, the order a listing gives
them. Once that is seen, what comes next can be fetched before it is asked
for: the blobs of the next files (prefetch.py), the contents of the next
directories (dirahead.py). A first use is in name order when it follows the
one before it in its directory, or one but one (GAP).

An entry's place is known from its lookup or from the listing that handed
it to the kernel. Bounded: a fixed number of places, listings, directories
and windows are remembered, the oldest let go first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Final, TypeVar

from tvix_mountd.castore.nodes import PACKED_DIRECTORY, PackedNode

# Directories whose last first use, and windows, are remembered.
DIRECTORIES: Final = 4096
# Looked-up entries whose place in their directory is remembered (until used).
PLACES: Final = 1024
# Listed files, and listed directories, whose places are remembered apart
# (see `listed`): a walk lists many before it uses them.
LISTED_PLACES: Final = 4096
# Listings (readdir replies) whose entries' places are remembered: a file
# listed rather than looked up (`ls`, a copy, `os.walk`) is found there.
# A walk, or a shell's glob, lists more than these before it uses what it
# listed: `listed` can remember every entry's place instead.
LISTINGS: Final = 16
# A first use of entry i is "in name order" after one of entry i-GAP..i-1.
GAP: Final = 2

K = TypeVar("K")
V = TypeVar("V")

# (directory inode, directory node, index of the entry in it)
Place = tuple[int, PackedNode, int]


def remember(memory: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """`memory[key] = value` as the newest entry, the oldest let go past `bound`."""
    memory[key] = value
    memory.move_to_end(key)
    if len(memory) > bound:
        memory.popitem(last=False)


class NameOrderRuns:
    """Places of entries, and runs of first uses in name order per directory.

    Directories are keyed by their packed node (content, unlike an inode
    number that may be forgotten and reused)."""

    def __init__(self) -> None:
        # Entry inode -> its place: looked up, listed files, listed directories.
        self._places: OrderedDict[int, Place] = OrderedDict()
        self._file_places: OrderedDict[int, Place] = OrderedDict()
        self._directory_places: OrderedDict[int, Place] = OrderedDict()
        # Recent readdir replies: (directory inode, its node, index of the
        # first entry, the numbers of the entries), the newest last.
        self._listings: deque[tuple[int, PackedNode, int, Sequence[int]]] = deque(maxlen=LISTINGS)
        # Directory -> index of the entry whose first use came last.
        self._last_used: OrderedDict[PackedNode, int] = OrderedDict()

    def looked_up(self, ino: int, directory_ino: int, directory: PackedNode, index: int) -> None:
        """Inode `ino` was just looked up: entry `index` of `directory`."""
        remember(self._places, ino, (directory_ino, directory, index), PLACES)

    def listed(
        self,
        directory_ino: int,
        directory: PackedNode,
        start: int,
        numbers: Sequence[int],
        nodes: Sequence[PackedNode] | None = None,
    ) -> None:
        """Entries `start`... of `directory` (inode `directory_ino`) were just
        handed to the kernel in a readdir reply, as inodes `numbers`. With
        the directory's entries `nodes`: remember each one's place (as a
        lookup's), not only the reply's among the last LISTINGS, the
        subdirectories' apart (a walk's many files would push them out). A
        read-ahead a round trip away is worth the ~0.5 us an entry."""
        if not numbers:
            return
        self._listings.append((directory_ino, directory, start, numbers))
        if nodes is None:
            return
        for i, ino in enumerate(numbers, start):
            places = (
                self._directory_places if nodes[i][0] == PACKED_DIRECTORY else self._file_places
            )
            remember(places, ino, (directory_ino, directory, i), LISTED_PLACES)

    def _listed_place(self, ino: int) -> Place | None:
        for directory_ino, directory, start, numbers in reversed(self._listings):
            try:
                return directory_ino, directory, start + numbers.index(ino)
            except ValueError:
                continue
        return None

    def first_use(self, ino: int) -> Place | None:
        """Inode `ino` is being used for the first time (a file read from its
        start, a directory opened). Its place, if that continues a run of
        first uses in name order in its directory."""
        place, on_run = self.first_use_place(ino)
        return place if on_run else None

    def first_use_place(self, ino: int) -> tuple[Place | None, bool]:
        """`first_use`, telling apart an entry whose place is not known (None)
        and one off a run: (its place, whether it continues a run)."""
        place = (
            self._places.pop(ino, None)
            or self._file_places.pop(ino, None)
            or self._directory_places.pop(ino, None)
            or self._listed_place(ino)
        )
        if place is None:
            return None, False
        _, directory, index = place
        last = self._last_used.get(directory)
        remember(self._last_used, directory, index, DIRECTORIES)
        return place, last is not None and last < index <= last + GAP


class AheadWindows:
    """How far ahead each directory's entries were asked for: a window of
    `ahead` entries after the one in use, asked for again once half of it
    has been used."""

    def __init__(self, ahead: int) -> None:
        self._ahead = ahead
        # Directory -> index up to which its entries were asked for.
        self._upto: OrderedDict[PackedNode, int] = OrderedDict()

    def next(self, directory: PackedNode, index: int, length: int) -> range:
        """The entries of `directory` (of `length`) to ask for now that entry
        `index` is in use (empty while enough are asked for already)."""
        upto = self._upto.get(directory, index + 1)
        if upto - index > self._ahead // 2 or upto >= length:
            return range(0)
        stop = min(length, index + 1 + self._ahead)
        remember(self._upto, directory, stop, DIRECTORIES)
        return range(max(upto, index + 1), stop)

    def asked_upto(self, directory: PackedNode) -> int:
        """How many of `directory`'s first entries were asked for (0: none)."""
        return self._upto.get(directory, 0)
