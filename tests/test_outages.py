"""Servers that go away while a job runs: real recorun-servers killed with SIGKILL (by PID)
and started again on the same ports.

* the only server killed and back within the outage budget: no event fails, the requests wait
  (``outage_waits`` in the report);
* the only server down past the budget: the events fail, each with the reason; with the
  registry's ``fallback: true`` the local fallback server takes over and none fails.

The job is the HLT sample's FACILE rechits through a ServerRegistry, with ``Pace`` on the path:
latency injected per event (0.1 s), so that the job is still running when the server dies.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from recorun import Analyzer, Concurrency, InputTag, Param

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"


class Pace(Analyzer):
    """Injected latency: sleeps ``seconds`` per event (after reading the rechits)."""

    concurrency = Concurrency.SHARED
    hits = InputTag("hcalRecHits")
    seconds = Param(float, 0.1)

    def analyze(self, event):
        event.get(self.hits)
        time.sleep(self.seconds)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(recorun_server_process, ports, log_dir):
    grpc, http, metrics = ports
    return recorun_server_process.launch(
        "--models", "facile", "--grpc-port", str(grpc), "--http-port", str(http),
        "--metrics-port", str(metrics), log_dir=log_dir)


def kill(server) -> None:
    if server.process.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.process.wait(30)
    server.process.stdout.close()


def job(address: str, events: int, budget: str = "30 s", **registry) -> dict:
    return {"process": {"report_every_s": 0, "on_error": "skip_event", "max_events": events},
            "source": {"type": "RootSource", "files": [str(SAMPLE)]},
            "services": {"sonic": {"type": "ServerRegistry",
                                   "servers": [{"name": "only", "address": address}],
                                   **registry}},
            "modules": {"hcalRecHits": {"type": "FacileProducer", "digis": "source:HcalDigi",
                                        "tries": 2, "timeout": "3 s",
                                        "outage_budget": budget},
                        "pace": {"type": Pace}},
            "paths": {"p": ["pace"]}}


def run_with_outage(run_guarded, wf: dict, after_s: float, action):
    """Run ``wf``; ``after_s`` seconds in, ``action()`` (in a thread)."""
    done = threading.Event()
    box = {}

    def disturb():
        if not done.wait(after_s):
            box["disturbed"] = action()
    thread = threading.Thread(target=disturb, daemon=True)
    thread.start()
    try:
        result = run_guarded(wf, timeout=240)
    finally:
        done.set()
        thread.join(120)
    return result, box


def test_a_server_restarted_within_the_outage_budget_loses_no_event(
        recorun_server_process, run_guarded, tmp_path):
    ports = free_ports(3)
    servers = [launch(recorun_server_process, ports, tmp_path)]

    def outage():
        kill(servers[0])
        time.sleep(1.0)                      # down for ~1 s, then ~4 s to start again
        servers.append(launch(recorun_server_process, ports, tmp_path))
        return time.monotonic()
    try:
        result, box = run_with_outage(run_guarded, job(f"127.0.0.1:{ports[0]}", 40), 1.0,
                                      outage)
    finally:
        for server in servers:
            kill(server)
    assert "disturbed" in box, "the server was not killed while the job ran"
    report = result.report
    assert result.exit_code == 0, result.error
    assert report["events"] == {"read": 40, "accepted": 40, "rejected": 0, "failed": 0}, \
        report["failed_events"][:3]
    details = report["modules"]["hcalRecHits"]["details"]
    assert details["outage_waits"] >= 1 and details["outage_wait_s"] > 1.0
    assert details["answers"] == 40 and details["failures"] == 0


def test_a_server_down_past_the_budget_fails_events_with_the_reason(
        recorun_server_process, run_guarded, tmp_path):
    ports = free_ports(3)
    server = launch(recorun_server_process, ports, tmp_path)
    try:
        result, box = run_with_outage(
            run_guarded, job(f"127.0.0.1:{ports[0]}", 30, budget="1.5 s"), 1.0,
            lambda: kill(server))
    finally:
        kill(server)
    assert "disturbed" in box
    report = result.report
    assert result.exit_code == 0                         # on_error: skip_event
    assert report["events"]["failed"] >= 1
    assert report["events"]["read"] == 30 == sum(report["events"][k] for k in
                                                 ("accepted", "rejected", "failed"))
    error = report["failed_events"][0]["error"]
    assert "outage budget" in error and "StatusCode.UNAVAILABLE" in error and "'only'" in error
    details = report["modules"]["hcalRecHits"]["details"]          # the wait is reported
    assert details["outage_waits"] >= 1 and details["outage_wait_s"] >= 1.4


def test_with_fallback_true_the_local_server_takes_over_past_the_budget(
        recorun_server_process, run_guarded, tmp_path):
    ports = free_ports(3)
    server = launch(recorun_server_process, ports, tmp_path)
    try:
        result, box = run_with_outage(
            run_guarded, job(f"127.0.0.1:{ports[0]}", 30, budget="1 s", fallback=True), 1.0,
            lambda: kill(server))
    finally:
        kill(server)
    assert "disturbed" in box
    report = result.report
    assert result.exit_code == 0, result.error
    assert report["events"]["failed"] == 0 and report["events"]["read"] == 30
    details = report["modules"]["hcalRecHits"]["details"]
    assert details["fallback_takeovers"] == 1
    assert details["per_server"]["fallback"]["answers"] >= 1
    assert details["per_server"]["only"]["answers"] >= 1
