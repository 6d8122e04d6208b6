"""Generated protobuf and gRPC code (see scripts/gen_proto.py), under short names.

Loaded on first use: a process that only needs the messages (a worker on the
embedded store) never imports grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULES = {
    "castore_pb2": "tvix.castore.protos.castore_pb2",
    "rpc_blobstore_pb2": "tvix.castore.protos.rpc_blobstore_pb2",
    "rpc_blobstore_pb2_grpc": "tvix.castore.protos.rpc_blobstore_pb2_grpc",
    "rpc_directory_pb2": "tvix.castore.protos.rpc_directory_pb2",
    "rpc_directory_pb2_grpc": "tvix.castore.protos.rpc_directory_pb2_grpc",
    "pathinfo_pb2": "tvix.store.protos.pathinfo_pb2",
    "rpc_pathinfo_pb2": "tvix.store.protos.rpc_pathinfo_pb2",
    "rpc_pathinfo_pb2_grpc": "tvix.store.protos.rpc_pathinfo_pb2_grpc",
    "control_pb2": "tvix.mountd.protos.control_pb2",
    "control_pb2_grpc": "tvix.mountd.protos.control_pb2_grpc",
    "rootcache_pb2": "tvix.mountd.protos.rootcache_pb2",
    "rootcache_pb2_grpc": "tvix.mountd.protos.rootcache_pb2_grpc",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    target = _MODULES.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{target}")
    globals()[name] = module
    return module


if TYPE_CHECKING:
    from tvix_mountd.proto.tvix.castore.protos import castore_pb2 as castore_pb2
    from tvix_mountd.proto.tvix.castore.protos import rpc_blobstore_pb2 as rpc_blobstore_pb2
    from tvix_mountd.proto.tvix.castore.protos import (
        rpc_blobstore_pb2_grpc as rpc_blobstore_pb2_grpc,
    )
    from tvix_mountd.proto.tvix.castore.protos import rpc_directory_pb2 as rpc_directory_pb2
    from tvix_mountd.proto.tvix.castore.protos import (
        rpc_directory_pb2_grpc as rpc_directory_pb2_grpc,
    )
    from tvix_mountd.proto.tvix.mountd.protos import control_pb2 as control_pb2
    from tvix_mountd.proto.tvix.mountd.protos import control_pb2_grpc as control_pb2_grpc
    from tvix_mountd.proto.tvix.mountd.protos import rootcache_pb2 as rootcache_pb2
    from tvix_mountd.proto.tvix.mountd.protos import rootcache_pb2_grpc as rootcache_pb2_grpc
    from tvix_mountd.proto.tvix.store.protos import pathinfo_pb2 as pathinfo_pb2
    from tvix_mountd.proto.tvix.store.protos import rpc_pathinfo_pb2 as rpc_pathinfo_pb2
    from tvix_mountd.proto.tvix.store.protos import (
        rpc_pathinfo_pb2_grpc as rpc_pathinfo_pb2_grpc,
    )
