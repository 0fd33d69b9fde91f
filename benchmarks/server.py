"""Inference through a real Triton server (``recorun-server``) against in-process inference.

    .venv/bin/python benchmarks/server.py [--repeats 30] [--seconds 3] [--skip-resnet]

1. **Round trip.** For FACILE (batch 4500 and 16000), DeepCalo (5 and 500) and ResNet-50
   (1 and 10): the median time of a synchronous ``tritonclient.grpc`` ``infer`` call to a
   ``recorun-server`` running on this machine, against the median time of the same model run
   in-process with the same backend (onnxruntime, the same ONNX export and thread count as a
   server instance). Measured side by side, alternating.
2. **Dynamic batching.** FACILE (batch 4500) and DeepCalo (batch 5) throughput, in requests
   per second over ``--seconds``, with 1, 2, 4, 8 and 16 client threads sending requests
   back to back, against a server with dynamic batching off and one with it on (max queue
   delay 500 us).

Client and server share this machine's cores, so the round trip includes their competition
for them. The last line printed is one line of JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from recorun.server.export import example_input, export_onnx  # noqa: E402
from recorun.model_specs import SPECS  # noqa: E402
from recorun.server.serve import OnnxRunner, default_threads  # noqa: E402
from recorun.server.weights import load_model  # noqa: E402
from recorun.sonic_clients.fallback import FallbackServer  # noqa: E402

ROUND_TRIPS = [("facile", 4500), ("facile", 16000), ("deepcalo", 5), ("deepcalo", 500),
               ("resnet50", 1), ("resnet50", 10)]
THROUGHPUT = [("facile", 4500), ("deepcalo", 5)]
CLIENTS = (1, 2, 4, 8, 16)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def triton_call(client, name: str, x: np.ndarray):
    spec = SPECS[name]
    tensor = grpcclient.InferInput(spec.inputs[0].name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    output = grpcclient.InferRequestedOutput(spec.outputs[0].name)
    return lambda: client.infer(name, [tensor], outputs=[output]).as_numpy(spec.outputs[0].name)


def round_trips(server: FallbackServer, models: list[str], repeats: int,
                workdir: Path) -> list[dict]:
    client = grpcclient.InferenceServerClient(server.grpc)
    runners = {}
    for name in models:
        path = export_onnx(name, load_model(name), workdir / f"{name}.onnx")
        runners[name] = OnnxRunner(path, SPECS[name], threads=default_threads(1))
    results = []
    for name, batch in ROUND_TRIPS:
        if name not in models:
            continue
        x = example_input(SPECS[name], batch)
        remote, local = triton_call(client, name, x), (lambda r=runners[name]: r(x))
        assert np.allclose(remote(), local(), rtol=1e-4, atol=1e-4), name
        remote_ms, local_ms = [], []
        for _ in range(3):                   # alternate, so that drifts hit both sides
            remote_ms.append(median_ms(remote, repeats // 3 or 1))
            local_ms.append(median_ms(local, repeats // 3 or 1))
        r, loc = statistics.median(remote_ms), statistics.median(local_ms)
        results.append({"model": name, "batch": batch, "triton_ms": r, "in_process_ms": loc,
                        "overhead_ms": r - loc})
        print(f"  {name:9} batch {batch:>6}: Triton {r:8.2f} ms, in-process {loc:8.2f} ms, "
              f"difference {r - loc:7.2f} ms")
    client.close()
    return results


def throughput(server: FallbackServer, name: str, batch: int, clients: int,
               seconds: float) -> float:
    x = example_input(SPECS[name], batch)
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def client_loop(i: int) -> None:
        client = grpcclient.InferenceServerClient(server.grpc)
        call = triton_call(client, name, x)
        while time.perf_counter() < stop:
            call()
            done[i] += 1
        client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    models = ["facile", "deepcalo"] + ([] if args.skip_resnet else ["resnet50"])
    print(f"machine: {os.cpu_count()} cores; backend onnxruntime, "
          f"{default_threads(1)} threads per model instance, client in this process")
    with tempfile.TemporaryDirectory() as tmp:
        print("round trip, median of", args.repeats)
        server = FallbackServer(models).start()
        try:
            trips = round_trips(server, models, args.repeats, Path(tmp))
        finally:
            server.stop()
    batching = {}
    for label, extra in (("off", ["--no-dynamic-batching"]),
                         ("on", ["--dynamic-batching", "--max-queue-delay-us", "500"])):
        server = FallbackServer(["facile", "deepcalo"], extra).start()
        try:
            for name, batch in THROUGHPUT:
                for clients in CLIENTS:
                    rate = throughput(server, name, batch, clients, args.seconds)
                    batching.setdefault(f"{name}_{batch}", {}).setdefault(label, {})[
                        clients] = rate
        finally:
            server.stop()
    print("\nthroughput, requests/s (one request = one event's batch)")
    print(f"  {'model':16} {'batching':9} " + " ".join(f"{c:>7}" for c in CLIENTS))
    for key, by_mode in batching.items():
        for label, rates in by_mode.items():
            print(f"  {key:16} {label:9} " + " ".join(f"{rates[c]:7.1f}" for c in CLIENTS))
    print(json.dumps({"round_trips": trips, "dynamic_batching": batching,
                      "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
