"""`tvix-mountd import` as a user runs it: a real process, its stdout and its
stderr on a pipe or on a real pseudo-terminal.

stdout is exactly the store paths (what `nix-store --add` prints); stderr on
a terminal carries a live progress line redrawn in place, and elsewhere only
the summary.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.test_model import nix_store_add

CLI: Final = (sys.executable, "-m", "tvix_mountd.cli")
TIMEOUT: Final = 60.0
# What a terminal would do with a progress line's control characters.
_ESCAPE: Final = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
_LOG_LINE: Final = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def write_config(base: Path) -> Path:
    """`base/import.toml`, naming the embedded store `local` under `base/store`."""
    store = base / "store"
    config = base / "import.toml"
    config.write_text(
        "[stores.local]\n"
        f'blob_service_addr = "raw+file://{store}/blobs"\n'
        f'directory_service_addr = "sqlite://{store}/directories.sqlite"\n'
        f'path_info_service_addr = "sqlite://{store}/pathinfo.sqlite"\n'
    )
    return config


def make_tree(root: Path, files: int) -> Path:
    """`files` small files in a few directories, a large one, a symlink."""
    for i in range(files):
        path = root / f"d{i % 7}" / f"f{i:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"file {i}\n".encode() * (i % 50 + 1))
    (root / "large.bin").write_bytes(os.urandom(3 << 20))
    (root / "link").symlink_to("large.bin")
    return root


requires_nix = pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs nix-store")


@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_on_pipes(*args: str) -> Run:
    done = subprocess.run([*CLI, *args], capture_output=True, timeout=TIMEOUT, check=False)
    return Run(done.returncode, done.stdout, done.stderr)


def _set_window(fd: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


def run_on_terminal(*args: str, columns: int = 100) -> Run:
    """stderr on a pseudo-terminal `columns` wide, stdout on a pipe."""
    primary, secondary = os.openpty()
    _set_window(secondary, columns)
    try:
        process = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL
        )
    except BaseException:
        os.close(primary)
        os.close(secondary)
        raise
    os.close(secondary)
    terminal = bytearray()
    deadline = time.monotonic() + TIMEOUT
    try:
        assert process.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"import did not finish in {TIMEOUT} s: {bytes(terminal)!r}")
            readable, _, _ = select.select([primary], [], [], left)
            if not readable:
                continue
            try:
                data = os.read(primary, 65536)
            except OSError as e:
                if e.errno != errno.EIO:  # Linux: every secondary end closed
                    raise
                break
            if not data:
                break
            terminal += data
        stdout = process.stdout.read()
        returncode = process.wait(timeout=TIMEOUT)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    return Run(returncode, stdout, bytes(terminal))


def drawn_lines(terminal: bytes) -> Iterator[bytes]:
    """What the progress line showed, each time it was drawn (between two
    carriage returns, before the first summary line)."""
    text = _ESCAPE.sub(b"", terminal.replace(b"\r\n", b"\n"))
    before_summary = text.split(b"\n", 1)[0]
    for line in before_summary.split(b"\r"):
        if line.strip() and not _LOG_LINE.match(line):
            yield line


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree", 40)


@requires_nix
def test_on_a_pipe_stdout_is_the_store_paths_and_stderr_the_summary(
    tmp_path: Path, tree: Path
) -> None:
    config = write_config(tmp_path)
    single = tree / "d3" / "f0003"
    done = run_on_pipes(
        "import", "--config", str(config), "--store", "local", str(tree), str(single)
    )

    assert done.returncode == 0, done.stderr
    expected = [nix_store_add(tmp_path / "nix", tree), nix_store_add(tmp_path / "nix", single)]
    assert done.stdout.decode().splitlines() == expected
    assert done.stdout.endswith(b"\n")
    # No progress: no carriage return, no escape sequence, just the summaries.
    assert b"\r" not in done.stderr and b"\x1b" not in done.stderr
    summaries = done.stderr.decode().splitlines()
    assert len(summaries) == 2
    assert f"imported {tree}: 42 files, " in summaries[0]
    assert f"imported {single}: 1 file, " in summaries[1]


def test_on_a_terminal_a_progress_line_is_drawn_in_place(tmp_path: Path, tree: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "ref").mkdir()
    reference = run_on_pipes(
        "import", "--config", str(write_config(tmp_path / "ref")), "--store", "local", str(tree)
    )
    assert reference.returncode == 0, reference.stderr

    # Wide enough for the whole line (tmp_path is long); narrow: the next test.
    done = run_on_terminal(
        "import", "--config", str(config), "--store", "local", str(tree), columns=400
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == reference.stdout
    lines = list(drawn_lines(done.stderr))
    assert lines, done.stderr
    # Redrawn in place: carriage returns, no newline until the summary.
    first_newline = done.stderr.find(b"\n")
    assert done.stderr[:first_newline].count(b"\r") >= 2
    # The last drawing has the final figures: every file, every byte, and the
    # last entry read (in name order, `link` comes last).
    total = sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    assert lines[-1].startswith(f"{tree}: 42 files, ".encode()), lines
    assert lines[-1].endswith(b", link"), lines
    size = f"{total / 1e6:.2f}MB".encode()
    assert size in lines[-1], (size, lines[-1])
    # The line was cleared, then the summary printed in its place.
    segments = done.stderr[:first_newline].split(b"\r")
    summary_at = next(i for i, segment in enumerate(segments) if _LOG_LINE.match(segment))
    assert segments[summary_at - 1].strip() == b"", segments
    assert f"imported {tree}: 42 files, {total:,} bytes in" in segments[summary_at].decode()


def test_the_progress_line_fits_a_narrow_terminal(tmp_path: Path, tree: Path) -> None:
    config = write_config(tmp_path)
    done = run_on_terminal(
        "import", "--config", str(config), "--store", "local", str(tree), columns=30
    )
    assert done.returncode == 0, done.stderr
    lines = list(drawn_lines(done.stderr))
    assert lines
    assert all(len(line.decode()) <= 30 for line in lines), lines


def test_a_fifo_in_the_tree_is_a_clear_error(tmp_path: Path, tree: Path) -> None:
    os.mkfifo(tree / "d2" / "pipe")
    config = write_config(tmp_path)
    for done in (
        run_on_pipes("import", "--config", str(config), "--store", "local", str(tree)),
        run_on_terminal("import", "--config", str(config), "--store", "local", str(tree)),
    ):
        assert done.returncode == 1
        assert done.stdout == b""
        message = done.stderr.decode()
        assert "d2/pipe' has an unsupported type: it is a fifo" in message
        assert "Traceback" not in message


def test_a_missing_path_is_a_clear_error(tmp_path: Path, tree: Path) -> None:
    config = write_config(tmp_path)
    done = run_on_pipes(
        "import", "--config", str(config), "--store", "local", str(tree), str(tmp_path / "absent")
    )
    assert done.returncode == 1
    # The tree before it was imported and printed; then the error, alone.
    assert len(done.stdout.decode().splitlines()) == 1
    assert done.stderr.decode().splitlines()[-1] == (
        f"tvix-mountd: {tmp_path / 'absent'}: No such file or directory"
    )


def test_ctrl_c_stops_the_import_cleanly(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", 3000)
    (tree / "zz-large").write_bytes(os.urandom(64 << 20))
    config = write_config(tmp_path)
    # The import must take SIGINT as a terminal's Ctrl-C. A program inherits
    # an ignored SIGINT (a shell's background job, e.g. `make test &`, starts
    # so) and Python then installs no KeyboardInterrupt handler: set it to
    # the default while the import starts, whoever started these tests.
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        process = subprocess.Popen(
            [*CLI, "import", "--config", str(config), "--store", "local", str(tree)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        # Interrupted once it is storing blobs, well before its end: small
        # files go into packs from the first batch on, while a loose blob's
        # directory (b3/) may first appear with the large file, at the end.
        stored = [tmp_path / "store" / "blobs" / part for part in ("packs", "b3")]
        deadline = time.monotonic() + TIMEOUT
        while not any(path.exists() for path in stored):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the import stored nothing"
            time.sleep(0.001)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr.decode()
    assert stdout == b""
    assert b"Traceback" not in stderr
    assert not (tmp_path / "store" / "pathinfo.sqlite").exists()
