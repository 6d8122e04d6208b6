"""DirectoryService: Directories by digest, chosen by address (`from_addr`).

Trees are put leaves first (every child before its parent, root last) and
come back root first; `ClosureChecker` and `ClosureValidator` are the single
home of those two orderings' rules, used by every backend. A tree made piece
by piece (an import, a NAR) goes through a `TreeUpload`, which a backend
that can store pieces as they come (the embedded store) overrides, so that
memory does not grow with the tree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import ClassVar

from tvix_mountd.castore.addr import DIRECTORY_SCHEMES, parse_address
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError, ValidationError
from tvix_mountd.castore.nodes import Directory


class DirectoryService(ABC):
    # Whether a walk gains from fetching the next Directories before they
    # are opened (workers/dirahead.py): a backend a round trip away does;
    # the embedded store's SQLite answers as fast inline (measured).
    reads_ahead: ClassVar[bool] = False

    @abstractmethod
    async def get(self, digest: B3Digest) -> Directory | None:
        """The Directory with this digest (checked), or None."""

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """Those of the Directories with these digests that are there
        (checked), by digest: for reading ahead, so a missing one is left
        out rather than an error. One `get` after another unless a backend
        has a better way."""
        found: dict[B3Digest, Directory] = {}
        for digest in digests:
            directory = await self.get(digest)
            if directory is not None:
                found[digest] = directory
        return found

    @abstractmethod
    async def put(self, directory: Directory) -> B3Digest:
        """Store one Directory.

        Upload trees with `put_tree`: a tvix-store checks each upload on its
        own and refuses a Directory whose children are not in the same one.
        """

    async def put_tree(self, directories: Iterable[Directory]) -> B3Digest:
        """Store a whole tree given leaves first; returns the root's digest."""
        checker = ClosureChecker()
        for directory in directories:
            checker.add(directory)
        # Check the whole upload before storing any of it.
        root = checker.root()
        for directory in checker.ordered:
            await self.put(directory)
        return root

    def open_tree_upload(self) -> TreeUpload:
        """A tree to be put leaves first in pieces (see TreeUpload)."""
        return TreeUpload(self)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The tree below `root`, root first, each Directory once.

        Raises StoreError if any Directory in it is missing.
        """
        validator = ClosureValidator(root)
        queue = deque([root])
        while queue:
            digest = queue.popleft()
            directory = await self.get(digest)
            if directory is None:
                raise StoreError(f"directory {digest} (below {root}) not found")
            for child in validator.accept(directory):
                queue.append(child)
            yield directory
        validator.finish()

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""


class TreeUpload:
    """A tree put leaves first in pieces, as they are made: `add` each piece,
    then `finish` returns the root's digest (the last Directory added).

    This default keeps every Directory until `finish` and then puts the tree
    in one `put_tree` (a tvix-store takes a tree in one stream); a backend
    that can store pieces as they come overrides it.
    """

    def __init__(self, service: DirectoryService) -> None:
        self._service = service
        self._directories: list[Directory] = []

    async def add(self, directories: Sequence[Directory]) -> None:
        self._directories.extend(directories)

    async def finish(self) -> B3Digest:
        return await self._service.put_tree(self._directories)


class ClosureChecker:
    """Checks a leaves-first upload: every referenced child came earlier.

    `keep` False: for an upload stored as it arrives, which keeps only each
    Directory's digest and size, not the Directories (`ordered` stays empty),
    and cannot tell a Directory nothing refers to (harmless when stored).
    """

    def __init__(self, *, keep: bool = True) -> None:
        self._sizes: dict[B3Digest, int] = {}
        self._keep = keep
        self._last: B3Digest | None = None
        self.ordered: list[Directory] = []

    def add(self, directory: Directory) -> bool:
        """Check `directory`; True if it is new to this upload."""
        for name, child in directory.child_directories():
            size = self._sizes.get(child.digest)
            if size is None:
                raise ValidationError(
                    f"directory {directory.digest} refers to {child.digest} ({name!r})"
                    " which was not sent before it"
                )
            if size != child.size:
                raise ValidationError(
                    f"directory {directory.digest}: child {name!r} has size {child.size},"
                    f" but {child.digest} has size {size}"
                )
        self._last = directory.digest
        if directory.digest in self._sizes:
            return False
        self._sizes[directory.digest] = directory.size
        if self._keep:
            self.ordered.append(directory)
        return True

    def last(self) -> B3Digest:
        """The root of a streamed upload: the last Directory sent."""
        if self._last is None:
            raise ValidationError("no directories sent")
        return self._last

    def root(self) -> B3Digest:
        """The root of a kept upload, once every Directory in it is reachable from it."""
        last = self.last()
        # Everything sent must be reachable from the last one (the root).
        reachable = {last}
        for directory in reversed(self.ordered):
            if directory.digest in reachable:
                reachable.update(c.digest for _, c in directory.child_directories())
        stray = [d.digest for d in self.ordered if d.digest not in reachable]
        if stray:
            raise ValidationError(f"directory {stray[0]} is not reachable from the root")
        return last


class ClosureValidator:
    """Checks a root-first download: each Directory was referenced by one before it
    (or is the root), with a matching size, and nothing referenced is left out."""

    def __init__(self, root: B3Digest) -> None:
        self._root = root
        self._expected: dict[B3Digest, int | None] = {root: None}
        self._received: set[B3Digest] = set()

    def accept(self, directory: Directory) -> list[B3Digest]:
        """Register a received Directory; returns the children newly to fetch."""
        digest = directory.digest
        if digest in self._received:
            raise ValidationError(f"directory {digest} sent twice")
        if digest not in self._expected:
            raise ValidationError(f"directory {digest} was not asked for (below {self._root})")
        size = self._expected[digest]
        if size is not None and size != directory.size:
            raise ValidationError(
                f"directory {digest} has size {directory.size}, its parent said {size}"
            )
        self._received.add(digest)
        new = []
        for _, child in directory.child_directories():
            if child.digest not in self._expected:
                self._expected[child.digest] = child.size
                new.append(child.digest)
        return new

    def finish(self) -> None:
        missing = self._expected.keys() - self._received
        if missing:
            raise StoreError(f"directory {next(iter(missing))} (below {self._root}) not sent")


def from_addr(raw: str, *, timeout: float = DEFAULT_TIMEOUT) -> DirectoryService:
    addr = parse_address(raw, DIRECTORY_SCHEMES)
    if addr.scheme == "memory":
        from tvix_mountd.castore.directories.memory import MemoryDirectoryService

        return MemoryDirectoryService()
    if addr.scheme == "sqlite":
        from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService

        return SqliteDirectoryService(addr.path, timeout=timeout)
    from tvix_mountd.castore.directories.grpc import GrpcDirectoryService

    return GrpcDirectoryService(addr, timeout=timeout)
