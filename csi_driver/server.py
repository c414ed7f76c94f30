"""The gRPC face of the plugin: Identity, Node and a one-line Controller, over a unix socket.

Each servicer method converts the request, calls :class:`~csi_driver.node.NodeDriver`,
and turns a :class:`~csi_driver.node.CsiError` into the gRPC status; every call logs one
line with its outcome and duration.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from mmfs.options import package_version
from google.protobuf import wrappers_pb2

from . import csi_pb2 as pb
from . import csi_pb2_grpc as pb_grpc
from .node import CsiError, NodeDriver, PublishRequest

log = logging.getLogger("csi_driver.rpc")


def vendor_version() -> str:
    return package_version()


def _rpc(describe: Callable[[Any], str] = lambda _req: "") -> Callable:
    """Decorate a servicer method: one log line per call, CsiError -> gRPC status."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            detail = describe(request)
            try:
                response = method(self, request, context)
            except CsiError as exc:
                log.info("%s %s-> %s: %s (%.0f ms)", method.__name__, detail, exc.code.name, exc.message, _ms(start))
                context.abort(exc.code, exc.message)
            except Exception as exc:
                log.exception("%s %s-> INTERNAL (%.0f ms)", method.__name__, detail, _ms(start))
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            if isinstance(response, tuple):  # (response, what the call resolved to)
                response, note = response
                detail += note
            log.info("%s %s-> OK (%.0f ms)", method.__name__, detail, _ms(start))
            return response

        return handler

    return wrap


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000.0


def _publish_detail(req: pb.NodePublishVolumeRequest) -> str:
    ctx = req.volume_context
    return (
        f"volume_id={req.volume_id!r} target={req.target_path!r} repo={ctx.get('repo', '')!r} "
        f"revision={ctx.get('revision', 'main')!r} readonly={req.readonly} "
    )


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, driver: NodeDriver) -> None:
        self.driver = driver

    @_rpc()
    def GetPluginInfo(self, request, context):  # noqa: N802 - gRPC names
        return pb.GetPluginInfoResponse(name=self.driver.config.driver_name, vendor_version=vendor_version())

    @_rpc()
    def GetPluginCapabilities(self, request, context):  # noqa: N802
        # Node-only plugin: no controller service, no topology constraints.
        return pb.GetPluginCapabilitiesResponse()

    @_rpc()
    def Probe(self, request, context):  # noqa: N802
        problem = self.driver.mount_problem()
        if problem:
            log.info("Probe: not ready: %s", problem)
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=problem is None))


class ControllerServicer(pb_grpc.ControllerServicer):
    @_rpc()
    def ControllerGetCapabilities(self, request, context):  # noqa: N802
        unknown = pb.ControllerServiceCapability.RPC.Type.UNKNOWN
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=unknown))]
        )


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, driver: NodeDriver) -> None:
        self.driver = driver

    @_rpc(_publish_detail)
    def NodePublishVolume(self, request, context):  # noqa: N802
        has_cap = request.HasField("volume_capability")
        cap = request.volume_capability
        commit = self.driver.publish(
            PublishRequest(
                volume_id=request.volume_id,
                target_path=request.target_path,
                volume_context=dict(request.volume_context),
                readonly=request.readonly,
                has_capability=has_cap,
                block=has_cap and cap.WhichOneof("access_type") == "block",
                access_mode=cap.access_mode.mode if has_cap and cap.HasField("access_mode") else 0,
                secrets=dict(request.secrets),
            )
        )
        return pb.NodePublishVolumeResponse(), f"commit={commit} "

    @_rpc(lambda r: f"volume_id={r.volume_id!r} target={r.target_path!r} ")
    def NodeUnpublishVolume(self, request, context):  # noqa: N802
        self.driver.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    @_rpc(lambda r: f"volume_id={r.volume_id!r} path={r.volume_path!r} ")
    def NodeGetVolumeStats(self, request, context):  # noqa: N802
        st, problem = self.driver.volume_stats(request.volume_id, request.volume_path)
        if st is None:
            return pb.NodeGetVolumeStatsResponse(volume_condition=pb.VolumeCondition(abnormal=True, message=problem or ""))
        unit = pb.VolumeUsage.Unit
        return pb.NodeGetVolumeStatsResponse(
            usage=[
                pb.VolumeUsage(
                    unit=unit.BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                ),
                pb.VolumeUsage(unit=unit.INODES, total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree),
            ],
            volume_condition=pb.VolumeCondition(abnormal=False, message="ok"),
        )

    @_rpc()
    def NodeGetCapabilities(self, request, context):  # noqa: N802
        rpc = pb.NodeServiceCapability.RPC
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[
                pb.NodeServiceCapability(rpc=rpc(type=rpc.Type.GET_VOLUME_STATS)),
                pb.NodeServiceCapability(rpc=rpc(type=rpc.Type.VOLUME_CONDITION)),
            ]
        )

    @_rpc()
    def NodeGetInfo(self, request, context):  # noqa: N802
        return pb.NodeGetInfoResponse(node_id=self.driver.config.node_id)


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock`` -> ``/csi/csi.sock``."""
    if not endpoint.startswith("unix://"):
        raise ValueError(f"endpoint must be unix:///path/to/csi.sock, not {endpoint!r}")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise ValueError(f"endpoint path must be absolute: {endpoint!r}")
    return path


def make_server(driver: NodeDriver, endpoint: str, workers: int = 8) -> grpc.Server:
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a previous run; binding would fail
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi-rpc"))
    pb_grpc.add_IdentityServicer_to_server(IdentityServicer(driver), server)
    pb_grpc.add_NodeServicer_to_server(NodeServicer(driver), server)
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(), server)
    server.add_insecure_port(f"unix://{path}")
    return server
