"""Client overhead of the SONIC FACILE producer against a bare tritonclient loop.

One ``recorun-server --models facile`` (free ports, started and stopped as recorun's fallback
server is) serves both:

(a) bare: tritonclient.grpc ``async_infer``, one request in flight (send, wait for the
    callback, repeat), on FACILE input matrices of 4500 and 16000 rows built from generated
    digis (``data.generate.generate_hcal_events``); median time per request.
(b) recorun: EmptySource -> a producer putting the same digis (as Collections) for event i ->
    FacileProducer (async, 1 thread, 1 stream) -> an analyzer reading the rechits. Time per
    event = wall / events (everything: source, scheduling, packing, gRPC, rechits); also the
    producer's own acquire + external + produce mean from the report.
    ratio = recorun / bare per batch size; ``recorun_vs_bare`` = the worst ratio (target <= 1.10).
(c) the SONIC producer's client CPU time per event, acquire + produce CPU ms (the paper's S + L),
    against the nominal CPU algorithm's (HcalMahiReco on the same digis: the paper's X).
    F_GPU^eq = (X - S - L) / Y needs the server time Y; the bare median request time is printed
    as an upper bound of Y, which gives a lower bound of F_GPU^eq.

    .venv/bin/python benchmarks/client_overhead.py [--events 200] [--mahi-events 10]

A table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.generate import generate_hcal_events  # noqa: E402
from data.hcal import facile_inputs  # noqa: E402
from framework import Analyzer, Collection, Concurrency, InputTag, Param, Producer  # noqa: E402
from framework import run_workflow  # noqa: E402
from sonic_clients.fallback import FallbackServer  # noqa: E402

BATCHES = (4500, 16000)
DISTINCT_EVENTS = 10            # distinct generated events per batch size, cycled


class Shared:
    """Holds data passed as a workflow parameter without being deep-copied."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class DigiFeeder(Producer):
    """Puts the precomputed digis Collection of event ``index % len``."""

    concurrency = Concurrency.SHARED
    digis = Param(Any, None, doc="Shared(list of Collections)")

    def produce(self, event):
        values = self.digis.value
        event.put(values[event.index % len(values)])


class Touch(Analyzer):
    concurrency = Concurrency.SHARED
    product = InputTag("rechits")

    def analyze(self, event):
        event.get(self.product)


def make_digis(rows: int, seed: int) -> list[Collection]:
    events = generate_hcal_events(DISTINCT_EVENTS, seed=seed, channels=rows)["HcalDigi"]
    out = []
    for i in range(DISTINCT_EVENTS):
        one = events[i]
        out.append(Collection({f: np.ascontiguousarray(np.asarray(one[f]))
                               for f in events.fields}))
    return out


# --- (a) bare tritonclient --------------------------------------------------------------------

def bare_loop(address: str, matrices: list[np.ndarray], requests: int, warmup: int = 10
              ) -> tuple[float, float]:
    """(median, mean) seconds per request, one async_infer in flight at a time."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    outputs = [grpcclient.InferRequestedOutput("energy")]
    finished = threading.Event()
    box: dict = {}

    def callback(result, error):
        box["result"], box["error"] = result, error
        finished.set()

    times = []
    try:
        for i in range(warmup + requests):
            x = matrices[i % len(matrices)]
            t0 = time.perf_counter()
            inp = grpcclient.InferInput("hcal_channels", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            finished.clear()
            client.async_infer("facile", [inp], callback, outputs=outputs)
            finished.wait()
            if box["error"] is not None:
                raise box["error"]
            box["result"].as_numpy("energy")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        client.close()
    return statistics.median(times), statistics.fmean(times)


# --- (b), (c) recorun ---------------------------------------------------------------------------

def workflow(digis: list[Collection], events: int, reco: dict, address: str | None) -> dict:
    wf = {"process": {"threads": 1, "streams": 1, "report_every_s": 0},
          "source": {"type": "EmptySource", "count": events},
          "modules": {"digis": {"type": DigiFeeder, "digis": Shared(digis)},
                      "rechits": {**reco, "digis": "digis"},
                      "touch": {"type": Touch}},
          "paths": {"p": ["touch"]}, "endpaths": {}}
    if address:
        wf["services"] = {"sonic": {"type": "ServerRegistry", "fallback": False,
                                    "servers": [{"name": "bench", "address": address}]}}
    return wf


def run(wf: dict, trace: bool = False):
    result = run_workflow(wf, trace=trace)
    if result.exit_code != 0:
        raise SystemExit(f"workflow failed: {result.error}")
    if not trace:
        return result.report
    spans = [e["dur"] * 1e-6 for e in result.tracer.to_json()["traceEvents"]
             if e.get("ph") == "X" and e.get("cat") == "event"]
    return result.report, statistics.median(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="events (requests) per batch")
    parser.add_argument("--mahi-events", type=int, default=10,
                        help="events for the nominal HcalMahiReco (slow)")
    args = parser.parse_args()

    digis = {rows: make_digis(rows, seed=rows) for rows in BATCHES}
    matrices = {rows: [facile_inputs(d) for d in digis[rows]] for rows in BATCHES}
    server = FallbackServer(["facile"]).start()
    address = server.grpc
    rows_out = {}
    try:
        for rows in BATCHES:
            bare, bare_mean = bare_loop(address, matrices[rows], args.events)
            facile = {"type": "FacileProducer", "mode": "async"}
            run(workflow(digis[rows], 10, facile, address))                 # warm-up
            report, event_median = run(workflow(digis[rows], args.events, facile, address),
                                       trace=True)
            m = report["modules"]["rechits"]
            per_event = report["wall_s"] / report["events"]["read"]
            module = 1e-3 * (m["acquire_ms_mean"] + m["external_ms_mean"] + m["produce_ms_mean"])
            s_plus_l = m["acquire_cpu_ms_mean"] + m["produce_cpu_ms_mean"]
            mahi = run(workflow(digis[rows], args.mahi_events, {"type": "HcalMahiReco"}, None))
            x_ms = mahi["modules"]["rechits"]["cpu_ms_mean"]
            rows_out[rows] = {
                "bare_ms": 1e3 * bare, "bare_mean_ms": 1e3 * bare_mean,
                "recorun_ms": 1e3 * per_event, "recorun_event_median_ms": 1e3 * event_median,
                "ratio_of_means": per_event / bare_mean,
                "ratio_of_medians": event_median / bare,
                "producer_ms": 1e3 * module, "ratio": per_event / bare,
                "producer_ratio": module / bare,
                "acquire_cpu_ms": m["acquire_cpu_ms_mean"],
                "produce_cpu_ms": m["produce_cpu_ms_mean"], "S_plus_L_ms": s_plus_l,
                "X_mahi_cpu_ms": x_ms, "Y_upper_ms": 1e3 * bare,
                "F_gpu_eq_lower": (x_ms - s_plus_l) / (1e3 * bare)}
    finally:
        server.stop()

    print(f"{'rows':>6} {'bare med':>9} {'bare mean':>9} {'rec wall/ev':>11} {'ratio':>6} "
          f"{'rec ev med':>10} {'med/med':>7} {'mean/mean':>9} {'producer ms':>12} "
          f"{'ratio':>6} | {'S+L cpu ms':>10} {'X mahi ms':>10} {'(X-S-L)/Y>=':>11}")
    for rows, r in rows_out.items():
        print(f"{rows:>6} {r['bare_ms']:>9.3f} {r['bare_mean_ms']:>9.3f} {r['recorun_ms']:>11.3f} "
              f"{r['ratio']:>6.3f} {r['recorun_event_median_ms']:>10.3f} "
              f"{r['ratio_of_medians']:>7.3f} {r['ratio_of_means']:>9.3f} "
              f"{r['producer_ms']:>12.3f} {r['producer_ratio']:>6.3f} | {r['S_plus_L_ms']:>10.3f} "
              f"{r['X_mahi_cpu_ms']:>10.2f} {r['F_gpu_eq_lower']:>11.2f}")
    print("ratio (the JSON's recorun_vs_bare): recorun wall per event / bare median request; "
          "med/med: median event span (trace) / bare median; mean/mean: wall per event / bare "
          "mean; producer: the producer's "
          "acquire+external+produce mean / bare. S+L: acquire+produce CPU of FacileProducer; "
          "X: HcalMahiReco CPU; Y bounded above by the bare request time.")
    print(json.dumps({"events": args.events, "batches": {str(k): v for k, v in rows_out.items()},
                      "recorun_vs_bare": max(r["ratio"] for r in rows_out.values()),
                      "target": 1.10}))


if __name__ == "__main__":
    main()
