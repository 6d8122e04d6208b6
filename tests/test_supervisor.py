"""The whole service, run as `tvix-mountd start`: status, stop, signals, config
checks, reload, the health endpoint, systemd's notify protocol and the log stream.

Every test runs its own supervisor (tests/supervising.py) on an embedded store
under tmp_path, with its own state_dir and health port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from tests.mounting import KERNEL_CACHES
from tests.supervising import (
    DaemonRequests,
    Reader,
    Service,
    embedded_store,
    make_tree,
    mount_id,
    mounts_under,
    parse_metrics,
    sample,
    start_time,
    tree_files,
    world,
)
from tvix_mountd.config import SupervisorConfig
from tvix_mountd.supervisor.runner import Child, wait_gone

pytestmark = [
    pytest.mark.fuse,
]

MOUNT_KEYS: Final = {"name", "mountpoint", "store", "pid", "state", "restarts", "since", "error"}
ROOTCACHE_FIGURES: Final = {"hits", "negative_hits", "misses", "backend_calls", "entries"}
RECORD: Final = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
    r" \[(?P<tag>[^\]]+)\] (?P<logger>\S+): (?P<msg>.*)$"
)


def _no_errors(svc: Service) -> None:
    assert " ERROR " not in svc.log() and "Traceback" not in svc.log(), svc.log()


# -- start, status, stop ---------------------------------------------------------------


def test_start_status_and_stop(tmp_path: Path) -> None:
    with Service(tmp_path / "svc") as svc:
        svc.add_store(
            "local",
            embedded_store(tmp_path / "store", [])[0],
        )
        for name in ("a", "b"):
            svc.add_mount(name)
        svc.write_config()
        # Data in through the CLI, as an operator would.
        source = make_tree(tmp_path / "src" / "tree")
        done = svc.cli("import", "--config", str(svc.config_path), "--store", "local", str(source))
        assert done.returncode == 0, done.stderr
        (store_path,) = done.stdout.splitlines()
        name = Path(store_path).name

        svc.start()
        for mount in ("a", "b"):
            assert tree_files(svc.mountpoint(mount) / name) == tree_files(source)

        document = svc.status_cli()
        assert [m["name"] for m in document["mounts"]] == ["a", "b"]
        for m in document["mounts"]:
            assert set(m) >= MOUNT_KEYS
            assert m["mountpoint"] == str(svc.mountpoint(m["name"]))
            assert m["store"] == "local"
            assert m["state"] == "serving"
            assert m["restarts"] == 0
            assert m["error"] is None
            assert start_time(m["pid"]) is not None, "the worker's pid names no live process"
            assert m["pid"] in svc.live_processes(), "the worker is not the supervisor's"
            since = datetime.fromisoformat(m["since"].replace("Z", "+00:00"))
            assert abs(datetime.now(UTC) - since) < timedelta(minutes=5)
        rootcache = document["rootcache"]
        assert start_time(rootcache["pid"]) is not None
        assert rootcache["restarts"] == 0
        figures = rootcache["stores"]["local"]
        assert set(figures) >= ROOTCACHE_FIGURES
        assert figures["misses"] >= 1 and figures["entries"] >= 1, figures

        # The table for people: one row per mount, in config order.
        done = svc.cli("status", "--config", str(svc.config_path))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split() == [
            "MOUNT",
            "STATE",
            "PID",
            "RESTARTS",
            "HANDOVERS",
            "FOR",
            "MOUNTPOINT",
            "STORE",
        ]
        for line, m in zip(lines[1:3], document["mounts"], strict=True):
            cells = line.split()
            assert cells[:5] == [m["name"], "serving", str(m["pid"]), "0", "0"], line
            assert cells[6:] == [m["mountpoint"], "local"], line
        assert f"rootcache: pid {rootcache['pid']}, restarts 0" in lines

        done = svc.cli("stop", "--config", str(svc.config_path))
        assert done.returncode == 0, done.stderr
        assert svc.wait_exit() == 0, svc.log()
        svc.assert_nothing_left()
        _no_errors(svc)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_everything_and_exits_0(tmp_path: Path, signum: signal.Signals) -> None:
    with world(tmp_path) as w:
        w.svc.start()
        w.check_serves("a")
        assert len(w.svc.live_mounts()) == 2
        w.svc.signal(signum)
        assert w.svc.wait_exit() == 0, w.svc.log()
        w.svc.assert_nothing_left()
        assert f"received {signum.name}" in w.svc.log()
        _no_errors(w.svc)


def test_ctrl_c_in_a_terminal_unmounts_everything_and_exits_0(tmp_path: Path) -> None:
    # The terminal sends SIGINT to every process of the group: the workers
    # and the spawner get it too, and none of that is an error.
    with world(tmp_path) as w:
        w.svc.start(new_session=True)
        w.check_serves("a")
        w.svc.signal_group(signal.SIGINT)
        assert w.svc.wait_exit() == 0, w.svc.log()
        w.svc.assert_nothing_left()
        _no_errors(w.svc)


def test_second_start_on_same_state_dir_is_refused(tmp_path: Path) -> None:
    with world(tmp_path) as w:
        w.svc.start()
        before = w.svc.pids()
        second = w.svc.start_another("start", "--config", str(w.svc.config_path))
        status = second.wait(timeout=60)
        log = (w.svc.base / "extra-0.log").read_text()
        assert status != 0
        assert f"another tvix-mountd (pid {w.svc.pid}) is running" in log, log
        assert "Traceback" not in log
        # The first one is untouched: same workers, still serving, still answering.
        assert w.svc.alive()
        assert w.svc.pids() == before
        assert w.svc.readyz()[0] == 200
        w.check_serves("b")
        assert (w.svc.state_dir / "tvix-mountd.pid").read_text().strip() == str(w.svc.pid)
        assert w.svc.status_cli()["mounts"][0]["pid"] == before["a"]


# -- config errors --------------------------------------------------------------------


def test_check_config_reports_every_error_and_start_mounts_nothing(tmp_path: Path) -> None:
    with Service(tmp_path / "svc") as svc:
        good = str(svc.mountpoint("a"))
        svc.mountpoint("a").mkdir(parents=True)
        text = f"""
[supervisor]
state_dir = "{svc.state_dir}"
health_listen = "localhost"
colour = "blue"

[stores.local]
blob_service_addr = "http://example.com/blobs"
directory_service_addr = "sqlite://relative/dirs.sqlite"
path_info_service_addr = "memory://"
flavour = 1

[[mounts]]
name = "a"
store = "local"
mountpoint = "{good}"
hang_timeout = 0

[[mounts]]
name = "b"
store = "nowhere"
mountpoint = "{svc.mountpoint("b")}"

[[mounts]]
name = "a"
store = "local"
mountpoint = "{svc.mountpoint("c")}"

[[mounts]]
name = "d"
store = "local"
mountpoint = "{good}"

[[mounts]]
name = "e"
store = "local"
mountpoint = "{good}/inner"

[[mounts]]
name = "f"
store = "local"
mountpoint = "relative/mnt"
sparkle = true
"""
        svc.write_config(text)
        done = svc.cli("check-config", str(svc.config_path))
        assert done.returncode == 2, done
        lines = done.stderr.splitlines()
        expected = {
            "supervisor.colour": "unknown key",
            "supervisor.health_listen": "expected HOST:PORT",
            "stores.local.flavour": "unknown key",
            "stores.local.blob_service_addr": "",
            "stores.local.directory_service_addr": "",
            "mounts.0.hang_timeout": "greater than 0",
            "mounts.1.store": "unknown store 'nowhere'",
            "mounts.2.name": "duplicate mount name 'a'",
            "mounts.3.mountpoint": "already used by mount 'a'",
            "mounts.4.mountpoint": "nested",
            "mounts.5.mountpoint": "must be an absolute path",
            "mounts.5.sparkle": "unknown key",
        }
        for path, words in expected.items():
            found = [line for line in lines if line.startswith(f"{svc.config_path}: {path}: ")]
            assert found, f"no error for {path} in:\n{done.stderr}"
            sentence = found[0].split(f"{path}: ", 1)[1]
            assert words in sentence and len(sentence.split()) >= 2, found[0]
        assert "Traceback" not in done.stderr
        # Nothing else is reported as a problem but these.
        assert len(lines) == len(expected), done.stderr

        svc.start(wait=False)
        assert svc.wait_exit(timeout=60) == 2
        assert "mounts.5.mountpoint: must be an absolute path" in svc.log()
        assert "Traceback" not in svc.log()
        assert mounts_under(svc.base) == []
        assert not (svc.state_dir / "tvix-mountd.pid").exists()


def test_unusable_mountpoint_is_refused_before_anything_mounts(tmp_path: Path) -> None:
    with world(tmp_path, mounts=("a", "b", "c")) as w:
        (w.svc.mountpoint("b") / "precious").write_text("do not hide me")
        w.svc.mountpoint("c").rmdir()
        w.svc.mountpoint("c").write_text("a file")
        w.svc.start(wait=False)
        assert w.svc.wait_exit(timeout=60) != 0
        log = w.svc.log()
        assert f"mounts.1.mountpoint: {w.svc.mountpoint('b')} is not empty" in log, log
        assert f"mounts.2.mountpoint: {w.svc.mountpoint('c')} is not a directory" in log, log
        assert "Traceback" not in log
        assert mounts_under(w.svc.base) == []
        assert (w.svc.mountpoint("b") / "precious").read_text() == "do not hide me"
        w.svc.assert_nothing_left()


def test_health_address_in_use_is_refused_and_nothing_stays_mounted(tmp_path: Path) -> None:
    with world(tmp_path) as w, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", w.svc.port))
        squatter.listen()
        w.svc.start(wait=False)
        assert w.svc.wait_exit(timeout=60) == 2, w.svc.log()
        log = w.svc.log()
        assert f"cannot listen on 127.0.0.1:{w.svc.port}: address already in use" in log, log
        assert "Traceback" not in log, log
        w.svc.assert_nothing_left()


# -- reload ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cli", "sighup"])
def test_reload_applies_the_difference(tmp_path: Path, how: str) -> None:
    with world(tmp_path, mounts=("keep", "drop", "change")) as w:
        w.svc.start()
        before = w.svc.pids()
        change_mount_id = mount_id(w.svc.mountpoint("change"))
        name = w.names[0]
        reader = Reader(
            tmp_path / "reader",
            [
                ("keep", w.path("keep", name), w.sources[name]),
                ("change", w.path("change", name), w.sources[name]),
            ],
        )
        try:
            reader.wait_passes(3)

            w.svc.remove_mount("drop")
            w.svc.mount_entry("change")["list_root"] = True
            w.svc.add_mount("new")
            w.svc.write_config()
            if how == "cli":
                done = w.svc.cli("reload", "--config", str(w.svc.config_path))
                assert done.returncode == 0, done.stderr
                assert set(done.stdout.splitlines()) == {
                    "stopped drop",
                    "handed over change",
                    "started new",
                }
            else:
                w.svc.signal(signal.SIGHUP)

            def applied() -> bool:
                pids = w.svc.pids()
                states = {m["name"]: m["state"] for m in w.svc.status()["mounts"]}
                return (
                    set(pids) == {"keep", "change", "new"}
                    and pids["change"] not in (None, before["change"])
                    and states == dict.fromkeys(pids, "serving")
                )

            w.svc.wait_for(applied, "the reload to be applied")
            w.svc.wait_ready()
            # The untouched mount kept its worker, and the reader saw no blink.
            reader.wait_passes(3)
            result = reader.stop()
        finally:
            reader.kill()
        # Neither the untouched mount nor the changed one (handed over to a
        # new worker on the live connection) blinked.
        assert result.failure_count == 0, result.failures
        assert result.passes >= 6
        assert w.svc.pids()["keep"] == before["keep"]
        assert mount_id(w.svc.mountpoint("change")) == change_mount_id
        # The removed mount is gone from the kernel's table; the others are there.
        points = {point for point, _, _ in w.svc.live_mounts()}
        assert str(w.svc.mountpoint("drop")) not in points
        assert points == {str(w.svc.mountpoint(n)) for n in ("keep", "change", "new")}
        # The changed mount runs its new config: its root can be listed now.
        assert set(os.listdir(w.svc.mountpoint("change"))) == set(w.names)
        w.check_serves("new")
        assert f"reloaded {w.svc.config_path}" in w.svc.log()
        _no_errors(w.svc)


@pytest.mark.parametrize("how", ["cli", "sighup"])
def test_invalid_reload_changes_nothing(tmp_path: Path, how: str) -> None:
    with world(tmp_path) as w:
        w.svc.start()
        before = w.svc.pids()
        w.svc.add_mount("c", colour="red")
        w.svc.write_config()
        if how == "cli":
            done = w.svc.cli("reload", "--config", str(w.svc.config_path))
            assert done.returncode == 2, done
            assert "reload refused: mounts.2.colour: unknown key" in done.stderr
            # The supervisor stays reachable through the (now invalid) config
            # file, and through a relative --state-dir.
            assert w.svc.status_cli()["mounts"][0]["pid"] == before["a"]
            done = w.svc.cli(
                "status", "--state-dir", w.svc.state_dir.name, cwd=w.svc.state_dir.parent
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("MOUNT")
        else:
            w.svc.signal(signal.SIGHUP)
            w.svc.wait_for(
                lambda: "reload refused: mounts.2.colour: unknown key" in w.svc.log(),
                "the refusal in the log",
            )
        assert w.svc.pids() == before
        points = {point for point, _, _ in w.svc.live_mounts()}
        assert points == {str(w.svc.mountpoint("a")), str(w.svc.mountpoint("b"))}
        assert [m["name"] for m in w.svc.status()["mounts"]] == ["a", "b"]
        assert w.svc.readyz()[0] == 200
        w.check_serves("a")


# -- health endpoint ------------------------------------------------------------------


def _shape(value: Any) -> Any:
    """The keys of a JSON document, recursively (values dropped)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__ if value is not None else None


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on `port` (from /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if int(hex_port, 16) == port and fields[3] == "0A":
                    found.append(address)
    return found


def test_health_endpoint(tmp_path: Path) -> None:
    with world(tmp_path) as w:
        svc = w.svc
        svc.start()
        assert svc.http("/healthz") == (200, "ok\n")
        assert svc.readyz() == (200, "ready\n")

        # Some traffic: every file of both trees through both mounts, and a
        # name that is not there (an error). Named from the sources, without
        # listing the mounts: after a listing, files read in name order go
        # into the page cache ahead of their READs, and the daemon would
        # count fewer bytes.
        size = 0
        for mount in ("a", "b"):
            for name, source in w.sources.items():
                for rel, content in tree_files(source).items():
                    assert (w.path(mount, name) / rel).read_bytes() == content
        size = sum(len(v) for s in w.sources.values() for v in tree_files(s).values())
        missing = svc.mountpoint("a") / ("0" * 32 + "-missing")
        with pytest.raises(FileNotFoundError):
            missing.stat()

        def metrics_complete() -> bool:
            code, body = svc.http("/metrics")
            assert code == 200, body
            s = parse_metrics(body)
            for mount in ("a", "b"):
                reads = sample(s, "tvix_mountd_requests_total", mount=mount, op="read")
                count = sample(s, "tvix_mountd_request_seconds_count", mount=mount, op="read")
                inf = sample(
                    s, "tvix_mountd_request_seconds_bucket", mount=mount, op="read", le="+Inf"
                )
                read_bytes = sample(s, "tvix_mountd_read_bytes_total", mount=mount)
                if not reads or count != reads or inf != count:
                    return False
                if read_bytes is None or read_bytes < size:
                    return False
            errors = sample(s, "tvix_mountd_errors_total", mount="a", op="lookup", errno="ENOENT")
            if not errors:
                return False
            hits = sample(s, "tvix_mountd_rootcache_hits_total", store="local")
            misses = sample(s, "tvix_mountd_rootcache_misses_total", store="local")
            assert hits is not None and misses is not None and misses >= 2, (hits, misses)
            return True

        svc.wait_for(metrics_complete, "per-mount figures in /metrics", timeout=15)

        # A restart of b (after its figures were flushed: a killed worker loses
        # up to a second of them) counts, and the figures survive it.
        pid = svc.pids()["b"]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        svc.wait_for(
            lambda: svc.mount_status("b")["restarts"] == 1 and svc.readyz()[0] == 200,
            "b to be restarted",
        )
        s = parse_metrics(svc.http("/metrics")[1])
        assert sample(s, "tvix_mountd_restarts_total", mount="b") == 1
        assert not sample(s, "tvix_mountd_restarts_total", mount="a")
        assert (sample(s, "tvix_mountd_read_bytes_total", mount="b") or 0) >= size

        # Sockets in state_dir are private; health listens on loopback only.
        for name in ("control.sock", "rootcache.sock"):
            st = os.stat(svc.state_dir / name)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert _listening_addresses(svc.port) == ["0100007F"]
        assert SupervisorConfig().health_listen.startswith("127.0.0.1:")
        assert svc.http("/nothing")[0] == 404


@pytest.mark.xdist_group(KERNEL_CACHES)
def test_the_kernel_keeps_store_listings_but_asks_for_the_root_every_time(
    tmp_path: Path,
) -> None:
    with world(tmp_path, mounts=()) as w:
        svc = w.svc
        svc.add_mount("a", list_root=True)
        svc.start()
        store_path = svc.mountpoint("a") / w.names[0]
        requests = DaemonRequests(svc, "a", store_path)

        def list_and_count(path: Path) -> tuple[float, float]:
            """List `path`; then (opendir, readdir) requests so far, that listing's included."""
            assert os.listdir(path), path
            now = requests.now()
            return now["opendir"], now["readdir"]

        for path, cached in ((store_path / "dir0", True), (svc.mountpoint("a"), False)):
            opened, read = list_and_count(path)
            opened_again, read_again = list_and_count(path)
            assert opened_again == opened + 1, path
            if cached:
                assert read_again == read, path
            else:
                assert read_again > read, path


# -- systemd ----------------------------------------------------------------------------


def test_systemd_notify_and_watchdog(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="tvmd-notify-")
    path = os.path.join(directory, "notify.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        world(tmp_path) as w,
    ):
        sock.bind(path)
        sock.settimeout(0.2)
        w.svc.extra_env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}

        def receive(until: str, timeout: float) -> list[tuple[float, str]]:
            got: list[tuple[float, str]] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    got.append((time.monotonic(), sock.recv(4096).decode()))
                    if got[-1][1] == until:
                        return got
            raise AssertionError(f"no {until} within {timeout:g} s; got {got}{w.svc.log()}")

        try:
            w.svc.start(wait=False)
            before_ready = receive("READY=1", 30)
            assert [m for _, m in before_ready] == ["READY=1"]
            # Ready means every mount serves, now.
            for mount in ("a", "b"):
                assert os.listdir(w.path(mount)) != []
            assert {m["state"] for m in w.svc.status()["mounts"]} == {"serving"}
            # Pings every WATCHDOG_USEC / 2 = 0.2 s: over 2 s, about 10 of them,
            # spread over the whole time (receipt times are blurred by load).
            window = time.monotonic() + 2.0
            pings: list[float] = []
            while time.monotonic() < window:
                with contextlib.suppress(TimeoutError):
                    message = sock.recv(4096).decode()
                    assert message == "WATCHDOG=1", message
                    pings.append(time.monotonic())
            assert 4 <= len(pings) <= 40, pings
            assert pings[-1] - pings[0] > 1.0, pings
            w.svc.signal(signal.SIGTERM)
            after = receive("STOPPING=1", 20)
            assert "READY=1" not in [m for _, m in after]
            assert w.svc.wait_exit() == 0
            w.svc.assert_nothing_left()
        finally:
            os.unlink(path)
            os.rmdir(directory)


# -- the log stream ---------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_log_stream(tmp_path: Path, log_format: str) -> None:
    with world(tmp_path, log_format=log_format) as w:
        w.svc.start()
        w.check_serves("a")
        w.svc.signal(signal.SIGTERM)
        assert w.svc.wait_exit() == 0
        lines = [line for line in w.svc.log().splitlines() if line]
        records: list[tuple[str, str, str]] = []  # (tag, logger, message)
        for line in lines:
            if log_format == "json":
                doc = json.loads(line)
                assert set(doc) >= {"ts", "level", "mount", "logger", "msg", "process"}, doc
                records.append((doc["mount"], doc["logger"], doc["msg"]))
            else:
                match = RECORD.match(line)
                assert match, f"a line that is no tagged record: {line!r}"
                records.append((match["tag"], match["logger"], match["msg"]))
        for mount in ("a", "b"):
            point = w.svc.mountpoint(mount)
            assert (mount, "tvix_mountd.workers.mount", f"serving {point}") in records
            assert (mount, "tvix_mountd.workers.mount", f"unmounted {point}") in records
            assert ("supervisor", "tvix_mountd.supervisor.runner", f"mount {mount}: serving") in [
                r for r in records
            ]
        rootcache = [r for r in records if r[1] == "tvix_mountd.supervisor.rootcache"]
        assert rootcache and {tag for tag, _, _ in rootcache} == {"rootcache"}, rootcache
        assert {tag for tag, _, _ in records} == {"supervisor", "rootcache", "a", "b"}


# A process whose main thread ends (pthread_exit) while another thread
# goes on: it is not reaped, as a worker is not while a thread of it waits
# in the kernel; /proc shows its main thread a zombie.
_MAIN_THREAD_ENDS_FIRST = """
import ctypes, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=False).start()
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.readline()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_worker_whose_main_thread_ended_counts_as_gone() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _MAIN_THREAD_ENDS_FIRST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None

    async def gone_within(seconds: float) -> bool:
        # Its exit is never reported to this Child: only /proc can tell.
        with trio.move_on_after(seconds):
            await wait_gone(Child(process.pid), poll=0.05)
            return True
        return False

    try:
        assert process.stdout.readline() == "ready\n"
        assert not trio.run(gone_within, 0.5), "a live process was taken for gone"
        process.stdin.write("end\n")
        process.stdin.flush()
        assert trio.run(gone_within, 10.0), "a process whose main thread ended was not"
        assert process.poll() is None, "the process was reaped: that showed nothing"
    finally:
        process.kill()
        process.wait()
