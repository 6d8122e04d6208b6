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
the directory itself, and its cached listing with it (every lookup of it
forgotten, even while its own number stays held by its parent's listing).

Numbers, counts, nodes and holds live in a StateFile (statefile.py), so that
they outlive the worker: the kernel still holds these numbers after a
handover, and the next worker must answer for them. Counts may end up too
high after a kill (a lookup counted whose reply never reached the kernel, a
FORGET read but not processed): a bounded leak. They are never too low: a
count is raised before the reply that hands the number out, and a forgotten
directory's hold is cleared before its children are given back.

In this process, `_nodes` and `_index` mirror the live slots; the file is the
truth they are rebuilt from. The sharing index (nodeindex.py) stores only
inode numbers, keyed by `_nodes`: a dict cost ~80 bytes a live inode.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from typing import Final

from tvix_mountd.castore.nodes import PackedNode
from tvix_mountd.workers.names import PackedNames
from tvix_mountd.workers.nodeindex import NodeIndex
from tvix_mountd.workers.statefile import StateFile

ROOT_INODE: Final = 1
# Numbers that name entries of plain listings whose nodes have no inode:
# above every inode number, so that none is taken for another's.
UNLISTED_NUMBERS: Final = 1 << 62

# A directory's (names, packed nodes), both in name order: bisect finds a
# name, an index is a stable readdir offset.
Children = tuple[PackedNames, tuple[PackedNode, ...]]


class InodeTable:
    def __init__(self, state: StateFile | None = None) -> None:
        """A table kept in `state`, taking over what it holds; without one, in
        a private state file of its own."""
        self._own_fd: int | None = None
        if state is None:
            self._own_fd = StateFile.create()
            state = StateFile(self._own_fd)
        self.state = state
        live, free = state.scan()
        # Indexed by inode number; 0 and the root (1) are never handed out.
        self._nodes: list[PackedNode | None] = [None] * max(state.high_water, ROOT_INODE + 1)
        # A packed node holds its kind and every field, so it is itself the
        # sharing key: node -> the number that shares it.
        self._index = NodeIndex(self._nodes, expected=len(live))
        # Numbers free for reuse, as machine integers: a list would keep an
        # int object alive per forgotten inode.
        self._free = array("q", reversed(free))
        # Only directories whose contents were read have an entry.
        self._children: dict[int, Children] = {}
        # Directory -> how many of its first children it holds (mirrors the file).
        self._held: dict[int, int] = {}
        for ino, node, _ in live:
            self._nodes[ino] = node
            # Two live numbers may hold one node (after a kill): the first shares it.
            found, slot = self._index.probe(node)
            if not found:
                self._index.insert(ino, slot)
            held = state.held(ino)
            if held:
                self._held[ino] = held

    def close(self) -> None:
        self.state.close()
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None

    def __len__(self) -> int:
        return len(self._index)

    def node(self, ino: int) -> PackedNode | None:
        """The node of a live inode, None for any other number."""
        if 0 <= ino < len(self._nodes):
            return self._nodes[ino]
        return None

    def lookups(self, ino: int) -> int:
        return self.state.count(ino) if self.node(ino) is not None else 0

    def ref(self, node: PackedNode) -> int:
        """The inode number for `node` (allocated if new), its lookup count raised by one."""
        ino, slot = self._index.probe(node)
        if ino:
            state = self.state
            state.set_count(ino, state.count(ino) + 1)
            return ino
        if self._free:
            ino = self._free.pop()
        else:
            ino = len(self._nodes)
            self._nodes.append(None)
        self.state.fill(ino, node, 1)
        self._nodes[ino] = node
        self._index.insert(ino, slot)
        return ino

    def entry_number(self, node: PackedNode) -> int:
        """A number to name `node` by in a listing without attributes (a
        plain READDIR's d_ino), counting nothing: its inode's if it is live,
        else one outside the table, the same for the same node while this
        process runs (the kernel keeps no such listing, so it never asks
        about that number)."""
        ino = self._index.get(node)
        if ino is not None:
            return ino
        return UNLISTED_NUMBERS | (hash(node) & (UNLISTED_NUMBERS - 1))

    def number_of(self, node: PackedNode) -> int:
        """The number of `node`'s inode if it is live (the kernel may hold
        it), else 0; nothing counted, nothing allocated."""
        return self._index.probe(node)[0]

    def pin(self, node: PackedNode) -> int:
        """The number of `node`'s inode with its count raised by one, if it
        is live (the kernel may hold it); 0, allocating nothing, if not.
        `forget(number, 1)` gives the count back."""
        ino = self.number_of(node)
        if ino:
            state = self.state
            state.set_count(ino, state.count(ino) + 1)
        return ino

    def forget(self, ino: int, count: int) -> list[tuple[PackedNode, int]]:
        """Give back `count` lookups of `ino`. Returns the directories whose
        held children must be given back but whose contents are not in this
        process (read before a handover): (the directory's node, how many of
        its first children it held), for the caller to fetch and pass to
        `release_held`.

        A directory gives back what its listing held when its count reaches
        0, or earlier, when all that is left of it are the holds of its
        parents' kept listings: the kernel has forgotten every lookup of it,
        so it has evicted its inode, and its cached listing with it. Its
        number stays (a parent's cached listing still names it). Without
        this, a walk under a directory the kernel keeps would keep every
        directory below it and the entries of each one's listing. The
        parents' holds are counted in the state file (`held_by`), raised
        after the count and lowered before it: never more than there are."""
        return self._give_back([(ino, count, False)])

    def release_held(self, held_nodes: tuple[PackedNode, ...]) -> list[tuple[PackedNode, int]]:
        """Give back one count of each of `held_nodes`, the first children of a
        directory that held them (see `forget`)."""
        return self._give_back(self._held_numbers(held_nodes))

    def _give_back(self, stack: list[tuple[int, int, bool]]) -> list[tuple[PackedNode, int]]:
        """`forget` for each (number, count, whether it is a hold's count)."""
        unresolved: list[tuple[PackedNode, int]] = []
        state = self.state
        # A stack, not recursion: a dropped directory gives back what it held,
        # which may drop directories below it, as deep as the tree goes.
        while stack:
            ino, count, of_a_hold = stack.pop()
            node = self.node(ino)
            if node is None:
                continue
            if of_a_hold and (holds := state.held_by(ino)):
                state.set_held_by(ino, holds - 1)
            left = state.count(ino) - count
            if left > 0:
                state.set_count(ino, left)
                held = self._held.get(ino, 0)
                if not held or left != state.held_by(ino):
                    continue
                # No lookup of the kernel's left: its listing is not cached.
                # The hold cleared before its children are given back, as below.
                del self._held[ino]
                state.set_held(ino, 0)
            else:
                held = self._held.pop(ino, 0)
                # Freed (hold and all) before its children are given back: a
                # kill in between leaks their counts, it never lowers them twice.
                state.free(ino)
                # Out of the index (if it is the number that shares its node)
                # while `_nodes` still names its node: the index's key.
                self._index.remove(ino)
                self._nodes[ino] = None
                self._free.append(ino)
            children = self._children.pop(ino, None)
            if not held:
                continue
            if children is None:
                unresolved.append((node, held))
            else:
                stack += self._held_numbers(children[1][:held])
        return unresolved

    def _held_numbers(self, nodes: tuple[PackedNode, ...]) -> list[tuple[int, int, bool]]:
        get = self._index.get
        return [(ino, 1, True) for n in nodes if (ino := get(n)) is not None]

    def held(self, ino: int) -> int:
        """How many of directory `ino`'s first children it holds."""
        return self._held.get(ino, 0)

    def hold(
        self,
        ino: int,
        start: int,
        stop: int,
        numbers: Sequence[int] | None = None,
        counted: bool = False,
    ) -> None:
        """Children `start:stop` of live directory `ino` (as `set_children`
        keeps them) were just handed to the kernel in a listing it may keep:
        hold them, so each keeps its number until the kernel forgets the
        directory. `numbers`, if given, are the numbers `ref` just gave
        those children (saving a lookup in the index for each). `counted`:
        the counts of the children from `holding_from(ino, start)` on were
        raised for the hold already (the entries of a plain listing, which
        are no lookups): they are not raised again.

        The kernel fills its cache from the first entry on, in order, so only
        a listing's leading run can be in it; that run is what is held.
        """
        held = self.holding_from(ino, start)
        if held is None or held >= stop:
            return
        # The counts first, then the hold that says to give them back.
        state = self.state
        taken: Sequence[int]
        if numbers is None:
            taken = [self.ref(node) for node in self._children[ino][1][held:stop]]
        else:
            taken = numbers[held - start : stop - start]
            if not counted:
                for number in taken:
                    state.set_count(number, state.count(number) + 1)
        for number in taken:
            state.set_held_by(number, state.held_by(number) + 1)
        self._held[ino] = stop
        state.set_held(ino, stop)

    def holding_from(self, ino: int, start: int) -> int | None:
        """The first child that a listing of directory `ino` from child
        `start` on would add to its held run (`hold`), None if that listing
        would add none: it does not continue the run."""
        held = self.held(ino)
        if ino not in self._children or start > held:
            return None
        return held

    def entries_around(
        self, directory_ino: int, directory: PackedNode, index: int, node: PackedNode
    ) -> Sequence[PackedNode] | None:
        """The entries of live directory `directory_ino`, if it still is
        `directory`, its contents are here, and entry `index` of them is
        `node`: a place remembered earlier still holds (no number was
        forgotten and reused since). None if not."""
        children = self._children.get(directory_ino)
        if (
            children is None
            or self.node(directory_ino) != directory
            or index >= len(children[1])
            or children[1][index] != node
        ):
            return None
        return children[1]

    def children(self, ino: int) -> Children | None:
        """A directory inode's contents, if they were read since it became live."""
        return self._children.get(ino)

    def set_children(self, ino: int, node: PackedNode, children: Children) -> None:
        """Keep `children` as the contents of inode `ino`, if it still is `node`
        (it may have been forgotten, and its number reused, while they were
        being fetched)."""
        if self.node(ino) == node:
            self._children[ino] = children
