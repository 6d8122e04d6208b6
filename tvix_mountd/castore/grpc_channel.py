"""gRPC plumbing shared by the grpc+unix / grpc+http backends.

The backends use grpcio's sync API from trio: every call that may block runs in
a worker thread through `run_blocking`, so a backend that makes no progress for
`timeout` seconds fails with BackendUnavailable instead of hanging a FUSE
request. This module is the single home of

- the per-process channel cache (gRPC objects must not cross a fork, so a
  channel belongs to the pid that created it, and is created on first use),
- the mapping of RpcError to the store's error types,
- unary calls, server streams read step by step, and client streams fed
  through a bounded queue, each with that timeout rule.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, cast

import grpc
import trio

from tvix_mountd.castore.addr import StoreAddress
from tvix_mountd.castore.blocking import run_blocking
from tvix_mountd.castore.digests import B3_LEN, B3Digest
from tvix_mountd.castore.errors import BackendUnavailable, StoreError, ValidationError

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S")

# Directories with many entries and 4 MiB+ chunks must fit in one message;
# grpcio's default receive limit is 4 MiB.
MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024

CHANNEL_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    # Notice dead TCP peers (grpc+http) without waiting for the kernel's
    # retransmission timeout. Pings only while calls are active, and not more
    # often than grpc-core servers tolerate by default before they GOAWAY.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # The defaults (1 s growing to 120 s) would keep a mount failing for
    # minutes after its backend came back; the design wants it serving again
    # within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A store address names the store itself; tvix (tonic) ignores proxy
    # variables too, and 127.0.0.1 through an HTTP proxy would be surprising.
    ("grpc.enable_http_proxy", 0),
)

# Codes that mean "the backend is not (currently) there", as opposed to a
# backend that answered with a failure.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)

# How long one worker thread keeps collecting already-flowing stream messages
# before handing them to trio. Short, so that a call that started late in a
# batch still has (almost) the whole timeout to get its answer.
_BATCH_SLICE: Final = 0.05


class RpcNotFound(StoreError):
    """The server answered NOT_FOUND. Backends turn it into None/False; if one
    escapes, it is still a StoreError."""


def rpc_error(e: grpc.RpcError, what: str) -> StoreError:
    """Our error for a failed call; `what` names the call and the address."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
    name = code.name if code is not None else "UNKNOWN"
    message = f"{what}: {name}: {details}"
    if code == grpc.StatusCode.NOT_FOUND:
        return RpcNotFound(message)
    if code in _UNAVAILABLE_CODES:
        return BackendUnavailable(message)
    return StoreError(message)


@contextmanager
def naming(what: str) -> Iterator[None]:
    """Prefix a ValidationError (or IntegrityError) raised inside with `what`,
    so a log line tells which call and backend sent the bad data."""
    try:
        yield
    except ValidationError as e:
        raise type(e)(f"{what}: {e}") from None


def shown_digest(raw: bytes) -> str:
    """A digest from a server for a message, even when it has the wrong length."""
    return str(B3Digest(raw)) if len(raw) == B3_LEN else f"<{len(raw)}-byte digest {raw.hex()}>"


@dataclass
class _Shared:
    channel: grpc.Channel
    refs: int = 0


_lock = threading.Lock()
ChannelOptions = tuple[tuple[str, int], ...]
# By (pid, target, options): services that want other options get their own channel.
_channels: dict[tuple[int, str, ChannelOptions], _Shared] = {}


class GrpcConnection:
    """One service's claim on the process-wide channel to its address.

    The channel is opened on first use in the process that uses it; a claim
    inherited across a fork is dropped, never touched, and the child opens its
    own. Services sharing an address (and options) share the channel; the
    last `close` closes it.
    """

    def __init__(
        self, addr: StoreAddress, *, timeout: float, options: ChannelOptions = CHANNEL_OPTIONS
    ) -> None:
        self.addr = addr
        self.timeout = timeout
        self._target = addr.grpc_target  # raises AddressError for non-gRPC addresses
        self._options = options
        self._pid = 0
        self._channel: grpc.Channel | None = None
        self._stubs: dict[Callable[[grpc.Channel], Any], Any] = {}
        self._closed = False

    def describe(self, what: str) -> str:
        return f"{what} at {self.addr}"

    def channel(self) -> grpc.Channel:
        pid = os.getpid()
        if self._channel is not None and self._pid == pid:
            return self._channel
        if self._closed:
            raise StoreError(f"{self.addr}: the service was closed")
        with _lock:
            key = (pid, self._target, self._options)
            shared = _channels.get(key)
            if shared is None:
                shared = _Shared(grpc.insecure_channel(self._target, options=self._options))
                _channels[key] = shared
            shared.refs += 1
        self._channel, self._pid = shared.channel, pid
        self._stubs.clear()
        return shared.channel

    def stub(self, factory: Callable[[grpc.Channel], S]) -> S:
        """A stub on this process's channel (cached; stubs are cheap but not free)."""
        channel = self.channel()
        stub = self._stubs.get(factory)
        if stub is None:
            stub = self._stubs[factory] = factory(channel)
        return stub

    def close(self) -> None:
        """Drop the claim; closing the channel (cancelling its calls) with the last one."""
        self._closed = True
        channel, self._channel = self._channel, None
        self._stubs.clear()
        if channel is None or self._pid != os.getpid():
            return
        key = (self._pid, self._target, self._options)
        with _lock:
            shared = _channels.get(key)
            if shared is None or shared.channel is not channel:
                return
            shared.refs -= 1
            if shared.refs > 0:
                return
            del _channels[key]
        channel.close()

    async def unary(
        self,
        method: Callable[..., Resp],
        request: object,
        *,
        what: str,
        wait_for_ready: bool = False,
    ) -> Resp:
        """A unary (or client-streaming, given an iterator) call with a deadline.

        grpcio completes the call on its own threads and wakes trio from there:
        no worker thread per call, which would cost about as much again as a
        call over a local socket.
        """
        what = self.describe(what)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        # A grpcio multi-callable: calling it blocks, `.future` does not.
        future = cast(Any, method).future(
            request, timeout=self.timeout, wait_for_ready=wait_for_ready
        )
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            # The gRPC deadline ends the call; the trio one is a backstop.
            with trio.fail_after(self.timeout + 1.0):
                await done.wait()
        except trio.TooSlowError:
            future.cancel()
            raise BackendUnavailable(f"{what}: no answer within {self.timeout:g} s") from None
        except BaseException:
            future.cancel()
            raise
        try:
            result: Resp = future.result()
        except grpc.RpcError as e:
            raise rpc_error(e, what) from None
        except grpc.FutureCancelledError:
            raise BackendUnavailable(f"{what}: call cancelled") from None
        return result

    def open_stream(
        self, method: Callable[[Req], Any], request: Req, *, what: str
    ) -> ResponseStream[Any]:
        """Start a server-streaming call; read it with `ResponseStream.batch`."""
        return ResponseStream(method(request), timeout=self.timeout, what=self.describe(what))

    def start_upload(self, method: Any, *, what: str, max_queued: int) -> RequestStream[Any, Any]:
        """Start a client-streaming call; feed it with `RequestStream.send`."""
        return RequestStream(
            method, timeout=self.timeout, what=self.describe(what), max_queued=max_queued
        )


def _count_one(_item: object) -> int:
    return 1


class ResponseStream(Generic[T]):
    """The messages of a server stream, fetched in worker threads.

    Each `batch` is one worker-thread call with `timeout` as its deadline, and
    it stops collecting once messages have flowed for a few tens of
    milliseconds; so a stream fails with BackendUnavailable when a message is
    (nearly) `timeout` late, however long the stream ran before, and a slow
    but steady stream never does. Messages collected in the same call as a
    stall are lost with it. Not safe for concurrent `batch` calls: callers
    serialise (a lock, or an async generator). `cancel` must be called when
    the stream is abandoned early, so the call and its thread end.
    """

    def __init__(self, call: Any, *, timeout: float, what: str) -> None:
        self._call = call
        self._timeout = timeout
        self.what = what
        self._done = False
        self._failed: StoreError | None = None
        self._pending: grpc.RpcError | None = None

    @property
    def done(self) -> bool:
        return self._done

    def _gather(self, limit: int, weight: Callable[[T], int]) -> list[T]:
        items: list[T] = []
        total = 0
        started = time.monotonic()
        while total < limit:
            try:
                item = next(self._call)
            except StopIteration:
                self._done = True
                break
            except grpc.RpcError as e:
                if not items:
                    raise
                # Hand out what arrived before the failure; the next batch raises.
                self._pending = e
                break
            items.append(item)
            total += weight(item)
            if time.monotonic() - started >= _BATCH_SLICE:
                break
        return items

    async def batch(self, limit: int = 1, weight: Callable[[T], int] = _count_one) -> list[T]:
        """The next messages, up to `limit` by `weight` (at least one); [] at the end."""
        if self._failed is not None:
            raise self._failed
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise self._fail(rpc_error(pending, self.what))
        if self._done:
            return []
        try:
            return await run_blocking(
                self._gather, limit, weight, timeout=self._timeout, what=self.what
            )
        except grpc.RpcError as e:
            raise self._fail(rpc_error(e, self.what)) from None
        except BaseException as e:
            # Timed out or cancelled: a thread may still wait inside the call;
            # cancelling it lets that thread finish, and the stream is unusable.
            if isinstance(e, StoreError):
                self._failed = e
            self.cancel()
            raise

    def _fail(self, error: StoreError) -> StoreError:
        self._done = True
        self._failed = error
        return error

    def cancel(self) -> None:
        """Abandon the call; later batches raise instead of pretending it ended."""
        if not self._done and self._failed is None:
            self._failed = StoreError(f"{self.what}: cancelled")
        self._done = True
        self._call.cancel()


_END: Final = object()


class RequestStream(Generic[Req, Resp]):
    """A client-streaming call fed from trio through a bounded queue.

    grpcio consumes the request iterator in a thread of its own; `send` waits
    (in a worker thread, up to `timeout`) only when the queue is full, i.e.
    when the server stopped taking data.
    """

    def __init__(self, method: Any, *, timeout: float, what: str, max_queued: int) -> None:
        self._timeout = timeout
        self.what = what
        self._queue: queue.Queue[object] = queue.Queue(max_queued)
        self._ended = threading.Event()
        self._future = method.future(self._requests())
        self._future.add_done_callback(lambda _f: self._ended.set())

    def _requests(self) -> Iterator[Req]:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                # A call cancelled or failed while we waited for data: stop,
                # so grpcio's consumer thread does not wait forever.
                if self._ended.is_set():
                    return
                continue
            if item is _END:
                return
            yield cast(Req, item)

    def _put_waiting(self, item: object) -> bool:
        """Queue `item` unless the call ends or `timeout` passes first (so the
        thread ends even when trio stopped waiting for it)."""
        deadline = time.monotonic() + self._timeout
        while not self._ended.is_set() and time.monotonic() < deadline:
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    async def _enqueue(self, item: object) -> None:
        if self._ended.is_set():
            self._raise_ended()
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        try:
            queued = await run_blocking(
                self._put_waiting, item, timeout=self._timeout, what=self.what
            )
        except BaseException:
            self.abort()
            raise
        if not queued:
            if self._ended.is_set():
                self._raise_ended()
            self.abort()
            raise BackendUnavailable(f"{self.what}: not taking data for {self._timeout:g} s")

    def _raise_ended(self) -> None:
        try:
            self._future.result(timeout=0)
        except grpc.RpcError as e:
            raise rpc_error(e, self.what) from None
        except Exception as e:  # grpc.FutureCancelledError and the like
            raise StoreError(f"{self.what}: {type(e).__name__}") from None
        raise StoreError(f"{self.what}: the server answered before the upload ended")

    async def send(self, item: Req) -> None:
        await self._enqueue(item)

    async def finish(self) -> Resp:
        """End the upload and wait for the server's answer."""
        await self._enqueue(_END)

        def result() -> Resp:
            # Slightly longer than trio waits, so the usual failure is
            # run_blocking's BackendUnavailable, and the thread still ends.
            return self._future.result(timeout=self._timeout + 1)  # type: ignore[no-any-return]

        try:
            return await run_blocking(result, timeout=self._timeout, what=self.what)
        except grpc.RpcError as e:
            raise rpc_error(e, self.what) from None
        except grpc.FutureTimeoutError:
            self.abort()
            raise BackendUnavailable(f"{self.what}: no answer within {self._timeout:g} s") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._future.cancel()
        # Free what is queued; the consumer thread stops on its own.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
