"""The scheduler's semantics: paths and filters, on-demand producers, ExternalWork, errors,
concurrency kinds, determinism, the synchronous mode and the watchdog.

The test modules below compute from event data (numpy arrays seeded by the event number) and
write what they did into a Recorder (the ``recorder`` fixtures). Modules whose name starts with
``Failing``/``Faulty``/``Sneaky`` inject faults on purpose.
"""
from __future__ import annotations

import copy
import io
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from recorun import (Analyzer, Concurrency, ConfigError, Event, EventID,
                       ExternalWorkProducer, Filter, InputTag, InputTagList, ModuleError, Param,
                       ProductNotFound, Producer, run_workflow)
from recorun.framework.config import expand_workflow_dir, load_yaml

REPO = Path(__file__).resolve().parents[1]


def load_workflow(path: Path) -> dict:
    """A workflow file as a mapping, ``${WORKFLOW_DIR}`` expanded."""
    return expand_workflow_dir(load_yaml(path), str(path.parent))
EXIT_MODULE = 4


def event_values(number: int, size: int = 256) -> np.ndarray:
    """The per-event data every test derives from: normal deviates seeded by the event number."""
    return np.random.default_rng(number).normal(size=size)


def is_pool_thread(name: str) -> bool:
    return name == "MainThread" or name.startswith("recorun-")


# -- test modules --------------------------------------------------------------------------
class EventData(Producer):
    """Puts :func:`event_values` of the event."""

    concurrency = Concurrency.SHARED
    size = Param(int, 256)
    log = Param(Any, None)

    def produce(self, event):
        if self.log is not None:
            self.log.record("produce", self.label, event.id.event)
        event.put(event_values(event.id.event, self.size))


class Smooth(Producer):
    """Running mean (window 8) of its input array."""

    concurrency = Concurrency.SHARED
    src = InputTag()
    log = Param(Any, None)

    def produce(self, event):
        if self.log is not None:
            self.log.record("produce", self.label, event.id.event)
        event.put(np.convolve(event.get(self.src), np.full(8, 1 / 8), mode="same"))


class Combine(Producer):
    """Element-wise sum of its inputs."""

    concurrency = Concurrency.SHARED
    inputs = InputTagList()
    log = Param(Any, None)

    def produce(self, event):
        if self.log is not None:
            self.log.record("produce", self.label, event.id.event)
        event.put(np.sum([event.get(t) for t in self.inputs], axis=0))


class DivisibleBy(Filter):
    """Accepts events whose number is a multiple of ``divisor``."""

    concurrency = Concurrency.SHARED
    divisor = Param(int)
    log = Param(Any, None)

    def filter(self, event):
        if self.log is not None:
            self.log.record("filter", self.label, event.id.event)
        return event.id.event % self.divisor == 0


class Sums(Analyzer):
    """Records the sum of each input product."""

    concurrency = Concurrency.SHARED
    inputs = InputTagList([])
    log = Param(Any, None)

    def analyze(self, event):
        sums = tuple(float(np.sum(event.get(t))) for t in self.inputs)
        self.log.record("analyze", self.label, event.id.event, sums)


class TriggerLog(Analyzer):
    """Records each path's decision, from TriggerResults (end paths only)."""

    concurrency = Concurrency.SHARED
    trigger = InputTag("TriggerResults")
    log = Param(Any, None)

    def analyze(self, event):
        self.log.record("trigger", self.label, event.id.event, dict(event.get(self.trigger).paths))


class ExternalCumsum(ExternalWorkProducer):
    """Cumulative sum of its input, computed outside the framework.

    ``mode`` says how the external side runs: ``inline`` calls ``holder.done()`` inside
    acquire; ``early`` runs the work on its own thread, which calls ``done()`` while acquire
    still waits for it; ``timer`` runs it on a ``threading.Timer`` after ``latency`` +
    uniform(0, ``jitter``) seconds (injected latency); ``pool`` on the module's own pool.
    """

    concurrency = Concurrency.SHARED
    src = InputTag()
    mode = Param(str, "timer", choices=["inline", "early", "timer", "pool"])
    latency = Param(float, 0.0)
    jitter = Param(float, 0.002)
    log = Param(Any, None)

    def begin_job(self):
        self._lock = threading.Lock()
        self._results: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="external-pool") \
            if self.mode == "pool" else None

    def end_job(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _record(self, *entry):
        if self.log is not None:
            self.log.record(*entry)

    def external_work(self, number: int, index: int, data: np.ndarray, holder) -> None:
        result = np.cumsum(data)
        with self._lock:
            self._results[index] = result
        self._record("done", self.label, number, threading.current_thread().name)
        holder.done()

    def acquire(self, event, holder):
        number, index = event.id.event, event.index
        data = event.get(self.src)
        self._record("acquire_start", self.label, number)
        args = (number, index, data, holder)
        if self.mode == "inline":
            self.external_work(*args)
        elif self.mode == "early":
            called = threading.Event()

            def external():
                self.external_work(*args)
                called.set()

            threading.Thread(target=external, name=f"external-{self.label}-{number}").start()
            called.wait()
            # done() was called; acquire goes on working: produce must still wait for us
            self._record("after_done_in_acquire", self.label, number,
                         float(np.linalg.norm(np.sort(data))))
        elif self.mode == "timer":
            delay = self.latency + random.uniform(0.0, self.jitter)
            timer = threading.Timer(delay, self.external_work, args)
            timer.name = f"external-{self.label}-{number}"
            timer.start()
        else:
            self._pool.submit(self.external_work, *args)
        self._record("acquire_end", self.label, number)

    def produce(self, event):
        self._record("produce", self.label, event.id.event, threading.current_thread().name)
        with self._lock:
            result = self._results.pop(event.index)
        event.put(result)


class FailingExternalOnEvery11th(ExternalCumsum):
    """Injected fault: the external work fails (``holder.done(error)``) on events 11, 22..."""

    def external_work(self, number, index, data, holder):
        if number % 11:
            super().external_work(number, index, data, holder)
        else:
            self._record("done", self.label, number, threading.current_thread().name)
            holder.done(ConnectionError(f"injected external failure on event {number}"))


class FailingAcquireOnEvery13th(ExternalCumsum):
    """Injected fault: acquire raises on events 13, 26..., before starting any work."""

    def acquire(self, event, holder):
        if event.id.event % 13 == 0:
            self._record("acquire_raises", self.label, event.id.event)
            raise ValueError(f"injected acquire failure on event {event.id.event}")
        super().acquire(event, holder)


class FailingOnEvery7th(Producer):
    """Injected fault: produce raises on events 7, 14...; otherwise the input's square."""

    concurrency = Concurrency.SHARED
    src = InputTag()
    log = Param(Any, None)

    def produce(self, event):
        if event.id.event % 7 == 0:
            raise RuntimeError(f"injected failure on event {event.id.event}")
        event.put(np.square(event.get(self.src)))


class SerialSpectrum(Producer):
    """Singular values of an outer-product matrix of its input; serial ("one") module.

    Detects concurrent calls with a non-blocking acquire of a lock held during the call.
    """

    concurrency = Concurrency.SERIAL
    src = InputTag()
    log = Param(Any, None)

    def begin_job(self):
        self._busy = threading.Lock()

    def produce(self, event):
        entered = self._busy.acquire(blocking=False)
        if not entered:
            self.log.record("overlap", self.label, event.id.event)
        try:
            x = event.get(self.src)[:96]
            matrix = np.outer(x, x) + np.diag(np.abs(x) + 1.0)
            singular = np.linalg.svd(matrix @ matrix.T, compute_uv=False)
            self.log.record("produce", self.label, event.id.event)
            event.put(singular)
        finally:
            if entered:
                self._busy.release()


class SerialExternalCumsum(ExternalCumsum):
    concurrency = Concurrency.SERIAL


class SerialCount(Analyzer):
    """Counts events and accumulates the sum of a product; serial."""

    concurrency = Concurrency.SERIAL
    src = InputTag()
    log = Param(Any, None)

    def begin_job(self):
        self.events = 0
        self.total = 0.0

    def analyze(self, event):
        self.events += 1
        self.total += float(np.sum(event.get(self.src)))
        self.log.record("analyze", self.label, event.id.event)


class StreamState(ExternalWorkProducer):
    """A stream module that keeps per-event state in ``self`` from acquire to produce.

    Each copy flags a second event arriving while it holds one (non-blocking lock taken in
    acquire, released in produce) and an event whose produce does not match its acquire.
    """

    concurrency = Concurrency.STREAM
    src = InputTag()
    log = Param(Any, None)

    def begin_job(self):
        self._busy = threading.Lock()
        self._current = None
        self.events: list[int] = []

    def acquire(self, event, holder):
        if not self._busy.acquire(blocking=False):
            self.log.record("overlap", self.label, id(self), event.id.event)
        self._current = (event.id.event, event.get(self.src))
        self.events.append(event.id.event)
        self.log.record("instance", self.label, id(self), event.stream, event.id.event)

        def external():
            number, data = self._current
            self._result = np.cumsum(np.abs(data))
            holder.done()

        timer = threading.Timer(random.uniform(0.0, 0.002), external)
        timer.start()

    def produce(self, event):
        number, _ = self._current
        if number != event.id.event:
            self.log.record("mixed", self.label, id(self), number, event.id.event)
        event.put(self._result)
        self._current = None
        self._busy.release()


# -- 1. paths and filters ------------------------------------------------------------------
def test_paths_filters_trigger_results_and_select_events(recorder, workflow):
    n_events = 60
    log = recorder
    modules = {
        "data": {"type": EventData, "log": log},
        "div2": {"type": DivisibleBy, "divisor": 2, "log": log},
        "div3": {"type": DivisibleBy, "divisor": 3, "log": log},
        "div5": {"type": DivisibleBy, "divisor": 5, "log": log},
        "div7": {"type": DivisibleBy, "divisor": 7, "log": log},
        "anaA": {"type": Sums, "inputs": ["data"], "log": log},
        "anaB": {"type": Sums, "inputs": ["data"], "log": log},
        "trig": {"type": TriggerLog, "log": log},
        "selected": {"type": TriggerLog, "log": log, "select_events": ["pB", "pC"]},
    }
    paths = {"pA": ["div2", "anaA"], "pB": ["div3", "div5", "anaB"], "pC": ["div7"]}
    endpaths = {"all": ["trig"], "sel": ["selected"]}
    result = run_workflow(workflow(modules, paths, endpaths, events=n_events, threads=2,
                                   streams=4))
    assert result.exit_code == 0, result.error
    numbers = range(1, n_events + 1)
    expect = {n: {"pA": n % 2 == 0, "pB": n % 15 == 0, "pC": n % 7 == 0} for n in numbers}

    # a rejecting filter stops its path: the modules after it did not run for that event
    assert sorted(n for _, _, n in log.where("filter", "div5")) == [n for n in numbers
                                                                    if n % 3 == 0]
    seen_a = {n: sums for _, _, n, sums in log.where("analyze", "anaA")}
    seen_b = {n: sums for _, _, n, sums in log.where("analyze", "anaB")}
    assert sorted(seen_a) == [n for n in numbers if n % 2 == 0]
    assert sorted(seen_b) == [n for n in numbers if n % 15 == 0]
    # ... and did not stop the other paths: every filter that starts a path saw every event
    for label in ("div2", "div3", "div7"):
        assert sorted(n for _, _, n in log.where("filter", label)) == list(numbers)
    # the analyzers read the right product
    for n, sums in {**seen_a, **seen_b}.items():
        assert sums == pytest.approx((event_values(n).sum(),))

    # TriggerResults holds each path's decision, for every event
    trig = {n: paths_ for _, _, n, paths_ in log.where("trigger", "trig")}
    assert trig == expect
    # select_events: the end-path module sees only events accepted by pB or pC
    selected = sorted(n for _, _, n, _ in log.where("trigger", "selected"))
    assert selected == [n for n in numbers if expect[n]["pB"] or expect[n]["pC"]]

    report = result.report
    accepted = sum(any(d.values()) for d in expect.values())
    assert report["events"] == {"read": n_events, "accepted": accepted,
                                "rejected": n_events - accepted, "failed": 0}
    for name in paths:
        passed = sum(d[name] for d in expect.values())
        p = report["paths"][name]
        assert (p["visited"], p["passed"], p["rejected"], p["failed"]) == \
            (n_events, passed, n_events - passed, 0), name
    per_module = {m["label"]: m for m in report["paths"]["pB"]["modules"]}
    assert (per_module["div3"]["visited"], per_module["div3"]["passed"]) == (60, 20)
    assert (per_module["div5"]["visited"], per_module["div5"]["passed"]) == (20, 4)
    assert per_module["anaB"]["visited"] == 4
    assert report["modules"]["div5"]["runs"] == 20
    assert report["modules"]["anaA"]["runs"] == 30
    assert report["endpaths"]["sel"]["modules"][0]["visited"] == len(selected)
    assert report["modules"]["selected"]["runs"] == len(selected)
    assert report["modules"]["trig"]["runs"] == n_events


# -- 2. on-demand producers ----------------------------------------------------------------
def test_on_demand_producers_run_once_per_event_and_only_when_needed(recorder, workflow):
    n_events = 80
    log = recorder
    modules = {
        "raw": {"type": EventData, "log": log},
        "calib": {"type": Smooth, "src": "raw", "log": log},
        "other": {"type": Smooth, "src": "raw", "log": log},
        "combo": {"type": Combine, "inputs": ["calib", "other", "raw"], "log": log},
        "gated": {"type": Smooth, "src": "calib", "log": log},
        "unused": {"type": Smooth, "src": "raw", "log": log},
        "div4": {"type": DivisibleBy, "divisor": 4},
        "anaA": {"type": Sums, "inputs": ["calib", "raw"], "log": log},
        "anaB": {"type": Sums, "inputs": ["calib"], "log": log},
        "anaC": {"type": Sums, "inputs": ["combo", "calib"], "log": log},
        "anaG": {"type": Sums, "inputs": ["gated"], "log": log},
    }
    paths = {"pA": ["anaA"], "pB": ["anaB"], "pC": ["anaC"], "pG": ["div4", "anaG"]}
    result = run_workflow(workflow(modules, paths, events=n_events, threads=2, streams=4))
    assert result.exit_code == 0, result.error
    numbers = list(range(1, n_events + 1))
    runs = result.report["modules"]
    for label in ("raw", "calib", "other", "combo"):
        counts = log.counts("produce", label)
        assert counts == {(n,): 1 for n in numbers}, label
        assert runs[label]["runs"] == n_events
    # behind the rejecting filter: the producer only ran where its consumer did
    gated = log.counts("produce", "gated")
    assert gated == {(n,): 1 for n in numbers if n % 4 == 0}
    assert runs["gated"]["runs"] == n_events // 4
    assert log.where("produce", "unused") == [] and runs["unused"]["runs"] == 0
    # the consumers all saw the one product of each event
    for n, (combo, calib) in ((n, s) for _, _, n, s in log.where("analyze", "anaC")):
        smooth = np.convolve(event_values(n), np.full(8, 1 / 8), mode="same")
        assert calib == pytest.approx(smooth.sum())
        assert combo == pytest.approx(2 * smooth.sum() + event_values(n).sum())


# -- 3. ExternalWork ordering and threads --------------------------------------------------
@pytest.mark.parametrize("threads,streams", [(1, 1), (2, 4)])
@pytest.mark.parametrize("mode", ["inline", "early", "timer"])
def test_external_work_produce_after_acquire_on_pool_thread(recorder, mode, threads, streams, workflow):
    n_events = 24
    log = recorder
    modules = {"data": {"type": EventData},
               "ext": {"type": ExternalCumsum, "src": "data", "mode": mode, "log": log},
               "ana": {"type": Sums, "inputs": ["ext"], "log": log}}
    result = run_workflow(workflow(modules, {"p": ["ana"]}, events=n_events, threads=threads,
                                   streams=streams))
    assert result.exit_code == 0, result.error
    entries = log.entries
    for n in range(1, n_events + 1):
        def position(what):
            found = [i for i, e in enumerate(entries) if e[0] == what and e[2] == n]
            assert len(found) == 1, (what, n, found)
            return found[0]

        start, end, done, produce = (position(w) for w in
                                     ("acquire_start", "acquire_end", "done", "produce"))
        assert start < done and end < produce and done < produce
        if mode in ("inline", "early"):
            assert done < end                       # the case meant: done() inside acquire
        produce_thread = entries[produce][3]
        done_thread = entries[done][3]
        assert is_pool_thread(produce_thread), produce_thread
        if mode != "inline":
            assert done_thread.startswith("external-")
            assert produce_thread != done_thread
        (total,) = [s for _, _, m, s in log.where("analyze", "ana") if m == n][0]
        assert total == pytest.approx(np.cumsum(event_values(n)).sum())
    assert result.report["modules"]["ext"]["runs"] == n_events


# -- 4. failed external work and failing acquire -------------------------------------------
@pytest.mark.parametrize("threads,streams", [(1, 1), (2, 4)])
def test_failed_external_work_skips_produce_and_fails_event(recorder, threads, streams, workflow):
    log = recorder
    modules = {"data": {"type": EventData},
               "ext": {"type": FailingExternalOnEvery11th, "src": "data", "log": log},
               "ana": {"type": Sums, "inputs": ["ext"], "log": log}}
    result = run_workflow(workflow(modules, {"pExt": ["ana"]}, events=40, threads=threads,
                                   streams=streams))
    assert result.exit_code == EXIT_MODULE
    report = result.report
    assert report["stop_reason"] == "module error"
    produced = {n for _, _, n, _ in log.where("produce", "ext")}
    assert 11 not in produced and 11 in {n for _, _, n, _ in log.where("done", "ext")}
    assert 11 not in {n for _, _, n, _ in log.where("analyze", "ana")}
    assert set(range(1, 11)) <= produced

    error = result.error
    assert isinstance(error, ModuleError)
    assert (error.event_id, error.label, error.module_type, error.method, error.path) == \
        (EventID(1, 1, 11), "ext", "FailingExternalOnEvery11th", "external", "pExt")
    assert isinstance(error.cause, ConnectionError)
    assert "injected external failure on event 11" in str(error)
    failed = {f["event"]: f for f in report["failed_events"]}
    assert "1:1:11" in failed
    assert report["events"]["failed"] == len(report["failed_events"])
    for f in failed.values():
        assert int(f["event"].split(":")[2]) % 11 == 0
        assert (f["label"], f["module_type"], f["method"], f["path"]) == \
            ("ext", "FailingExternalOnEvery11th", "external", "pExt")
        assert f["index"] == int(f["event"].split(":")[2]) - 1
        assert "ConnectionError: injected external failure" in f["error"]
    ev = report["events"]
    assert ev["read"] == ev["accepted"] + ev["rejected"] + ev["failed"]
    if threads == 1:
        assert ev == {"read": 11, "accepted": 10, "rejected": 0, "failed": 1}


def test_exception_in_acquire_fails_with_method_acquire(recorder, workflow):
    log = recorder
    modules = {"data": {"type": EventData},
               "ext": {"type": FailingAcquireOnEvery13th, "src": "data", "mode": "inline",
                       "log": log},
               "ana": {"type": Sums, "inputs": ["ext"], "log": log}}
    result = run_workflow(workflow(modules, {"pAcq": ["ana"]}, events=20))
    assert result.exit_code == EXIT_MODULE
    error = result.error
    assert isinstance(error, ModuleError) and isinstance(error.cause, ValueError)
    assert (error.event_id, error.label, error.module_type, error.method, error.path) == \
        (EventID(1, 1, 13), "ext", "FailingAcquireOnEvery13th", "acquire", "pAcq")
    assert 13 not in {n for _, _, n, _ in log.where("produce", "ext")}
    (failure,) = result.report["failed_events"]
    assert (failure["event"], failure["method"], failure["label"], failure["path"]) == \
        ("1:1:13", "acquire", "ext", "pAcq")
    assert result.report["events"] == {"read": 13, "accepted": 12, "rejected": 0, "failed": 1}


# -- 5. on_error: skip_event ----------------------------------------------------------------
def test_skip_event_continues_and_accounts_for_every_event(recorder, workflow):
    n_events = 100
    log = recorder
    modules = {
        "data": {"type": EventData},
        "sq": {"type": FailingOnEvery7th, "src": "data"},
        "ext": {"type": FailingExternalOnEvery11th, "src": "data", "log": log},
        "acq": {"type": FailingAcquireOnEvery13th, "src": "data", "mode": "pool", "log": log},
        "div2": {"type": DivisibleBy, "divisor": 2},
        "div3": {"type": DivisibleBy, "divisor": 3},
        "ana": {"type": Sums, "inputs": ["sq", "ext", "acq"], "log": log},
        "trig": {"type": TriggerLog, "log": log},
    }
    paths = {"p1": ["div2", "ana"], "p2": ["div3"]}
    result = run_workflow(workflow(modules, paths, {"end": ["trig"]}, events=n_events,
                                   threads=2, streams=4, on_error="skip_event"))
    assert result.exit_code == 0 and result.error is None
    report = result.report
    assert report["stop_reason"] is None and report["not_processed"] is None

    cause = {}
    for n in range(2, n_events + 1, 2):       # the failing producers run only behind div2
        for divisor, method, label in ((7, "produce", "sq"), (11, "external", "ext"),
                                       (13, "acquire", "acq")):
            if n % divisor == 0:
                cause[n] = (method, label)
    failed = {int(f["event"].split(":")[2]): f for f in report["failed_events"]}
    assert {n: (f["method"], f["label"]) for n, f in failed.items()} == cause
    assert all(f["path"] == "p1" for f in failed.values())
    accepted = [n for n in range(1, n_events + 1)
                if n not in cause and (n % 2 == 0 or n % 3 == 0)]
    assert report["events"] == {"read": n_events, "accepted": len(accepted),
                                "rejected": n_events - len(accepted) - len(cause),
                                "failed": len(cause)}
    ev = report["events"]
    assert ev["read"] == ev["accepted"] + ev["rejected"] + ev["failed"]
    # failed events went no further: no produce after a failed external call or acquire,
    # no analyzer, no end path
    assert not {n for n, (m, _) in cause.items() if m == "external"} & \
        {n for _, _, n, _ in log.where("produce", "ext")}
    assert not {n for n, (m, _) in cause.items() if m == "acquire"} & \
        {n for _, _, n, _ in log.where("produce", "acq")}
    assert not set(cause) & {n for _, _, n, _ in log.where("analyze", "ana")}
    assert sorted(n for _, _, n, _ in log.where("trigger", "trig")) == \
        [n for n in range(1, n_events + 1) if n not in cause]
    assert report["paths"]["p1"]["failed"] == len(cause)
    assert report["modules"]["sq"]["errors"] == sum(m == "produce" for m, _ in cause.values())


# -- 6. on_error: stop ----------------------------------------------------------------------
@pytest.mark.parametrize("threads,streams", [(1, 1), (2, 4)])
def test_stop_finishes_events_in_flight_and_names_unread_events(recorder, threads, streams, workflow):
    n_events = 200
    log = recorder
    modules = {
        "data": {"type": EventData},
        "ext": {"type": ExternalCumsum, "src": "data", "jitter": 0.003},
        "sq": {"type": FailingOnEvery7th, "src": "ext"},
        "ana": {"type": Sums, "inputs": ["sq"], "log": log},
        "trig": {"type": TriggerLog, "log": log},
    }
    result = run_workflow(workflow(modules, {"p": ["ana"]}, {"end": ["trig"]},
                                   events=n_events, threads=threads, streams=streams))
    assert result.exit_code == EXIT_MODULE
    report = result.report
    ev = report["events"]
    read = ev["read"]
    assert 7 <= read < n_events
    assert read == ev["accepted"] + ev["rejected"] + ev["failed"]
    failed = {int(f["event"].split(":")[2]) for f in report["failed_events"]}
    assert 7 in failed and all(n % 7 == 0 for n in failed) and len(failed) == ev["failed"]
    # every event read finished: it failed or went through the end path
    finished = {n for _, _, n, _ in log.where("trigger", "trig")}
    assert finished | failed == set(range(1, read + 1)) and not finished & failed
    assert report["not_processed"] is not None
    assert f"{n_events - read} events not read" in report["not_processed"]
    assert f"event indices {read} to {n_events - 1}" in report["not_processed"]
    if threads == 1:
        assert ev == {"read": 7, "accepted": 6, "rejected": 0, "failed": 1}


# -- 7. the same products whatever the thread count ----------------------------------------
TOY_HLT = {
    "process": {"report_every_s": 0},
    "source": {"type": "EmptySource", "count": 1000},
    "modules": {
        "hits": {"type": "ToyCaloHitProducer", "seed": 2021},
        "rawTowers": {"type": "CaloTowerProducer", "hits": "hits"},
        "towers": {"type": "ThreadPoolEnergyCalibrator", "towers": "rawTowers"},
        "jets": {"type": "TowerJetProducer", "towers": "towers"},
        "met": {"type": "MissingEtProducer", "towers": "towers"},
        "htFilter": {"type": "HTFilter", "jets": "jets", "min_ht": 300.0},
        "metFilter": {"type": "MinimumFilter", "value": "met", "minimum": 60.0},
        "minBias": {"type": "PrescaleFilter", "prescale": 50},
        "output": {"type": "RootOutput", "products": ["jets", "met", "hits:truth", "towers"],
                   "select_events": ["HLT_HT300", "HLT_MET60", "HLT_MinBias"],
                   "file": "set by the test"},
    },
    "paths": {"HLT_HT300": ["htFilter"], "HLT_MET60": ["metFilter"],
              "HLT_MinBias": ["minBias"]},
    "endpaths": {"out": ["output"]},
}


def _run_at(raw: dict, threads: int, output: Path, log) -> tuple[dict, dict]:
    """Run ``raw`` with ``threads`` threads and as many streams, its TriggerResults recorded
    into ``log`` (a Recorder); return the report and the TriggerResults of every event."""
    wf = copy.deepcopy(raw)
    wf["process"].update(threads=threads, streams=threads, report_every_s=0)
    wf["modules"]["output"]["file"] = str(output)
    wf["modules"]["trigLog"] = {"type": TriggerLog, "log": log}
    wf["endpaths"]["trig"] = ["trigLog"]
    result = run_workflow(wf)
    assert result.exit_code == 0, result.error
    return result.report, {n: d for _, _, n, d in log.where("trigger", "trigLog")}


def _assert_same_job(raw: dict, tmp_path: Path, n_events: int, new_recorder) -> None:
    files, reports, triggers = {}, {}, {}
    for threads in (1, 4):
        files[threads] = tmp_path / f"threads{threads}" / "accepted.root"
        reports[threads], triggers[threads] = _run_at(raw, threads, files[threads],
                                                          new_recorder())
        assert len(triggers[threads]) == n_events

    one, four = (uproot.open(files[t])["Events"] for t in (1, 4))
    assert one.keys() == four.keys()
    for name in one.keys():
        a, b = one[name].array(library="ak"), four[name].array(library="ak")
        assert a.type == b.type, name
        assert ak.all(ak.flatten(a == b, axis=None)), name
    assert triggers[1] == triggers[4]
    accepted = sorted(n for n, d in triggers[1].items() if any(d.values()))
    # the output holds exactly the accepted events, in event order
    assert one["event"].array(library="np").tolist() == accepted
    for threads in (1, 4):
        report = reports[threads]
        assert report["events"]["accepted"] == len(accepted)
        for path in raw["paths"]:
            assert report["paths"][path]["passed"] == \
                sum(d[path] for d in triggers[threads].values())
    assert reports[1]["events"] == reports[4]["events"]
    assert 0 < reports[1]["events"]["accepted"] < n_events
    assert reports[1]["paths"] == reports[4]["paths"]
    for label, m in reports[1]["modules"].items():
        assert m["runs"] == reports[4]["modules"][label]["runs"], label


def test_identical_products_for_1_and_4_threads_over_1000_events(tmp_path, new_recorder):
    _assert_same_job(TOY_HLT, tmp_path, 1000, new_recorder)


@pytest.mark.server
def test_hlt_workflow_identical_products_for_1_and_4_threads(tmp_path, new_recorder):
    raw = load_workflow(REPO / "workflows" / "workflow_hlt.yaml")
    _assert_same_job(raw, tmp_path, 100, new_recorder)


# -- 8. no deadlock with more streams than threads ------------------------------------------
@pytest.mark.parametrize("threads,streams,n_events", [(1, 8, 200), (2, 100, 300)])
def test_no_deadlock_more_streams_than_threads(recorder, threads, streams, n_events, run_guarded, workflow):
    log = recorder
    modules = {
        "data": {"type": EventData, "size": 128},
        "ext": {"type": ExternalCumsum, "src": "data", "mode": "pool"},
        "spectrum": {"type": SerialSpectrum, "src": "ext", "log": log},
        "serialExt": {"type": SerialExternalCumsum, "src": "spectrum", "jitter": 0.001},
        "timerExt": {"type": ExternalCumsum, "src": "data", "jitter": 0.001},
        "div3": {"type": DivisibleBy, "divisor": 3},
        "count": {"type": SerialCount, "src": "serialExt", "log": log},
        "late": {"type": Sums, "inputs": ["timerExt", "serialExt"], "log": log},
        "trig": {"type": TriggerLog, "log": log},
    }
    paths = {"p1": ["count"], "p2": ["div3", "late"]}
    result = run_guarded(workflow(modules, paths, {"end": ["trig"]}, events=n_events,
                                  threads=threads, streams=streams), timeout=60)
    assert result.exit_code == 0, result.error
    assert result.report["events"] == {"read": n_events, "accepted": n_events, "rejected": 0,
                                       "failed": 0}
    numbers = list(range(1, n_events + 1))
    assert sorted(n for _, _, n in log.where("analyze", "count")) == numbers
    assert sorted(n for _, _, n, _ in log.where("trigger", "trig")) == numbers
    assert sorted(n for _, _, n, _ in log.where("analyze", "late")) == numbers[2::3]
    assert log.where("overlap") == []


# -- 9. serial and stream modules ----------------------------------------------------------
def test_serial_never_concurrent_and_stream_copies_see_one_event_at_a_time(recorder, workflow):
    n_events, streams = 60, 4
    log = recorder
    modules = {
        "data": {"type": EventData},
        "spectrum": {"type": SerialSpectrum, "src": "data", "log": log},
        "state": {"type": StreamState, "src": "data", "log": log},
        "both": {"type": Combine, "inputs": ["state", "data"]},
        "count": {"type": SerialCount, "src": "spectrum", "log": log},
        "ana": {"type": Sums, "inputs": ["both"], "log": log},
    }
    result = run_workflow(workflow(modules, {"p1": ["count"], "p2": ["ana"]}, events=n_events,
                                   threads=2, streams=streams))
    assert result.exit_code == 0, result.error
    numbers = list(range(1, n_events + 1))
    assert log.where("overlap") == [] and log.where("mixed") == []
    assert sorted(n for _, _, n in log.where("produce", "spectrum")) == numbers
    # stream module: one copy per stream, each always on its own stream
    instances = log.where("instance", "state")
    assert sorted(n for *_, n in instances) == numbers
    stream_of: dict[int, set] = {}
    for _, _, instance, stream, _ in instances:
        stream_of.setdefault(instance, set()).add(stream)
    assert len(stream_of) == streams
    assert all(len(s) == 1 for s in stream_of.values())
    assert set().union(*stream_of.values()) == set(range(streams))
    copies = result.scheduler.workers["state"].copies
    assert len(copies) == streams and len({id(c) for c in copies}) == streams
    assert sorted(n for c in copies for n in c.events) == numbers
    assert len(result.scheduler.workers["spectrum"].copies) == 1
    for n, (total,) in ((n, s) for _, _, n, s in log.where("analyze", "ana")):
        values = event_values(n)
        assert total == pytest.approx(np.cumsum(np.abs(values)).sum() + values.sum())


# -- 10. synchronous mode -------------------------------------------------------------------
def test_synchronous_mode_fixed_call_order_despite_random_external_delays(new_recorder, workflow):
    orders = []
    for _ in range(2):
        log = new_recorder()
        modules = {
            "data": {"type": EventData, "log": log},
            "extA": {"type": ExternalCumsum, "src": "data", "jitter": 0.004, "log": log},
            "extB": {"type": ExternalCumsum, "src": "data", "jitter": 0.004, "log": log},
            "both": {"type": Combine, "inputs": ["extA", "extB"], "log": log},
            "div3": {"type": DivisibleBy, "divisor": 3, "log": log},
            "anaA": {"type": Sums, "inputs": ["extA"], "log": log},
            "anaB": {"type": Sums, "inputs": ["both"], "log": log},
        }
        paths = {"p1": ["div3", "anaB"], "p2": ["anaA"]}
        result = run_workflow(workflow(modules, paths, events=30, threads=1, streams=1,
                                       synchronous=True))
        assert result.exit_code == 0, result.error
        # module calls in order: the external side's own "done" entries (which race with the
        # end of acquire by design) and thread names (the timers' differ) left out
        orders.append([e[:3] for e in log.entries if e[0] != "done"])
    assert len(orders[0]) > 30 * 6
    assert orders[0] == orders[1]


# -- 11. watchdog ---------------------------------------------------------------------------
def test_watchdog_names_module_and_event_of_a_slow_external_call(new_recorder, workflow):
    out = io.StringIO()
    modules = {"data": {"type": EventData},
               "slowCall": {"type": ExternalCumsum, "src": "data", "latency": 1.0,
                            "jitter": 0.0},
               "ana": {"type": Sums, "inputs": ["slowCall"], "log": new_recorder()}}
    result = run_workflow(workflow(modules, {"p": ["ana"]}, events=2, threads=1, streams=2,
                                   watchdog_s=0.3), out=out)
    assert result.exit_code == 0, result.error
    text = out.getvalue()
    warnings = [line for line in text.splitlines() if "watchdog" in line]
    assert warnings, text
    for event in ("1:1:1", "1:1:2"):
        assert any("'slowCall'" in w and event in w and "external" in w for w in warnings), \
            text


# -- 13. the product store ------------------------------------------------------------------
class FaultyDoublePut(Producer):
    """Injected fault: puts its product twice."""

    src = InputTag()

    def produce(self, event):
        values = event.get(self.src)
        event.put(values.mean())
        event.put(values.std())


class SneakyReader(Analyzer):
    """Injected fault: reads ``data`` though it declares only ``other``."""

    other = InputTag()

    def analyze(self, event):
        event.get(self.other)
        event.get("data")


def test_event_put_twice_raises():
    event = Event(EventID(1, 1, 5), 4)
    event.put("jets", event_values(5))
    with pytest.raises(ValueError, match="already in event 1:1:5"):
        event.put("jets", event_values(6))
    assert np.array_equal(event.get("jets"), event_values(5))


def test_module_putting_twice_fails_the_event(new_recorder, workflow):
    modules = {"data": {"type": EventData},
               "twice": {"type": FaultyDoublePut, "src": "data"},
               "ana": {"type": Sums, "inputs": ["twice"], "log": new_recorder()}}
    result = run_workflow(workflow(modules, {"p": ["ana"]}, events=3))
    assert result.exit_code == EXIT_MODULE
    assert isinstance(result.error, ModuleError) and isinstance(result.error.cause, ValueError)
    assert (result.error.label, result.error.method, result.error.event_id) == \
        ("twice", "produce", EventID(1, 1, 1))
    assert "put once" in str(result.error)


def test_reading_an_undeclared_product_names_the_module(workflow):
    modules = {"data": {"type": EventData}, "other": {"type": Smooth, "src": "data"},
               "sneaky": {"type": SneakyReader, "other": "other"}}
    result = run_workflow(workflow(modules, {"p": ["sneaky"]}, events=3))
    assert result.exit_code == EXIT_MODULE
    error = result.error
    assert isinstance(error, ModuleError) and isinstance(error.cause, ProductNotFound)
    assert (error.label, error.method, error.module_type) == ("sneaky", "analyze",
                                                              "SneakyReader")
    assert "module 'sneaky' reads 'data' without declaring it" in str(error.cause)


def test_consuming_a_product_nobody_produces_is_a_config_error(recorder, workflow):
    modules = {"data": {"type": EventData, "log": recorder},
               "ana": {"type": Sums, "inputs": ["data", "dta"], "log": recorder}}
    with pytest.raises(ConfigError, match="module 'ana'.*'dta'"):
        run_workflow(workflow(modules, {"p": ["ana"]}, events=3))
    assert recorder.entries == []


# -- deep dependency chains -----------------------------------------------------------------
class ChainLink(Producer):
    """One link of a chain: the previous link's value plus (event number mod 10) + 1; the
    first link puts the event number."""

    concurrency = Concurrency.SHARED
    previous = InputTag(None)

    def produce(self, event):
        n = event.id.event
        event.put(event.get(self.previous) + n % 10 + 1 if self.previous else n)


class ChainEnd(Analyzer):
    concurrency = Concurrency.SHARED
    last = InputTag()
    log = Param(Any, None)

    def analyze(self, event):
        self.log.record("analyze", self.label, event.id.event, event.get(self.last))


def test_deep_producer_chain_does_not_overflow_the_stack(recorder, workflow):
    """The scheduler's docstring: no stack grows with the length of a path, whatever the
    module count. On-demand prefetching of a chain of producers must not recurse once per
    link either."""
    links = 1000
    modules = {"link0": {"type": ChainLink}}
    for i in range(1, links):
        modules[f"link{i}"] = {"type": ChainLink, "previous": f"link{i - 1}"}
    modules["end"] = {"type": ChainEnd, "last": f"link{links - 1}", "log": recorder}
    result = run_workflow(workflow(modules, {"p": ["end"]}, events=3))
    assert result.exit_code == 0, result.error
    values = {n: v for _, _, n, v in recorder.where("analyze", "end")}
    assert values == {n: n + (links - 1) * (n % 10 + 1) for n in (1, 2, 3)}
    assert result.report["modules"]["link0"]["runs"] == 3
