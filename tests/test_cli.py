"""The ``recorun`` command line: the HLT workflow end to end, its options, its outputs and its
exit codes (0 ok, 3 input data error, 4 module failed on an event, 130 interrupted).

The CLI runs as a subprocess in ``tmp_path`` (the HLT workflow writes
``out/workflow_hlt_accepted.root`` relative to the working directory). Modules that inject faults
or latency are written to ``tmp_path/cli_helpers.py`` (on PYTHONPATH) and named in YAML or with
``--set`` as ``cli_helpers:ClassName``. The HLT workflow's FACILE producer uses the session's
Triton server, given with ``--set services.sonic={type: ServerRegistry, ...}`` (its own fallback
server is tested in test_workflows.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skhep_testdata
import uproot
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "workflow_hlt.yaml"
OUTPUT = Path("out/workflow_hlt_accepted.root")
HZZ = skhep_testdata.data_path("uproot-HZZ.root")
HLT = yaml.safe_load(WORKFLOW.read_text())
LABELS = set(HLT["modules"])
PATHS = set(HLT["paths"])
ENDPATHS = set(HLT["endpaths"])

HELPERS = '''
"""Fault and latency injection for the CLI tests."""
import threading

import numpy as np

from recorun import (Concurrency, ExternalWorkProducer, Filter, InputError, InputTag,
                       Param)
from recorun.modules.external_calibration import calibrate
from recorun.modules.root_source import RootSource


class FailingSource(RootSource):
    """Fault injection: reads its files like RootSource, but the event at index ``fail_at``
    cannot be read (InputError naming the file)."""

    fail_at = Param(int, 4, doc="index of the unreadable event")

    def next_event(self, index):
        if index == self.fail_at:
            raise InputError(f"{self.paths[0]}: cannot read event at entry {index}: "
                             f"corrupt basket in branch 'HcalDigi_q3'")
        return super().next_event(index)


class FailingHTFilter(Filter):
    """HT filter (scalar sum of jet pT) with an injected fault: raises on event number
    ``fail_event``."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with a 'pt' field")
    min_ht = Param(float, 300.0, doc="HT threshold, GeV")
    fail_event = Param(int, doc="event number on which it raises")

    def filter(self, event):
        ht = float(np.sum(event.get(self.jets)["pt"]))
        if event.id.event == self.fail_event:
            raise ValueError(f"injected fault: HT = {ht:.1f} GeV")
        return ht >= self.min_ht


class SlowExternalCalibrator(ExternalWorkProducer):
    """Tower calibration computed in acquire; the external call's round trip is injected
    latency: holder.done() comes from a threading.Timer ``latency_s`` later."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="towers with an 'et' field")
    latency_s = Param(float, 0.05, doc="injected latency of the external call, s")

    def begin_job(self):
        self._lock = threading.Lock()
        self._results = {}

    def acquire(self, event, holder):
        calibrated = calibrate(np.asarray(event.get(self.towers)), 0.5, 1.0)
        key = event.index

        def reply():                       # the external service answers
            with self._lock:
                self._results[key] = calibrated
            holder.done()

        timer = threading.Timer(self.latency_s, reply)   # injected latency
        timer.daemon = True
        timer.start()

    def produce(self, event):
        with self._lock:
            calibrated = self._results.pop(event.index)
        event.put(calibrated)
'''


SERVER: list[str] = []          # --set options that point the HLT at the session's server


@pytest.fixture
def workdir(tmp_path: Path, triton_server) -> Path:
    (tmp_path / "cli_helpers.py").write_text(HELPERS)
    SERVER[:] = ["--set", "services.sonic={type: ServerRegistry, fallback: false, servers: "
                 f"[{{name: session, address: '{triton_server.grpc}'}}]}}"]
    return tmp_path


def _env(cwd: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)}


def recorun(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    args = [*map(str, args), *(SERVER if str(WORKFLOW) in map(str, args) else [])]
    return subprocess.run([sys.executable, "-m", "recorun.framework.cli", *args], cwd=cwd,
                          env=_env(cwd), capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    return run


def report_of(cwd: Path, *args: str, name: str = "r.json") -> dict:
    ok(recorun(cwd, WORKFLOW, *args, "--report-json", name, "-q"))
    return json.loads((cwd / name).read_text())


# -- a full run ---------------------------------------------------------------------------------

def test_hlt_workflow_writes_reports_trace_and_output(workdir):
    run = ok(recorun(workdir, WORKFLOW, "-n", 50, "--report-json", "r.json",
                     "--resources-json", "res.json", "--trace", "t.json"))

    # the job report
    report = json.loads((workdir / "r.json").read_text())
    for key in ("process", "workflow", "events", "failed_events", "stop_reason", "not_processed",
                "exit_code", "paths", "endpaths", "modules", "wall_s", "throughput_hz",
                "threads", "streams"):
        assert key in report, key
    ev = report["events"]
    assert ev["read"] == 50
    assert ev["accepted"] + ev["rejected"] + ev["failed"] == 50
    assert ev["failed"] == 0 and 0 < ev["accepted"] < 50
    assert report["failed_events"] == [] and report["exit_code"] == 0
    assert report["stop_reason"] is None and report["not_processed"] is None
    assert report["process"] == "HLT" and (report["threads"], report["streams"]) == (1, 2)
    assert set(report["paths"]) == PATHS and set(report["endpaths"]) == ENDPATHS
    for name, path in report["paths"].items():
        assert path["visited"] == 50, name
        assert path["passed"] + path["rejected"] + path["failed"] == 50, name
        assert [m["label"] for m in path["modules"]] == HLT["paths"][name]
    assert report["endpaths"]["out"]["modules"][0]["passed"] == ev["accepted"]
    assert set(report["modules"]) == LABELS
    for label, module in report["modules"].items():
        for key in ("type", "kind", "runs", "visited", "passed", "rejected", "errors",
                    "real_ms_mean", "cpu_ms_mean", "real_ms_total", "cpu_ms_total"):
            assert key in module, (label, key)
        assert module["type"] == HLT["modules"][label]["type"]
    towers = report["modules"]["towers"]
    assert towers["external_work"] is True and towers["runs"] == 50
    for key in ("acquire_ms_mean", "external_ms_mean", "produce_ms_mean"):
        assert towers[key] >= 0.0, key
    assert report["wall_s"] > 0 and report["throughput_hz"] > 0

    # resources.json (FastTimerService shape)
    resources = json.loads((workdir / "res.json").read_text())
    assert set(resources) == {"resources", "total", "modules"}
    assert {"time_real", "time_thread"} <= {k for d in resources["resources"] for k in d}
    assert resources["total"]["label"] == "total" and resources["total"]["events"] == 50
    assert {m["label"] for m in resources["modules"]} == LABELS
    for module in resources["modules"]:
        assert set(module) >= {"type", "label", "events", "time_thread", "time_real"}
        assert module["events"] == report["modules"][module["label"]]["runs"]

    # the Chrome / Perfetto trace
    trace = json.loads((workdir / "t.json").read_text())
    assert "traceEvents" in trace
    calls = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for entry in calls:
        assert {"name", "cat", "ts", "dur", "pid", "tid"} <= set(entry), entry
        assert entry["dur"] >= 0
    assert {e["name"] for e in calls if e["cat"] != "event"} == LABELS
    assert {"produce", "acquire", "external", "filter", "analyze", "write"} <= {
        e["cat"] for e in calls}
    assert len([e for e in calls if e["cat"] == "event"]) == 50
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in trace["traceEvents"])

    # the reports on stdout
    assert "TrigReport ---------- Event  Summary" in run.stdout
    assert (f"TrigReport Events total = 50 passed = {ev['accepted']} "
            f"rejected = {ev['rejected']} failed = 0") in run.stdout
    assert "TimeReport ---------- Module Summary" in run.stdout
    for label in LABELS:
        assert re.search(rf"^TimeReport .* {label}$", run.stdout, re.M), label
    assert "50 events read" in run.stderr

    # the accepted events in the output file
    output = workdir / OUTPUT
    assert output.exists() and not output.with_name(output.name + ".partial").exists()
    tree = uproot.open(output)["Events"]
    assert tree.num_entries == ev["accepted"]
    arrays = tree.arrays(["event", "njets", "jets_pt", "met", "nelectrons", "electrons_et",
                          "nhcalRecHits", "hcalRecHits_energy"], library="np")
    assert np.all(np.diff(arrays["event"]) > 0)          # event order
    assert [len(pt) for pt in arrays["jets_pt"]] == arrays["njets"].tolist()
    assert np.all(arrays["met"] >= 0)


# -- --check and --dump-graph ---------------------------------------------------------------------

def test_check_validates_without_running(workdir):
    run = ok(recorun(workdir, WORKFLOW, "--check", "--report-json", "r.json"))
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    assert lines[0].startswith(f"{WORKFLOW}: OK: {len(LABELS)} modules, {len(PATHS)} paths, "
                               f"{len(ENDPATHS)} end paths"), lines[0]
    assert "TrigReport" not in run.stdout and "events read" not in run.stderr
    assert not (workdir / "out").exists()
    assert not (workdir / "r.json").exists()


# products each module of workflow_hlt.yaml reads: (producer, consumer)
PRODUCT_EDGES = {("source", "hcalRecHits"), ("hcalRecHits", "rawTowers"),
                 ("rawTowers", "towers"), ("towers", "rho"), ("towers", "jets"),
                 ("rho", "jets"), ("towers", "ak8Jets"), ("rho", "ak8Jets"), ("towers", "met"),
                 ("source", "electrons"), ("electrons", "electronFilter"),
                 ("jets", "htFilter"), ("ak8Jets", "ak8Filter"), ("met", "metFilter"),
                 ("jets", "summary"), ("met", "summary"), ("jets", "output"),
                 ("ak8Jets", "output"), ("rho", "output"), ("met", "output"),
                 ("electrons", "output"), ("hcalRecHits", "output")}


def test_dump_graph_writes_dot_with_every_module_and_product_edge(workdir):
    run = ok(recorun(workdir, WORKFLOW, "--check", "--dump-graph", "g.dot"))
    assert "g.dot" in run.stderr
    assert f"{len(PRODUCT_EDGES)} product edges" in run.stdout
    dot = (workdir / "g.dot").read_text()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    nodes = set(re.findall(r'^\s*"([^"]+)" \[shape=', dot, re.M))
    assert nodes == LABELS | {"source"}
    for label, spec in HLT["modules"].items():
        assert f'label="{label}\\n{spec["type"]}"' in dot, label
    edges = {}
    for a, b, attrs in re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', dot, re.M):
        if "dashed" not in attrs:                       # dashed: path order, not products
            edges.setdefault((a, b), []).append(re.search(r'label="([^"]+)"', attrs).group(1))
    assert set(edges) == PRODUCT_EDGES
    assert edges[("source", "electrons")] == ["source:Electron_image, source:Electron"]
    assert edges[("towers", "jets")] == ["towers"]
    assert not (workdir / "out").exists()


# -- options that change the job ------------------------------------------------------------------

def test_threads_and_streams_options(workdir):
    report = report_of(workdir, "-n", 20, "-j", 2, "-s", 4)
    assert (report["threads"], report["streams"]) == (2, 4)
    assert report["events"]["read"] == 20
    report = report_of(workdir, "-n", 20, "--set", "process.threads=3")
    assert (report["threads"], report["streams"]) == (3, 2)     # the workflow says streams: 2
    assert report["events"]["read"] == 20
    report = report_of(workdir, "-n", 20, "--set", "process.threads=3",
                       "--set", "process.streams=null")
    assert (report["threads"], report["streams"]) == (3, 3)     # streams default to threads
    report = report_of(workdir, "-n", 20, "--set", "process.streams=3")
    assert (report["threads"], report["streams"]) == (1, 3)


def test_max_events_limits_the_events_read(workdir):
    report = report_of(workdir, "-n", 10)
    ev = report["events"]
    assert ev["read"] == 10 and ev["accepted"] + ev["rejected"] + ev["failed"] == 10
    assert report["modules"]["hcalRecHits"]["runs"] == 10
    assert report["stop_reason"] is None and report["not_processed"] is None
    events = uproot.open(workdir / OUTPUT)["Events"]["event"].array(library="np")
    assert len(events) == ev["accepted"] and set(events) <= set(range(1, 11))


def test_set_threshold_makes_the_ht_path_accept_nothing(workdir):
    base = report_of(workdir, "-n", 30, name="base.json")
    assert base["paths"]["HLT_HT600"]["passed"] > 0
    report = report_of(workdir, "-n", 30, "--set", "modules.htFilter.min_ht=100000")
    ht = report["paths"]["HLT_HT600"]
    assert (ht["visited"], ht["passed"], ht["rejected"]) == (30, 0, 30)
    assert report["modules"]["htFilter"]["passed"] == 0
    # the other paths do not change
    for name in ("HLT_MET400", "HLT_AK8Jet450", "HLT_Ele150", "HLT_MinBias"):
        assert report["paths"][name]["passed"] == base["paths"][name]["passed"]
    assert report["events"]["accepted"] < base["events"]["accepted"]


def test_quiet_prints_no_reports(workdir):
    run = ok(recorun(workdir, WORKFLOW, "-n", 20, "-q", "--report-json", "r.json"))
    assert "TrigReport" not in run.stdout and "TimeReport" not in run.stdout
    assert "TrigReport" not in run.stderr and "TimeReport" not in run.stderr
    assert "events read" not in run.stderr and "events processed" not in run.stderr
    assert "FastJet" not in run.stdout + run.stderr              # its banner: not with -q
    assert json.loads((workdir / "r.json").read_text())["events"]["read"] == 20


# -- exit codes of jobs that stop ------------------------------------------------------------------

def test_input_error_exits_3_and_names_the_file(workdir):
    run = recorun(workdir, WORKFLOW, "-n", 20, "--report-json", "r.json",
                  "--set", "source.type=cli_helpers:FailingSource")
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert re.search(r"recorun: error: .*hlt_sample\.root.*entry 4", run.stderr), run.stderr
    report = json.loads((workdir / "r.json").read_text())
    ev = report["events"]
    assert ev["read"] == 4 and ev["accepted"] + ev["rejected"] + ev["failed"] == 4
    assert report["exit_code"] == 3 and report["stop_reason"] == "input error"
    assert report["not_processed"] == "16 events not read (event indices 4 to 19)"
    assert "16 events not read (event indices 4 to 19)" in run.stderr
    # an incomplete job leaves no file under the final name
    assert not (workdir / OUTPUT).exists()


def test_module_error_exits_4_and_names_event_module_and_method(workdir):
    # one event in flight (-s 1; the workflow has 2): the events read are then exactly those
    # up to the failed one
    run = recorun(workdir, WORKFLOW, "-n", 30, "-s", 1, "--report-json", "r.json",
                  "--set", "modules.htFilter.type=cli_helpers:FailingHTFilter",
                  "--set", "modules.htFilter.fail_event=7")
    assert run.returncode == 4, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    err = run.stderr
    assert "module 'htFilter' (FailingHTFilter) failed in filter() on event 1:1:7" in err, err
    assert "path 'HLT_HT600'" in err and "ValueError: injected fault" in err, err
    report = json.loads((workdir / "r.json").read_text())
    assert report["exit_code"] == 4 and report["stop_reason"] == "module error"
    (failure,) = report["failed_events"]
    assert failure["event"] == "1:1:7" and failure["label"] == "htFilter"
    assert failure["module_type"] == "FailingHTFilter" and failure["method"] == "filter"
    assert failure["path"] == "HLT_HT600"
    ev = report["events"]
    assert ev["failed"] == 1 and ev["read"] == 7
    assert ev["accepted"] + ev["rejected"] + ev["failed"] == ev["read"]
    assert report["not_processed"] == "23 events not read (event indices 7 to 29)"
    assert "not read" in err


INTERRUPT_WORKFLOW = {
    "process": {"name": "SLOW", "threads": 2, "streams": 4, "report_every_s": 0.2},
    "source": {"type": "EmptySource", "count": 100000},
    "modules": {
        "hits": {"type": "ToyCaloHitProducer", "seed": 2021},
        "rawTowers": {"type": "CaloTowerProducer", "hits": "hits"},
        "towers": {"type": "cli_helpers:SlowExternalCalibrator", "towers": "rawTowers",
                   "latency_s": 0.05},
        "jets": {"type": "TowerJetProducer", "towers": "towers"},
        "htFilter": {"type": "HTFilter", "jets": "jets", "min_ht": 300.0},
        "output": {"type": "RootOutput", "products": ["jets"], "file": "out/slow.root",
                   "select_events": ["HLT_HT1200"]},
    },
    "paths": {"HLT_HT1200": ["htFilter"]},
    "endpaths": {"out": ["output"]},
}


def test_sigint_stops_the_job_exits_130_and_still_reports(workdir):
    (workdir / "slow.yaml").write_text(yaml.safe_dump(INTERRUPT_WORKFLOW, sort_keys=False))
    stderr_path = workdir / "stderr.txt"
    with open(stderr_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "recorun.framework.cli", "slow.yaml",
                                 "--report-json", "r.json"], cwd=workdir, env=_env(workdir),
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            # wait until it is processing: a rate line with events done (at most 15 s)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                if re.search(r"^[1-9]\d* events processed", stderr_path.read_text(), re.M):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, stderr_path.read_text()
            proc.send_signal(signal.SIGINT)
            stdout, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr_path.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "SIGINT: finishing the" in err and "events in flight" in err, err
    assert re.search(r"recorun: stopped \(interrupted\): \d+ events not read "
                     r"\(event indices \d+ to 99999\)", err), err
    assert "TrigReport" in stdout
    report = json.loads((workdir / "r.json").read_text())
    ev = report["events"]
    assert 0 < ev["read"] < 100000
    assert ev["read"] == ev["accepted"] + ev["rejected"] + ev["failed"]
    assert ev["failed"] == 0
    assert report["exit_code"] == 130 and report["stop_reason"] == "interrupted"
    assert report["not_processed"] == (f"{100000 - ev['read']} events not read "
                                       f"(event indices {ev['read']} to 99999)")
    assert report["modules"]["towers"]["runs"] == ev["read"]
    # the stopped job's output keeps its temporary name
    assert not (workdir / "out/slow.root").exists()
    assert (workdir / "out/slow.root.partial").exists()


def test_start_at_waits_after_set_up_and_before_the_first_event(workdir):
    began = time.time()
    run = ok(recorun(workdir, WORKFLOW, "-n", 5, "--start-at", f"{began + 6:.3f}",
                     "--report-json", "r.json"))
    assert time.time() - began >= 6
    assert "for the common start time" in run.stderr
    report = json.loads((workdir / "r.json").read_text())
    assert report["events"]["read"] == 5
    assert report["wall_s"] < 5            # the wait is not part of the event loop's time


def hzz_to_root(cwd: Path) -> Path:
    """``cwd/w.yaml``: HZZ's NJet written to ``cwd/hzz.root`` (returned)."""
    out = cwd / "hzz.root"
    (cwd / "w.yaml").write_text(yaml.safe_dump({
        "source": {"type": "RootSource", "files": HZZ},
        "modules": {"out": {"type": "RootOutput", "file": str(out),
                            "products": ["source:NJet"]}},
        "endpaths": {"e": ["out"]}}))
    return out


def piped(cwd: Path, command: str) -> subprocess.CompletedProcess:
    """``recorun COMMAND`` in bash, its exit code that of recorun, not of the pipe's end."""
    return subprocess.run(f"'{sys.executable}' -m recorun.framework.cli {command}; "
                          f"exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, cwd=cwd, env=_env(cwd), timeout=120)


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    """``recorun --list | head -1`` and a job's reports piped into ``head``: no traceback, and
    the job's exit code and output file stand."""
    listing = piped(tmp_path, "--list | head -1")
    assert listing.returncode == 0 and listing.stderr == ""
    assert listing.stdout.startswith("module types") and listing.stdout.count("\n") == 1
    out = hzz_to_root(tmp_path)
    job = piped(tmp_path, "w.yaml | head -1")
    assert job.returncode == 0 and "Traceback" not in job.stderr, job.stderr
    assert job.stdout.startswith("TrigReport")
    assert uproot.open(out)["Events"].num_entries == 2421
    # standard error closed too, by a job that fails: its exit code stands
    (tmp_path / "boom.py").write_text(
        "from recorun import Analyzer, Concurrency\n\n\n"
        "class Boom(Analyzer):\n"
        "    \"\"\"Fault injection: raises on event 3.\"\"\"\n"
        "    concurrency = Concurrency.SHARED\n\n"
        "    def analyze(self, event):\n"
        "        if event.id.event == 3:\n"
        "            raise RuntimeError('injected fault on event 3')\n")
    (tmp_path / "boom.yaml").write_text(yaml.safe_dump({
        "source": {"type": "RootSource", "files": HZZ},
        "modules": {"boom": {"type": "boom:Boom"}}, "paths": {"p": ["boom"]}}))
    for pipe in ("2>&1 | head -1", "2>&1 >/dev/null | head -0", "2>&- >/dev/null"):
        failed = piped(tmp_path, f"boom.yaml {pipe}")
        assert failed.returncode == 4, (pipe, failed.stdout, failed.stderr)


def test_report_files_get_their_folders_or_stop_the_job_before_it_runs(tmp_path):
    out = hzz_to_root(tmp_path)
    made = piped(tmp_path, "w.yaml -q --report-json new/deeper/r.json --trace t/trace.json "
                           "--dump-graph g/graph.dot")
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert "digraph" in (tmp_path / "g/graph.dot").read_text()
    assert json.loads((tmp_path / "new/deeper/r.json").read_text())["events"]["read"] == 2421
    assert (tmp_path / "t/trace.json").is_file()
    out.unlink()
    (tmp_path / "regular.txt").write_text("")
    bad = piped(tmp_path, "w.yaml -q --report-json regular.txt/r.json")
    assert bad.returncode == 2 and "--report-json regular.txt/r.json" in bad.stderr
    assert not out.exists()                                  # stopped before it ran
