"""Register the MaceField servicer with deserializers that survive malformed bytes.

grpcio answers a request whose bytes do not parse as the method's message with
UNKNOWN and logs a traceback.  Here a parse failure becomes a :class:`Malformed`
placeholder that the handler answers with INVALID_ARGUMENT (unary methods) or
that ends the stream with INVALID_ARGUMENT (PredictStream), like any other bad
input.  Handlers are built from the service descriptor, so every method of
``macefield.v1.MaceField`` is covered.
"""

from __future__ import annotations

import grpc
from google.protobuf import symbol_database
from macefield_client.proto.macefield.v1 import macefield_pb2 as pb

from .validation import InvalidRequest

SERVICE = pb.DESCRIPTOR.services_by_name["MaceField"]


class Malformed:
    """Bytes that are not a valid ``type_name`` message."""

    def __init__(self, type_name: str, error: BaseException):
        self.message = f"request: not a valid {type_name} message ({error})"


def _deserializer(message_cls):
    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, and anything else the parser raises
            return Malformed(message_cls.DESCRIPTOR.full_name, exc)

    return deserialize


def _unary(method):
    async def handler(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def _stream(method):
    async def handler(request_iterator, context):
        async def checked():
            async for request in request_iterator:
                if isinstance(request, Malformed):
                    raise InvalidRequest("request", request.message.partition(": ")[2])
                yield request

        async for response in method(checked(), context):
            yield response

    return handler


def add_servicer(servicer, server) -> None:
    """Like ``add_MaceFieldServicer_to_server``, with tolerant request parsing."""
    db = symbol_database.Default()
    handlers = {}
    for m in SERVICE.methods:
        request_cls = db.GetSymbol(m.input_type.full_name)
        response_cls = db.GetSymbol(m.output_type.full_name)
        method = getattr(servicer, m.name)
        kwargs = dict(request_deserializer=_deserializer(request_cls),
                      response_serializer=response_cls.SerializeToString)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(_stream(method), **kwargs)
        elif not m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_unary(method), **kwargs)
        else:  # pragma: no cover - the service has no such method today
            raise NotImplementedError(f"{m.full_name}: streaming shape not supported")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
