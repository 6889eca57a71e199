"""What the ``macefield`` and ``macefield-ipi`` commands share: the server options, the client they make, exit codes.

Exit codes of both commands: 0 done, 1 the server (or i-PI) failed or refused, 2 bad input (a missing
file, an unusable option value), 130 interrupted.  Library code raises exceptions; only the commands'
``main`` turn them into these codes.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..core.channel import TLSConfig, env_tls
from ..core.client import Client

#: exit codes
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class InputError(Exception):
    """Bad input on the command line (exit code 2)."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_server_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options naming the server and how to reach it (``--server``, TLS, token, timeout, retries)."""
    p.add_argument("--server", help="server host[:port] (default $MACEFIELD_SERVER or 127.0.0.1:50051); several "
                                    "replicas: host1:port,host2:port or dns:///name:port (round-robin)")
    p.add_argument("--tls", nargs="?", const=True, default=None, metavar="CA.pem",
                   help="use TLS (optionally trusting this CA file; default: the system roots)")
    p.add_argument("--tls-ca", metavar="CA.pem", help="use TLS trusting this CA file (default $MACEFIELD_TLS_CA)")
    p.add_argument("--tls-cert", metavar="CERT.pem",
                   help="client certificate for mutual TLS (with --tls-key; default $MACEFIELD_TLS_CERT)")
    p.add_argument("--tls-key", metavar="KEY.pem", help="private key of --tls-cert (default $MACEFIELD_TLS_KEY)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="host name the servers' certificates are checked against (default "
                        "$MACEFIELD_TLS_SERVER_NAME); needed for TLS with a list of replicas")
    health = p.add_mutually_exclusive_group()
    health.add_argument("--health-check", dest="health_check", action="store_true", default=None,
                        help="client-side health checking: only replicas reporting SERVING get calls (default: on "
                             "for a list of replicas or a dns: name, off for one host:port)")
    health.add_argument("--no-health-check", dest="health_check", action="store_false",
                        help="no client-side health checking (a proxy reached by a dns: name)")
    p.add_argument("--token", help="bearer token (default $MACEFIELD_TOKEN)")
    p.add_argument("--timeout", type=float, help="per-call deadline, s (default 120)")
    p.add_argument("--retries", type=int, help="retries of a call answered UNAVAILABLE (default 11, with backoff)")
    p.add_argument("--quiet", action="store_true", help="no 'waiting for server', 'wrote ...' or 'head ...' messages "
                                                    "(warnings and the trust summary stay)")


def quiet_broken_pipe() -> None:
    """After a BrokenPipeError on stdout (the reader closed the pipe): point stdout at /dev/null so that the
    interpreter's final flush does not print a second error, as the Python docs recommend."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def tls_from_args(args: argparse.Namespace):
    """The client's ``tls`` argument from --tls / --tls-ca / --tls-cert / --tls-key.

    None when none is given (the client then reads ``$MACEFIELD_TLS_*``); True (system roots) for a bare
    ``--tls``, unless ``$MACEFIELD_TLS_CA`` names a CA; else a :class:`TLSConfig`.
    """
    if args.tls is None and not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    ca = args.tls_ca or (args.tls if isinstance(args.tls, str) else None)
    for option, path in (("--tls-ca", ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{option}: file not found: {path}")
    if ca is None:
        try:
            ca = (env_tls() or TLSConfig()).ca
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if ca is None and not args.tls_cert:
        return True
    return TLSConfig(ca=ca, cert=args.tls_cert, key=args.tls_key)


def waiting(target: str, attempt: int, attempts: int, delay: float, details: str) -> None:
    """The ``on_retry`` hook of the commands: one "waiting for server" line on stderr (delay in s)."""
    of = f"/{attempts}" if attempts else ""
    print(f"macefield: waiting for server at {target} (attempt {attempt}{of}, next in {delay:.1f} s): {details}",
          file=sys.stderr, flush=True)


def client_from_args(args: argparse.Namespace) -> Client:
    """A :class:`~macefield_client.Client` from the :func:`add_server_options` options (unset ones: the
    environment, as for every client); an unusable value raises :class:`InputError`."""
    try:
        return Client(args.server, tls=tls_from_args(args), token=args.token, timeout=args.timeout,
                      retry=args.retries, on_retry=None if args.quiet else waiting,
                      tls_server_name=args.tls_server_name, health_check=args.health_check)
    except ValueError as exc:  # a target that cannot be used, a bad retry count, a $MACEFIELD_TLS_* file missing
        raise InputError(str(exc)) from None


__all__ = [
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "InputError",
    "add_server_options",
    "client_from_args",
    "positive_int",
    "quiet_broken_pipe",
    "tls_from_args",
    "waiting",
]
