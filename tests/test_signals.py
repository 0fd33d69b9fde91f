"""SIGTERM and SIGINT in every phase of a job, and what recorun refuses to expose or overwrite.

The jobs run as ``recorun`` subprocesses (as a batch system runs them). The servers a job
started are found among its descendants while it runs, and must all be gone when it ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recorun.processes import descendants

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"
RECORUN = str(Path(sys.executable).with_name("recorun"))

pytestmark = pytest.mark.subprocess

SLOW_END = '''
"""Fault injection: an end_job that takes a while (writes a file first, so that a test knows
the job is ending)."""
import time
from pathlib import Path

from recorun import Analyzer, Concurrency, Param


class SlowEnd(Analyzer):
    concurrency = Concurrency.SHARED
    marker = Param(str)

    def analyze(self, event):
        pass

    def end_job(self):
        Path(self.marker).touch()
        time.sleep(3.0)
'''


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([RECORUN, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or os.environ.copy())


def servers_of(job: subprocess.Popen) -> list[int]:
    """The recorun-server processes below ``job`` now."""
    found = []
    for pid in descendants(job.pid):
        try:
            if b"recorun.server.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def assert_gone(pids: list[int], timeout: float = 30.0) -> None:
    left = wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout)
    assert left, f"left running: {[p for p in pids if Path(f'/proc/{p}').exists()]}"


@pytest.mark.server
def test_sigterm_while_the_fallback_server_starts_writes_a_report_and_leaves_no_server(
        tmp_path):
    # without its ONNX cache the server exports FACILE again, which takes seconds: it is
    # still starting a second after it appeared (from the cache it is ready within ~1 s)
    job = start([str(REPO / "workflows" / "workflow_hlt.yaml"), "--report-json", "r.json"],
                tmp_path, {**os.environ, "RECORUN_ONNX_CACHE": "off"})
    servers = wait_for(lambda: servers_of(job), 60)
    assert servers, "no fallback server started"
    time.sleep(1.0)                                    # it is starting, not ready yet
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert "SIGTERM during set-up: abandoning it" in err and "did not start" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 0 and report["signal"] == "SIGTERM"
    assert report["exit_code"] == 143 and "100 events not read" in report["not_processed"]
    assert "Traceback" not in err and "TrigReport" not in out
    assert_gone(servers)
    assert not list((tmp_path / "out").glob("*.root"))


@pytest.mark.server
def test_sigterm_during_end_job_finishes_it_and_leaves_no_server(tmp_path):
    (tmp_path / "slow_end.py").write_text(SLOW_END)
    marker = tmp_path / "ending"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    job = start([str(REPO / "workflows" / "workflow_hlt.yaml"), "-n", "10", "--report-json",
                 "r.json", "--set", f"modules.slow={{type: 'slow_end:SlowEnd', marker: "
                                    f"'{marker}'}}", "--set", "endpaths.out=[output, slow]"],
                tmp_path, env)
    servers = wait_for(lambda: servers_of(job), 60)
    assert wait_for(marker.exists, 120), "the job did not reach end_job"
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert "SIGTERM: ending the job" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 10 and report["signal"] == "SIGTERM"
    assert report["not_processed"] is None                  # every event was processed...
    assert list((tmp_path / "out").glob("*accepted.root"))  # ...so the output is complete
    assert_gone(servers)


@pytest.mark.server
def test_a_second_signal_aborts_at_once_and_still_leaves_no_server(tmp_path):
    """The second SIGINT comes while the job ends (a slow end_job): no report, no server."""
    (tmp_path / "slow_end.py").write_text(SLOW_END)
    marker, log = tmp_path / "ending", tmp_path / "err.txt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with open(log, "w") as err_file:
        job = subprocess.Popen(
            [RECORUN, str(REPO / "workflows" / "workflow_hlt.yaml"), "-n", "10",
             "--report-json", "r.json", "--set",
             f"modules.slow={{type: 'slow_end:SlowEnd', marker: '{marker}'}}",
             "--set", "endpaths.out=[output, slow]"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
    servers = wait_for(lambda: servers_of(job), 60)
    assert servers and wait_for(marker.exists, 120)
    job.send_signal(signal.SIGINT)
    # signals that arrive before Python runs the handler count as one: wait for the first
    assert wait_for(lambda: "ending the job" in log.read_text(), 30)
    job.send_signal(signal.SIGINT)
    began = time.monotonic()
    job.wait(60)
    err = log.read_text()
    assert job.returncode == 130 and time.monotonic() - began < 2.5, err
    assert "SIGINT again: aborting at once" in err and not (tmp_path / "r.json").exists()
    assert_gone(servers)                     # the kernel's parent-death signal stopped them


# -- what a job may not overwrite -----------------------------------------------------------------

def cpu_workflow(tmp_path: Path, outputs: dict) -> Path:
    import yaml

    workflow = {"process": {"report_every_s": 0},
                "source": {"type": "RootSource", "files": [str(SAMPLE)]},
                "modules": {"hits": {"type": "HcalSimpleReco", "digis": "source:HcalDigi"},
                            **{label: {"type": "RootOutput", "products": ["hits"], "file": f}
                               for label, f in outputs.items()}},
                "endpaths": {"out": list(outputs)}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([RECORUN, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_a_symlink_planted_at_the_partial_file_is_refused(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite")
    out = tmp_path / "o.root"
    Path(f"{out}.partial").symlink_to(victim)
    run = run_cli([str(cpu_workflow(tmp_path, {"output": str(out)})), "-n", "2"], tmp_path)
    assert run.returncode == 2, run.stderr
    assert "is a symbolic link" in run.stderr and "o.root.partial" in run.stderr
    assert victim.read_text() == "do not overwrite" and not out.exists()


def test_an_output_onto_an_input_file_or_two_outputs_on_one_file_are_refused(tmp_path):
    copy = tmp_path / "input.root"
    copy.write_bytes(SAMPLE.read_bytes())
    workflow = cpu_workflow(tmp_path, {"output": str(copy)})
    run = run_cli([str(workflow), "--set", f"source.files=['{copy}']"], tmp_path)
    assert run.returncode == 2
    assert "one of the job's input files" in run.stderr and "output" in run.stderr
    assert copy.read_bytes() == SAMPLE.read_bytes()
    shared = str(tmp_path / "same.root")
    run = run_cli([str(cpu_workflow(tmp_path, {"a": shared, "b": shared}))], tmp_path)
    assert run.returncode == 2
    assert "as output module 'a' does" in run.stderr and "module 'b'" in run.stderr
    assert not Path(shared).exists()


def test_a_balancer_address_cannot_smuggle_nginx_directives(tmp_path):
    run = subprocess.run([str(Path(sys.executable).with_name("recorun-balancer")),
                          "--upstream", "127.0.0.1:1", "--address",
                          f"127.0.0.1:1; error_log {tmp_path}/x.log; #", "--print-config"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "is not an IP address or a host name" in run.stderr
    assert run.stdout == "" and not (tmp_path / "x.log").exists()


@pytest.mark.server
def test_recorun_server_names_a_port_in_use(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = subprocess.run([str(Path(sys.executable).with_name("recorun-server")),
                              "--models", "facile", "--grpc-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"port in use on 127.0.0.1: --grpc-port {port}" in run.stderr
    assert "403" not in run.stderr and "READY" not in run.stdout


NEVER_DONE = '''
"""Fault injection: external work that never reports back for event 5 (a lost request)."""
from pathlib import Path

from recorun import Concurrency, ExternalWorkProducer, Param


class LostRequest(ExternalWorkProducer):
    concurrency = Concurrency.SHARED
    marker = Param(str)

    def acquire(self, event, holder):
        if event.id.event == 5:
            Path(self.marker).touch()             # the test's cue: the request is out
            return                                # holder.done() never comes
        holder.done(event.id.event)

    def produce(self, event, number):
        event.put(number)
'''


@pytest.mark.parametrize("processes", [1, 2])
def test_events_that_never_finish_are_abandoned_after_the_drain_timeout(tmp_path, processes):
    """One SIGTERM while an event waits for external work that never ends: after
    process.drain_timeout_s the job ends with a report that names the abandoned event, the
    output is not given its final name, and the exit code is the signal's."""
    (tmp_path / "lostmods.py").write_text(NEVER_DONE)
    marker = tmp_path / "request-out"
    workflow = tmp_path / "w.yaml"
    workflow.write_text(json.dumps({
        "process": {"threads": 2, "streams": 2, "drain_timeout_s": 2},
        "source": {"type": "EmptySource", "count": 1000000},
        "modules": {"lost": {"type": "lostmods:LostRequest", "marker": str(marker)},
                    "output": {"type": "RootOutput", "file": str(tmp_path / "out.root"),
                               "products": ["lost"]}},
        "paths": {"p": ["lost"]}, "endpaths": {"out": ["output"]}}))
    report = tmp_path / "report.json"
    job = start([str(workflow), "--report-json", str(report), "--processes", str(processes)],
                tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), job.communicate(timeout=30)
    time.sleep(0.5)
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - sent < 30
    assert "abandoning them" in err
    data = json.loads(report.read_text())
    assert data["stop_reason"] == "interrupted"
    assert [a["event"] for a in data["abandoned_events"] if a["index"] == 4] == ["1:1:5"]
    assert "abandoned when the drain timed out" in data["not_processed"]
    done = data["events"]["accepted"] + data["events"]["rejected"] + data["events"]["failed"]
    assert done + len(data["abandoned_events"]) == data["events"]["read"]
    assert not (tmp_path / "out.root").exists()        # the job did not complete
