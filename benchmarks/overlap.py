"""How much of an external call's latency ExternalWork hides behind CPU work.

Each event has a CPU module doing W ms of real numpy work (sorting event-seeded random
numbers) and a remote-call module whose answer arrives L ms after the request. The latency is
INJECTED: a timer thread completes the call after L ms, standing for a server's round trip.

* blocking: the remote-call module waits L ms inside ``produce`` (a synchronous client).
* ExternalWork: ``acquire`` arms the timer and returns; the timer calls ``holder.done()``.

Both run on 1 thread, with 1, 2 and 4 streams, for W = L and W = L/2. With S events in flight
the ideal ExternalWork time per event is max(W, max(W, L) / S), with W the CPU module's mean
time in that same run. Ideal speedup: blocking time / ideal ExternalWork time; measured
speedup: blocking time / ExternalWork time; their ratio is ideal time / measured time.

    .venv/bin/python benchmarks/overlap.py [--latency-ms 10] [--events 100]
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import threading
import time

import numpy as np

from recorun import (Concurrency, ExternalWorkProducer, Param, Producer,  # noqa: E402
                       run_workflow)


class InjectedLatency:
    """One timer thread that calls each callback ``delay`` seconds after it was armed."""

    def __init__(self):
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="injected-latency").start()

    def call_later(self, delay: float, callback) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.perf_counter() + delay, next(self._order), callback))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.perf_counter():
                    self._cv.wait(self._heap[0][0] - time.perf_counter() if self._heap else None)
                _, _, callback = heapq.heappop(self._heap)
            callback()


LATENCY = InjectedLatency()


def sort_work(size: int, seed: int) -> float:
    values = np.random.default_rng(seed).random(size)
    values.sort()
    return float(values[size // 2])


def calibrate_size(target_ms: float) -> int:
    """Array length whose generation and sort take ``target_ms`` on this machine."""
    size = 20000
    while True:
        start = time.perf_counter()
        for seed in range(5):
            sort_work(size, seed)
        ms = (time.perf_counter() - start) / 5 * 1000
        if ms > target_ms / 4:
            return max(1, int(size * target_ms / ms))
        size *= 2


class CpuWork(Producer):
    concurrency = Concurrency.SHARED
    size = Param(int, doc="array length to sort")

    def produce(self, event):
        event.put(sort_work(self.size, event.id.event))


class BlockingRemoteCall(Producer):
    concurrency = Concurrency.SHARED
    latency_ms = Param(float, doc="injected latency")

    def produce(self, event):
        time.sleep(self.latency_ms / 1000.0)      # INJECTED latency: a synchronous call
        event.put(event.id.event)


class ExternalRemoteCall(ExternalWorkProducer):
    concurrency = Concurrency.SHARED
    latency_ms = Param(float, doc="injected latency")

    def acquire(self, event, holder):
        LATENCY.call_later(self.latency_ms / 1000.0, holder.done)   # INJECTED latency

    def produce(self, event):
        event.put(event.id.event)


def run(remote_type, size: int, latency_ms: float, streams: int, events: int):
    """Wall ms per event, and the CPU module's mean real time in ms (W as it ran here)."""
    result = run_workflow({
        "process": {"threads": 1, "streams": streams, "report_every_s": 0},
        "source": {"type": "EmptySource", "count": events},
        "modules": {"remote": {"type": remote_type, "latency_ms": latency_ms},
                    "cpu": {"type": CpuWork, "size": size},
                    "useRemote": {"type": "recorun.modules.filters:MinimumFilter", "value": "remote",
                                  "minimum": 0.0},
                    "useCpu": {"type": "recorun.modules.filters:MinimumFilter", "value": "cpu",
                               "minimum": 0.0}},
        "paths": {"remote_path": ["useRemote"], "cpu_path": ["useCpu"]}})
    assert result.exit_code == 0 and result.report["events"]["accepted"] == events
    report = result.report
    return report["wall_s"] / events * 1000, report["modules"]["cpu"]["real_ms_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    latency = args.latency_ms
    results = []
    for label, work_ms in (("W=L", latency), ("W=L/2", latency / 2)):
        size = calibrate_size(work_ms)
        run(BlockingRemoteCall, size, 0.0, 1, 20)                  # warm-up
        for streams in (1, 2, 4):
            blocking, _ = run(BlockingRemoteCall, size, latency, streams, args.events)
            external, cpu_ms = run(ExternalRemoteCall, size, latency, streams, args.events)
            ideal_external = max(cpu_ms, max(cpu_ms, latency) / streams)
            ideal = blocking / ideal_external
            measured = blocking / external
            results.append({"case": label, "W_ms": work_ms, "W_measured_ms": cpu_ms,
                            "L_ms": latency, "streams": streams,
                            "blocking_ms_per_event": blocking,
                            "external_ms_per_event": external,
                            "ideal_speedup": ideal, "measured_speedup": measured,
                            "ratio_to_ideal": measured / ideal})
    print(f"{'case':7} {'W ms':>6} {'L ms':>6} {'streams':>7} {'blocking':>9} {'external':>9} "
          f"{'ideal':>6} {'measured':>8} {'ratio':>6}")
    for r in results:
        print(f"{r['case']:7} {r['W_measured_ms']:6.2f} {r['L_ms']:6.1f} {r['streams']:7d} "
              f"{r['blocking_ms_per_event']:9.2f} {r['external_ms_per_event']:9.2f} "
              f"{r['ideal_speedup']:6.2f} {r['measured_speedup']:8.2f} "
              f"{r['ratio_to_ideal']:6.3f}")
    print("(ms per event; 1 thread; latency injected by a timer thread)")
    print(json.dumps({"ratio_to_ideal_min": round(min(r["ratio_to_ideal"] for r in results), 4),
                      "results": results}))


if __name__ == "__main__":
    main()
