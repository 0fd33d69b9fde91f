"""``recorun --executor dask``: a workflow on a Dask cluster (farm/, docs/FARM.md).

One ``LocalCluster`` of 2 worker processes (1 thread each, with nannies) serves the module; the
farm runs call ``recorun.framework.cli.main`` in this process with ``--scheduler-address``. The
workflow is the nominal HLT (CPU only) on the 100-event sample, cut into chunks of 25 entries;
the reference is one single-process run of the same workflow. Faults and latency are injected
by ``FaultInjectingAnalyzer`` (the ``fault_injection`` fixture of conftest.py, on the driver's
and the workers' path), added to the workflow's end path with ``--set``.
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from recorun.data.layout import read_shapes
from recorun import Concurrency, Producer, run_workflow
from recorun.farm.executor import farm_warnings
from recorun.framework.chunked import ChunkFailed, plan_chunks
from recorun.framework.source import split_entries
from recorun.framework.build import build_workflow
from recorun.framework.cli import main
from recorun.framework.config import load_workflow
from recorun.framework.errors import EXIT_MODULE

from chunked_reference import (CHUNK, REPO, SAMPLE, WORKFLOW,  # noqa: F401 (a fixture)
                               assert_same_counts, assert_same_file, reference)


pytestmark = pytest.mark.dask

@pytest.fixture(scope="module")
def cluster(fault_injection):
    """(LocalCluster, Client); the fault module importable on the workers (PYTHONPATH)."""
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def on_farm(cluster, *args: str) -> list[str]:
    return [WORKFLOW, "--executor", "dask", "--scheduler-address",
            cluster[0].scheduler_address, *args]


# -- the plan ----------------------------------------------------------------------------------

def test_split_entries_cuts_on_cluster_edges_near_the_target():
    assert split_entries(0, 100, [0, 100], 25) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert split_entries(0, 100, [0, 30, 60, 90, 100], 25) == [(0, 30), (30, 60),
                                                                     (60, 90), (90, 100)]
    assert split_entries(10, 40, [0, 100], 1000) == [(10, 40)]
    assert split_entries(5, 5, [0, 100], 10) == []
    pieces = split_entries(0, 1000, range(0, 1001, 7), 100)
    assert pieces[0][0] == 0 and pieces[-1][1] == 1000
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(pieces))
    assert all(p[1] % 7 == 0 for p in pieces[:-1]) and all(50 <= b - a <= 150 for a, b in pieces)


def test_plan_respects_skip_and_max_events_and_failures_travel():
    config = load_workflow(WORKFLOW, ["source.skip=10", "process.max_events=60"])
    chunks = plan_chunks(build_workflow(config), 25)
    assert [(c.first_entry, c.stop_entry, c.first_index) for c in chunks] == [(10, 35, 0),
                                                                           (35, 70, 25)]
    error = pickle.loads(pickle.dumps(ChunkFailed("boom", 3, "host:1")))
    assert (str(error), error.exit_code, error.worker) == ("boom", 3, "host:1")


def test_sonic_producer_without_servers_is_warned_about():
    hlt = REPO / "workflows" / "workflow_hlt.yaml"
    warnings = farm_warnings(build_workflow(load_workflow(hlt)))
    assert any("fallback" in w and "hcalRecHits" in w for w in warnings), warnings
    registry = ("services.sonic={type: ServerRegistry, servers: [{name: gpu1, "
                "address: 'gpu1.example:8001'}]}")
    served = build_workflow(load_workflow(hlt, [registry]))
    assert not [w for w in farm_warnings(served) if "fallback" in w]


def test_farm_options_need_the_dask_executor(capsys):
    assert main([WORKFLOW, "--local-workers", "2"]) == 2
    assert "--local-workers goes with --executor dask" in capsys.readouterr().err
    assert main([WORKFLOW, "--executor", "dask", "--processes", "2"]) == 2
    assert "the dask executor has workers of its own" in capsys.readouterr().err


class Layouts(Producer):
    """Every layout RootOutput writes, from the event number: a number, a 1-D array, an
    (n, 2, 2) array (flattened, with its shape in ``recorun_shapes``) and records."""

    concurrency = Concurrency.SHARED
    produces = ("x", "pt", "p4", "jets")

    def produce(self, event):
        number = event.id.event
        n = number % 3
        jets = np.zeros(n, dtype=[("pt", "f4"), ("eta", "f4")])
        jets["pt"], jets["eta"] = number, -number
        event.put(float(number), "x")
        event.put(np.arange(n, dtype=np.float64) + number, "pt")
        event.put(np.full((n, 2, 2), number, np.float32), "p4")
        event.put(jets, "jets")


def write_part(path: Path, first: int, count: int, fmt: str) -> str:
    result = run_workflow({
        "process": {"report_every_s": 0},
        "source": {"type": "EmptySource", "count": count, "first_event": first},
        "modules": {"layouts": {"type": Layouts},
                    "output": {"type": "RootOutput", "file": str(path), "format": fmt,
                               "products": ["layouts:x", "layouts:pt", "layouts:p4",
                                            "layouts:jets"]}},
        "endpaths": {"out": ["output"]}})
    assert result.exit_code == 0 and path.is_file()
    return str(path)


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_root_output_merge_reads_like_one_job(tmp_path, fmt):
    from recorun.modules.root_output import RootOutput
    single = write_part(tmp_path / "single.root", 1, 10, fmt)
    parts = [write_part(tmp_path / name, first, count, fmt)     # the middle one: no event
             for name, first, count in (("a.root", 1, 4), ("b.root", 5, 0), ("c.root", 5, 6))]
    merged = tmp_path / "merged.root"
    RootOutput.merge(parts, str(merged), format=fmt)
    assert not Path(f"{merged}.partial").exists()
    with uproot.open(merged) as a, uproot.open(single) as b:
        assert sorted(a.keys(cycle=False)) == sorted(b.keys(cycle=False))
        assert read_shapes(a) == read_shapes(b) == ({"layouts_p4": (2, 2)} if fmt == "ttree"
                                                    else {})
        ta, tb = a["Events"], b["Events"]
        assert ta.num_entries == tb.num_entries == 10
        assert ta.keys() == tb.keys()
        merged_arrays, single_arrays = ta.arrays(), tb.arrays()
        assert str(merged_arrays.type) == str(single_arrays.type)
        assert ak.array_equal(merged_arrays, single_arrays)
        if fmt == "ttree":
            assert ta.typenames() == tb.typenames()


# -- on the cluster ----------------------------------------------------------------------------

def test_farm_output_and_report_equal_a_single_process_run(cluster, reference, tmp_path,
                                                           capsys):
    out, report_json = tmp_path / "farm.root", tmp_path / "farm.json"
    code = main(on_farm(cluster, *CHUNK, "--set", f"modules.output.file={out}",
                        "--report-json", str(report_json)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(report_json.read_text())
    chunked = report["chunked"]
    assert chunked["executor"] == "dask" and chunked["chunks"] == chunked["chunks_done"] == 4
    assert len(chunked["workers"]) == 2 and sum(w["chunks"] for w in chunked["workers"]) == 4
    assert report["exit_code"] == 0 and report["not_processed"] is None
    assert_same_file(out, reference[0])
    assert_same_counts(report, reference[1])
    assert report["endpaths"] == reference[1]["endpaths"]
    assert report["wall_s"] > 0 and report["throughput_hz"] > 0
    assert "TrigReport Events total = 100" in captured.out and "TimeReport" in captured.out
    assert captured.err.count(" done: ") == 4 and "4 of 4 chunks, 100 events" in captured.err
    assert not Path(f"{out}.parts").exists()


def test_a_killed_worker_loses_no_event(cluster, reference, tmp_path, fault_injection):
    _, client = cluster
    out, report_json = tmp_path / "farm.root", tmp_path / "farm.json"
    args = on_farm(cluster, *CHUNK, *fault_injection(sleep_s=0.03), "--set",
                   f"modules.output.file={out}", "--report-json", str(report_json), "-q")
    box: dict = {}
    driver = threading.Thread(target=lambda: box.update(code=main(args)), daemon=True)
    driver.start()
    victim, deadline = None, time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and driver.is_alive():
        busy = [w for w, keys in client.processing().items()
                if any("recorun-chunk" in str(k) for k in keys)]
        if busy:
            time.sleep(0.5)                    # well into the chunk's job
            if busy[0] in [w for w, keys in client.processing().items() if keys]:
                victim = busy[0]
        else:
            time.sleep(0.05)
    assert victim is not None, "no chunk ran on a worker"
    pid = client.run(os.getpid, workers=[victim])[victim]
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    driver.join(120)
    assert not driver.is_alive() and box["code"] == 0
    report = json.loads(report_json.read_text())
    assert report["chunked"]["chunks_done"] == 4 and report["events"]["read"] == 100
    assert_same_file(out, reference[0])
    assert_same_counts(report, reference[1])
    deadline = time.monotonic() + 60
    while len(client.nthreads()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)                        # the nanny starts the killed worker again
    assert len(client.nthreads()) == 2 and victim not in client.nthreads()


def test_a_failing_chunk_stops_the_farm_and_resubmit_completes_the_run(
        cluster, reference, tmp_path, capsys, fault_injection):
    event = int(uproot.open(SAMPLE)["Events"]["event"].array(library="np")[30])   # chunk 1
    record = tmp_path / "faults"
    record.mkdir()
    out, report_json = tmp_path / "farm.root", tmp_path / "farm.json"
    # one event in flight per worker (-s 1; the workflow has 2): the failed chunk's events
    # not processed are then exactly those after the failed one
    code = main(on_farm(cluster, *CHUNK, *fault_injection(fail_event=event, record=str(record)),
                        "-s", "1", "--set", f"modules.output.file={out}", "--report-json",
                        str(report_json)))
    err = capsys.readouterr().err
    assert code == EXIT_MODULE, err
    assert len(list(record.iterdir())) == 1                 # a module error is not run again
    report = json.loads(report_json.read_text())
    incomplete = {c["chunk"]: c for c in report["chunked"]["incomplete_chunks"]}
    assert incomplete[1]["entries"] == [25, 50] and incomplete[1]["status"] == "failed"
    assert "injected fault" in incomplete[1]["error"]
    assert incomplete[1]["exit_code"] == EXIT_MODULE and report["exit_code"] == EXIT_MODULE
    (failure,) = report["failed_events"]
    assert failure["index"] == failure["entry"] == 30
    assert "hlt_sample.root entries 31 to 49" in report["not_processed"]
    assert "chunk 1" in err and "FAILED" in err and not out.exists()
    resubmission = Path(f"{report_json}.failed.json")
    assert resubmission.is_file() and "--executor dask --resubmit" in err

    report2_json = tmp_path / "farm2.json"
    code = main(on_farm(cluster, "--resubmit", str(resubmission), "--set",
                        "modules.fault.fail_event=-1", "--report-json", str(report2_json),
                        "-q"))
    assert code == 0, capsys.readouterr().err
    report = json.loads(report2_json.read_text())
    assert report["chunked"]["chunks_done"] == 4 and report["chunked"]["submissions"] == 2
    assert_same_file(out, reference[0])
    assert_same_counts(report, reference[1])
    assert not Path(f"{out}.parts").exists()
