"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.grpc_server import GrpcStoreServer


@pytest.fixture
def grpc_store_server() -> Iterator[GrpcStoreServer]:
    """A real tvix-protocol gRPC store server on a unix socket (see tests/grpc_server.py).

    `.addr` is its grpc+unix:// address, `.faults` switches failures on and off,
    `.put_blob` / `.put_directory` / `.put_path_info` pre-load data. Stopped
    and removed when the test ends, however it ends.
    """
    with GrpcStoreServer() as server:
        yield server


@pytest.fixture
def grpc_store_server_tcp() -> Iterator[GrpcStoreServer]:
    """The same server on 127.0.0.1 (a grpc+http:// address)."""
    with GrpcStoreServer(tcp=True) as server:
        yield server


# --- FUSE integration tests (tests/mounting.py, tests/test_fuse_*.py) ----------


@pytest.fixture(scope="module", params=["embedded", "grpc"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store a FUSE test mounts: "embedded" (raw+file blobs and
    sqlite files under tmp_path) or "grpc" (the in-process gRPC test server)."""
    kind: str = request.param
    return kind
