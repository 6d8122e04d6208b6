"""The generated protobuf code matches proto/, and speaks tvix's wire format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tvix_mountd.proto import castore_pb2, pathinfo_pb2, rpc_directory_pb2, rpc_pathinfo_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_package_and_field_numbers_are_tvix_s() -> None:
    assert castore_pb2.Directory.DESCRIPTOR.full_name == "tvix.castore.v1.Directory"
    fields = {f.name: f.number for f in castore_pb2.FileNode.DESCRIPTOR.fields}
    assert fields == {"name": 1, "digest": 2, "size": 3, "executable": 4}
    fields = {f.name: f.number for f in pathinfo_pb2.NARInfo.DESCRIPTOR.fields}
    assert fields == {
        "nar_size": 1,
        "nar_sha256": 2,
        "signatures": 3,
        "reference_names": 4,
        "deriver": 5,
        "ca": 6,
    }
    assert pathinfo_pb2.PathInfo.DESCRIPTOR.file.name == "tvix/store/protos/pathinfo.proto"
    service = rpc_pathinfo_pb2.DESCRIPTOR.services_by_name["PathInfoService"]
    assert service.full_name == "tvix.store.v1.PathInfoService"
    assert [m.name for m in service.methods] == ["Get", "Put", "CalculateNAR", "List"]
    service = rpc_directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]
    assert service.full_name == "tvix.castore.v1.DirectoryService"
    assert service.methods_by_name["Get"].server_streaming
