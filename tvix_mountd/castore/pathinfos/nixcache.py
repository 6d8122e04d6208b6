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

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
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
from tvix_mountd.castore.nar_ingest import IngestedNar, ingest_nar
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

# Decompressed bytes handed from the download thread to the ingest per hop,
# and how many such blocks the thread keeps ready.
BLOCK_SIZE: Final = 1 << 20
BLOCKS_AHEAD: Final = 2
# How often a download thread waiting for room checks whether it was closed,
# and how long closing waits for it to end (a block's decompression, a poll):
# not for a stalled network read, which ends at its socket's timeout.
CLOSE_POLL: Final = 0.1
# Compressions whose decompression keeps well ahead of the ingest: their
# download thread hashes the NAR too (see _Download).
HASHED_BY_THREAD: Final = frozenset({"none", "zstd"})
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


class _Download:
    """One NAR read by a thread of its own: network (or file) -> counting ->
    decompression, up to BLOCKS_AHEAD blocks of at most BLOCK_SIZE
    decompressed bytes ahead of the ingest, which takes them with `read`.

    The thread waits for nothing but room for the next block. Asked for one
    block at a time by a trio task instead, decompression stood idle
    between blocks until the loop's thread, busy parsing the last one, got
    round to asking: ~15% of an xz NAR's ingest (RESULTS.md, eleventh
    session).

    After a quick decompressor (zstd, or none) the thread also takes the
    NAR's sha256 of the blocks it hands over (`nar_sha256`): the ingest,
    on the loop's thread, is then the slower side, and hashing there each
    block let go of the GIL and waited to take it back (zstd ingest ~9%
    slower). After xz or bzip2 the thread is the slower side (liblzma
    alone is most of an xz ingest), and the ingest hashes (RESULTS.md,
    twelfth session)."""

    def __init__(self, raw: ByteSource, narinfo: NarInfo, deadline: ProgressDeadline) -> None:
        self.narinfo = narinfo
        self.counted = CountingReader(raw, lambda _n: deadline.progressed())
        self._decompressed = decompressing(self.counted, narinfo.compression)
        self._ready: queue.Queue[bytes | Exception] = queue.Queue(BLOCKS_AHEAD)
        # The end (b"") or the error, once `read` has seen it: it stays the answer.
        self._last: bytes | Exception | None = None
        self._closing = threading.Event()
        self._started = False
        self._ended = threading.Event()
        self._nar_sha256 = hashlib.sha256() if narinfo.compression in HASHED_BY_THREAD else None

    def read(self) -> bytes:
        """The next block, b"" at the end (blocking; one caller at a time)."""
        if not self._started:
            self._started = True
            # One of trio's cached threads, as the blocking calls use.
            trio.lowlevel.start_thread_soon(
                self._decompress, lambda _outcome: self._ended.set(), name=f"nar {self.narinfo.url}"
            )
        item = self._last if self._last is not None else self._ready.get()
        if isinstance(item, Exception) or not item:
            self._last = item
        if isinstance(item, Exception):
            raise item
        return item

    def _decompress(self) -> None:
        """The thread: blocks into the queue until the end, an error or `close`."""
        while True:
            item: bytes | Exception
            try:
                item = self._decompressed.read(BLOCK_SIZE)
            except DECOMPRESSION_ERRORS as e:
                item = IntegrityError(f"cannot decompress ({self.narinfo.compression}): {e}")
            except Exception as e:  # a failed download (StoreError), say: the ingest's to see
                item = e
            if self._nar_sha256 is not None and isinstance(item, bytes):
                self._nar_sha256.update(item)
            while not self._closing.is_set():
                try:
                    self._ready.put(item, timeout=CLOSE_POLL)
                    break
                except queue.Full:
                    continue
            if self._closing.is_set() or isinstance(item, Exception) or not item:
                return

    @property
    def nar_sha256(self) -> Callable[[], bytes] | None:
        """For `ingest_nar`: the sha256 of the blocks `read` gave, once it
        gave the end (b""), if this thread takes it; else None."""
        hasher = self._nar_sha256
        if hasher is None:
            return None

        def digest() -> bytes:
            assert self._last == b"", "the NAR's hash before its end"
            return hasher.digest()

        return digest

    def finish(self) -> None:
        """After the NAR's end: the compressed file must end too, and match."""
        if self._started:
            self._ended.wait()  # it ended with the NAR's end: the file is ours now
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
        """Best effort, after the end or a failure: the thread may still be
        reading (the ingest failed, or gave up at its deadline). Closing the
        body first makes a network read fail; room in the queue, and the flag,
        make the thread end; a caller still waiting in `read` (abandoned at
        its deadline) gets an error. The decompressor is closed only once the
        thread is gone, as it may be inside it; else the garbage collector
        closes it after the thread."""
        self._closing.set()
        self._close(self.counted)
        with contextlib.suppress(queue.Empty):
            while True:
                self._ready.get_nowait()
        with contextlib.suppress(queue.Full):
            self._ready.put_nowait(BackendUnavailable(f"{self.narinfo.url}: download closed"))
        if self._started and not self._ended.wait(CLOSE_JOIN):
            log.debug("%s: its thread is still reading after close", self.narinfo.url)
            return
        self._close(self._decompressed)

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
            ingested = await ingest_nar(
                self._blobs,
                self._directories,
                lambda: deadline.run(download.read),
                expected_size=narinfo.nar_size,
                expected_sha256=narinfo.nar_sha256,
                source_sha256=download.nar_sha256,
            )
            await deadline.run(download.finish)
            return ingested
        finally:
            self._count_downloaded(download.counted.size)
            with trio.CancelScope(shield=True):
                # A thread may still be reading (abandoned at a deadline);
                # closing the body from here makes it stop.
                await trio.to_thread.run_sync(download.close)

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
