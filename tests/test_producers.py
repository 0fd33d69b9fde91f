"""The SONIC producers (FACILE, DeepCalo, top tagging) in real workflows.

Each producer runs on a few events of the sample files with the Triton client in each mode
(async, sync, pseudo-async) against the session's ``triton_server`` and with the in-process
client: the products must agree. Also: async requests overlap other modules' work (from the
trace), switching client is a configuration change only, and a producer whose tensors do not
fit the model (fault injection) stops the job at begin_job with an error naming the producer,
the model and the tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from recorun import Analyzer, ConfigError, InputTag, Param
from recorun.producers.facile import FacileProducer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
HLT_SAMPLE = str(ROOT / "data" / "samples" / "hlt_sample.root")
JETS_SAMPLE = str(ROOT / "data" / "samples" / "jets_sample.root")
RTOL, ATOL = 1e-4, 1e-4
TRITON_MODES = ("async", "sync", "pseudo-async")


class Keep(Analyzer):
    """Records (event number, a copy of the product) for the test."""

    product = InputTag(doc="the product to keep")
    recorder = Param(Any, None)

    def analyze(self, event):
        self.recorder.record(event.id.event, np.array(event.get(self.product), copy=True))


def registry(server) -> dict:
    return {"sonic": {"type": "ServerRegistry", "fallback": False,
                      "servers": [{"name": "main", "address": server.grpc}]}}


def recording_workflow(new_recorder, sample: str, modules: dict, keep: list[str], events: int,
                       server, **process):
    """A workflow over ``sample`` that records the products ``keep``; returns (wf, recorders)."""
    recorders = {tag: new_recorder() for tag in keep}
    modules = dict(modules)
    for i, tag in enumerate(keep):
        modules[f"keep{i}"] = {"type": Keep, "product": tag, "recorder": recorders[tag]}
    process.setdefault("report_every_s", 0)
    process.setdefault("max_events", events)
    wf = {"process": process, "source": {"type": "RootSource", "files": [HLT_SAMPLE
                                                                          if sample == "hlt"
                                                                          else JETS_SAMPLE]},
          "modules": modules, "paths": {"p": [f"keep{i}" for i in range(len(keep))]},
          "endpaths": {}, "services": registry(server)}
    return wf, recorders


def products(recorders: dict) -> dict:
    return {tag: dict(r.where()) for tag, r in recorders.items()}


def assert_same(a: dict, b: dict, what: str) -> None:
    for tag in a:
        assert sorted(a[tag]) == sorted(b[tag]), f"{what}: events of {tag} differ"
        for number, x in a[tag].items():
            y = b[tag][number]
            assert x.dtype == y.dtype and x.shape == y.shape, \
                f"{what}: {tag} of event {number}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            for name in (x.dtype.names or (None,)):
                xa, ya = (x, y) if name is None else (x[name], y[name])
                np.testing.assert_allclose(xa, ya, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{what}: {tag}[{name}] of event {number}")


SETUPS = {
    # FACILE rechits feeding the calorimeter towers, as HcalSimpleReco does
    "facile": ("hlt", lambda client: {
        "rechits": {"type": "FacileProducer", "threshold": 0.0, **client},
        "towers": {"type": "CaloTowerProducer", "hits": "rechits", "geometry": "hcal"}},
        ["rechits", "towers"], 3),
    "deepcalo": ("hlt", lambda client: {
        "electrons": {"type": "DeepCaloProducer", **client}}, ["electrons"], 3),
    "toptag": ("jets", lambda client: {
        "jets": {"type": "AntiKtJetProducer"},
        "jetImages": {"type": "JetImageProducer", "max_jets": 2},
        "topTags": {"type": "TopTagProducer", **client}}, ["topTags"], 2),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_all_clients_agree(triton_server, name, run_guarded, new_recorder):
    """Triton async, sync, pseudo-async and in-process give the same products."""
    sample, modules, keep, events = SETUPS[name]
    results = {}
    for client in [*({"mode": m} for m in TRITON_MODES), {"client": "inprocess"}]:
        wf, recorders = recording_workflow(new_recorder, sample, modules(client), keep, events, triton_server,
                                 threads=2, streams=2)
        result = run_guarded(wf, timeout=180)
        assert result.exit_code == 0, result.error
        assert result.report["events"]["failed"] == 0
        got = products(recorders)
        assert all(len(got[tag]) == events for tag in keep), got
        results[str(client)] = got
    reference = results.pop(str({"client": "inprocess"}))
    assert any(len(x) for x in reference[keep[0]].values()), "no products to compare"
    for what, got in results.items():
        assert_same(got, reference, f"{name} {what} vs inprocess")


def test_async_requests_overlap_other_work(triton_server, run_guarded, new_recorder):
    """1 thread, 2 streams: while an event's request is out, the thread runs another event's
    module calls (an 'external' span of event A overlaps a call of event B)."""
    wf, _ = recording_workflow(new_recorder, "hlt", SETUPS["facile"][1]({"mode": "async"}), ["towers"], 8,
                     triton_server, threads=1, streams=2)
    result = run_guarded(wf, timeout=120, trace=True)
    assert result.exit_code == 0, result.error
    spans = [e for e in result.tracer.to_json()["traceEvents"] if e.get("ph") == "X"]
    external = [e for e in spans if e["cat"] == "external"]
    calls = [e for e in spans if e["cat"] not in ("external", "event") and "args" in e]
    assert len(external) == 8
    overlaps = [(x, c) for x in external for c in calls
                if c["args"]["event"] != x["args"]["event"]
                and c["ts"] < x["ts"] + x["dur"] and x["ts"] < c["ts"] + c["dur"]]
    assert overlaps, "no module call of another event ran while a request was out"


FACILE_YAML = """
process: {threads: 1, streams: 1, max_events: 2, report_every_s: 0}
source: {type: RootSource, files: ["HLT_SAMPLE"]}
modules:
  rechits: {type: FacileProducer, mode: async, timeout: 5 s}
  towers: {type: CaloTowerProducer, hits: rechits, geometry: hcal}
paths: {}
"""


def test_switching_client_is_configuration_only(triton_server, new_recorder, run_guarded):
    """The same YAML, only ``client: inprocess`` set (as ``--set`` does), same products."""
    out = {}
    for overrides in ([], ["modules.rechits.client=inprocess"]):
        raw = yaml.safe_load(FACILE_YAML.replace("HLT_SAMPLE", HLT_SAMPLE))
        recorder = new_recorder()
        raw["modules"]["keep"] = {"type": Keep, "product": "towers", "recorder": recorder}
        raw["paths"] = {"p": ["keep"]}
        raw["services"] = registry(triton_server)
        result = run_guarded(raw, timeout=120, overrides=overrides)
        assert result.exit_code == 0, result.error
        out[bool(overrides)] = {"towers": dict(recorder.where())}
    assert len(out[False]["towers"]) == 2
    assert_same(out[False], out[True], "triton vs inprocess")


class FourteenColumnFacile(FacileProducer):
    """Fault injection: packs 14 of the 15 FACILE columns."""

    inputs = {"hcal_channels": ((14,), np.float32)}

    def pack(self, event):
        return {"hcal_channels": super().pack(event)["hcal_channels"][:, :14]}


class MisnamedFacile(FacileProducer):
    """Fault injection: sends the right matrix under a wrong tensor name."""

    inputs = {"hcal_inputs": ((15,), np.float32)}


@pytest.mark.parametrize("client", ["triton", "inprocess"])
@pytest.mark.parametrize("bad, tensor", [(FourteenColumnFacile, "hcal_channels"),
                                         (MisnamedFacile, "hcal_inputs")])
def test_wrong_tensor_fails_at_begin_job(triton_server, client, bad, tensor, new_recorder, run_guarded):
    recorder = new_recorder()
    wf = {"process": {"report_every_s": 0, "max_events": 2},
          "source": {"type": "RootSource", "files": [HLT_SAMPLE]},
          "modules": {"rechits": {"type": bad, "client": client},
                      "keep": {"type": Keep, "product": "rechits", "recorder": recorder}},
          "paths": {"p": ["keep"]}, "services": registry(triton_server)}
    result = run_guarded(wf, timeout=60)
    # a configuration error found at begin_job: exit code 2, no event processed
    assert result.exit_code == 2 and recorder.where() == []
    assert isinstance(result.error, ConfigError)
    text = str(result.error)
    assert "module 'rechits'" in text and "Facile" in text, text
    assert "model 'facile'" in text and f"'{tensor}'" in text, text
    assert result.report["events"]["failed"] == 0


def test_bad_client_parameter_is_a_configuration_error():
    from recorun import run_workflow

    wf = {"process": {"report_every_s": 0},
          "source": {"type": "EmptySource", "count": 1},
          "modules": {"rechits": {"type": "FacileProducer", "timeout": "fast"}},
          "paths": {}}
    result = None
    with pytest.raises(Exception) as info:
        result = run_workflow(wf)
    assert result is None
    assert getattr(info.value, "exit_code", None) == 2
    assert "rechits" in str(info.value) and "timeout" in str(info.value)


def test_client_timing_is_in_the_job_report(triton_server, run_guarded, new_recorder):
    """The producer's client figures (calls, round trip, packing) join its report entry."""
    wf, _ = recording_workflow(new_recorder, "hlt", SETUPS["facile"][1]({"mode": "async"}), ["towers"], 4,
                     triton_server, threads=1, streams=2)
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    details = result.report["modules"]["rechits"]["details"]
    assert details["client"] == "triton" and details["mode"] == "async"
    assert details["model"] == "facile" and details["calls"] == 4
    assert details["failures"] == 0 and details["mean_roundtrip_ms"] > 0
    assert details["bytes_sent"] >= 4 * 4500 * 15 * 4
    # the server's own time, from its statistics: only this job's requests reached it
    assert details["server_requests"] == details["requests"] and not details["server_shared"]
    assert 1 <= details["server_executions"] <= details["requests"]
    per_call_roundtrip = details["mean_roundtrip_ms"] * details["requests"] / details["calls"]
    assert 0 < details["server_compute_ms_per_call"] < per_call_roundtrip
    assert 0 <= details["server_queue_ms_per_call"] < per_call_roundtrip
