"""The inode table: kernel inode numbers <-> castore nodes.

Same content, same inode: directories by digest, symlinks by target, files by
digest *and* executable bit (and size, so a backend that reuses a digest with
another size cannot alias two different files).

The kernel holds a lookup count per inode (every entry we hand it counts one);
`forget` gives counts back, and an inode whose count reaches zero is dropped,
which keeps memory bounded by what the kernel keeps cached. Its number is then
free for another node: the kernel forgot it, so nothing can ask about the old
one any more (libfuse's passthrough_ll does the same with its pointers).

Except from a listing the kernel keeps: a directory's cached listing carries
each entry's number (getdents' d_ino), and the directory may stay cached after
the entries' own inodes are forgotten. So the entries of such a listing are
held (`hold`): one more count each, given back only when the kernel forgets
the directory itself, and its cached listing with it.

A table of a million live inodes is most of a worker's memory, so it holds no
object per inode: a packed node (`castore.nodes.pack_node`, ~80 bytes) and a
lookup count per number in two flat arrays, and one dict from packed node to
number for the sharing. About 180 bytes per inode, node included.
"""

from __future__ import annotations

from array import array
from typing import Final

from tvix_mountd.castore.nodes import PackedNode
from tvix_mountd.workers.names import PackedNames

ROOT_INODE: Final = 1

# A directory's (names, packed nodes), both in name order: bisect finds a
# name, an index is a stable readdir offset.
Children = tuple[PackedNames, tuple[PackedNode, ...]]


class InodeTable:
    def __init__(self) -> None:
        # Indexed by inode number; 0 and the root (1) are never handed out.
        self._nodes: list[PackedNode | None] = [None] * (ROOT_INODE + 1)
        self._lookups = array("q", bytes(8 * (ROOT_INODE + 1)))
        # A packed node holds its kind and every field, so it is itself the
        # sharing key (and these are the same objects as in `_nodes`).
        self._by_node: dict[PackedNode, int] = {}
        # Numbers free for reuse, as machine integers: a list would keep an
        # int object alive per forgotten inode.
        self._free = array("q")
        # Only directories whose contents were read have an entry.
        self._children: dict[int, Children] = {}
        # Directory -> how many of its first children it holds.
        self._held: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._by_node)

    def node(self, ino: int) -> PackedNode | None:
        """The node of a live inode, None for any other number."""
        if 0 <= ino < len(self._nodes):
            return self._nodes[ino]
        return None

    def lookups(self, ino: int) -> int:
        return self._lookups[ino] if self.node(ino) is not None else 0

    def ref(self, node: PackedNode) -> int:
        """The inode number for `node` (allocated if new), its lookup count raised by one."""
        ino = self._by_node.get(node)
        if ino is None:
            if self._free:
                ino = self._free.pop()
                self._nodes[ino] = node
            else:
                ino = len(self._nodes)
                self._nodes.append(node)
                self._lookups.append(0)
            self._by_node[node] = ino
        self._lookups[ino] += 1
        return ino

    def forget(self, ino: int, count: int) -> None:
        # A stack, not recursion: a dropped directory gives back what it held,
        # which may drop directories below it, as deep as the tree goes.
        stack = [(ino, count)]
        while stack:
            ino, count = stack.pop()
            node = self.node(ino)
            if node is None:
                continue
            left = self._lookups[ino] - count
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups[ino] = 0
            self._nodes[ino] = None
            del self._by_node[node]
            self._free.append(ino)
            children = self._children.pop(ino, None)
            held = self._held.pop(ino, 0)
            if children is not None and held:
                stack += ((self._by_node[n], 1) for n in children[1][:held])

    def held(self, ino: int) -> int:
        """How many of directory `ino`'s first children it holds."""
        return self._held.get(ino, 0)

    def hold(self, ino: int, start: int, stop: int) -> None:
        """Children `start:stop` of live directory `ino` (as `set_children`
        keeps them) were just handed to the kernel in a listing it may keep:
        hold them, so each keeps its number until the kernel forgets the
        directory.

        The kernel fills its cache from the first entry on, in order, so only
        a listing's leading run can be in it; that run is what is held.
        """
        held = self.held(ino)
        children = self._children.get(ino)
        if children is None or not start <= held < stop:
            return
        for node in children[1][held:stop]:
            self.ref(node)
        self._held[ino] = stop

    def children(self, ino: int) -> Children | None:
        """A directory inode's contents, if they were read since it became live."""
        return self._children.get(ino)

    def set_children(self, ino: int, node: PackedNode, children: Children) -> None:
        """Keep `children` as the contents of inode `ino`, if it still is `node`
        (it may have been forgotten, and its number reused, while they were
        being fetched)."""
        if self.node(ino) == node:
            self._children[ino] = children
