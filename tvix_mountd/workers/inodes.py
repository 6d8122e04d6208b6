"""The inode table: kernel inode numbers <-> castore nodes.

Same content, same inode: directories by digest, symlinks by target, files by
digest *and* executable bit (and size, so a backend that reuses a digest with
another size cannot alias two different files). Numbers are never reused, so
the generation is always 0.

The kernel holds a lookup count per inode (every entry we hand it counts one);
`forget` gives counts back, and an inode whose count reaches zero is dropped,
which keeps memory bounded by what the kernel keeps cached.
"""

from __future__ import annotations

from typing import Final

from tvix_mountd.castore.nodes import Node

ROOT_INODE: Final = 1


class Inode:
    """One live inode: its node, the kernel's lookup count and (for a
    directory, once read) its children in name order."""

    __slots__ = ("children", "ino", "lookups", "node")

    def __init__(self, ino: int, node: Node) -> None:
        self.ino = ino
        self.node = node
        self.lookups = 0
        # (names, nodes), both in name order: bisect finds a name, an index
        # is a stable readdir offset.
        self.children: tuple[tuple[bytes, ...], tuple[Node, ...]] | None = None


class InodeTable:
    def __init__(self) -> None:
        self._by_ino: dict[int, Inode] = {}
        # Nodes are NamedTuples that compare by kind and every field,
        # so the node itself is the sharing key: directories by digest (and
        # size), symlinks by target, files by digest, size and executable bit.
        self._by_node: dict[Node, Inode] = {}
        self._next_ino = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def ref(self, node: Node) -> Inode:
        """The inode for `node` (allocated if new), its lookup count raised by one."""
        inode = self._by_node.get(node)
        if inode is None:
            inode = Inode(self._next_ino, node)
            self._next_ino += 1
            self._by_ino[inode.ino] = inode
            self._by_node[node] = inode
        inode.lookups += 1
        return inode

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            del self._by_ino[ino]
            del self._by_node[inode.node]
