"""Thin client for MACE-Field Serve.

The generated gRPC stubs live in :mod:`macefield_client.proto.macefield.v1`
(``macefield_pb2`` messages, ``macefield_pb2_grpc.MaceFieldStub``); they need
grpcio and protobuf only, never torch.  They are generated from
``proto/macefield/v1/*.proto`` by ``proto/generate_stubs.py``.
"""

__version__ = "0.1.0"
