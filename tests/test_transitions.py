"""Runs and luminosity blocks, modules that cannot lose data, ExternalWork results through the
holder, intra-event tasks and type names registered twice.

The sources are EmptySources cut into luminosity blocks (``events_per_lumi``) and runs
(``lumis_per_run``): 2 runs of 3 lumis of 10 events unless said otherwise. Modules whose name
starts with ``Failing`` inject faults on purpose.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from recorun import (Analyzer, Concurrency, ExternalWorkProducer, Filter,
                     InputTagList, Param, Producer, run_workflow)

REPO = Path(__file__).resolve().parents[1]
RECORUN = [sys.executable, "-m", "recorun.framework.cli"]
TWO_RUNS = {"type": "EmptySource", "count": 60, "events_per_lumi": 10, "lumis_per_run": 3}
EXIT_MODULE = 4


class Shared(list):
    """A list the test and its modules share (a workflow mapping is deep-copied by
    run_workflow: this one is not)."""

    def __deepcopy__(self, memo):
        return self


class SharedBarrier(threading.Barrier):
    def __deepcopy__(self, memo):
        return self


def workflow(modules: dict, paths: dict, *, threads: int = 1, streams: int = 1,
             source: dict = TWO_RUNS, **process) -> dict:
    return {"process": {"threads": threads, "streams": streams, **process},
            "source": dict(source), "modules": modules, "paths": paths}


# -- test modules --------------------------------------------------------------------------
class TransitionLog(Analyzer):
    """Writes every transition it sees, and every event with the lumi it was begun in, into
    ``log`` (a list shared by the test); shared, so it is called from every stream at once."""

    concurrency = Concurrency.SHARED
    log = Param(list, None)

    def begin_job(self):
        self.lock = threading.Lock()
        self.current = None

    def begin_run(self, run):
        self.log.append(("begin_run", run.run))

    def begin_luminosity_block(self, lumi):
        self.log.append(("begin_lumi", lumi.run, lumi.luminosity_block))
        self.current = (lumi.run, lumi.luminosity_block)

    def end_luminosity_block(self, lumi):
        self.log.append(("end_lumi", lumi.run, lumi.luminosity_block, lumi.events))
        self.current = None

    def end_run(self, run):
        self.log.append(("end_run", run.run))

    def analyze(self, event):
        values = np.random.default_rng(event.id.event).normal(size=2000)
        np.sort(values)                             # some work, so events overlap
        with self.lock:
            self.log.append(("event", event.id.run, event.id.lumi, self.current))


class EnergySum(Analyzer):
    """A newcomer's histogram: the default analyzer concurrency, filled in analyze, written in
    end_job into ``out`` (a list)."""

    out = Param(list, None)

    def begin_job(self):
        self.entries = []

    def analyze(self, event):
        self.entries.append(float(np.random.default_rng(event.id.event).exponential()))

    def end_job(self):
        self.out.append(sorted(self.entries))


class StreamEnergySum(EnergySum):
    """The same, one copy per stream, folded together with merge_streams."""

    concurrency = Concurrency.STREAM

    def merge_streams(self, others):
        for other in others:
            self.entries += other.entries


class UnmergedStreamSum(EnergySum):
    concurrency = Concurrency.STREAM


class Payload:
    """An ExternalWork result; the test keeps weak references to see that none is kept."""

    def __init__(self, value):
        self.value = value


class OffloadedSquare(ExternalWorkProducer):
    """Squares the event's values on its own thread; the result comes through the holder."""

    concurrency = Concurrency.SHARED
    made = Param(list, None)             # weak references to every Payload made

    def acquire(self, event, holder):
        number = event.id.event

        def work():
            values = np.random.default_rng(number).normal(size=64)
            payload = Payload(values * values)
            self.made.append(weakref.ref(payload))
            holder.done(payload)

        threading.Thread(target=work).start()

    def produce(self, event, result):
        event.put(result.value.sum())


class FailingAfterAcquire(Producer):
    """Fails every third event while the external work is out (injected fault)."""

    concurrency = Concurrency.SHARED

    def produce(self, event):
        if event.id.event % 3 == 0:
            raise RuntimeError(f"injected failure of event {event.id.event}")
        event.put(event.id.event)


class Needs(Filter):
    concurrency = Concurrency.SHARED
    inputs = InputTagList([])

    def filter(self, event):
        return all(event.get(tag) is not None for tag in self.inputs)


class OldStyleExternal(ExternalWorkProducer):
    """The older ExternalWork form: produce(event) without a result, done(exception); a
    result given to done() anyway is warned about."""

    concurrency = Concurrency.SHARED

    def acquire(self, event, holder):
        if event.id.event == 4:
            holder.done(ConnectionError("injected failure of the external work"))
        else:
            holder.done(event.id.event if event.id.event == 7 else None)

    def produce(self, event):
        event.put(event.id.event * 2)


class Rendezvous(Producer):
    """Waits at ``barrier`` with its siblings: passes only if they run at the same time."""

    concurrency = Concurrency.SHARED
    barrier = Param(object, None)

    def produce(self, event):
        self.barrier.wait()
        event.put(float(np.random.default_rng(event.id.event).normal()))


class FailingLumiHook(Analyzer):
    concurrency = Concurrency.SHARED

    def begin_luminosity_block(self, lumi):
        if lumi.luminosity_block == 2:
            raise RuntimeError("injected failure at lumi 2")

    def analyze(self, event):
        pass


# -- runs and luminosity blocks --------------------------------------------------------------
def test_transitions_come_in_order_around_their_events_at_four_streams():
    log = Shared()
    result = run_workflow(workflow({"log": {"type": TransitionLog, "log": log}},
                                   {"p": ["log"]}, threads=4, streams=4))
    assert result.exit_code == 0
    transitions = [x for x in log if x[0] != "event"]
    expected = []
    for run in (1, 2):
        expected.append(("begin_run", run))
        for lumi in (1, 2, 3):
            expected += [("begin_lumi", run, lumi), ("end_lumi", run, lumi, 10)]
        expected.append(("end_run", run))
    assert transitions == expected
    events = [x for x in log if x[0] == "event"]
    assert len(events) == 60
    # every event ran inside its own luminosity block, and the blocks never overlapped
    assert all(current == (run, lumi) for _, run, lumi, current in events)
    position = {x: i for i, x in enumerate(log)}
    for run in (1, 2):
        for lumi in (1, 2, 3):
            mine = [i for i, x in enumerate(log) if x[:3] == ("event", run, lumi)]
            assert position[("begin_lumi", run, lumi)] < min(mine)
            assert max(mine) < position[("end_lumi", run, lumi, 10)]


def test_the_report_counts_events_per_lumi_and_path():
    class EvenFilter(Filter):
        concurrency = Concurrency.SHARED

        def filter(self, event):
            return event.id.event % 2 == 0

    result = run_workflow(workflow({"even": {"type": EvenFilter}}, {"evens": ["even"]},
                                   threads=2, streams=2))
    lumis = result.report["luminosity_blocks"]
    assert [(x["run"], x["luminosity_block"]) for x in lumis] == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all(x["events"] == 10 and x["accepted"] == {"evens": 5} and x["failed"] == 0
               for x in lumis)


def test_every_stream_copy_sees_each_transition_once():
    log = Shared()

    class PerStream(Analyzer):
        concurrency = Concurrency.STREAM

        def begin_luminosity_block(self, lumi):
            log.append((id(self), lumi.run, lumi.luminosity_block))

        def analyze(self, event):
            pass

    assert run_workflow(workflow({"a": {"type": PerStream}}, {"p": ["a"]}, threads=2,
                                 streams=3)).exit_code == 0
    assert len({copy for copy, _, _ in log}) == 3
    assert sorted(log) == sorted((c, r, l) for c in {x[0] for x in log}
                                 for r in (1, 2) for l in (1, 2, 3))


def test_a_failing_lumi_hook_stops_the_job_and_accounts_for_every_event():
    result = run_workflow(workflow({"bad": {"type": FailingLumiHook}}, {"p": ["bad"]},
                                   threads=2, streams=2))
    report = result.report
    assert result.exit_code == EXIT_MODULE
    assert report["stop_reason"] == "module error"
    assert report["events"] == {"read": 11, "accepted": 10, "rejected": 0, "failed": 1}
    assert ("module 'bad' (FailingLumiHook) failed in begin_luminosity_block() at the "
            "beginning of lumi 1:2, before event 1:2:11") in str(result.error)
    failure = report["failed_events"][0]
    assert failure["index"] == 10 and failure["method"] == "begin_luminosity_block"
    assert failure["event"] == "1:2:11"
    assert "injected failure at lumi 2" in failure["error"]
    assert "49 events not read" in report["not_processed"]


def test_a_chunked_job_reports_lumis_split_between_chunks_once(tmp_path):
    file = tmp_path / "w.yaml"
    file.write_text(json.dumps(workflow({}, {}, source={**TWO_RUNS, "count": 60})))
    report = tmp_path / "r.json"
    done = subprocess.run([*RECORUN, str(file), "--processes", "2", "--chunk-size", "7", "-q",
                           "--report-json", str(report)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lumis = json.loads(report.read_text())["luminosity_blocks"]
    assert [(x["run"], x["luminosity_block"], x["events"]) for x in lumis] == [
        (r, l, 10) for r in (1, 2) for l in (1, 2, 3)]


# -- modules that cannot lose data -----------------------------------------------------------
@pytest.mark.parametrize("kind", [EnergySum, StreamEnergySum])
def test_a_histogram_filled_in_analyze_sees_every_event_at_any_streams(kind):
    results = {}
    for streams in (1, 4):
        out = Shared()
        assert run_workflow(workflow({"h": {"type": kind, "out": out}}, {"p": ["h"]},
                                     threads=streams, streams=streams)).exit_code == 0
        assert len(out) == 1                 # one end_job wrote it
        results[streams] = out[0]
    assert len(results[1]) == 60
    assert results[4] == results[1]


def test_a_per_stream_module_that_writes_in_end_job_unmerged_is_warned_about(caplog):
    out = Shared()
    with caplog.at_level(logging.WARNING):
        run_workflow(workflow({"h": {"type": UnmergedStreamSum, "out": out}}, {"p": ["h"]},
                              threads=2, streams=2))
    assert "module 'h' (UnmergedStreamSum)" in caplog.text
    assert "merge_streams" in caplog.text
    assert sorted(len(x) for x in out) != [60] and sum(len(x) for x in out) == 60
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_workflow(workflow({"h": {"type": UnmergedStreamSum, "out": Shared()}}, {"p": ["h"]}))
    assert "merge_streams" not in caplog.text          # one stream: nothing is lost


# -- ExternalWork results through the holder -------------------------------------------------
def test_external_results_reach_produce_and_nothing_is_left_when_events_fail():
    made = Shared()
    result = run_workflow(workflow(
        {"a_square": {"type": OffloadedSquare, "made": made},
         "b_fragile": {"type": FailingAfterAcquire},
         "both": {"type": Needs, "inputs": ["a_square", "b_fragile"]}},
        {"p": ["both"]}, threads=2, streams=4, on_error="skip_event"))
    assert result.exit_code == 0
    assert result.report["events"]["failed"] == 20          # every third event
    assert result.report["events"]["accepted"] == 40
    assert len(made) == 60                                  # the work ran for every event
    gc.collect()                 # the job's scheduler and modules are still alive here
    assert [ref for ref in made if ref() is not None] == []   # no result kept anywhere
    assert result.scheduler.workers["a_square"].copies[0]


def test_the_older_external_work_form_still_works(caplog):
    with caplog.at_level(logging.WARNING):
        result = run_workflow(workflow({"old": {"type": OldStyleExternal},
                                    "use": {"type": Needs, "inputs": ["old"]}},
                                   {"p": ["use"]}, threads=2, streams=2,
                                   on_error="skip_event"))
    assert caplog.text.count("its produce(event) takes none") == 1
    assert result.report["events"]["failed"] == 1
    failure = result.report["failed_events"][0]
    assert failure["event"] == "1:1:4" and "injected failure" in failure["error"]


# -- intra-event parallelism -----------------------------------------------------------------
def test_independent_producers_of_one_module_run_at_the_same_time():
    """Two producers meet at a barrier in every event: with one stream, only intra-event tasks
    can bring them together (a timeout breaks the barrier and fails the event)."""
    barrier = SharedBarrier(2, timeout=20)
    result = run_workflow(workflow(
        {"a": {"type": Rendezvous, "barrier": barrier},
         "b": {"type": Rendezvous, "barrier": barrier},
         "both": {"type": Needs, "inputs": ["a", "b"]}},
        {"p": ["both"]}, threads=2, streams=1, source={"type": "EmptySource", "count": 20}))
    assert result.report["events"] == {"read": 20, "accepted": 20, "rejected": 0, "failed": 0}


# -- a type name registered twice ------------------------------------------------------------
def _package(root: Path, name: str, module: str, entry: str) -> None:
    """An installed-looking distribution on ``root``: a module and its entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent("""
        from recorun import Filter

        class MinimumFilter(Filter):
            def filter(self, event):
                return True
    """))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[recorun.modules]\n{entry} = {module}:MinimumFilter\n")


@pytest.mark.parametrize("second", [False, True])
def test_a_type_name_registered_twice_is_an_error_naming_both(tmp_path, second):
    _package(tmp_path, "cuts_one", "cuts_one", "MinimumFilter" if not second else "LooseCut")
    if second:
        _package(tmp_path, "cuts_two", "cuts_two", "LooseCut")
    name = "LooseCut" if second else "MinimumFilter"
    file = tmp_path / "w.yaml"
    file.write_text(json.dumps({"source": {"type": "EmptySource", "count": 2},
                                "modules": {"cut": {"type": name}}, "paths": {"p": ["cut"]}}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([*RECORUN, str(file), "-q"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"module type '{name}' is registered more than once" in done.stderr
    assert "cuts_one:MinimumFilter" in done.stderr
    other = "cuts_two:MinimumFilter" if second else "recorun.modules.filters:MinimumFilter"
    assert other in done.stderr
    listed = subprocess.run([*RECORUN, "--list"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert f"{name} (registered twice!)" in listed.stdout


class FailingLumiEnd(Analyzer):
    """Fails at the end of lumi ``lumi`` (injected fault)."""

    concurrency = Concurrency.SHARED
    lumi = Param(int, 2)

    def end_luminosity_block(self, lumi):
        if (lumi.run, lumi.luminosity_block) == (1, self.lumi):
            raise RuntimeError(f"injected failure at the end of lumi {self.lumi}")

    def analyze(self, event):
        pass


def test_a_failing_end_of_lumi_fails_the_event_waiting_for_the_next_one():
    result = run_workflow(workflow({"bad": {"type": FailingLumiEnd, "lumi": 2}},
                                   {"p": ["bad"]}, source={**TWO_RUNS, "count": 30}))
    report = result.report
    assert result.exit_code == EXIT_MODULE
    failure = report["failed_events"][0]
    assert (failure["index"], failure["event"], failure["method"]) == (
        20, "1:3:21", "end_luminosity_block")
    assert failure["context"] == "at the end of lumi 1:2" and failure["stream"] is None
    # the last lumi's end: no event waits for it, the report's stop_error names it
    result = run_workflow(workflow({"bad": {"type": FailingLumiEnd, "lumi": 3}},
                                   {"p": ["bad"]}, source={**TWO_RUNS, "count": 30}))
    assert result.exit_code == EXIT_MODULE and result.report["failed_events"] == []
    assert "end_luminosity_block() at the end of lumi 1:3" in result.report["stop_error"]
