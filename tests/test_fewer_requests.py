"""Fewer requests per file: what the kernel no longer asks the daemon, counted
at the daemon (its /metrics, through the supervisor), on a real mount."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.mounting import KERNEL_CACHES
from tests.supervising import DaemonRequests, World, parse_metrics, sample, world
from tvix_mountd.workers.filesystem import PLAIN_LISTINGS, READS_WITHOUT_OPEN

# Counting what the kernel does not ask because it caches: not alongside a
# test that drops the kernel's caches (machine-wide).
pytestmark = [pytest.mark.fuse, pytest.mark.xdist_group(KERNEL_CACHES)]


def _served(
    tmp_path: Path, files: int, plain_listings: bool = False, read_ahead: bool = True
) -> Iterator[tuple[World, DaemonRequests]]:
    with world(tmp_path, mounts=("a",), trees=1, files=files) as w:
        w.svc.mount_entry("a")["plain_listings"] = plain_listings
        w.svc.mount_entry("a")["read_ahead"] = read_ahead
        w.svc.write_config()
        w.svc.start()
        yield w, DaemonRequests(w.svc, "a", w.path("a"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    yield from _served(tmp_path, files=4)


@pytest.fixture
def many_files(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    yield from _served(tmp_path, files=24)


@pytest.mark.skipif(not READS_WITHOUT_OPEN, reason="needs the pyfuse3 patch set (setup.sh)")
def test_files_are_read_without_open_or_release_requests(
    served: tuple[World, DaemonRequests],
) -> None:
    w, requests = served
    directory = w.path("a") / "dir0"
    source = w.sources[w.names[0]] / "dir0"
    # Named from the source: after a listing of the mount, files read in
    # name order would be stored ahead, and send no READ at all.
    files = sorted(p for p in os.listdir(source) if p.startswith("file"))
    assert len(files) >= 3
    first = requests.during(lambda: (directory / files[0]).read_bytes())
    assert first["open"] <= 1 and first["release"] == 0, first  # answered ENOSYS, once
    rest = requests.during(lambda: [(directory / name).read_bytes() for name in files[1:]])
    assert rest["open"] == 0 and rest["release"] == 0, rest
    assert rest["read"] >= len(files) - 1, rest  # the contents did come from the daemon
    _assert_read_as_the_source(directory, source, files)


def test_after_a_listing_files_read_in_name_order_are_stored_ahead_and_send_no_read(
    many_files: tuple[World, DaemonRequests],
) -> None:
    w, requests = many_files
    directory = w.path("a") / "dir0"
    source = w.sources[w.names[0]] / "dir0"
    names = sorted(os.listdir(directory))  # the kernel holds an inode for each now
    assert len(names) == 24

    def read(name: str) -> bytes:
        return (directory / name).read_bytes()

    # Two files read in name order: the next ones are read ahead, checked,
    # and stored into the kernel's page cache (notify_store), from threads;
    # all but the directory's last file, kept for its READ (which says that
    # the directory was read to its end: a walk may go on to the next).
    first = requests.during(lambda: [read(name) for name in names[:2]])
    assert first["read"] == 2, first
    stored = names[2:-1]
    w.svc.wait_for(
        lambda: all(fully_cached(directory / name) for name in stored),
        "the next files in the page cache",
    )
    # Then reading them sends nothing at all, and gives the source's bytes.
    cached: list[tuple[str, int, int]] = []

    def read_stored() -> None:
        for name in stored:
            # Said on failure: a file whose pages went between the wait and
            # its read, or none (a READ from elsewhere). Seen once, unexplained.
            cached.append((name, *cached_pages(directory / name)))
            read(name)

    counts = requests.during(read_stored)
    assert counts["read"] == 0 and counts["lookup"] == 0 and counts["open"] == 0, (
        counts,
        [entry for entry in cached if entry[1] != entry[2]],
    )
    assert requests.during(lambda: read(names[-1]))["read"] == 1
    _assert_read_as_the_source(directory, source, names)
    # /metrics says what the read-ahead did.
    w.svc.wait_for(
        lambda: (_read_ahead(w, "stored") or 0) >= len(stored), "the stored files in /metrics"
    )
    assert (_read_ahead(w, "read") or 0) >= len(stored)


@pytest.fixture
def walked_tree(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    with world(tmp_path, mounts=("a",), trees=1, files=6, subdirs=3, links=4) as w:
        w.svc.start()
        yield w, DaemonRequests(w.svc, "a", w.path("a"))


def test_a_walk_that_reads_what_it_lists_has_the_next_directory_stored_from_its_listing(
    walked_tree: tuple[World, DaemonRequests],
) -> None:
    """A copy (os.walk reading each file it lists): once a directory was read
    to its last file (symlinks named after it), the next directory listed has
    its files read ahead from the listing and stored, before any of them is
    read, but its last file (kept for its READ: the sign that the walk goes
    on reading what it lists); reading them sends a READ for each file not
    stored and for no other."""
    w, requests = walked_tree
    root = w.path("a")
    source = w.sources[w.names[0]]

    def files_listed(directory: str) -> list[str]:
        names = sorted(os.listdir(root / directory))  # readdirplus from its first entry
        assert names[-1].startswith("link")  # the directory does not end with a file
        return [name for name in names if name.startswith("file")]

    first = files_listed("dir0")
    for name in first:
        (root / "dir0" / name).read_bytes()
    read_ahead = len(first) - 2  # dir0's files after its first two READs
    for directory in ("dir1", "dir2"):
        files = files_listed(directory)
        paths = [root / directory / name for name in files]
        # Every file read ahead from the listing (checked; the last one kept).
        read_ahead += len(files)
        w.svc.wait_for(
            functools.partial(_read_ahead_reached, w, read_ahead),
            f"{directory}'s files read ahead from its listing",
        )
        # Stored into the page cache, but those whose store came before
        # the kernel made their inodes (it makes them as the caller reads
        # the listing's reply, after the daemon sent it: a race a busy
        # machine shows); those are kept in memory for their READs.
        stored = [path for path in paths[:-1] if fully_cached(path)]
        assert stored, directory
        counts = requests.during(functools.partial(_read_all, paths))
        assert counts["read"] == len(paths) - len(stored), (directory, len(stored), counts)
        assert counts["lookup"] == 0, (directory, counts)
        _assert_read_as_the_source(root / directory, source / directory, files)


def _read_ahead_reached(w: World, files: int) -> bool:
    return (_read_ahead(w, "read") or 0) >= files


def _read_all(paths: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def _read_ahead(w: World, outcome: str) -> float | None:
    found = parse_metrics(w.svc.http("/metrics")[1])
    return sample(found, "tvix_mountd_files_read_ahead_total", mount="a", outcome=outcome)


@pytest.fixture
def without_read_ahead(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    yield from _served(tmp_path, files=24, read_ahead=False)


def test_with_read_ahead_off_every_file_sends_its_read(
    without_read_ahead: tuple[World, DaemonRequests],
) -> None:
    """`read_ahead = false`: after a listing, files read in name order are
    not stored ahead; each one's READ comes to the daemon."""
    w, requests = without_read_ahead
    directory = w.path("a") / "dir0"
    source = w.sources[w.names[0]] / "dir0"
    names = sorted(os.listdir(directory))  # the kernel holds an inode for each
    counts = requests.during(lambda: [(directory / name).read_bytes() for name in names])
    assert counts["read"] == len(names), counts
    _assert_read_as_the_source(directory, source, names)
    assert _read_ahead(w, "read") is None


def test_files_read_without_a_listing_are_not_stored_ahead(
    many_files: tuple[World, DaemonRequests],
) -> None:
    # Their inodes do not exist in the kernel yet: read ahead into memory
    # only, and each one's READ is answered from there.
    w, requests = many_files
    directory = w.path("a") / "dir1"
    source = w.sources[w.names[0]] / "dir1"
    names = sorted(os.listdir(source))
    counts = requests.during(lambda: [(directory / name).read_bytes() for name in names])
    assert counts["read"] == len(names), counts
    assert all(fully_cached(directory / name) for name in names)
    _assert_read_as_the_source(directory, source, names)


def _assert_read_as_the_source(directory: Path, source: Path, names: list[str]) -> None:
    for name in names:
        assert (directory / name).read_bytes() == (source / name).read_bytes(), name


def fully_cached(path: Path) -> bool:
    cached, pages = cached_pages(path)
    return cached == pages


def cached_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages it has), without reading it:
    mmap and mincore(2), through libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // mmap.PAGESIZE)
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
            return sum(b & 1 for b in vector.raw), pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def test_a_miss_in_a_store_path_is_asked_once_and_one_in_the_root_every_time(
    served: tuple[World, DaemonRequests],
) -> None:
    w, requests = served
    inside = w.path("a") / "dir0" / "no-such-file.so"
    in_root = w.svc.mountpoint("a") / ("0" * 32 + "-not-yet")

    os.stat(inside.parent)  # its directory known, to count only the misses

    def miss(path: Path, times: int) -> None:
        for _ in range(times):
            with pytest.raises(FileNotFoundError) as info:
                os.stat(path)
            assert info.value.errno == errno.ENOENT

    assert requests.during(lambda: miss(inside, 1))["lookup"] == 1
    assert requests.during(lambda: miss(inside, 5))["lookup"] == 0
    assert requests.during(lambda: miss(in_root, 3))["lookup"] == 3


@pytest.fixture
def wide_directories(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    yield from _served(tmp_path, files=WIDE, plain_listings=True)


@pytest.fixture
def wide_directories_plus_only(tmp_path: Path) -> Iterator[tuple[World, DaemonRequests]]:
    yield from _served(tmp_path, files=WIDE)


# Entries in a directory: many kernel buffers' worth (a readdirplus buffer
# of 32 KiB holds ~200 of these names).
WIDE: Final = 1500


@pytest.mark.skipif(not PLAIN_LISTINGS, reason="needs the pyfuse3 patch set (setup.sh)")
def test_a_listing_nobody_stats_comes_without_attributes(
    wide_directories: tuple[World, DaemonRequests],
) -> None:
    listing, stats = _list_then_stat(*wide_directories)
    assert listing["lookup"] == 0, listing
    # Only the first buffer came with attributes (and an inode per entry):
    # the kernel looks the others up when they are stat'ed afterwards.
    assert WIDE // 2 < stats["lookup"] < WIDE, stats


def test_without_plain_listings_every_listing_comes_with_attributes(
    wide_directories_plus_only: tuple[World, DaemonRequests],
) -> None:
    # The mount option's default: the kernel builds an inode per entry
    # listed, and nothing stat'ed afterwards needs a lookup.
    _, stats = _list_then_stat(*wide_directories_plus_only)
    assert stats["lookup"] == 0, stats


@pytest.mark.skipif(not PLAIN_LISTINGS, reason="needs the pyfuse3 patch set (setup.sh)")
def test_a_reload_that_turns_plain_listings_on_mounts_again(
    wide_directories_plus_only: tuple[World, DaemonRequests],
) -> None:
    # The kernel agrees on listings without attributes once per connection
    # (INIT): a new worker on the live mount could not change it.
    w, requests = wide_directories_plus_only
    w.svc.mount_entry("a")["plain_listings"] = True
    w.svc.write_config()
    done = w.svc.cli("reload", "--config", str(w.svc.config_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["restarted a"], done.stdout
    w.svc.wait_for(
        lambda: [m["state"] for m in w.svc.status()["mounts"]] == ["serving"],
        "the mount serving again",
    )
    _, stats = _list_then_stat(w, requests)
    assert WIDE // 2 < stats["lookup"] < WIDE, stats


def _list_then_stat(
    w: World, requests: DaemonRequests
) -> tuple[dict[str, float], dict[str, float]]:
    """List a wide directory, then stat every entry: the requests each
    caused (the directory itself looked up before either)."""
    directory = w.path("a") / "dir0"
    os.stat(directory)
    names: list[str] = []
    listing = requests.during(lambda: names.extend(os.listdir(directory)))
    assert len(names) == WIDE, len(names)
    stats = requests.during(lambda: [os.lstat(directory / name) for name in names])
    return listing, stats


@pytest.mark.skipif(not PLAIN_LISTINGS, reason="needs the pyfuse3 patch set (setup.sh)")
def test_a_listing_stated_as_it_goes_keeps_its_attributes(
    wide_directories: tuple[World, DaemonRequests],
) -> None:
    # `ls -l`, `find -printf %s`, `du`: each entry stat'ed as it is listed.
    # The kernel then asks for attributes with every buffer: no lookups.
    w, requests = wide_directories
    directory = w.path("a") / "dir1"
    os.stat(directory)

    def list_and_stat() -> int:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if entry.stat(follow_symlinks=False).st_size)

    seen: list[int] = []
    counts = requests.during(lambda: seen.append(list_and_stat()))
    assert seen == [WIDE] and counts["lookup"] == 0, counts
