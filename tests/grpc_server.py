"""A real gRPC server speaking tvix's store protocol, for tests.

It serves `tvix.castore.v1.BlobService`, `tvix.castore.v1.DirectoryService`
and `tvix.store.v1.PathInfoService` from plain dicts, on a unix socket or on
127.0.0.1, and answers the way tvix-store's own server does:

- Stat of a blob kept whole answers an empty chunk list; with the `chunked`
  fault, a blob larger than `faults.chunk_size` is listed as chunks of that
  size, each readable with Read by its own digest (as tvix's chunked object
  store does).
- Read streams 4 KiB messages (tokio's ReaderStream default, which tvix uses).
- A non-recursive directory Get of a missing digest is NOT_FOUND; a recursive
  one is an empty stream; a missing child mid-tree is INTERNAL.
- A directory Put stream is validated on its own, leaves first: a Directory
  referring to a child not sent earlier in the same stream is rejected with
  INTERNAL, even when the server already has that child.

Faults are switched at run time through `server.faults`; see `Faults`.

    with GrpcStoreServer() as server:          # or the `grpc_store_server` fixture
        digest = server.put_blob(b"...")
        server.faults.corrupt_blob = True
        ... GrpcBlobService(parse_address(server.addr), timeout=0.5) ...
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final, NoReturn, TypeVar

import blake3
import grpc

from tvix_mountd.castore.digests import B3_LEN, B3Digest
from tvix_mountd.castore.directories import ClosureChecker
from tvix_mountd.castore.errors import ValidationError
from tvix_mountd.castore.nodes import Directory, SymlinkNode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.storepath import DIGEST_SIZE, StorePath
from tvix_mountd.proto import (
    castore_pb2,
    pathinfo_pb2,
    rpc_blobstore_pb2,
    rpc_blobstore_pb2_grpc,
    rpc_directory_pb2,
    rpc_directory_pb2_grpc,
    rpc_pathinfo_pb2,
    rpc_pathinfo_pb2_grpc,
)

T = TypeVar("T")

READ_MESSAGE_SIZE: Final = 4096
_MAX_MESSAGE: Final = 64 * 1024 * 1024
_POLL: Final = 0.01


class Faults:
    """What the server does wrong, switchable while it runs.

    unavailable             the server is stopped (socket closed); False restarts it
                            on the same address
    hang                    every call blocks before answering, until this is
                            cleared again or the client gives up
    hang_mid_stream         streams send about half, then block like `hang`
    message_delay           seconds between two messages of a stream: a slow but
                            live server (0: none)
    latency                 seconds every call waits before it is answered: a
                            server a network round trip away (0: none)
    error_mid_stream        streams send about half, then fail with INTERNAL;
                            Put fails with INTERNAL after the first message
    wrong_directory_digest  directory Get answers a different, valid directory
    unsorted_directory      directory Get answers a message with unsorted entries
    two_directories         a non-recursive directory Get answers the Directory twice
    short_blob              Read sends fewer bytes than the blob (or chunk) has
    corrupt_blob            Read flips one byte in the middle
    wrong_pathinfo          PathInfo Get answers the PathInfo of another store path
    wrong_put_digest        blob and directory Put answer a digest that is not the
                            one of the data received
    chunked                 Stat lists blobs above `chunk_size` bytes as chunks
    """

    def __init__(self, set_unavailable: Callable[[bool], None]) -> None:
        self._set_unavailable = set_unavailable
        self._unavailable = False
        self.hang = False
        self.hang_mid_stream = False
        self.message_delay = 0.0
        self.latency = 0.0
        self.error_mid_stream = False
        self.wrong_directory_digest = False
        self.unsorted_directory = False
        self.two_directories = False
        self.short_blob = False
        self.corrupt_blob = False
        self.wrong_pathinfo = False
        self.wrong_put_digest = False
        self.chunked = False
        self.chunk_size = 64 * 1024

    @property
    def unavailable(self) -> bool:
        return self._unavailable

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        if value != self._unavailable:
            self._set_unavailable(value)
            self._unavailable = value


class CallLog:
    """What clients asked, for tests that check how a client uses the protocol."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads: list[B3Digest] = []  # Read requests, by digest
        self.stats: list[B3Digest] = []  # Stat requests, by digest
        self.put_message_sizes: list[int] = []  # BlobChunk sizes received by Put
        # Calls blocked by `hang` right now: a client is waiting on them.
        self.held = 0

    def hold(self, delta: int) -> None:
        with self._lock:
            self.held += delta

    def read(self, digest: B3Digest) -> None:
        with self._lock:
            self.reads.append(digest)

    def stat(self, digest: B3Digest) -> None:
        with self._lock:
            self.stats.append(digest)

    def put_message(self, size: int) -> None:
        with self._lock:
            self.put_message_sizes.append(size)


class _State:
    """The data and faults shared by the three servicers."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.lock = threading.Lock()
        self.blobs: dict[B3Digest, bytes] = {}
        self.chunks: dict[B3Digest, bytes] = {}
        self.directories: dict[B3Digest, Directory] = {}
        self.path_infos: dict[bytes, PathInfo] = {}
        self.calls = CallLog()
        self.stopping = threading.Event()

    def wait_while(self, condition: Callable[[], bool], context: grpc.ServicerContext) -> None:
        """Block while `condition` holds, the client waits and the server runs."""
        while condition() and context.is_active() and not self.stopping.is_set():
            time.sleep(_POLL)

    def gate(self, context: grpc.ServicerContext) -> None:
        if self.faults.latency:
            time.sleep(self.faults.latency)
        if not self.faults.hang:
            return
        self.calls.hold(1)
        try:
            self.wait_while(lambda: self.faults.hang, context)
        finally:
            self.calls.hold(-1)

    def stream(self, items: Sequence[T], context: grpc.ServicerContext) -> Iterator[T]:
        """Send `items`; mid-stream faults strike once about half (at least one) went out."""
        half = max(1, len(items) // 2)
        for i, item in enumerate(items):
            if i == half:
                self._mid_stream(context)
            if i and self.faults.message_delay:
                time.sleep(self.faults.message_delay)
            yield item
        if len(items) <= half:
            self._mid_stream(context)

    def _mid_stream(self, context: grpc.ServicerContext) -> None:
        if self.faults.error_mid_stream:
            _abort(context, grpc.StatusCode.INTERNAL, "injected failure mid-stream")
        self.wait_while(lambda: self.faults.hang_mid_stream, context)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("context.abort returns only by raising")


def _digest_arg(raw: bytes, context: grpc.ServicerContext) -> B3Digest:
    if len(raw) != B3_LEN:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid digest length")
    return B3Digest(raw)


class _BlobServicer(rpc_blobstore_pb2_grpc.BlobServiceServicer):
    def __init__(self, state: _State) -> None:
        self._s = state

    def _lookup(self, digest: B3Digest) -> bytes | None:
        with self._s.lock:
            data = self._s.blobs.get(digest)
            return self._s.chunks.get(digest) if data is None else data

    def Stat(
        self, request: rpc_blobstore_pb2.StatBlobRequest, context: grpc.ServicerContext
    ) -> rpc_blobstore_pb2.StatBlobResponse:
        self._s.gate(context)
        digest = _digest_arg(request.digest, context)
        self._s.calls.stat(digest)
        data = self._lookup(digest)
        if data is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"blob {digest} not found")
        response = rpc_blobstore_pb2.StatBlobResponse()
        size = self._s.faults.chunk_size
        if request.send_chunks and self._s.faults.chunked and len(data) > size:
            for start in range(0, len(data), size):
                chunk = data[start : start + size]
                chunk_digest = B3Digest.of(chunk)
                with self._s.lock:
                    self._s.chunks[chunk_digest] = chunk
                response.chunks.add(digest=chunk_digest, size=len(chunk))
        return response

    def Read(
        self, request: rpc_blobstore_pb2.ReadBlobRequest, context: grpc.ServicerContext
    ) -> Iterator[rpc_blobstore_pb2.BlobChunk]:
        self._s.gate(context)
        digest = _digest_arg(request.digest, context)
        self._s.calls.read(digest)
        data = self._lookup(digest)
        if data is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"blob {digest} not found")
        faults = self._s.faults
        if faults.corrupt_blob and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]
        if faults.short_blob and data:
            data = data[: len(data) - max(1, len(data) // 10)]
        yield from self._s.stream(
            [
                rpc_blobstore_pb2.BlobChunk(data=data[start : start + READ_MESSAGE_SIZE])
                for start in range(0, len(data), READ_MESSAGE_SIZE)
            ],
            context,
        )

    def Put(
        self,
        request_iterator: Iterator[rpc_blobstore_pb2.BlobChunk],
        context: grpc.ServicerContext,
    ) -> rpc_blobstore_pb2.PutBlobResponse:
        self._s.gate(context)
        hasher = blake3.blake3()
        parts = []
        for i, msg in enumerate(request_iterator):
            if i == 1 and self._s.faults.error_mid_stream:
                _abort(context, grpc.StatusCode.INTERNAL, "injected failure mid-upload")
            self._s.calls.put_message(len(msg.data))
            hasher.update(msg.data)
            parts.append(msg.data)
        digest = B3Digest(hasher.digest())
        with self._s.lock:
            self._s.blobs.setdefault(digest, b"".join(parts))
        if self._s.faults.wrong_put_digest:
            digest = B3Digest.of(digest)
        return rpc_blobstore_pb2.PutBlobResponse(digest=digest)


def _unsorted(directory: Directory) -> castore_pb2.Directory:
    """`directory` as a message whose entries are out of order (two symlinks swapped in)."""
    msg = directory.to_proto()
    msg.symlinks.add(name=b"zz-second", target=b"t")
    msg.symlinks.add(name=b"zz-first", target=b"t")
    return msg


def _different(directory: Directory) -> Directory:
    """A valid directory that is not `directory`."""
    return Directory([*directory.items(), (b"zz-injected", SymlinkNode(b"elsewhere"))])


class _DirectoryServicer(rpc_directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, state: _State) -> None:
        self._s = state

    def _message(self, directory: Directory) -> castore_pb2.Directory:
        """What is sent for the first (or only) Directory of an answer."""
        if self._s.faults.unsorted_directory:
            return _unsorted(directory)
        if self._s.faults.wrong_directory_digest:
            return _different(directory).to_proto()
        return directory.to_proto()

    def Get(
        self, request: rpc_directory_pb2.GetDirectoryRequest, context: grpc.ServicerContext
    ) -> Iterator[castore_pb2.Directory]:
        self._s.gate(context)
        root = _digest_arg(request.digest, context)
        with self._s.lock:
            directory = self._s.directories.get(root)
        if directory is None:
            if request.recursive:
                return  # tvix answers an empty stream for a missing root
            _abort(context, grpc.StatusCode.NOT_FOUND, f"directory {root} not found")
        answer = [self._message(directory)]
        if self._s.faults.two_directories and not request.recursive:
            answer.append(answer[0])
        missing = None
        if request.recursive:
            # Breadth first, each Directory once, as tvix traverses.
            sent = {root}
            queue = deque(child.digest for _, child in directory.child_directories())
            while queue:
                digest = queue.popleft()
                if digest in sent:
                    continue
                with self._s.lock:
                    child = self._s.directories.get(digest)
                if child is None:
                    missing = digest
                    break
                sent.add(digest)
                queue.extend(c.digest for _, c in child.child_directories())
                answer.append(child.to_proto())
        yield from self._s.stream(answer, context)
        if missing is not None:
            _abort(context, grpc.StatusCode.INTERNAL, f"directory {missing} does not exist")

    def Put(
        self,
        request_iterator: Iterator[castore_pb2.Directory],
        context: grpc.ServicerContext,
    ) -> rpc_directory_pb2.PutDirectoryResponse:
        self._s.gate(context)
        checker = ClosureChecker()
        try:
            for msg in request_iterator:
                checker.add(Directory.from_proto(msg))
            root = checker.root()
        except ValidationError as e:
            _abort(context, grpc.StatusCode.INTERNAL, str(e))
        with self._s.lock:
            for directory in checker.ordered:
                self._s.directories.setdefault(directory.digest, directory)
        if self._s.faults.wrong_put_digest:
            root = B3Digest.of(root)
        return rpc_directory_pb2.PutDirectoryResponse(root_digest=root)


def _other_path(info: PathInfo) -> PathInfo:
    """The same PathInfo, but for a different store path."""
    digest = bytes([info.store_path.digest[0] ^ 0xFF]) + info.store_path.digest[1:]
    return PathInfo(
        store_path=StorePath(digest, info.store_path.name),
        node=info.node,
        nar_size=info.nar_size,
        nar_sha256=info.nar_sha256,
    )


class _PathInfoServicer(rpc_pathinfo_pb2_grpc.PathInfoServiceServicer):
    def __init__(self, state: _State) -> None:
        self._s = state

    def Get(
        self, request: rpc_pathinfo_pb2.GetPathInfoRequest, context: grpc.ServicerContext
    ) -> pathinfo_pb2.PathInfo:
        self._s.gate(context)
        if len(request.by_output_hash) != DIGEST_SIZE:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid output digest length")
        with self._s.lock:
            info = self._s.path_infos.get(request.by_output_hash)
        if info is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, "PathInfo not found")
        if self._s.faults.wrong_pathinfo:
            info = _other_path(info)
        return info.to_proto()

    def Put(
        self, request: pathinfo_pb2.PathInfo, context: grpc.ServicerContext
    ) -> pathinfo_pb2.PathInfo:
        self._s.gate(context)
        try:
            info = PathInfo.from_proto(request)
        except ValidationError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"Invalid path info: {e}")
        with self._s.lock:
            self._s.path_infos[info.store_path.digest] = info
        return info.to_proto()

    def CalculateNAR(
        self, request: castore_pb2.Node, context: grpc.ServicerContext
    ) -> rpc_pathinfo_pb2.CalculateNARResponse:
        _abort(context, grpc.StatusCode.UNIMPLEMENTED, "not implemented by the test server")

    def List(
        self, request: rpc_pathinfo_pb2.ListPathInfoRequest, context: grpc.ServicerContext
    ) -> Iterator[pathinfo_pb2.PathInfo]:
        self._s.gate(context)
        with self._s.lock:
            infos = list(self._s.path_infos.values())
        yield from self._s.stream([info.to_proto() for info in infos], context)


class GrpcStoreServer:
    """The server, its data (`put_*`), its `faults` and a `calls` log.

    Listens on `<tmpdir>/store.sock` (`addr` is `grpc+unix://...`), or with
    `tcp=True` on 127.0.0.1 (`grpc+http://127.0.0.1:PORT`). Use it as a context
    manager: leaving it stops the server and removes the socket directory.
    """

    def __init__(self, *, tcp: bool = False, workers: int = 32) -> None:
        self.faults = Faults(self._set_unavailable)
        self._state = _State(self.faults)
        self.calls = self._state.calls
        self._tcp = tcp
        self._workers = workers
        self._port = 0
        # Short, unlike pytest's tmp_path: unix socket paths are limited to 107 bytes.
        self._dir = tempfile.mkdtemp(prefix="tvix-grpc-")
        self.socket_path = f"{self._dir}/store.sock"
        self.addr = ""
        self._server: Any = None
        self._executor: ThreadPoolExecutor | None = None

    # Data

    def put_blob(self, data: bytes) -> B3Digest:
        digest = B3Digest.of(data)
        with self._state.lock:
            self._state.blobs[digest] = bytes(data)
        return digest

    def put_directory(self, directory: Directory) -> B3Digest:
        with self._state.lock:
            self._state.directories[directory.digest] = directory
        return directory.digest

    def put_path_info(self, info: PathInfo) -> None:
        with self._state.lock:
            self._state.path_infos[info.store_path.digest] = info

    @property
    def blobs(self) -> dict[B3Digest, bytes]:
        return self._state.blobs

    @property
    def directories(self) -> dict[B3Digest, Directory]:
        return self._state.directories

    @property
    def path_infos(self) -> dict[bytes, PathInfo]:
        return self._state.path_infos

    # Life cycle

    def start(self) -> None:
        if self._server is not None:
            return
        self._state.stopping.clear()
        self._executor = ThreadPoolExecutor(max_workers=self._workers)
        server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ],
        )
        rpc_blobstore_pb2_grpc.add_BlobServiceServicer_to_server(_BlobServicer(self._state), server)
        rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(
            _DirectoryServicer(self._state), server
        )
        rpc_pathinfo_pb2_grpc.add_PathInfoServiceServicer_to_server(
            _PathInfoServicer(self._state), server
        )
        if self._tcp:
            self._port = server.add_insecure_port(f"127.0.0.1:{self._port}")
            self.addr = f"grpc+http://127.0.0.1:{self._port}"
        else:
            server.add_insecure_port(f"unix:{self.socket_path}")
            self.addr = f"grpc+unix://{self.socket_path}"
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop listening and cancel every call (hanging ones included)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._state.stopping.set()
        server.stop(grace=None).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _set_unavailable(self, value: bool) -> None:
        if value:
            self.stop()
        else:
            self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> GrpcStoreServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
