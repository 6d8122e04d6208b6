"""How a binary cache's NAR file is read, without a cache: the decompressors
(nixcache_files.decompressing) and the download as the ingest's thread reads
it (nixcache._Download).

The end-to-end tests (test_nixcache.py) read NARs that real Nix compressed;
these check the edges a cache's file can have and Nix's files do not show:
concatenated streams, bytes after the last one, a file cut short, a bomb
(output bounded per read, whatever the input expands to), and a download
given up while the ingest's thread waits for it.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import lzma
import os
from collections.abc import Callable

import pytest
import trio
import trio.testing
import zstandard

from tests.mounting import wait_until
from tvix_mountd.castore.blocking import ProgressDeadline
from tvix_mountd.castore.errors import IntegrityError
from tvix_mountd.castore.nar import CLOSE, CONTENTS, NAR_MAGIC, OPEN, REGULAR, TYPE
from tvix_mountd.castore.nar_ingest import ingest_nar
from tvix_mountd.castore.narinfo import NarInfo
from tvix_mountd.castore.pathinfos.nixcache import _Download
from tvix_mountd.castore.pathinfos.nixcache_files import (
    DECOMPRESSION_ERRORS,
    INPUT_CHUNK,
    decompressing,
)
from tvix_mountd.castore.store import Store
from tvix_mountd.castore.storepath import StorePath

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


class CountingSource(io.BytesIO):
    """A compressed file that says how much was asked of it per read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []
        self.closed_by_reader = False

    def read(self, n: int | None = -1, /) -> bytes:
        data = super().read(n)
        self.reads.append(len(data))
        return data

    def close(self) -> None:
        self.closed_by_reader = True
        super().close()


def read_all(source: io.BytesIO, compression: str, block: int = 1 << 16) -> bytes:
    reader = decompressing(source, compression)
    parts = []
    while part := reader.read(block):
        assert len(part) <= block
        parts.append(part)
    reader.close()
    return b"".join(parts)


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_reads_back_what_was_compressed_in_bounded_parts(compression: str) -> None:
    data = os.urandom(300_000) + b"text " * 200_000
    source = CountingSource(COMPRESSORS[compression](data))
    assert read_all(source, compression, block=4096) == data
    assert source.closed_by_reader


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_input_is_taken_in_large_chunks(compression: str) -> None:
    # The point of not using LZMAFile/BZ2File: few reads (and GIL hand-overs)
    # per MiB of compressed input, not one per 8 KiB.
    compressed = COMPRESSORS[compression](os.urandom(3 * INPUT_CHUNK))
    source = CountingSource(compressed)
    read_all(source, compression)
    assert len(source.reads) <= len(compressed) // INPUT_CHUNK + 2, source.reads


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_a_bomb_comes_out_a_block_at_a_time(compression: str) -> None:
    compressed = COMPRESSORS[compression](bytes(64 << 20))
    reader = decompressing(CountingSource(compressed), compression)
    total = 0
    while part := reader.read(1 << 20):
        assert len(part) <= 1 << 20
        total += len(part)
    assert total == 64 << 20


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_concatenated_streams_are_one(compression: str) -> None:
    compress = COMPRESSORS[compression]
    source = CountingSource(compress(b"first,") + compress(b"second"))
    assert read_all(source, compression) == b"first,second"


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_bytes_after_the_last_stream_end_the_data(compression: str) -> None:
    # As the stdlib's LZMAFile and BZ2File read them; the NAR's own size and
    # hash, and the file's FileSize/FileHash, are what catch a wrong file.
    source = CountingSource(COMPRESSORS[compression](b"content") + b"not a stream" * 100)
    assert read_all(source, compression) == b"content"


# zstandard's stream_reader ends quietly where a frame is cut short; the
# NAR's own framing and size catch that (test_nixcache.py's truncated NARs).
@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_a_file_cut_short_is_an_error(compression: str) -> None:
    compressed = COMPRESSORS[compression](os.urandom(200_000))
    source = CountingSource(compressed[: len(compressed) // 2])
    with pytest.raises(DECOMPRESSION_ERRORS):
        read_all(source, compression)


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_garbage_is_an_error(compression: str) -> None:
    with pytest.raises(DECOMPRESSION_ERRORS):
        read_all(CountingSource(b"this is not compressed at all" * 100), compression)


def test_read_without_a_size_reads_everything() -> None:
    reader = decompressing(CountingSource(lzma.compress(b"x" * 100_000)), "xz")
    assert reader.read() == b"x" * 100_000
    assert reader.read(10) == b""


# -- the download, as the ingest reads it ---------------------------------------------


def narinfo(compression: str) -> NarInfo:
    return NarInfo(
        store_path=StorePath.parse("00000000000000000000000000000000-test"),
        url=f"nar/test.nar.{compression}",
        compression=compression,
        nar_sha256=bytes(32),
        nar_size=0,
    )


def download(raw: io.RawIOBase | io.BytesIO, compression: str) -> _Download:
    return _Download(raw, narinfo(compression), ProgressDeadline(10, "test"))


async def test_an_ingest_given_up_closes_a_stalled_download() -> None:
    # A cache that sent a little and then nothing: a pipe whose writer stays open.
    read_end, write_end = os.pipe()
    os.write(write_end, b"some bytes ")
    raw = os.fdopen(read_end, "rb", buffering=0)
    store = Store.from_addrs("memory://", "memory://", "memory://")
    try:
        with trio.move_on_after(0.5) as scope:
            await ingest_nar(store.blobs, store.directories, download(raw, "none"))
        assert scope.cancelled_caught
    finally:
        os.close(write_end)  # the stalled read ends, if closing the body did not
    # The ingest's thread closed what it read from once its read failed.
    await trio.to_thread.run_sync(wait_until, lambda: raw.closed, 10, "the body to be closed")


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
async def test_a_file_that_does_not_decompress_fails_the_ingest(compression: str) -> None:
    store = Store.from_addrs("memory://", "memory://", "memory://")
    source = CountingSource(b"not compressed at all" * 100)
    with pytest.raises(IntegrityError, match=f"cannot decompress \\({compression}\\)"):
        await ingest_nar(store.blobs, store.directories, download(source, compression))
    assert source.closed_by_reader


async def test_what_follows_the_nar_counts_for_the_file_size() -> None:
    store = Store.from_addrs("memory://", "memory://", "memory://")
    nar = NAR_MAGIC + OPEN + TYPE + REGULAR + CONTENTS + (0).to_bytes(8, "little") + CLOSE
    compressed = lzma.compress(nar)
    info = dataclasses.replace(narinfo("xz"), file_size=len(compressed))
    source = _Download(CountingSource(compressed + b"trailing"), info, ProgressDeadline(10, "test"))
    with pytest.raises(IntegrityError, match="FileSize says"):
        await ingest_nar(store.blobs, store.directories, source)
    exact = _Download(CountingSource(compressed), info, ProgressDeadline(10, "test"))
    ingested = await ingest_nar(store.blobs, store.directories, exact)
    assert ingested.nar_size == len(nar)
