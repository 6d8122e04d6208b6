"""Generated protobuf and gRPC code (see scripts/gen_proto.py), under short names."""

from tvix_mountd.proto.tvix.castore.protos import castore_pb2 as castore_pb2
from tvix_mountd.proto.tvix.castore.protos import rpc_blobstore_pb2 as rpc_blobstore_pb2
from tvix_mountd.proto.tvix.castore.protos import rpc_blobstore_pb2_grpc as rpc_blobstore_pb2_grpc
from tvix_mountd.proto.tvix.castore.protos import rpc_directory_pb2 as rpc_directory_pb2
from tvix_mountd.proto.tvix.castore.protos import rpc_directory_pb2_grpc as rpc_directory_pb2_grpc
from tvix_mountd.proto.tvix.mountd.protos import control_pb2 as control_pb2
from tvix_mountd.proto.tvix.mountd.protos import control_pb2_grpc as control_pb2_grpc
from tvix_mountd.proto.tvix.mountd.protos import rootcache_pb2 as rootcache_pb2
from tvix_mountd.proto.tvix.mountd.protos import rootcache_pb2_grpc as rootcache_pb2_grpc
from tvix_mountd.proto.tvix.store.protos import pathinfo_pb2 as pathinfo_pb2
from tvix_mountd.proto.tvix.store.protos import rpc_pathinfo_pb2 as rpc_pathinfo_pb2
from tvix_mountd.proto.tvix.store.protos import rpc_pathinfo_pb2_grpc as rpc_pathinfo_pb2_grpc

__all__ = [
    "castore_pb2",
    "control_pb2",
    "control_pb2_grpc",
    "rootcache_pb2",
    "rootcache_pb2_grpc",
    "pathinfo_pb2",
    "rpc_blobstore_pb2",
    "rpc_blobstore_pb2_grpc",
    "rpc_directory_pb2",
    "rpc_directory_pb2_grpc",
    "rpc_pathinfo_pb2",
    "rpc_pathinfo_pb2_grpc",
]
