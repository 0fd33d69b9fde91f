"""Intra-event parallelism: one event's independent producers on one thread and on two.

One stream (one event in flight), so two threads can only help by running the producers of
the same event at the same time. The workflow: an ``EmptySource``; three independent
producers (``matrixA``, ``matrixB``, ``matrixC``), each multiplying pairs of n x n float64
matrices seeded from the event number and its own seed, and putting the products' sum (a
checksum); one filter (``allThree``) on one path that reads the three checksums and accepts
the event when the fractional part of their total is below 0.5. The producers are ``shared``
modules and their numpy work (random numbers, the matrix product, the sum) releases the GIL;
the numerical libraries keep one thread per call (``process.native_threads: 1``), so any gain
comes from the scheduler running the producers side by side, not from a multi-threaded BLAS.

n is calibrated on this machine so that one product takes ``--unit-ms`` (default 10 ms);
``--products`` says how many products each producer makes per event (default 2,1,1:
``matrixA`` about 20 ms, the others about 10 ms). Three equal producers could reach at most
1.5x on two threads (the third runs alone); 2:1:1 splits evenly over two threads (one runs
``matrixA`` while the other runs ``matrixB`` then ``matrixC``): 2.0x at best. The JSON gives
that bound, ``ideal_two_threads_over_one``, from the producers' measured times: their sum over
the best split of them over two threads. ``matrixA`` is listed first, so that a scheduler
starting them in order starts it among the first two.

Measured: the event loop's throughput (the report's ``throughput_hz``, events over the event
loop's ``wall_s``; process set-up and ``begin_job`` not included), ``threads: 1`` and
``threads: 2``, ``streams: 1``, interleaved, best of ``--repeat`` runs each after a short
warm-up; ``two_threads_over_one`` is the ratio of the two best throughputs (the target is at
least 1.7). Every run's checksums and filter decisions, event by event, must be the same as
the first run's (``products_identical``); the exit code is 1 when they are not.

    .venv/bin/python -m recorun.benchmarks.intra_event [--events 60] [--repeat 3]
                                                       [--unit-ms 10] [--products 2,1,1]
                                                       [--size N]

The last line of stdout is one line of JSON with every figure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time

import numpy as np

from recorun import Concurrency, Filter, InputTagList, Param, Producer, run_workflow
from recorun.framework.native_threads import limited

LABELS = ("matrixA", "matrixB", "matrixC")

#: what each run's filter saw: run key -> {event number: (checksum A, B, C, accepted)}
LOGS: dict[str, dict[int, tuple]] = {}
_LOGS_LOCK = threading.Lock()


def matrix_checksum(size: int, event: int, seed: int, products: int = 1) -> float:
    """The sum of ``products`` products of two ``size`` x ``size`` random matrices, seeded
    from the event number and ``seed``."""
    rng = np.random.default_rng([event, seed])
    total = 0.0
    for _ in range(products):
        a = rng.random((size, size))
        b = rng.random((size, size))
        total += float((a @ b).sum())
    return total


class MatrixProduct(Producer):
    """Puts the checksum of seeded matrix products (numpy work that releases the GIL)."""

    concurrency = Concurrency.SHARED
    size = Param(int, doc="rows (and columns) of the matrices")
    seed = Param(int, 0, doc="mixed with the event number into the random numbers' seed")
    products = Param(int, 1, doc="matrix products per event")

    def produce(self, event):
        event.put(matrix_checksum(self.size, event.id.event, self.seed, self.products))


class AllThree(Filter):
    """Reads every checksum; accepts the event when the fractional part of their total is
    below 0.5; records what it saw in ``LOGS[log]``."""

    concurrency = Concurrency.SHARED
    inputs = InputTagList(doc="the checksums")
    log = Param(str, doc="key of this run's entry in LOGS")

    def filter(self, event):
        values = tuple(event.get(tag) for tag in self.inputs)
        accepted = sum(values) % 1.0 < 0.5
        with _LOGS_LOCK:
            LOGS.setdefault(self.log, {})[event.id.event] = (*values, accepted)
        return accepted


def workflow(events: int, size: int, products: list[int], threads: int, log: str) -> dict:
    modules: dict = {label: {"type": MatrixProduct, "size": size, "seed": seed,
                             "products": count}
                     for seed, (label, count) in enumerate(zip(LABELS, products), start=1)}
    modules["allThree"] = {"type": AllThree, "inputs": list(LABELS), "log": log}
    return {"process": {"threads": threads, "streams": 1, "native_threads": 1,
                        "report_every_s": 0},
            "source": {"type": "EmptySource", "count": events},
            "modules": modules,
            "paths": {"p": ["allThree"]}}


_RUNS = itertools.count()


def run(events: int, size: int, products: list[int], threads: int) -> dict:
    """One job: its event loop's figures, the producers' mean real times and the filter's
    log (event -> checksums and decision)."""
    key = f"run{next(_RUNS)}"
    result = run_workflow(workflow(events, size, products, threads, key))
    report = result.report
    assert result.exit_code == 0, (result.exit_code, result.error)
    ev = report["events"]
    assert ev["read"] == events and ev["failed"] == 0, ev
    log = LOGS.pop(key, {})
    return {"threads": threads, "streams": report["streams"], "events": events,
            "throughput_hz": report["throughput_hz"], "wall_s": report["wall_s"],
            "cpu_efficiency": report["cpu_efficiency"], "accepted": ev["accepted"],
            "producer_ms": [report["modules"][label]["real_ms_mean"] for label in LABELS],
            "log": log}


def calibrate(target_ms: float) -> int:
    """Matrix size whose two random matrices, product and sum take about ``target_ms`` here,
    with the numerical libraries on one thread (as in the jobs)."""
    def ms(size: int) -> float:
        times = []
        for seed in range(7):
            start = time.perf_counter()
            matrix_checksum(size, seed, 0)
            times.append(time.perf_counter() - start)
        return min(times) * 1000                        # the least disturbed of the calls

    with limited(1):
        size = 64
        while (took := ms(size)) < target_ms / 8:
            size *= 2
        for _ in range(2):                               # the work grows as n^3
            size = max(8, round(size * (target_ms / took) ** (1 / 3)))
            took = ms(size)
    return size


def best_split(times: list[float]) -> float:
    """The least time two threads need for ``times``, each task whole on one thread."""
    total = sum(times)
    return min(max(sum(t for t, side in zip(times, sides) if side), total
                   - sum(t for t, side in zip(times, sides) if side))
               for sides in itertools.product((0, 1), repeat=len(times)))


def numbers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(LABELS) or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected {len(LABELS)} positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60, help="events per run (default 60)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per thread count, the best kept (default 3)")
    parser.add_argument("--unit-ms", type=float, default=10.0,
                        help="time of one matrix product, ms (n calibrated for it; default 10)")
    parser.add_argument("--products", type=numbers, default=[2, 1, 1],
                        help="matrix products per event of matrixA,matrixB,matrixC "
                             "(default 2,1,1)")
    parser.add_argument("--size", type=int, default=None,
                        help="the matrices' size n instead of calibrating it")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1 or args.unit_ms <= 0 or (args.size or 1) < 1:
        parser.error("--events, --repeat, --unit-ms and --size must be positive")

    size = args.size or calibrate(args.unit_ms)
    products = args.products
    for threads in (1, 2):                                   # warm-up
        run(min(args.events, 5), size, products, threads)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeat):                             # interleaved
        for threads in (1, 2):
            runs[threads].append(run(args.events, size, products, threads))

    reference = runs[1][0]["log"]
    identical = len(reference) == args.events and all(
        r["log"] == reference for r in runs[1] + runs[2])
    best = {t: max(rs, key=lambda r: r["throughput_hz"]) for t, rs in runs.items()}
    ratio = best[2]["throughput_hz"] / best[1]["throughput_hz"]
    producer_ms = [statistics.median(r["producer_ms"][i] for r in runs[1])
                   for i in range(len(LABELS))]
    ideal = sum(producer_ms) / best_split(producer_ms)

    print(f"{'threads':>7} {'streams':>7} {'events':>6} {'best Hz':>8} {'ms/event':>8} "
          f"{'cpu eff':>7}  all runs, Hz")
    for threads in (1, 2):
        b = best[threads]
        print(f"{threads:7d} {b['streams']:7d} {b['events']:6d} {b['throughput_hz']:8.2f} "
              f"{1000 / b['throughput_hz']:8.2f} {b['cpu_efficiency']:7.2f}  "
              + " ".join(f"{r['throughput_hz']:.2f}" for r in runs[threads]))
    print(f"producers (n={size}) "
          + ", ".join(f"{label} {count}x: {ms:.2f} ms"
                      for label, count, ms in zip(LABELS, products, producer_ms))
          + " (1 thread, median of the runs' means)")
    print(f"two_threads_over_one: {ratio:.3f} (ideal {ideal:.2f} for these producers; "
          f"target >= 1.7)")
    print(f"products identical in every run, 1 and 2 threads ({args.events} events, "
          f"{sum(v[-1] for v in reference.values())} accepted): "
          f"{'yes' if identical else 'NO'}")

    figures = {
        "two_threads_over_one": round(ratio, 4),
        "ideal_two_threads_over_one": round(ideal, 4),
        "target": 1.7,
        "throughput_hz_1thread": round(best[1]["throughput_hz"], 3),
        "throughput_hz_2threads": round(best[2]["throughput_hz"], 3),
        "wall_s_1thread": round(best[1]["wall_s"], 4),
        "wall_s_2threads": round(best[2]["wall_s"], 4),
        "throughput_hz_runs": {str(t): [round(r["throughput_hz"], 3) for r in rs]
                               for t, rs in runs.items()},
        "cpu_efficiency_2threads": round(best[2]["cpu_efficiency"], 3),
        "producer_ms": dict(zip(LABELS, (round(ms, 3) for ms in producer_ms))),
        "products": dict(zip(LABELS, products)),
        "size": size,
        "products_identical": identical,
        "accepted": best[1]["accepted"],
        "events": args.events, "repeat": args.repeat, "streams": 1, "native_threads": 1,
        "cores": os.cpu_count(),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    sys.exit(0 if main()["products_identical"] else 1)
