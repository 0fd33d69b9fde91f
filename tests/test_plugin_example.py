"""The README's plugin example: a package of one's own, installed, found by entry point: its
modules (``recorun.modules``) and its hooks (``recorun.plugins``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "jet_tools"


def test_plugin_package_installs_and_runs(tmp_path):
    source = tmp_path / "jet_tools"
    shutil.copytree(EXAMPLE, source)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    assert list(target.glob("recorun_jet_tools-*.dist-info/entry_points.txt"))

    env = {**os.environ, "PYTHONPATH": str(target)}
    report_path = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "recorun.framework.cli", str(source / "dijet.yaml"),
                          "-n", "100", "--report-json", str(report_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(report_path.read_text())
    assert report["modules"]["mjj"]["type"] == "DijetMassProducer"
    assert report["modules"]["twoJets"]["type"] == "JetCountFilter"
    path = report["paths"]["dijet_highmass"]
    assert path["visited"] == 100
    # the mass producer runs only for events the two-jet filter let through (on demand)
    assert report["modules"]["mjj"]["runs"] == path["modules"][0]["passed"]
    assert 0 < path["passed"] < path["modules"][0]["passed"]
    # the package's own hooks: a report section and a line of text after the TimeReport
    assert report["dijet"] == {"path": "dijet_highmass", "events": 100,
                               "selected": path["passed"],
                               "efficiency": path["passed"] / 100}
    assert f"DijetReport {path['passed']} of 100 events selected" in run.stdout
    assert run.stdout.index("TimeReport") < run.stdout.index("DijetReport")


def test_dijet_mass_of_back_to_back_jets(tmp_path):
    """Two massless jets of pT 100 at eta 0, back to back, have mass 200 GeV."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from recorun_jet_tools.dijet import DijetMassProducer
    finally:
        sys.path.remove(str(EXAMPLE))
    from recorun.modules.calo_towers import JET_DTYPE
    from recorun import EmptySource, run_workflow, Producer, InputTag, Analyzer

    class BackToBack(Producer):
        def produce(self, event):
            jets = np.zeros(3, JET_DTYPE)
            jets["pt"] = [100.0, 100.0, 10.0]
            jets["phi"] = [0.0, np.pi, 1.0]
            event.put(jets)

    masses = []

    class Record(Analyzer):
        mass = InputTag("mjj")

        def analyze(self, event):
            masses.append(event.get(self.mass))

    result = run_workflow({"source": {"type": EmptySource, "count": 3},
                           "modules": {"jets": {"type": BackToBack},
                                       "mjj": {"type": DijetMassProducer, "jets": "jets"},
                                       "rec": {"type": Record}},
                           "paths": {"p": ["rec"]}})
    assert result.exit_code == 0
    assert np.allclose(masses, 200.0)
