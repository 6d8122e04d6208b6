"""nix+http://, nix+https://, nix+file://: a Nix binary cache as a path-info service.

tvix's NixHTTPPathInfoService, with what a mount service needs on top. A
`get` of a store path the local store has not seen:

1. fetches `<hash>.narinfo`: 404 (or 403, as Nix) is "not there" (None);
2. checks it: its StorePath is the one asked for, and with trusted keys one
   of its `Sig:` lines verifies over Nix's fingerprint; otherwise the path is
   refused (None and a log line), as Nix refuses to substitute it;
3. streams the NAR from `URL:` through its decompressor into the store's
   blob and directory services (`nar_ingest`), checking FileSize/FileHash
   where given and always NarSize/NarHash, never holding the NAR in memory;
4. records the PathInfo (root node, references, signatures) in the local
   record, so the next `get` (also after a restart) needs no network; its
   blobs are made durable first (`put_durably`: one syncfs for the embedded
   store, no fsync per file).

The record lives next to the local directory service: the `pathinfos` table
of the same SQLite file for `sqlite://`; in memory otherwise (a `memory://`
store remembers nothing across processes, and a remote directory service
has no file to keep it next to). A recorded path is checked against the
trusted keys again when read, so a record shared with a store that trusts
other keys (or none) never lets an unsigned path through.

Any failure (HTTP error, reset, stall, bad hash, truncation) is a StoreError
and a log line; nothing is recorded, so the next lookup tries again. Blobs of
a failed download may stay behind unreferenced (content-addressed, harmless).

Concurrent `get`s of one path in this process share one download. The
deadline is on progress (`backend_timeout` without a byte arriving), not on
the whole download: `waits_for_progress` tells callers not to cut a lookup
with a deadline of their own.

With `prefetch_references` > 0, a path's references are fetched in the
background once it has been fetched (so are theirs, and so on), that many at
a time, so that a program's closure is local before it asks for it: what
`nix copy` of the path would bring. That work runs in `run`, in a nursery of
whoever opened the service; a reference already local is not fetched again,
but its own references are still walked (a closure whose prefetch was cut
short, by a restart say, is completed). Off by default: a lookup of one path
may then download its whole closure.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar, Final

import trio

from tvix_mountd.castore import nixbase32
from tvix_mountd.castore.addr import StoreAddress
from tvix_mountd.castore.blobs import BlobService
from tvix_mountd.castore.blocking import ProgressDeadline, run_blocking
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.errors import (
    BackendUnavailable,
    IntegrityError,
    StoreError,
    ValidationError,
)
from tvix_mountd.castore.nar_ingest import IngestedNar, NarSource, ingest_nar
from tvix_mountd.castore.narinfo import NarInfo, PublicKey, fingerprint, signed_by
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos import PathInfoService, check_answer, put_durably
from tvix_mountd.castore.pathinfos.nixcache_files import (
    DECOMPRESSION_ERRORS,
    MAX_NARINFO_SIZE,
    ByteSource,
    CacheFiles,
    CountingReader,
    cache_files,
    decompressing,
)
from tvix_mountd.castore.storepath import StorePath
from tvix_mountd.coalesce import Coalescer

if TYPE_CHECKING:
    from tvix_mountd.metrics import NixCacheMetrics

log = logging.getLogger(__name__)

# Decompressed bytes the ingest takes from a download at a time.
BLOCK_SIZE: Final = 1 << 20
# Compressions decompressed ahead by a thread of their own (see _Download),
# and how many blocks that thread keeps ready.
DECOMPRESSED_AHEAD: Final = frozenset({"xz", "bzip2"})
BLOCKS_AHEAD: Final = 2
# How often a thread waiting for room (or for a block) checks whether the
# download was closed, and how long closing waits for the read-ahead thread
# (a block's decompression, a poll): not for a stalled network read, which
# ends at its socket's timeout.
CLOSE_POLL: Final = 0.1
CLOSE_JOIN: Final = 0.5
# References waiting to be prefetched; beyond this, new ones are dropped (and
# fetched when something looks them up). A closure is a few thousand paths.
PREFETCH_QUEUE: Final = 10_000
# Paths whose references were queued, remembered so that each closure is
# walked once; forgotten wholesale past this many.
PREFETCH_SEEN: Final = 100_000


def _record_for(directories: DirectoryService, timeout: float) -> PathInfoService:
    from tvix_mountd.castore.directories.memory import MemoryDirectoryService
    from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
    from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
    from tvix_mountd.castore.pathinfos.sqlite import SqlitePathInfoService

    if isinstance(directories, SqliteDirectoryService):
        return SqlitePathInfoService(directories.path, timeout=timeout)
    if not isinstance(directories, MemoryDirectoryService):
        log.warning(
            "a binary cache ingesting into a remote directory service remembers what it"
            " fetched only while this process runs (no SQLite file to keep it next to)"
        )
    return MemoryPathInfoService()


class _Download(NarSource):
    """One NAR file as `ingest_nar` reads it, in the ingest's thread:
    network (or file) -> counting -> decompression, a block of at most
    BLOCK_SIZE decompressed bytes per `read`.

    zstd (and no compression) is decompressed by the ingest's thread
    itself, as it asks: zstandard holds the GIL while it works, and a thread
    of its own waited for the GIL at each call while the parse held it. xz
    and bzip2 (DECOMPRESSED_AHEAD) take most of an ingest's time in liblzma
    or libbz2, which let go of the GIL: a thread of their own decompresses
    BLOCKS_AHEAD blocks ahead meanwhile, and the parse costs no time on top
    (RESULTS.md, sixteenth session)."""

    def __init__(self, raw: ByteSource, narinfo: NarInfo, deadline: ProgressDeadline) -> None:
        self.narinfo = narinfo
        self.counted = CountingReader(raw, lambda _n: deadline.progressed())
        self._decompressed = decompressing(self.counted, narinfo.compression)
        self._ahead: queue.Queue[bytes | Exception] | None = (
            queue.Queue(BLOCKS_AHEAD) if narinfo.compression in DECOMPRESSED_AHEAD else None
        )
        # The end (b"") or the error, once `read` has seen it: it stays the answer.
        self._last: bytes | Exception | None = None
        self._started = False
        self._closing = threading.Event()
        self._ahead_ended = threading.Event()

    def read(self) -> bytes:
        if self._ahead is None:
            return self._decompress()
        if not self._started:
            self._started = True
            trio.lowlevel.start_thread_soon(
                self._read_ahead,
                lambda _outcome: self._ahead_ended.set(),
                name=f"nar {self.narinfo.url}",
            )
        item = self._last
        while item is None:
            try:
                item = self._ahead.get(timeout=CLOSE_POLL)
            except queue.Empty:
                if self._closing.is_set():
                    item = BackendUnavailable(f"{self.narinfo.url}: download closed")
        if isinstance(item, Exception) or not item:
            self._last = item
        if isinstance(item, Exception):
            raise item
        return item

    def _decompress(self) -> bytes:
        try:
            return self._decompressed.read(BLOCK_SIZE)
        except DECOMPRESSION_ERRORS as e:
            raise IntegrityError(f"cannot decompress ({self.narinfo.compression}): {e}") from e

    def _read_ahead(self) -> None:
        """The read-ahead thread: blocks into the queue until the end, an
        error or `close`."""
        assert self._ahead is not None
        while not self._closing.is_set():
            item: bytes | Exception
            try:
                item = self._decompress()
            except Exception as e:  # a failed download (StoreError), say: the ingest's to see
                item = e
            while not self._closing.is_set():
                try:
                    self._ahead.put(item, timeout=CLOSE_POLL)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception) or not item:
                return

    def finish(self) -> None:
        """After the NAR's end: the compressed file must end too, and match."""
        if self._started:
            self._ahead_ended.wait()  # it ended with the NAR's end: the file is ours now
        info = self.narinfo
        # Whatever follows the compressed stream counts for FileSize/FileHash.
        limit = 1 << 20 if info.file_size is None else info.file_size - self.counted.size + 1
        while limit > 0 and (rest := self.counted.read(min(limit, BLOCK_SIZE))):
            limit -= len(rest)
        if info.file_size is not None and self.counted.size != info.file_size:
            raise IntegrityError(
                f"{info.url}: {self.counted.size} bytes or more, FileSize says {info.file_size}"
            )
        if info.file_sha256 is not None and self.counted.sha256.digest() != info.file_sha256:
            raise IntegrityError(f"{info.url}: does not match its FileHash")

    def close(self) -> None:
        """In the ingest's thread, when it is done. The decompressor is closed
        only once no thread is inside it: a read-ahead thread still reading
        (the ingest failed) is stopped by closing the body first; one that
        does not end within CLOSE_JOIN leaves the decompressor to the
        garbage collector."""
        self.interrupt()
        if self._started and not self._ahead_ended.wait(CLOSE_JOIN):
            log.debug("%s: its read-ahead thread is still reading after close", self.narinfo.url)
            return
        self._close(self._decompressed)

    def interrupt(self) -> None:
        """Closing the body makes a network read waiting in a thread fail."""
        self._closing.set()
        self._close(self.counted)

    def _close(self, stream: ByteSource) -> None:
        try:
            stream.close()
        except Exception as e:  # whatever closing raises is no news
            log.debug("closing %s: %s", self.narinfo.url, e)


class NixCachePathInfoService(PathInfoService):
    waits_for_progress: ClassVar[bool] = True

    def __init__(
        self,
        addr: StoreAddress,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        timeout: float,
        prefetch_references: int = 0,
    ) -> None:
        self.url = addr.url
        self._blobs = blobs
        self._directories = directories
        self._timeout = timeout
        self._keys = (
            None
            if addr.public_keys is None
            else tuple(PublicKey.parse(k) for k in addr.public_keys)
        )
        self._record = _record_for(directories, timeout)
        self._files: CacheFiles | None = None
        self._fetches: Coalescer[tuple[bytes, str | None], PathInfo | None] = Coalescer()
        self._metrics: NixCacheMetrics | None = None
        self._metrics_loaded = False
        self._prefetchers = prefetch_references
        self._prefetch_send, self._prefetch_receive = trio.open_memory_channel[StorePath](
            PREFETCH_QUEUE
        )
        self._prefetch_seen: set[bytes] = set()

    # -- the PathInfoService interface ----------------------------------

    async def get(self, digest: bytes) -> PathInfo | None:
        return await self._lookup(bytes(digest), None)

    async def get_store_path(self, path: StorePath) -> PathInfo | None:
        # The name is checked against the narinfo before anything is downloaded.
        return await self._lookup(path.digest, path.name)

    async def _lookup(self, digest: bytes, name: str | None) -> PathInfo | None:
        info = await self._record.get(digest)
        if info is not None and self._trusted(info):
            self._count_lookup("local")
            if name not in (None, info.store_path.name):
                return None
            # Fetched before (by an earlier process, maybe): its closure may not be.
            self._queue_references(info)
            return info
        return await self._fetch_shared(digest, name)

    async def _fetch_shared(self, digest: bytes, name: str | None) -> PathInfo | None:
        """Fetch, sharing a download in flight for the same path."""
        return await self._fetches.run((digest, name), lambda: self._fetch(digest, name))

    async def put(self, info: PathInfo) -> PathInfo:
        raise StoreError(f"{self.url} is a Nix binary cache: paths cannot be added to it")

    async def list(self) -> AsyncIterator[PathInfo]:
        """The paths fetched so far (the cache itself cannot be listed)."""
        async for info in self._record.list():
            if self._trusted(info):
                yield info

    async def run(self) -> None:
        """Prefetch references, `prefetch_references` at a time, until cancelled."""
        if not self._prefetchers:
            return
        async with trio.open_nursery() as nursery:
            for _ in range(self._prefetchers):
                nursery.start_soon(self._prefetch_from_queue)

    async def aclose(self) -> None:
        await self._record.aclose()
        files, self._files = self._files, None
        if files is not None:
            files.close()

    # -- fetching ---------------------------------------------------------

    def _cache_files(self) -> CacheFiles:
        # Made on first use: the process that opens the service (a supervisor
        # about to fork, say) is not always the one that fetches.
        if self._files is None:
            self._files = cache_files(self.url, timeout=self._timeout)
        return self._files

    def _trusted(self, info: PathInfo | NarInfo) -> bool:
        if self._keys is None:
            return True
        signed = fingerprint(info.store_path, info.nar_sha256, info.nar_size, info.references)
        return signed_by(signed, info.signatures, self._keys) is not None

    async def _fetch(self, digest: bytes, name: str | None) -> PathInfo | None:
        hash_part = nixbase32.encode(digest)
        narinfo = await self._narinfo(hash_part)
        if narinfo is None:
            return None
        if narinfo.store_path.digest != digest or name not in (None, narinfo.store_path.name):
            asked = hash_part if name is None else f"{hash_part}-{name}"
            self._refuse(asked, f"its narinfo is for {narinfo.store_path.basename}")
            return None
        if not self._trusted(narinfo):
            self._refuse(hash_part, "no signature by a trusted key (trusted-public-keys)")
            return None
        started = time.monotonic()
        try:
            ingested = await self._download(narinfo)
        except StoreError as e:
            self._count_download("failed")
            log.warning("%s: %s: NAR %s: %s", self.url, narinfo.store_path.basename, narinfo.url, e)
            # The same kind of error (unavailable, or bad data), saying which path.
            raise type(e)(f"{narinfo.store_path.basename}: NAR {narinfo.url}: {e}") from e
        self._count_download("ok", ingested.nar_size, time.monotonic() - started)
        info = PathInfo(
            store_path=narinfo.store_path,
            node=ingested.node,
            nar_size=narinfo.nar_size,
            nar_sha256=narinfo.nar_sha256,
            references=narinfo.references,
            signatures=narinfo.signatures,
            deriver=narinfo.deriver,
            ca=narinfo.ca,
        )
        await put_durably(self._blobs, self._record, info)
        self._queue_references(info)
        log.info(
            "%s: fetched %s (%d NAR bytes in %.2f s)",
            self.url,
            narinfo.store_path.basename,
            ingested.nar_size,
            time.monotonic() - started,
        )
        return check_answer(digest, info)

    # -- prefetching references --------------------------------------------

    def _queue_references(self, info: PathInfo) -> None:
        if not self._prefetchers or info.store_path.digest in self._prefetch_seen:
            return
        if len(self._prefetch_seen) >= PREFETCH_SEEN:
            self._prefetch_seen.clear()
        self._prefetch_seen.add(info.store_path.digest)
        for reference in info.references:
            if reference.digest in self._prefetch_seen:
                continue  # itself, or a path walked already
            try:
                self._prefetch_send.send_nowait(reference)
            except trio.WouldBlock:
                self._count_prefetch("dropped")

    async def _prefetch_from_queue(self) -> None:
        async for path in self._prefetch_receive:
            await self._prefetch(path)

    async def _prefetch(self, path: StorePath) -> None:
        try:
            local = await self._record.get(path.digest)
            if local is not None and self._trusted(local):
                self._count_prefetch("present")
                self._queue_references(local)  # walked on, once
                return
            # Not local (just asked): fetched as a lookup would fetch it.
            info = await self._fetch_shared(path.digest, path.name)
        except StoreError as e:
            # Logged where it failed; a later lookup of the path tries again.
            self._count_prefetch("failed")
            log.debug("prefetch of %s failed: %s", path.basename, e)
            return
        except Exception:
            # Background work: whatever it meets, the mount goes on serving.
            self._count_prefetch("failed")
            log.exception("prefetch of %s failed", path.basename)
            return
        self._count_prefetch("absent" if info is None else "fetched")

    def _refuse(self, name: str, why: str) -> None:
        self._count_lookup("refused")
        log.warning("%s: refusing %s: %s", self.url, name, why)

    async def _narinfo(self, name: str) -> NarInfo | None:
        files = self._cache_files()
        what = f"{self.url}{name}.narinfo"
        try:
            data = await run_blocking(
                files.read_small,
                f"{name}.narinfo",
                MAX_NARINFO_SIZE,
                timeout=self._timeout,
                what=f"GET {what}",
            )
        except StoreError as e:
            self._count_lookup("error")
            log.warning("%s: %s", what, e)
            raise
        if data is None:
            self._count_lookup("miss")
            return None
        try:
            narinfo = NarInfo.parse(data.decode())
        except (UnicodeDecodeError, ValidationError) as e:
            self._count_lookup("error")
            log.warning("%s: not a valid narinfo: %s", what, e)
            raise IntegrityError(f"{what}: not a valid narinfo: {e}") from e
        self._count_lookup("hit")
        return narinfo

    async def _download(self, narinfo: NarInfo) -> IngestedNar:
        files = self._cache_files()
        deadline = ProgressDeadline(self._timeout, f"{self.url}{narinfo.url}")
        raw = await run_blocking(
            files.open, narinfo.url, timeout=self._timeout, what=f"GET {self.url}{narinfo.url}"
        )
        download = _Download(raw, narinfo, deadline)
        try:
            return await ingest_nar(
                self._blobs,
                self._directories,
                download,
                expected_size=narinfo.nar_size,
                expected_sha256=narinfo.nar_sha256,
                deadline=deadline,
            )
        finally:
            self._count_downloaded(download.counted.size)

    # -- metrics ----------------------------------------------------------

    def _metrics_or_none(self) -> NixCacheMetrics | None:
        # Looked up on first use: under the supervisor, the metric objects must
        # be made in the process that counts (the rootcache), after its fork.
        if not self._metrics_loaded:
            self._metrics_loaded = True
            try:
                from tvix_mountd.metrics import nix_cache_metrics

                self._metrics = nix_cache_metrics()
            except Exception:  # metrics are optional; the cache works without them
                log.exception("metrics unavailable")
        return self._metrics

    def _count_lookup(self, result: str) -> None:
        metrics = self._metrics_or_none()
        if metrics is not None:
            metrics.narinfo_lookups.labels(self.url, result).inc()

    def _count_download(self, result: str, nar_bytes: int = 0, seconds: float = 0.0) -> None:
        metrics = self._metrics_or_none()
        if metrics is not None:
            metrics.nar_downloads.labels(self.url, result).inc()
            if result == "ok":
                metrics.ingested_bytes.labels(self.url).inc(nar_bytes)
                metrics.ingest_seconds.labels(self.url).observe(seconds)

    def _count_prefetch(self, result: str) -> None:
        metrics = self._metrics_or_none()
        if metrics is not None:
            metrics.reference_prefetches.labels(self.url, result).inc()

    def _count_downloaded(self, size: int) -> None:
        metrics = self._metrics_or_none()
        if metrics is not None and size:
            metrics.downloaded_bytes.labels(self.url).inc(size)
