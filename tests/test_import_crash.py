"""An import killed at any point leaves a consistent store.

A real `tvix-mountd import` process importing two trees into the embedded
store is SIGKILLed at several points: after a random share of the bytes it
has to write (read from /proc/PID/io as it goes), and the moment the path
info database appears (its first commit). After each kill the store must
hold no PathInfo whose tree is incomplete, and every blob file must hash to
its name; then a new import over the same store must complete and give the
paths a clean import gives, reusing what the killed one left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import blake3
import pytest

from tests.test_import_cli import write_config
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.nodes import DirectoryNode, FileNode
from tvix_mountd.castore.store import Store

CLI: Final = (sys.executable, "-m", "tvix_mountd.cli")
TIMEOUT: Final = 60.0
POLL: Final = 0.001


def make_tree(root: Path, seed: int, small_files: int) -> Path:
    rng = random.Random(seed)
    for i in range(small_files):
        path = root / f"d{i % 13:02d}" / f"f{i:05d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randrange(1, 6000)))
    for i in range(3):
        (root / f"large{i}").write_bytes(rng.randbytes((2 << 20) + rng.randrange(1 << 20)))
    (root / "empty").mkdir()
    (root / "link").symlink_to("large0")
    return root


def open_store(base: Path) -> Store:
    """The store `write_config(base)` names."""
    return Store.from_addrs(
        f"raw+file://{base}/store/blobs",
        f"sqlite://{base}/store/directories.sqlite",
        f"sqlite://{base}/store/pathinfo.sqlite",
    )


def written_bytes(pid: int) -> int:
    """What the process wrote so far (wchar: every write(2), cached or not)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def import_until(config: Path, trees: list[Path], kill_when: Callable[[int], bool]) -> bool:
    """Run an import; SIGKILL it once `kill_when(pid)` holds. True if it was
    killed, False if it finished first (then it must have succeeded)."""
    process = subprocess.Popen(
        [*CLI, "--log-level", "warning", "import", "--config", str(config), "--store", "local"]
        + [str(t) for t in trees],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while process.poll() is None:
            if kill_when(process.pid):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=TIMEOUT)
                return True
            if time.monotonic() > deadline:
                raise AssertionError("the import neither finished nor reached the kill point")
            time.sleep(POLL)  # polling /proc, not waiting for an event
        assert process.returncode == 0, process.stderr.read() if process.stderr else b""
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


async def check_store(base: Path) -> set[str]:
    """Every blob file hashes to its name; every PathInfo's tree is complete
    (each Directory and each blob there and intact). Returns the store paths."""
    blob_root = base / "store" / "blobs" / "b3"
    if blob_root.exists():
        for shard in blob_root.iterdir():
            for blob in shard.iterdir():
                assert blake3.blake3(blob.read_bytes()).hexdigest() == blob.name, blob
    store = open_store(base)
    paths = set()
    try:
        if (base / "store" / "pathinfo.sqlite").exists():
            async for info in store.path_infos.list():
                paths.add(info.store_path.absolute)
                await _check_tree(store, info.node)
    finally:
        await store.aclose()
    return paths


async def _check_tree(store: Store, node: object) -> None:
    if isinstance(node, FileNode):
        await _check_blob(store, node.digest, node.size)
        return
    if not isinstance(node, DirectoryNode):
        return
    async for directory in store.directories.get_recursive(node.digest):
        for child in directory.values():
            if isinstance(child, FileNode):
                await _check_blob(store, child.digest, child.size)


async def _check_blob(store: Store, digest: B3Digest, size: int) -> None:
    data = await store.blobs.read_all(digest)  # verified against the digest
    assert data is not None, f"blob {digest} of a recorded path is missing"
    assert len(data) == size


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("trees")
    return [make_tree(base / "first", 1, 400), make_tree(base / "second", 2, 1500)]


@pytest.fixture(scope="module")
def clean_paths(trees: list[Path], tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    base = tmp_path_factory.mktemp("clean")
    return set(
        subprocess.run(
            [*CLI, "import", "--config", str(write_config(base)), "--store", "local"]
            + [str(t) for t in trees],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout.split()
    )


def _tree_bytes(trees: list[Path]) -> int:
    return sum(p.lstat().st_size for t in trees for p in t.rglob("*") if p.is_file())


# Shares of the bytes the import writes (blob contents, about their total),
# at which it is killed; seeded, so a failure names its point.
_RNG = random.Random(13)
SHARES: Final = [0.0, *sorted(round(_RNG.uniform(0.02, 1.0), 3) for _ in range(8))]


@pytest.mark.parametrize("share", SHARES)
async def test_killed_after_a_share_of_its_writes(
    tmp_path: Path, trees: list[Path], clean_paths: set[str], share: float
) -> None:
    config = write_config(tmp_path)
    target = int(share * _tree_bytes(trees))
    import_until(config, trees, lambda pid: written_bytes(pid) >= target)

    recorded = await check_store(tmp_path)
    assert recorded <= clean_paths

    # A new import over what is left completes, with the same answers.
    assert not import_until(config, trees, lambda _pid: False)
    assert await check_store(tmp_path) == clean_paths


def _half_written_blob(temp_dir: Path) -> bool:
    try:
        return any(entry.stat().st_size > 0 for entry in os.scandir(temp_dir))
    except FileNotFoundError:  # not created yet, or a temp file renamed meanwhile
        return False


async def test_killed_while_a_blob_is_half_written(
    tmp_path: Path, trees: list[Path], clean_paths: set[str]
) -> None:
    config = write_config(tmp_path)
    temp_dir = tmp_path / "store" / "blobs" / "tmp"
    assert import_until(config, trees, lambda _pid: _half_written_blob(temp_dir))

    recorded = await check_store(tmp_path)
    assert recorded <= clean_paths
    assert not import_until(config, trees, lambda _pid: False)
    assert await check_store(tmp_path) == clean_paths


async def test_killed_at_its_first_commit(
    tmp_path: Path, trees: list[Path], clean_paths: set[str]
) -> None:
    config = write_config(tmp_path)
    pathinfo_db = tmp_path / "store" / "pathinfo.sqlite"
    import_until(config, trees, lambda _pid: pathinfo_db.exists())

    recorded = await check_store(tmp_path)
    assert recorded <= clean_paths
    assert not import_until(config, trees, lambda _pid: False)
    assert await check_store(tmp_path) == clean_paths
