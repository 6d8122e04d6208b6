"""Binary caches made by Nix, mounted: `tvix-mountd mount` and the supervisor.

The trees read through a real FUSE mount must be the source trees, entry by
entry (executables, symlinks, empty files and directories included); a
download slower than backend_timeout but steady must not fail the kernel
request waiting on it; twenty readers of one path cause one download; a
restart resolves without the network.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Final

import pytest

from tests.mounting import (
    StoreAddrs,
    assert_errno,
    mounted,
    run_mount_expecting_failure,
    wait_until,
)
from tests.nixcache import (
    Caches,
    CacheServer,
    Fault,
    build_caches,
    requires_nix,
    resign_with_references,
    snapshot,
)
from tests.supervising import Service

pytestmark = [pytest.mark.fuse, requires_nix]

BACKEND_TIMEOUT: Final = 1.0
# The xz NAR of a test tree (~67 kB) at 4 KiB every 0.2 s: about three seconds,
# three times the backend timeout, every interval of it making progress.
SLOW_BUT_STEADY: Final = Fault(rate=(4096, 0.2))
STALL: Final = 60.0


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Caches:
    return build_caches(tmp_path_factory.mktemp("nixcache-mounts"))


def local_addrs(local: Path, path_info: str) -> StoreAddrs:
    return StoreAddrs(
        f"raw+file://{local}/blobs", f"sqlite://{local}/directories.sqlite", path_info
    )


def nar_name(caches: Caches, tree: str) -> str:
    return caches.narinfo("xz", tree).url.rsplit("/", 1)[1]


def test_mount_a_binary_cache(caches: Caches, tmp_path: Path) -> None:
    with CacheServer(caches.copy("xz", tmp_path / "cache")) as server:
        server.fault(nar_name(caches, "tree"), SLOW_BUT_STEADY)
        server.fault(nar_name(caches, "other"), Fault(stall_after=1000, stall=STALL, times=1))
        addrs = local_addrs(tmp_path / "local", server.address([caches.trusted.public]))
        with mounted(addrs, tmp_path, backend_timeout=BACKEND_TIMEOUT) as mount:
            tree = mount.path / caches.paths["tree"].basename
            started = time.monotonic()
            st = os.stat(tree)  # one kernel LOOKUP, waiting for the whole download
            waited = time.monotonic() - started
            assert waited > 2 * BACKEND_TIMEOUT, f"the download took only {waited:.2f} s"
            assert st.st_mode & 0o777 == 0o555
            assert snapshot(tree) == snapshot(caches.sources["tree"])
            hello = tree / "bin" / "hello"
            assert os.stat(hello).st_mode & 0o777 == 0o555
            assert os.stat(tree / "share" / "doc.txt").st_mode & 0o777 == 0o444
            assert server.nar_requests() == 1

            # A stalled download: EIO once it made no progress for the timeout.
            other = mount.path / caches.paths["other"].basename
            started = time.monotonic()
            assert_errno(errno.EIO, os.stat, other)
            assert time.monotonic() - started < STALL / 4
            assert "no progress" in mount.wait_for_log("no progress")
            # The mount still serves, and the next lookup tries again.
            assert snapshot(other) == snapshot(caches.sources["other"])
            assert server.nar_requests() == 3
            # Not in the cache: ENOENT.
            missing = caches.paths["tree"].basename.replace(
                caches.paths["tree"].basename[0], "0", 1
            )
            assert_errno(errno.ENOENT, os.stat, mount.path / (missing[:32] + "-missing"))


def test_mount_refuses_a_bad_cache_address_before_mounting(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for path_info, message in [
        ("nix+https://cache.example?trusted-public-keys=nokey", "expected NAME:BASE64"),
        ("nix+https:///no-host", "the host is missing"),
        ("nix+gopher://cache.example", "unsupported scheme 'nix+gopher'"),
    ]:
        assert_mount_refused(local_addrs(tmp_path / "local", path_info), mountpoint, message)


def assert_mount_refused(
    addrs: StoreAddrs, mountpoint: Path, message: str, extra_args: list[str] | None = None
) -> None:
    """`mount` exits 2 with `message` (no traceback), having mounted nothing."""
    status, log = run_mount_expecting_failure(
        addrs, mountpoint, mountpoint.parent / "bad.log", extra_args=extra_args or []
    )
    assert status == 2, log
    assert message in log and "Traceback" not in log, log
    assert not os.listdir(mountpoint)


def check_config_errors(tmp_path: Path, store: str, path_info: str, *more: str) -> str:
    """What `check-config` says (exit 2, no traceback) of one store table."""
    config = tmp_path / "bad.toml"
    config.write_text(
        f"[stores.{store}]\n"
        f'blob_service_addr = "raw+file://{tmp_path}/blobs"\n'
        f'directory_service_addr = "sqlite://{tmp_path}/dirs.sqlite"\n'
        f'path_info_service_addr = "{path_info}"\n' + "".join(f"{line}\n" for line in more)
    )
    done = subprocess.run(
        [sys.executable, "-m", "tvix_mountd.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_check_config_names_a_bad_cache_address(tmp_path: Path) -> None:
    errors = check_config_errors(
        tmp_path, "cache", "nix+https://c.example?trusted-public-keys=k:AAAA"
    )
    assert "stores.cache.path_info_service_addr" in errors
    assert "3 bytes, expected 32" in errors


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def test_supervisor_twenty_readers_of_two_mounts_one_download_metrics_and_a_restart_offline(
    caches: Caches, tmp_path: Path
) -> None:
    with (
        CacheServer(caches.copy("xz", tmp_path / "cache")) as server,
        Service(tmp_path / "svc") as svc,
    ):
        server.fault(nar_name(caches, "tree"), SLOW_BUT_STEADY)
        address = server.address([caches.trusted.public])
        svc.add_store(
            "cache", local_addrs(tmp_path / "local", address), backend_timeout=BACKEND_TIMEOUT
        )
        # Two mounts of the store: two workers, whose lookups meet in the rootcache.
        mountpoint = svc.add_mount("nix", "cache")
        other_mountpoint = svc.add_mount("nix2", "cache")
        svc.start()
        tree = mountpoint / caches.paths["tree"].basename
        expected = snapshot(caches.sources["tree"])
        results: list[object] = []

        def read(root: Path) -> None:
            try:
                results.append(snapshot(root / caches.paths["tree"].basename) == expected)
            except OSError as e:
                results.append(e)

        readers = [
            threading.Thread(target=read, args=(point,))
            for point in [mountpoint, other_mountpoint] * 10
        ]
        started = time.monotonic()
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=60)
        waited = time.monotonic() - started
        assert results == [True] * 20, results
        assert waited > 2 * BACKEND_TIMEOUT, f"the download took only {waited:.2f} s"
        # (The supervisor's health probe asks the cache for a null path too.)
        assert server.count(caches.narinfo_path("xz", "tree").name) == 1
        assert server.nar_requests() == 1

        code, metrics = svc.http("/metrics")
        assert code == 200
        cache = server.url + "/"
        assert (
            _metric(
                metrics, "tvix_mountd_nix_cache_narinfo_lookups_total", cache=cache, result="hit"
            )
            == 1
        )
        assert (
            _metric(metrics, "tvix_mountd_nix_cache_nar_downloads_total", cache=cache, result="ok")
            == 1
        )
        narinfo = caches.narinfo("xz", "tree")
        assert (
            _metric(metrics, "tvix_mountd_nix_cache_ingested_bytes_total", cache=cache)
            == narinfo.nar_size
        )
        assert (
            _metric(metrics, "tvix_mountd_nix_cache_downloaded_bytes_total", cache=cache)
            == narinfo.file_size
        )
        assert _metric(metrics, "tvix_mountd_nix_cache_ingest_seconds_count", cache=cache) == 1

        svc.signal(15)
        assert svc.wait_exit() == 0
        server.stop()
        # The cache is gone; what was fetched is remembered by the local store.
        with svc.successor() as again:
            # Not ready (the store's cache does not answer: degraded), but serving.
            again.start(wait=False)
            again.wait_for(lambda: again.states().get("nix") == "serving", "the mount to serve")
            code, body = again.readyz()
            assert code == 503 and "degraded" in body, body
            assert snapshot(tree) == expected
            assert_errno(errno.EIO, os.stat, mountpoint / caches.paths["other"].basename)
            again.signal(15)
            assert again.wait_exit() == 0


# -- prefetching references ------------------------------------------------------------


def _prefetches(svc: Service, cache: str, result: str) -> float:
    code, metrics = svc.http("/metrics")
    assert code == 200, metrics
    try:
        return _metric(
            metrics, "tvix_mountd_nix_cache_reference_prefetches_total", cache=cache, result=result
        )
    except AssertionError:
        return 0.0  # not counted yet


def test_supervisor_prefetches_the_closure_of_what_a_mount_looked_up(
    caches: Caches, tmp_path: Path
) -> None:
    cache_dir = caches.copy("xz", tmp_path / "cache")
    resign_with_references(caches, cache_dir, "tree", ["other"])
    tree, other = caches.paths["tree"], caches.paths["other"]
    with CacheServer(cache_dir) as server, Service(tmp_path / "svc") as svc:
        address = server.address([caches.trusted.public])
        svc.add_store("cache", local_addrs(tmp_path / "local", address), prefetch_references=2)
        mountpoint = svc.add_mount("nix", "cache")
        svc.start()
        assert snapshot(mountpoint / tree.basename) == snapshot(caches.sources["tree"])
        # Nothing looked `other` up; the rootcache fetches it in the background.
        cache = server.url + "/"
        svc.wait_for(
            lambda: _prefetches(svc, cache, "fetched") == 1, "the reference to be prefetched"
        )
        server.stop()
        # Local: readable with the cache gone.
        assert snapshot(mountpoint / other.basename) == snapshot(caches.sources["other"])
        assert server.nar_requests() == 2

        # A setting of the rootcache alone: the reload restarts it, and the
        # mount keeps its worker.
        worker = svc.pids()["nix"]
        svc.stores["cache"]["prefetch_references"] = 1
        svc.write_config()
        done = svc.cli("reload", "--config", str(svc.config_path))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["restarted rootcache"]
        assert svc.pids()["nix"] == worker


def test_mount_prefetches_references_too(caches: Caches, tmp_path: Path) -> None:
    cache_dir = caches.copy("zstd", tmp_path / "cache")
    resign_with_references(caches, cache_dir, "tree", ["other"])
    tree, other = caches.paths["tree"], caches.paths["other"]
    other_narinfo = caches.narinfo_path("zstd", "other").name
    with CacheServer(cache_dir) as server:
        addrs = local_addrs(tmp_path / "local", server.address([caches.trusted.public]))
        with mounted(addrs, tmp_path, extra_args=["--prefetch-references", "1"]) as mount:
            assert snapshot(mount.path / tree.basename) == snapshot(caches.sources["tree"])
            wait_until(
                lambda: server.nar_requests() == 2 and "fetched " + other.basename in mount.log(),
                20.0,
                "the reference to be prefetched",
            )
            server.stop()
            assert snapshot(mount.path / other.basename) == snapshot(caches.sources["other"])
        assert server.count(other_narinfo) == 1


def test_prefetch_is_refused_for_a_store_that_is_no_binary_cache(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    addrs = local_addrs(tmp_path / "local", f"sqlite://{tmp_path}/local/pathinfo.sqlite")
    for value, message in [
        ("2", "--prefetch-references applies to a Nix binary cache"),
        ("65", "--prefetch-references must be from 0 to 64"),
    ]:
        assert_mount_refused(addrs, mountpoint, message, ["--prefetch-references", value])
    errors = check_config_errors(
        tmp_path, "local", f"sqlite://{tmp_path}/dirs.sqlite", "prefetch_references = 4"
    )
    assert "stores.local: prefetch_references applies to a Nix binary cache" in errors
