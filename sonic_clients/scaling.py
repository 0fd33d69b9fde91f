"""``recorun scale``: GPUs and network needed to serve a target event rate (paper section 6).

Krupa et al. 2021 size a GPU-as-a-service farm from a model's plateau throughput per GPU
(table 2): for a target event rate R from N client processes, with k inferences (server
requests) per event, B bytes sent per event and a measured per-GPU throughput of G events/s
(or G * k inferences/s):

* GPUs needed = R / G, rounded up; utilisation = (R / G) / GPUs;
* server requests/s = R * k;
* network bandwidth (client to server) = R * B * 8 bit, in total and per client (/ N);
* per GPU at its measured throughput: G * B * 8 bit (table 2's "Throughput/GPU").

Bandwidths are in Gb/s (10^9 bit/s). This is the paper's arithmetic: it assumes the farm runs
at the per-GPU plateau and that the network and the servers' ingress keep up.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from recorun.framework.errors import EXIT_OK


@dataclass(frozen=True)
class Scaling:
    """What a target event rate needs (see the module docstring)."""

    event_rate: float
    clients: int
    gpu_events_per_s: float
    inferences_per_event: float
    bytes_per_event: float
    gpus_exact: float
    gpus: int
    utilisation: float
    server_requests_per_s: float
    bandwidth_gbps: float
    bandwidth_per_client_gbps: float
    bandwidth_per_gpu_gbps: float
    events_per_s_per_client: float


def scale(*, event_rate: float, clients: int, bytes_per_event: float,
          inferences_per_event: float = 1.0, gpu_inferences_per_s: float | None = None,
          gpu_events_per_s: float | None = None) -> Scaling:
    """The GPUs and bandwidth for ``event_rate`` events/s from ``clients`` processes, given one
    GPU's measured throughput in inferences/s or in events/s (exactly one of them)."""
    if (gpu_inferences_per_s is None) == (gpu_events_per_s is None):
        raise ValueError("give one GPU's throughput either in inferences/s or in events/s")
    measured = gpu_events_per_s if gpu_events_per_s is not None else gpu_inferences_per_s
    for name, value in (("event rate", event_rate), ("clients", clients),
                        ("bytes per event", bytes_per_event),
                        ("inferences per event", inferences_per_event),
                        ("GPU throughput", measured)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value:g}")
    per_gpu = measured if gpu_events_per_s is not None else measured / inferences_per_event
    exact = event_rate / per_gpu
    gpus = math.ceil(exact * (1 - 1e-12))     # 500.00000000000006 GPUs (float) are 500
    bits = 8 * bytes_per_event
    return Scaling(event_rate=event_rate, clients=clients, gpu_events_per_s=per_gpu,
                   inferences_per_event=inferences_per_event, bytes_per_event=bytes_per_event,
                   gpus_exact=exact, gpus=gpus, utilisation=exact / gpus,
                   server_requests_per_s=event_rate * inferences_per_event,
                   bandwidth_gbps=event_rate * bits / 1e9,
                   bandwidth_per_client_gbps=event_rate * bits / 1e9 / clients,
                   bandwidth_per_gpu_gbps=per_gpu * bits / 1e9,
                   events_per_s_per_client=event_rate / clients)


def text(s: Scaling) -> str:
    """The figures as ``recorun scale`` prints them."""
    return "\n".join([
        f"Scale target       {s.event_rate:g} events/s from {s.clients} clients "
        f"({s.events_per_s_per_client:.4g} events/s per client)",
        f"Scale per event    {s.inferences_per_event:g} inference(s), "
        f"{s.bytes_per_event:,.0f} bytes sent",
        f"Scale one GPU      {s.gpu_events_per_s:.4g} events/s "
        f"({s.gpu_events_per_s * s.inferences_per_event:.4g} inferences/s)",
        f"Scale GPUs needed  {s.gpus} ({s.gpus_exact:.4g} at full load, "
        f"utilisation {100 * s.utilisation:.0f}%)",
        f"Scale server load  {s.server_requests_per_s:.6g} requests/s",
        f"Scale bandwidth    {s.bandwidth_gbps:.4g} Gb/s in total, "
        f"{s.bandwidth_per_client_gbps:.4g} Gb/s per client, "
        f"{s.bandwidth_per_gpu_gbps:.4g} Gb/s per GPU at full load",
    ])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recorun scale",
        description="GPUs, network bandwidth and server requests needed to serve a target "
                    "event rate from a measured per-GPU throughput (paper section 6).",
        epilog="example (the paper's FACILE offline): recorun scale --gpu-inferences-per-s 500 "
               "--bytes-per-event 962500 --event-rate 5000 --clients 150000")
    gpu = p.add_mutually_exclusive_group(required=True)
    gpu.add_argument("--gpu-inferences-per-s", type=float, metavar="R",
                     help="one GPU's measured throughput, inferences (server requests) per s")
    gpu.add_argument("--gpu-events-per-s", type=float, metavar="R",
                     help="one GPU's measured throughput, events per s")
    p.add_argument("--inferences-per-event", type=float, default=1.0, metavar="K",
                   help="inferences (server requests) per event (default 1)")
    p.add_argument("--bytes-per-event", type=float, required=True, metavar="B",
                   help="bytes sent to the server per event (a report's sonic.LABEL."
                        "bytes_per_call)")
    p.add_argument("--event-rate", type=float, required=True, metavar="HZ",
                   help="target event rate of the whole farm, events/s")
    p.add_argument("--clients", type=int, required=True, metavar="N",
                   help="client processes sending requests")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def main(argv: list[str]) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        result = scale(event_rate=args.event_rate, clients=args.clients,
                       bytes_per_event=args.bytes_per_event,
                       inferences_per_event=args.inferences_per_event,
                       gpu_inferences_per_s=args.gpu_inferences_per_s,
                       gpu_events_per_s=args.gpu_events_per_s)
    except ValueError as exc:
        cli.error(str(exc))
    print(json.dumps(asdict(result), indent=1) if args.json else text(result))
    return EXIT_OK
