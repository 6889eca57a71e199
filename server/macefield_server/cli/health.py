"""``macefield-health``: a small grpc.health.v1 probe for container HEALTHCHECKs.

    macefield-health                          # 127.0.0.1:50051, overall server health ("")
    macefield-health --address host:port --service macefield.v1.MaceField --timeout 5
    macefield-health --tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]   # TLS / mutual TLS server

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING while
models load and warm up or while draining after SIGTERM, unreachable, timeout),
2 on bad arguments.  One line on stdout says what it saw.  The default address
comes from ``$MACEFIELD_HEALTH_ADDRESS`` when set.  Imports grpcio only (no
torch), so it is cheap enough to run every few seconds.  Health needs no bearer
token; a TLS server needs ``--tls-ca`` (``$MACEFIELD_HEALTH_TLS_CA``), a mutual-TLS
one also a client certificate and key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

DEFAULT_ADDRESS = "127.0.0.1:50051"


def check(address: str, service: str = "", timeout: float = 5.0, tls_ca: Optional[str] = None,
          tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> str:
    """The health status name the server reports (``SERVING``, ``NOT_SERVING``, ...); raises grpc.RpcError.
    With ``tls_ca`` (PEM file) the channel uses TLS; ``tls_cert``/``tls_key`` add a client certificate."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    if tls_ca or tls_cert:
        creds = grpc.ssl_channel_credentials(read(tls_ca) if tls_ca else None, read(tls_key) if tls_key else None,
                                             read(tls_cert) if tls_cert else None)
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="macefield-health", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("MACEFIELD_HEALTH_ADDRESS") or DEFAULT_ADDRESS,
                   help="server gRPC address host:port (default $MACEFIELD_HEALTH_ADDRESS or %(default)s)")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    env = os.environ.get
    p.add_argument("--tls-ca", default=env("MACEFIELD_HEALTH_TLS_CA") or None,
                   help="PEM CA of a TLS server (default $MACEFIELD_HEALTH_TLS_CA; none: plaintext)")
    p.add_argument("--tls-cert", default=env("MACEFIELD_HEALTH_TLS_CERT") or None,
                   help="client certificate for a mutual-TLS server (default $MACEFIELD_HEALTH_TLS_CERT)")
    p.add_argument("--tls-key", default=env("MACEFIELD_HEALTH_TLS_KEY") or None,
                   help="its private key (default $MACEFIELD_HEALTH_TLS_KEY)")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")

    import grpc

    try:
        status = check(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as exc:
        print(f"macefield-health: {exc}")
        return 2
    except grpc.RpcError as exc:
        print(f"macefield-health: {args.address}: {exc.code().name}: {exc.details()}")
        return 1
    print(f"macefield-health: {args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
