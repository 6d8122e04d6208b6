"""The spawner's fork server: workers forked from a process that imported
their code once, still adopted by the spawner, still running the code
installed now.

The spawner runs in a process of its own (as under the supervisor: it is
forked before trio starts); the worker is a small module in a temporary
directory, so that a test can change its code.
"""

from __future__ import annotations

import importlib
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tvix_mountd.supervisor.forkserver import CodeFiles

WORKER = """
import json, os, signal, sys

from tvix_mountd import procutil

VERSION = {version}
IMPORTED_BY = os.getpid()


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    spec = json.loads(sys.stdin.read())
    # Only now: until its spec came, its parent was the fork server's child.
    procutil.set_parent_death_signal(signal.SIGKILL)  # should the test fail
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\\0", b" ").decode().strip()
    record = {{
        "version": VERSION,
        "forked": IMPORTED_BY != os.getpid(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "parent_pid": spec["parent_pid"],
        "cmdline": cmdline,
        "fd": os.read(spec["fd"], 100).decode() if "fd" in spec else None,
    }}
    with open(spec["record"], "w") as f:
        json.dump(record, f)
    if spec.get("wait"):
        signal.sigwait([signal.SIGUSR1])
    sys.exit(spec["exit"])


if __name__ == "__main__":
    main()
"""

# Runs in a process of its own, with the worker module on its PYTHONPATH.
SCENARIO = r"""
import json, os, signal, sys, trio
from pathlib import Path
from tvix_mountd import procutil
from tvix_mountd.supervisor.spawner import Spawner

work = Path(sys.argv[1])
entry = sys.argv[2]
spawner = Spawner.start(fork_servers={"fakeworker": entry})
seen = {"spawner": spawner.process.pid}


def servers():
    found = []
    for pid in procutil.children(spawner.process.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"tvix_mountd.supervisor.forkserver" in f.read():
                found.append(pid)
    return found


async def kill(pid):
    # Through a pidfd: the spawner may reap it as soon as it is dead.
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        with trio.fail_after(30):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def start(name, **spec):
    record = work / f"{name}.json"
    read, write = os.pipe()
    os.write(write, name.encode())
    os.close(write)
    try:
        pid = await spawner.exec(
            name, "fakeworker", {"record": str(record), "exit": 0, **spec}, {"fd": read}
        )
    finally:
        os.close(read)
    with trio.fail_after(30):
        while not record.exists() or not record.read_text().endswith("}"):
            await trio.sleep(0.01)
    seen[name] = json.loads(record.read_text())
    assert seen[name]["pid"] == pid
    return pid


async def exit_of(pid):
    with trio.fail_after(30):
        async for exited, code in spawner.exits:
            if exited == pid:
                return code


async def scenario():
    async with trio.open_nursery() as nursery:
        await nursery.start(spawner.run)
        pid = await start("first", exit=7)
        seen["first_exit"] = await exit_of(pid)
        seen["servers_before"] = servers()

        module = work / "fakeworker.py"
        module.write_text(module.read_text().replace("VERSION = 1", "VERSION = 22"))
        waiting = await start("after_change", wait=True)
        seen["servers_after"] = servers()

        for server in servers():
            await kill(server)
        seen["alive_after_server_killed"] = (
            not procutil.main_thread_exited(waiting)
            and waiting in procutil.children(spawner.process.pid)
        )
        os.kill(waiting, signal.SIGUSR1)
        seen["waiting_exit"] = await exit_of(waiting)

        pid = await start("after_kill", exit=3)
        seen["after_kill_exit"] = await exit_of(pid)
        seen["servers_last"] = servers()

        # A hung server (stopped here) is given up after a while, and killed.
        for server in servers():
            os.kill(server, signal.SIGSTOP)
        pid = await start("after_stop")
        await exit_of(pid)
        seen["servers_after_stop"] = servers()
        nursery.cancel_scope.cancel()


try:
    trio.run(scenario)
finally:
    spawner.close()
print(json.dumps(seen))
"""


def _run_scenario(tmp_path: Path, entry: str) -> dict[str, Any]:
    """What SCENARIO saw, with `entry` as the fork server's entry point."""
    (tmp_path / "fakeworker.py").write_text(WORKER.format(version=1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), entry],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return seen


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario with a fork server that works."""
    return _run_scenario(tmp_path_factory.mktemp("forked"), "fakeworker:main")


def test_workers_are_forked_from_the_server_and_adopted_by_the_spawner(
    forked: dict[str, Any],
) -> None:
    seen = forked
    spawner = seen["spawner"]
    first = seen["first"]
    assert first["forked"] and first["version"] == 1
    # Its parent is the spawner, which reaps it and reports its status.
    assert first["ppid"] == first["parent_pid"] == spawner
    assert seen["first_exit"] == 7
    # Named in ps as if exec'd; its descriptors passed under their names.
    assert first["cmdline"].endswith("-P -m fakeworker first"), first["cmdline"]
    assert first["fd"] == "first"
    assert len(seen["servers_before"]) == 1


def test_a_change_to_the_code_starts_a_new_server_running_it(forked: dict[str, Any]) -> None:
    seen = forked
    changed = seen["after_change"]
    assert changed["version"] == 22 and changed["forked"]
    assert seen["servers_after"] and seen["servers_after"] != seen["servers_before"]


def test_a_killed_server_ends_no_worker_and_is_replaced(forked: dict[str, Any]) -> None:
    seen = forked
    assert seen["alive_after_server_killed"]
    assert seen["waiting_exit"] == 0
    last = seen["after_kill"]
    assert last["forked"] and last["ppid"] == seen["spawner"]
    assert seen["after_kill_exit"] == 3
    assert seen["servers_last"] and not set(seen["servers_last"]) & set(seen["servers_after"])


def test_a_hung_server_is_killed_and_replaced(forked: dict[str, Any]) -> None:
    seen = forked
    assert seen["after_stop"]["forked"]
    assert seen["servers_after_stop"]
    assert not set(seen["servers_after_stop"]) & set(seen["servers_last"])


def test_a_server_that_cannot_start_leaves_workers_exec_d(tmp_path: Path) -> None:
    seen = _run_scenario(tmp_path, "fakeworker:no_such_function")
    for name in ("first", "after_change", "after_kill", "after_stop"):
        assert not seen[name]["forked"], name
        assert seen[name]["ppid"] == seen["spawner"]
    assert seen["after_change"]["version"] == 22
    assert seen["first_exit"] == 7 and seen["after_kill_exit"] == 3


def test_code_files_name_a_changed_library(tmp_path: Path) -> None:
    library = tmp_path / "libprobe.so"
    library.write_bytes(b"\0" * 4096)
    with library.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        code = CodeFiles()
        assert code.changed() is None
        replacement = tmp_path / "libprobe.so.new"
        replacement.write_bytes(b"\1" * 4096)
        replacement.rename(library)  # as a package manager replaces one
        assert code.changed() == str(library)


def test_code_files_name_a_changed_module(tmp_path: Path) -> None:
    package = tmp_path / "codefiles_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("codefiles_probe.a")

        code = CodeFiles()
        assert code.changed() is None
        (package / "a.py").write_text("X = 22\n")
        assert code.changed() == str(package / "a.py")
        (package / "a.py").write_text("X = 1\n")
        os.utime(package / "a.py", ns=(0, 0))
        assert code.changed() == str(package / "a.py")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("codefiles_probe")]:
            del sys.modules[name]
