"""PathInfo: a store path, its root node and NAR metadata (tvix.store.v1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from tvix_mountd.castore.errors import ValidationError
from tvix_mountd.castore.nodes import Node, node_from_proto, node_to_proto
from tvix_mountd.castore.storepath import DIGEST_SIZE, StorePath
from tvix_mountd.proto import pathinfo_pb2


class CAHashType(IntEnum):
    """tvix.store.v1.NARInfo.CA.Hash, with the digest length each implies."""

    NAR_SHA256 = 0
    NAR_SHA1 = 1
    NAR_SHA512 = 2
    NAR_MD5 = 3
    TEXT_SHA256 = 4
    FLAT_SHA1 = 5
    FLAT_MD5 = 6
    FLAT_SHA256 = 7
    FLAT_SHA512 = 8

    @property
    def digest_len(self) -> int:
        algo = self.name.rsplit("_", 1)[1]
        return {"SHA256": 32, "SHA1": 20, "SHA512": 64, "MD5": 16}[algo]


@dataclass(frozen=True, slots=True)
class ContentAddress:
    type: CAHashType
    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != self.type.digest_len:
            raise ValidationError(
                f"content address {self.type.name}: digest of {len(self.digest)} bytes,"
                f" expected {self.type.digest_len}"
            )


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) != 64:
            raise ValidationError(f"signature {self.name!r}: {len(self.data)} bytes, expected 64")


@dataclass(frozen=True, slots=True)
class PathInfo:
    store_path: StorePath
    node: Node
    nar_size: int
    nar_sha256: bytes
    references: tuple[StorePath, ...] = ()
    signatures: tuple[Signature, ...] = ()
    deriver: StorePath | None = None
    ca: ContentAddress | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.nar_sha256) != 32:
            raise ValidationError(f"nar_sha256 of {len(self.nar_sha256)} bytes, expected 32")

    def to_proto(self) -> pathinfo_pb2.PathInfo:
        narinfo = pathinfo_pb2.NARInfo(
            nar_size=self.nar_size,
            nar_sha256=self.nar_sha256,
            signatures=[
                pathinfo_pb2.NARInfo.Signature(name=s.name, data=s.data) for s in self.signatures
            ],
            reference_names=[r.basename for r in self.references],
        )
        if self.deriver is not None:
            narinfo.deriver.CopyFrom(
                pathinfo_pb2.StorePath(name=self.deriver.name, digest=self.deriver.digest)
            )
        if self.ca is not None:
            narinfo.ca.CopyFrom(
                pathinfo_pb2.NARInfo.CA(
                    type=self.ca.type.value,  # type: ignore[arg-type]
                    digest=self.ca.digest,
                )
            )
        return pathinfo_pb2.PathInfo(
            node=node_to_proto(self.store_path.basename.encode(), self.node),
            references=[r.digest for r in self.references],
            narinfo=narinfo,
        )

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def from_proto(cls, msg: pathinfo_pb2.PathInfo) -> PathInfo:
        """Validate as tvix does: node present and named by a store path, references
        consistent with reference_names, digests of the right lengths."""
        if not msg.HasField("node"):
            raise ValidationError("PathInfo has no node")
        if not msg.HasField("narinfo"):
            raise ValidationError("PathInfo has no narinfo")
        name, node = node_from_proto(msg.node)
        store_path = StorePath.parse(name)
        narinfo = msg.narinfo
        if len(narinfo.reference_names) != len(msg.references):
            raise ValidationError(
                f"{len(msg.references)} references but"
                f" {len(narinfo.reference_names)} reference names"
            )
        references = []
        for i, (digest, ref_name) in enumerate(
            zip(msg.references, narinfo.reference_names, strict=True)
        ):
            if len(digest) != DIGEST_SIZE:
                raise ValidationError(f"reference {i}: digest of {len(digest)} bytes")
            ref = StorePath.parse(ref_name)
            if ref.digest != digest:
                raise ValidationError(f"reference {i}: {ref_name} does not match its digest")
            references.append(ref)
        deriver = None
        if narinfo.HasField("deriver"):
            deriver = StorePath(narinfo.deriver.digest, narinfo.deriver.name)
        ca = None
        if narinfo.HasField("ca"):
            try:
                ca_type = CAHashType(narinfo.ca.type)
            except ValueError as e:
                raise ValidationError(f"unknown content address type {narinfo.ca.type}") from e
            ca = ContentAddress(ca_type, narinfo.ca.digest)
        return cls(
            store_path=store_path,
            node=node,
            nar_size=narinfo.nar_size,
            nar_sha256=narinfo.nar_sha256,
            references=tuple(references),
            signatures=tuple(Signature(s.name, s.data) for s in narinfo.signatures),
            deriver=deriver,
            ca=ca,
        )

    @classmethod
    def decode(cls, data: bytes) -> PathInfo:
        msg = pathinfo_pb2.PathInfo()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError or others on garbage
            raise ValidationError(f"undecodable PathInfo: {e}") from e
        return cls.from_proto(msg)
