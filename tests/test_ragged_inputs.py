"""Ragged inputs (entries of different shapes) and the server's own time, against a real
Triton server over gRPC.

recorun's three models have fixed shapes, so the ragged cases run against
``tests/servers/ragged_model_server.py``: a real Triton server (nvidia-pytriton) with the test
model ``particle_sums`` (input ``particles`` [-1, 4], outputs ``sums`` [4] and ``counts`` [1],
``max_batch_size`` 4).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from recorun.sonic_clients import ClientConfig, ClientConfigError
from recorun.sonic_clients.server_stats import ModelStatistics, parse_statistics, server_time
from recorun.sonic_clients.triton import TritonClient

pytestmark = pytest.mark.server

SERVER_SCRIPT = Path(__file__).with_name("servers") / "ragged_model_server.py"


@pytest.fixture(scope="module")
def ragged_server(tmp_path_factory, recorun_server_process):
    server = recorun_server_process.launch(log_dir=tmp_path_factory.mktemp("ragged-server"),
                                           command=[sys.executable, str(SERVER_SCRIPT)])
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]


def entries(counts, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 4)).astype(np.float32) for n in counts]


def client(server, mode="async") -> TritonClient:
    c = TritonClient(ClientConfig("particle_sums", mode=mode), [server.grpc])
    c.begin_job()
    return c


@pytest.mark.parametrize("mode", ["async", "sync", "pseudo-async"])
def test_ragged_entries_go_as_one_request_group_per_shape(ragged_server, mode):
    # shapes: 6 entries of 3 particles (max batch 4: 2 requests), 2 of 5, 1 of 7, 1 of 1
    counts = (3, 5, 3, 7, 5, 3, 3, 1, 3, 3)
    particles = entries(counts)
    c = client(ragged_server, mode)
    try:
        out = c.infer_blocking({"particles": particles}, timeout=60)
    finally:
        c.end_job()
    assert len(out["sums"]) == len(out["counts"]) == len(counts)
    for i, (n, x) in enumerate(zip(counts, particles)):
        assert out["counts"][i].tolist() == [n], i
        np.testing.assert_allclose(out["sums"][i], x.sum(axis=0), rtol=1e-5, atol=1e-5)
    timing = c.timing()
    assert timing["calls"] == 1 and timing["rows"] == len(counts)
    assert timing["requests"] == 5 and timing["failures"] == 0
    # the server saw exactly those requests and rows (its own statistics)
    assert timing["server_requests"] == 5 and not timing["server_shared"]
    assert timing["server_compute_ms_per_call"] > 0


def test_entries_of_one_shape_are_batched_like_an_array(ragged_server):
    particles = entries((2, 2, 2))
    c = client(ragged_server, "sync")
    try:
        ragged = c.infer_blocking({"particles": particles})
        stacked = c.infer_blocking({"particles": np.stack(particles)})
    finally:
        c.end_job()
    assert c.timing()["requests"] == 2                      # one request per call
    np.testing.assert_array_equal(np.stack(ragged["sums"]), stacked["sums"])


def test_no_entries_answers_at_once(ragged_server):
    c = client(ragged_server)
    try:
        out = c.infer_blocking({"particles": []}, timeout=5)
    finally:
        c.end_job()
    assert out == {"sums": [], "counts": []}
    assert c.timing()["requests"] == 0


def test_bad_entries_are_configuration_errors(ragged_server):
    c = client(ragged_server)
    try:
        bad = entries((3, 2)) + [np.zeros((2, 3), np.float32)]
        with pytest.raises(ClientConfigError, match=r"'particles'.*\[-1, 4\].*\[entry 2\]"):
            c.infer({"particles": bad}, lambda *_: pytest.fail("done() called"))
        with pytest.raises(ClientConfigError, match=r"float64.*\[entry 0\]"):
            c.infer({"particles": [np.zeros((2, 4))]}, lambda *_: None)
        assert c.timing()["requests"] == 0
    finally:
        c.end_job()


def test_parse_statistics_sums_versions_and_counts_batches_once():
    answer = {"model_stats": [
        {"version": "1", "inference_count": "30", "execution_count": "2",
         "inference_stats": {"success": {"count": "3", "ns": "900"},
                             "queue": {"count": "3", "ns": "300"}},
         # two executions; the three requests merged into them count the compute once
         "batch_stats": [{"batch_size": "20", "compute_input": {"count": "1", "ns": "10"},
                          "compute_infer": {"count": "1", "ns": "100"},
                          "compute_output": {"count": "1", "ns": "5"}},
                         {"batch_size": "10", "compute_infer": {"count": "1", "ns": "50"}}]},
        {"version": "2", "inference_stats": {"success": {}}}]}
    assert parse_statistics(answer) == ModelStatistics(requests=3, rows=30, executions=2,
                                                       queue_ns=300, compute_ns=165)


def test_server_time_shares_a_shared_server_by_rows():
    # the server counted 8 requests and 400 rows; this client sent 2 calls, 4 requests and
    # 100 rows: a quarter of the 8 ms of compute, 2 ms per call; queue 1 ms per request
    delta = ModelStatistics(requests=8, rows=400, executions=5, queue_ns=8_000_000,
                            compute_ns=8_000_000)
    figures = server_time([delta], calls=2, requests=4, rows=100)
    assert figures["server_shared"] is True
    assert figures["server_compute_ms_per_call"] == pytest.approx(1.0)
    assert figures["server_queue_ms_per_call"] == pytest.approx(2.0)
    alone = server_time([delta], calls=4, requests=8, rows=400)
    assert alone["server_shared"] is False
    assert alone["server_compute_ms_per_call"] == pytest.approx(2.0)
