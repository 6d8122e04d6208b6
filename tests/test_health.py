"""The health endpoint, served for real by hypercorn, asked by http.client."""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIFramework

from tvix_mountd.supervisor.health import HealthError, make_app, serve_health

STATUS = {
    "mounts": [
        {
            "name": "store",
            "mountpoint": "/mnt/store",
            "store": "local",
            "pid": 1234,
            "state": "serving",
            "restarts": 0,
            "since": "2026-01-01T00:00:00Z",
            "error": None,
        }
    ],
    "rootcache": {"pid": 1233, "restarts": 0, "stores": {}},
}
METRICS_BODY = b"# TYPE tvix_mountd_requests_total counter\ntvix_mountd_requests_total 3.0\n"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FakeSource:
    """status_document sync, readiness and metrics async: the app takes either."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.hang = False
        self.entered = trio.Event()
        self.release: trio.Event | None = None
        self.status_error = False

    def status_document(self) -> dict[str, Any]:
        if self.status_error:
            raise RuntimeError("process table is broken")
        return STATUS

    async def readiness(self) -> list[str]:
        self.entered.set()
        if self.hang:
            await trio.sleep_forever()
        if self.release is not None:
            await self.release.wait()
        return self.problems

    async def metrics(self) -> tuple[bytes, str]:
        await trio.lowlevel.checkpoint()
        return METRICS_BODY, METRICS_TYPE


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


Connect = Callable[[], http.client.HTTPConnection]


def connector(address: str) -> Connect:
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        return lambda: UnixHTTPConnection(path)
    host, _, port = address.rpartition(":")
    return lambda: http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def ask(connect: Connect, path: str, method: str = "GET") -> Reply:
    def run() -> Reply:
        conn = connect()
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return Reply(response.status, headers, body)
        finally:
            conn.close()

    return await trio.to_thread.run_sync(run)


@asynccontextmanager
async def serving(listen: str, app: ASGIFramework) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(serve_health, listen, app)
        yield address
        nursery.cancel_scope.cancel()


async def test_every_endpoint_over_tcp() -> None:
    source = FakeSource()
    async with serving("127.0.0.1:0", make_app(source)) as address:
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        connect = connector(address)

        reply = await ask(connect, "/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert reply.headers["content-type"].startswith("text/plain")

        reply = await ask(connect, "/readyz")
        assert (reply.status, reply.body) == (200, b"ready\n")

        reply = await ask(connect, "/status")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        assert json.loads(reply.body) == STATUS

        reply = await ask(connect, "/metrics")
        assert (reply.status, reply.body) == (200, METRICS_BODY)
        assert reply.headers["content-type"] == METRICS_TYPE

        reply = await ask(connect, "/healthz", "HEAD")
        assert (reply.status, reply.body) == (200, b"")
        assert reply.headers["content-length"] == "3"

        reply = await ask(connect, "/nothing-here")
        assert reply.status == 404

        reply = await ask(connect, "/healthz", "POST")
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD"

        reply = await ask(connect, "/nothing-here", "DELETE")
        assert reply.status == 404


async def test_readyz_lists_each_problem() -> None:
    source = FakeSource()
    source.problems = ["store: restarting", "b: /mnt/b did not answer a stat of its root"]
    async with serving("127.0.0.1:0", make_app(source)) as address:
        reply = await ask(connector(address), "/readyz")
    assert reply.status == 503
    assert reply.body.decode().splitlines() == source.problems


async def test_hung_readiness_answers_503_at_the_deadline() -> None:
    source = FakeSource()
    source.hang = True
    async with serving("127.0.0.1:0", make_app(source, readiness_timeout=0.3)) as address:
        start = trio.current_time()
        reply = await ask(connector(address), "/readyz")
        elapsed = trio.current_time() - start
        # The endpoint still serves afterwards.
        assert (await ask(connector(address), "/healthz")).status == 200
    assert reply.status == 503
    assert reply.body == b"readiness checks did not finish within 0.3 s\n"
    assert 0.3 <= elapsed < 5


async def test_a_failing_source_is_a_500_not_a_dead_endpoint() -> None:
    source = FakeSource()
    source.status_error = True
    async with serving("127.0.0.1:0", make_app(source)) as address:
        reply = await ask(connector(address), "/status")
        assert reply.status == 500
        assert (await ask(connector(address), "/healthz")).status == 200


async def test_unix_socket_is_private_and_removed_afterwards(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    async with serving(f"unix:{path}", make_app(FakeSource())) as address:
        assert address == f"unix:{path}"
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        reply = await ask(connector(address), "/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert json.loads((await ask(connector(address), "/status")).body) == STATUS
    assert not path.exists()


async def test_a_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closing leaves the file, as a killed supervisor would
    assert path.exists()
    async with serving(f"unix:{path}", make_app(FakeSource())) as address:
        assert (await ask(connector(address), "/healthz")).status == 200


async def test_a_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(HealthError) as e:
            await serve_health(f"unix:{path}", make_app(FakeSource()))
    assert str(e.value) == f"cannot listen on unix:{path}: another process is listening on {path}"


async def test_a_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "health.sock"
    path.write_text("precious")
    with pytest.raises(HealthError, match="exists and is not a socket"):
        await serve_health(f"unix:{path}", make_app(FakeSource()))
    assert path.read_text() == "precious"


async def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HealthError) as e:
            await serve_health(f"127.0.0.1:{port}", make_app(FakeSource()))
        assert str(e.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
        assert isinstance(e.value.__cause__, OSError)
        assert e.value.__cause__.errno == errno.EADDRINUSE
        # As the supervisor starts it: nursery.start raises the error as is,
        # so the caller can catch it there before the nursery wraps it.
        async with trio.open_nursery() as nursery:
            with pytest.raises(HealthError):
                await nursery.start(serve_health, f"127.0.0.1:{port}", make_app(FakeSource()))


async def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with serving("[::1]:0", make_app(FakeSource())) as address:
        assert address.startswith("[::1]:")
        assert (await ask(connector(address), "/healthz")).body == b"ok\n"


async def test_cancellation_lets_a_request_in_flight_finish() -> None:
    source = FakeSource()
    source.release = trio.Event()
    replies: list[Reply] = []
    stopped = trio.Event()
    server = trio.CancelScope()

    async def run_server(task_status: trio.TaskStatus[str]) -> None:
        with server:
            await serve_health("127.0.0.1:0", make_app(source), task_status=task_status)
        stopped.set()

    async def client(address: str) -> None:
        replies.append(await ask(connector(address), "/readyz"))

    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_server)
        nursery.start_soon(client, address)
        await source.entered.wait()
        server.cancel()
        # Everything settles into the shutdown: the request waits on `release`,
        # serve_health on the server finishing.
        await trio.testing.wait_all_tasks_blocked()
        assert not replies and not stopped.is_set()
        source.release.set()
    assert len(replies) == 1
    assert (replies[0].status, replies[0].body) == (200, b"ready\n")
    host, _, port = address.rpartition(":")
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect((host, int(port)))


async def test_cancellation_does_not_wait_for_a_hung_request() -> None:
    source = FakeSource()
    source.hang = True
    server = trio.CancelScope()
    failures: list[Exception] = []

    async def run_server(task_status: trio.TaskStatus[str]) -> None:
        with server:
            await serve_health(
                "127.0.0.1:0", make_app(source, readiness_timeout=60), task_status=task_status
            )

    async def client(address: str) -> None:
        try:
            await ask(connector(address), "/readyz")
        except http.client.HTTPException as e:
            failures.append(e)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_server)
        nursery.start_soon(client, address)
        await source.entered.wait()
        start = trio.current_time()
        server.cancel()
    assert trio.current_time() - start < 5  # GRACEFUL_TIMEOUT, not the request's 60 s
    assert len(failures) == 1


async def test_access_log_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving("127.0.0.1:0", make_app(FakeSource())) as address:
        await ask(connector(address), "/readyz")
    access = [r for r in caplog.records if r.name == "tvix_mountd.supervisor.health.access"]
    assert any("/readyz" in r.getMessage() for r in access)
    assert {r.levelno for r in access} == {logging.DEBUG}
    messages = [r.getMessage() for r in caplog.records]
    assert f"health endpoint listening on {address}" in messages
    assert not [m for m in messages if m.startswith("Running on")]


def test_no_unix_socket_left_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "health.sock"
    with pytest.raises(HealthError, match="no such file or directory"):
        trio.run(serve_health, f"unix:{missing}", make_app(FakeSource()))
    assert not os.path.exists(missing.parent)
