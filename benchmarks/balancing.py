"""Two servers behind nginx against one: server-side load balancing.

``--clients`` simultaneous single-thread FACILE offline clients (``recorun-bench clients``
machinery) against one ``recorun-server --threads 2`` and against two ``recorun-server
--threads 1`` behind the nginx gRPC balancer (``recorun.server.balancer.NginxBalancer``): the
same CPU threads for inference in both. ``two_servers_vs_one`` = events/s with two / with one.

This machine has 2 cores: the clients and the servers all share them, so the ratio measures the
balancer's overhead, not a scale-out. (Every core of a node for the clients themselves,
``--processes`` and the Dask farm: ``recorun.benchmarks.cores``.)

    .venv/bin/python -m recorun.benchmarks.balancing [--clients 4] [--events 100]

Prints the figures, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from recorun.benchmarks.studies.runs import run_clients, summary
from recorun.server.balancer import NginxBalancer
from recorun.sonic_clients.fallback import FallbackServer

FACILE = Path(__file__).resolve().parents[1] / "workflows" / "workflow_facile.yaml"


def clients_against(servers: list[str], clients: int, events: int, tag: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"recorun-balancing-bench-{tag}-") as tmp:
        return summary(run_clients(FACILE, servers, clients, events, Path(tmp)))


def servers_study(clients: int, events: int) -> dict:
    one = FallbackServer(["facile"], ["--threads", "2"]).start()
    try:
        single = clients_against([one.grpc], clients, events, "one")
    finally:
        one.stop()
    pair = [FallbackServer(["facile"], ["--threads", "1"]).start() for _ in range(2)]
    try:
        with NginxBalancer([s.grpc for s in pair]) as balancer:
            both = clients_against([balancer.address], clients, events, "two")
            reached = balancer.upstream_counts()
    finally:
        for server in pair:
            server.stop()
    return {"clients": clients, "events_per_client": events,
            "one_server_hz": single["throughput_hz"], "two_servers_hz": both["throughput_hz"],
            "requests_per_upstream": dict(reached),
            "two_servers_vs_one": both["throughput_hz"] / single["throughput_hz"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--events", type=int, default=100, help="events per FACILE client")
    args = parser.parse_args()
    servers = servers_study(args.clients, args.events)
    print(f"servers: {servers['clients']} FACILE clients x {servers['events_per_client']} "
          f"events; one server {servers['one_server_hz']:.1f} events/s, two behind nginx "
          f"{servers['two_servers_hz']:.1f} events/s (requests per upstream "
          f"{servers['requests_per_upstream']}); two/one {servers['two_servers_vs_one']:.2f}")
    print(f"machine: {os.cpu_count()} cores")
    print(json.dumps({"servers": servers, "two_servers_vs_one": servers["two_servers_vs_one"]}))


if __name__ == "__main__":
    main()
