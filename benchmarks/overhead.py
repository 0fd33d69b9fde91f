"""Framework overhead per module call, and per event.

A chain of 20 trivial modules (19 producers, each reading the previous one's integer and
putting it plus one, and an analyzer at the end of a path) over 20000 events, run with
1 thread / 1 stream and with 2 threads / 4 streams. The overhead per call is the wall time
minus the time spent inside the modules' own methods, divided by the number of calls.

The fixed cost per event: an ``EmptySource`` and one analyzer that does nothing, on 1 thread /
1 stream; the wall time of the job over ``--events`` events minus that of the same job over
one event, divided by the events less one (best of ``--repeat`` runs).

The cost of a luminosity-block transition (end one, begin the next, with the streams drained
between them): the same one-analyzer job with every event in a lumi of its own
(``events_per_lumi: 1``) less the job with one lumi, per event (best of ``--repeat``).

    .venv/bin/python benchmarks/overhead.py [--events 20000] [--modules 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import time

from recorun import Analyzer, Concurrency, InputTag, Producer, run_workflow  # noqa: E402


class Increment(Producer):
    """Puts the previous module's integer plus one (the first one puts the event number)."""

    concurrency = Concurrency.SHARED
    previous = InputTag(None, doc="the previous link of the chain")

    def produce(self, event):
        event.put(event.get(self.previous) + 1 if self.previous else event.id.event)


class CheckChain(Analyzer):
    concurrency = Concurrency.SHARED
    last = InputTag(doc="the last link")
    length = 0

    def analyze(self, event):
        if event.get(self.last) != event.id.event + CheckChain.length - 1:
            raise ValueError("chain value is wrong")


class Nop(Analyzer):
    """Does nothing: what is left of a job is the framework's own cost."""

    concurrency = Concurrency.SHARED

    def analyze(self, event):
        pass


def workflow(events: int, modules: int, threads: int, streams: int) -> dict:
    chain = {"p0": {"type": Increment}}
    for i in range(1, modules - 1):
        chain[f"p{i}"] = {"type": Increment, "previous": f"p{i - 1}"}
    chain["check"] = {"type": CheckChain, "last": f"p{modules - 2}"}
    return {"process": {"threads": threads, "streams": streams, "report_every_s": 0},
            "source": {"type": "EmptySource", "count": events},
            "modules": chain, "paths": {"p": ["check"]}}


def measure(events: int, modules: int, threads: int, streams: int) -> dict:
    CheckChain.length = modules - 1
    result = run_workflow(workflow(events, modules, threads, streams))
    report = result.report
    assert result.exit_code == 0 and report["events"]["accepted"] == events, report["events"]
    calls = sum(m["runs"] for m in report["modules"].values())
    in_modules_s = sum(m["real_ms_total"] for m in report["modules"].values()) / 1000.0
    wall = report["wall_s"]
    return {"threads": threads, "streams": streams, "calls": calls, "wall_s": wall,
            "us_per_call_total": wall / calls * 1e6,
            "us_per_call_overhead": (wall - in_modules_s / threads) / calls * 1e6}


def one_module_job(events: int, events_per_lumi: int = 0) -> float:
    """Wall seconds of a job of ``events`` events through one :class:`Nop` analyzer."""
    start = time.perf_counter()
    result = run_workflow({"process": {"threads": 1, "streams": 1, "report_every_s": 0},
                           "source": {"type": "EmptySource", "count": events,
                                      "events_per_lumi": events_per_lumi},
                           "modules": {"nop": {"type": Nop}}, "paths": {"p": ["nop"]}})
    wall = time.perf_counter() - start
    assert result.exit_code == 0 and result.report["events"]["accepted"] == events, \
        result.report["events"]
    return wall


def us_per_event(events: int, repeat: int) -> float:
    """The fixed cost per event of the one-module job (best of ``repeat``), microseconds."""
    return min(one_module_job(events) - one_module_job(1)
               for _ in range(repeat)) / (events - 1) * 1e6


def us_per_lumi(events: int, repeat: int) -> float:
    """A luminosity-block transition's cost (every event its own lumi, less one lumi in all),
    microseconds per transition (best of ``repeat``, the two jobs interleaved)."""
    return min(one_module_job(events, 1) - one_module_job(events)
               for _ in range(repeat)) / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--modules", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    measure(min(args.events, 500), args.modules, 1, 1)          # warm-up
    one = measure(args.events, args.modules, 1, 1)
    two = measure(args.events, args.modules, 2, 4)
    per_event = us_per_event(args.events, args.repeat)
    per_lumi = us_per_lumi(min(args.events, 5000), args.repeat)
    for r in (one, two):
        print(f"threads={r['threads']} streams={r['streams']}: {r['calls']} calls in "
              f"{r['wall_s']:.2f} s: {r['us_per_call_total']:.2f} us per call in all, "
              f"{r['us_per_call_overhead']:.2f} us framework overhead per call")
    print(f"EmptySource + one analyzer that does nothing, threads=1 streams=1: "
          f"{per_event:.2f} us per event")
    print(f"a luminosity-block transition (end, begin; one analyzer): {per_lumi:.2f} us")
    print("target: at most 10 us per call on 1 thread (dask's threaded scheduler: ~200 us/task), "
          "under 8 us per event for the one-analyzer job")
    print(json.dumps({"us_per_call_1thread": round(one["us_per_call_overhead"], 3),
                      "us_per_call_2threads": round(two["us_per_call_overhead"], 3),
                      "us_per_call_total_1thread": round(one["us_per_call_total"], 3),
                      "us_per_call_total_2threads": round(two["us_per_call_total"], 3),
                      "us_per_event_1module_1thread": round(per_event, 3),
                      "us_per_lumi_transition": round(per_lumi, 3),
                      "events": args.events, "modules": args.modules}))


if __name__ == "__main__":
    main()
