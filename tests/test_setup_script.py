"""scripts/setup.sh: a failed pyfuse3 build says where, and leaves nothing behind.

The script runs for real against a stand-in virtualenv whose `pip` fails in a
chosen way (no network, no compiler needed); `mktemp -d` is pointed at a
private TMPDIR, so "nothing left behind" is that directory being empty.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup.sh"
RUNTIME_PACKAGES = ("fuse3", "libfuse3-dev", "pkg-config", "gcc", "attr", "patch")

# `pip download` as the setup script calls it: fail, or leave a file that is
# not the pinned sdist. Every other pip call (the pip upgrade) succeeds.
FAKE_PIP = r"""#!/bin/sh
if [ "$1" = download ]; then
    if [ "$FAKE_PIP_DOWNLOAD" = fail ]; then
        echo "fake pip: no network" >&2
        exit 3
    fi
    while [ $# -gt 0 ]; do
        if [ "$1" = -d ]; then dest=$2; fi
        shift
    done
    echo "not the pyfuse3 sdist" >"$dest/pyfuse3-3.5.0.tar.gz"
fi
exit 0
"""


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return "install ok installed" in result.stdout


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    missing = [p for p in RUNTIME_PACKAGES if not _installed(p)]
    if missing:
        # setup.sh would install them (as root) before reaching the build.
        pytest.skip(f"Debian packages missing: {' '.join(missing)} (run scripts/setup.sh)")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "pip").write_text(FAKE_PIP)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("pip", "python"):
        (venv / "bin" / tool).chmod(0o755)
    return venv


def _run_setup(venv: Path, tmpdir: Path, download: str) -> subprocess.CompletedProcess[str]:
    tmpdir.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "VENV": str(venv),
        "TMPDIR": str(tmpdir),
        "FAKE_PIP_DOWNLOAD": download,
    }
    return subprocess.run(
        ["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_failed_download_is_named_and_cleaned_up(fake_venv: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    result = _run_setup(fake_venv, tmpdir, "fail")
    assert result.returncode == 3, result.stderr
    assert "fake pip: no network" in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("setup: failed")]
    assert len(failed) == 1, result.stderr
    assert failed[0].startswith("setup: failed (exit 3) at line ")
    assert '"$VENV/bin/pip" download' in failed[0]
    assert list(tmpdir.iterdir()) == []
    assert not list(fake_venv.glob(".installed-*"))


def test_checksum_mismatch_is_named_and_cleaned_up(fake_venv: Path, tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    result = _run_setup(fake_venv, tmpdir, "bogus")
    assert result.returncode == 1, result.stderr
    assert "does not match its pinned sha256" in result.stderr
    assert list(tmpdir.iterdir()) == []
    assert not list(fake_venv.glob(".installed-*"))
