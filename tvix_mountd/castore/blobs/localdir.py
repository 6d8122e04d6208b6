"""What the two on-disk blob layouts (raw+file, objectstore+file) share.

A root directory with temp files under `tmp/`, and atomic publication: a file
is written under `tmp/` and renamed to its final name, so a reader sees either
no file or all of it. Concurrent writers of the same content are harmless:
the second rename leaves the same bytes in place.

Durability is a separate step, taken once for many files: publishing syncs
nothing, and `sync` (one syncfs of the store's file system) makes everything
published so far durable. Whoever records something that refers to a blob (a
PathInfo) calls `sync` first, so after a crash no record refers to a blob that
did not reach the disk. A process crash loses nothing that was published (the
kernel holds it); an OS crash or power loss may leave a blob published since
the last sync missing, empty or short (ext4 and XFS write a file's data before
its size in their default modes). Such a blob is never served as valid (every
read checks the digest), and a writer that finds its blob with a size other
than its own replaces it, so a later import repairs it instead of trusting it.

The two layouts share no top-level directory, so a root holding the other
one's (and none of its own) is named the wrong way: every operation then
fails with the address that fits, instead of serving an empty store or
writing a second layout beside the first.

Directories the store creates: the root (if missing) 0700, so a fresh store is
private; the directories below it 0755, so access is decided by the root's
mode alone and an operator can share a store by creating the root with the
mode they want.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import time
from abc import abstractmethod
from dataclasses import dataclass

import trio

from tvix_mountd.castore.blobs import BlobWriter
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.errors import StoreError
from tvix_mountd.castore.localfs import make_dirs, sync_filesystem

# A temp file untouched for this long belongs to a writer that died (every
# write bumps its mtime), so it may be removed on start.
STALE_TEMP_AGE = 3600.0
TEMP_SUFFIX = ".tmp"


def _temp_prefix() -> str:
    return f"{secrets.token_hex(8)}-"


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True, slots=True)
class Layout:
    """An on-disk blob layout: its address scheme and the directories under its root."""

    scheme: str
    description: str
    subdirs: tuple[str, ...]

    @property
    def top_dirs(self) -> frozenset[str]:
        return frozenset(d.split("/", 1)[0] for d in self.subdirs)


RAW_LAYOUT = Layout("raw+file", "tvix-mountd's raw layout", ("b3",))
OBJECT_STORE_LAYOUT = Layout(
    "objectstore+file", "tvix's object_store layout", ("blobs/b3", "chunks/b3")
)


class LocalRoot:
    """A store's root directory in `layout`: created, and cleared of dead
    writers' temp files, on the first `prepare`; nothing is touched before."""

    def __init__(self, root: str, layout: Layout, other: Layout) -> None:
        self.root = root
        self.temp_dir = os.path.join(root, "tmp")
        self._layout = layout
        self._other = other
        self._layout_checked = False
        self._ready = False
        self._temp_prefix = _temp_prefix()
        self._temp_count = itertools.count()

    def check_layout(self) -> None:
        """StoreError naming the right address if the root holds the other layout.

        Blocking, but a few stats once per service: callers on the event loop
        may call it inline.
        """
        if self._layout_checked:
            return

        def present(names: frozenset[str]) -> list[str]:
            return sorted(n for n in names if os.path.isdir(os.path.join(self.root, n)))

        theirs = present(self._other.top_dirs)
        if theirs and not present(self._layout.top_dirs):
            raise StoreError(
                f"blob store {self.root} holds {self._other.description}"
                f" ({', '.join(d + '/' for d in theirs)}), not {self._layout.description}:"
                f" its address is {self._other.scheme}://{self.root}"
            )
        self._layout_checked = True

    def _prepare_sync(self) -> None:
        self.check_layout()
        subdirs = [os.path.join(self.root, d) for d in self._layout.subdirs]
        wanted = [(self.root, 0o700), *((d, 0o755) for d in subdirs), (self.temp_dir, 0o700)]
        for path, mode in wanted:
            try:
                os.makedirs(path, mode=mode, exist_ok=True)
            except OSError as e:
                raise StoreError(
                    f"blob store {self.root}: cannot create directory {path}: {e}"
                ) from e
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_AGE
        try:
            entries = list(os.scandir(self.temp_dir))
        except OSError:
            return
        for entry in entries:
            # Best effort: another process may remove the same file, or the
            # store may be read-only; neither should stop this one.
            with contextlib.suppress(OSError):
                if entry.name.endswith(TEMP_SUFFIX) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    async def prepare(self) -> None:
        if not self._ready:
            await trio.to_thread.run_sync(self._prepare_sync)
            self._ready = True

    def _sync_sync(self) -> None:
        # No root: nothing was published under it.
        with contextlib.suppress(FileNotFoundError):
            sync_filesystem(self.root)

    async def sync(self) -> None:
        """Make every file published under the root so far durable, whoever
        published it (see the module docstring). StoreError if the file
        system reports a write error."""
        try:
            await trio.to_thread.run_sync(self._sync_sync)
        except OSError as e:
            raise StoreError(f"blob store {self.root}: making blobs durable: {e}") from e

    def create_temp(self) -> tuple[int, str]:
        """A new temp file, open for writing: (fd, path). StoreError if it cannot be made."""
        while True:
            # A random prefix and a counter: unique without a getrandom(2) per
            # file. A name taken (another process, or a fork of this one, with
            # the same prefix) draws a new prefix.
            name = f"{self._temp_prefix}{next(self._temp_count)}{TEMP_SUFFIX}"
            path = os.path.join(self.temp_dir, name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                self._temp_prefix = _temp_prefix()
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    # Someone removed tmp/ under us; recreate it on the next prepare.
                    self._ready = False
                raise StoreError(f"blob store {self.root}: cannot create {path}: {e}") from e
            return fd, path

    def publish(self, fd: int, temp_path: str, target: str) -> None:
        """Make the temp file read-only and rename it to `target` (not durable
        until `sync`). Blocking: call it from a worker thread. `fd` is closed in
        any case; the temp file is left for the caller to remove if this fails.
        """
        try:
            os.fchmod(fd, 0o444)
        finally:
            os.close(fd)
        try:
            os.rename(temp_path, target)
        except FileNotFoundError:
            # The target's directory is new (asking first would cost every
            # publish a stat); if the temp file is gone, this fails again.
            make_dirs(os.path.dirname(target), 0o755)
            os.rename(temp_path, target)

    def write_file(self, target: str, data: bytes) -> None:
        """`data` as the file `target`, atomically (blocking; durable after `sync`)."""
        fd, temp_path = self.create_temp()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                os.close(fd)
                raise
            self.publish(fd, temp_path, target)
        except BaseException:
            remove_quietly(temp_path)
            raise


class ThreadedWriter(BlobWriter):
    """A BlobWriter whose disk work runs in a worker thread.

    Writes and compression take milliseconds and must not stall the
    event loop. The threads are never abandoned: the writer's file
    descriptors and buffers stay theirs until they return. A subclass gives
    the blocking halves; any OSError or StoreError from them becomes a
    StoreError that starts with `what`.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._done = False

    @abstractmethod
    def _write_sync(self, data: bytes) -> None: ...

    @abstractmethod
    def _close_sync(self) -> B3Digest:
        """Finish and publish the blob; its digest."""

    def _after_close(self) -> None:
        """Clean up after `close`, whether it worked or not."""

    def _check_open(self) -> None:
        if self._done:
            raise StoreError(f"{self._what}: the writer is already closed")

    async def write(self, data: bytes) -> None:
        self._check_open()
        if not data:
            return
        try:
            await trio.to_thread.run_sync(self._write_sync, data)
        except (OSError, StoreError) as e:
            await self.abort()
            raise StoreError(f"{self._what}: {e}") from e

    async def close(self) -> B3Digest:
        self._check_open()
        self._done = True
        try:
            return await trio.to_thread.run_sync(self._close_sync)
        except (OSError, StoreError) as e:
            raise StoreError(f"{self._what}: {e}") from e
        finally:
            self._after_close()
