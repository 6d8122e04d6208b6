"""objectstore+file:// is tvix's object_store blob layout, read and written.

The layout is built here by hand, independently of our writer, as tvix's
castore/src/blobservice/object_store.rs writes it through object_store's
LocalFileSystem:

    <root>/blobs/b3/<hex of the digest's first 2 bytes>/<hex digest>
        a tvix.castore.v1.StatBlobResponse listing the chunks (empty: one chunk)
    <root>/chunks/b3/<hex of the digest's first 2 bytes>/<hex digest>
        the chunk's bytes as zstd frames (`zstd::encode_all`, level 3: a
        streaming encoder, so no content size in the frame header)

and what our writer produces is checked file by file against what tvix's
reader does with it (open_read: the chunk file under the digest is the whole
blob, else the blob index's chunks, each read from its chunk file with
`zstd::stream::decode_all` and checked against its digest).
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3
import pytest
import zstandard

from tests.mounting import assert_errno, backing_store, mounted
from tvix_mountd.castore.blobs import BlobService, from_addr
from tvix_mountd.castore.blobs.objectstore import (
    CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ObjectStoreBlobService,
)
from tvix_mountd.castore.blobs.raw import RawFileBlobService
from tvix_mountd.castore.digests import EMPTY_BLOB_DIGEST, B3Digest
from tvix_mountd.castore.errors import IntegrityError, StoreError
from tvix_mountd.proto import rpc_blobstore_pb2

ChunkMeta = rpc_blobstore_pb2.StatBlobResponse.ChunkMeta
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- the layout, by hand ------------------------------------------------------------------


def shard_path(root: Path, kind: str, digest: bytes) -> Path:
    """tvix's derive_blob_path / derive_chunk_path: HEXLOWER of the first two
    bytes, then HEXLOWER of the whole digest."""
    return root / kind / "b3" / digest[:2].hex() / digest.hex()


def tvix_compress(data: bytes) -> bytes:
    # What zstd::encode_all(.., 3) writes: one frame, no content size.
    return zstandard.ZstdCompressor(level=3, write_content_size=False).compress(data)


def tvix_decompress(compressed: bytes) -> bytes:
    """zstd::stream::decode_all: every frame, no reliance on a content size."""
    reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    return reader.readall()


class TvixLayout:
    """Writes blobs under `root` the way tvix's ObjectStoreBlobService does,
    with chunk boundaries chosen by the test (FastCDC's are content-defined)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write_chunk(self, chunk: bytes, compressed: bytes | None = None) -> bytes:
        digest = blake3.blake3(chunk).digest()
        path = shard_path(self.root, "chunks", digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tvix_compress(chunk) if compressed is None else compressed)
        return digest

    def write_index(self, digest: bytes, chunks: list[ChunkMeta]) -> Path:
        path = shard_path(self.root, "blobs", digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rpc_blobstore_pb2.StatBlobResponse(chunks=chunks).SerializeToString())
        return path

    def write_blob(self, data: bytes, sizes: list[int]) -> B3Digest:
        """`data` cut into chunks of `sizes`; one chunk is the blob, listed as none."""
        assert sum(sizes) == len(data)
        metas = []
        offset = 0
        for size in sizes:
            chunk = data[offset : offset + size]
            metas.append(ChunkMeta(digest=self.write_chunk(chunk), size=size))
            offset += size
        digest = blake3.blake3(data).digest()
        self.write_index(digest, metas if len(metas) > 1 else [])
        return B3Digest(digest)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ObjectStoreBlobService]:
    blobs = from_addr(f"objectstore+file://{tmp_path}/store")
    assert isinstance(blobs, ObjectStoreBlobService)
    yield blobs
    await blobs.aclose()


@pytest.fixture
def layout(tmp_path: Path) -> TvixLayout:
    return TvixLayout(tmp_path / "store")


async def read_all_in_steps(blobs: BlobService, digest: B3Digest, step: int) -> bytes:
    reader = await blobs.open_read(digest)
    assert reader is not None
    parts = []
    try:
        offset = 0
        while part := await reader.read_at(offset, step):
            parts.append(part)
            offset += len(part)
    finally:
        await reader.aclose()
    return b"".join(parts)


def count_chunk_reads(
    service: ObjectStoreBlobService, monkeypatch: pytest.MonkeyPatch
) -> list[B3Digest]:
    """Every chunk file the service reads, by digest."""
    reads: list[B3Digest] = []
    original = ObjectStoreBlobService.read_chunk

    def counting(self: ObjectStoreBlobService, digest: B3Digest, limit: int) -> bytes | None:
        reads.append(digest)
        return original(self, digest, limit)

    monkeypatch.setattr(ObjectStoreBlobService, "read_chunk", counting)
    return reads


# -- reading what tvix wrote ------------------------------------------------------------------

# Uneven sizes, as FastCDC cuts them (tvix: between 128 KiB and 512 KiB; smaller here too).
TVIX_SIZES: Final = [1, 70_000, 131_072, 5, 400_000, 3]


async def test_reads_a_chunked_blob_tvix_wrote(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    data = data_of(sum(TVIX_SIZES), seed=1)
    digest = layout.write_blob(data, TVIX_SIZES)
    assert await service.has(digest)
    assert await service.read_all(digest) == data
    assert await read_all_in_steps(service, digest, 4096) == data
    reader = await service.open_read(digest)
    assert reader is not None
    try:
        assert reader.size == len(data)
        rnd = random.Random(2)
        for _ in range(200):
            offset = rnd.randrange(len(data) + 10)
            n = rnd.choice([0, 1, 5, 4096, 131_072, 600_000])
            assert await reader.read_at(offset, n) == data[offset : offset + n], (offset, n)
    finally:
        await reader.aclose()


async def test_random_reads_decompress_only_the_chunks_they_touch(
    service: ObjectStoreBlobService, layout: TvixLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [100_000] * 20
    data = data_of(sum(sizes), seed=3)
    digest = layout.write_blob(data, sizes)
    chunk_digests = [B3Digest.of(data[i : i + 100_000]) for i in range(0, len(data), 100_000)]
    reads = count_chunk_reads(service, monkeypatch)
    reader = await service.open_read(digest)
    assert reader is not None
    try:
        reads.clear()  # whatever open looked at (the blob's own digest)
        assert await reader.read_at(1_500_010, 100) == data[1_500_010:1_500_110]
        assert reads == [chunk_digests[15]]
        # Across a boundary, backwards: the two chunks involved.
        assert await reader.read_at(399_990, 20) == data[399_990:400_010]
        assert reads == [chunk_digests[i] for i in (15, 3, 4)]
        # Kept: the chunk just read is not read again.
        assert await reader.read_at(400_100, 10) == data[400_100:400_110]
        assert len(reads) == 3
    finally:
        await reader.aclose()


async def test_reads_a_single_chunk_blob_tvix_wrote(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    data = b"Hello World"
    digest = layout.write_blob(data, [len(data)])
    # tvix's own example of the sharding (its doc comment shows a 2-character
    # shard; its code writes the first two bytes, 4 characters).
    hexdigest = "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"
    assert digest.hex() == hexdigest
    assert (layout.root / "blobs/b3/41f8" / hexdigest).read_bytes() == b""
    assert (layout.root / "chunks/b3/41f8" / hexdigest).is_file()
    assert await service.has(digest)
    assert await service.read_all(digest) == data


async def test_reads_a_chunk_of_several_frames(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    # decode_all reads every frame; a chunk file may hold several.
    data = data_of(50_000, seed=4)
    frames = tvix_compress(data[:20_000]) + tvix_compress(data[20_000:])
    digest = B3Digest(layout.write_chunk(data, compressed=frames))
    assert await service.read_all(digest) == data


async def test_reads_a_chunk_by_its_digest(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    # As in tvix, a chunk of a blob is itself readable (and `has` knows it).
    data = data_of(sum(TVIX_SIZES), seed=5)
    layout.write_blob(data, TVIX_SIZES)
    second = data[1:70_001]
    assert await service.has(B3Digest.of(second))
    assert await service.read_all(B3Digest.of(second)) == second


async def test_the_empty_blob_needs_no_file(service: ObjectStoreBlobService) -> None:
    assert await service.read_all(EMPTY_BLOB_DIGEST) == b""
    assert not await service.has(EMPTY_BLOB_DIGEST)  # as tvix: `has` looks at the files
    assert not await service.has(B3Digest.of(b"absent"))
    assert await service.open_read(B3Digest.of(b"absent")) is None


async def test_reading_creates_nothing(service: ObjectStoreBlobService, tmp_path: Path) -> None:
    # A tvix store's directory can be served without writing to it.
    assert await service.open_read(B3Digest.of(b"absent")) is None
    assert not await service.has(B3Digest.of(b"absent"))
    assert os.listdir(tmp_path) == []


# -- what our writer leaves is what tvix reads ------------------------------------------------


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "chunks").rglob("*") if p.is_file())


async def test_writes_a_chunked_blob_as_tvix_reads_it(
    service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    data = data_of(3 * CHUNK_SIZE + 17, seed=6)
    writer = await service.open_write()
    for start in range(0, len(data), 100_000):  # writes that do not align with chunks
        await writer.write(data[start : start + 100_000])
    digest = await writer.close()
    assert digest == B3Digest.of(data)

    index_path = shard_path(root, "blobs", digest)
    index = rpc_blobstore_pb2.StatBlobResponse.FromString(index_path.read_bytes())
    assert index.bao == b""
    sizes = [c.size for c in index.chunks]
    assert sum(sizes) == len(data) and len(sizes) >= 2 and all(sizes)
    # tvix's reader: each listed chunk from its file, decode_all, checked.
    offset = 0
    for meta in index.chunks:
        compressed = shard_path(root, "chunks", meta.digest).read_bytes()
        assert compressed.startswith(ZSTD_MAGIC)
        chunk = tvix_decompress(compressed)
        assert blake3.blake3(chunk).digest() == meta.digest
        assert chunk == data[offset : offset + meta.size]
        offset += meta.size
    assert offset == len(data)
    assert len(chunk_files(root)) == len(index.chunks)
    # No chunk file under the blob's own digest: tvix would take it for the blob.
    assert not shard_path(root, "chunks", digest).exists()
    # Everything published read-only, nothing left in tmp/.
    for path in [index_path, *chunk_files(root)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert list((root / "tmp").iterdir()) == []


async def test_writes_a_single_chunk_blob_as_tvix_does(
    service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    data = data_of(CHUNK_SIZE, seed=7)  # exactly one chunk
    digest = await service.put(data)
    # An index listing no chunks (an empty file), and the one chunk under the
    # blob's digest, which is what tvix's open_read reads.
    assert shard_path(root, "blobs", digest).read_bytes() == b""
    assert tvix_decompress(shard_path(root, "chunks", digest).read_bytes()) == data
    assert chunk_files(root) == [shard_path(root, "chunks", digest)]


async def test_writes_the_empty_blob_as_tvix_does(
    service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    assert await service.put(b"") == EMPTY_BLOB_DIGEST
    assert shard_path(root, "blobs", EMPTY_BLOB_DIGEST).read_bytes() == b""
    assert chunk_files(root) == []
    assert await service.has(EMPTY_BLOB_DIGEST)


async def test_shared_chunks_are_stored_once(
    service: ObjectStoreBlobService, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    head = data_of(2 * CHUNK_SIZE, seed=8)
    first = await service.put(head + b"one tail")
    files = chunk_files(root)
    inodes = {p: p.stat().st_ino for p in files}
    second = await service.put(head + b"another tail")
    # The two head chunks are shared; only the second blob's tail is new.
    assert len(chunk_files(root)) == len(files) + 1
    assert all(p.stat().st_ino == inodes[p] for p in files)
    assert await service.read_all(first) == head + b"one tail"
    assert await service.read_all(second) == head + b"another tail"


async def test_an_unfinished_writer_stores_no_blob(service: ObjectStoreBlobService) -> None:
    for size in (CHUNK_SIZE, 2 * CHUNK_SIZE):  # one chunk; two chunks, exactly
        data = data_of(size, seed=size)
        writer = await service.open_write()
        await writer.write(data)
        assert not await service.has(B3Digest.of(data))
        assert await service.open_read(B3Digest.of(data)) is None
        await writer.abort()
        assert not await service.has(B3Digest.of(data))


# -- hostile data: errors, never a crash -------------------------------------------------------


CHUNK: Final = 60_000


@dataclass
class ChunkedBlob:
    """A blob of five CHUNK-byte chunks that tvix wrote, and our service over it."""

    service: ObjectStoreBlobService
    digest: B3Digest
    data: bytes
    chunk_files: list[Path]

    def replace_chunk(self, i: int, content: bytes) -> None:
        self.chunk_files[i].chmod(0o644)
        self.chunk_files[i].write_bytes(content)

    async def expect_error_in_chunk(self, i: int, error: type[StoreError], match: str) -> None:
        """A read inside chunk `i` fails; a read of chunk 0 still works."""
        reader = await self.service.open_read(self.digest)
        assert reader is not None
        try:
            with pytest.raises(error, match=match):
                await reader.read_at(i * CHUNK + 10, 100)
            assert await reader.read_at(10, 100) == self.data[10:110]
        finally:
            await reader.aclose()


@pytest.fixture
def chunked(service: ObjectStoreBlobService, layout: TvixLayout) -> ChunkedBlob:
    data = data_of(5 * CHUNK, seed=9)
    digest = layout.write_blob(data, [CHUNK] * 5)
    files = [
        shard_path(layout.root, "chunks", blake3.blake3(data[i : i + CHUNK]).digest())
        for i in range(0, len(data), CHUNK)
    ]
    return ChunkedBlob(service, digest, data, files)


async def test_corrupt_chunk(chunked: ChunkedBlob) -> None:
    damaged = bytearray(chunked.data[2 * CHUNK : 3 * CHUNK])
    damaged[100] ^= 1
    chunked.replace_chunk(2, tvix_compress(bytes(damaged)))
    await chunked.expect_error_in_chunk(2, IntegrityError, "chunk 2 .* hashing to")
    with pytest.raises(IntegrityError):
        await chunked.service.read_all(chunked.digest)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        # A frame cut short decodes to less, silently: the size check finds it.
        (lambda c: c[: len(c) // 2], "chunk 3 .* should have 60000 bytes and has \\d+$"),
        (lambda c: b"not zstd at all", "not valid zstd"),
        (lambda c: c + b"trailing garbage", "not valid zstd"),
        (lambda c: b"", "chunk 3 .* should have 60000 bytes and has 0$"),
        (lambda c: ZSTD_MAGIC + bytes(100), "chunk 3 .* should have 60000 bytes and has 0$"),
        # Far more than any compression of 60,000 bytes: not even read.
        (lambda c: bytes(1 << 20), "chunk file .* is larger than"),
    ],
    ids=["truncated", "garbage", "trailing-garbage", "empty-file", "bad-frame", "huge-file"],
)
async def test_undecodable_chunk(
    chunked: ChunkedBlob, damage: Callable[[bytes], bytes], match: str
) -> None:
    chunked.replace_chunk(3, damage(chunked.chunk_files[3].read_bytes()))
    await chunked.expect_error_in_chunk(3, IntegrityError, match)


def zstd_bomb(size: int) -> bytes:
    """`size` zero bytes as a zstd frame of a few KiB, made without holding them."""
    out = zstandard.ZstdCompressor(level=19).compressobj()
    frame = [out.compress(bytes(1 << 20)) for _ in range(size >> 20)]
    return b"".join([*frame, out.flush()])


async def test_decompression_bomb_stops_at_the_listed_size(chunked: ChunkedBlob) -> None:
    chunked.replace_chunk(1, zstd_bomb(1 << 30))  # 1 GiB where 60,000 bytes are listed
    await chunked.expect_error_in_chunk(
        1, IntegrityError, "should have 60000 bytes and has more than that"
    )


async def test_decompression_bomb_as_a_whole_blob(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    # A chunk file under the blob's own digest has no listed size: the cap holds.
    digest = B3Digest.of(b"claims to be one chunk")
    path = shard_path(layout.root, "chunks", digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstd_bomb(MAX_CHUNK_SIZE + (1 << 20)))
    with pytest.raises(IntegrityError, match="holds more than"):
        await service.open_read(digest)


@pytest.mark.parametrize("how", ["missing", "a-directory"])
async def test_chunk_file_gone(chunked: ChunkedBlob, how: str) -> None:
    path = chunked.chunk_files[4]
    path.unlink()
    if how == "missing":
        match = f"chunk 4 is missing: no file {path}$"
    else:
        path.mkdir()  # where the file should be: EISDIR on read
        match = f"reading chunk file {path}: .*Is a directory"
    await chunked.expect_error_in_chunk(4, StoreError, match)


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (b"\xff\xff\xff", "not a chunk list"),
        (
            rpc_blobstore_pb2.StatBlobResponse(
                chunks=[ChunkMeta(digest=b"abc", size=1)]
            ).SerializeToString(),
            "chunk 0: invalid digest length 3",
        ),
        (
            rpc_blobstore_pb2.StatBlobResponse(
                chunks=[ChunkMeta(digest=bytes(32), size=0)]
            ).SerializeToString(),
            "chunk 0 is empty",
        ),
        (
            rpc_blobstore_pb2.StatBlobResponse(
                chunks=[ChunkMeta(digest=bytes(32), size=1 << 40)]
            ).SerializeToString(),
            "more than",
        ),
    ],
    ids=["not-protobuf", "short-digest", "empty-chunk", "huge-chunk"],
)
async def test_bad_index(
    service: ObjectStoreBlobService, layout: TvixLayout, index: bytes, match: str
) -> None:
    digest = B3Digest.of(b"a blob with a bad index")
    path = shard_path(layout.root, "blobs", digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(index)
    with pytest.raises(IntegrityError, match=match):
        await service.open_read(digest)
    with pytest.raises(IntegrityError):
        await service.read_all(digest)


async def test_index_of_one_chunk_without_its_file(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    # tvix itself panics here (a ChunkedReader of no chunks); we say what is missing.
    digest = B3Digest.of(b"a blob whose only chunk is gone")
    layout.write_index(digest, [])
    with pytest.raises(StoreError, match="lists no chunks"):
        await service.open_read(digest)


async def test_index_of_chunks_that_are_not_the_blob(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    # Every chunk is sound, but together they are another blob's bytes: a
    # sequential reader finds out at the end.
    one, other = data_of(1000, seed=10), data_of(1000, seed=11)
    metas = [ChunkMeta(digest=layout.write_chunk(c), size=len(c)) for c in (one, other)]
    digest = B3Digest.of(b"something else entirely")
    layout.write_index(digest, metas)
    with pytest.raises(IntegrityError, match="hashing to"):
        await service.read_all(digest)


async def test_single_chunk_with_wrong_contents(
    service: ObjectStoreBlobService, layout: TvixLayout
) -> None:
    data = data_of(5000, seed=12)
    digest = layout.write_blob(data, [len(data)])
    path = shard_path(layout.root, "chunks", digest)
    path.write_bytes(tvix_compress(data[:-1] + b"x"))
    with pytest.raises(IntegrityError, match="hashing to"):
        await service.open_read(digest)


# -- the other layout under the address: the address that fits -----------------------------


async def test_a_raw_layout_named_objectstore(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    raw = RawFileBlobService(str(root))
    digest = await raw.put(b"written in the raw layout")
    tvix = ObjectStoreBlobService(str(root))
    fits = f"its address is raw\\+file://{root}$"
    with pytest.raises(StoreError, match=fits):
        await tvix.has(digest)
    with pytest.raises(StoreError, match=fits):
        await tvix.open_read(digest)
    with pytest.raises(StoreError, match=fits):
        await tvix.open_write()
    assert sorted(os.listdir(root)) == ["b3", "tmp"]  # nothing of the other layout added


async def test_a_tvix_layout_named_raw(layout: TvixLayout) -> None:
    digest = layout.write_blob(b"written by tvix", [15])
    raw = RawFileBlobService(str(layout.root))
    fits = f"tvix's object_store layout \\(blobs/, chunks/\\).*objectstore\\+file://{layout.root}$"
    with pytest.raises(StoreError, match=fits):
        await raw.has(digest)
    with pytest.raises(StoreError, match=fits):
        await raw.put(b"data")
    assert sorted(os.listdir(layout.root)) == ["blobs", "chunks"]
    tvix = ObjectStoreBlobService(str(layout.root))
    assert await tvix.read_all(digest) == b"written by tvix"


# -- through a real FUSE mount -------------------------------------------------------------------


def _tree(src: Path) -> dict[str, bytes]:
    files = {
        "big.bin": data_of(5 * CHUNK_SIZE + 12_345, seed=13),
        "one-chunk.bin": data_of(CHUNK_SIZE, seed=14),
        "small.txt": b"small\n",
        "empty": b"",
        "sub/nested.txt": b"nested\n",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "link").symlink_to("small.txt")
    return files


@pytest.mark.fuse
def test_mount_serves_objectstore_blobs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    with backing_store("embedded", tmp_path / "store", blob_scheme="objectstore+file") as store:
        (info,) = store.import_paths([src])
        blob_root = tmp_path / "store" / "blobs"
        big = B3Digest.of(files["big.bin"])
        big_index = rpc_blobstore_pb2.StatBlobResponse.FromString(
            shard_path(blob_root, "blobs", big).read_bytes()
        )
        assert len(big_index.chunks) == 6  # stored in tvix's layout, chunked
        with mounted(store.addrs, tmp_path) as mount:
            tree = mount.path / info.store_path.basename
            for rel, data in files.items():
                assert (tree / rel).read_bytes() == data, rel
            assert os.readlink(tree / "link") == "small.txt"
            # Random reads through the kernel, across chunk boundaries.
            rnd = random.Random(15)
            fd = os.open(tree / "big.bin", os.O_RDONLY)
            try:
                for _ in range(100):
                    offset = rnd.randrange(len(files["big.bin"]))
                    n = rnd.choice([1, 4096, 70_000, 300_000])
                    want = files["big.bin"][offset : offset + n]
                    assert os.pread(fd, n, offset) == want, (offset, n)
            finally:
                os.close(fd)
            # A damaged chunk of a file not read yet: EIO for its bytes, a log
            # line naming the blob, and the mount serves on.
            other = data_of(3 * CHUNK_SIZE, seed=16)
            (src / "later.bin").write_bytes(other)
            (later,) = store.import_paths([src], names=["later"])
            later_index = rpc_blobstore_pb2.StatBlobResponse.FromString(
                shard_path(blob_root, "blobs", B3Digest.of(other)).read_bytes()
            )
            second = shard_path(blob_root, "chunks", later_index.chunks[1].digest)
            second.chmod(0o644)
            second.write_bytes(tvix_compress(b"not the chunk"))
            later_file = mount.path / later.store_path.basename / "later.bin"
            fd = os.open(later_file, os.O_RDONLY)
            try:
                assert_errno(errno.EIO, os.pread, fd, 100, CHUNK_SIZE + 10)
            finally:
                os.close(fd)
            mount.wait_for_log(str(B3Digest.of(other)))
            assert mount.alive(), mount.log()
            assert (tree / "small.txt").read_bytes() == b"small\n"
