"""The embedded store backends: memory://, raw+file://, objectstore+file:// and sqlite://.

Behaviour every backend shares runs against each kind (parametrized
fixtures); what only the on-disk backends have (atomic files, corruption on
disk, several processes on one file) is tested on them alone. tvix's
object_store layout itself (files as tvix writes and reads them) is
tests/test_objectstore_blobs.py's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import re
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tvix_mountd.castore import sqlite_db
from tvix_mountd.castore.blobs import BlobService, localdir
from tvix_mountd.castore.blobs.localdir import STALE_TEMP_AGE
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.blobs.objectstore import ObjectStoreBlobService
from tvix_mountd.castore.blobs.packs import MAX_PACKED, PLACES, PackedBlobs
from tvix_mountd.castore.blobs.raw import RawFileBlobService
from tvix_mountd.castore.digests import EMPTY_BLOB_DIGEST, B3Digest
from tvix_mountd.castore.directories import DirectoryService
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.directories.sqlite import SqliteDirectoryService
from tvix_mountd.castore.errors import (
    BackendUnavailable,
    IntegrityError,
    StoreError,
    ValidationError,
)
from tvix_mountd.castore.nodes import Directory, FileNode, SymlinkNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos import PathInfoService
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.pathinfos.sqlite import LIST_PAGE_SIZE, SqlitePathInfoService
from tvix_mountd.castore.sqlite_db import (
    ConnectionPool,
    SqliteTable,
    WholeFileReadAhead,
    in_list,
    power_of_two_pieces,
)
from tvix_mountd.castore.storepath import StorePath

TIMEOUT = 10.0


def blob_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- fixtures


@contextlib.asynccontextmanager
async def opened_blob_service(kind: str, tmp_path: Path) -> AsyncIterator[BlobService]:
    service: BlobService
    if kind == "memory":
        service = MemoryBlobService()
    elif kind == "raw":
        service = RawFileBlobService(str(tmp_path / "blobs"))
    else:
        assert kind == "objectstore"
        service = ObjectStoreBlobService(str(tmp_path / "blobs"))
    try:
        yield service
    finally:
        await service.aclose()


@pytest.fixture(params=["memory", "raw", "objectstore"])
async def blob_service(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BlobService]:
    async with opened_blob_service(request.param, tmp_path) as service:
        yield service


@pytest.fixture(params=["memory", "raw"])
async def whole_blob_service(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BlobService]:
    """The backends that keep a blob whole, so damage shows only as it is read
    (objectstore+file checks a small blob's one chunk at open: its own tests)."""
    async with opened_blob_service(request.param, tmp_path) as service:
        yield service


@pytest.fixture
async def raw_blobs(tmp_path: Path) -> AsyncIterator[RawFileBlobService]:
    service = RawFileBlobService(str(tmp_path / "blobs"))
    yield service
    await service.aclose()


@pytest.fixture(params=["memory", "sqlite"])
async def directory_service(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DirectoryService]:
    service: DirectoryService
    if request.param == "memory":
        service = MemoryDirectoryService()
    else:
        service = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=TIMEOUT)
    yield service
    await service.aclose()


@pytest.fixture(params=["memory", "sqlite"])
async def path_info_service(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[PathInfoService]:
    service: PathInfoService
    if request.param == "memory":
        service = MemoryPathInfoService()
    else:
        service = SqlitePathInfoService(str(tmp_path / "infos.sqlite"), timeout=TIMEOUT)
    yield service
    await service.aclose()


def corrupt_blob(service: BlobService, digest: B3Digest, change: Callable[[bytes], bytes]) -> None:
    """Change a stored blob behind the service's back, as a failing disk would."""
    if isinstance(service, MemoryBlobService):
        service.blobs[digest] = change(service.blobs[digest])
        return
    assert isinstance(service, RawFileBlobService)
    path = service.blob_path(digest)
    data = Path(path).read_bytes()
    os.chmod(path, 0o644)
    Path(path).write_bytes(change(data))


# Plain blocking file checks, kept out of the async tests' bodies.
def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]


# ---------------------------------------------------------------- blobs, every backend


async def test_blob_roundtrip(blob_service: BlobService) -> None:
    data = blob_bytes(100_000)
    digest = await blob_service.put(data)
    assert digest == B3Digest.of(data)
    assert await blob_service.has(digest)
    assert await blob_service.read_all(digest) == data
    # Putting it again is a no-op with the same answer.
    assert await blob_service.put(data) == digest
    assert await blob_service.read_all(digest) == data


async def test_blob_missing(blob_service: BlobService) -> None:
    absent = B3Digest.of(b"never stored")
    assert not await blob_service.has(absent)
    assert await blob_service.open_read(absent) is None
    assert await blob_service.read_all(absent) is None


async def test_empty_blob(blob_service: BlobService) -> None:
    writer = await blob_service.open_write()
    assert await writer.close() == EMPTY_BLOB_DIGEST
    assert await blob_service.has(EMPTY_BLOB_DIGEST)
    assert await blob_service.read_all(EMPTY_BLOB_DIGEST) == b""


async def test_blob_written_in_chunks(blob_service: BlobService) -> None:
    data = blob_bytes(3 * 65536 + 17, seed=1)
    writer = await blob_service.open_write()
    for start in range(0, len(data), 65536):
        await writer.write(data[start : start + 65536])
    await writer.write(b"")
    digest = await writer.close()
    assert digest == B3Digest.of(data)
    assert await blob_service.read_all(digest) == data


async def test_blob_reads_at_any_offset(blob_service: BlobService) -> None:
    data = blob_bytes(300_001, seed=2)
    digest = await blob_service.put(data)
    reader = await blob_service.open_read(digest)
    assert reader is not None
    try:
        assert reader.size == len(data)
        for offset in [0, 1, 4095, 4096, 131_071, 131_072, 299_999, 300_000, 300_001, 400_000]:
            for n in [0, 1, 100, 4096, 131_072, 1_000_000]:
                assert await reader.read_at(offset, n) == data[offset : offset + n], (offset, n)
        # Backwards and overlapping, as a kernel's readahead may ask.
        assert await reader.read_at(200_000, 50) == data[200_000:200_050]
        assert await reader.read_at(10, 50) == data[10:60]
    finally:
        await reader.aclose()


async def test_blob_sequential_read_is_verified(whole_blob_service: BlobService) -> None:
    blob_service = whole_blob_service
    data = blob_bytes(10_000, seed=3)
    digest = await blob_service.put(data)
    corrupt_blob(blob_service, digest, flip_byte)
    reader = await blob_service.open_read(digest)
    assert reader is not None
    try:
        # Bytes before the end cannot be judged yet...
        first = await reader.read_at(0, 8192)
        assert first == flip_byte(data)[:8192]
        # ...reaching the end does.
        with pytest.raises(IntegrityError, match="hashing to"):
            await reader.read_at(8192, 8192)
    finally:
        await reader.aclose()
    with pytest.raises(IntegrityError):
        await blob_service.read_all(digest)


@pytest.mark.parametrize(
    "change",
    [lambda d: d[:-1], lambda d: d[: len(d) // 2], lambda d: b"", lambda d: d + b"x"],
    ids=["one-byte-short", "half", "empty", "one-byte-long"],
)
async def test_blob_wrong_length_is_an_error(
    whole_blob_service: BlobService, change: Callable[[bytes], bytes]
) -> None:
    data = blob_bytes(5000, seed=4)
    digest = await whole_blob_service.put(data)
    corrupt_blob(whole_blob_service, digest, change)
    with pytest.raises(IntegrityError):
        await whole_blob_service.read_all(digest)


async def test_aborted_or_unfinished_writer_leaves_no_blob(blob_service: BlobService) -> None:
    data = blob_bytes(1000, seed=5)
    digest = B3Digest.of(data)
    aborted = await blob_service.open_write()
    await aborted.write(data)
    await aborted.abort()
    unfinished = await blob_service.open_write()
    await unfinished.write(data)
    assert not await blob_service.has(digest)
    assert await blob_service.open_read(digest) is None
    await unfinished.abort()
    assert not await blob_service.has(digest)


async def test_concurrent_writers_of_the_same_content(blob_service: BlobService) -> None:
    data = blob_bytes(200_000, seed=6)
    writers = [await blob_service.open_write() for _ in range(8)]
    # Interleave the writes, then race the closes.
    for start in range(0, len(data), 50_000):
        for writer in writers:
            await writer.write(data[start : start + 50_000])
    results: list[B3Digest] = []

    async def finish(index: int) -> None:
        results.append(await writers[index].close())

    async with trio.open_nursery() as nursery:
        for i in range(len(writers)):
            nursery.start_soon(finish, i)
    assert results == [B3Digest.of(data)] * len(writers)
    assert await blob_service.read_all(results[0]) == data


async def test_blob_put_batch_stores_the_missing_ones(blob_service: BlobService) -> None:
    contents = [blob_bytes(n, seed=n) for n in (0, 1, 5000, 300_000, 5000)]
    stored_before = contents[2]
    await blob_service.put(stored_before)
    batch = [(B3Digest.of(data), data) for data in contents]
    await blob_service.put_batch(batch)
    await blob_service.sync()
    for digest, data in batch:
        assert await blob_service.read_all(digest) == data
    # Again: all there, nothing to do, same answers.
    await blob_service.put_batch(batch)
    for digest, data in batch:
        assert await blob_service.read_all(digest) == data


async def test_blob_sync_with_nothing_written(blob_service: BlobService) -> None:
    await blob_service.sync()


# ---------------------------------------------------------------- blobs on disk


@pytest.mark.parametrize("kind", ["raw", "objectstore"])
async def test_disk_blobs_sync_once_for_many(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Publishing syncs nothing: no fsync per file, per directory or per batch...
    def no_fsync(fd: int) -> None:
        raise AssertionError("a blob write called fsync")

    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", no_fsync)
    monkeypatch.setattr(localdir, "sync_filesystem", synced.append)
    async with opened_blob_service(kind, tmp_path) as service:
        batch = [(B3Digest.of(data), data) for data in map(blob_bytes, (10, 20, 300_000))]
        await service.put_batch(batch)
        writer = await service.open_write()
        await writer.write(blob_bytes(600_000, seed=9))
        await writer.close()
        await service.put(blob_bytes(30, seed=1))
        assert synced == []
        # ...and sync is one syncfs of the store's file system.
        await service.sync()
        assert synced == [str(tmp_path / "blobs")]


async def test_disk_blobs_sync_failure_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(path: str) -> None:
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(localdir, "sync_filesystem", failing)
    async with opened_blob_service("raw", tmp_path) as service:
        await service.put(b"x")
        with pytest.raises(StoreError, match=r"making blobs durable: .*Input/output error"):
            await service.sync()


async def test_raw_blob_put_batch_repairs_a_damaged_file(raw_blobs: RawFileBlobService) -> None:
    # What a crash of the OS may leave of a blob published but not synced:
    # the name, with fewer bytes. A batch that carries it writes it again.
    data = blob_bytes(5000, seed=11)
    digest = await raw_blobs.put(data)
    path = raw_blobs.blob_path(digest)
    assert read(path) == data
    corrupt_blob(raw_blobs, digest, lambda _: b"")
    await raw_blobs.put_batch([(digest, data)])
    # Stored again (small: packed), and found there before the damaged file.
    assert await raw_blobs.has(digest)
    assert await raw_blobs.read_all(digest) == data


def temp_files(service: RawFileBlobService) -> list[str]:
    return os.listdir(os.path.join(service.root, "tmp"))


async def test_raw_blob_layout(raw_blobs: RawFileBlobService) -> None:
    data = b"hello world\n"
    digest = await raw_blobs.put(data)
    hexdigest = digest.hex()
    path = Path(raw_blobs.root, "b3", hexdigest[:2], hexdigest)
    assert raw_blobs.blob_path(digest) == str(path)
    # Raw, uncompressed bytes: the FUSE read path preads this file.
    assert read(path) == data
    assert mode(path) == 0o444
    assert temp_files(raw_blobs) == []


async def test_raw_blob_directories_created_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "er" / "blobs"
    service = RawFileBlobService(str(root))
    assert not (tmp_path / "deep").exists()
    assert not await service.has(EMPTY_BLOB_DIGEST)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert (root / "b3").is_dir() and (root / "tmp").is_dir()
    digest = await service.put(b"x")
    assert read(service.blob_path(digest)) == b"x"
    await service.aclose()


async def test_raw_blob_location_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_bytes(b"")
    root = tmp_path / "plain-file" / "blobs"
    service = RawFileBlobService(str(root))
    with pytest.raises(StoreError, match=re.escape(str(root))):
        await service.put(b"data")
    with pytest.raises(StoreError, match=re.escape(str(root))):
        await service.has(EMPTY_BLOB_DIGEST)


async def test_raw_blob_unfinished_writes_stay_in_tmp(raw_blobs: RawFileBlobService) -> None:
    data = blob_bytes(70_000, seed=7)
    digest = B3Digest.of(data)
    writer = await raw_blobs.open_write()
    await writer.write(data)
    # The bytes are on disk, but only under tmp/, never under the blob's name.
    assert not exists(raw_blobs.blob_path(digest))
    [name] = temp_files(raw_blobs)
    assert read(Path(raw_blobs.root, "tmp", name)) == data
    await writer.abort()
    assert temp_files(raw_blobs) == []
    assert not exists(raw_blobs.blob_path(digest))
    with pytest.raises(StoreError):
        await writer.write(b"more")
    with pytest.raises(StoreError):
        await writer.close()


async def test_raw_blob_second_write_keeps_the_first_file(raw_blobs: RawFileBlobService) -> None:
    data = blob_bytes(1000, seed=8)
    digest = await raw_blobs.put(data)
    inode = os.stat(raw_blobs.blob_path(digest)).st_ino
    assert await raw_blobs.put(data) == digest
    assert os.stat(raw_blobs.blob_path(digest)).st_ino == inode
    assert temp_files(raw_blobs) == []


async def test_raw_blob_put_repairs_a_damaged_file(raw_blobs: RawFileBlobService) -> None:
    data = blob_bytes(1000, seed=11)
    digest = await raw_blobs.put(data)
    corrupt_blob(raw_blobs, digest, lambda d: d[:10])
    with pytest.raises(IntegrityError):
        await raw_blobs.read_all(digest)
    # A file of the wrong size cannot be the blob, so writing it again replaces it.
    assert await raw_blobs.put(data) == digest
    assert await raw_blobs.read_all(digest) == data
    assert temp_files(raw_blobs) == []


async def test_raw_blob_concurrent_writers_leave_no_temp_files(
    raw_blobs: RawFileBlobService,
) -> None:
    data = blob_bytes(100_000, seed=9)

    async def put() -> None:
        assert await raw_blobs.put(data) == B3Digest.of(data)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(put)
    assert temp_files(raw_blobs) == []
    assert await raw_blobs.read_all(B3Digest.of(data)) == data


async def test_raw_blob_stale_temp_files_removed_on_start(tmp_path: Path) -> None:
    tmp = tmp_path / "blobs" / "tmp"
    tmp.mkdir(parents=True)
    stale, fresh, foreign = tmp / "old.tmp", tmp / "new.tmp", tmp / "keep-me"
    for path in (stale, fresh, foreign):
        path.write_bytes(b"partial")
    long_ago = time.time() - STALE_TEMP_AGE - 60
    os.utime(stale, (long_ago, long_ago))
    os.utime(foreign, (long_ago, long_ago))
    service = RawFileBlobService(str(tmp_path / "blobs"))
    assert not await service.has(EMPTY_BLOB_DIGEST)
    assert not stale.exists()
    assert fresh.exists()
    assert foreign.exists()  # not a name this store writes


async def test_raw_blob_truncated_file_is_an_error(raw_blobs: RawFileBlobService) -> None:
    data = blob_bytes(50_000, seed=10)
    digest = await raw_blobs.put(data)
    reader = await raw_blobs.open_read(digest)
    assert reader is not None
    # Truncated while open: the size taken at open no longer holds.
    os.truncate(raw_blobs.blob_path(digest), 10_000)
    try:
        assert await reader.read_at(0, 5000) == data[:5000]
        with pytest.raises(IntegrityError):
            await reader.read_at(5000, 100_000)
    finally:
        await reader.aclose()


async def test_raw_blob_reader_after_close(raw_blobs: RawFileBlobService) -> None:
    digest = await raw_blobs.put(b"abc")
    reader = await raw_blobs.open_read(digest)
    assert reader is not None
    assert await reader.read_at(1, 1) == b"b"
    await reader.aclose()
    await reader.aclose()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await reader.read_at(0, 1)


async def test_raw_blob_two_services_share_a_root(tmp_path: Path) -> None:
    first = RawFileBlobService(str(tmp_path / "blobs"))
    second = RawFileBlobService(str(tmp_path / "blobs"))
    digest = await first.put(b"shared")
    assert await second.has(digest)
    assert await second.read_all(digest) == b"shared"


# ---------------------------------------------------------------- packed blobs


def packs_of(service: RawFileBlobService) -> list[Path]:
    return sorted(Path(service.root, "packs").glob("*.pack"))


def files_of(service: RawFileBlobService) -> list[Path]:
    return sorted(p for p in Path(service.root, "b3").rglob("*") if p.is_file())


async def test_raw_small_blobs_of_a_batch_are_packed_in_their_order(
    raw_blobs: RawFileBlobService,
) -> None:
    small = [blob_bytes(n, seed=n) for n in (1, 700, MAX_PACKED)]
    large = blob_bytes(MAX_PACKED + 1, seed=3)
    batch = [(B3Digest.of(d), d) for d in [small[0], large, small[1], small[0], small[2]]]
    await raw_blobs.put_batch(batch)
    await raw_blobs.sync()
    # One pack, the small ones back to back in the batch's order, each once;
    # the large one a file of its own.
    (pack,) = packs_of(raw_blobs)
    assert read(pack) == b"".join(small)
    assert files_of(raw_blobs) == [Path(raw_blobs.blob_path(B3Digest.of(large)))]
    # Another process's view of the store (a mount) finds and checks them.
    other = RawFileBlobService(raw_blobs.root)
    try:
        for digest, data in batch:
            assert await other.has(digest)
            assert await other.read_all(digest) == data
            reader = await other.open_read(digest)
            assert reader is not None
            try:
                assert await reader.read_at(1, 5) == data[1:6]
            finally:
                await reader.aclose()
        for data in small:
            assert other.read_small(B3Digest.of(data), len(data)) == data
    finally:
        await other.aclose()
    # Stored already: a batch again appends nothing.
    await raw_blobs.put_batch(batch)
    assert [read(p) for p in packs_of(raw_blobs)] == [b"".join(small)]


async def test_raw_batch_asks_the_pack_index_once_which_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "blobs")
    # More than a service keeps places of (PLACES), so that some of those
    # packed already are at hand and some are not.
    packed_before = [blob_bytes(200 + n, seed=n) for n in range(PLACES + 40)]
    as_files = [blob_bytes(300 + n, seed=1000 + n) for n in range(3)]
    new = [blob_bytes(400 + n, seed=2000 + n) for n in range(50)]
    first = RawFileBlobService(root)
    await first.put_batch([(B3Digest.of(d), d) for d in packed_before])
    await first.aclose()
    for data in as_files:  # stored loose, as a store before packs did
        path = trio.Path(first.blob_path(B3Digest.of(data)))
        await path.parent.mkdir(parents=True, exist_ok=True)
        await path.write_bytes(data)
    service = RawFileBlobService(root)
    try:
        service.locate([B3Digest.of(d) for d in packed_before[:10]])  # some at hand
        queries: list[str] = []
        query = PackedBlobs._query

        def counted(self: PackedBlobs, sql: str, params: Any) -> Any:
            queries.append(sql)
            return query(self, sql, params)

        monkeypatch.setattr(PackedBlobs, "_query", counted)
        everything = packed_before + as_files + new + new[:5]
        await service.put_batch([(B3Digest.of(d), d) for d in everything])
        # One lookup of the index for the whole batch, not one a blob.
        assert len(queries) == 1
        # Only the new ones were packed, each once, in their order.
        packs = packs_of(service)
        assert sum(p.stat().st_size for p in packs) == sum(map(len, packed_before + new))
        assert any(read(pack).endswith(b"".join(new)) for pack in packs)
        for data in everything:
            assert await service.read_all(B3Digest.of(data)) == data
    finally:
        await service.aclose()


def test_statements_of_many_rows_or_keys_come_in_a_few_shapes() -> None:
    # Each statement text is compiled and cached per connection: a shape for
    # every batch length grew a pack-writing process by ~10 MB.
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    db.executemany("INSERT INTO t VALUES (?)", [(k,) for k in range(0, 2000, 2)])
    piece_shapes: set[int] = set()
    in_shapes: set[int] = set()
    for n in range(1, 1100):
        items = list(range(n))
        pieces = list(power_of_two_pieces(items, 128))
        assert [x for piece in pieces for x in piece] == items
        for piece in pieces:
            assert len(piece) <= 128 and len(piece) & (len(piece) - 1) == 0
            piece_shapes.add(len(piece))
        marks, params = in_list(items)
        assert marks.count("?") == len(params) and n <= len(params) < 2 * n
        assert params[:n] == items and set(params) == set(items)
        in_shapes.add(len(params))
        # The padding does not repeat answers.
        found = db.execute(f"SELECT k FROM t WHERE k IN ({marks})", params).fetchall()
        assert sorted(k for (k,) in found) == list(range(0, n, 2))
    assert len(piece_shapes) == 8 and len(in_shapes) == 12


async def test_raw_locate_looks_up_packed_blobs_and_creates_nothing(tmp_path: Path) -> None:
    root = str(tmp_path / "blobs")
    fresh = RawFileBlobService(root)
    try:
        fresh.locate([B3Digest.of(b"nothing stored yet")])
        assert not exists(Path(root, "packs"))
    finally:
        await fresh.aclose()
    writer = RawFileBlobService(root)
    small, large = blob_bytes(3000, seed=31), blob_bytes(MAX_PACKED + 1, seed=32)
    await writer.put_batch([(B3Digest.of(small), small), (B3Digest.of(large), large)])
    await writer.aclose()
    reader = RawFileBlobService(root)
    try:
        digests = [B3Digest.of(small), B3Digest.of(large), B3Digest.of(b"missing")]
        reader.locate(digests)  # packed, a file, missing: all fine
        assert reader.read_small(digests[0], len(small)) == small
        assert reader.read_small(digests[1], len(large)) == large
        assert reader.read_small(digests[2], 7) is None
    finally:
        await reader.aclose()


async def test_raw_packed_blob_damaged_in_its_pack_is_never_served(
    raw_blobs: RawFileBlobService,
) -> None:
    data = blob_bytes(5000, seed=21)
    digest = B3Digest.of(data)
    await raw_blobs.put_batch([(digest, data)])
    (pack,) = packs_of(raw_blobs)
    damaged = bytearray(read(pack))
    damaged[2500] ^= 0x01
    pack.write_bytes(bytes(damaged))
    assert raw_blobs.read_small(digest, len(data)) is None
    with pytest.raises(IntegrityError):
        await raw_blobs.read_all(digest)


async def test_raw_packed_blob_its_pack_lost_is_stored_again(
    raw_blobs: RawFileBlobService,
) -> None:
    # What an OS crash may leave: the index row, its pack short of the bytes.
    data = blob_bytes(5000, seed=22)
    digest = B3Digest.of(data)
    await raw_blobs.put_batch([(digest, data)])
    (pack,) = packs_of(raw_blobs)
    os.truncate(pack, 100)
    assert not await raw_blobs.has(digest)
    await raw_blobs.put_batch([(digest, data)])
    assert await raw_blobs.has(digest)
    assert await raw_blobs.read_all(digest) == data


async def test_raw_packs_written_by_two_services_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "blobs")
    writers = [RawFileBlobService(root), RawFileBlobService(root)]
    contents = [blob_bytes(100 + n, seed=n) for n in range(200)]
    batches = [
        [(B3Digest.of(d), d) for d in contents[:150]],
        [(B3Digest.of(d), d) for d in contents[50:]],
    ]
    try:
        async with trio.open_nursery() as nursery:
            for writer, batch in zip(writers, batches, strict=True):
                for i in range(0, len(batch), 10):
                    nursery.start_soon(writer.put_batch, batch[i : i + 10])
        reader = RawFileBlobService(root)
        try:
            for data in contents:
                assert await reader.read_all(B3Digest.of(data)) == data
        finally:
            await reader.aclose()
    finally:
        for writer in writers:
            await writer.aclose()


async def test_raw_pack_index_naming_a_pack_outside_is_a_store_error(
    raw_blobs: RawFileBlobService,
) -> None:
    data = b"packed"
    digest = B3Digest.of(data)
    await raw_blobs.put_batch([(digest, data)])
    index = Path(raw_blobs.root, "packs", "index.sqlite")
    with contextlib.closing(sqlite3.connect(index)) as db, db:
        db.execute("UPDATE packed SET pack = '../../etc/passwd'")
    other = RawFileBlobService(raw_blobs.root)
    try:
        with pytest.raises(StoreError, match="names pack"):
            await other.open_read(digest)
        assert other.read_small(digest, len(data)) is None
    finally:
        await other.aclose()


# ---------------------------------------------------------------- directories

LEAF = Directory([(b".keep", FileNode(EMPTY_BLOB_DIGEST, 0))])
EMPTY = Directory()
MIDDLE = Directory(
    [
        (b"leaf", LEAF.as_node()),
        (b"empty", EMPTY.as_node()),
        (b"file", FileNode(B3Digest.of(b"x"), 1, True)),
    ]
)
ROOT = Directory(
    [
        (b"middle", MIDDLE.as_node()),
        (b"leaf-again", LEAF.as_node()),
        (b"link", SymlinkNode(b"middle/leaf")),
    ]
)
TREE = [LEAF, EMPTY, MIDDLE, ROOT]  # leaves first


async def test_directory_roundtrip(directory_service: DirectoryService) -> None:
    assert await directory_service.get(LEAF.digest) is None
    assert await directory_service.put(LEAF) == LEAF.digest
    got = await directory_service.get(LEAF.digest)
    assert got == LEAF
    assert got is not None and got.digest == LEAF.digest
    assert await directory_service.put(LEAF) == LEAF.digest
    assert await directory_service.put(EMPTY) == EMPTY.digest
    assert await directory_service.get(EMPTY.digest) == EMPTY


async def test_directory_get_many_leaves_out_what_is_missing(
    directory_service: DirectoryService,
) -> None:
    await directory_service.put_tree(TREE)
    missing = B3Digest.of(b"not a directory")
    wanted = [ROOT.digest, missing, LEAF.digest]
    got = await directory_service.get_many(wanted)
    assert got == {ROOT.digest: ROOT, LEAF.digest: LEAF}
    assert all(type(digest) is B3Digest for digest in got)
    assert await directory_service.get_many([]) == {}


async def test_directory_put_tree_and_get_recursive(directory_service: DirectoryService) -> None:
    assert await directory_service.put_tree(TREE) == ROOT.digest
    for directory in TREE:
        assert await directory_service.get(directory.digest) == directory
    got = [d async for d in directory_service.get_recursive(ROOT.digest)]
    # Root first, breadth first, LEAF once although two entries point at it.
    assert got[0] == ROOT
    assert sorted(d.digest for d in got) == sorted(d.digest for d in TREE)
    assert len(got) == len(TREE)
    # Each directory comes after one that refers to it.
    for i, directory in enumerate(got[1:], start=1):
        assert any(directory.as_node() in d.values() for d in got[:i])
    assert [d async for d in directory_service.get_recursive(LEAF.digest)] == [LEAF]


async def test_directory_put_tree_with_a_missing_child(
    directory_service: DirectoryService,
) -> None:
    with pytest.raises(ValidationError, match="not sent before"):
        await directory_service.put_tree([LEAF, MIDDLE, ROOT])  # EMPTY left out
    # Nothing of a rejected upload is stored.
    for directory in TREE:
        assert await directory_service.get(directory.digest) is None


async def test_directory_put_tree_rejects_nothing(directory_service: DirectoryService) -> None:
    with pytest.raises(ValidationError, match="no directories"):
        await directory_service.put_tree([])


async def test_directory_put_tree_rejects_strays(directory_service: DirectoryService) -> None:
    stray = Directory([(b"x", SymlinkNode(b"y"))])
    with pytest.raises(ValidationError, match="not reachable"):
        await directory_service.put_tree([stray, *TREE])
    assert await directory_service.get(stray.digest) is None
    assert await directory_service.get(ROOT.digest) is None


async def test_directory_tree_upload_in_pieces(directory_service: DirectoryService) -> None:
    upload = directory_service.open_tree_upload()
    await upload.add([LEAF, EMPTY])
    await upload.add([])
    await upload.add([LEAF, MIDDLE])  # a Directory sent again is fine
    await upload.add([ROOT])
    assert await upload.finish() == ROOT.digest
    got = [d async for d in directory_service.get_recursive(ROOT.digest)]
    assert sorted(d.digest for d in got) == sorted(d.digest for d in TREE)


async def test_directory_tree_upload_checks_each_piece(
    directory_service: DirectoryService,
) -> None:
    upload = directory_service.open_tree_upload()
    with pytest.raises(ValidationError, match="not sent before"):
        await upload.add([LEAF, MIDDLE])  # EMPTY left out
        await upload.finish()
    with pytest.raises(ValidationError, match="no directories"):
        await directory_service.open_tree_upload().finish()


async def test_sqlite_tree_upload_is_written_as_it_comes(tmp_path: Path) -> None:
    # A tree far larger than a flush: rows reach the file before the upload
    # finishes, so memory does not grow with the tree.
    path = tmp_path / "dirs.sqlite"
    service = SqliteDirectoryService(str(path), timeout=TIMEOUT)
    try:
        upload = service.open_tree_upload()
        leaves = [
            Directory([(f"{i:05d}-{j:03d}".encode(), SymlinkNode(b"t" * 200)) for j in range(100)])
            for i in range(300)
        ]
        await upload.add(leaves)
        rows = raw_sql(path, "SELECT count(*) FROM directories")[0][0]
        assert isinstance(rows, int) and rows > 0
        root = Directory([(f"d{i:05d}".encode(), d.as_node()) for i, d in enumerate(leaves)])
        await upload.add([root])
        assert await upload.finish() == root.digest
        assert raw_sql(path, "SELECT count(*) FROM directories")[0][0] == 301
    finally:
        await service.aclose()


async def test_directory_get_recursive_with_a_hole(directory_service: DirectoryService) -> None:
    # put() does not check closure, so a tree with a missing middle can exist.
    await directory_service.put(LEAF)
    await directory_service.put(EMPTY)
    await directory_service.put(ROOT)
    got: list[Directory] = []
    with pytest.raises(StoreError, match=re.escape(str(MIDDLE.digest))):
        async for directory in directory_service.get_recursive(ROOT.digest):
            got.append(directory)
    assert got[0] == ROOT
    assert MIDDLE not in got
    with pytest.raises(StoreError, match="not found"):
        async for _ in directory_service.get_recursive(B3Digest.of(b"nothing")):
            pass


# ---------------------------------------------------------------- directories in sqlite


def raw_sql(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """A query on the file behind the services' backs (as another process would)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class _Fadvises:
    """os.posix_fadvise, recording which files were asked for as a whole."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = os.posix_fadvise

        def spy(fd: int, offset: int, length: int, advice: int) -> None:
            if (offset, length, advice) == (0, 0, os.POSIX_FADV_WILLNEED):
                self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd, offset, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", spy)


def test_a_small_database_file_is_read_ahead_whole_once_an_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fadvises = _Fadvises(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    small, large = tmp_path / "small.sqlite", tmp_path / "large.sqlite"
    small.write_bytes(b"x" * 65536)
    with open(large, "wb") as f:
        f.truncate(sqlite_db.WHOLE_FILE_MAX + 1)  # sparse: no disk used
    read_small, read_large = WholeFileReadAhead(str(small)), WholeFileReadAhead(str(large))
    read_small()
    read_small()  # within the interval: not asked again
    read_large()  # too large to read whole: left to its lookups
    assert fadvises.paths == [str(small)]
    now[0] += sqlite_db.WHOLE_FILE_INTERVAL
    read_small()
    read_large()
    assert fadvises.paths == [str(small), str(small)]
    WholeFileReadAhead(str(tmp_path / "missing.sqlite"))()  # no error: the lookup says it


async def test_sqlite_directories_created_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "dirs.sqlite"
    service = SqliteDirectoryService(str(path), timeout=TIMEOUT)
    assert not (tmp_path / "a").exists()
    assert await service.get(LEAF.digest) is None
    assert path.is_file()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    await service.put(LEAF)
    await service.aclose()
    assert raw_sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_sql(path, "SELECT digest, data FROM directories") == [
        (bytes(LEAF.digest), LEAF.encode())
    ]


@pytest.mark.parametrize("kind", ["directories", "pathinfos"])
async def test_sqlite_location_that_cannot_be_created(tmp_path: Path, kind: str) -> None:
    (tmp_path / "plain-file").write_bytes(b"")
    path = tmp_path / "plain-file" / "db.sqlite"
    with pytest.raises(StoreError, match=re.escape(str(path))):
        if kind == "directories":
            await SqliteDirectoryService(str(path), timeout=TIMEOUT).get(LEAF.digest)
        else:
            await SqlitePathInfoService(str(path), timeout=TIMEOUT).get(bytes(20))


async def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not a database, but it is long enough to look like one" * 100)
    service = SqliteDirectoryService(str(path), timeout=TIMEOUT)
    with pytest.raises(StoreError, match=re.escape(str(path))):
        await service.get(LEAF.digest)


async def test_sqlite_corrupted_directory_rows(tmp_path: Path) -> None:
    path = tmp_path / "dirs.sqlite"
    service = SqliteDirectoryService(str(path), timeout=TIMEOUT)
    await service.put_tree(TREE)
    # A flipped bit in a row: the digest check catches it.
    raw_sql(
        path,
        "UPDATE directories SET data = ? WHERE digest = ?",
        flip_byte(MIDDLE.encode()),
        bytes(MIDDLE.digest),
    )
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        await service.get(MIDDLE.digest)
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        await service.get_many([ROOT.digest, MIDDLE.digest])
    # A value that is not even a blob.
    raw_sql(path, "UPDATE directories SET data = 'text' WHERE digest = ?", bytes(LEAF.digest))
    with pytest.raises(IntegrityError, match="expected a blob"):
        await service.get(LEAF.digest)
    # Garbage stored under its own hash passes the digest check but not decoding.
    garbage = b"\x12\xff\xff\xff"
    raw_sql(path, "INSERT INTO directories VALUES (?, ?)", bytes(B3Digest.of(garbage)), garbage)
    with pytest.raises(IntegrityError, match="undecodable"):
        await service.get(B3Digest.of(garbage))
    # The rest of the store is unaffected.
    assert await service.get(ROOT.digest) == ROOT
    with pytest.raises(IntegrityError):
        async for _ in service.get_recursive(ROOT.digest):
            pass
    await service.aclose()


async def test_sqlite_directory_put_tree_is_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = SqliteTable.put

    async def counting_put(
        self: SqliteTable, rows: list[tuple[bytes, bytes]], *, replace: bool
    ) -> None:
        calls.append(len(rows))
        await original(self, rows, replace=replace)

    monkeypatch.setattr(SqliteTable, "put", counting_put)
    service = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=TIMEOUT)
    await service.put_tree(TREE)
    assert calls == [len(TREE)]
    await service.aclose()


async def test_sqlite_directories_two_instances_share_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "dirs.sqlite")
    first = SqliteDirectoryService(path, timeout=TIMEOUT)
    second = SqliteDirectoryService(path, timeout=TIMEOUT)
    await first.put_tree(TREE)
    assert [d async for d in second.get_recursive(ROOT.digest)][:1] == [ROOT]
    other = Directory([(b"from-second", SymlinkNode(b"x"))])
    await second.put(other)
    assert await first.get(other.digest) == other
    await first.aclose()
    assert await second.get(LEAF.digest) == LEAF
    await second.aclose()


def test_connections_opened_at_once_on_a_new_database_both_work(tmp_path: Path) -> None:
    """A reader and a writer that open the first connections of a new file
    at the same moment (an import's first pack: a lookup and an append):
    setting both up at once could deadlock in SQLite, which answered one
    "database is locked" at once (seen in CI, about one new file in 25 here)."""
    schema = "CREATE TABLE IF NOT EXISTS t (k BLOB PRIMARY KEY) WITHOUT ROWID"
    errors: list[BaseException] = []
    for n in range(400):
        pool = ConnectionPool(str(tmp_path / f"new{n}.sqlite"), schema, TIMEOUT)
        start = threading.Barrier(2)

        def read(pool: ConnectionPool = pool, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                conn = pool.acquire()
                conn.execute("SELECT k FROM t WHERE k = ?", (b"x",)).fetchall()
                pool.release(conn)
            except BaseException as e:
                errors.append(e)

        def write(pool: ConnectionPool = pool, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                conn = pool.acquire()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO t VALUES (?)", (b"y",))
                conn.execute("COMMIT")
                pool.release(conn)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=read), threading.Thread(target=write)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pool.close()
    assert errors == []


async def test_sqlite_parallel_readers(tmp_path: Path) -> None:
    service = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=TIMEOUT)
    await service.put_tree(TREE)
    results: list[Directory | None] = []

    async def read(directory: Directory) -> None:
        results.append(await service.get(directory.digest))

    async with trio.open_nursery() as nursery:
        for _ in range(25):
            for directory in TREE:
                nursery.start_soon(read, directory)
    assert len(results) == 25 * len(TREE)
    assert all(r in TREE for r in results)
    await service.aclose()


def count_threaded_queries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every query SqliteTable sends through a worker thread."""
    calls: list[str] = []
    original = SqliteTable._run

    async def counting_run(self: SqliteTable, fn: Callable[..., object], what: str) -> object:
        calls.append(what)
        return await original(self, fn, what)

    monkeypatch.setattr(SqliteTable, "_run", counting_run)
    return calls


async def test_sqlite_reads_go_inline_and_see_other_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "dirs.sqlite")
    reader = SqliteDirectoryService(path, timeout=TIMEOUT)
    writer = SqliteDirectoryService(path, timeout=TIMEOUT)
    await writer.put(LEAF)
    threaded = count_threaded_queries(monkeypatch)
    assert await reader.get(LEAF.digest) == LEAF  # the first read creates nothing inline
    assert await reader.get(EMPTY.digest) is None
    assert len(threaded) == 1
    # Another writer's commit is visible to the next inline read: no read
    # transaction was left open on the old snapshot.
    await writer.put(EMPTY)
    threaded.clear()
    assert await reader.get(EMPTY.digest) == EMPTY
    assert await reader.get(LEAF.digest) == LEAF
    assert threaded == []
    await reader.aclose()
    await writer.aclose()


def _sqlite_memory_used() -> int:
    """What the SQLite library of this process has allocated, in bytes (every
    connection's page cache included)."""
    library = ctypes.CDLL(ctypes.util.find_library("sqlite3"))
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return int(library.sqlite3_memory_used())


async def test_sqlite_inline_reads_keep_a_small_page_cache(tmp_path: Path) -> None:
    """A walk reads every Directory of a tree through the loop thread's
    connection: its page cache must not grow to SQLite's default 2 MiB,
    memory that a worker would keep for nothing (the kernel caches the file)."""
    table = SqliteTable(str(tmp_path / "rows.sqlite"), "rows", timeout=TIMEOUT)
    rows = [(i.to_bytes(32, "big"), os.urandom(1024)) for i in range(4096)]  # 4+ MiB
    await table.put(rows, replace=False)
    assert await table.get(rows[0][0]) == rows[0][1]  # through a thread; inline next
    before = _sqlite_memory_used()
    for key, data in rows:
        assert await table.get(key) == data
    assert table._inline is not None  # the reads went inline
    assert _sqlite_memory_used() - before < 512 << 10
    await table.aclose()


class BusyConnection(sqlite3.Connection):
    """A connection whose every query finds the database locked."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if not sql.startswith("SELECT"):
            return super().execute(sql, *args)
        error = sqlite3.OperationalError("database is locked")
        error.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise error


async def test_sqlite_busy_inline_read_goes_through_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=TIMEOUT)
    await service.put_tree(TREE)  # opens the thread pool's (real) connection
    threaded = count_threaded_queries(monkeypatch)
    assert await service.get(MIDDLE.digest) == MIDDLE
    # The inline connection, opened on the next read, finds the database
    # locked on every query: each read then goes through a thread.
    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3,
        "connect",
        lambda *args, **kwargs: real_connect(*args, **kwargs, factory=BusyConnection),
    )
    assert await service.get(ROOT.digest) == ROOT
    assert await service.get(LEAF.digest) == LEAF
    assert len(threaded) == 3
    await service.aclose()


async def test_sqlite_readers_not_blocked_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "dirs.sqlite"
    service = SqliteDirectoryService(str(path), timeout=0.3)
    await service.put(LEAF)
    # Another process holds the write lock (mid-transaction)...
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute(
            "INSERT INTO directories VALUES (?, ?)", (bytes(EMPTY.digest), EMPTY.encode())
        )
        # ...readers still read (WAL), and see only committed rows...
        assert await service.get(LEAF.digest) == LEAF
        assert await service.get(EMPTY.digest) is None
        # ...while a writer waits for the lock, then gives up as unavailable.
        with pytest.raises(BackendUnavailable):
            await service.put(MIDDLE)
        holder.execute("COMMIT")
    finally:
        holder.close()
    assert await service.get(EMPTY.digest) == EMPTY
    await service.put(MIDDLE)
    assert await service.get(MIDDLE.digest) == MIDDLE
    await service.aclose()


async def test_sqlite_closed_service(tmp_path: Path) -> None:
    service = SqliteDirectoryService(str(tmp_path / "dirs.sqlite"), timeout=TIMEOUT)
    await service.put(LEAF)
    await service.aclose()
    with pytest.raises(StoreError, match="closed"):
        await service.get(LEAF.digest)


# ---------------------------------------------------------------- path infos


def make_info(i: int, nar_size: int = 0) -> PathInfo:
    digest = random.Random(i).randbytes(20)
    return PathInfo(
        store_path=StorePath(digest, f"pkg-{i}"),
        node=SymlinkNode(f"/target/{i}".encode()) if i % 2 else LEAF.as_node(),
        nar_size=nar_size or i,
        nar_sha256=bytes(32),
        references=(StorePath(bytes(20), "dep"),) if i % 3 == 0 else (),
    )


async def test_path_info_roundtrip(path_info_service: PathInfoService) -> None:
    info = make_info(3)
    assert await path_info_service.get(info.store_path.digest) is None
    assert await path_info_service.put(info) == info
    assert await path_info_service.get(info.store_path.digest) == info
    replacement = make_info(3, nar_size=999)
    await path_info_service.put(replacement)
    assert await path_info_service.get(info.store_path.digest) == replacement
    assert [i async for i in path_info_service.list()] == [replacement]


async def test_path_info_list_empty(path_info_service: PathInfoService) -> None:
    assert [i async for i in path_info_service.list()] == []


async def test_path_info_list_many(path_info_service: PathInfoService) -> None:
    infos = [make_info(i) for i in range(2600)]
    if isinstance(path_info_service, SqlitePathInfoService):
        # One transaction instead of 2600 fsynced ones; put() is tested above.
        await path_info_service._table.put(
            [(i.store_path.digest, i.encode()) for i in infos], replace=True
        )
    else:
        for info in infos:
            await path_info_service.put(info)
    listed = [i async for i in path_info_service.list()]
    assert len(listed) == len(infos)
    assert {i.store_path for i in listed} == {i.store_path for i in infos}
    assert sorted(listed, key=lambda i: i.store_path.digest) == sorted(
        infos, key=lambda i: i.store_path.digest
    )


async def test_sqlite_path_info_list_pages_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SqlitePathInfoService(str(tmp_path / "infos.sqlite"), timeout=TIMEOUT)
    infos = [make_info(i) for i in range(2 * LIST_PAGE_SIZE + 500)]
    await service._table.put([(i.store_path.digest, i.encode()) for i in infos], replace=True)
    pages: list[tuple[bytes | None, int]] = []
    original = SqliteTable.page

    async def recording_page(
        self: SqliteTable, after: bytes | None, limit: int
    ) -> list[tuple[bytes, bytes]]:
        rows = await original(self, after, limit)
        pages.append((after, len(rows)))
        return rows

    monkeypatch.setattr(SqliteTable, "page", recording_page)
    listed = [i.store_path.digest async for i in service.list()]
    assert listed == sorted(i.store_path.digest for i in infos)
    assert [n for _, n in pages] == [LIST_PAGE_SIZE, LIST_PAGE_SIZE, 500]
    assert pages[0][0] is None
    assert pages[1][0] == listed[LIST_PAGE_SIZE - 1]
    assert pages[2][0] == listed[2 * LIST_PAGE_SIZE - 1]
    await service.aclose()


async def test_sqlite_path_info_list_sees_rows_added_while_listing(tmp_path: Path) -> None:
    service = SqlitePathInfoService(str(tmp_path / "infos.sqlite"), timeout=TIMEOUT)
    infos = [make_info(i) for i in range(LIST_PAGE_SIZE + 10)]
    await service._table.put([(i.store_path.digest, i.encode()) for i in infos], replace=True)
    late = PathInfo(StorePath(b"\xff" * 20, "late"), SymlinkNode(b"x"), 1, bytes(32))
    listed: list[PathInfo] = []
    async for info in service.list():
        if not listed:
            await service.put(late)  # sorts after every existing key
        listed.append(info)
    assert len(listed) == len(infos) + 1
    assert listed[-1] == late
    await service.aclose()


async def test_sqlite_corrupted_path_info_rows(tmp_path: Path) -> None:
    path = tmp_path / "infos.sqlite"
    service = SqlitePathInfoService(str(path), timeout=TIMEOUT)
    good, moved, broken = make_info(1), make_info(2), make_info(3)
    for info in (good, moved, broken):
        await service.put(info)
    raw_sql(
        path,
        "UPDATE pathinfos SET data = ? WHERE digest = ?",
        b"\x0a\xff",
        broken.store_path.digest,
    )
    with pytest.raises(IntegrityError, match=broken.store_path.digest.hex()):
        await service.get(broken.store_path.digest)
    # A valid PathInfo under another path's key: not an answer to that key.
    raw_sql(
        path,
        "UPDATE pathinfos SET data = ? WHERE digest = ?",
        good.encode(),
        moved.store_path.digest,
    )
    with pytest.raises(IntegrityError, match="asked for store path"):
        await service.get(moved.store_path.digest)
    assert await service.get(good.store_path.digest) == good
    with pytest.raises(IntegrityError):
        async for _ in service.list():
            pass
    await service.aclose()


async def test_sqlite_path_infos_two_instances_share_a_file(tmp_path: Path) -> None:
    path = str(tmp_path / "infos.sqlite")
    first = SqlitePathInfoService(path, timeout=TIMEOUT)
    second = SqlitePathInfoService(path, timeout=TIMEOUT)
    await first.put(make_info(1))
    assert await second.get(make_info(1).store_path.digest) == make_info(1)
    await second.put(make_info(1, nar_size=42))
    assert await first.get(make_info(1).store_path.digest) == make_info(1, nar_size=42)
    await second.put(make_info(2))
    assert len([i async for i in first.list()]) == 2
    await first.aclose()
    await second.aclose()


async def test_raw_blob_temp_name_taken_draws_another(raw_blobs: RawFileBlobService) -> None:
    # Another process (or a fork of this one) with the same temp name prefix.
    await raw_blobs.put(b"first")
    taken = temp_files(raw_blobs)
    assert taken == []
    local = raw_blobs.local
    prefix = local._temp_prefix
    count = next(local._temp_count)
    for n in range(count + 1, count + 3):
        (Path(local.temp_dir) / f"{prefix}{n}.tmp").write_bytes(b"someone else's")
    digest = await raw_blobs.put(b"second")
    assert await raw_blobs.read_all(digest) == b"second"
    assert local._temp_prefix != prefix
    assert len(temp_files(raw_blobs)) == 2  # theirs, untouched
