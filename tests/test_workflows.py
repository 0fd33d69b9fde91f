"""The workflows of ``workflows/``: each passes ``recorun --check`` and runs end to end.

* The two HLT emulations (FACILE as a service, and the nominal HcalMahiReco) differ only in
  the HCAL reconstruction; run over the whole HLT sample they make their products, accept a
  sensible fraction on every path, write exactly the accepted events, and take the same
  trigger decision on most events. ``workflow_hlt.yaml`` as shipped (no ServerRegistry: the
  fallback server) also runs from the command line, as README's main command does.
* The offline workflows (FACILE, DeepCalo, ResNet-50) and their in-process variants differ
  only in the producer's client; run on a few events they write the same output file (allclose)
  and their products make physical sense.

SONIC workflows are pointed at the session's ``triton_server`` (a ServerRegistry block with
``fallback: false``, as tests/test_producers.py does) so that no test starts a server of its
own, except the command-line run of the main command; in-process variants run in-process.
Outputs go to ``tmp_path``.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

from recorun import Analyzer, Concurrency, InputTag, Param
from recorun.framework.config import expand_workflow_dir

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
ALL_WORKFLOWS = sorted(WORKFLOWS.glob("workflow_*.yaml"))   # (not the prescale table)
HLT_PATHS = ("HLT_HT600", "HLT_MET400", "HLT_AK8Jet450", "HLT_Ele150", "HLT_MinBias")
OFFLINE = ("facile", "deepcalo", "resnet50")
RTOL, ATOL = 1e-4, 1e-4


class TriggerLog(Analyzer):
    """Records each event's TriggerResults (on an end path)."""

    concurrency = Concurrency.SHARED
    trigger = InputTag("TriggerResults")
    recorder = Param(Any, None)

    def analyze(self, event):
        self.recorder.record(event.id.event, dict(event.get(self.trigger).paths))


def raw_yaml(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / f"{name}.yaml").read_text())


def prepared(name: str, out: Path, server=None, events: int | None = None) -> dict:
    """The workflow ``name`` as a dict ready to run: its output in ``out``, no rate lines,
    ``events`` events at most, and its SONIC producers pointed at ``server`` if given."""
    raw = expand_workflow_dir(raw_yaml(name), str(WORKFLOWS))
    raw["process"].update(report_every_s=0, max_events=events)
    raw["modules"]["output"]["file"] = str(out / f"{name}.root")
    if server is not None:
        raw.setdefault("services", {})["sonic"] = {
            "type": "ServerRegistry", "fallback": False,
            "servers": [{"name": "main", "address": server.grpc}]}
    return raw


@pytest.fixture
def run(run_guarded):
    """``run(raw, timeout=240)``: the workflow run, checked to end well."""
    def run_ok(raw: dict, timeout: float = 240.0):
        result = run_guarded(raw, timeout=timeout)
        assert result.exit_code == 0, result.error
        assert result.report["events"]["failed"] == 0
        return result
    return run_ok


def read_output(raw: dict) -> dict[str, ak.Array]:
    """Every branch of the workflow's output file."""
    with uproot.open(raw["modules"]["output"]["file"]) as f:
        tree = f["Events"]
        names = tree.keys()
        return {name: tree[name].array(library="ak") for name in names}


def without(raw: dict, *dotted: str) -> dict:
    """A copy of ``raw`` without the given dotted keys."""
    raw = copy.deepcopy(raw)
    for key in dotted:
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[last]
    return raw


# -- every workflow ---------------------------------------------------------------------------

def test_the_workflows_are_all_there():
    names = {p.stem for p in ALL_WORKFLOWS}
    expected = {"workflow_hlt", "workflow_hlt_nominal"} | {
        f"workflow_{n}{v}" for n in OFFLINE for v in ("", "_inprocess")}
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", ALL_WORKFLOWS, ids=lambda p: p.stem)
def test_check_passes(path, tmp_path):
    run_ = subprocess.run([sys.executable, "-m", "recorun.framework.cli", str(path), "--check"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.startswith(f"{path}: OK: "), run_.stdout
    assert not (tmp_path / "out").exists()          # --check runs nothing


# -- the HLT: FACILE as a service against the nominal reconstruction ---------------------------

def test_hlt_workflows_differ_only_in_the_hcal_reconstruction():
    facile, nominal = raw_yaml("workflow_hlt"), raw_yaml("workflow_hlt_nominal")
    assert facile["modules"]["hcalRecHits"]["type"] == "FacileProducer"
    assert nominal["modules"]["hcalRecHits"]["type"] == "HcalMahiReco"
    # no ServerRegistry: README's main command runs FACILE on the local fallback server
    assert not any(s["type"] == "ServerRegistry" for s in facile.get("services", {}).values())
    assert facile["modules"]["hcalRecHits"]["threshold"] == \
        nominal["modules"]["hcalRecHits"]["threshold"]
    strip = ("modules.hcalRecHits", "modules.output.file")
    assert without(facile, *strip) == without(nominal, *strip)
    assert facile["modules"]["output"]["file"] != nominal["modules"]["output"]["file"]
    assert tuple(facile["paths"]) == HLT_PATHS


def _run_hlt(run, log, name: str, out: Path, server=None):
    raw = prepared(name, out, server)
    raw["modules"]["trigLog"] = {"type": TriggerLog, "recorder": log}
    raw["endpaths"]["trig"] = ["trigLog"]
    result = run(raw)
    return raw, result.report, dict(log.where())


def _check_hlt(raw: dict, report: dict, decisions: dict) -> None:
    n = report["events"]["read"]
    assert n == 100 and len(decisions) == n
    for path in HLT_PATHS:
        passed = report["paths"][path]["passed"]
        assert passed == sum(d[path] for d in decisions.values())
        assert 0.05 * n <= passed <= 0.4 * n, (path, passed)
    assert report["paths"]["HLT_MinBias"]["passed"] == n // 10
    accepted = sorted(e for e, d in decisions.items() if any(d.values()))
    assert report["events"]["accepted"] == len(accepted)
    assert 0.3 * n <= len(accepted) <= 0.7 * n
    # every module ran on every event (producers on demand: all filters need them)
    for label in ("hcalRecHits", "rho", "jets", "ak8Jets", "met", "electrons"):
        assert report["modules"][label]["runs"] == n, label

    out = read_output(raw)
    # exactly the accepted events, in order, with the products the HLT made for them
    assert out["event"].to_list() == accepted
    jets_pt, ak8_pt = out["jets_pt"], out["ak8Jets_pt"]
    assert ak.all(jets_pt >= 30.0) and ak.all(ak8_pt >= 100.0)
    assert ak.all(jets_pt[:, 1:] <= jets_pt[:, :-1])                     # highest pT first
    assert ak.all(out["jets_raw_pt"] >= jets_pt)                         # pileup subtracted
    # areas: ~pi R^2 for R = 0.4 (0.50) and R = 0.8 (2.0) jets
    assert 0.4 < np.median(ak.to_numpy(ak.flatten(out["jets_area"]))) < 0.6
    assert 1.6 < np.median(ak.to_numpy(ak.flatten(out["ak8Jets_area"]))) < 2.4
    rho = out["rho"].to_numpy()
    assert np.all(rho > 0)
    # the L1FastJet correction: pt = raw_pt - rho * area
    expected = ak.to_numpy(ak.flatten(out["jets_raw_pt"] - rho * out["jets_area"]))
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(jets_pt)), expected, rtol=1e-4, atol=1e-3)
    assert ak.all(out["hcalRecHits_energy"] >= 0.5)
    # the decisions follow the products written
    ht = ak.to_numpy(ak.sum(jets_pt, axis=1))
    ak8 = ak.to_numpy(ak.fill_none(ak.max(ak8_pt[abs(out["ak8Jets_eta"]) < 2.5], axis=1), 0.0))
    met = out["met"].to_numpy()
    for i, event in enumerate(accepted):
        assert decisions[event]["HLT_HT600"] == (ht[i] >= 600.0), event
        assert decisions[event]["HLT_AK8Jet450"] == (ak8[i] >= 450.0), event
        assert decisions[event]["HLT_MET400"] == (met[i] >= 400.0), event


def test_hlt_facile_and_nominal_agree(triton_server, tmp_path, new_recorder, run):
    raw_f, report_f, facile = _run_hlt(run, new_recorder(), "workflow_hlt", tmp_path,
                                         triton_server)
    raw_n, report_n, nominal = _run_hlt(run, new_recorder(), "workflow_hlt_nominal", tmp_path)
    _check_hlt(raw_f, report_f, facile)
    _check_hlt(raw_n, report_n, nominal)
    details = report_f["modules"]["hcalRecHits"]["details"]
    assert details["client"] == "triton" and details["requests"] == 100
    assert report_n["modules"]["hcalRecHits"]["type"] == "HcalMahiReco"
    # same decision on most events, path by path and overall
    for path in HLT_PATHS:
        same = sum(facile[e][path] == nominal[e][path] for e in facile)
        assert same >= 95, (path, same)
    same = sum(any(facile[e].values()) == any(nominal[e].values()) for e in facile)
    assert same >= 95
    # the nominal HCAL reconstruction is a modest part of the HLT's CPU time (docs/WORKFLOWS.md:
    # 10-20 %); loose bounds, CPU times on a shared machine
    cpu = {label: m["cpu_ms_mean"] * m["runs"] for label, m in report_n["modules"].items()
           if label != "trigLog"}
    share = cpu["hcalRecHits"] / sum(cpu.values())
    assert 0.05 < share < 0.35, share


def test_hlt_main_command_runs_on_the_fallback_server(tmp_path):
    """README's main command, on 5 events: FACILE on a fallback server recorun starts itself."""
    workflow = WORKFLOWS / "workflow_hlt.yaml"
    done = subprocess.run([sys.executable, "-m", "recorun.framework.cli", str(workflow), "-n", "5",
                           "-q", "--report-json", "r.json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 5 and report["events"]["failed"] == 0
    details = report["modules"]["hcalRecHits"]["details"]
    assert details["client"] == "triton" and details["requests"] == 5
    with uproot.open(tmp_path / "out" / "workflow_hlt_accepted.root") as f:
        assert f["Events"].num_entries == report["events"]["accepted"]


# -- offline workflows: SONIC and in-process -----------------------------------------------------

EVENTS = {"facile": 3, "deepcalo": 10, "resnet50": 2}


def _sample(raw: dict) -> str:
    (path,) = raw["source"]["files"]
    return path


def _check_facile(out, raw, n):
    with uproot.open(_sample(raw)) as f:
        digis = f["Events"].arrays(["nHcalDigi", "HcalDigi_ieta", "HcalDigi_iphi",
                                    "HcalDigi_depth", "HcalDigi_trueEnergy"], entry_stop=n)
    assert digis["nHcalDigi"].to_list() == [16000] * n                  # the full detector

    def key(ieta, iphi, depth):                                         # one int per channel
        return (np.asarray(ieta, np.int64) * 1000 + iphi) * 10 + depth

    ratios = []
    for i in range(n):
        hits = {k: ak.to_numpy(out[f"hcalRecHits_{k}"][i])
                for k in ("ieta", "iphi", "depth", "energy")}
        assert 500 < len(hits["energy"]) < 16000 and np.all(hits["energy"] >= 0.5)
        # FACILE against the true in-time energy of the same channels
        channels = key(*(ak.to_numpy(digis[f"HcalDigi_{k}"][i]) for k in ("ieta", "iphi",
                                                                             "depth")))
        order = np.argsort(channels)
        where = order[np.searchsorted(channels, key(hits["ieta"], hits["iphi"], hits["depth"]),
                                      sorter=order)]
        truth = ak.to_numpy(digis["HcalDigi_trueEnergy"][i])[where]
        ratios.append(hits["energy"][truth > 5.0] / truth[truth > 5.0])
        # towers hold the rechits' energy: sum over towers of ET cosh(eta) = sum of rechits
        towers_e = np.sum(ak.to_numpy(out["towers_et"][i])
                          * np.cosh(ak.to_numpy(out["towers_eta"][i])))
        assert towers_e == pytest.approx(hits["energy"].sum(), rel=1e-4)
    ratios = np.concatenate(ratios)
    assert len(ratios) > 30
    assert abs(np.median(ratios) - 1) < 0.05 and np.std(ratios) < 0.2


def _check_deepcalo(out, raw, n):
    with uproot.open(_sample(raw)) as f:
        counts = f["Events"]["nElectron"].array(library="np", entry_stop=n)
    assert out["nelectrons"].to_list() == counts.tolist()
    energy = ak.to_numpy(ak.flatten(out["electrons_energy"]))
    truth = ak.to_numpy(ak.flatten(out["true_energy"]))
    nominal = ak.to_numpy(ak.flatten(out["nominal_energy"]))
    assert len(energy) == counts.sum() > 20
    # DeepCalo's energy: unbiased, a resolution of a few % (5.4 % over the sample's 513
    # electrons), sharper than the nominal cluster sum's (8.4 %: pileup, upstream losses)
    assert abs(np.median(energy / truth) - 1) < 0.03
    assert np.std(energy / truth) < min(0.08, 0.85 * np.std(nominal / truth))
    et = ak.to_numpy(ak.flatten(out["electrons_et"]))
    np.testing.assert_allclose(et, energy / np.cosh(ak.to_numpy(ak.flatten(
        out["electrons_eta"]))), rtol=1e-4)


def _check_resnet50(out, raw, n):
    assert out["ntopTags"].to_list() == [10] * n                         # a batch of 10
    tags = ak.to_numpy(ak.flatten(out["topTags"]))
    assert np.all((tags >= 0) & (tags <= 1))
    assert ak.all(out["njets"] >= 10)
    pt = out["jets_pt"]
    assert ak.all(pt[:, 1:] <= pt[:, :-1]) and ak.all(pt >= 1.0)
    assert ak.all(pt[:, 0] > 300.0) and ak.all(pt[:, 9] < 20.0)        # the hard jet, soft UE


CHECKS = {"facile": _check_facile, "deepcalo": _check_deepcalo, "resnet50": _check_resnet50}


@pytest.mark.parametrize("name", OFFLINE)
def test_sonic_and_inprocess_variants_agree(triton_server, tmp_path, name, run):
    sonic_yaml = raw_yaml(f"workflow_{name}")
    inprocess_yaml = raw_yaml(f"workflow_{name}_inprocess")
    (label,) = [k for k, m in sonic_yaml["modules"].items() if m.get("client") == "triton"]
    assert inprocess_yaml["modules"][label]["client"] == "inprocess"
    strip = (f"modules.{label}.client", "modules.output.file")
    assert without(sonic_yaml, *strip) == without(inprocess_yaml, *strip)

    n = EVENTS[name]
    outputs, reports = {}, {}
    for variant, server in (("", triton_server), ("_inprocess", None)):
        raw = prepared(f"workflow_{name}{variant}", tmp_path, server, events=n)
        result = run(raw)
        report = result.report
        assert report["events"] == {"read": n, "accepted": n, "rejected": 0, "failed": 0}
        assert report["modules"][label]["details"]["requests"] == n
        outputs[variant] = read_output(raw)
        reports[variant] = report
        CHECKS[name](outputs[variant], raw, n)
    assert reports[""]["modules"][label]["details"]["client"] == "triton"
    assert reports["_inprocess"]["modules"][label]["details"]["client"] == "inprocess"
    sonic, inprocess = outputs[""], outputs["_inprocess"]
    assert sorted(sonic) == sorted(inprocess)
    for branch in sonic:
        a, b = sonic[branch], inprocess[branch]
        assert a.type == b.type, branch
        if a.ndim > 1:                                  # the same number of entries per event
            assert ak.to_list(ak.num(a, axis=1)) == ak.to_list(ak.num(b, axis=1)), branch
        np.testing.assert_allclose(ak.to_numpy(ak.flatten(a, axis=None)),
                                   ak.to_numpy(ak.flatten(b, axis=None)),
                                   rtol=RTOL, atol=ATOL, err_msg=f"{name}: {branch}")
