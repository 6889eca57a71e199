"""``macefield-serve``: run the MACE-Field gRPC server.

    macefield-serve                                  # embedded default model, 127.0.0.1:50051
    macefield-serve --host 0.0.0.0 --port 50051 --metrics-port 9100 --config serve.yaml
    macefield-serve --model sio2.pt --model batio3.pt --trust-pickle
    macefield-serve --model mh0.model --trust-pickle --device cuda --dtype float32 --backend cueq
    macefield-serve --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --auth-token-file tokens

Plaintext is only allowed on loopback hosts: binding 0.0.0.0, :: or a LAN
address needs --tls-cert/--tls-key or an explicit --insecure (exit code 2 otherwise).
A port that another process holds (another server, a replica still draining)
is refused with exit code 2: ports are never shared (no SO_REUSEPORT).

On start it prints one JSON line to stdout, ``{"event": "listening", "port":
..., "metrics_port": ..., "health_port": ...}`` (useful with ``--port 0``), and a second one,
``{"event": "ready", ...}``, with a log line "ready: serving ..." once every
model is loaded and warm (health SERVING from then on).  SIGTERM/SIGINT:
NOT_SERVING, refuse new calls, finish in-flight work within ``grace_s``,
end idle streams at once (their clients see UNAVAILABLE and reconnect),
log what it is waiting for, exit 0.  A second SIGTERM/SIGINT stops at once
(exit code 128 + signal number).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import List, Optional

from ..serving.config import ConfigError, ModelConfig, load_config


def _version_string() -> str:
    from .. import __version__

    return f"macefield-serve {__version__} (Python {sys.version.split()[0]})"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="macefield-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (.yaml/.yml) or TOML (.toml) configuration file")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0: any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9100; 0: any; -1: off)")
    p.add_argument("--metrics-host", help="address of /metrics (default: the same as --host)")
    p.add_argument("--tls-cert", help="PEM server certificate (chain): TLS on the gRPC port (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-token-file",
                   help="bearer tokens, one per line (also: $MACEFIELD_AUTH_TOKENS, comma-separated)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow plaintext gRPC on a non-loopback host (logs a warning)")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="serve this checkpoint (repeatable; replaces the config file's models)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (runs code from the file)")
    p.add_argument("--device", help="device for --model models (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="dtype for --model models")
    p.add_argument("--backend", choices=["e3nn", "cueq", "auto"],
                   help="tensor-product backend of every model (auto: cueq on CUDA when cuEquivariance's "
                        "kernels import, else e3nn; default: the config file's, else auto)")
    p.add_argument("--threads", type=int, help="torch threads for compute (0: torch default)")
    p.add_argument("--grace", type=float, dest="grace_s", help="SIGTERM drain period, s")
    p.add_argument("--health-port", type=int,
                   help="plaintext port with only grpc.health.v1 (Kubernetes gRPC probes; default -1: none)")
    p.add_argument("--max-connection-age", type=float, dest="max_connection_age_s", metavar="SECONDS",
                   help="send each client connection GOAWAY after this long so clients re-resolve (default 0: never)")
    p.add_argument("--max-connection-age-grace", type=float, dest="max_connection_age_grace_s", metavar="SECONDS",
                   help="then let its calls run this long before closing it (default 0: no limit)")
    p.add_argument("--liveness-timeout", type=float, dest="liveness_timeout_s", metavar="SECONDS",
                   help="health 'liveness' NOT_SERVING when queued work sees no batch finish for this long "
                        "(a hung compute; default 0: off)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep each model's warm-up memory measurement here between starts ('' : none; default "
                        "auto: $MACEFIELD_CACHE_DIR, $XDG_CACHE_HOME/macefield or ~/.cache/macefield)")
    p.add_argument("--log-level", help="DEBUG logs one line per batch")
    p.add_argument("--version", action="version", version=_version_string())
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    overrides = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "threads": args.threads,
        "grace_s": args.grace_s,
        "health_port": args.health_port,
        "max_connection_age_s": args.max_connection_age_s,
        "max_connection_age_grace_s": args.max_connection_age_grace_s,
        "liveness_timeout_s": args.liveness_timeout_s,
        "log_level": args.log_level,
        "backend": args.backend,
        "cache_dir": args.cache_dir,
    }
    config = load_config(args.config, overrides)
    if args.model:
        models = []
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = None, spec
            models.append(ModelConfig(path=path, name=name, dtype=args.dtype, device=args.device or "cpu",
                                      trust_pickle=args.trust_pickle))
        config.models = models
    elif args.trust_pickle:
        for m in config.models:
            m.trust_pickle = True
    if args.backend:  # on the command line: for every model, also those that name their own
        for m in config.models:
            m.backend = args.backend
    for key in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "insecure"):
        value = getattr(args, key)
        if value is not None:
            setattr(config.security, key, value)
    config.validate()
    config.check_exposure()  # refuse plaintext on a non-loopback host without --insecure
    return config


async def serve(config) -> int:
    from ..serving.app import MaceFieldServer

    log = logging.getLogger("macefield.serve")
    server = MaceFieldServer(config)
    server.torch_threads()
    try:
        await server.start()
    except OSError as exc:  # a port in use (no SO_REUSEPORT: never shared with another server)
        print(f"macefield-serve: {exc}", file=sys.stderr)
        await server.stop_now()
        return 2
    print(json.dumps({"event": "listening", "host": config.host, "port": server.port,
                      "metrics_port": server.metrics_port, "health_port": server.health_port,
                      "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    loading = asyncio.create_task(server.load())
    first = asyncio.create_task(signals.get())
    await asyncio.wait({loading, first}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("could not load models: %s", loading.exception())
        first.cancel()
        await server.stop(0)
        return 1
    if loading.done():
        registry = server.registry
        assert registry is not None  # load() finished: its models are loaded
        models = ", ".join(f"{m.name} ({m.device}, {str(m.dtype).replace('torch.', '')})" for m in registry)
        log.info("ready: serving %s on %s:%s", models, config.host, server.port)
        print(json.dumps({"event": "ready", "host": config.host, "port": server.port,
                          "models": [m.name for m in registry]}), flush=True)
    sig = await first
    name = signal.Signals(sig).name
    log.info("%s received: draining (grace %.1f s; in flight: %s); send it again to stop at once",
             name, config.grace_s, server.waiting_for())
    if not loading.done():
        loading.cancel()
    draining = asyncio.create_task(server.stop())
    second = asyncio.create_task(signals.get())
    await asyncio.wait({draining, second}, return_when=asyncio.FIRST_COMPLETED)
    if draining.done():
        second.cancel()
        draining.result()
        log.info("stopped")
        return 0
    sig = second.result()
    log.warning("second signal (%s): stopping now, abandoning %s", signal.Signals(sig).name, server.waiting_for())
    try:
        await asyncio.wait_for(server.stop_now(), timeout=2.0)
    except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - we are leaving anyway
        log.warning("forced stop did not finish cleanly: %r", exc)
    log.warning("stopped (forced)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + int(sig))  # a computing pass cannot be interrupted: leave without joining its thread


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (ConfigError, OSError) as exc:
        print(f"macefield-serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(config.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
