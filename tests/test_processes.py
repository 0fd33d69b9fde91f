"""``recorun WORKFLOW.yaml --processes N``: one job on N worker processes of this node.

The workflow is the nominal HLT (CPU only) on the 100-event sample, in chunks of 25 events; the
reference is one single-process run of the same workflow. Faults and latency are injected by
``FaultInjectingAnalyzer`` (the ``fault_injection`` fixture, added to the end path with
``--set``): it raises on one event number, or sleeps per event so that a test can act while
chunks run.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uproot

from recorun.framework.cli import main
from recorun.framework.errors import EXIT_MODULE

from chunked_reference import (CHUNK, REPO, SAMPLE, WORKFLOW,  # noqa: F401 (a fixture)
                               assert_same_counts, assert_same_file, reference)


pytestmark = pytest.mark.subprocess


def test_processes_output_and_report_equal_a_single_process_run(reference, tmp_path, capsys):
    out, report_json = tmp_path / "two.root", tmp_path / "two.json"
    code = main([WORKFLOW, "--processes", "2", *CHUNK, "--set", f"modules.output.file={out}",
                 "--report-json", str(report_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(report_json.read_text())
    assert_same_file(out, reference[0])
    assert_same_counts(report, reference[1])
    chunked = report["chunked"]
    assert chunked["executor"] == "processes" and chunked["chunks"] == chunked["chunks_done"] == 4
    workers = chunked["workers"]
    assert len(workers) == 2 == report["processes"]
    assert sum(w["chunks"] for w in workers) == 4 and sum(w["events"] for w in workers) == 100
    assert len({w["pid"] for w in workers} | {os.getpid()}) == 3      # two processes of their own
    assert all(w["peak_rss_mb"] > 50 and w["cpu_s"] > 0 for w in workers)
    assert 0 < report["cpu_efficiency"] <= 1.2 and report["not_processed"] is None
    assert "processes 2" in captured.out and "TrigReport Events total = 100" in captured.out
    assert captured.err.count(" done: ") == 4 and not Path(f"{out}.parts").exists()


def test_the_process_count_can_come_from_the_workflow(reference, tmp_path):
    out, report_json = tmp_path / "yaml.root", tmp_path / "yaml.json"
    assert main([WORKFLOW, "--set", "process.processes=2", "--set",
                 f"modules.output.file={out}", "--report-json", str(report_json), "-q"]) == 0
    report = json.loads(report_json.read_text())
    assert report["processes"] == 2 and report["chunked"]["chunks"] >= 8   # default: 4 a worker
    assert_same_file(out, reference[0])


@pytest.mark.parametrize("processes", ["1", "2"])
def test_zero_events_leave_an_existing_output_alone(reference, tmp_path, capsys, caplog,
                                                    processes):
    caplog.set_level(logging.INFO)
    out = tmp_path / "kept.root"
    out.write_bytes(reference[0].read_bytes())
    before = (out.stat().st_mtime_ns, out.read_bytes())
    code = main([WORKFLOW, "-n", "0", "--processes", processes, "--set",
                 f"modules.output.file={out}", "--report-json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before
    assert "as they are" in captured.err + caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.root", "r.json"]  # no parts
    assert json.loads((tmp_path / "r.json").read_text())["events"]["read"] == 0


def test_a_link_planted_at_the_merged_file_stops_the_job_before_any_chunk(tmp_path, capsys):
    out, victim = tmp_path / "out.root", tmp_path / "victim"
    victim.write_text("keep me")
    Path(f"{out}.partial").symlink_to(victim)
    code = main([WORKFLOW, "--processes", "2", *CHUNK, "--set", f"modules.output.file={out}",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "symbolic link" in err and "out.root.partial" in err
    assert victim.read_text() == "keep me" and not Path(f"{out}.parts").exists()
    assert " done: " not in err                                   # no chunk ran


def run_in_thread(args) -> tuple[threading.Thread, dict]:
    box: dict = {}
    driver = threading.Thread(target=lambda: box.update(code=main(args)), daemon=True)
    driver.start()
    return driver, box


def test_a_killed_worker_process_loses_no_event(fault_injection, reference, tmp_path, capsys):
    """SIGKILL to a worker in the middle of its chunk: the chunk runs again on another worker,
    a new process takes the dead one's place, the output is a one-process run's."""
    out, report_json = tmp_path / "two.root", tmp_path / "two.json"
    driver, box = run_in_thread([WORKFLOW, "-p", "2", *CHUNK, *fault_injection(sleep_s=0.05), "--set",
                                 f"modules.output.file={out}", "--report-json",
                                 str(report_json)])
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        workers = multiprocessing.active_children()
        if len(workers) == 2 and "done: " not in capsys.readouterr().err:
            time.sleep(1.5)                          # well into their first chunks
            victim = workers[0]
        time.sleep(0.05)
    assert victim is not None, "the worker processes did not start"
    os.kill(victim.pid, signal.SIGKILL)
    driver.join(180)
    assert not driver.is_alive() and box["code"] == 0
    err = capsys.readouterr().err
    assert f"worker process {victim.pid}" in err and "running it again" in err
    report = json.loads(report_json.read_text())
    assert report["chunked"]["chunks_done"] == 4
    assert_same_file(out, reference[0])
    assert report["events"] == reference[1]["events"]
    chunked = report["chunked"]
    assert chunked["replaced_workers"] == 1 and report["processes"] == 2  # a new process took
    workers = chunked["workers"]                                         # the dead one's place
    assert victim.pid not in [w["pid"] for w in workers if not w.get("died")]
    assert sum(w["events"] for w in workers) == 100


def test_a_module_error_stops_the_job_and_resubmit_completes_it(fault_injection, reference, tmp_path,
                                                                 capsys):
    event = int(uproot.open(SAMPLE)["Events"]["event"].array(library="np")[30])   # chunk 1
    record = tmp_path / "faults"
    record.mkdir()
    out, report_json = tmp_path / "two.root", tmp_path / "two.json"
    code = main([WORKFLOW, "-p", "2", *CHUNK, *fault_injection(fail_event=event, record=str(record)),
                 "--set", f"modules.output.file={out}", "--report-json", str(report_json)])
    err = capsys.readouterr().err
    assert code == EXIT_MODULE, err
    assert len(list(record.iterdir())) == 1                  # a module error is not run again
    report = json.loads(report_json.read_text())
    assert report["exit_code"] == EXIT_MODULE and report["stop_reason"] == "module error"
    (failure,) = report["failed_events"]
    assert failure["index"] == 30 and failure["entry"] == 30 and "injected fault" in \
        failure["error"]
    incomplete = {c["chunk"]: c for c in report["chunked"]["incomplete_chunks"]}
    assert incomplete[1]["status"] == "failed" and incomplete[1]["exit_code"] == EXIT_MODULE
    read = report["events"]["read"]
    assert 31 <= read < 100                                   # as far as the job got
    assert f"{100 - read} events were not processed" in report["not_processed"]
    assert "chunk 1" in err and "FAILED" in err and not out.exists()
    resubmission = Path(f"{report_json}.failed.json")
    assert resubmission.is_file() and f"--processes 2 --resubmit {resubmission}" in err

    report2_json = tmp_path / "two2.json"
    code = main([WORKFLOW, "--resubmit", str(resubmission), "--set",
                 "modules.fault.fail_event=-1", "--report-json", str(report2_json), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report2_json.read_text())
    assert report["chunked"]["chunks_done"] == 4 and report["chunked"]["submissions"] == 2
    assert_same_file(out, reference[0])
    assert report["events"] == reference[1]["events"]
    assert not Path(f"{out}.parts").exists()


def test_sigterm_drains_the_workers_and_writes_the_report(fault_injection, tmp_path):
    report_json, out = tmp_path / "term.json", tmp_path / "term.root"
    env = os.environ.copy()                            # with the fault module's folder
    job = subprocess.Popen([str(Path(sys.executable).with_name("recorun")), WORKFLOW, "-p", "2",
                            *CHUNK, *fault_injection(sleep_s=0.1), "--set", f"modules.output.file={out}",
                            "--report-json", str(report_json)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)                                      # workers up, first chunks under way
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr                       # 128 + SIGTERM
    assert "SIGTERM: no new chunks" in stderr
    report = json.loads(report_json.read_text())
    assert report["stop_reason"] == "interrupted" and report["exit_code"] == 143
    assert report["signal"] == "SIGTERM"
    read = report["events"]["read"]
    assert 0 < read < 100 and f"{100 - read} events were not processed" in \
        report["not_processed"]
    assert not out.exists() and "TrigReport" in stdout
    pids = [w["pid"] for w in report["chunked"]["workers"]]
    assert len(pids) == 2
    for pid in pids:                                   # the workers ended their jobs and exited
        assert not Path(f"/proc/{pid}").exists()


def test_chunk_options_need_a_chunked_job(capsys):
    assert main([WORKFLOW, "--chunk-size", "10"]) == 2
    assert "--chunk-size goes with a job cut into chunks" in capsys.readouterr().err
    assert main([WORKFLOW, "-p", "2", "--trace", "t.json"]) == 2
    assert "--trace is not supported in a job cut into chunks" in capsys.readouterr().err


@pytest.mark.server
def test_a_sonic_workflow_shares_one_fallback_server(tmp_path, capsys):
    """The SONIC HLT on two processes: one local fallback server for both."""
    report_json = tmp_path / "sonic.json"
    code = main([str(REPO / "workflows" / "workflow_hlt.yaml"), "-p", "2", "-n", "40",
                 "--set", f"modules.output.file={tmp_path / 'sonic.root'}",
                 "--report-json", str(report_json)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("one local fallback server for the workers of this node") == 1
    report = json.loads(report_json.read_text())
    details = report["modules"]["hcalRecHits"]["details"]
    assert details["calls"] == details["answers"] == 40 and details["failures"] == 0
    assert details["per_server"] == {"fallback": {"requests": 40, "answers": 40, "failed": 0}}
    assert len(report["chunked"]["workers"]) == 2
    # each process read the server's counters around its own requests: on one shared server
    # each also saw the other's, so their sum passes the 40 requests sent (on a server each,
    # it would be exactly 40)
    assert details["server_shared"] and details["server_requests"] > 40
    assert report["sonic"]["hcalRecHits"]["calls"] == 40
