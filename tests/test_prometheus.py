"""The Prometheus exporter (``framework/prometheus.py``, service ``PrometheusExporter``).

A job with a FACILE SONIC producer (against the session's ``triton_server``) and CPU modules
runs with the exporter; a test analyzer scrapes ``/metrics`` twice while the job runs. The
scrapes, parsed with prometheus_client's own text parser, must show the events growing, every
module's times, the SONIC client's requests; the final values must match the job report; the
port must be closed and the server thread gone after the job. Also: the exporter changes
neither the exit code nor the report, a port already taken is a configuration error, and
``recorun --metrics-port 0`` logs the URL it serves on 127.0.0.1 and serves it while running.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recorun import Analyzer, Concurrency, ConfigError, Param

ROOT = Path(__file__).resolve().parents[1]
HLT_SAMPLE = str(ROOT / "data" / "samples" / "hlt_sample.root")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, ((label, value), ...)): value}`` of a scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


class Scrape(Analyzer):
    """Scrapes the exporter (service ``prometheus``) at the given event numbers."""

    concurrency = Concurrency.SERIAL
    at = Param(Any, ())
    recorder = Param(Any, None)

    def analyze(self, event):
        if event.id.event in self.at:
            exporter = self.services["prometheus"]
            self.recorder.record(event.id.event, exporter.server_address, scrape(exporter.url))


LABELS = ("rechits", "towers", "jets", "htFilter", "scrape")


def sonic_workflow(server, recorder, events: int) -> dict:
    return {"process": {"threads": 2, "streams": 2, "max_events": events,
                        "report_every_s": 0},
            "source": {"type": "RootSource", "files": [HLT_SAMPLE]},
            "modules": {
                "rechits": {"type": "FacileProducer", "threshold": 0.0, "mode": "async"},
                "towers": {"type": "CaloTowerProducer", "hits": "rechits", "geometry": "hcal"},
                "jets": {"type": "TowerJetProducer", "towers": "towers"},
                "htFilter": {"type": "HTFilter", "jets": "jets", "min_ht": 300.0},
                "scrape": {"type": Scrape, "at": [6, 16], "recorder": recorder}},
            "paths": {"HLT_HT300": ["scrape", "htFilter"]},
            "services": {"sonic": {"type": "ServerRegistry", "fallback": False,
                                   "servers": [{"name": "main", "address": server.grpc}]},
                         "prometheus": {"type": "PrometheusExporter", "port": 0}}}


def test_scrapes_while_running_match_the_report_and_the_port_closes(triton_server, new_recorder, run_guarded):
    recorder = new_recorder()
    result = run_guarded(sonic_workflow(triton_server, recorder, 20), timeout=120)
    assert result.exit_code == 0, result.error
    report = result.report
    exporter = result.scheduler.built.services["prometheus"]
    host, port = exporter.server_address
    assert host == "127.0.0.1" and port > 0            # the default: loopback, a free port
    (first_at, first_address, first), (second_at, _, second) = recorder.where()
    assert (first_at, second_at) == (6, 16) and first_address == (host, port)

    # while it ran: events grow, every module has its times, the client its requests
    early, late = parse(first), parse(second)
    processed = [value(s, "recorun_events_processed_total") for s in (early, late)]
    assert 0 <= processed[0] < processed[1] < 20, processed
    assert value(late, "recorun_events_read_total") >= processed[1]
    for label in LABELS:
        assert value(late, "recorun_module_seconds_total", module=label) > 0, label
        assert value(late, "recorun_module_cpu_seconds_total", module=label) > 0, label
        assert value(late, "recorun_module_calls_total", module=label) >= 1, label
    sonic = {"module": "rechits", "model": "facile"}
    assert value(late, "recorun_sonic_requests_total", **sonic) >= 1
    assert value(late, "recorun_sonic_bytes_sent_total", **sonic) >= 4500 * 15 * 4
    assert value(late, "recorun_sonic_requests_in_flight", **sonic) >= 0
    assert value(late, "recorun_sonic_retries_total", **sonic) == 0
    assert value(late, "recorun_sonic_failures_total", **sonic) == 0

    # at the end: the same figures as the job report
    final = parse(exporter.text())
    events = report["events"]
    assert value(final, "recorun_events_processed_total") == events["read"] == 20
    assert value(final, "recorun_events_accepted_total") == events["accepted"]
    assert value(final, "recorun_events_rejected_total") == events["rejected"]
    assert value(final, "recorun_events_failed_total") == events["failed"] == 0
    assert value(final, "recorun_events_in_flight") == 0
    for label in LABELS:
        module = report["modules"][label]
        assert value(final, "recorun_module_calls_total", module=label) == module["runs"]
        assert value(final, "recorun_module_seconds_total", module=label) == pytest.approx(
            module["real_ms_total"] / 1e3)
        assert value(final, "recorun_module_cpu_seconds_total", module=label) == \
            pytest.approx(module["cpu_ms_total"] / 1e3)
    details = report["modules"]["rechits"]["details"]
    for name in ("requests", "bytes_sent", "retries", "failures", "failovers", "calls"):
        assert value(final, f"recorun_sonic_{name}_total", **sonic) == details[name], name
        assert value(late, f"recorun_sonic_{name}_total", **sonic) <= details[name], name
    assert value(final, "recorun_sonic_requests_in_flight", **sonic) == 0

    # no port, no thread left
    assert exporter.server is None and not exporter.thread.is_alive()
    assert exporter.thread not in threading.enumerate()
    assert port_closed(port)


CPU_MODULES = {"hits": {"type": "ToyCaloHitProducer", "seed": 7},
               "towers": {"type": "CaloTowerProducer", "hits": "hits"},
               "jets": {"type": "TowerJetProducer", "towers": "towers"},
               "htFilter": {"type": "HTFilter", "jets": "jets", "min_ht": 100.0}}


def _stable(report: dict) -> dict:
    """The report without its times."""
    return {"exit_code": report["exit_code"], "events": report["events"],
            "paths": report["paths"], "endpaths": report["endpaths"],
            "modules": {label: {k: v for k, v in m.items() if "_ms" not in k}
                        for label, m in report["modules"].items()}}


def test_exporter_changes_neither_exit_code_nor_report(run_guarded, workflow):
    plain = workflow(CPU_MODULES, {"HLT": ["htFilter"]}, events=30, threads=2)
    exported = {**plain, "services": {"prometheus": {"type": "PrometheusExporter"}}}
    without, with_ = run_guarded(plain), run_guarded(exported)
    assert without.exit_code == with_.exit_code == 0
    assert set(with_.report) == set(without.report)
    assert _stable(with_.report) == _stable(without.report)
    assert "prometheus" not in without.scheduler.built.services       # off by default
    assert port_closed(with_.scheduler.built.services["prometheus"].server_address[1])


def test_a_port_already_taken_is_a_configuration_error(run_guarded, workflow):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        wf = workflow(CPU_MODULES, {"HLT": ["htFilter"]}, events=5)
        wf["services"] = {"prometheus": {"type": "PrometheusExporter", "port": port}}
        result = run_guarded(wf)
    assert result.exit_code == 2 and isinstance(result.error, ConfigError)
    assert f"port {port}" in str(result.error) and "127.0.0.1" in str(result.error)
    assert result.report["events"]["read"] == 0


HELPERS = '''
import time

from recorun import Analyzer, InputTag, Param


class Sleepy(Analyzer):
    """Reads the towers, then sleeps: a job slow enough to scrape."""

    towers = InputTag("towers")
    delay_s = Param(float, 0.03)

    def analyze(self, event):
        event.get(self.towers)
        time.sleep(self.delay_s)
'''

SLOW_YAML = """
process: {threads: 1, streams: 1, report_every_s: 0}
source: {type: EmptySource, count: 100}
modules:
  hits: {type: ToyCaloHitProducer, seed: 3}
  towers: {type: CaloTowerProducer, hits: hits}
  sleepy: {type: "helpers_prometheus:Sleepy", towers: towers}
paths: {p: [sleepy]}
"""


def test_cli_metrics_port_serves_while_running(tmp_path):
    (tmp_path / "helpers_prometheus.py").write_text(HELPERS)
    (tmp_path / "slow.yaml").write_text(SLOW_YAML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "recorun.framework.cli", "slow.yaml",
                                 "--metrics-port", "0"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            url, seen, deadline = None, [], time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if url is None:
                    found = re.search(r"Prometheus metrics at (http://127\.0\.0\.1:(\d+)"
                                      r"/metrics)", stderr_path.read_text())
                    url = found and found.group(1)
                else:
                    try:
                        samples = parse(scrape(url))
                    except OSError:             # the job ended in between
                        break
                    seen.append(value(samples, "recorun_events_processed_total"))
                    if seen[-1]:                # the job has started: modules are there
                        assert ("recorun_module_seconds_total",
                                (("module", "sleepy"),)) in samples
                time.sleep(0.2)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = stderr_path.read_text()
    assert code == 0 and "Traceback" not in log, log
    assert url is not None, log
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] > seen[0], seen
    assert 0 < seen[-1] <= 100
    assert "100 events read" in log
    assert port_closed(int(re.search(r":(\d+)/metrics", url).group(1)))
