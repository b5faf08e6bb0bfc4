"""One descriptor pool for server reflection, spanning the default pool and the OIP stubs' own."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from xaid.oip import grpc_service_pb2 as oip


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """The files declaring `service_names` and everything they import, wherever registered."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for name in service_names:
        try:
            add(descriptor_pool.Default().FindFileContainingSymbol(name))
        except KeyError:
            add(oip.DESCRIPTOR.pool.FindFileContainingSymbol(name))
    return pool
