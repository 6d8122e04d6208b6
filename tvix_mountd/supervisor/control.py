"""The control socket: `tvix-mountd status | stop | reload | restart` talk to the supervisor.

A gRPC server (tvix.mountd.v1.Control) on a unix socket in state_dir, mode
0600. grpcio runs handlers in its own threads; each hops into the
supervisor's trio loop to read or change state there.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import grpc
import trio

from tvix_mountd.grpc_server import serve_unix
from tvix_mountd.proto import control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    from tvix_mountd.supervisor.service import Supervisor

log = logging.getLogger(__name__)


class _ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, supervisor: Supervisor, token: trio.lowlevel.TrioToken) -> None:
        self._supervisor = supervisor
        self._token = token

    def Status(
        self, request: control_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> control_pb2.StatusResponse:
        document = trio.from_thread.run(self._supervisor.status_document, trio_token=self._token)
        return control_pb2.StatusResponse(status_json=json.dumps(document))

    def Stop(
        self, request: control_pb2.StopRequest, context: grpc.ServicerContext
    ) -> control_pb2.StopResponse:
        trio.from_thread.run_sync(self._supervisor.request_shutdown, trio_token=self._token)
        return control_pb2.StopResponse()

    def Reload(
        self, request: control_pb2.ReloadRequest, context: grpc.ServicerContext
    ) -> control_pb2.ReloadResponse:
        result = trio.from_thread.run(self._supervisor.reload, trio_token=self._token)
        return control_pb2.ReloadResponse(problems=result["problems"], changes=result["changes"])

    def Restart(
        self, request: control_pb2.RestartRequest, context: grpc.ServicerContext
    ) -> control_pb2.RestartResponse:
        done, problems = trio.from_thread.run(
            self._supervisor.restart, list(request.mounts), trio_token=self._token
        )
        return control_pb2.RestartResponse(done=done, problems=problems)


async def serve_control(
    supervisor: Supervisor,
    socket_path: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    servicer = _ControlServicer(supervisor, trio.lowlevel.current_trio_token())
    await serve_unix(
        lambda server: control_pb2_grpc.add_ControlServicer_to_server(servicer, server),
        socket_path,
        task_status=task_status,
    )
