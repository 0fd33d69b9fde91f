"""Client-side event batching (``batch_events``, ``batch_wait``): the inputs of several events
in one request, against the session's real Triton server over gRPC.

The products must be exactly those of one request per event; the job report counts the
requests, the events per request and the time events waited for their batch; a batch goes out
when full, when the model's max batch would be exceeded, when the job's threads run out of
work, or at ``batch_wait``; an event whose inputs do not fit fails alone; a batch whose request
fails fails each of its events.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from recorun import Analyzer, InputTag, Param
from recorun.framework.pool import ThreadPool, call_when_idle
from recorun.producers.deepcalo import DeepCaloProducer
from recorun.sonic_clients import ClientConfig
from recorun.sonic_clients.batching import EventBatcher
from recorun.sonic_clients.report import sonic_report, sonic_section
from recorun.sonic_clients.triton import TritonClient

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
HLT_SAMPLE = str(ROOT / "data" / "samples" / "hlt_sample.root")


class Keep(Analyzer):
    """Records (event number, a copy of the product) for the test."""

    product = InputTag(doc="the product to keep")
    recorder = Param(Any, None)

    def analyze(self, event):
        self.recorder.record(event.id.event, np.array(event.get(self.product), copy=True))


class DeepCaloWithBadEvent(DeepCaloProducer):
    """Fault injection: on event ``bad_event`` the images have a wrong shape per row."""

    bad_event = Param(int, -1)

    def pack(self, event):
        inputs = super().pack(event)
        if event.id.event == self.bad_event:
            inputs["electron_images"] = np.zeros((2, 4, 56, 10), np.float32)
        return inputs


def batching_job(new_recorder, server_address: str, producer: dict, *, events: int = 40,
                 threads: int = 1, streams: int = 8, on_error: str = "stop"):
    """A job over the HLT sample with one SONIC producer ``electrons`` (kept by an analyzer)."""
    recorder = new_recorder()
    wf = {"process": {"threads": threads, "streams": streams, "max_events": events,
                      "report_every_s": 0, "on_error": on_error},
          "source": {"type": "RootSource", "files": [HLT_SAMPLE]},
          "services": {"sonic": {"type": "ServerRegistry", "fallback": False,
                                 "servers": [{"name": "main", "address": server_address}]}},
          "modules": {"electrons": {"type": "DeepCaloProducer", "mode": "async", **producer},
                      "keep": {"type": Keep, "product": "electrons", "recorder": recorder}},
          "paths": {"p": ["keep"]}, "endpaths": {}}
    return wf, recorder


def details(result, label="electrons") -> dict:
    return result.report["modules"][label]["details"]


@pytest.mark.parametrize("threads,streams", [(1, 8), (2, 8)])
def test_batched_products_are_exactly_the_unbatched_ones(triton_server, run_guarded,
                                                         new_recorder, threads, streams):
    got = {}
    for batch_events in (1, 8):
        wf, recorder = batching_job(new_recorder, triton_server.grpc,
                                    {"batch_events": batch_events}, threads=threads,
                                    streams=streams)
        result = run_guarded(wf, timeout=180)
        assert result.exit_code == 0, result.error
        got[batch_events] = (dict(recorder.where()), details(result))
    (plain, plain_details), (batched, batched_details) = got[1], got[8]
    assert sorted(plain) == sorted(batched) == list(range(1, 41))
    assert sum(len(v) for v in plain.values()) > 40, "too few electrons to compare"
    for number, electrons in plain.items():
        np.testing.assert_array_equal(batched[number], electrons, err_msg=f"event {number}")
    with_electrons = sum(1 for electrons in plain.values() if len(electrons))
    assert plain_details["calls"] == batched_details["calls"] == 40      # calls count events
    assert plain_details["requests"] == with_electrons     # an event without any sends none
    # 8 events in flight: far fewer requests than events
    assert batched_details["requests"] <= with_electrons / 3, batched_details
    assert batched_details["batches"] == batched_details["requests"]
    assert batched_details["batched_events"] == with_electrons


def test_the_report_says_requests_events_per_request_and_the_wait(triton_server, run_guarded,
                                                                   new_recorder):
    wf, recorder = batching_job(new_recorder, triton_server.grpc, {"batch_events": 4},
                                events=24, streams=8)
    result = run_guarded(wf, timeout=180)
    assert result.exit_code == 0, result.error
    d = details(result)
    assert d["batch_events"] == 4
    assert 1 < d["events_per_batch"] <= 4
    assert d["batched_events"] == sum(1 for _, electrons in recorder.where() if len(electrons))
    section = sonic_section(result.report["modules"])
    batching = section["electrons"]["batching"]
    assert batching["requests"] == d["requests"] and batching["requests"] >= 24 / 4
    assert batching["events_per_request"] == pytest.approx(24 / d["requests"])
    assert batching["mean_batch_wait_ms"] >= 0
    text = sonic_report(section)
    assert f"events batched by up to 4: 24 events in {d['requests']} requests" in text


def test_one_stream_sends_at_once_when_the_thread_runs_out_of_work(triton_server, run_guarded,
                                                                   new_recorder):
    """One event in flight: nothing can join its batch, so it goes out when the thread has
    nothing else to do, long before a 30 s batch_wait."""
    wf, recorder = batching_job(new_recorder, triton_server.grpc,
                                {"batch_events": 8, "batch_wait": "30 s"}, events=30, streams=1)
    began = time.perf_counter()
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    assert time.perf_counter() - began < 30, "an event waited for batch_wait"
    assert details(result)["requests"] == details(result)["batches"] <= 30
    assert len(recorder.where()) == 30


def test_a_bad_event_fails_alone_and_a_failed_batch_fails_each_of_its_events(
        triton_server, run_guarded, new_recorder):
    wf, recorder = batching_job(new_recorder, triton_server.grpc, {
        "type": DeepCaloWithBadEvent, "bad_event": 7, "batch_events": 8}, events=16,
        on_error="skip_event")
    result = run_guarded(wf, timeout=180)
    events = result.report["events"]
    assert events["failed"] == 1, events
    assert sorted(number for number, _ in recorder.where()) == [n for n in range(1, 17)
                                                                if n != 7]
    # a deadline no request can meet: every batch fails (no retry, no outage wait), and each
    # of its events with it; events without electrons send nothing and pass
    wf, recorder = batching_job(new_recorder, triton_server.grpc, {
        "batch_events": 8, "tries": 1, "outage_budget": 0, "timeout": "1 us"}, events=16,
        on_error="skip_event")
    result = run_guarded(wf, timeout=180)
    events = result.report["events"]
    passed = [number for number, electrons in recorder.where()]
    assert events["failed"] + len(passed) == 16 and events["failed"] >= 8, events
    assert all(len(electrons) == 0 for _, electrons in recorder.where())
    d = details(result)
    assert d["failures"] == d["batches"] and d["batched_events"] == events["failed"], d


def client_for(server, model="deepcalo") -> TritonClient:
    c = TritonClient(ClientConfig(model, mode="async"), [server.grpc])
    c.begin_job()
    return c


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 4, 56, 11), dtype=np.float32)


def test_outside_the_framework_a_batch_goes_out_at_batch_wait(triton_server):
    client = client_for(triton_server)
    batcher = EventBatcher(client, batch_events=8, batch_wait_s=0.2)
    answers: dict[int, Any] = {}
    finished = threading.Event()

    def done_for(k):
        def done(outputs, error):
            answers[k] = (outputs, error)
            if len(answers) == 3:
                finished.set()
        return done

    try:
        inputs = [images(n, k) for k, n in enumerate((3, 1, 5))]
        for k, x in enumerate(inputs):
            batcher.submit({"electron_images": x}, done_for(k))
        assert not answers, "the batch went out before batch_wait with 3 of 8 events"
        assert finished.wait(30), "no answer after batch_wait"
        expected = [client.infer_blocking({"electron_images": x}, timeout=30) for x in inputs]
    finally:
        batcher.close()
        client.end_job()
    for k in range(3):
        outputs, error = answers[k]
        assert error is None
        np.testing.assert_array_equal(outputs["energy"], expected[k]["energy"])
    stats = batcher.stats()
    assert stats["batches"] == 1 and stats["batched_events"] == 3
    assert stats["mean_batch_wait_ms"] >= 150


def test_a_batch_never_exceeds_the_models_max_batch(triton_server):
    """FACILE's HLT events have 4500 channels each; the session's server takes 16384 rows per
    request: 3 events fit, the fourth starts the next batch, and no request is split."""
    client = client_for(triton_server, "facile")
    max_rows = client.description.max_batch_size
    batcher = EventBatcher(client, batch_events=8, batch_wait_s=10)
    answers, lock = [], threading.Lock()
    rows = 4500
    per_batch = max_rows // rows
    try:
        for k in range(2 * per_batch):
            x = np.random.default_rng(k).random((rows, 15), dtype=np.float32)
            batcher.submit({"hcal_channels": x},
                           lambda o, e, k=k: (lock.acquire(), answers.append((k, o, e)),
                                              lock.release()))
        # the first batch went out when the next event would not fit; the second waits
        batcher.flush()
        deadline = time.time() + 60
        while len(answers) < 2 * per_batch and time.time() < deadline:
            time.sleep(0.05)
    finally:
        batcher.close()
        client.end_job()
    assert len(answers) == 2 * per_batch and all(e is None for _, _, e in answers)
    assert all(o["energy"].shape[0] == rows for _, o, _ in answers)
    timing = client.timing()
    assert timing["requests"] == 2 == batcher.stats()["batches"], timing


def test_ragged_entries_are_batched_as_lists(tmp_path_factory, recorun_server_process):
    script = Path(__file__).with_name("servers") / "ragged_model_server.py"
    server = recorun_server_process.launch(log_dir=tmp_path_factory.mktemp("ragged-batching"),
                                           command=[sys.executable, str(script)])
    try:
        client = TritonClient(ClientConfig("particle_sums", mode="async"), [server.grpc])
        client.begin_job()
        batcher = EventBatcher(client, batch_events=3, batch_wait_s=10)
        rng = np.random.default_rng(3)
        events = [[rng.standard_normal((n, 4)).astype(np.float32) for n in counts]
                  for counts in ((3, 5), (3,), (7, 3, 3))]
        answers = {}
        finished = threading.Event()

        def done_for(k):
            def done(outputs, error):
                answers[k] = (outputs, error)
                if len(answers) == len(events):
                    finished.set()
            return done

        for k, entries in enumerate(events):
            batcher.submit({"particles": entries}, done_for(k))
        assert finished.wait(60), "the full batch did not go out"
        batcher.close()
        client.end_job()
    finally:
        assert server.stop() == 0, server.log()[-4000:]
    for k, entries in enumerate(events):
        outputs, error = answers[k]
        assert error is None
        assert [c.tolist() for c in outputs["counts"]] == [[len(e)] for e in entries]
        for got, entry in zip(outputs["sums"], entries):
            np.testing.assert_allclose(got, entry.sum(axis=0), rtol=1e-5, atol=1e-5)
    assert batcher.stats()["batches"] == 1


def test_the_pool_calls_idle_functions_when_every_thread_is_out_of_work():
    assert call_when_idle(lambda: None) is False            # not on a pool thread
    pool = ThreadPool(2)
    finished = threading.Event()
    seen = []

    def spin(n):
        if n:                                               # keep a thread busy a while
            pool.share(spin, n - 1)
            return
        seen.append("work done")

    def start():
        assert call_when_idle(lambda: (seen.append("idle"), finished.set()))
        pool.share(spin, 200)

    pool.run(start, finished)
    assert seen == ["work done", "idle"]


def test_work_scheduled_by_an_idle_function_runs():
    """An idle function that schedules a continuation (a batch answered at once, its event's
    produce) must see it run, one thread and nothing else queued."""
    pool = ThreadPool(1)
    finished = threading.Event()

    def start():
        call_when_idle(lambda: pool.soon(finished.set))

    runner = threading.Thread(target=pool.run, args=(start, finished), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "the task scheduled by the idle function never ran"


@pytest.mark.parametrize("params,name,says", [
    ({"batch_events": 0}, "batch_events", "at least 1"),
    ({"batch_events": 2, "mode": "sync"}, "batch_events", "async or pseudo-async"),
    ({"batch_events": 2, "batch_wait": "soon"}, "batch_wait", "not a duration"),
    ({"batch_events": 2, "batch_wait": 0}, "batch_wait", "must be positive")])
def test_bad_batching_parameters_are_named(tmp_path, params, name, says):
    wf = {"process": {"name": "TEST"}, "source": {"type": "EmptySource", "count": 1},
          "modules": {"electrons": {"type": "DeepCaloProducer", **params}},
          "paths": {"p": ["electrons"]}}
    (tmp_path / "batching.yaml").write_text(yaml.safe_dump(wf))
    run = subprocess.run([sys.executable, "-m", "recorun.framework.cli", "--check",
                          "batching.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "batching.yaml" in run.stderr and "module 'electrons'" in run.stderr, run.stderr
    assert f"parameter '{name}'" in run.stderr and says in run.stderr, run.stderr
