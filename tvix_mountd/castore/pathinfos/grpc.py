"""grpc+unix:// and grpc+http:// path infos: a tvix-store PathInfoService (tvix.store.v1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from tvix_mountd.castore.addr import StoreAddress
from tvix_mountd.castore.errors import IntegrityError, ValidationError
from tvix_mountd.castore.grpc_channel import GrpcConnection, RpcNotFound, naming
from tvix_mountd.castore.nixbase32 import encode as nixbase32_encode
from tvix_mountd.castore.pathinfo import PathInfo
from tvix_mountd.castore.pathinfos import PathInfoService, check_answer
from tvix_mountd.castore.storepath import DIGEST_SIZE
from tvix_mountd.proto import pathinfo_pb2, rpc_pathinfo_pb2, rpc_pathinfo_pb2_grpc

# PathInfos one worker-thread hop may collect from List; small, so a listing
# holds little at a time.
_LIST_BATCH: Final = 64


class GrpcPathInfoService(PathInfoService):
    def __init__(self, addr: StoreAddress, *, timeout: float) -> None:
        self._conn = GrpcConnection(addr, timeout=timeout)

    def _stub(self) -> rpc_pathinfo_pb2_grpc.PathInfoServiceStub:
        return self._conn.stub(rpc_pathinfo_pb2_grpc.PathInfoServiceStub)

    async def get(self, digest: bytes) -> PathInfo | None:
        if len(digest) != DIGEST_SIZE:
            raise ValidationError(
                f"store path digest of {len(digest)} bytes, expected {DIGEST_SIZE}"
            )
        what = f"Get path info {nixbase32_encode(digest)}"
        try:
            msg = await self._conn.unary(
                self._stub().Get,
                rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=digest),
                what=what,
            )
        except RpcNotFound:
            return None
        return check_answer(digest, _parse(msg, self._conn.describe(what)))

    async def put(self, info: PathInfo) -> PathInfo:
        what = f"Put path info {info.store_path}"
        msg = await self._conn.unary(self._stub().Put, info.to_proto(), what=what)
        what = self._conn.describe(what)
        stored = _parse(msg, what)
        # The server may add to it (signatures), but it must be about the same path.
        if stored.store_path != info.store_path:
            raise IntegrityError(f"{what}: the server answered with {stored.store_path}")
        return stored

    async def list(self) -> AsyncIterator[PathInfo]:
        stream = self._conn.open_stream(
            self._stub().List, rpc_pathinfo_pb2.ListPathInfoRequest(), what="List path infos"
        )
        try:
            while batch := await stream.batch(_LIST_BATCH):
                for msg in batch:
                    yield _parse(msg, stream.what)
        finally:
            stream.cancel()

    async def aclose(self) -> None:
        self._conn.close()


def _parse(msg: pathinfo_pb2.PathInfo, what: str) -> PathInfo:
    with naming(f"{what}: invalid PathInfo"):
        return PathInfo.from_proto(msg)
