"""A physicist's file with two runs of three luminosity sections each, through the command line:
HCAL rechits whose gains come from conditions that change at the run boundary, a minimum-bias
path whose prescale changes per lumi from a prescale table, the accepted events written to a
ROOT file that carries its provenance. The same job at one stream and at four streams writes
the same events.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import uproot
import yaml
from recorun.data import hcal

from test_conditions import hcal_conditions

RECORUN = [sys.executable, "-m", "recorun.framework.cli"]
EVENTS_PER_LUMI = 6
CHANNELS = 300


def two_runs_of_three_lumis(path: Path):
    """Runs 1 and 2, lumis 1-3 each, ``EVENTS_PER_LUMI`` events each: HCAL digis of events
    numbered 1..36 (the event number goes on across runs, as in a real file)."""
    n = 6 * EVENTS_PER_LUMI
    digis = hcal.generate(range(1, n + 1), seed=5, channels=CHANNELS)
    block = np.repeat(np.arange(6), EVENTS_PER_LUMI)
    with uproot.recreate(path) as f:
        f.mktree("Events", {"run": np.uint32, "luminosityBlock": np.uint32,
                            "event": np.uint64, "HcalDigi": digis.type.content})
        f["Events"].extend({"run": (1 + block // 3).astype(np.uint32),
                            "luminosityBlock": (1 + block % 3).astype(np.uint32),
                            "event": np.arange(1, n + 1, dtype=np.uint64), "HcalDigi": digis})
    return digis


PRESCALES = {
    "columns": ["loose", "tight"],
    "default_column": "loose",
    "prescales": {"MinBias": [2, 3], "All": [1, 1]},
    "lumis": [{"run": 1, "lumi": 2, "column": "tight"},
              {"run": 2, "lumi": 1, "column": "loose"},
              {"run": 2, "lumi": 3, "column": "tight"}],
}
#: (run, lumi) -> the MinBias prescale in force: loose 2, tight 3
MINBIAS_PRESCALE = {(1, 1): 2, (1, 2): 3, (1, 3): 3, (2, 1): 2, (2, 2): 2, (2, 3): 3}


def job(tmp_path: Path, streams: int) -> tuple[dict, Path]:
    conditions = hcal_conditions(tmp_path, scale_run_2=1.1)
    (tmp_path / "prescales.yaml").write_text(yaml.safe_dump(PRESCALES))
    out = tmp_path / f"accepted_{streams}.root"
    workflow = {
        "process": {"name": "LUMIS", "threads": streams, "streams": streams},
        "source": {"type": "RootSource", "files": [str(tmp_path / "digis.root")],
                   "step_size": 5},
        "services": {
            "conditions": {"type": "ConditionsService", "files": [conditions],
                           "derived": {"HcalChannelCalibrations": "HcalChannelCalibrations"}},
            "prescales": {"type": "PrescaleService", "table": str(tmp_path / "prescales.yaml")}},
        "modules": {
            "rechits": {"type": "HcalSimpleReco", "threshold": -1e9,
                        "calibrations": "HcalChannelCalibrations"},
            "minBiasPrescale": {"type": "HLTPrescaler"},
            "allPrescale": {"type": "HLTPrescaler"},
            "output": {"type": "RootOutput", "file": str(out),
                       "select_events": ["MinBias"], "products": ["rechits"]}},
        "paths": {"MinBias": ["minBiasPrescale"], "All": ["allPrescale"]},
        "endpaths": {"out": ["output"]}}
    file = tmp_path / f"w{streams}.yaml"
    file.write_text(yaml.safe_dump(workflow))
    report = tmp_path / f"r{streams}.json"
    done = subprocess.run([*RECORUN, str(file), "-q", "--report-json", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text()), out


@pytest.fixture
def digis(tmp_path):
    return two_runs_of_three_lumis(tmp_path / "digis.root")


def test_prescales_per_lumi_and_gains_per_run_at_one_and_four_streams(tmp_path, digis):
    results = {streams: job(tmp_path, streams) for streams in (1, 4)}
    report, out = results[1]

    # per-lumi counts: MinBias keeps floor(6 / prescale) events of each lumi, All every one
    lumis = report["luminosity_blocks"]
    assert [(x["run"], x["luminosity_block"]) for x in lumis] == list(MINBIAS_PRESCALE)
    for entry in lumis:
        prescale = MINBIAS_PRESCALE[(entry["run"], entry["luminosity_block"])]
        assert entry["events"] == EVENTS_PER_LUMI and entry["failed"] == 0
        assert entry["accepted"] == {"MinBias": EVENTS_PER_LUMI // prescale,
                                     "All": EVENTS_PER_LUMI}
    columns = [(x["run"], x["luminosity_block"], x["column"])
               for x in report["services"]["prescales"]["lumis"]]
    assert columns == [(1, 1, "loose"), (1, 2, "tight"), (1, 3, "tight"),
                       (2, 1, "loose"), (2, 2, "loose"), (2, 3, "tight")]

    # the written events: numbers that are multiples of their lumi's prescale; run 2's
    # energies with 1.1x gains
    with uproot.open(out) as f:
        tree = f["Events"]
        ids = tree.arrays(["run", "luminosityBlock", "event"], library="np")
        energies = tree["rechits_energy"].array(library="np")
    expected = [n for n in range(1, 37)
                if n % MINBIAS_PRESCALE[(1 + (n - 1) // 18, 1 + (n - 1) // 6 % 3)] == 0]
    assert list(ids["event"]) == expected
    for number, run, energy in zip(ids["event"], ids["run"], energies):
        reference = hcal.simple_energy(digis[int(number) - 1]).astype(np.float32)
        if run == 1:
            np.testing.assert_array_equal(energy, reference)
        else:
            np.testing.assert_allclose(energy, 1.1 * reference, rtol=2e-6, atol=1e-6)

    # four streams: the same events and energies, the same per-lumi figures
    report4, out4 = results[4]
    assert report4["luminosity_blocks"] == lumis
    with uproot.open(out4) as f:
        assert list(f["Events"]["event"].array(library="np")) == expected
        np.testing.assert_array_equal(
            np.concatenate(f["Events"]["rechits_energy"].array(library="np")),
            np.concatenate(energies))

    # the file says what made it: the prescale table and conditions files among the services
    shown = subprocess.run([*RECORUN, "provenance", str(out), "--json"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    process = json.loads(shown.stdout)["processes"][-1]
    assert process["process"] == "LUMIS"
    assert process["workflow"]["services"]["prescales"]["table"].endswith("prescales.yaml")
    assert process["inputs"] == [str((tmp_path / "digis.root").resolve())]
