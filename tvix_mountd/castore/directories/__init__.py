"""DirectoryService: Directories by digest, chosen by address (`from_addr`).

Trees are put leaves first (every child before its parent, root last) and
come back root first; `ClosureChecker` and `ClosureValidator` are the single
home of those two orderings' rules, used by every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterable

from tvix_mountd.castore.addr import DIRECTORY_SCHEMES, parse_address
from tvix_mountd.castore.blocking import DEFAULT_TIMEOUT
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError, ValidationError
from tvix_mountd.castore.nodes import Directory


class DirectoryService(ABC):
    @abstractmethod
    async def get(self, digest: B3Digest) -> Directory | None:
        """The Directory with this digest (checked), or None."""

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


class ClosureChecker:
    """Checks a leaves-first upload: every referenced child came earlier."""

    def __init__(self) -> None:
        self._seen: dict[B3Digest, Directory] = {}
        self.ordered: list[Directory] = []

    def add(self, directory: Directory) -> None:
        for name, child in directory.child_directories():
            known = self._seen.get(child.digest)
            if known is None:
                raise ValidationError(
                    f"directory {directory.digest} refers to {child.digest} ({name!r})"
                    " which was not sent before it"
                )
            if known.size != child.size:
                raise ValidationError(
                    f"directory {directory.digest}: child {name!r} has size {child.size},"
                    f" but {child.digest} has size {known.size}"
                )
        if directory.digest not in self._seen:
            self._seen[directory.digest] = directory
            self.ordered.append(directory)
        self._last = directory.digest

    def root(self) -> B3Digest:
        if not self.ordered:
            raise ValidationError("no directories sent")
        # Everything sent must be reachable from the last one (the root).
        reachable = {self._last}
        for directory in reversed(self.ordered):
            if directory.digest in reachable:
                reachable.update(c.digest for _, c in directory.child_directories())
        stray = [d.digest for d in self.ordered if d.digest not in reachable]
        if stray:
            raise ValidationError(f"directory {stray[0]} is not reachable from the root")
        return self._last


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
