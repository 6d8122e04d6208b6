"""The health endpoint: /healthz, /readyz, /status and /metrics over HTTP.

A plain ASGI application served by hypercorn's trio worker, on a TCP address
("HOST:PORT", "[::1]:PORT") or a unix socket ("unix:/abs/path", mode 0600).
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

import hypercorn.config
import hypercorn.logging
import hypercorn.trio
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ResponseSummary,
    Scope,
    WWWScope,
)

from tvix_mountd.unixsock import clear_stale_socket

log = logging.getLogger(__name__)

# A readiness check that outlives this answers 503: a hung mount must not
# hang the probe (kubelet and systemd give up and see nothing useful).
READINESS_TIMEOUT: Final = 3.0
# /status and /metrics get the same bound; they ask the rootcache over RPC.
DOCUMENT_TIMEOUT: Final = 5.0
# How long in-flight requests may finish once the server is told to stop.
GRACEFUL_TIMEOUT: Final = 1.0

_TEXT: Final = b"text/plain; charset=utf-8"
_JSON: Final = b"application/json"

T = TypeVar("T")


class HealthError(Exception):
    """The endpoint cannot listen (a user's problem, reported plainly)."""


class HealthSource(Protocol):
    """What the endpoint shows; the supervisor implements it.

    Each method may be a plain or an async method. Plain ones run on the event
    loop and must be quick; async ones are cut off at a deadline.
    """

    def status_document(self) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """{"mounts": [{"name", "mountpoint", "store", "pid", "state", "restarts",
        "since", "error"}...], "rootcache": {...}}"""

    def readiness(self) -> list[str] | Awaitable[list[str]]:
        """Empty when every mount serves, else one line per problem, e.g.
        "store: restarting"."""

    def metrics(self) -> tuple[bytes, str] | Awaitable[tuple[bytes, str]]:
        """The Prometheus exposition and its content type."""


class _Response:
    __slots__ = ("body", "content_type", "extra_headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: bytes = _TEXT,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra_headers = extra_headers


async def _call(
    what: Callable[[], T | Awaitable[T]], seconds: float
) -> T | None:  # None: the deadline passed
    result = what()
    if not inspect.isawaitable(result):
        return result
    with trio.move_on_after(seconds):
        return await result
    return None


class _HealthApp:
    def __init__(
        self, source: HealthSource, readiness_timeout: float, document_timeout: float
    ) -> None:
        self.source = source
        self.readiness_timeout = readiness_timeout
        self.document_timeout = document_timeout
        self.routes: dict[str, Callable[[], Awaitable[_Response]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/status": self._status,
            "/metrics": self._metrics,
        }

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: hypercorn answers a refusal when we return without accepting
        method = scope["method"]
        route = self.routes.get(scope["path"])
        if route is None:
            response = _Response(404, b"not found\n")
        elif method not in ("GET", "HEAD"):
            response = _Response(
                405, b"method not allowed\n", extra_headers=((b"allow", b"GET, HEAD"),)
            )
        else:
            try:
                response = await route()
            except Exception:
                log.exception("health endpoint %s failed", scope["path"])
                response = _Response(500, b"internal error\n")
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
            *response.extra_headers,
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if method == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        # Answered so that hypercorn does not log "lifespan unsupported" at start.
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _healthz(self) -> _Response:
        return _Response(200, b"ok\n")

    async def _readyz(self) -> _Response:
        problems = await _call(self.source.readiness, self.readiness_timeout)
        if problems is None:
            problems = [f"readiness checks did not finish within {self.readiness_timeout:g} s"]
        if not problems:
            return _Response(200, b"ready\n")
        return _Response(503, "".join(f"{p}\n" for p in problems).encode())

    async def _status(self) -> _Response:
        document = await _call(self.source.status_document, self.document_timeout)
        if document is None:
            return _Response(
                503, f"status did not finish within {self.document_timeout:g} s\n".encode()
            )
        return _Response(200, json.dumps(document).encode() + b"\n", _JSON)

    async def _metrics(self) -> _Response:
        result = await _call(self.source.metrics, self.document_timeout)
        if result is None:
            return _Response(
                503, f"metrics did not finish within {self.document_timeout:g} s\n".encode()
            )
        body, content_type = result
        return _Response(200, body, content_type.encode())


def make_app(
    source: HealthSource,
    *,
    readiness_timeout: float = READINESS_TIMEOUT,
    document_timeout: float = DOCUMENT_TIMEOUT,
) -> ASGIFramework:
    """The endpoint as an ASGI 3 application (GET and HEAD only)."""
    return _HealthApp(source, readiness_timeout, document_timeout)


def _no_banner(record: logging.LogRecord) -> bool:
    # "Running on http://... (CTRL + C to quit)": serve_health says it better.
    return not str(record.msg).startswith("Running on ")


_server_log = logging.getLogger(f"{__name__}.server")
_server_log.addFilter(_no_banner)
_access_log = logging.getLogger(f"{__name__}.access")


class _Logger(hypercorn.logging.Logger):
    """hypercorn's logger with the access log moved down to debug.

    A probe every few seconds would otherwise drown the supervisor's own lines.
    """

    async def access(
        self, request: WWWScope, response: ResponseSummary, request_time: float
    ) -> None:
        logger = self.access_logger
        if logger is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug(self.access_log_format, self.atoms(request, response, request_time))


class _Config(hypercorn.config.Config):
    """A hypercorn config whose sockets are bound before hypercorn runs.

    Binding here, outside hypercorn's nurseries, lets a bind error surface as
    one plain OSError, and leaves a moment between bind and listen to make a
    unix socket private before anyone can connect to it.
    """

    def __init__(self, listen: str) -> None:
        self.bind = [listen]
        self.logger_class = _Logger
        # Loggers, not "-": hypercorn would give "-" a stderr handler of its own,
        # bypassing the supervisor's formatting and the mount tag.
        self.errorlog = _server_log
        self.accesslog = _access_log
        self.graceful_timeout = GRACEFUL_TIMEOUT
        self.include_server_header = False
        self._bound: hypercorn.config.Sockets | None = None

    def bind_now(self) -> hypercorn.config.Sockets:
        sockets = super().create_sockets()
        for sock in sockets.insecure_sockets:
            if sock.family == socket.AF_UNIX:
                # Bound but not yet listening: a connect now is refused, so
                # nobody gets in before the mode is tightened.
                os.chmod(sock.getsockname(), 0o600)
        self._bound = sockets
        return sockets

    def create_sockets(self) -> hypercorn.config.Sockets:
        assert self._bound is not None, "bind_now() first"
        return self._bound


def _describe(listen: str, sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return listen
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _clear_unix_path(listen: str, path: str) -> None:
    try:
        clear_stale_socket(path)
    except OSError as e:
        raise HealthError(f"cannot listen on {listen}: {e}") from None


def _bind(listen: str) -> tuple[_Config, hypercorn.config.Sockets]:
    config = _Config(listen)
    if listen.startswith("unix:"):
        _clear_unix_path(listen, listen.removeprefix("unix:"))
    try:
        return config, config.bind_now()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif isinstance(e, socket.gaierror):
            reason = f"cannot resolve the host ({e.strerror})"
        raise HealthError(f"cannot listen on {listen}: {reason[:1].lower()}{reason[1:]}") from e


async def serve_health(
    listen: str,
    app: ASGIFramework,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listen` until cancelled; started() with the bound address.

    Raises HealthError, before started(), when the address cannot be bound.
    Cancellation is turned into hypercorn's graceful shutdown: requests in
    flight get GRACEFUL_TIMEOUT to finish, then the sockets close.
    """
    config, sockets = _bind(listen)
    address = _describe(listen, sockets.insecure_sockets[0])
    unix_path = listen.removeprefix("unix:") if listen.startswith("unix:") else None
    unix_inode = os.stat(unix_path).st_ino if unix_path else None
    stop = trio.Event()
    finished = trio.Event()
    # Shielded so that an outer cancellation reaches hypercorn as a shutdown
    # request (stop) rather than as a cancellation of every connection.
    server_scope = trio.CancelScope(shield=True)

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            with server_scope:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=stop.wait, task_status=task_status, mode="asgi"
                )
        finally:
            finished.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            log.info("health endpoint listening on %s", address)
            task_status.started(address)
            try:
                await trio.sleep_forever()
            finally:
                stop.set()
                with trio.move_on_after(GRACEFUL_TIMEOUT + 1.0) as grace:
                    grace.shield = True
                    await finished.wait()
                server_scope.cancel()
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
        if unix_path is not None:
            # Only our own socket: a successor may already have bound the path.
            with contextlib.suppress(OSError):
                if os.stat(unix_path).st_ino == unix_inode:
                    os.unlink(unix_path)
