"""The server side's command lines, one module each.

* ``macefield-serve`` (:mod:`.serve`): run the gRPC server;
* ``macefield-health`` (:mod:`.health`): a grpc.health.v1 probe for container health checks;
* ``macefield-train`` (:mod:`.train`): train or fine-tune a FieldMACE, write its model card;
* ``macefield-calibrate`` (:mod:`.calibrate`): extrapolation statistics for a model;
* ``macefield-convert`` (:mod:`.convert`): any supported checkpoint to the native safe format.
"""
