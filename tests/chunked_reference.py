"""What the tests of chunked jobs (``--processes``, ``--executor dask``) compare with: one
single-process run of the nominal HLT workflow on the 100-event sample, and the checks that a
chunked run's merged output and report equal it."""
from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import pytest
import uproot

from recorun.data.layout import read_shapes
from recorun.framework.cli import main

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = str(REPO / "workflows" / "workflow_hlt_nominal.yaml")
SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"
CHUNK = ["--chunk-size", "25"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run: (output file, report)."""
    folder = tmp_path_factory.mktemp("single")
    out, report = folder / "single.root", folder / "single.json"
    assert main([WORKFLOW, "--set", f"modules.output.file={out}", "--report-json", str(report),
                 "-q"]) == 0
    return out, json.loads(report.read_text())


def assert_same_file(merged: Path, single: Path) -> None:
    """Every key, branch, type and value of the two ROOT files, and the layout metadata."""
    with uproot.open(merged) as a, uproot.open(single) as b:
        assert sorted(a.keys(cycle=False)) == sorted(b.keys(cycle=False))
        assert read_shapes(a) == read_shapes(b)
        ta, tb = a["Events"], b["Events"]
        assert ta.num_entries == tb.num_entries > 0
        assert ta.keys() == tb.keys() and ta.typenames() == tb.typenames()
        for name in tb.keys():
            assert ak.array_equal(ta[name].array(), tb[name].array()), name


def assert_same_counts(report: dict, single: dict) -> None:
    """The merged report counts what the single-process run counted."""
    assert report["events"] == single["events"]
    assert report["failed_events"] == single["failed_events"]
    for name in single["paths"]:
        assert report["paths"][name] == single["paths"][name], name
    assert report["endpaths"]["out"]["modules"][0] == single["endpaths"]["out"]["modules"][0]
    for label, module in single["modules"].items():
        for key in ("runs", "visited", "passed", "rejected", "errors", "type", "kind"):
            assert report["modules"][label][key] == module[key], (label, key)
