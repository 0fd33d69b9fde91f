"""SONIC transport: client-side event batching, and shared memory against gRPC.

Side by side in one run, against the same local recorun-server (started here, models
``deepcalo`` and ``facile``, its default options):

1. **Event batching.** ``workflow_deepcalo.yaml``'s DeepCalo producer (async Triton client)
   on the HLT sample read ``--passes`` times, one process, one thread, 8 events in flight
   (``streams: 8``), with ``batch_events: 1`` (one request per event) and ``batch_events: 8``,
   interleaved, best of ``--repeat`` runs each. Figures: the event loop's throughput (events
   over the loop's wall time, the report's ``throughput_hz``) and the requests per event (the
   client's requests over the producer's calls). The products of every run, event by event,
   must be the same as the first run's (``products_identical``; exit code 1 otherwise).
2. **Shared memory against gRPC.** FACILE on one generated offline event (``--channels``
   channels read out, 16000 by default: 0.96 MB of inputs), ``--round-trips`` blocking round
   trips through a client with ``transport: grpc`` and one with ``transport: shm``, one after
   the other in turn; the median round trips are compared (``shm_vs_grpc`` = gRPC's median
   over shared memory's; the best ones are given too) and the outputs must be identical.

    .venv/bin/python -m recorun.benchmarks.sonic_transport [--passes 4] [--repeat 3]
                                                           [--channels 16000]
                                                           [--round-trips 300]

The last line of stdout is one line of JSON with every figure, among them
``batched_vs_unbatched`` (throughput with batch_events 8 over 1), ``requests_per_event``
(with batch_events 8) and ``shm_vs_grpc`` (gRPC's median round trip over shared memory's).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from recorun import Analyzer, Concurrency, InputTag, Param, run_workflow
from recorun.data.generate import generate_hcal_events
from recorun.data.hcal import facile_inputs as hcal_facile_inputs
from recorun.sonic_clients import ClientConfig
from recorun.sonic_clients.fallback import FallbackServer
from recorun.sonic_clients.triton import TritonClient

ROOT = Path(__file__).resolve().parents[1]
HLT_SAMPLE = str(ROOT / "data" / "samples" / "hlt_sample.root")


class Digest(Analyzer):
    """Records a digest of the producer's product per event (to compare runs)."""

    concurrency = Concurrency.SHARED
    product = InputTag(doc="the product")
    log = Param(Any, None, doc="dict: (file entry, event) -> digest")

    def analyze(self, event):
        data = np.ascontiguousarray(event.get(self.product))
        key = (event.index, event.id.event)
        self.log[key] = hashlib.sha1(data.tobytes()).hexdigest()


def deepcalo_workflow(batch_events: int, passes: int, log: dict) -> dict:
    return {"process": {"threads": 1, "streams": 8, "report_every_s": 0},
            "source": {"type": "RootSource", "files": [HLT_SAMPLE] * passes},
            "modules": {"electrons": {"type": "DeepCaloProducer", "mode": "async",
                                      "batch_events": batch_events},
                        "digest": {"type": Digest, "product": "electrons", "log": log}},
            "paths": {"p": ["digest"]}, "endpaths": {}}


def run_deepcalo(address: str, batch_events: int, passes: int) -> tuple[dict, dict]:
    log: dict = {}
    wf = deepcalo_workflow(batch_events, passes, log)
    wf["services"] = {"sonic": {"type": "ServerRegistry", "fallback": False,
                                "servers": [{"name": "local", "address": address}]}}
    result = run_workflow(wf)
    if result.exit_code != 0:
        raise SystemExit(f"the DeepCalo job failed: {result.error}")
    report = result.report
    details = report["modules"]["electrons"]["details"]
    return {"events_per_s": report["throughput_hz"],
            "requests_per_event": details["requests"] / details["calls"],
            "events_per_request": details["calls"] / details["requests"],
            "mean_batch_wait_ms": details.get("mean_batch_wait_ms", 0.0)}, log


def facile_inputs(channels: int) -> dict[str, np.ndarray]:
    """FACILE's inputs for one generated event read out with ``channels`` channels."""
    digis = generate_hcal_events(1, seed=1, channels=channels)["HcalDigi"][0]
    return {"hcal_channels": hcal_facile_inputs(digis)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4,
                        help="times the 100-event HLT sample is read per DeepCalo run")
    parser.add_argument("--repeat", type=int, default=3, help="DeepCalo runs per setting")
    parser.add_argument("--channels", type=int, default=16000, help="FACILE rows per request")
    parser.add_argument("--round-trips", type=int, default=300,
                        help="FACILE round trips per transport")
    args = parser.parse_args()

    server = FallbackServer(["deepcalo", "facile"]).start()
    try:
        run_deepcalo(server.grpc, 8, 1)                                    # warm-up
        runs: dict[int, list[dict]] = {1: [], 8: []}
        reference, identical = None, True
        for _ in range(args.repeat):
            for batch_events in (1, 8):
                figures, log = run_deepcalo(server.grpc, batch_events, args.passes)
                runs[batch_events].append(figures)
                if reference is None:
                    reference = log
                identical &= log == reference
        transport = measure_transport(server.grpc, args)
    finally:
        server.stop()

    best = {k: max(runs[k], key=lambda r: r["events_per_s"]) for k in runs}
    batched_vs_unbatched = best[8]["events_per_s"] / best[1]["events_per_s"]
    events = 100 * args.passes
    print(f"DeepCalo, {events} events, 1 thread, 8 events in flight (best of {args.repeat}):")
    print(f"{'batch_events':>12} {'events/s':>9} {'requests/event':>14} {'mean wait ms':>12}")
    for k in (1, 8):
        r = best[k]
        print(f"{k:>12} {r['events_per_s']:>9.1f} {r['requests_per_event']:>14.3f} "
              f"{r['mean_batch_wait_ms']:>12.3f}")
    print(f"batched / unbatched: {batched_vs_unbatched:.2f}x; products identical: {identical}")
    print(f"FACILE {args.channels} channels ({transport['megabytes']:.2f} MB in), "
          f"{args.round_trips} round trips each, median (best): gRPC {transport['grpc_ms']:.3f} "
          f"({transport['grpc_best_ms']:.3f}) ms, shared memory {transport['shm_ms']:.3f} "
          f"({transport['shm_best_ms']:.3f}) ms: {transport['shm_vs_grpc']:.2f}x; outputs "
          f"identical: {transport['outputs_equal']}")
    print(json.dumps({
        "events": events, "repeat": args.repeat,
        "unbatched_events_per_s": best[1]["events_per_s"],
        "batched_events_per_s": best[8]["events_per_s"],
        "batched_vs_unbatched": batched_vs_unbatched,
        "requests_per_event": best[8]["requests_per_event"],
        "unbatched_requests_per_event": best[1]["requests_per_event"],
        "mean_batch_wait_ms": best[8]["mean_batch_wait_ms"],
        "products_identical": identical,
        "events_per_s_runs": {str(k): [r["events_per_s"] for r in v] for k, v in runs.items()},
        **{f"facile_{k}": v for k, v in transport.items() if k != "shm_vs_grpc"},
        "shm_vs_grpc": transport["shm_vs_grpc"],
        "channels": args.channels,
        "targets": {"batched_vs_unbatched": 1.4, "requests_per_event": 0.25,
                    "shm_vs_grpc": 1.15}}))
    return 0 if identical and transport["outputs_equal"] else 1


def roundtrip_times(address: str, inputs: dict, requests: int) -> tuple[dict, bool]:
    """Seconds per blocking FACILE round trip (everything the client does included) through a
    client with ``transport: grpc`` and one with ``transport: shm``: ``{transport: [s,
    ...]}``, the calls interleaved, the order turning each round, so that a noisy machine
    affects both alike; and whether their outputs are identical."""
    clients = {t: TritonClient(ClientConfig("facile", mode="sync", transport=t), [address])
               for t in ("grpc", "shm")}
    try:
        outputs = {}
        for transport, client in clients.items():
            client.begin_job()
            for _ in range(5):                                             # warm-up
                outputs[transport] = client.infer_blocking(inputs, timeout=60)
        times: dict[str, list[float]] = {t: [] for t in clients}
        order = list(clients)
        for _ in range(requests):
            for transport in order:
                start = time.perf_counter()
                clients[transport].infer_blocking(inputs, timeout=60)
                times[transport].append(time.perf_counter() - start)
            order.reverse()
        shm_used = clients["shm"].timing()["shm_requests"] > 0
    finally:
        for client in clients.values():
            client.end_job()
    if not shm_used:
        raise SystemExit("the shm client sent nothing through shared memory (refused?)")
    return times, bool(np.array_equal(outputs["grpc"]["energy"], outputs["shm"]["energy"]))


def measure_transport(address: str, args) -> dict:
    inputs = facile_inputs(args.channels)
    times, equal = roundtrip_times(address, inputs, args.round_trips)
    grpc, shm = (statistics.median(times[t]) for t in ("grpc", "shm"))
    return {"grpc_ms": 1e3 * grpc, "shm_ms": 1e3 * shm,
            "grpc_best_ms": 1e3 * min(times["grpc"]), "shm_best_ms": 1e3 * min(times["shm"]),
            "megabytes": inputs["hcal_channels"].nbytes / 1e6, "outputs_equal": equal,
            "shm_vs_grpc": grpc / shm}


if __name__ == "__main__":
    sys.exit(main())
