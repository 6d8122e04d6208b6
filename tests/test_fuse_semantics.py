"""The filesystem semantics of DESIGN.md, checked on real FUSE mounts with
ordinary system calls and tools, against the embedded store and the gRPC
test server alike (`store_kind`).

Most tests share one mount per store kind (`world`: list_root and xattrs on);
tests that need another configuration or change the store get their own.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import random
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.mounting import (
    KERNEL_CACHES,
    BackingStore,
    DirStream,
    Mount,
    assert_errno,
    assert_everything_forgotten,
    backing_store,
    errno_of,
    listdir_bytes,
    mounted,
    pinned,
    read_in_fresh_handles,
    read_with_positions,
)
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.importer import import_path
from tvix_mountd.castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.store import Store
from tvix_mountd.castore.storepath import StorePath

pytestmark = [
    pytest.mark.fuse,
]

DIR_XATTR: Final = "user.tvix.castore.directory.digest"
BLOB_XATTR: Final = "user.tvix.castore.blob.digest"
ROOT_ENTRIES: Final = 1000  # extra store paths, so the root listing streams many batches
BIG_SIZE: Final = 3 * 1024 * 1024
RANDOM_SIZE: Final = 1_000_003  # not a multiple of a page
NON_UTF8: Final = os.fsdecode(b"\xff\xfe-not-utf8")
# Every time in /nix/store is 1 s after the epoch; so is every time in a mount.
STORE_TIMES_NS: Final = (1_000_000_000,) * 3


# -- source trees -----------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _dup_dir(path: Path) -> None:
    _write(path / "a.txt", b"same content in every copy\n")
    _write(path / "b", b"\x00\x01binary\x02")
    (path / "inner").mkdir()
    _write(path / "inner" / "c", b"c\n", 0o755)


def make_sources(base: Path) -> dict[str, Path]:
    """The trees imported into every store, by the name of the test that owns them."""
    rnd = random.Random(20240601)
    tree = base / "tree"
    _write(tree / "hello.txt", b"hello world\n")
    _write(tree / "exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    _write(tree / "exec-copy-plain", b"#!/bin/sh\necho hi\n", 0o644)
    _write(tree / "group-exec-only", b"only the group may run me\n", 0o654)  # Nix: not executable
    _write(tree / "big.bin", rnd.randbytes(BIG_SIZE))
    _write(tree / "random.bin", rnd.randbytes(RANDOM_SIZE))
    _write(tree / "empty", b"")
    _write(tree / "page.bin", rnd.randbytes(4096))
    (tree / "link-to-hello").symlink_to("hello.txt")
    (tree / "link-dangling").symlink_to("/nonexistent/target")
    (tree / "link-dir").symlink_to("sub")
    _write(tree / "sub" / "nested.txt", b"nested\n")
    _write(tree / "sub" / "deeper" / "leaf.txt", b"leaf\n")
    (tree / "sub" / "deeper" / "empty-dir").mkdir()
    (tree / "sub" / "deeper" / "link-up").symlink_to("../nested.txt")
    _dup_dir(tree / "dup1")
    _dup_dir(tree / "dup2")
    for name in ("with space", "ünïcödé.txt", "-dash", ".hidden", NON_UTF8):
        _write(tree / "names" / name, name.encode("utf-8", "surrogateescape") + b"\n")

    tree2 = base / "tree2"
    _write(tree2 / "hello.txt", b"hello world\n")  # same bytes as tree/hello.txt
    _write(tree2 / "exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    (tree2 / "link-to-hello").symlink_to("hello.txt")
    _dup_dir(tree2 / "dup1")

    deep = base / "deep"
    _write(deep / "a" / "b" / "c" / "d" / "leaf", b"deep leaf\n")
    _write(deep / "a" / "b" / "c" / "other", b"other\n")
    (deep / "a" / "b" / "c" / "e").mkdir()

    single = base / "single-file"
    _write(single, b"a store path that is one file\n", 0o755)
    link = base / "single-link"
    link.symlink_to("/nix/store/somewhere-else")
    return {"tree": tree, "tree2": tree2, "deep": deep, "single-file": single, "single-link": link}


@dataclass
class Expected:
    mode: int
    size: int
    blocks: int


def _descendants(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def expected_tree(src: Path) -> dict[str, Expected]:
    """What the mount must show for every entry of `src` ("" is `src` itself),
    derived from the source alone."""

    def expect(path: Path) -> Expected:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return Expected(0o120444, len(os.readlink(path)), 0)
        if stat.S_ISDIR(st.st_mode):
            return Expected(0o040555, _descendants(path), 0)
        executable = bool(st.st_mode & stat.S_IXUSR)
        return Expected(0o100555 if executable else 0o100444, st.st_size, -(-st.st_size // 512))

    out = {"": expect(src)}
    if src.is_dir() and not src.is_symlink():
        for dirpath, dirnames, filenames in os.walk(src):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                out[str(path.relative_to(src))] = expect(path)
    return out


# -- the shared world ---------------------------------------------------------------


@dataclass
class World:
    store: BackingStore
    sources: dict[str, Path]
    infos: dict[str, PathInfo]
    root_names: set[str]
    mount: Mount

    def path(self, key: str, *parts: str) -> Path:
        return self.mount.path.joinpath(self.infos[key].store_path.basename, *parts)


@pytest.fixture(scope="module")
def world(store_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp(f"world-{store_kind}")
    sources = make_sources(base / "src")
    with backing_store(store_kind, base / "store") as store:
        keys = list(sources)
        imported = store.import_paths([sources[k] for k in keys])
        infos = dict(zip(keys, imported, strict=True))
        # The same tree under another name, and the same tree again: one content.
        (again,) = store.import_paths([sources["tree"]], names=["tree-again"])
        infos["tree-again"] = again
        (twice,) = store.import_paths([sources["tree"]])
        assert twice == infos["tree"]
        extra = store.add_renamed(
            infos["single-file"], [f"root-entry-{i:04d}" for i in range(ROOT_ENTRIES)]
        )
        names = {i.store_path.basename for i in [*infos.values(), *extra]}
        with mounted(store.addrs, base, list_root=True, show_xattr=True) as mount:
            yield World(store, sources, infos, names, mount)
            assert mount.alive(), mount.log()


# -- the root --------------------------------------------------------------------------


def test_root_attributes(world: World) -> None:
    st = os.stat(world.mount.path)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o555
    assert st.st_size == 0
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == STORE_TIMES_NS


def test_root_listing_is_complete(world: World) -> None:
    names = os.listdir(world.mount.path)
    assert len(names) == len(set(names)) == len(world.root_names) > ROOT_ENTRIES
    assert set(names) == world.root_names
    # A second listing restarts the stream and gives the same again.
    assert sorted(os.listdir(world.mount.path)) == sorted(names)

    with os.scandir(world.mount.path) as it:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it}
    assert set(kinds) == world.root_names
    assert kinds[world.infos["tree"].store_path.basename] == (True, False)
    assert kinds[world.infos["single-file"].store_path.basename] == (False, False)
    assert kinds[world.infos["single-link"].store_path.basename] == (False, True)


def test_root_listing_resumes_at_any_offset(world: World) -> None:
    full = read_with_positions(world.mount.path)
    names = [name for name, _, _ in full]
    assert {os.fsdecode(n) for n in names} == world.root_names
    rnd = random.Random(7)
    # Each seek backwards restarts the backend's stream: a few suffice.
    starts = [0, 1, 63, 64, 65, len(full) // 2, len(full) - 1, *rnd.sample(range(len(full)), 3)]
    with DirStream(world.mount.path) as stream:
        stream.read_many(200)  # a window further on: seeking back restarts the stream
        for i in starts:
            stream.seek(full[i - 1][2] if i else 0)
            assert stream.read_many(10) == names[i : i + 10], f"resumed at entry {i}"
    # Resumed in fresh handles, in chunks: every name once, in the same order.
    assert read_in_fresh_handles(world.mount.path, 257) == names


def test_root_lookups_of_bad_names_are_enoent(world: World) -> None:
    tree = world.infos["tree"].store_path
    digest_part = tree.basename.split("-", 1)[0]
    unknown = StorePath(bytes(20), "tree").basename
    bad = [
        "not-a-store-path",
        digest_part,  # no name
        digest_part + "-",  # empty name
        "e" * 32 + "-tree",  # 'e' is no nixbase32 digit
        unknown,  # parseable, not in the store
        digest_part + "-other-name",  # known digest, another name
        digest_part.upper() + "-tree",
        tree.basename + "x",
    ]
    for name in bad:
        assert_errno(errno.ENOENT, os.stat, world.mount.path / name, what=name)
    # Asking again gives the same answer, and a good name still resolves.
    assert_errno(errno.ENOENT, os.stat, world.mount.path / unknown)
    assert stat.S_ISDIR(os.stat(world.path("tree")).st_mode)
    assert_errno(errno.ENOENT, lambda: os.stat(world.path("tree", "no-such-entry")))
    assert_errno(errno.ENOTDIR, lambda: os.stat(world.path("tree", "hello.txt", "x")))


# -- attributes -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["tree", "tree2", "single-file", "single-link"])
def test_attributes_as_in_nix_store(world: World, key: str) -> None:
    expected = expected_tree(world.sources[key])
    assert len(expected) > 0
    for rel, want in expected.items():
        path = world.path(key, rel) if rel else world.path(key)
        st = os.lstat(path)
        got = Expected(st.st_mode, st.st_size, st.st_blocks)
        assert got == want, f"{rel or '.'}: mode {st.st_mode:o}, size {st.st_size}"
        assert (st.st_uid, st.st_gid) == (0, 0), rel
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == STORE_TIMES_NS, rel
    # The root node's size is the store's own size field.
    node = world.infos[key].node
    if isinstance(node, DirectoryNode):
        assert os.stat(world.path(key)).st_size == node.size == expected[""].size


def test_times_are_one_second_as_in_nix_store(world: World, tmp_path: Path) -> None:
    entries = {
        "root": world.mount.path,
        "directory": world.path("tree", "sub"),
        "store path directory": world.path("tree"),
        "file": world.path("tree", "hello.txt"),
        "executable": world.path("tree", "exec.sh"),
        "symlink": world.path("tree", "link-to-hello"),
        "store path symlink": world.path("single-link"),
    }
    for what, path in entries.items():
        st = os.lstat(path)
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == STORE_TIMES_NS, what
        assert (st.st_atime, st.st_mtime, st.st_ctime) == (1.0, 1.0, 1.0), what
    # Reading does not move atime (the mount is read-only), and a copy that
    # keeps times carries /nix/store's mtime, as rsync and tar would.
    world.path("tree", "hello.txt").read_bytes()
    assert os.stat(world.path("tree", "hello.txt")).st_atime_ns == STORE_TIMES_NS[0]
    copied = _run("cp", "-a", str(world.path("tree", "sub")), str(tmp_path / "copy"))
    assert copied.returncode == 0, copied.stderr
    assert os.stat(tmp_path / "copy" / "nested.txt").st_mtime_ns == STORE_TIMES_NS[1]
    assert os.stat(tmp_path / "copy").st_mtime_ns == STORE_TIMES_NS[1]


def test_du_counts_sizes_and_blocks(world: World) -> None:
    expected = expected_tree(world.sources["tree"])
    # Apparent sizes: file sizes, symlink target lengths and directory size fields.
    apparent = sum(e.size for e in expected.values())
    blocks = sum(e.blocks for e in expected.values())
    path = str(world.path("tree"))
    out = subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True)
    assert int(out.stdout.split()[0]) == apparent, out
    out = subprocess.run(["du", "-s", "-B1", path], check=True, capture_output=True, text=True)
    assert int(out.stdout.split()[0]) == blocks * 512, out
    out = subprocess.run(["du", "-sk", path], check=True, capture_output=True, text=True)
    assert int(out.stdout.split()[0]) == math.ceil(blocks * 512 / 1024), out


# -- reading ----------------------------------------------------------------------------


def test_read_whole_files(world: World) -> None:
    src = world.sources["tree"]
    for rel in ["hello.txt", "exec.sh", "empty", "page.bin", "big.bin", "names/" + NON_UTF8]:
        assert world.path("tree", rel).read_bytes() == (src / rel).read_bytes(), rel
    # Reading twice (the second time from the page cache) gives the same bytes.
    assert world.path("tree", "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    with open(world.path("tree", "big.bin"), "rb", buffering=0) as f:
        assert f.read(BIG_SIZE + 4096) == (src / "big.bin").read_bytes()
        assert f.read(10) == b""
    single = world.sources["single-file"].read_bytes()
    assert world.path("single-file").read_bytes() == single


def test_read_at_random_offsets(world: World) -> None:
    data = (world.sources["tree"] / "random.bin").read_bytes()
    size = len(data)
    rnd = random.Random(1234)
    cases = [
        (0, 1),
        (size - 1, 1),
        (size - 1, 4096),
        (size, 1),
        (size, 4096),
        (size + 1, 10),
        (size + 100_000, 10),
        (size - 10, 20),  # crosses the end
        (4095, 2),  # crosses a page
        (0, size + 10_000),
    ]
    cases += [
        (rnd.randrange(size + 5000), rnd.choice([1, 7, 512, 4096, 65_536, 300_000]))
        for _ in range(60)
    ]
    fd = os.open(world.path("tree", "random.bin"), os.O_RDONLY)
    try:
        # The pages are not cached yet: these reads reach the daemon at odd offsets.
        for offset, n in cases:
            assert os.pread(fd, n, offset) == data[offset : offset + n], (offset, n)
    finally:
        os.close(fd)


def test_symlinks(world: World) -> None:
    assert os.readlink(world.path("tree", "link-to-hello")) == "hello.txt"
    assert os.readlink(world.path("tree", "link-dangling")) == "/nonexistent/target"
    assert os.readlink(world.path("tree", "sub", "deeper", "link-up")) == "../nested.txt"
    assert os.readlink(world.path("single-link")) == "/nix/store/somewhere-else"
    # Followed by the kernel: reading, stat and listing through symlinks.
    assert world.path("tree", "link-to-hello").read_bytes() == b"hello world\n"
    assert world.path("tree", "sub", "deeper", "link-up").read_bytes() == b"nested\n"
    assert sorted(os.listdir(world.path("tree", "link-dir"))) == ["deeper", "nested.txt"]
    assert os.stat(world.path("tree", "link-to-hello")).st_size == len(b"hello world\n")
    assert_errno(errno.ENOENT, lambda: os.stat(world.path("tree", "link-dangling")))


def test_readlink_on_a_non_symlink_is_einval(world: World) -> None:
    for path in (world.path("tree", "hello.txt"), world.path("tree", "sub"), world.mount.path):
        assert_errno(errno.EINVAL, os.readlink, path)


def test_open_and_read_of_a_directory(world: World) -> None:
    sub = world.path("tree", "sub")
    # open(O_RDONLY) of a directory is an opendir to FUSE: it succeeds, and
    # getdents on it lists; read(2) is refused by the kernel with EISDIR.
    fd = os.open(sub, os.O_RDONLY)
    try:
        assert_errno(errno.EISDIR, os.read, fd, 100, what="read() on a directory")
        assert sorted(os.listdir(fd)) == ["deeper", "nested.txt"]
    finally:
        os.close(fd)
    fd = os.open(world.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert_errno(errno.EISDIR, os.read, fd, 100, what="read() on the root")
    finally:
        os.close(fd)
    # Opening a directory for writing: EISDIR from the VFS, before any EROFS.
    assert_errno(errno.EISDIR, os.open, sub, os.O_WRONLY, what="open(dir, O_WRONLY)")
    assert_errno(errno.EISDIR, sub.read_bytes, what="Python open(dir)")
    assert_errno(errno.ENOTDIR, lambda: os.open(world.path("tree", "hello.txt"), os.O_DIRECTORY))


# -- extended attributes ------------------------------------------------------------------


def _store_directory_digests(store: BackingStore, root: DirectoryNode) -> dict[str, str]:
    """relative path -> digest of every directory below `root`, as the store has them."""

    async def walk(s: Store) -> dict[str, str]:
        out = {}
        todo: list[tuple[str, B3Digest]] = [("", root.digest)]
        while todo:
            rel, digest = todo.pop()
            out[rel] = str(digest)
            directory = await s.directories.get(digest)
            assert directory is not None
            for name, child in directory.child_directories():
                todo.append((os.path.join(rel, os.fsdecode(name)), child.digest))
        return out

    return store.run(walk)


def test_xattrs_name_the_digests(world: World) -> None:
    root = world.infos["tree"].node
    assert isinstance(root, DirectoryNode)
    dir_digests = _store_directory_digests(world.store, root)
    expected = expected_tree(world.sources["tree"])
    checked = 0
    for rel, want in expected.items():
        path = world.path("tree", rel) if rel else world.path("tree")
        if stat.S_ISDIR(want.mode):
            name, value = DIR_XATTR, dir_digests[rel]
            other = BLOB_XATTR
        elif stat.S_ISREG(want.mode):
            data = (world.sources["tree"] / rel).read_bytes()
            name, value, other = BLOB_XATTR, str(B3Digest.of(data)), DIR_XATTR
        else:
            # Symlinks carry none; user.* xattrs on a symlink are ENODATA by the kernel.
            assert os.listxattr(path, follow_symlinks=False) == [], rel
            nofollow = functools.partial(os.getxattr, follow_symlinks=False)
            assert_errno(errno.ENODATA, nofollow, path, BLOB_XATTR, what=rel)
            continue
        assert value.startswith("b3:")
        assert os.listxattr(path) == [name], rel
        assert os.getxattr(path, name) == value.encode(), rel
        assert_errno(errno.ENODATA, os.getxattr, path, other, what=rel)
        assert_errno(errno.ENODATA, os.getxattr, path, "user.other", what=rel)
        assert_errno(errno.ENODATA, os.getxattr, path, "trusted.x", what=rel)
        checked += 1
    assert checked > 10
    assert dir_digests[""] == str(root.digest)
    # The root has no digest, so nothing to list.
    assert os.listxattr(world.mount.path) == []
    assert_errno(errno.ENODATA, lambda: os.getxattr(world.mount.path, DIR_XATTR))
    # getfattr, as an operator would use it.
    out = subprocess.run(
        ["getfattr", "--absolute-names", "-d", "-m", "-", str(world.path("tree", "hello.txt"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    hello = str(B3Digest.of(b"hello world\n"))
    assert f'{BLOB_XATTR}="{hello}"' in out.splitlines(), out


# -- inodes ---------------------------------------------------------------------------------


def test_same_content_same_inode(world: World) -> None:
    with contextlib.ExitStack() as held:

        def ino(key: str, *parts: str) -> int:
            # Held open (O_PATH): an inode the kernel forgot could come back
            # under a new number, so compare only inodes the kernel holds.
            fd = os.open(world.path(key, *parts), os.O_PATH | os.O_NOFOLLOW)
            held.callback(os.close, fd)
            return os.fstat(fd).st_ino

        # Identical directories, within a store path and across store paths.
        assert ino("tree", "dup1") == ino("tree", "dup2") == ino("tree2", "dup1")
        assert ino("tree", "dup1", "inner") == ino("tree2", "dup1", "inner")
        assert ino("tree") == ino("tree-again")
        # Identical files; identical symlinks.
        assert ino("tree", "hello.txt") == ino("tree2", "hello.txt")
        assert ino("tree", "dup1", "a.txt") == ino("tree2", "dup1", "a.txt")
        assert ino("tree", "exec.sh") == ino("tree2", "exec.sh")
        assert ino("tree", "link-to-hello") == ino("tree2", "link-to-hello")
        # The same bytes, executable and not: two files (tvix would give one inode).
        assert ino("tree", "exec.sh") != ino("tree", "exec-copy-plain")
        # Different content, different inodes; a symlink is not its target.
        distinct = [
            ino("tree", "hello.txt"),
            ino("tree", "exec-copy-plain"),
            ino("tree", "link-to-hello"),
            ino("tree", "sub"),
            ino("tree", "dup1"),
            ino("tree", "sub", "nested.txt"),
            ino("tree", "link-dir"),
            ino("tree", "empty"),
        ]
        assert len(set(distinct)) == len(distinct)
        assert 1 not in distinct  # the root's number


def _snapshot(root: Path) -> tuple[dict[str, tuple[int, int, bytes]], set[frozenset[str]]]:
    """Every entry below `root`: (mode, size, content or target), and which
    entries share an inode (as sets of paths, so numbers may differ)."""
    entries: dict[str, tuple[int, int, bytes]] = {}
    by_ino: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.fsencode(os.readlink(path))
            else:
                content = b""
            rel = os.path.relpath(path, root)
            entries[rel] = (st.st_mode, st.st_size, content)
            by_ino.setdefault(st.st_ino, set()).add(rel)
    return entries, {frozenset(paths) for paths in by_ino.values()}


@pytest.mark.xdist_group(KERNEL_CACHES)
def test_the_same_tree_after_the_kernel_forgets(world: World) -> None:
    # The daemon reuses an inode number once the kernel forgot it; after a
    # forget of everything and other entries taking the freed numbers, the
    # tree must read exactly as before, sharing exactly as before.
    before = _snapshot(world.path("tree"))
    assert len(before[0]) > 10
    # Mode 2: the kernel drops its unused dentries and inodes, and sends FORGET.
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    _snapshot(world.path("tree2"))  # new lookups, which take freed numbers
    assert _snapshot(world.path("tree")) == before
    assert world.mount.alive(), world.mount.log()


@pytest.mark.xdist_group(KERNEL_CACHES)
def test_listings_the_kernel_kept_agree_with_stat_after_it_forgets(world: World) -> None:
    # The kernel keeps a store directory's listing (d_ino included) for as
    # long as it keeps the directory, which may outlive the entries' own
    # inodes. An inode number the daemon reuses after they are forgotten
    # must not make such a listing name another file's number.
    directory = world.path("tree")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # keeps it cached
    try:
        listed = {e.name: e.inode() for e in os.scandir(directory)}
        assert {n: os.lstat(directory / n).st_ino for n in listed} == listed
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        _snapshot(world.path("tree2"))  # new lookups, which take freed numbers
        again = {e.name: e.inode() for e in os.scandir(directory)}
        assert again.keys() == listed.keys()
        now = {n: os.lstat(directory / n).st_ino for n in again}
        assert again == now
    finally:
        os.close(fd)
    assert world.mount.alive(), world.mount.log()


@pytest.mark.xdist_group(KERNEL_CACHES)
def test_every_inode_is_given_back_once_the_kernel_forgets(store_kind: str, tmp_path: Path) -> None:
    # Forget is honoured through the kernel, kept listings included: after a
    # walk and the kernel dropping its caches, the daemon holds no inode.
    sources = make_sources(tmp_path / "src")
    with backing_store(store_kind, tmp_path / "store") as store:
        (info,) = store.import_paths([sources["tree"]])
        with mounted(store.addrs, tmp_path) as mount:
            walked = _snapshot(mount.path / info.store_path.basename)
            assert len(walked[0]) > 10
            assert_everything_forgotten(mount)


def test_imported_twice_same_digests(world: World) -> None:
    tree, again = world.infos["tree"], world.infos["tree-again"]
    assert tree.node == again.node
    assert tree.store_path != again.store_path
    for rel in ["", "sub", "dup1", "hello.txt", "big.bin"]:
        a, b = world.path("tree", rel), world.path("tree-again", rel)
        assert os.listxattr(a) == os.listxattr(b)
        name = os.listxattr(a)[0]
        assert os.getxattr(a, name) == os.getxattr(b, name)


def test_listing_deep_inside_before_anything_above(world: World) -> None:
    # Nothing below the store path was looked up yet: each level is fetched
    # on the way down by the path walk alone.
    path = world.path("deep", "a", "b", "c")
    assert sorted(os.listdir(path)) == ["d", "e", "other"]
    assert os.listdir(world.path("deep", "a", "b", "c", "d")) == ["leaf"]
    assert world.path("deep", "a", "b", "c", "d", "leaf").read_bytes() == b"deep leaf\n"
    assert os.listdir(world.path("deep", "a", "b", "c", "e")) == []


# -- read only ----------------------------------------------------------------------------


def test_every_write_is_erofs(world: World) -> None:
    tree = world.path("tree")
    hello = world.path("tree", "hello.txt")
    sub = world.path("tree", "sub")
    ops = {
        "create": lambda: os.open(tree / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "create in root": lambda: os.open(world.mount.path / "new", os.O_CREAT | os.O_WRONLY),
        "create exclusive": lambda: os.open(tree / "new", os.O_CREAT | os.O_EXCL | os.O_RDONLY),
        "open for write": lambda: os.open(hello, os.O_WRONLY),
        "open read-write": lambda: os.open(hello, os.O_RDWR),
        "open append": lambda: os.open(hello, os.O_WRONLY | os.O_APPEND),
        "open truncate": lambda: os.open(hello, os.O_WRONLY | os.O_TRUNC),
        "mkdir": lambda: os.mkdir(tree / "newdir"),
        "mkdir in root": lambda: os.mkdir(world.mount.path / "newdir"),
        "mknod": lambda: os.mkfifo(tree / "fifo"),
        "symlink": lambda: os.symlink("target", tree / "newlink"),
        "link": lambda: os.link(hello, tree / "hardlink"),
        "unlink": lambda: os.unlink(hello),
        "unlink symlink": lambda: os.unlink(world.path("tree", "link-to-hello")),
        "rmdir": lambda: os.rmdir(world.path("tree", "sub", "deeper", "empty-dir")),
        "rename": lambda: os.rename(hello, tree / "renamed"),
        "rename dir": lambda: os.rename(sub, tree / "renamed-dir"),
        "rename in root": lambda: os.rename(tree, world.mount.path / "renamed"),
        "chmod": lambda: os.chmod(hello, 0o644),
        "chmod dir": lambda: os.chmod(sub, 0o755),
        "chown": lambda: os.chown(hello, 1, 1),
        "utime": lambda: os.utime(hello, (1, 1)),
        "truncate": lambda: os.truncate(hello, 0),
        "setxattr": lambda: os.setxattr(hello, "user.foo", b"x"),
        "setxattr existing": lambda: os.setxattr(hello, BLOB_XATTR, b"b3:x"),
        "removexattr": lambda: os.removexattr(hello, BLOB_XATTR),
        "setxattr dir": lambda: os.setxattr(sub, "user.foo", b"x"),
    }
    wrong = {}
    for what, op in ops.items():
        got = errno_of(op)
        if got != errno.EROFS:
            wrong[what] = "success" if got is None else errno.errorcode.get(got, str(got))
    assert wrong == {}, f"not EROFS: {wrong}"
    # Nothing changed.
    assert hello.read_bytes() == b"hello world\n"
    assert not os.path.lexists(tree / "new")


# -- tools ---------------------------------------------------------------------------------


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LC_ALL": "C"}  # messages and sorting as the assertions expect
    return subprocess.run(cmd, cwd=cwd, capture_output=True, check=False, env=env)


def test_find_tar_cp_diff_walk(world: World, tmp_path: Path) -> None:
    src, mnt = world.sources["tree"], world.path("tree")

    def find(root: Path) -> set[bytes]:
        out = _run("find", ".", "-printf", r"%p\t%y\t%s\n", cwd=root)
        assert out.returncode == 0 and out.stderr == b"", out
        lines = set(out.stdout.splitlines())
        # Directory sizes differ (the store's size field), everything else matches.
        return {line.rsplit(b"\t", 1)[0] if b"\td\t" in line else line for line in lines}

    assert find(mnt) == find(src)

    def tar_listing(root: Path) -> list[bytes]:
        tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE)
        listing = subprocess.run(["tar", "-tf", "-"], stdin=tar.stdout, capture_output=True)
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and listing.returncode == 0, listing.stderr
        return sorted(listing.stdout.splitlines())

    assert tar_listing(mnt) == tar_listing(src)

    copy = tmp_path / "copy"
    out = _run("cp", "-r", str(mnt), str(copy))
    assert out.returncode == 0, out.stderr
    out = _run("diff", "-r", "--no-dereference", str(src), str(copy))
    assert out.returncode == 0, out.stdout + out.stderr
    # cp -r keeps the modes: executables stay executable, nothing is writable.
    assert os.stat(copy / "exec.sh").st_mode & 0o777 == 0o555
    assert os.stat(copy / "hello.txt").st_mode & 0o777 == 0o444

    def walk(root: Path) -> list[tuple[str, list[str], list[str]]]:
        return sorted(
            (os.path.relpath(d, root), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(root)
        )

    assert walk(mnt) == walk(src)


# -- a mount without list_root and xattrs, on a store that grows ----------------------------


@dataclass
class PlainWorld:
    store: BackingStore
    info: PathInfo
    mount: Mount
    src: Path


@pytest.fixture(scope="module")
def plain(store_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainWorld]:
    base = tmp_path_factory.mktemp(f"plain-{store_kind}")
    src = base / "src" / "small"
    _write(src / "file", b"small file\n")
    (src / "dir").mkdir()
    with backing_store(store_kind, base / "store") as store:
        (info,) = store.import_paths([src])
        with mounted(store.addrs, base, list_root=False, show_xattr=False) as mount:
            yield PlainWorld(store, info, mount, base / "src")


def test_root_listing_without_list_root_is_eperm(plain: PlainWorld) -> None:
    assert_errno(errno.EPERM, lambda: os.listdir(plain.mount.path))
    assert_errno(errno.EPERM, lambda: os.scandir(plain.mount.path))
    assert_errno(errno.EPERM, lambda: os.open(plain.mount.path, os.O_RDONLY | os.O_DIRECTORY))
    out = _run("ls", str(plain.mount.path))
    assert out.returncode != 0 and out.stdout == b""
    assert b"Operation not permitted" in out.stderr, out.stderr
    # Names still resolve, and everything below lists.
    store_path = plain.mount.path / plain.info.store_path.basename
    assert sorted(os.listdir(store_path)) == ["dir", "file"]
    assert os.stat(plain.mount.path).st_mode & 0o777 == 0o555


def test_xattrs_switched_off(plain: PlainWorld) -> None:
    store_path = plain.mount.path / plain.info.store_path.basename
    paths = [store_path, store_path / "file", store_path / "dir", plain.mount.path]
    # The daemon answers ENOSYS; the kernel then stops asking and reports
    # EOPNOTSUPP for every later call, for every inode.
    for _ in range(2):
        for path in paths:
            assert_errno(errno.EOPNOTSUPP, os.listxattr, path)
            assert_errno(errno.EOPNOTSUPP, os.getxattr, path, BLOB_XATTR)
            assert_errno(errno.EOPNOTSUPP, os.getxattr, path, DIR_XATTR)
    out = _run("getfattr", "--absolute-names", "-d", "-m", "-", str(store_path / "file"))
    assert b"user.tvix" not in out.stdout
    assert (store_path / "file").read_bytes() == b"small file\n"


def test_store_path_added_later_appears(plain: PlainWorld) -> None:
    src = plain.src / "late"
    _write(src / "content", b"added after the mount looked for it\n")

    async def dry_run() -> PathInfo:
        store = Store(MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService())
        return await import_path(store, src)

    expected = trio.run(dry_run)
    path = plain.mount.path / expected.store_path.basename
    for _ in range(3):
        assert_errno(errno.ENOENT, lambda: os.stat(path))
        assert_errno(errno.ENOENT, lambda: os.listdir(path))
    (info,) = plain.store.import_paths([src])
    assert info.store_path == expected.store_path
    # Negative lookups are not cached, by the daemon or the kernel: it is there now.
    assert os.listdir(path) == ["content"]
    assert (path / "content").read_bytes() == b"added after the mount looked for it\n"


# -- a directory of 100,000 entries ---------------------------------------------------------

BIG_DIR_ENTRIES: Final = 100_000


def _big_directory(store: BackingStore) -> tuple[PathInfo, dict[bytes, str]]:
    blob = store.put_blob(b"x")
    empty = Directory()
    entries: list[tuple[bytes, Node]] = []
    kinds = {}
    for i in range(BIG_DIR_ENTRIES):
        name = b"entry-%06d" % i
        node: Node
        match i % 4:
            case 0:
                node, kinds[name] = empty.as_node(), "dir"
            case 1 | 2:
                node, kinds[name] = FileNode(blob, 1, i % 4 == 2), "file"
            case _:
                node, kinds[name] = SymlinkNode(b"target-%d" % i), "symlink"
        entries.append((name, node))
    directory = Directory(entries)
    store.preload_tree([empty, directory])
    info = PathInfo(
        store_path=StorePath(bytes(range(20)), "big-directory"),
        node=directory.as_node(),
        nar_size=1,
        nar_sha256=bytes(32),
    )
    store.put_path_infos([info])
    return info, kinds


def test_big_directory(store_kind: str, tmp_path: Path) -> None:
    """100,000 entries in one directory list completely, by every means, and a
    listing resumed at any offset goes on exactly where it stopped.

    On the gRPC store only the fetch (one 5 MB Directory message) and one full
    listing are checked: after the fetch, listing is the same code for both
    stores, and each further full pass costs seconds."""
    with backing_store(store_kind, tmp_path / "store") as store:
        info, kinds = _big_directory(store)
        names = sorted(kinds)
        with mounted(store.addrs, tmp_path) as mount:
            path = mount.path / info.store_path.basename
            # Pinned: a forgotten inode would drop the daemon's copy of the listing.
            with pinned(path):
                listed = listdir_bytes(path)
                assert len(listed) == BIG_DIR_ENTRIES
                assert sorted(listed) == names
                assert os.stat(path).st_size == BIG_DIR_ENTRIES  # the node's size field
                assert os.lstat(path / "entry-000001").st_mode == 0o100444
                assert os.lstat(path / "entry-000002").st_mode == 0o100555
                assert os.readlink(path / "entry-099999") == "target-99999"
                assert os.listdir(path / "entry-099996") == []
                if store_kind == "embedded":
                    _check_big_listing(path, names, kinds)


def _check_big_listing(path: Path, names: list[bytes], kinds: dict[bytes, str]) -> None:
    with os.scandir(os.fsencode(path)) as it:
        scanned = {
            e.name: "symlink" if e.is_symlink() else "dir" if e.is_dir() else "file" for e in it
        }
    assert scanned == kinds

    ls = subprocess.run(f"ls -f '{path}' | wc -l", shell=True, capture_output=True, check=True)
    # FUSE lists no "." and ".." unless the filesystem does; ours does not.
    assert int(ls.stdout) == BIG_DIR_ENTRIES

    full = read_with_positions(path)
    assert [name for name, _, _ in full] == sorted(names)  # in name order
    d_types = {"dir": 4, "file": 8, "symlink": 10}  # DT_DIR, DT_REG, DT_LNK
    assert all(d_type == d_types[kinds[name]] for name, d_type, _ in full)

    rnd = random.Random(99)
    starts = [1, 2, 24, 25, 26, 1023, 1024, 1025, BIG_DIR_ENTRIES - 1]
    starts += rnd.sample(range(1, BIG_DIR_ENTRIES), 10)
    with DirStream(path) as stream:
        stream.read_many(5000)
        for i in starts:  # backwards and forwards in one handle
            stream.seek(full[i - 1][2])
            assert stream.read_many(30) == names[i : i + 30], f"resumed at entry {i}"
        stream.seek(full[-1][2])
        assert stream.read() is None
    # Fresh handles, each resuming where the last stopped: no repeats, no gaps.
    assert read_in_fresh_handles(path, 7919) == names
