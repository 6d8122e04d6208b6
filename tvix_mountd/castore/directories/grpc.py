"""grpc+unix:// and grpc+http:// directories: a tvix-store DirectoryService.

Everything received is validated (canonical ordering, names, digests, the
closure's shape) before it is handed out. Uploads go as one Put stream,
leaves first, the root last, which is the only order tvix's server accepts:
it checks each stream on its own, so a Directory referring to a child that
is not in the same stream is rejected even when the server already has it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import ClassVar, Final

from tvix_mountd.castore.addr import StoreAddress
from tvix_mountd.castore.digests import B3Digest
from tvix_mountd.castore.directories import ClosureChecker, ClosureValidator, DirectoryService
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.castore.gather import gather_found
from tvix_mountd.castore.grpc_channel import GrpcConnection, RpcNotFound, naming, shown_digest
from tvix_mountd.castore.nodes import Directory, validated_directory
from tvix_mountd.proto import castore_pb2, rpc_directory_pb2, rpc_directory_pb2_grpc

# Directories one worker-thread hop may collect from a recursive Get.
_BATCH: Final = 256
# Directories queued for an upload before `put_tree` waits for the server.
_PUT_QUEUE: Final = 256


class GrpcDirectoryService(DirectoryService):
    reads_ahead: ClassVar[bool] = True

    def __init__(self, addr: StoreAddress, *, timeout: float) -> None:
        self._conn = GrpcConnection(addr, timeout=timeout)

    def _stub(self) -> rpc_directory_pb2_grpc.DirectoryServiceStub:
        return self._conn.stub(rpc_directory_pb2_grpc.DirectoryServiceStub)

    async def get(self, digest: B3Digest) -> Directory | None:
        stream = self._conn.open_stream(
            self._stub().Get,
            rpc_directory_pb2.GetDirectoryRequest(digest=digest, recursive=False),
            what=f"Get directory {digest}",
        )
        received: list[castore_pb2.Directory] = []
        try:
            # Read to the end of the stream: a second message is a broken server.
            while len(received) < 2 and (batch := await stream.batch(2 - len(received))):
                received += batch
        except RpcNotFound:
            return None
        finally:
            stream.cancel()
        if not received:
            return None
        if len(received) > 1:
            raise ValidationError(
                f"{stream.what}: more than one directory for a non-recursive request"
            )
        with naming(stream.what):
            return validated_directory(received[0], digest)

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """One Get each, all at once: one round trip's wait for the lot."""
        return await gather_found(digests, self.get)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        stream = self._conn.open_stream(
            self._stub().Get,
            rpc_directory_pb2.GetDirectoryRequest(digest=root, recursive=True),
            what=f"Get directory {root} recursively",
        )
        validator = ClosureValidator(root)
        first = True
        try:
            while batch := await stream.batch(_BATCH):
                for msg in batch:
                    with naming(stream.what):
                        if first:
                            # Checked against the digest asked for, so a wrong
                            # root is an IntegrityError, not "not asked for".
                            directory = validated_directory(msg, root)
                            first = False
                        else:
                            directory = Directory.from_proto(msg)
                        validator.accept(directory)
                    yield directory
        finally:
            stream.cancel()
        # tvix answers a missing root with an empty stream; this reports it.
        validator.finish()

    async def put(self, directory: Directory) -> B3Digest:
        response = await self._conn.unary(
            self._stub().Put, iter([directory.to_proto()]), what=f"Put directory {directory.digest}"
        )
        return _check_root(response, directory.digest, self._conn.describe("Put directory"))

    async def put_tree(self, directories: Iterable[Directory]) -> B3Digest:
        checker = ClosureChecker()
        for directory in directories:
            checker.add(directory)
        root = checker.root()
        upload = self._conn.start_upload(
            self._stub().Put, what=f"Put directory tree {root}", max_queued=_PUT_QUEUE
        )
        try:
            for directory in checker.ordered:
                await upload.send(directory.to_proto())
        except BaseException:
            upload.abort()
            raise
        response = await upload.finish()
        return _check_root(response, root, upload.what)

    async def aclose(self) -> None:
        self._conn.close()


def _check_root(
    response: rpc_directory_pb2.PutDirectoryResponse, expected: B3Digest, what: str
) -> B3Digest:
    if response.root_digest != expected:
        raise IntegrityError(
            f"{what}: the server says the root is {shown_digest(response.root_digest)},"
            f" but it is {expected}"
        )
    return expected
