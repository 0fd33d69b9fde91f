"""Client overhead of the SONIC FACILE producer against a bare tritonclient loop.

One ``recorun-server --models facile`` (free ports, started and stopped as recorun's fallback
server is) serves both:

(a) bare: tritonclient.grpc ``async_infer``, one request in flight (send, wait for the
    callback, repeat), on FACILE input matrices of 4500 and 16000 rows built from generated
    digis (``recorun.data.generate.generate_hcal_events``): mean and median time per request.
(a') bare + conversions: the same loop, also building the input matrix from the digis
    (``facile_inputs``) and the rechits from the answer (``rechits``), the producer's own work.
(b) recorun: EmptySource -> a producer putting the same digis (as Collections) for event i ->
    FacileProducer (async, 1 thread, 1 stream) -> an analyzer reading the rechits. Time per
    event = wall / events (everything: source, scheduling, packing, gRPC, rechits) and the
    median event span from the trace.
    The three run one after the other, ``--rounds`` times (the machine is noisy); per batch
    size the ratio of means recorun / bare (and of medians) is the median over rounds.
    ``recorun_vs_bare`` = the worst batch's ratio of means (target <= 1.10);
    ``recorun_vs_bare_with_conversions`` the same against (a'): what the framework and the
    SONIC client add beyond the producer's own packing and unpacking.
(c) the SONIC producer's client CPU time per event, acquire + produce CPU ms (the paper's S + L),
    against the nominal CPU algorithm's (HcalMahiReco on the same digis: the paper's X), and
    the server's compute time per event from its statistics (the paper's Y):
    F_GPU^eq = (X - S - L) / Y on this CPU-only server.

    .venv/bin/python benchmarks/client_overhead.py [--events 200] [--rounds 3] [--mahi-events 10]

A table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import numpy as np

from recorun.data.generate import generate_hcal_events  # noqa: E402
from recorun.data.hcal import facile_inputs  # noqa: E402
from recorun.modules.hcal_reco import rechits  # noqa: E402
from recorun import Analyzer, Collection, Concurrency, InputTag, Param, Producer  # noqa: E402
from recorun import run_workflow  # noqa: E402
from recorun.sonic_clients.fallback import FallbackServer  # noqa: E402

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

def bare_loop(address: str, digis: list[Collection], requests: int, *,
              conversions: bool, warmup: int = 10) -> tuple[float, float]:
    """(mean, median) seconds per request, one async_infer in flight at a time; with
    ``conversions`` the input matrix is built from the digis and rechits from the answer, as
    the producer does, else the matrices are built beforehand."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    outputs = [grpcclient.InferRequestedOutput("energy")]
    matrices = [facile_inputs(d) for d in digis]
    finished = threading.Event()
    box: dict = {}

    def callback(result, error):
        box["result"], box["error"] = result, error
        finished.set()

    times = []
    try:
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            event = digis[i % len(digis)]
            x = facile_inputs(event) if conversions else matrices[i % len(matrices)]
            inp = grpcclient.InferInput("hcal_channels", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            finished.clear()
            client.async_infer("facile", [inp], callback, outputs=outputs)
            finished.wait()
            if box["error"] is not None:
                raise box["error"]
            energy = box["result"].as_numpy("energy")
            if conversions:
                rechits(event, energy.reshape(-1), 0.5)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        client.close()
    return statistics.fmean(times), statistics.median(times)


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


def measure(address: str, digis: list[Collection], events: int) -> dict:
    """One round: bare, bare with conversions, recorun (times in ms)."""
    bare_mean, bare_median = bare_loop(address, digis, events, conversions=False)
    conv_mean, conv_median = bare_loop(address, digis, events, conversions=True)
    facile = {"type": "FacileProducer", "mode": "async"}
    report, event_median = run(workflow(digis, events, facile, address), trace=True)
    m = report["modules"]["rechits"]
    per_event = report["wall_s"] / report["events"]["read"]
    return {"bare_mean_ms": 1e3 * bare_mean, "bare_median_ms": 1e3 * bare_median,
            "conv_mean_ms": 1e3 * conv_mean, "conv_median_ms": 1e3 * conv_median,
            "recorun_ms": 1e3 * per_event, "recorun_event_median_ms": 1e3 * event_median,
            "ratio_of_means": per_event / bare_mean,
            "ratio_of_medians": event_median / bare_median,
            "ratio_to_conversions": per_event / conv_mean,
            "acquire_cpu_ms": m["acquire_cpu_ms_mean"],
            "produce_cpu_ms": m["produce_cpu_ms_mean"],
            "Y_server_ms": m["details"]["server_compute_ms_per_call"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="events (requests) per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs")
    parser.add_argument("--mahi-events", type=int, default=10,
                        help="events for the nominal HcalMahiReco (slow)")
    args = parser.parse_args()

    digis = {rows: make_digis(rows, seed=rows) for rows in BATCHES}
    server = FallbackServer(["facile"]).start()
    address = server.grpc
    rows_out = {}
    try:
        for rows in BATCHES:
            facile = {"type": "FacileProducer", "mode": "async"}
            run(workflow(digis[rows], 10, facile, address))                 # warm-up
            rounds = [measure(address, digis[rows], args.events) for _ in range(args.rounds)]
            mahi = run(workflow(digis[rows], args.mahi_events, {"type": "HcalMahiReco"}, None))
            out = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            out["ratio_of_means_rounds"] = [r["ratio_of_means"] for r in rounds]
            s_plus_l = out["acquire_cpu_ms"] + out["produce_cpu_ms"]
            x_ms = mahi["modules"]["rechits"]["cpu_ms_mean"]
            out.update(S_plus_L_ms=s_plus_l, X_mahi_cpu_ms=x_ms,
                       F_gpu_eq=(x_ms - s_plus_l) / out["Y_server_ms"])
            rows_out[rows] = out
    finally:
        server.stop()

    print(f"{'rows':>6} {'bare mean':>9} {'bare med':>8} {'+conv mean':>10} {'recorun':>8} "
          f"{'rec med':>8} {'mean/mean':>9} {'med/med':>7} {'vs +conv':>8} | {'S+L ms':>7} "
          f"{'X ms':>7} {'Y ms':>6} {'F_GPU^eq':>8}")
    for rows, r in rows_out.items():
        print(f"{rows:>6} {r['bare_mean_ms']:>9.3f} {r['bare_median_ms']:>8.3f} "
              f"{r['conv_mean_ms']:>10.3f} {r['recorun_ms']:>8.3f} "
              f"{r['recorun_event_median_ms']:>8.3f} {r['ratio_of_means']:>9.3f} "
              f"{r['ratio_of_medians']:>7.3f} {r['ratio_to_conversions']:>8.3f} | "
              f"{r['S_plus_L_ms']:>7.3f} {r['X_mahi_cpu_ms']:>7.2f} {r['Y_server_ms']:>6.2f} "
              f"{r['F_gpu_eq']:>8.2f}")
    print(f"times in ms, medians over {args.rounds} rounds of {args.events} events. mean/mean: "
          "recorun wall per event / bare mean request (the JSON's recorun_vs_bare); med/med: "
          "median event span (trace) / bare median; vs +conv: recorun / the bare loop that "
          "also packs the digis and makes the rechits. S+L: FacileProducer acquire+produce "
          "CPU; X: HcalMahiReco CPU; Y: the server's compute time per event (its statistics).")
    print(json.dumps({"events": args.events, "rounds": args.rounds,
                      "batches": {str(k): v for k, v in rows_out.items()},
                      "recorun_vs_bare": max(r["ratio_of_means"] for r in rows_out.values()),
                      "recorun_vs_bare_with_conversions":
                          max(r["ratio_to_conversions"] for r in rows_out.values()),
                      "target": 1.10}))


if __name__ == "__main__":
    main()
