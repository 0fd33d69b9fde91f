"""End-of-job reports: the report JSON, TrigReport / TimeReport text, resources.json, and the
Chrome trace of module calls."""
from __future__ import annotations

import json
import math
import random
import threading
from collections import Counter

import numpy as np
import pytest
from recorun import (Analyzer, Concurrency, ExternalWorkProducer, Filter, InputTag, Param,
                       Producer, run_workflow)
from recorun.framework.reports import resources_json, time_report, trig_report, write_json


class Hits(Producer):
    """Event-seeded energies of 200 hits."""

    concurrency = Concurrency.SHARED

    def produce(self, event):
        event.put(np.random.default_rng(event.id.event).exponential(2.0, 200))


class TimerSort(ExternalWorkProducer):
    """Sorted hit energies, computed on a timer thread (injected latency of up to 2 ms)."""

    concurrency = Concurrency.SHARED
    hits = InputTag("hits")

    def begin_job(self):
        self._lock = threading.Lock()
        self._results: dict[int, np.ndarray] = {}

    def acquire(self, event, holder):
        index, hits = event.index, event.get(self.hits)

        def external():
            with self._lock:
                self._results[index] = np.sort(hits)[::-1]
            holder.done()

        threading.Timer(random.uniform(0.0, 0.002), external).start()

    def produce(self, event):
        with self._lock:
            event.put(self._results.pop(event.index))


class LeadingAbove(Filter):
    concurrency = Concurrency.SHARED
    sorted_hits = InputTag("sorted")
    threshold = Param(float, 12.0)

    def filter(self, event):
        return float(event.get(self.sorted_hits)[0]) > self.threshold


class EvenEvents(Filter):
    concurrency = Concurrency.SHARED

    def filter(self, event):
        return event.id.event % 2 == 0


class TotalEnergy(Analyzer):
    concurrency = Concurrency.SERIAL
    hits = InputTag("hits")

    def begin_job(self):
        self.total = 0.0

    def analyze(self, event):
        self.total += float(np.sum(event.get(self.hits)))


N_EVENTS = 40
PATHS = {"leading": ["leadCut", "energy"], "even": ["evenCut"]}
ENDPATHS = {"monitor": ["selectedEnergy"]}


@pytest.fixture(scope="module")
def job(workflow):
    modules = {"hits": {"type": Hits},
               "sorted": {"type": TimerSort},
               "leadCut": {"type": LeadingAbove},
               "evenCut": {"type": EvenEvents},
               "energy": {"type": TotalEnergy},
               "selectedEnergy": {"type": TotalEnergy, "select_events": ["leading"]}}
    result = run_workflow(workflow(modules, PATHS, ENDPATHS, events=N_EVENTS, threads=2,
                                   streams=2), trace=True)
    assert result.exit_code == 0, result.error
    return result


def test_report_json_keys_and_counts(job, tmp_path):
    report = job.report
    assert set(report["events"]) == {"read", "accepted", "rejected", "failed"}
    ev = report["events"]
    assert ev["read"] == N_EVENTS and ev["failed"] == 0
    assert ev["read"] == ev["accepted"] + ev["rejected"]
    assert set(report["paths"]) == set(PATHS) and set(report["endpaths"]) == set(ENDPATHS)
    for name, path in report["paths"].items():
        assert {"visited", "passed", "rejected", "failed", "modules"} <= set(path)
        assert path["visited"] == N_EVENTS
        assert path["passed"] + path["rejected"] == N_EVENTS
        assert [m["label"] for m in path["modules"]] == PATHS[name]
    assert report["paths"]["even"]["passed"] == N_EVENTS // 2
    assert set(report["modules"]) == {"hits", "sorted", "leadCut", "evenCut", "energy",
                                      "selectedEnergy"}
    for label, m in report["modules"].items():
        assert {"type", "runs", "real_ms_mean", "cpu_ms_mean"} <= set(m), label
        assert isinstance(m["runs"], int)
        for key in ("real_ms_mean", "cpu_ms_mean"):
            assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] >= 0
        assert m["real_ms_total"] == pytest.approx(m["real_ms_mean"] * m["runs"])
    ext = report["modules"]["sorted"]
    assert ext["type"] == "TimerSort" and ext["runs"] == N_EVENTS
    for key in ("acquire_ms_mean", "external_ms_mean", "produce_ms_mean"):
        assert isinstance(ext[key], float) and math.isfinite(ext[key]) and ext[key] >= 0
    for label in ("hits", "leadCut", "energy"):
        assert "acquire_ms_mean" not in report["modules"][label]
    assert report["modules"]["hits"]["runs"] == N_EVENTS
    assert report["modules"]["energy"]["runs"] == report["paths"]["leading"]["passed"]
    assert report["modules"]["selectedEnergy"]["runs"] == report["paths"]["leading"]["passed"]
    assert report["threads"] == 2 and report["streams"] == 2
    assert report["wall_s"] > 0 and report["throughput_hz"] > 0
    assert report["exit_code"] == 0 and report["failed_events"] == []
    # JSON as written with --report-json
    write_json(tmp_path / "report.json", report)
    assert json.loads((tmp_path / "report.json").read_text())["events"] == ev


def test_trig_and_time_report_texts(job):
    report = job.report
    trig = trig_report(report)
    ev = report["events"]
    assert (f"Events total = {ev['read']} passed = {ev['accepted']} rejected = "
            f"{ev['rejected']} failed = {ev['failed']}") in trig
    rows = [line.split() for line in trig.splitlines()]
    for kind in ("paths", "endpaths"):
        for name, p in report[kind].items():
            numbers = [str(p[k]) for k in ("visited", "passed", "rejected", "failed")]
            assert any(r[1:5] == numbers and r[5] == name for r in rows if len(r) > 5), name
    for label in report["modules"]:
        assert label in trig
    timing = time_report(report)
    for label in report["modules"]:
        assert any(line.endswith(f"  {label}") for line in timing.splitlines()), label
    ext_line = next(line for line in timing.splitlines() if line.endswith("  sorted"))
    assert "-" not in ext_line.split()[:-1]
    hits_line = next(line for line in timing.splitlines() if line.endswith("  hits"))
    assert hits_line.split()[4:7] == ["-", "-", "-"]


def test_resources_json(job):
    report = job.report
    resources = resources_json(report)
    assert resources["total"]["events"] == N_EVENTS
    by_label = {m["label"]: m for m in resources["modules"]}
    assert set(by_label) == set(report["modules"])
    for label, m in by_label.items():
        assert set(m) == {"label", "type", "events", "time_thread", "time_real"}
        assert m["type"] == report["modules"][label]["type"]
        assert m["events"] == report["modules"][label]["runs"]
        assert m["time_real"] == pytest.approx(report["modules"][label]["real_ms_total"])
        assert m["time_thread"] == pytest.approx(report["modules"][label]["cpu_ms_total"])
    json.dumps(resources)


def test_trace_has_one_complete_event_per_module_call(job):
    trace = job.tracer.to_json()
    json.dumps(trace)
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and "ts" in e and "tid" in e for e in complete)
    calls = Counter((e["name"], e["cat"]) for e in complete)
    modules = job.report["modules"]
    assert calls[("sorted", "acquire")] == modules["sorted"]["runs"] == N_EVENTS
    assert calls[("sorted", "external")] == N_EVENTS
    assert calls[("sorted", "produce")] == N_EVENTS
    assert calls[("hits", "produce")] == modules["hits"]["runs"]
    for label in ("leadCut", "evenCut"):
        assert calls[(label, "filter")] == modules[label]["runs"]
    for label in ("energy", "selectedEnergy"):
        assert calls[(label, "analyze")] == modules[label]["runs"]
    assert sum(1 for e in complete if e["cat"] == "event") == N_EVENTS
    module_calls = [e for e in complete if e["cat"] != "event"]
    assert len(module_calls) == sum(modules[m]["runs"] for m in modules) + 2 * N_EVENTS
    # every call says which event it belonged to
    events = {e["args"]["event"] for e in module_calls}
    assert events == {f"1:1:{n}" for n in range(1, N_EVENTS + 1)}
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert "external sorted" in lanes


def _advice_report(wall_s: float, external_ms_mean: float = 0.0) -> dict:
    """A 2-thread job report of 100 events whose threads were busy a third of the time."""
    return {"threads": 2, "cpu_efficiency": 0.33, "wall_s": wall_s,
            "modules": {"jets": {"cpu_ms_total": 900.0, "runs": 100,
                                 "external_ms_mean": external_ms_mean},
                        "met": {"cpu_ms_total": 100.0, "runs": 100}}}


def test_advice_names_the_modules_of_a_cpu_bound_job_with_idle_threads():
    from recorun.framework.reports import thread_advice
    (line,) = thread_advice(_advice_report(wall_s=30.0))
    assert "jets 90 %" in line and "--processes 2 -j 1" in line
    assert thread_advice(_advice_report(wall_s=0.5)) == []             # too short to judge
    # threads that wait for external work (100 x 500 ms of 60 thread-seconds) are not idle
    assert thread_advice(_advice_report(wall_s=30.0, external_ms_mean=500.0)) == []
