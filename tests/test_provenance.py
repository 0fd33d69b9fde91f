"""Provenance in the files recorun writes: ``recorun_provenance`` and ``recorun provenance``.

Real ROOT files, the real command line in a subprocess: a small CPU workflow on an
EmptySource (toy hits, towers, jets) with a ``--set`` override writes ``step1.root``; a second
job reads it and writes ``step2.root`` (the history: both processes, in order), also as a
chunked job (``--processes 2``: one merged provenance). SONIC products: FACILE in-process
(torch), and against the session's Triton server (``server`` marker).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import uproot

from recorun import __version__ as VERSION
from recorun.framework.provenance import KEY, format_record, merge_records

REPO = Path(__file__).resolve().parents[1]
HCAL = REPO / "data" / "samples" / "hcal_offline_sample.root"
FACILE = REPO / "workflows" / "workflow_facile.yaml"
FACILE_INPROCESS = REPO / "workflows" / "workflow_facile_inprocess.yaml"

STEP1 = """
process: {name: STEP1, report_every_s: 0}
source: {type: EmptySource, count: 20}
modules:
  hits: {type: ToyCaloHitProducer, seed: 7}
  towers: {type: CaloTowerProducer, hits: hits}
  jets: {type: TowerJetProducer, towers: towers, radius: 0.4}
  output: {type: RootOutput, products: [jets, towers], file: step1.root}
endpaths: {out: [output]}
"""

STEP2 = """
process: {name: STEP2, report_every_s: 0}
source: {type: RootSource, files: [step1.root]}
modules:
  met: {type: MissingEtProducer, towers: source:towers}
  output: {type: RootOutput, products: [met, source:jets], file: step2.root}
endpaths: {out: [output]}
"""


def recorun(cwd: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recorun.framework.cli", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    return run


def provenance_json(cwd: Path, file) -> dict:
    return json.loads(ok(recorun(cwd, "provenance", file, "--json")).stdout)


@pytest.fixture(scope="module")
def step1(tmp_path_factory) -> Path:
    """STEP1 run with ``--set modules.jets.radius=0.6``: its folder (``step1.root`` in it)."""
    folder = tmp_path_factory.mktemp("step1")
    (folder / "step1.yaml").write_text(STEP1)
    (folder / "step2.yaml").write_text(STEP2)
    ok(recorun(folder, "step1.yaml", "-q", "--set", "modules.jets.radius=0.6"))
    return folder


@pytest.mark.subprocess
def test_a_job_writes_what_made_its_products(step1):
    record = provenance_json(step1, "step1.root")
    assert record["format"] == 1 and len(record["processes"]) == 1
    job = record["processes"][0]
    assert job["process"] == "STEP1" and job["recorun_version"] == VERSION
    assert job["host"] and job["started"] and job["id"]
    assert job["workflow_file"] == str(step1 / "step1.yaml")
    assert job["workflow"]["modules"]["jets"]["radius"] == 0.6          # the --set value
    assert job["source"] == {"type": "EmptySource", "parameters": {
        "count": 20, "run": 1, "lumi": 1, "first_event": 1, "events_per_lumi": 0,
        "lumis_per_run": 0}}
    assert job["inputs"] == []
    output = job["output"]
    assert (output["label"], output["type"], output["file"], output["events"]) == \
        ("output", "RootOutput", str(step1 / "step1.root"), 20)          # made absolute
    jets, towers = job["products"]["jets"], job["products"]["towers"]
    assert jets["producer"] == "jets" and jets["branch"] == "jets"
    assert list(jets["modules"]) == ["hits", "towers", "jets"]          # dependencies first
    assert list(towers["modules"]) == ["hits", "towers"]
    assert jets["modules"]["jets"] == {"type": "TowerJetProducer", "parameters": {
        "towers": "towers", "radius": 0.6, "seed_et": 3.0, "min_pt": 15.0}}
    assert jets["modules"]["hits"]["type"] == "ToyCaloHitProducer"
    assert jets["modules"]["hits"]["parameters"]["seed"] == 7
    assert jets["modules"]["hits"]["parameters"]["noise_hits"] == 400     # defaults too
    assert jets["modules"]["towers"] == towers["modules"]["towers"]

    text = ok(recorun(step1, "provenance", "step1.root")).stdout
    for words in ("written by 1 process", "STEP1", f"recorun    {VERSION}",
                  f"output (RootOutput): {step1 / 'step1.root'}, 20 events",
                  "jets, made by jets <- towers <- hits", "modules    3",
                  "TowerJetProducer", "radius=0.6", "ToyCaloHitProducer", "seed=7",
                  "CaloTowerProducer", "EmptySource", "inputs     (none)"):
        assert words in text, (words, text)


@pytest.mark.subprocess
def test_plain_uproot_reads_it(step1):
    with uproot.open(step1 / "step1.root") as file:
        assert file.classnames()[f"{KEY};1"] == "TObjString"
        record = json.loads(str(file[KEY]))
        assert file["Events"].num_entries == 20
    assert record == provenance_json(step1, "step1.root")


@pytest.mark.subprocess
def test_a_second_job_keeps_the_first_as_history(step1):
    ok(recorun(step1, "step2.yaml", "-q"))
    record = provenance_json(step1, "step2.root")
    first, second = record["processes"]
    assert [first["process"], second["process"]] == ["STEP1", "STEP2"]
    assert first == provenance_json(step1, "step1.root")["processes"][0]
    assert second["id"] != first["id"]
    assert second["inputs"] == [str(step1 / "step1.root")]
    assert second["source"]["type"] == "RootSource"
    met, jets = second["products"]["met"], second["products"]["source:jets"]
    assert met["modules"] == {"met": {"type": "MissingEtProducer",
                                      "parameters": {"towers": "source:towers"}}}
    assert jets == {"branch": "source_jets", "producer": "source", "modules": {}}
    text = ok(recorun(step1, "provenance", "step2.root")).stdout
    assert "written by 2 processes" in text
    assert text.index("process 1 of 2: STEP1") < text.index("process 2 of 2: STEP2 (wrote")
    assert "radius=0.6" in text and "MissingEtProducer" in text
    assert "source:jets (branch source_jets), read from the input files" in text

    # a third job reading two files that STEP2 made lists STEP1 once, then STEP2, then itself
    shutil.copy(step1 / "step2.root", step1 / "step2b.root")
    ok(recorun(step1, "step2.yaml", "-q", "--set", "process.name=STEP3",
               "--set", "source.files=[step2.root, step2b.root]", "--set",
               "modules={output: {type: RootOutput, products: [source:met], file: step3.root}}"))
    chain = provenance_json(step1, "step3.root")["processes"]
    assert [p["process"] for p in chain] == ["STEP1", "STEP2", "STEP3"]
    assert chain[2]["inputs"] == [str(step1 / "step2.root"), str(step1 / "step2b.root")]


@pytest.mark.subprocess
def test_a_chunked_job_writes_one_merged_provenance(step1):
    ok(recorun(step1, "step2.yaml", "-q", "--set", "modules.output.file=single.root"))
    ok(recorun(step1, "step2.yaml", "-q", "--processes", "2", "--chunk-size", "5",
               "--set", "modules.output.file=chunked.root"))
    single = provenance_json(step1, "single.root")["processes"]
    chunked = provenance_json(step1, "chunked.root")["processes"]
    assert [p["process"] for p in chunked] == ["STEP1", "STEP2"]
    assert chunked[0] == single[0]                                   # the history, once
    job = chunked[1]
    assert job["merged_parts"] == 4 and job["output"]["events"] == 20
    assert job["output"]["file"] == str(step1 / "chunked.root")
    assert job["inputs"] == single[1]["inputs"] == [str(step1 / "step1.root")]
    assert job["products"] == single[1]["products"]
    assert job["workflow"]["modules"]["output"]["file"] == "chunked.root"
    assert "merged from 4 part files" in ok(recorun(step1, "provenance", "chunked.root")).stdout


@pytest.mark.subprocess
def test_an_output_without_events_has_provenance_too(step1):
    ok(recorun(step1, "step1.yaml", "-q", "--set", "modules.ht={type: HTFilter, jets: jets, "
               "min_ht: 1.0e9}", "--set", "paths={HLT: [ht]}",
               "--set", "modules.output.select_events=[HLT]",
               "--set", "modules.output.file=empty.root"))
    job = provenance_json(step1, "empty.root")["processes"][0]
    assert job["output"]["events"] == 0 and job["output"]["select_events"] == ["HLT"]
    assert list(job["products"]["jets"]["modules"]) == ["hits", "towers", "jets"]


def _sonic(job: dict, tag: str = "hcalRecHits") -> dict:
    return job["products"][tag]["modules"]["hcalRecHits"]["provenance"]


@pytest.mark.subprocess
def test_a_sonic_product_names_its_model_and_what_answered(tmp_path):
    ok(recorun(tmp_path, FACILE_INPROCESS, "-q", "-n", "10", "--set",
               "modules.hcalRecHits.backend=torch", "--set", "modules.output.file=f.root",
               "--report-json", "r.json"))
    job = provenance_json(tmp_path, "f.root")["processes"][-1]
    sonic = _sonic(job)
    requests = json.loads((tmp_path / "r.json").read_text())[
        "modules"]["hcalRecHits"]["details"]["requests"]
    assert requests >= 10
    assert sonic == {"model": "facile", "version": "", "client": "inprocess", "mode": "async",
                     "backend": "torch", "servers": [
                         {"name": "in-process torch", "address": "",
                          "requests": requests, "version": ""}]}
    assert _sonic(job, "towers") == sonic                # towers are made from its hits
    assert job["inputs"] == [str(HCAL)]
    text = ok(recorun(tmp_path, "provenance", "f.root")).stdout
    assert "SONIC model 'facile', version asked: latest; client inprocess (async, torch)" \
        in text
    assert f"answered by in-process torch: {requests} requests" in text


@pytest.mark.subprocess
def test_chunks_add_up_the_sonic_requests(tmp_path):
    ok(recorun(tmp_path, FACILE_INPROCESS, "-q", "-n", "20", "--processes", "2",
               "--chunk-size", "5", "--set", "modules.hcalRecHits.backend=torch",
               "--set", "modules.output.file=f.root", "--report-json", "r.json"))
    job = provenance_json(tmp_path, "f.root")["processes"][-1]
    requests = json.loads((tmp_path / "r.json").read_text())[
        "modules"]["hcalRecHits"]["details"]["requests"]
    assert job["merged_parts"] == 4 and job["output"]["events"] == 20
    assert requests >= 20
    assert _sonic(job)["servers"] == [{"name": "in-process torch", "address": "",
                                       "requests": requests, "version": ""}]


@pytest.mark.server
@pytest.mark.subprocess
def test_the_triton_server_that_answered_is_named(tmp_path, triton_server):
    registry = ("services.sonic={type: ServerRegistry, fallback: false, servers: "
                f"[{{name: main, address: '{triton_server.grpc}'}}]}}")
    ok(recorun(tmp_path, FACILE, "-q", "-n", "5", "--set", registry,
               "--set", "modules.output.file=f.root", "--report-json", "r.json"))
    job = provenance_json(tmp_path, "f.root")["processes"][-1]
    details = json.loads((tmp_path / "r.json").read_text())["modules"]["hcalRecHits"]["details"]
    sonic = _sonic(job)
    assert (sonic["model"], sonic["client"], sonic["mode"]) == ("facile", "triton", "async")
    (server,) = sonic["servers"]
    assert server["name"] == "main" and server["address"] == triton_server.grpc
    assert server["requests"] == details["per_server"]["main"]["answers"] >= 5
    assert job["workflow"]["services"]["sonic"]["servers"][0]["address"] == triton_server.grpc
    text = ok(recorun(tmp_path, "provenance", "f.root")).stdout
    assert f"answered by main ({triton_server.grpc}): {server['requests']} requests" in text


@pytest.mark.subprocess
def test_files_without_provenance_exit_2_naming_the_file(tmp_path):
    missing = recorun(tmp_path, "provenance", "nowhere.root")
    assert missing.returncode == 2 and "nowhere.root: no such file" in missing.stderr
    (tmp_path / "text.root").write_text("not ROOT")
    broken = recorun(tmp_path, "provenance", "text.root")
    assert broken.returncode == 2 and "text.root: cannot open as a ROOT file" in broken.stderr
    with uproot.recreate(tmp_path / "plain.root") as file:
        file.mktree("Events", {"x": "f8"}).extend({"x": [1.0, 2.0]})
    plain = recorun(tmp_path, "provenance", "plain.root", "--json")
    assert plain.returncode == 2 and plain.stdout == ""
    assert "plain.root has no recorun provenance" in plain.stderr
    for run in (missing, broken, plain):
        assert "Traceback" not in run.stderr


def test_merging_adds_up_servers_and_keeps_each_earlier_process_once():
    """:func:`merge_records` on made-up part records (no subprocess)."""
    earlier = {"id": "a", "process": "GEN", "products": {}}

    def part(job_id, host, started, inputs, requests, events):
        server = {"name": "gpu", "address": "gpu:8001", "requests": requests, "version": "1"}
        return {"format": 1, "processes": [earlier, {
            "id": job_id, "process": "RECO", "host": host, "hosts": [host],
            "started": started, "inputs": inputs, "output": {"label": "out", "events": events},
            "products": {"x": {"producer": "x", "modules": {"x": {
                "type": "X", "parameters": {}, "provenance": {"model": "m",
                                                             "servers": [server]}}}}}}]}

    merged = merge_records([part("p1", "n1", "2025-01-02", ["f1"], 3, 10),
                            part("p2", "n2", "2025-01-01", ["f2", "f1"], 4, 5), None])
    gen, reco = merged["processes"]
    assert gen == earlier
    assert (reco["id"], reco["hosts"], reco["started"], reco["inputs"]) == \
        ("p1", ["n1", "n2"], "2025-01-01", ["f1", "f2"])
    assert reco["output"]["events"] == 15 and reco["merged_parts"] == 2
    assert reco["products"]["x"]["modules"]["x"]["provenance"]["servers"] == [
        {"name": "gpu", "address": "gpu:8001", "requests": 7, "version": "1"}]
    assert "answered by gpu (gpu:8001): 7 requests, version 1" in format_record(merged)
    assert merge_records([None]) is None
