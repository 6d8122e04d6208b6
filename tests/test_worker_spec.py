"""The spec a worker reads on stdin: what it accepts, what it refuses, and
that reading it needs neither pydantic nor the config models."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tvix_mountd.config import MountConfig, StoreConfig
from tvix_mountd.workers.spec import SpecError, WorkerMount, WorkerSpec, WorkerStore, spec_dict

MOUNT = WorkerMount(
    name="store",
    store="local",
    mountpoint="/mnt/store",
    list_root=True,
    show_xattr=False,
    allow_other=False,
    read_ahead=False,
)
STORE = WorkerStore(
    blob_service_addr="raw+file:///var/lib/blobs",
    directory_service_addr="sqlite:///var/lib/directories.sqlite",
    backend_timeout=2.5,
)


def spec_json(**changes: Any) -> dict[str, Any]:
    """A spec as the supervisor and the spawner write it, with `changes`."""
    spec: dict[str, Any] = {
        "mount": spec_dict(MOUNT),
        "store": spec_dict(STORE),
        "rootcache_socket": "/run/tvix-mountd/rootcache.sock",
        "error_file": "/run/tvix-mountd/errors/store",
        "parent_pid": 1234,
        "mount_id": 77,
        "fuse_fd": 5,
        "state_fd": 6,
        "init": "abcd",
        "resend": True,
    }
    spec.update(changes)
    return spec


def parse(spec: dict[str, Any]) -> WorkerSpec:
    return WorkerSpec.from_json(json.dumps(spec).encode())


def test_a_spec_reads_back_as_written() -> None:
    spec = parse(spec_json())
    assert spec.mount == MOUNT
    assert spec.store == STORE
    assert (spec.mount_id, spec.fuse_fd, spec.state_fd, spec.parent_pid) == (77, 5, 6, 1234)
    assert (spec.init, spec.resend) == ("abcd", True)
    # Defaults for what the supervisor may leave out.
    assert (spec.log_fd, spec.log_level, spec.blame, spec.store_changed) == (
        None,
        "info",
        True,
        False,
    )


def test_the_spec_of_an_older_supervisor_is_accepted() -> None:
    # Before the worker had a spec of its own, the supervisor sent whole
    # config models; a worker installed since must still take a mount over
    # from such a supervisor (`restart` after an upgrade).
    mount = MountConfig(name="store", store="local", mountpoint="/mnt/store", list_root=True)
    store = StoreConfig(
        blob_service_addr="raw+file:///var/lib/blobs",
        directory_service_addr="sqlite:///var/lib/directories.sqlite",
        path_info_service_addr="sqlite:///var/lib/pathinfo.sqlite",
        backend_timeout=3,
    )
    spec = parse(
        spec_json(mount=mount.model_dump(mode="json"), store=store.model_dump(mode="json"))
    )
    assert spec.mount == WorkerMount(
        name="store",
        store="local",
        mountpoint="/mnt/store",
        list_root=True,
        show_xattr=True,
        allow_other=False,
    )
    assert spec.store.backend_timeout == 3.0
    assert isinstance(spec.store.backend_timeout, float)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fuse_fd": "5"}, "spec.fuse_fd: expected <class 'int'>, got '5'"),
        ({"fuse_fd": True}, "spec.fuse_fd: expected <class 'int'>, got True"),
        ({"resend": 1}, "spec.resend: expected <class 'bool'>, got 1"),
        ({"mount_id": 1.5}, "spec.mount_id: expected int | None, got 1.5"),
        ({"mount": {**spec_dict(MOUNT), "list_root": "yes"}}, "spec.mount.list_root"),
        (
            {"store": {"blob_service_addr": "memory://"}},
            "spec.store.directory_service_addr: missing",
        ),
        ({"store": []}, "spec.store: expected an object, got list"),
    ],
)
def test_a_wrong_spec_is_refused_with_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse(spec_json(**changes))
    assert message in str(raised.value)


def test_a_missing_key_is_refused() -> None:
    spec = spec_json()
    del spec["state_fd"]
    with pytest.raises(SpecError, match=r"spec\.state_fd: missing"):
        parse(spec)


def test_a_worker_started_with_a_bad_spec_says_why_and_exits_2() -> None:
    worker = subprocess.run(
        [sys.executable, "-m", "tvix_mountd.workers", "store"],
        input=b'{"mount": 1}',
        capture_output=True,
        timeout=60,
    )
    assert worker.returncode == 2, worker
    assert b"bad spec on stdin: spec.mount: expected an object, got int" in worker.stderr
    assert b"Traceback" not in worker.stderr


def test_a_worker_imports_neither_pydantic_nor_the_config_models() -> None:
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tvix_mountd.workers.process;"
            "print(sorted(m for m in sys.modules"
            " if m.split('.')[0] == 'pydantic' or m == 'tvix_mountd.config'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "[]"
