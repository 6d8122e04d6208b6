"""The nix+ path-info service against binary caches made by Nix, served over HTTP.

Each test opens a store whose path infos come from a `CacheServer` on
127.0.0.1 (or a cache directory, for nix+file://) and whose blobs and
directories are local, and checks what a lookup returns, what the server
saw, and what the local store kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.nixcache import (
    COMPRESSIONS,
    NIX_FEATURES,
    Caches,
    CacheServer,
    Fault,
    build_caches,
    requires_nix,
    resign_with_references,
)
from tvix_mountd.castore import nixbase32
from tvix_mountd.castore.blobs import localdir
from tvix_mountd.castore.errors import AddressError, BackendUnavailable, StoreError
from tvix_mountd.castore.importer import write_nar
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.store import Store
from tvix_mountd.castore.storepath import StorePath

pytestmark = requires_nix


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Caches:
    return build_caches(tmp_path_factory.mktemp("nixcache"))


@pytest.fixture
def cache_dir(caches: Caches, tmp_path: Path) -> Path:
    """A private copy of the xz cache, for a test to change."""
    return caches.copy("xz", tmp_path / "cache")


@pytest.fixture
def server(cache_dir: Path) -> Iterator[CacheServer]:
    with CacheServer(cache_dir) as server:
        yield server


def open_store(path_info_addr: str, local: Path | None = None, timeout: float = 5.0) -> Store:
    """A store fed by the cache at `path_info_addr`: embedded under `local`, else memory://."""
    if local is None:
        return Store.from_addrs("memory://", "memory://", path_info_addr, timeout=timeout)
    return Store.from_addrs(
        f"raw+file://{local}/blobs",
        f"sqlite://{local}/directories.sqlite",
        path_info_addr,
        timeout=timeout,
    )


async def nar_sha256(store: Store, info: PathInfo) -> bytes:
    sha = hashlib.sha256()
    size, digest = await write_nar(store, info.node, sha.update)
    assert size == info.nar_size
    return digest


async def fetch(store: Store, path: StorePath) -> PathInfo | None:
    return await store.path_infos.get(path.digest)


# -- fetching ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_each_compression_over_http(caches: Caches, compression: str) -> None:
    with CacheServer(caches.dirs[compression]) as server:
        store = open_store(server.address([caches.trusted.public]))
        try:
            for tree in ("tree", "other"):
                info = await fetch(store, caches.paths[tree])
                narinfo = caches.narinfo(compression, tree)
                assert info is not None
                assert info.store_path == caches.paths[tree]
                assert (info.nar_size, info.nar_sha256) == (narinfo.nar_size, narinfo.nar_sha256)
                assert info.signatures == narinfo.signatures
                assert info.ca == narinfo.ca
                # What the store holds renders to exactly the NAR Nix hashed.
                assert await nar_sha256(store, info) == narinfo.nar_sha256
            assert server.count(".narinfo") == 2
            assert server.nar_requests() == 2
            # Asked again: the local record answers, the cache is not asked.
            assert await fetch(store, caches.paths["tree"]) is not None
            assert (server.count(".narinfo"), server.nar_requests()) == (2, 2)
            # Two lookups, two downloads, one kept-alive connection.
            assert server.connections == 1
        finally:
            await store.aclose()


async def test_nix_file_cache_and_its_file_hash_and_size(caches: Caches, tmp_path: Path) -> None:
    # xz: its FileHash differs from the NarHash (for "none" they are one string).
    cache_dir = caches.copy("xz", tmp_path / "cache")
    store = open_store(f"nix+file://{cache_dir}?trusted-public-keys={caches.trusted.public}")
    try:
        info = await fetch(store, caches.paths["tree"])
        assert info is not None
        assert await nar_sha256(store, info) == info.nar_sha256
        # FileHash and FileSize are not signed: checked against the bytes. The
        # NAR itself is intact, so only they can catch this.
        narinfo = cache_dir / caches.narinfo_path("xz", "other").name
        text = narinfo.read_text()
        file_hash, size = (
            caches.narinfo("xz", "other").file_sha256,
            caches.narinfo("xz", "other").file_size,
        )
        assert file_hash is not None and size is not None
        encoded = nixbase32.encode(file_hash)
        zeros = nixbase32.encode(bytes(32))
        narinfo.write_text(text.replace(f"FileHash: sha256:{encoded}", f"FileHash: sha256:{zeros}"))
        with pytest.raises(StoreError, match="FileHash"):
            await fetch(store, caches.paths["other"])
        narinfo.write_text(text.replace(f"FileSize: {size}", f"FileSize: {size + 1}"))
        with pytest.raises(StoreError, match="FileSize"):
            await fetch(store, caches.paths["other"])
        narinfo.write_text(text)
        assert await fetch(store, caches.paths["other"]) is not None
    finally:
        await store.aclose()


async def test_unknown_path_is_none_and_fetches_no_nar(server: CacheServer) -> None:
    store = open_store(server.address())
    try:
        assert await store.path_infos.get(bytes(range(20))) is None
        assert server.count(".narinfo") == 1
        assert server.nar_requests() == 0
    finally:
        await store.aclose()


async def test_403_is_missing_too(caches: Caches, server: CacheServer) -> None:
    server.fault(".narinfo", Fault(status=403))
    store = open_store(server.address())
    try:
        assert await fetch(store, caches.paths["tree"]) is None
    finally:
        await store.aclose()


# -- trust --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "keys", "accepted"),
    [
        ("xz", ["trusted"], True),
        ("unsigned", ["trusted"], False),
        ("untrusted", ["trusted"], False),
        ("untrusted", ["trusted", "untrusted"], True),
        ("unsigned", None, True),
        ("untrusted", None, True),
    ],
)
async def test_signatures(
    caches: Caches,
    cache: str,
    keys: list[str] | None,
    accepted: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    named = {"trusted": caches.trusted.public, "untrusted": caches.untrusted.public}
    with CacheServer(caches.dirs[cache]) as server:
        store = open_store(server.address(None if keys is None else [named[k] for k in keys]))
        try:
            with caplog.at_level(logging.WARNING):
                info = await fetch(store, caches.paths["tree"])
            assert (info is not None) == accepted
            if not accepted:
                assert "refusing" in caplog.text and "trusted-public-keys" in caplog.text
                assert server.nar_requests() == 0
        finally:
            await store.aclose()


async def test_wrongly_signed_is_refused(
    caches: Caches, cache_dir: Path, server: CacheServer
) -> None:
    path = caches.narinfo_path("xz", "tree").name
    text = (cache_dir / path).read_text()
    name, _, signature = text.split("Sig: ", 1)[1].split("\n", 1)[0].partition(":")
    flipped = signature.replace(signature[10], "A" if signature[10] != "A" else "B", 1)
    (cache_dir / path).write_text(text.replace(f"{name}:{signature}", f"{name}:{flipped}"))
    store = open_store(server.address([caches.trusted.public]))
    try:
        assert await fetch(store, caches.paths["tree"]) is None
        assert server.nar_requests() == 0
    finally:
        await store.aclose()


async def test_narinfo_for_another_path_is_refused(
    caches: Caches, cache_dir: Path, server: CacheServer
) -> None:
    server.fault(
        caches.narinfo_path("xz", "tree").name,
        Fault(body=caches.narinfo_path("xz", "other").read_bytes()),
    )
    store = open_store(server.address([caches.trusted.public]))
    try:
        assert await fetch(store, caches.paths["tree"]) is None
    finally:
        await store.aclose()


async def test_a_name_that_is_not_the_narinfos_is_refused_before_downloading(
    caches: Caches, server: CacheServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(server.address([caches.trusted.public]))
    wrong = StorePath(caches.paths["tree"].digest, "not-" + caches.paths["tree"].name)
    try:
        with caplog.at_level(logging.WARNING):
            assert await store.path_infos.get_store_path(wrong) is None
        assert "refusing" in caplog.text
        assert server.nar_requests() == 0
        assert await store.path_infos.get_store_path(caches.paths["tree"]) is not None
        # Known now, and still not under the other name.
        assert await store.path_infos.get_store_path(wrong) is None
        assert server.nar_requests() == 1
    finally:
        await store.aclose()


async def test_references_are_kept_and_signed_as_nix_signs_them(
    caches: Caches, cache_dir: Path, server: CacheServer, tmp_path: Path
) -> None:
    """A narinfo with references, signed with our fingerprint: Nix accepts it
    (so the fingerprint is Nix's), and so do we, keeping the references."""
    resign_with_references(caches, cache_dir, "tree", ["other"])
    copied = nix_copy_from(cache_dir, caches, tmp_path / "nix-root")
    assert copied.returncode == 0, copied.stderr
    store = open_store(server.address([caches.trusted.public]))
    try:
        info = await fetch(store, caches.paths["tree"])
        assert info is not None
        assert info.references == (caches.paths["other"],)
    finally:
        await store.aclose()
    # References changed after signing: Nix refuses it, and so do we.
    narinfo = cache_dir / caches.narinfo_path("xz", "tree").name
    other, tree = caches.paths["other"].basename, caches.paths["tree"].basename
    narinfo.write_text(narinfo.read_text().replace(f"References: {other}", f"References: {tree}"))
    assert nix_copy_from(cache_dir, caches, tmp_path / "nix-root-2").returncode != 0
    store = open_store(server.address([caches.trusted.public]))
    try:
        assert await fetch(store, caches.paths["tree"]) is None
    finally:
        await store.aclose()


def nix_copy_from(cache_dir: Path, caches: Caches, to: Path) -> subprocess.CompletedProcess[str]:
    """`nix copy` of the tree out of `cache_dir` by Nix itself, trusting our key."""
    return subprocess.run(
        [
            "nix",
            *NIX_FEATURES,
            "copy",
            "--from",
            f"file://{cache_dir}",
            "--to",
            str(to),
            "--option",
            "trusted-public-keys",
            caches.trusted.public,
            caches.paths["tree"].absolute,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


# -- failures: EIO now, nothing recorded, a later lookup tries again --------------------


def nar_name(caches: Caches, tree: str, cache: str = "xz") -> str:
    return caches.narinfo(cache, tree).url.rsplit("/", 1)[1]


async def assert_recovers(store: Store, server: CacheServer, caches: Caches, local: Path) -> None:
    """Nothing was recorded by the failure; with the fault gone, the path comes."""
    assert not (local / "directories.sqlite").exists() or not _recorded(local)
    server.clear_faults()
    info = await fetch(store, caches.paths["tree"])
    assert info is not None
    assert await nar_sha256(store, info) == info.nar_sha256
    assert _recorded(local) == [caches.paths["tree"].digest]


def _recorded(local: Path) -> list[bytes]:
    with sqlite3.connect(local / "directories.sqlite") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "pathinfos" not in tables:
            return []
        return [bytes(r[0]) for r in db.execute("SELECT digest FROM pathinfos")]


@pytest.mark.parametrize(
    ("what", "fault_on", "fault", "message"),
    [
        ("corrupt NAR", "nar", "flip", "cannot decompress|sha256|NAR"),
        ("NAR cut short", "nar", Fault(cut_after=30_000), "IncompleteRead"),
        ("truncated NAR file", "nar", "truncate", "cannot decompress.*ended before"),
        ("truncated uncompressed NAR", "nar-none", "truncate", "NAR ends early"),
        # Well formed, but not the NAR its NarHash names (hashed by the
        # download's thread: an uncompressed NAR).
        ("a file changed in an uncompressed NAR", "nar-none", "content", "sha256"),
        ("reset mid-body", "nar", Fault(reset_after=30_000), "reset|aborted|Connection"),
        ("HTTP 500 for the NAR", "nar", Fault(status=500), "HTTP 500"),
        ("HTTP 500 for the narinfo", "narinfo", Fault(status=500), "HTTP 500"),
        ("HTTP 502 for the narinfo", "narinfo", Fault(status=502), "HTTP 502"),
        ("garbage narinfo", "narinfo", Fault(body=b"\xff\xfe not a narinfo"), "narinfo"),
    ],
)
async def test_failures_are_errors_nothing_is_recorded_and_a_later_lookup_works(
    caches: Caches,
    cache_dir: Path,
    server: CacheServer,
    tmp_path: Path,
    what: str,
    fault_on: str,
    fault: Fault | str,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if fault_on == "nar-none":
        # The uncompressed cache, served in place of the xz one.
        shutil.rmtree(cache_dir)
        caches.copy("none", cache_dir)
        fault_on = "nar"
        suffix = nar_name(caches, "tree", "none")
    elif fault_on == "nar":
        suffix = nar_name(caches, "tree")
    else:
        suffix = caches.narinfo_path("xz", "tree").name
    data = bytearray((cache_dir / "nar" / suffix).read_bytes() if fault_on == "nar" else b"")
    if fault == "flip":
        data[len(data) // 2] ^= 0xFF
        fault = Fault(body=bytes(data))
    elif fault == "truncate":
        fault = Fault(body=bytes(data[: len(data) // 2]))
    elif fault == "content":
        at = data.index(b"documentation ")
        data[at] = ord("D")
        fault = Fault(body=bytes(data))
    assert isinstance(fault, Fault)
    server.fault(suffix, fault)
    local = tmp_path / "local"
    store = open_store(server.address([caches.trusted.public]), local)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(StoreError, match=message):
            await fetch(store, caches.paths["tree"])
        assert caches.paths["tree"].basename[:32] in caplog.text, f"no log line for {what}"
        await assert_recovers(store, server, caches, local)
    finally:
        await store.aclose()


async def test_twenty_concurrent_lookups_one_download(caches: Caches, server: CacheServer) -> None:
    # Slow enough that all twenty ask while the download is under way.
    server.fault(nar_name(caches, "tree"), Fault(rate=(8192, 0.02)))
    store = open_store(server.address([caches.trusted.public]))
    results: list[PathInfo | None] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(lambda: _append(results, fetch(store, caches.paths["tree"])))
        assert len(results) == 20 and all(r is not None for r in results)
        assert len({r.node for r in results if r is not None}) == 1
        assert server.count(".narinfo") == 1
        assert server.nar_requests() == 1
    finally:
        await store.aclose()


async def _append(results: list[PathInfo | None], call: Awaitable[PathInfo | None]) -> None:
    results.append(await call)


async def test_slow_but_steady_download_outlasts_the_backend_timeout(
    caches: Caches, tmp_path: Path
) -> None:
    timeout = 0.5
    with CacheServer(caches.dirs["none"]) as server:
        # ~2.6 MB at 256 KiB every 0.1 s: about a second, twice the timeout.
        server.fault(nar_name(caches, "tree", "none"), Fault(rate=(256 * 1024, 0.1)))
        store = open_store(server.address(), tmp_path / "local", timeout=timeout)
        try:
            started = trio.current_time()
            info = await fetch(store, caches.paths["tree"])
            elapsed = trio.current_time() - started
            assert info is not None
            assert elapsed > 1.5 * timeout, f"the download took only {elapsed:.2f} s"
        finally:
            await store.aclose()


@pytest.mark.parametrize("where", ["narinfo", "nar"])
async def test_a_stalled_download_fails_after_the_backend_timeout(
    caches: Caches, cache_dir: Path, server: CacheServer, tmp_path: Path, where: str
) -> None:
    timeout, stall = 0.5, 20.0
    if where == "nar":
        server.fault(nar_name(caches, "tree"), Fault(stall_after=20_000, stall=stall))
    else:
        server.fault(".narinfo", Fault(stall_after=0, stall=stall))
    local = tmp_path / "local"
    store = open_store(server.address(), local, timeout=timeout)
    try:
        started = trio.current_time()
        with pytest.raises(BackendUnavailable):
            await fetch(store, caches.paths["tree"])
        elapsed = trio.current_time() - started
        assert elapsed < stall / 2, f"failed only after {elapsed:.2f} s"
        await assert_recovers(store, server, caches, local)
    finally:
        await store.aclose()


# -- remembering ------------------------------------------------------------------------


async def test_a_restart_resolves_without_the_network(
    caches: Caches, cache_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    with CacheServer(cache_dir) as server:
        address = server.address([caches.trusted.public])
        store = open_store(address, local)
        try:
            first = await fetch(store, caches.paths["tree"])
        finally:
            await store.aclose()
    # The server is gone (its port refuses connections): the record answers.
    store = open_store(address, local)
    try:
        again = await fetch(store, caches.paths["tree"])
        assert again == first
        assert again is not None and await nar_sha256(store, again) == again.nar_sha256
        listed = [info.store_path async for info in store.path_infos.list()]
        assert listed == [caches.paths["tree"]]
        with pytest.raises(BackendUnavailable):
            await fetch(store, caches.paths["other"])
    finally:
        await store.aclose()
    # Kept next to the local directory service, in its SQLite file.
    assert _recorded(local) == [caches.paths["tree"].digest]


async def test_memory_remembers_nothing(caches: Caches, server: CacheServer) -> None:
    for _ in range(2):
        store = open_store(server.address())
        try:
            assert await fetch(store, caches.paths["tree"]) is not None
        finally:
            await store.aclose()
    assert server.nar_requests() == 2


async def test_a_shared_record_does_not_bypass_the_keys(caches: Caches, tmp_path: Path) -> None:
    """A path recorded by a store that trusts no key is not served by one that
    trusts a key it is not signed with."""
    local = tmp_path / "local"
    with CacheServer(caches.dirs["unsigned"]) as server:
        store = open_store(server.address(), local)
        try:
            assert await fetch(store, caches.paths["tree"]) is not None
        finally:
            await store.aclose()
        strict = open_store(server.address([caches.trusted.public]), local)
        try:
            assert await fetch(strict, caches.paths["tree"]) is None
            assert [i async for i in strict.path_infos.list()] == []
        finally:
            await strict.aclose()


async def test_a_binary_cache_takes_no_puts(caches: Caches, server: CacheServer) -> None:
    store = open_store(server.address())
    try:
        info = await fetch(store, caches.paths["tree"])
        assert info is not None
        with pytest.raises(StoreError, match="Nix binary cache"):
            await store.path_infos.put(info)
    finally:
        await store.aclose()


# -- durability ----------------------------------------------------------------------------


async def test_a_fetched_path_is_durable_before_it_is_recorded(
    caches: Caches, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One syncfs of the local blob store per fetched path, none per file;
    # while it fails, nothing is recorded, and the next lookup tries again.
    local = tmp_path / "local"
    synced: list[str] = []
    failing = [True]

    def sync_filesystem(path: str) -> None:
        assert not (local / "directories.sqlite").exists() or not recorded(), "recorded first"
        synced.append(path)
        if failing[0]:
            raise OSError(5, "Input/output error", path)

    def no_fsync(fd: int) -> None:
        raise AssertionError("a blob write called fsync")

    def recorded() -> bool:
        with sqlite3.connect(local / "directories.sqlite") as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            return "pathinfos" in tables and bool(
                db.execute("SELECT count(*) FROM pathinfos").fetchone()[0]
            )

    monkeypatch.setattr(localdir, "sync_filesystem", sync_filesystem)
    monkeypatch.setattr(os, "fsync", no_fsync)
    cache = caches.copy("zstd", tmp_path / "cache")
    store = open_store(f"nix+file://{cache}?trusted-public-keys={caches.trusted.public}", local)
    try:
        with pytest.raises(StoreError, match="making blobs durable"):
            await fetch(store, caches.paths["tree"])
        assert synced == [f"{local}/blobs"]
        assert not recorded()
        failing[0] = False
        info = await fetch(store, caches.paths["tree"])
        assert info is not None
        assert synced == [f"{local}/blobs"] * 2
        assert recorded()
        assert await nar_sha256(store, info) == info.nar_sha256
    finally:
        await store.aclose()


# -- prefetching references ------------------------------------------------------------


async def listed(store: Store) -> set[StorePath]:
    """The paths the store's record holds (fetched so far)."""
    return {info.store_path async for info in store.path_infos.list()}


POLL: Final = 0.02
PREFETCH_DEADLINE: Final = 20.0


async def wait_until_listed(store: Store, path: StorePath) -> None:
    # Polled: the background work has no event to wait for, by design.
    with trio.fail_after(PREFETCH_DEADLINE):
        while path not in await listed(store):  # noqa: ASYNC110
            await trio.sleep(POLL)


async def test_references_are_prefetched_in_the_background_and_then_local(
    caches: Caches, cache_dir: Path, server: CacheServer, tmp_path: Path
) -> None:
    resign_with_references(caches, cache_dir, "tree", ["other"])
    tree, other = caches.paths["tree"], caches.paths["other"]
    store = open_store_prefetching(server.address([caches.trusted.public]), tmp_path / "local")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            info = await fetch(store, tree)
            assert info is not None and info.references == (other,)
            # Nobody looked `other` up: it arrives by itself.
            await wait_until_listed(store, other)
            nursery.cancel_scope.cancel()
        assert server.count(caches.narinfo_path("xz", "other").name) == 1
        assert server.nar_requests() == 2
        server.stop()
        # Local now, complete and verified: no network needed.
        other_info = await fetch(store, other)
        assert other_info is not None
        assert await nar_sha256(store, other_info) == caches.narinfo("xz", "other").nar_sha256
    finally:
        await store.aclose()


async def test_a_restart_completes_the_prefetch_of_a_closure(
    caches: Caches, cache_dir: Path, server: CacheServer, tmp_path: Path
) -> None:
    """A path fetched without prefetching (or by a process stopped before it
    prefetched) has its references fetched when a prefetching service next
    looks it up, from the local record."""
    resign_with_references(caches, cache_dir, "tree", ["other"])
    tree, other = caches.paths["tree"], caches.paths["other"]
    address = server.address([caches.trusted.public])
    first = open_store(address, tmp_path / "local")
    try:
        # No prefetching (the default): `run` has nothing to do.
        with trio.fail_after(5):
            await first.run()
        assert await fetch(first, tree) is not None
        assert await listed(first) == {tree}
    finally:
        await first.aclose()
    assert server.nar_requests() == 1

    second = open_store_prefetching(address, tmp_path / "local")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second.run)
            assert await fetch(second, tree) is not None
            await wait_until_listed(second, other)
            nursery.cancel_scope.cancel()
        # `tree` came from the local record; only `other` was downloaded.
        assert server.count(caches.narinfo_path("xz", "tree").name) == 1
        assert server.nar_requests() == 2
    finally:
        await second.aclose()


async def test_a_reference_missing_from_the_cache_harms_nothing(
    caches: Caches, cache_dir: Path, server: CacheServer, tmp_path: Path
) -> None:
    resign_with_references(caches, cache_dir, "tree", ["other"])
    other_narinfo = caches.narinfo_path("xz", "other").name
    (cache_dir / other_narinfo).unlink()
    store = open_store_prefetching(server.address([caches.trusted.public]), tmp_path / "local")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            assert await fetch(store, caches.paths["tree"]) is not None
            with trio.fail_after(PREFETCH_DEADLINE):
                while server.count(other_narinfo) == 0:  # noqa: ASYNC110
                    await trio.sleep(POLL)
            # The service goes on: the path itself is served, and lookups work.
            assert await fetch(store, caches.paths["tree"]) is not None
            assert await fetch(store, caches.paths["other"]) is None
            nursery.cancel_scope.cancel()
        assert await listed(store) == {caches.paths["tree"]}
        assert server.nar_requests() == 1
    finally:
        await store.aclose()


def open_store_prefetching(path_info_addr: str, local: Path) -> Store:
    return Store.from_addrs(
        f"raw+file://{local}/blobs",
        f"sqlite://{local}/directories.sqlite",
        path_info_addr,
        timeout=5.0,
        prefetch_references=2,
    )


def test_prefetching_is_for_binary_caches_only(tmp_path: Path) -> None:
    with pytest.raises(AddressError, match="prefetch_references applies to a Nix binary cache"):
        Store.from_addrs(
            "memory://", "memory://", f"sqlite://{tmp_path}/p.sqlite", prefetch_references=2
        )
