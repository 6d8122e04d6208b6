"""NARs and narinfos from real Nix, read by nar_ingest and narinfo, and broken ones.

Every NAR here is Nix's own (`nix-store --dump`), every narinfo and signature
Nix's own (`nix copy --to file://...?secret-key=`); the damaged variants are
made from those or from NAR tokens, so each check compares our reading with
Nix's writing, and each hostile input must end in a clear error.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import tracemalloc
from pathlib import Path

import blake3
import pytest
import trio

from tests.nixcache import Caches, build_caches, requires_nix
from tvix_mountd.castore import nixbase32
from tvix_mountd.castore.addr import PATH_INFO_SCHEMES, parse_address
from tvix_mountd.castore.blobs import BlobReader, BlobService, BlobWriter
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.errors import AddressError, BackendUnavailable, StoreError, ValidationError
from tvix_mountd.castore.importer import write_nar
from tvix_mountd.castore.nar import (
    CLOSE,
    CONTENTS,
    DIRECTORY,
    ENTRY,
    NAME,
    NAR_MAGIC,
    NODE,
    OPEN,
    REGULAR,
    SYMLINK,
    TARGET,
    TYPE,
    nar_string,
)
from tvix_mountd.castore.nar_ingest import BlocksSource, NarError, NarSource, ingest_nar
from tvix_mountd.castore.narinfo import NarInfo, PublicKey, signed_by
from tvix_mountd.castore.nodes import Node
from tvix_mountd.castore.pathinfo import CAHashType
from tvix_mountd.castore.store import Store

pytestmark = requires_nix


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Caches:
    return build_caches(tmp_path_factory.mktemp("nar-ingest"))


def nix_dump(path: Path) -> bytes:
    return subprocess.run(
        ["nix-store", "--dump", str(path)], capture_output=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def nar(caches: Caches) -> bytes:
    """Nix's NAR of the whole test tree (a file over one chunk included)."""
    return nix_dump(caches.sources["tree"])


@pytest.fixture(scope="module")
def small_nar(caches: Caches) -> bytes:
    """Nix's NAR of a small part of it: a file, an empty file, an empty directory."""
    return nix_dump(caches.sources["tree"] / "share")


def blocks_of(data: bytes, size: int) -> BlocksSource:
    return BlocksSource([data[i : i + size] for i in range(0, len(data), size)])


def memory_store() -> Store:
    return Store.from_addrs("memory://", "memory://", "memory://")


def stored_directories(store: Store) -> int:
    assert isinstance(store.directories, MemoryDirectoryService)
    return len(store.directories.directories)


async def ingest(
    store: Store,
    data: bytes,
    block_size: int = 4096,
    *,
    expected_size: int | None = None,
    expected_sha256: bytes | None = None,
) -> Node:
    ingested = await ingest_nar(
        store.blobs,
        store.directories,
        blocks_of(data, block_size),
        expected_size=expected_size,
        expected_sha256=expected_sha256,
    )
    return ingested.node


async def rendered(store: Store, node: Node) -> bytes:
    out = bytearray()
    await write_nar(store, node, out.extend)
    return bytes(out)


# -- Nix's NARs ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4096, 1 << 20, 1 << 24])
async def test_nix_nar_ingests_and_renders_back_byte_for_byte(nar: bytes, block_size: int) -> None:
    store = memory_store()
    ingested = await ingest_nar(
        store.blobs,
        store.directories,
        blocks_of(nar, block_size),
        expected_size=len(nar),
        expected_sha256=hashlib.sha256(nar).digest(),
    )
    assert (ingested.nar_size, ingested.nar_sha256) == (len(nar), hashlib.sha256(nar).digest())
    assert await rendered(store, ingested.node) == nar


async def test_every_token_split_across_blocks(small_nar: bytes) -> None:
    store = memory_store()
    node = await ingest(store, small_nar, block_size=1)
    assert await rendered(store, node) == small_nar


async def test_a_nar_of_one_file_and_of_one_symlink(caches: Caches) -> None:
    for path in (caches.sources["tree"] / "bin" / "hello", caches.sources["tree"] / "dangling"):
        data = nix_dump(path)
        store = memory_store()
        node = await ingest(store, data)
        assert await rendered(store, node) == data
        assert not stored_directories(store)


async def test_every_truncation_is_an_error_and_stores_no_directory(small_nar: bytes) -> None:
    for end in range(len(small_nar)):
        store = memory_store()
        with pytest.raises(NarError, match="ends early"):
            await ingest(store, small_nar[:end], block_size=64)
        assert not stored_directories(store)


async def test_data_after_the_end(small_nar: bytes) -> None:
    with pytest.raises(NarError, match="after its end"):
        await ingest(memory_store(), small_nar + b"\0" * 8)


async def test_wrong_expected_hash_or_size_stores_no_directory(small_nar: bytes) -> None:
    right = hashlib.sha256(small_nar).digest()
    for expected in (
        {"expected_sha256": hashlib.sha256(b"other").digest()},
        {"expected_size": len(small_nar) + 8, "expected_sha256": right},
        {"expected_size": len(small_nar) - 8},
    ):
        store = memory_store()
        with pytest.raises(NarError):
            await ingest(store, small_nar, **expected)
        assert not stored_directories(store)


async def test_every_flipped_byte_is_caught(small_nar: bytes) -> None:
    """A flipped byte anywhere: a format error or, in contents, the NAR hash."""
    right = hashlib.sha256(small_nar).digest()
    for i in range(0, len(small_nar), 3):
        damaged = bytearray(small_nar)
        damaged[i] ^= 0x20
        with pytest.raises((NarError, ValidationError)):
            await ingest(memory_store(), bytes(damaged), expected_sha256=right)


# -- hand-made hostile NARs -------------------------------------------------------------


def s(data: bytes) -> bytes:
    return nar_string(data)


def regular(contents: bytes, executable: bytes | None = None) -> bytes:
    marker = b"" if executable is None else s(b"executable") + s(executable)
    return OPEN + TYPE + REGULAR + marker + CONTENTS + s(contents) + CLOSE


def entry(name: bytes, node: bytes) -> bytes:
    return ENTRY + OPEN + NAME + s(name) + NODE + node + CLOSE


def directory(*entries: bytes) -> bytes:
    return OPEN + TYPE + DIRECTORY + b"".join(entries) + CLOSE


HOSTILE = {
    "unsorted names": directory(entry(b"b", regular(b"")), entry(b"a", regular(b""))),
    "duplicate names": directory(entry(b"a", regular(b"")), entry(b"a", regular(b""))),
    "dot-dot name": directory(entry(b"..", regular(b""))),
    "dot name": directory(entry(b".", regular(b""))),
    "slash in a name": directory(entry(b"a/b", regular(b""))),
    "NUL in a name": directory(entry(b"a\0b", regular(b""))),
    "empty name": directory(entry(b"", regular(b""))),
    "empty symlink target": OPEN + TYPE + SYMLINK + TARGET + s(b"") + CLOSE,
    "unknown node type": OPEN + TYPE + s(b"fifo") + CLOSE,
    "executable marker with a value": regular(b"x", executable=b"yes"),
    "non-zero padding": OPEN + TYPE + REGULAR + CONTENTS + s(b"abc")[:11] + b"\x01" * 5 + CLOSE,
    "a huge string length": OPEN + TYPE + s(b"directory") + (2**63).to_bytes(8, "little"),
    "a name longer than 255": directory(entry(b"n" * 256, regular(b""))),
    "garbage in a directory": directory(s(b"rubbish")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_nar_is_a_clear_error(case: str) -> None:
    store = memory_store()
    with pytest.raises(NarError):
        await ingest(store, NAR_MAGIC + HOSTILE[case])
    assert not stored_directories(store)


async def test_file_larger_than_the_expected_nar_fails_before_reading_it() -> None:
    header = NAR_MAGIC + OPEN + TYPE + REGULAR + CONTENTS + (1 << 40).to_bytes(8, "little")
    with pytest.raises(NarError, match="longer than the expected"):
        await ingest(memory_store(), header + b"\0" * 1_000_000, expected_size=len(header) + 64)


async def test_nesting_deeper_than_the_recursion_limit() -> None:
    depth = 1500  # over Python's default recursion limit of 1000
    data = OPEN + TYPE + SYMLINK + TARGET + s(b"bottom") + CLOSE
    for _ in range(depth):
        data = directory(entry(b"d", data))
    store = memory_store()
    node = await ingest(store, NAR_MAGIC + data, block_size=1 << 16)
    assert await rendered(store, node) == NAR_MAGIC + data


# -- narinfos -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["xz", "zstd", "bzip2", "none", "unsigned", "untrusted"])
def test_nix_narinfos_parse_and_nix_signatures_verify(caches: Caches, cache: str) -> None:
    trusted = PublicKey.parse(caches.trusted.public)
    untrusted = PublicKey.parse(caches.untrusted.public)
    for tree in ("tree", "other"):
        info = caches.narinfo(cache, tree)
        assert info.store_path == caches.paths[tree]
        expected_compression = {"unsigned": "xz", "untrusted": "zstd"}.get(cache, cache)
        assert info.compression == expected_compression
        nar_file = caches.dirs[cache] / info.url
        assert info.file_size == nar_file.stat().st_size
        assert info.file_sha256 == hashlib.sha256(nar_file.read_bytes()).digest()
        nar = nix_dump(caches.sources[tree])
        assert (info.nar_size, info.nar_sha256) == (len(nar), hashlib.sha256(nar).digest())
        # `nix-store --add` makes a content-addressed path: recursive sha256 of the NAR.
        assert info.ca is not None and info.ca.type is CAHashType.NAR_SHA256
        assert info.ca.digest == info.nar_sha256
        signer = signed_by(info.fingerprint(), info.signatures, (untrusted, trusted))
        expected = {"unsigned": None, "untrusted": untrusted}.get(cache, trusted)
        assert signer == expected


def test_a_signature_covers_each_field_of_the_fingerprint(caches: Caches) -> None:
    info = caches.narinfo("xz", "tree")
    key = PublicKey.parse(caches.trusted.public)
    assert signed_by(info.fingerprint(), info.signatures, (key,)) == key
    other = caches.paths["other"]
    for changed in (
        NarInfo(other, info.url, info.compression, info.nar_sha256, info.nar_size),
        NarInfo(info.store_path, info.url, info.compression, bytes(32), info.nar_size),
        NarInfo(info.store_path, info.url, info.compression, info.nar_sha256, info.nar_size + 1),
        NarInfo(
            info.store_path, info.url, info.compression, info.nar_sha256, info.nar_size, (other,)
        ),
    ):
        assert signed_by(changed.fingerprint(), info.signatures, (key,)) is None
    # A key of the same name with other bytes verifies nothing.
    impostor = PublicKey(key.name, PublicKey.parse(caches.untrusted.public).key)
    assert signed_by(info.fingerprint(), info.signatures, (impostor,)) is None


def _narinfo_text(caches: Caches, **replace: str | None) -> str:
    lines = caches.narinfo_path("xz", "tree").read_text().splitlines()
    out = []
    for line in lines:
        key = line.partition(":")[0]
        if key in replace:
            value = replace.pop(key)
            if value is not None:
                out.append(f"{key}: {value}")
        else:
            out.append(line)
    out += [f"{k}: {v}" for k, v in replace.items() if v is not None]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"StorePath": None}, "StorePath is missing"),
        ({"NarHash": None}, "NarHash is missing"),
        ({"StorePath": "/nix/store/not-a-store-path"}, "StorePath"),
        ({"StorePath": "/elsewhere/3fsiffqxq3p0v1zw7v77xxp7dgvx7iip-x"}, "StorePath"),
        ({"URL": "../../etc/passwd"}, "not a relative path"),
        ({"URL": "/nar/x.nar"}, "not a relative path"),
        ({"URL": "http://elsewhere/x.nar"}, "not a relative path"),
        ({"Compression": "lz4"}, "not supported"),
        ({"NarHash": "md5:abc"}, "expected sha256"),
        ({"NarHash": "sha256:" + "z" * 52}, "cannot decode"),
        ({"NarSize": "-1"}, "not a size"),
        ({"NarSize": str(2**64)}, "out of range"),
        ({"FileSize": "12x"}, "not a size"),
        ({"Sig": "nocolon"}, "expected NAME:BASE64"),
        ({"Sig": "name:AAAA"}, "3 bytes, expected 64"),
        ({"References": "not-a-path"}, "References"),
    ],
)
def test_bad_narinfos_are_validation_errors(
    caches: Caches, change: dict[str, str | None], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        NarInfo.parse(_narinfo_text(caches, **change))


def test_lenient_where_nix_and_caches_are(caches: Caches) -> None:
    info = NarInfo.parse(
        _narinfo_text(
            caches,
            Compression=None,  # Nix's default: bzip2
            References="",
            Deriver="unknown-deriver",  # unsigned metadata: left out, not refused
            CA="fixed:git:sha1:" + "0" * 40,  # a kind castore has no type for
            System="x86_64-linux",
            Unknown="field",
        )
    )
    assert info.compression == "bzip2"
    assert info.deriver is None and info.ca is None and info.references == ()
    hex_hash = NarInfo.parse(_narinfo_text(caches, NarHash="sha256:" + info.nar_sha256.hex()))
    assert hex_hash.nar_sha256 == info.nar_sha256
    drv = "0" * 32 + "-x.drv"
    assert NarInfo.parse(_narinfo_text(caches, Deriver=drv)).deriver is not None
    text = _narinfo_text(caches).replace("\nReferences: \n", "\nReferences:\n")
    assert NarInfo.parse(text).references == ()
    assert nixbase32.encode(info.nar_sha256) in info.fingerprint().decode()


# -- addresses ----------------------------------------------------------------------------


GOOD_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


def test_nix_cache_addresses() -> None:
    addr = parse_address(
        f"nix+https://cache.example/sub/dir?trusted-public-keys={GOOD_KEY}", PATH_INFO_SCHEMES
    )
    assert addr.url == "https://cache.example/sub/dir/"
    assert addr.public_keys == (GOOD_KEY,)
    two = parse_address(
        f"nix+http://[::1]:8080?trusted-public-keys={GOOD_KEY}%20other-1:{GOOD_KEY.split(':')[1]}",
        PATH_INFO_SCHEMES,
    )
    assert two.url == "http://[::1]:8080/" and two.public_keys is not None
    assert len(two.public_keys) == 2
    plus = GOOD_KEY.replace("6N", "+N")  # base64's `+` stays a `+`
    assert parse_address(
        f"nix+https://h?trusted-public-keys={plus}", PATH_INFO_SCHEMES
    ).public_keys == (plus,)
    unsigned = parse_address("nix+file:///srv/cache/", PATH_INFO_SCHEMES)
    assert (unsigned.url, unsigned.public_keys) == ("/srv/cache/", None)


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("nix+ftp://host", "unsupported scheme 'nix+ftp'"),
        ("nix+https://", "the host is missing"),
        ("nix+http:///path", "the host is missing"),
        ("nix+https://h?trusted-public-keys=", "trusted-public-keys is empty"),
        ("nix+https://h?trusted-public-keys=nocolon", "expected NAME:BASE64"),
        ("nix+https://h?trusted-public-keys=k:AAAA", "3 bytes, expected 32"),
        ("nix+https://h?trusted-public-keys=k:!!", "not base64"),
        ("nix+https://h?secret-key=x", "unknown parameter 'secret-key'"),
        ("nix+https://user:pw@h", "credentials"),
        ("nix+https://h:99999", "Port out of range"),
        ("nix+file://host/dir", "no host"),
        ("nix+file:relative", "expected <scheme>://"),
    ],
)
def test_bad_nix_cache_addresses(addr: str, message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)):
        parse_address(addr, PATH_INFO_SCHEMES)


def test_a_nix_cache_is_no_blob_or_directory_service() -> None:
    with pytest.raises(AddressError, match=re.escape("unsupported scheme 'nix+https' here")):
        Store.from_addrs("nix+https://h", "memory://", "memory://")


# -- services failing, memory ----------------------------------------------------------------


class _Discarding(BlobService):
    """Hashes what it is given and keeps nothing (or fails every put, when told)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.received = 0

    async def has(self, digest: B3Digest) -> bool:
        return False

    async def _open_raw(self, digest: B3Digest) -> BlobReader | None:
        return None

    async def open_write(self) -> BlobWriter:
        service = self

        class Writer(BlobWriter):
            hasher = blake3.blake3()

            async def write(self, data: bytes) -> None:
                if service.fail:
                    raise StoreError("the blob service is broken")
                service.received += len(data)
                self.hasher.update(data)

            async def close(self) -> B3Digest:
                return B3Digest(self.hasher.digest())

        return Writer()


async def test_a_failing_blob_service_is_a_store_error_and_stores_no_directory(
    small_nar: bytes,
) -> None:
    store = memory_store()
    with pytest.raises(StoreError, match="broken"):
        await ingest_nar(_Discarding(fail=True), store.directories, blocks_of(small_nar, 64))
    assert not stored_directories(store)


async def test_a_big_nar_streams_in_bounded_memory() -> None:
    """A 256 MiB file is never held: what Python allocates at once stays a few
    blocks, whatever the NAR's size."""
    size = 256 << 20
    piece = bytes(range(256)) * 4096  # 1 MiB
    header = NAR_MAGIC + OPEN + TYPE + REGULAR + CONTENTS + size.to_bytes(8, "little")

    class Pieces(NarSource):
        def __init__(self) -> None:
            self._pieces = iter([header, *([piece] * (size // len(piece))), CLOSE])

        def read(self) -> bytes:
            return next(self._pieces, b"")

    blobs = _Discarding()
    tracemalloc.start()
    try:
        ingested = await ingest_nar(blobs, memory_store().directories, Pieces())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blobs.received == size
    assert ingested.nar_size == len(header) + size + len(CLOSE)
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB allocated at once"


class _Stalled(NarSource):
    """A download that sent the NAR's start and then nothing, until interrupted."""

    def __init__(self, start: bytes) -> None:
        self._start: bytes | None = start
        self.interrupted = threading.Event()
        self.closed = threading.Event()

    def read(self) -> bytes:
        if self._start is not None:
            start, self._start = self._start, None
            return start
        self.interrupted.wait()
        raise BackendUnavailable("interrupted")

    def interrupt(self) -> None:
        self.interrupted.set()

    def close(self) -> None:
        self.closed.set()


async def test_cancelled_from_outside_it_interrupts_the_source_and_its_thread_ends(
    small_nar: bytes,
) -> None:
    source = _Stalled(small_nar[:100])
    with trio.move_on_after(0.2) as scope:
        await ingest_nar(memory_store().blobs, memory_store().directories, source)
    assert scope.cancelled_caught
    assert source.interrupted.is_set()
    # The thread's read fails once interrupted, and it closes the source.
    assert await trio.to_thread.run_sync(source.closed.wait, 10)


async def test_a_failing_store_stops_the_thread_and_closes_the_source(small_nar: bytes) -> None:
    class Endless(NarSource):
        """A well-formed start, then a large file that never ends."""

        def __init__(self) -> None:
            self.closed = threading.Event()
            self._header = (
                NAR_MAGIC + OPEN + TYPE + REGULAR + CONTENTS + (1 << 40).to_bytes(8, "little")
            )

        def read(self) -> bytes:
            header, self._header = self._header, b""
            return header or bytes(1 << 20)

        def close(self) -> None:
            self.closed.set()

    source = Endless()
    with pytest.raises(StoreError, match="broken"):
        await ingest_nar(_Discarding(fail=True), memory_store().directories, source)
    assert await trio.to_thread.run_sync(source.closed.wait, 10)
