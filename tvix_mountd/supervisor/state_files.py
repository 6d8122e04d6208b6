"""What a running service keeps in its `state_dir`, by name.

A module of its own, so that the CLI's `status`, `stop`, `reload` and
`restart`, which only need to find the control socket and the PID file,
do not import the service itself (its imports were a third of their time).
"""

from __future__ import annotations

from typing import Final

PID_FILE: Final = "tvix-mountd.pid"
CONTROL_SOCKET: Final = "control.sock"
ROOTCACHE_SOCKET: Final = "rootcache.sock"
METRICS_DIR: Final = "metrics"
ERRORS_DIR: Final = "errors"
