"""`tvix-mountd start` with no --config: the embedded default.

It uses fixed system paths (/var/lib/tvix-mountd, /run/tvix-mountd) and port
9137, so the test runs it in private mount and network namespaces
(`unshare -mn`) with tmpfs over those directories: the machine is untouched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
set -eu
mkdir -p /var/lib/tvix-mountd /run/tvix-mountd
mount -t tmpfs none /var/lib/tvix-mountd
mount -t tmpfs none /run/tvix-mountd
ip link set lo up
mounted() {
    awk '$5 == "/var/lib/tvix-mountd/mnt/store" && $0 ~ / - fuse\.tvix /' /proc/self/mountinfo
}
"$TVIX_MOUNTD" start 2>/var/lib/tvix-mountd/log &
pid=$!
ready=
for _ in $(seq 300); do
    if curl -sf http://127.0.0.1:9137/readyz >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
done
[ -n "$ready" ] || { cat /var/lib/tvix-mountd/log >&2; kill -9 "$pid" 2>/dev/null; exit 3; }
curl -sf http://127.0.0.1:9137/status
echo
[ -n "$(mounted)" ] && echo "mounted: yes"
ls /var/lib/tvix-mountd/blobs >/dev/null 2>&1 || true
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
echo "exit: $status"
[ -z "$(mounted)" ] && echo "unmounted: yes"
"""


@pytest.mark.fuse
def test_start_without_config_runs_the_embedded_default() -> None:
    for tool in ("unshare", "ip", "curl"):
        assert shutil.which(tool), f"{tool} is needed"
    tvix_mountd = Path(sys.executable).parent / "tvix-mountd"
    result = subprocess.run(
        ["unshare", "-mn", "--propagation", "private", "bash", "-c", SCRIPT],
        env={"TVIX_MOUNTD": str(tvix_mountd), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    status = json.loads(lines[0])
    assert [(m["name"], m["mountpoint"], m["store"], m["state"]) for m in status["mounts"]] == [
        ("store", "/var/lib/tvix-mountd/mnt/store", "local", "serving")
    ]
    assert "mounted: yes" in lines
    assert "exit: 0" in lines
    assert "unmounted: yes" in lines
