"""Importing local trees: the store path, NAR and PathInfo Nix would make.

Every tree is checked against the real Nix (`nix-store --add` into a chroot
store under tmp_path, `nix-store --dump`, `nix-hash`), on the memory store and,
once its backends exist, on the embedded store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import shutil
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tvix_mountd.castore import importer, nixbase32
from tvix_mountd.castore.blobs import BlobWriter
from tvix_mountd.castore.blobs.memory import MemoryBlobService
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories.memory import MemoryDirectoryService
from tvix_mountd.castore.errors import IntegrityError, StoreError, ValidationError
from tvix_mountd.castore.importer import (
    CHUNK_SIZE,
    ImportSourceError,
    import_path,
    write_nar,
)
from tvix_mountd.castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
)
from tvix_mountd.castore.pathinfo import CAHashType, ContentAddress, PathInfo
from tvix_mountd.castore.pathinfos.memory import MemoryPathInfoService
from tvix_mountd.castore.store import Store
from tvix_mountd.proto import pathinfo_pb2

# --- stores ------------------------------------------------------------------

_EMBEDDED_MODULES = (
    "tvix_mountd.castore.blobs.raw",
    "tvix_mountd.castore.directories.sqlite",
)
_EMBEDDED_MISSING = [m for m in _EMBEDDED_MODULES if importlib.util.find_spec(m) is None]


@dataclass
class StoreCase:
    store: Store
    snapshot: Callable[[], object]
    """Everything stored, in a comparable form: equal snapshots, nothing new."""


def _memory_case() -> StoreCase:
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()

    def snapshot() -> object:
        return (dict(blobs.blobs), dict(dirs.directories), dict(infos.infos))

    return StoreCase(Store(blobs, dirs, infos), snapshot)


def _embedded_case(root: Path) -> StoreCase:
    pathinfo_addr = "memory://"
    if importlib.util.find_spec("tvix_mountd.castore.pathinfos.sqlite") is not None:
        pathinfo_addr = f"sqlite://{root}/pathinfo.sqlite"
    store = Store.from_addrs(
        f"raw+file://{root}/blobs",
        f"sqlite://{root}/directories.sqlite",
        pathinfo_addr,
    )

    def snapshot() -> object:
        # Schema-agnostic on purpose: every file and every table row counts.
        files = sorted(
            (str(p.relative_to(root)), p.stat().st_size)
            for p in (root / "blobs").rglob("*")
            if p.is_file()
        )
        rows = {}
        for db in sorted(root.glob("*.sqlite")):
            with sqlite3.connect(db) as conn:
                tables = [
                    r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables:
                    (count,) = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                    rows[f"{db.name}:{table}"] = count
        return files, rows

    return StoreCase(store, snapshot)


@pytest.fixture(
    params=[
        "memory",
        pytest.param(
            "embedded",
            marks=pytest.mark.skipif(
                bool(_EMBEDDED_MISSING),
                reason=f"embedded store not written yet: {', '.join(_EMBEDDED_MISSING)} missing",
            ),
        ),
    ]
)
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreCase]:
    if request.param == "memory":
        c = _memory_case()
    else:
        root = tmp_path / "embedded"
        root.mkdir()
        c = _embedded_case(root)
    try:
        yield c
    finally:
        await c.store.aclose()


def memory_store() -> Store:
    return _memory_case().store


# --- Nix -----------------------------------------------------------------------

requires_nix = pytest.mark.skipif(
    shutil.which("nix-store") is None or shutil.which("nix-hash") is None,
    reason="needs Nix (nix-store, nix-hash)",
)


@dataclass
class NixView:
    store_path: str
    nar: bytes
    nar_sha256: bytes


async def nix_view(path: Path, nix_root: Path) -> NixView:
    """What Nix makes of `path`; a chroot store keeps the real /nix/store clean."""
    add = await trio.run_process(
        ["nix-store", "--store", str(nix_root), "--add", str(path)],
        capture_stdout=True,
        capture_stderr=True,
    )
    dump = await trio.run_process(["nix-store", "--dump", str(path)], capture_stdout=True)
    nix_hash = await trio.run_process(
        ["nix-hash", "--type", "sha256", "--base32", str(path)], capture_stdout=True
    )
    return NixView(
        store_path=add.stdout.decode().strip(),
        nar=dump.stdout,
        nar_sha256=nixbase32.decode(nix_hash.stdout.decode().strip(), 32),
    )


async def nar_of(store: Store, node: Node) -> bytes:
    out = bytearray()
    size, sha256 = await write_nar(store, node, out.extend)
    assert size == len(out)
    assert sha256 == hashlib.sha256(out).digest()
    return bytes(out)


# --- trees ---------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def tree_mixed(base: Path) -> Path:
    root = base / "mixed"
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    _write(root / "hello.txt", b"hello\n")
    _write(root / "empty", b"")
    _write(root / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "owner-x-only", b"x", 0o744)
    # Group and other x bits without the owner's: Nix does not call it executable.
    _write(root / "group-other-x", b"x", 0o611)
    _write(root / "read-only", b"ro", 0o400)
    _write(root / "nested" / "deeper" / "deepest" / "leaf", b"leaf\n")
    _write(root / "nested" / "same-as-hello", b"hello\n", 0o755)
    (root / "rel-link").symlink_to("hello.txt")
    (root / "abs-link").symlink_to("/nonexistent/absolute/target")
    (root / "dangling").symlink_to("does-not-exist")
    (root / "dir-link").symlink_to("nested/deeper")
    (root / "nested" / "up-link").symlink_to("../hello.txt")
    # Two identical subtrees: one Directory, stored once.
    for twin in ("twin-a", "twin-b"):
        (root / twin / "inner").mkdir(parents=True)
        _write(root / twin / "inner" / "f", b"twin\n")
    return root


def tree_names(base: Path) -> Path:
    """Names that test quoting and the byte order NAR and castore share."""
    root = base / "names"
    root.mkdir()
    names = [
        "with space",
        "ünïcödé",
        "日本語",
        "z",
        "Z",
        "a",
        "a.b",
        "a-b",
        "a\nnewline",
        "-leading-dash",
        "key=value?",
        ".hidden",
        "..dots",
        "tab\there",
        "quote'\"",
        "x" * 255,
    ]
    for i, name in enumerate(names):
        _write(root / name, f"{i}\n".encode())
    (root / "dir with space" / "ü").mkdir(parents=True)
    _write(root / "dir with space" / "ü" / "-f", b"deep\n")
    (root / "link\nname").symlink_to("target with space/ü\nnewline")
    # Not UTF-8 at all: legal on disk and in a NAR.
    (root / os.fsdecode(b"latin1-\xe9\xff")).write_bytes(b"bytes\n")
    return root


def tree_big(base: Path) -> Path:
    root = base / "big"
    root.mkdir()
    rng = random.Random(1234)
    _write(root / "three-mib-and-a-bit", rng.randbytes(3 * CHUNK_SIZE + 3))
    _write(root / "exactly-one-chunk", rng.randbytes(CHUNK_SIZE), 0o755)
    _write(root / "two-chunks", rng.randbytes(2 * CHUNK_SIZE))
    _write(root / "chunk-minus-one", rng.randbytes(CHUNK_SIZE - 1))
    return root


def tree_deep(base: Path) -> Path:
    """Deeper than Python's default recursion limit (1000)."""
    root = base / "deep"
    root.mkdir()
    path = root
    for _ in range(1100):
        # One level at a time: pathlib's mkdir(parents=True) itself recurses.
        path = path / "d"
        path.mkdir()
    _write(path / "bottom", b"bottom\n")
    return root


def remove_tree(root: Path) -> None:
    """rmtree without recursion (Python 3.11's recurses, and so would pytest's
    cleanup, on tree_deep); also clears the read-only bits of a Nix store copy."""
    if not root.exists():
        return
    directories = []
    stack = [os.fsencode(root)]
    while stack:
        path = stack.pop()
        os.chmod(path, 0o755)
        directories.append(path)
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for path in reversed(directories):
        os.rmdir(path)


def tree_empty_dir(base: Path) -> Path:
    root = base / "empty"
    root.mkdir()
    return root


def single_file(base: Path) -> Path:
    _write(base / "file.txt", b"just a file\n")
    return base / "file.txt"


def single_executable(base: Path) -> Path:
    _write(base / "tool", b"#!/bin/sh\n", 0o700)
    return base / "tool"


def single_empty_file(base: Path) -> Path:
    _write(base / "nothing", b"")
    return base / "nothing"


def single_symlink(base: Path) -> Path:
    _write(base / "target", b"t")
    (base / "link").symlink_to("target")
    return base / "link"


def single_dangling_symlink(base: Path) -> Path:
    (base / "-dangling").symlink_to("/nowhere/at/all")
    return base / "-dangling"


TREES: dict[str, Callable[[Path], Path]] = {
    "mixed": tree_mixed,
    "names": tree_names,
    "big": tree_big,
    "deep": tree_deep,
    "empty-dir": tree_empty_dir,
    "file": single_file,
    "executable": single_executable,
    "empty-file": single_empty_file,
    "symlink": single_symlink,
    "dangling-symlink": single_dangling_symlink,
}


def _expected_root(path: Path) -> type[Node]:
    if path.is_symlink():
        return SymlinkNode
    return DirectoryNode if path.is_dir() else FileNode


# --- the comparison with Nix ------------------------------------------------------


@requires_nix
@pytest.mark.parametrize("tree", TREES)
async def test_import_matches_nix(case: StoreCase, tmp_path: Path, tree: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = TREES[tree](src)
    store = case.store
    try:
        info = await import_path(store, path)
        nix = await nix_view(path, tmp_path / "nix")
        await _check_against_nix(case, path, info, nix)
    finally:
        remove_tree(src)
        remove_tree(tmp_path / "nix")


async def _check_against_nix(case: StoreCase, path: Path, info: PathInfo, nix: NixView) -> None:
    store = case.store

    assert info.store_path.absolute == nix.store_path
    assert info.nar_size == len(nix.nar)
    assert info.nar_sha256 == hashlib.sha256(nix.nar).digest() == nix.nar_sha256
    assert await nar_of(store, info.node) == nix.nar

    assert isinstance(info.node, _expected_root(path))
    assert info.store_path.name == path.name
    assert info.references == ()
    assert info.signatures == ()
    assert info.deriver is None
    assert info.ca == ContentAddress(CAHashType.NAR_SHA256, info.nar_sha256)
    assert await store.path_infos.get(info.store_path.digest) == info
    if isinstance(info.node, DirectoryNode):
        # The whole closure is there, in an order the validator accepts.
        fetched = [d async for d in store.directories.get_recursive(info.node.digest)]
        assert fetched[0].digest == info.node.digest

    # Importing again stores nothing new and answers the same.
    before = case.snapshot()
    assert await import_path(store, path) == info
    assert case.snapshot() == before


@requires_nix
async def test_pathinfo_proto_is_what_tvix_records(tmp_path: Path) -> None:
    path = tree_mixed(tmp_path)
    store = memory_store()
    info = await import_path(store, path)
    nix = await nix_view(path, tmp_path / "nix")

    msg = info.to_proto()
    assert msg.node.WhichOneof("node") == "directory"
    assert msg.node.directory.name == nix.store_path.removeprefix("/nix/store/").encode()
    assert msg.node.directory.digest == info.node.digest  # type: ignore[union-attr]
    assert msg.narinfo.ca.type == pathinfo_pb2.NARInfo.CA.Hash.NAR_SHA256
    # tvix stores the raw digest bytes, not a printed hash.
    assert msg.narinfo.ca.digest == nix.nar_sha256
    assert msg.narinfo.nar_sha256 == nix.nar_sha256
    assert msg.narinfo.nar_size == len(nix.nar)
    assert list(msg.references) == []
    assert list(msg.narinfo.reference_names) == []
    assert list(msg.narinfo.signatures) == []
    assert not msg.narinfo.HasField("deriver")
    assert PathInfo.decode(info.encode()) == info


@requires_nix
async def test_explicit_name_only_changes_the_name(tmp_path: Path) -> None:
    # The NAR does not contain the root's name, so a renamed copy must hash
    # alike and get the path Nix gives the copy.
    original = tree_mixed(tmp_path / "one")
    copy = tmp_path / "two" / "renamed"
    shutil.copytree(original, copy, symlinks=True)
    store = memory_store()

    info = await import_path(store, original, name="renamed")
    nix = await nix_view(copy, tmp_path / "nix")

    assert info.store_path.absolute == nix.store_path
    assert info.nar_sha256 == nix.nar_sha256


# --- without Nix: a fixed vector, and the structure recorded -----------------------


async def test_known_vector(tmp_path: Path) -> None:
    # Computed with Nix 2.8 (nix-store --add, nix-hash --base32, nix-store --dump | wc -c).
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "empty").mkdir()
    _write(root / "a", b"hello\n")
    _write(root / "bin" / "run", b"#!/bin/sh\n", 0o755)
    (root / "l").symlink_to("a")

    info = await import_path(memory_store(), root)

    assert info.store_path.absolute == "/nix/store/c8rnp2l4pqz9wh1likdfg61yqnawjyqd-tree"
    assert info.nar_sha256 == nixbase32.decode(
        "0v3k20w231vz0cid0bhcyvpfkvg552wyc5ik5p2any72sdfa5hkv", 32
    )
    assert info.nar_size == 1048


async def test_castore_tree_mirrors_the_disk(case: StoreCase, tmp_path: Path) -> None:
    root = tree_mixed(tmp_path)
    store = case.store
    info = await import_path(store, root)
    assert isinstance(info.node, DirectoryNode)

    async def check(directory_node: DirectoryNode, path: Path) -> int:
        directory = await store.directories.get(directory_node.digest)
        assert directory is not None
        assert sorted(os.fsencode(n) for n in os.listdir(path)) == list(directory)
        for name, node in directory.items():
            child = path / os.fsdecode(name)
            st = child.lstat()
            match node:
                case SymlinkNode(target):
                    assert stat.S_ISLNK(st.st_mode)
                    assert target == os.fsencode(os.readlink(child))
                case FileNode(digest, size, executable):
                    assert stat.S_ISREG(st.st_mode)
                    assert size == st.st_size
                    assert executable == bool(st.st_mode & stat.S_IXUSR)
                    assert await store.blobs.read_all(digest) == child.read_bytes()
                case DirectoryNode():
                    assert await check(node, child) == node.size
        return directory.size

    assert await check(info.node, root) == info.node.size
    executables = {
        n: node.executable
        for n, node in (await _directory(store, info.node)).items()
        if isinstance(node, FileNode)
    }
    assert executables[b"run.sh"] and executables[b"owner-x-only"]
    assert not executables[b"group-other-x"] and not executables[b"hello.txt"]


async def _directory(store: Store, node: DirectoryNode) -> Directory:
    directory = await store.directories.get(node.digest)
    assert directory is not None
    return directory


async def test_dedup_within_one_tree(tmp_path: Path) -> None:
    root = tree_mixed(tmp_path)
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    store = Store(blobs, dirs, MemoryPathInfoService())
    info = await import_path(store, root)
    assert isinstance(info.node, DirectoryNode)

    top = await _directory(store, info.node)
    assert top[b"twin-a"] == top[b"twin-b"]
    # hello.txt and the executable copy share one blob (the x bit is in the node).
    nested = top[b"nested"]
    assert isinstance(nested, DirectoryNode)
    same = (await _directory(store, nested))[b"same-as-hello"]
    assert isinstance(same, FileNode) and same.executable
    hello = top[b"hello.txt"]
    assert isinstance(hello, FileNode) and not hello.executable
    assert same.digest == hello.digest
    distinct_contents = {
        p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    }
    assert len(blobs.blobs) == len(distinct_contents)


async def test_tree_is_put_once_leaves_first(tmp_path: Path) -> None:
    root = tree_mixed(tmp_path)
    calls: list[list[Directory]] = []

    class Recording(MemoryDirectoryService):
        async def put_tree(self, directories: object) -> B3Digest:
            ordered = list(directories)  # type: ignore[call-overload]
            calls.append(ordered)
            return await super().put_tree(ordered)

    store = Store(MemoryBlobService(), Recording(), MemoryPathInfoService())
    info = await import_path(store, root)

    assert len(calls) == 1
    sent = calls[0]
    assert isinstance(info.node, DirectoryNode)
    assert sent[-1].digest == info.node.digest
    seen: set[B3Digest] = set()
    for directory in sent:
        assert all(child.digest in seen for _, child in directory.child_directories())
        seen.add(directory.digest)


# --- streaming ------------------------------------------------------------------------


class _RecordingBlobs(MemoryBlobService):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []
        self.writers = 0

    async def open_write(self) -> BlobWriter:
        self.writers += 1
        inner = await super().open_write()
        writes = self.writes

        class Writer(BlobWriter):
            async def write(self, data: bytes) -> None:
                writes.append(len(data))
                await inner.write(data)

            async def close(self) -> B3Digest:
                return await inner.close()

        return Writer()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_large_files_stream_in_chunks_and_close(tmp_path: Path) -> None:
    root = tree_big(tmp_path)
    blobs = _RecordingBlobs()
    store = Store(blobs, MemoryDirectoryService(), MemoryPathInfoService())
    fds = _open_fds()

    info = await import_path(store, root)

    assert _open_fds() == fds
    assert max(blobs.writes) <= CHUNK_SIZE
    total = sum(p.stat().st_size for p in root.iterdir())
    assert sum(blobs.writes) == total
    # 3 MiB + 3 bytes alone is 4 writes; nothing arrived as one piece.
    assert len(blobs.writes) >= 4 + 1 + 2 + 1

    pieces: list[int] = []

    async def async_sink(data: bytes) -> None:
        pieces.append(len(data))
        await trio.lowlevel.checkpoint()

    size, sha256 = await write_nar(store, info.node, async_sink)
    assert (size, sha256) == (info.nar_size, info.nar_sha256)
    assert sum(pieces) == size
    # Rendering streams too: no piece much larger than a chunk.
    assert max(pieces) <= CHUNK_SIZE + 1024


async def test_reimport_opens_no_writer_for_small_files(tmp_path: Path) -> None:
    root = tree_mixed(tmp_path)
    _write(root / "large", random.Random(5).randbytes(CHUNK_SIZE + 1))
    blobs = _RecordingBlobs()
    store = Store(blobs, MemoryDirectoryService(), MemoryPathInfoService())
    await import_path(store, root)
    distinct = {p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    assert blobs.writers == len(distinct)

    blobs.writers = 0
    await import_path(store, root)
    # Small files are known by digest before any upload; the large one is
    # streamed (read once), and its writer finds the blob already there.
    assert blobs.writers == 1


# --- what Nix refuses, and what goes wrong -------------------------------------------


async def test_fifo_inside_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    _write(root / "a", b"a")
    os.mkfifo(root / "pipe")
    store = memory_store()
    with pytest.raises(ImportSourceError, match=r"pipe'.* unsupported type: it is a fifo"):
        await import_path(store, root)
    assert not await _any_path_info(store)


async def test_socket_inside_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sub" / "sock"))
        with pytest.raises(ImportSourceError, match=r"sock'.* it is a socket"):
            await import_path(memory_store(), root)


async def test_fifo_as_root_is_rejected(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ImportSourceError, match="fifo"):
        await import_path(memory_store(), tmp_path / "pipe")


async def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        await import_path(memory_store(), tmp_path / "absent")
    assert e.value.filename == os.fsencode(tmp_path / "absent")


@pytest.mark.parametrize(
    ("basename", "name", "problem"),
    [
        ("with space", None, "invalid character ' '"),
        ("ok", "slash/in/name", "invalid character '/'"),
        ("ok", "ünicode", "invalid character"),
        ("ok", "x" * 212, "1 to 211 bytes"),
        ("ok", "", "1 to 211 bytes"),
        # Nix 2.8 still accepts these four; Nix 2.20 and later (and we) do not.
        ("ok", ".", "not allowed"),
        ("ok", "..", "not allowed"),
        ("ok", ".-x", "not allowed"),
        ("ok", "..-x", "not allowed"),
    ],
)
async def test_invalid_names(tmp_path: Path, basename: str, name: str | None, problem: str) -> None:
    # The path does not exist: the name is refused before anything is read.
    store = memory_store()
    with pytest.raises(ValidationError, match=problem) as e:
        await import_path(store, tmp_path / basename, name=name)
    assert "not a valid store path name" in str(e.value)


async def test_root_without_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pass a name"):
        await import_path(memory_store(), "/")


async def test_good_odd_names_are_accepted(tmp_path: Path) -> None:
    store = memory_store()
    for name in ("-lead", "a=b?", "x+y_z.1", ".hidden", "x" * 211):
        _write(tmp_path / "f", name.encode())
        info = await import_path(store, tmp_path / "f", name=name)
        assert info.store_path.name == name


async def test_lying_blob_service_is_caught(tmp_path: Path) -> None:
    class Lying(MemoryBlobService):
        async def open_write(self) -> BlobWriter:
            inner = await super().open_write()

            class Writer(BlobWriter):
                async def write(self, data: bytes) -> None:
                    await inner.write(data + b"!")

                async def close(self) -> B3Digest:
                    return await inner.close()

            return Writer()

    _write(tmp_path / "f", b"content")
    store = Store(Lying(), MemoryDirectoryService(), MemoryPathInfoService())
    with pytest.raises(IntegrityError, match="stored"):
        await import_path(store, tmp_path / "f")
    assert not await _any_path_info(store)


async def test_write_nar_missing_pieces(tmp_path: Path) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    store = Store(blobs, dirs, MemoryPathInfoService())
    info = await import_path(store, tree_mixed(tmp_path))
    sink: Callable[[bytes], object] = bytearray().extend

    blobs.blobs.clear()
    with pytest.raises(StoreError, match=r"blob .* not found"):
        await write_nar(store, info.node, sink)
    dirs.directories.clear()
    with pytest.raises(StoreError, match=r"directory .* not found"):
        await write_nar(store, info.node, sink)


async def _any_path_info(store: Store) -> bool:
    async for _ in store.path_infos.list():
        return True
    return False


# --- the durability point -----------------------------------------------------------


class _OrderedStore:
    """A memory store that records the order of what an import does to it."""

    def __init__(self, fail_sync: bool = False) -> None:
        self.calls: list[str] = []
        calls = self.calls

        class Blobs(MemoryBlobService):
            async def put_batch(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
                calls.append("blobs")
                await super().put_batch(blobs)

            async def open_write(self) -> BlobWriter:
                calls.append("blob writer")
                return await super().open_write()

            async def sync(self) -> None:
                calls.append("sync")
                if fail_sync:
                    raise StoreError("the disk said no")

        class Infos(MemoryPathInfoService):
            async def put(self, info: PathInfo) -> PathInfo:
                calls.append("path info")
                return await super().put(info)

        self.store = Store(Blobs(), MemoryDirectoryService(), Infos())


async def test_blobs_are_made_durable_once_before_the_path_info(tmp_path: Path) -> None:
    root = tree_big(tmp_path)
    tree_mixed(root)
    recording = _OrderedStore()
    await import_path(recording.store, root)
    calls = recording.calls
    assert "blobs" in calls and "blob writer" in calls
    assert calls.count("sync") == 1
    assert calls[-2:] == ["sync", "path info"]


async def test_a_failed_sync_records_nothing(tmp_path: Path) -> None:
    recording = _OrderedStore(fail_sync=True)
    with pytest.raises(StoreError, match="the disk said no"):
        await import_path(recording.store, tree_mixed(tmp_path))
    assert "path info" not in recording.calls
    assert not await _any_path_info(recording.store)


async def test_a_file_changing_size_while_read_is_an_error(tmp_path: Path) -> None:
    # Stands in for a file that shrinks between fstat and read: a small file
    # read in one go must come out at the size fstat gave.
    root = tmp_path / "tree"
    root.mkdir()
    _write(root / "a", b"abc")
    real_read = os.read

    def short_read(fd: int, n: int) -> bytes:
        return real_read(fd, n)[:1]

    store = memory_store()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "read", short_read)
        with pytest.raises(ImportSourceError, match="changed size while read"):
            await import_path(store, root)
    assert not await _any_path_info(store)


# --- the prefetcher -------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_prefetcher_runs_ahead_in_walk_order_by_a_bounded_count(tmp_path: Path) -> None:
    # The files the walker will read, in its order (name order, depth first).
    expected = []
    for d in ("a", "b"):
        for i in range(importer.PREFETCH_FILES):
            path = tmp_path / "tree" / d / f"f{i:04d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            expected.append(os.fsencode(path))
    (tmp_path / "tree" / "a" / "link").symlink_to("f0000")  # not a file to read
    advised: list[bytes] = []
    fds: dict[int, bytes] = {}
    real_open = os.open

    def recording_open(path: bytes, flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        fds[fd] = path
        return fd

    def recording_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert (offset, length, advice) == (0, importer.PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
        advised.append(fds[fd])

    prefetcher = importer._Prefetcher()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", recording_open)
        patch.setattr(os, "posix_fadvise", recording_fadvise)
        thread = threading.Thread(target=prefetcher.run, args=(os.fsencode(tmp_path / "tree"),))
        thread.start()
        try:
            _wait_for(lambda: len(advised) == importer.PREFETCH_FILES, "the first files")
            prefetcher.consumed(10)
            _wait_for(lambda: len(advised) == importer.PREFETCH_FILES + 10, "ten more")
        finally:
            prefetcher.stop()
            thread.join(timeout=10)
    assert not thread.is_alive()
    assert advised == expected[: importer.PREFETCH_FILES + 10]


def test_batches_are_bounded_without_file_contents(tmp_path: Path) -> None:
    # Symlinks and empty directories carry no contents, yet the NAR pieces and
    # Directories they make must leave in batches too, not pile up.
    root = tmp_path / "links"
    for i in range(4000):
        (root / f"d{i % 20:02d}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 20:02d}" / f"l{i:05d}").symlink_to(f"target-{i}")
        if i % 10 == 0:
            (root / f"e{i:05d}").mkdir()
    batches: list[importer._Batch] = []
    walker = importer._Walker(batches.append, importer.ImportProgress(), None)
    walker.run(importer._classify(os.fsencode(root)))
    assert len(batches) > 1
    limit = importer._NAR_PIECES_PER_BATCH + 16  # the pieces of one more entry
    assert all(len(batch.nar) <= limit for batch in batches)
    assert sum(len(batch.directories) for batch in batches) == 20 + 400 + 1
    # Every NAR piece arrives once, in order: together they are the NAR.
    nar = b"".join(piece for batch in batches for piece in batch.nar)
    assert len(nar) == walker.nar.size
