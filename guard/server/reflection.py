"""gRPC server reflection, opt-in (`--reflection`): lets grpcurl and other generic clients list and describe guard's
services without the .proto files. Off by default, because it tells any caller the API's whole shape; with a
bearer token, reflection calls need the token too.

guard's stubs live in a private descriptor pool (next to tritonclient's copies of the same names), and health's in
protobuf's default pool, so reflection gets a pool of its own holding both.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from guard.server._proto.guard.v1 import guard_pb2
from guard.server._proto.inference import grpc_service_pb2


def enable_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Serve reflection for `services` and for reflection itself."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for module in (grpc_service_pb2, guard_pb2, health_pb2, reflection_pb2):
        add(module.DESCRIPTOR)
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server, pool)
