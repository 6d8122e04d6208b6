"""Listings without attributes (plain READDIR; the mount option
plain_listings, third_party/pyfuse3/04-plain-readdir.patch): a directory of
many kernel buffers, listed with nothing stat'ed, names every entry with its
type and its inode number as stat gives it, and leaves nothing behind once
the kernel forgets it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.mounting import (
    KERNEL_CACHES,
    Mount,
    assert_everything_forgotten,
    backing_store,
    mounted,
)
from tvix_mountd.workers.filesystem import PLAIN_LISTINGS

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not PLAIN_LISTINGS, reason="needs the pyfuse3 patch set (setup.sh)"),
    # Each test lets the kernel forget (drop_caches) or relies on it keeping.
    pytest.mark.xdist_group(KERNEL_CACHES),
]

# The mount option that lets the kernel list without attributes.
PLAIN: Final = ("--plain-listings", "true")
# Many kernel buffers' worth: a readdirplus buffer holds ~200 of these.
WIDE: Final = 1500


def _wide_source(root: Path) -> Path:
    """Every kind of entry, interleaved: files, executables, empty files,
    symlinks and directories (some of them the same content twice)."""
    root.mkdir(parents=True)
    for i in range(WIDE):
        path = root / f"e{i:05d}"
        match i % 5:
            case 0:
                path.mkdir()
                if i % 10:
                    (path / "inside").write_bytes(b"x\n")
            case 1:
                path.symlink_to(f"e{i - 1:05d}")
            case 2:
                path.write_bytes(b"")
            case 3:
                path.write_bytes(f"{i}\n".encode())
                path.chmod(0o755)
            case _:
                path.write_bytes(f"file {i}\n".encode())
    return root


@pytest.fixture
def wide(tmp_path: Path) -> Iterator[tuple[Mount, Path, Path]]:
    """A mount of one store path holding the wide directory: (mount, the
    directory in it, its source)."""
    source = _wide_source(tmp_path / "src" / "wide")
    with backing_store("embedded", tmp_path / "store") as store:
        (info,) = store.import_paths([source])
        with mounted(store.addrs, tmp_path, extra_args=PLAIN) as mount:
            yield mount, mount.path / info.store_path.basename, source


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode) else "file"


def test_every_entry_has_its_type_and_the_number_stat_gives(
    wide: tuple[Mount, Path, Path],
) -> None:
    mount, directory, source = wide
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # keeps it (and its listing) cached
    try:
        with os.scandir(directory) as entries:
            # Types from the listing alone (d_type): nothing is stat'ed yet.
            listed = {
                e.name: (
                    "dir"
                    if e.is_dir(follow_symlinks=False)
                    else "link"
                    if e.is_symlink()
                    else "file",
                    e.inode(),
                )
                for e in entries
            }
        expected = {p.name: _kind(p.lstat().st_mode) for p in source.iterdir()}
        assert {name: kind for name, (kind, _) in listed.items()} == expected
        numbers = {name: number for name, (_, number) in listed.items()}
        # Then stat'ed: the same number for every entry, listed with
        # attributes or without.
        assert {name: os.lstat(directory / name).st_ino for name in numbers} == numbers
        # And after the kernel forgot the entries' inodes, and new lookups
        # took numbers that were freed, the listing it kept still agrees.
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        for inside in source.glob("*/inside"):
            os.lstat(directory / inside.relative_to(source))
        again = {e.name: e.inode() for e in os.scandir(directory)}
        assert again == numbers
        assert {name: os.lstat(directory / name).st_ino for name in again} == numbers
    finally:
        os.close(fd)
    assert mount.alive(), mount.log()


def test_every_number_a_listing_took_is_given_back_once_the_kernel_forgets(
    wide: tuple[Mount, Path, Path],
) -> None:
    mount, directory, _ = wide
    assert len(os.listdir(directory)) == WIDE  # mostly without attributes
    assert_everything_forgotten(mount)


def test_root_entries_listed_without_attributes_are_named_by_a_live_inode(
    tmp_path: Path,
) -> None:
    # The root's listing is not the kernel's to keep (store paths may be
    # added), so its entries are not held: one listed without attributes
    # is named by its inode's number if it has one.
    source = tmp_path / "src" / "one-file"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"the same content under every name\n")
    with backing_store("embedded", tmp_path / "store") as store:
        (info,) = store.import_paths([source])
        extra = store.add_renamed(info, [f"root-entry-{i:04d}" for i in range(WIDE)])
        names = {i.store_path.basename for i in [info, *extra]}
        with mounted(store.addrs, tmp_path, list_root=True, extra_args=PLAIN) as mount:
            fd = os.open(mount.path / info.store_path.basename, os.O_RDONLY)  # keeps its inode
            try:
                number = os.fstat(fd).st_ino
                with os.scandir(mount.path) as entries:
                    listed = {e.name: e.inode() for e in entries}
            finally:
                os.close(fd)
            assert listed.keys() == names
            assert set(listed.values()) == {number}  # one content: one number
