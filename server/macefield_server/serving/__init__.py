"""Serving: the gRPC service, request validation, admission, dynamic batching and the server's lifecycle.

Request path (see docs/architecture.md)::

    wire -> service -> validation -> dispatcher (neighbour lists, memory admission)
         -> batcher (batches; the engine through .backend.Backend) -> service (responses)
"""
