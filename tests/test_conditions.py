"""Conditions by interval of validity (``recorun.framework.conditions``, docs/CONDITIONS.md).

Conditions files and payload files (npz, JSON, YAML, ROOT) are written to ``tmp_path``. The
service is tested on its own (parsing, IOV lookup, payloads, derived records, ``check``), then
through the engine: modules that read records per event and per luminosity block on an
EmptySource spanning runs, a two-run ROOT file of HCAL digis whose gains change at the run
boundary, the HLT conditions against the digis' own values, a SONIC producer whose model
comes from conditions, and the command line's exit code for a bad conditions file.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

from recorun import (ConditionsProducer, ConditionsService, ConfigError, Param, Producer,
                     Record, run_workflow)
from recorun.data import hcal
from recorun.data.conditions import hcal_payloads, write_hcal, write_npz
from recorun.framework.conditions import IOV, LAST_LUMI, ReadOnlyDict
from recorun.modules.hcal_reco import HcalCalibrations

from collect import Collect

REPO = Path(__file__).resolve().parents[1]
HLT_SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"
HLT_CONDITIONS = REPO / "data" / "conditions" / "hcal_hlt.yaml"
HERE = __name__                       # derived producers below: f"{HERE}:Class"


def conditions(tmp_path: Path, content, name: str = "conditions.yaml") -> str:
    """Write a conditions file (YAML text, or a mapping dumped as YAML / JSON by suffix)."""
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif name.endswith(".json"):
        path.write_text(json.dumps(content))
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


def service(tmp_path: Path, content, derived=None, **kwargs) -> ConditionsService:
    return ConditionsService(files=[conditions(tmp_path, content, **kwargs)],
                             derived=derived or {})


def config_error(tmp_path, content, *fragments, derived=None) -> str:
    with pytest.raises(ConfigError) as info:
        service(tmp_path, content, derived)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


# -- 1. parsing and IOV lookup --------------------------------------------------------------------

RUNS_AND_LUMIS = """
Calib:
  - {since: 1, value: first}               # run 1 to 2:0 (the next since)
  - {since: "2:1", till: "2:3", value: second}
  - {since: 3, value: third}                # run 3 on
Run:
  - {since: 1, till: 1, value: one}
  - {since: 2, value: two}
"""


def test_iovs_by_run_and_by_run_lumi(tmp_path):
    s = service(tmp_path, RUNS_AND_LUMIS)
    assert s.records() == ["Calib", "Run"]
    expected = {(1, 1): ("first", "1 to 2:0"), (1, 900): ("first", "1 to 2:0"),
                (2, 1): ("second", "2:1 to 2:3"), (2, 3): ("second", "2:1 to 2:3"),
                (3, 1): ("third", "3 to the end"), (77, 5): ("third", "3 to the end")}
    for (run, lumi), (value, iov) in expected.items():
        lumi_conditions = s.for_lumi(run, lumi)
        assert lumi_conditions.get("Calib") == value
        assert str(lumi_conditions.iov("Calib")) == iov
    assert s.for_lumi(1, 4).get("Run") == "one"
    assert s.for_lumi(1, 4).iov("Run") == IOV((1, 0), (1, LAST_LUMI))
    assert s.for_lumi(5, 1).get("Run") == "two"


def test_unquoted_run_lumi_is_not_a_base_60_number(tmp_path):
    """PyYAML reads ``2:1`` as 121; conditions files read it as run 2, lumi 1."""
    s = service(tmp_path, "X:\n  - {since: 1, value: a}\n  - {since: 2:1, till: 2:59, value: b}\n")
    assert s.for_lumi(2, 1).get("X") == "b" and s.for_lumi(2, 59).get("X") == "b"
    assert str(s.for_lumi(2, 1).iov("X")) == "2:1 to 2:59"
    assert s.for_lumi(1, 121).get("X") == "a"


def test_a_gap_stops_the_lumi_naming_record_run_lumi_and_file(tmp_path):
    s = service(tmp_path, RUNS_AND_LUMIS)
    s.check({"reco": ["Calib"]})
    for run, lumi in [(2, 4), (2, 99)]:
        with pytest.raises(ConfigError) as info:
            s.for_lumi(run, lumi)
        text = str(info.value)
        assert "'Calib'" in text and f"{run}:{lumi}" in text and "conditions.yaml" in text
        assert "'reco'" in text and "2:1 to 2:3" in text, text
    late = service(tmp_path, "Calib:\n  - {since: 3, value: x}\n", name="late.yaml")
    late.check({"reco": ["Calib"]})
    with pytest.raises(ConfigError, match=r"late.yaml.*'Calib'.*run 1 lumi 1 \(1:1\)"):
        late.for_lumi(1, 1)
    # a record no module declared is looked up only when asked for
    s.check({})
    lumi = s.for_lumi(2, 4)
    with pytest.raises(ConfigError, match="'Calib'.*2:4"):
        lumi.get("Calib")


@pytest.mark.parametrize("text, fragment", [
    ("A:\n  - {since: 1, till: 3, value: a}\n  - {since: 2, value: b}\n",
     "entry 1 (IOV 1 to 3"),
    ("A:\n  - {since: 1, value: a}\n  - {since: 1, value: b}\n", "overlap"),
    ("A:\n  - {since: '2:5', till: '3:1', value: a}\n  - {since: '3:1', value: b}\n",
     "and entry 2 (since 3:1"),
])
def test_overlapping_iovs_are_configuration_errors(tmp_path, text, fragment):
    config_error(tmp_path, text, "conditions.yaml", "record 'A'", "overlap", fragment)


def test_overlaps_across_two_files_name_both(tmp_path):
    a = conditions(tmp_path, {"A": [{"since": 1, "value": 1}]}, "a.yaml")
    b = conditions(tmp_path, {"A": [{"since": 1, "value": 2}]}, "b.json")
    with pytest.raises(ConfigError, match=r"a.yaml and .*b.json.*record 'A'.*overlap"):
        ConditionsService(files=[a, b])
    c = conditions(tmp_path, {"A": [{"since": 5, "value": 2}], "B": [{"since": 1, "value": 3}]},
                   "c.json")
    s = ConditionsService(files=[a, c])         # one record from two files: fine
    assert [s.for_lumi(r, 1).get("A") for r in (1, 4, 5)] == [1, 1, 2]


@pytest.mark.parametrize("text, fragments", [
    ("A:\n  - {since: 1, valeu: 3}\n", ["record 'A', entry 1", "unknown key 'valeu'",
                                        "did you mean 'value'"]),
    ("A:\n  - {till: 3, value: 3}\n", ["record 'A', entry 1", "no 'since'"]),
    ("A:\n  - {since: '2-1', value: 3}\n", ["record 'A', entry 1", "since", "'2-1'"]),
    ("A:\n  - {since: '1:2:3', value: 3}\n", ["record 'A'", "'1:2:3'"]),
    ("A:\n  - {since: -4, value: 3}\n", ["record 'A'", "negative"]),
    ("A:\n  - {since: true, value: 3}\n", ["record 'A'", "True"]),
    ("A:\n  - {since: 1, value: 1}\n  - {since: 3, till: 2, value: 3}\n",
     ["record 'A', entry 2", "before since"]),
    ("A:\n  - {since: 1, value: 1, file: x.npz}\n", ["record 'A'", "not both"]),
    ("A:\n  - {since: 1}\n", ["record 'A'", "neither"]),
    ("A:\n  - {since: 1, file: nowhere.npz}\n", ["record 'A'", "nowhere.npz", "not found"]),
    ("A:\n  - {since: 1, file: conditions.yaml.txt}\n", ["record 'A'", ".npz, .json"]),
    ("A:\n  - {since: 1, value: 1, tree: t}\n", ["record 'A'", "'tree'"]),
    ("A: {since: 1, value: 1}\n", ["record 'A'", "list of entries"]),
    ("A: []\n", ["record 'A'", "list of entries"]),
    ("- {since: 1}\n", ["maps record names"]),
    ("A: [{since: 1, value: 1}\n", ["not valid YAML"]),
])
def test_bad_conditions_files_name_the_file_and_the_record(tmp_path, text, fragments):
    (tmp_path / "conditions.yaml.txt").write_text("")
    config_error(tmp_path, text, "conditions.yaml", *fragments)


def test_missing_or_wrong_conditions_files(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: conditions file not found"):
        ConditionsService(files=[str(tmp_path / "nowhere.yaml")])
    (tmp_path / "c.txt").write_text("A: []")
    with pytest.raises(ConfigError, match="c.txt: a conditions file is YAML"):
        ConditionsService(files=[str(tmp_path / "c.txt")])
    with pytest.raises(ConfigError, match="not valid JSON"):
        service(tmp_path, "{'A': 1}", name="c.json")


# -- 2. payloads ----------------------------------------------------------------------------------

def test_payload_files_npz_json_yaml_and_root(tmp_path):
    gains = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    write_npz(tmp_path / "g.npz", {"channel": np.arange(3), "gain": gains})
    (tmp_path / "p.json").write_text(json.dumps({"model": "facile", "cuts": [1, 2]}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.yaml").write_text("threshold: 0.5\nlist: [a, b]\n")
    with uproot.recreate(tmp_path / "t.root") as f:          # a TTree
        f.mktree("calib", {"channel": np.int32, "gain": np.float64, "pulse": ("f8", (8,))})
        f["calib"].extend({"channel": np.arange(4, dtype=np.int32),
                           "gain": np.linspace(1, 2, 4), "pulse": np.ones((4, 8))})
    with uproot.recreate(tmp_path / "n.root") as f:          # an RNTuple
        f.mkrntuple("calib", {"gain": np.linspace(3, 4, 5)})
    s = service(tmp_path, {
        "Npz": [{"since": 1, "file": "g.npz"}],
        "Json": [{"since": 1, "file": "p.json"}],
        "Yaml": [{"since": 1, "file": "sub/p.yaml"}],
        "Root": [{"since": 1, "file": str(tmp_path / "t.root")}],       # absolute: fine
        "RNTuple": [{"since": 1, "file": "n.root"}],
        "Inline": [{"since": 1, "value": {"a": [1, {"b": 2}]}}]})
    lumi = s.for_lumi(1, 1)
    npz = lumi.get("Npz")
    assert isinstance(npz, ReadOnlyDict) and sorted(npz) == ["channel", "gain"]
    np.testing.assert_array_equal(npz["gain"], gains)
    assert lumi.get("Json") == {"model": "facile", "cuts": (1, 2)}
    assert lumi.get("Yaml") == {"threshold": 0.5, "list": ("a", "b")}
    root = lumi.get("Root")
    assert sorted(root) == ["channel", "gain", "pulse"] and root["pulse"].shape == (4, 8)
    np.testing.assert_array_equal(root["gain"], np.linspace(1, 2, 4))
    np.testing.assert_array_equal(lumi.get("RNTuple")["gain"], np.linspace(3, 4, 5))
    assert lumi.get("Inline") == {"a": (1, {"b": 2})}
    # read-only: frozen arrays, dicts that refuse changes; a deep copy is writable
    for array in (npz["gain"], root["gain"], root["pulse"]):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 0
    for mapping in (npz, lumi.get("Json"), lumi.get("Inline")["a"][1]):
        with pytest.raises(TypeError, match="read-only"):
            mapping["new"] = 1
        with pytest.raises(TypeError, match="read-only"):
            mapping.update(x=1)
    mine = copy.deepcopy(npz)
    assert type(mine) is dict and mine["gain"].flags.writeable
    mine["gain"][0] = 7.0
    assert npz["gain"][0] == 1.0


def test_root_payload_files_name_their_tree(tmp_path):
    with uproot.recreate(tmp_path / "two.root") as f:
        f.mktree("a", {"x": np.int64})
        f["a"].extend({"x": np.arange(3)})
        f.mktree("b", {"x": np.int64})
        f["b"].extend({"x": np.arange(5)})
        f.mkrntuple("jagged", {"y": ak.Array([[1.0], [2.0, 3.0]])})
    s = service(tmp_path, {"A": [{"since": 1, "file": "two.root"}],
                           "B": [{"since": 1, "file": "two.root", "tree": "b"}],
                           "C": [{"since": 1, "file": "two.root", "tree": "nope"}],
                           "J": [{"since": 1, "file": "two.root", "tree": "jagged"}]})
    lumi = s.for_lumi(1, 1)
    assert len(lumi.get("B")["x"]) == 5
    with pytest.raises(ConfigError, match="two.root: the file has 3 trees.*'tree:'"):
        lumi.get("A")
    with pytest.raises(ConfigError, match="no tree 'nope'"):
        lumi.get("C")
    with pytest.raises(ConfigError, match="branch 'y'"):
        lumi.get("J")


def test_an_unreadable_payload_names_record_iov_and_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    s = service(tmp_path, {"A": [{"since": 2, "file": "bad.npz"}]})
    s.check({"m": ["A"]})
    with pytest.raises(ConfigError, match=r"bad.npz: cannot read the payload of record 'A', "
                                          r"entry 1 \(IOV 2 to the end\)"):
        s.for_lumi(2, 1)


def test_payloads_are_loaded_once_per_iov_and_shared(tmp_path):
    write_npz(tmp_path / "a.npz", {"x": np.zeros(3)})
    write_npz(tmp_path / "b.npz", {"x": np.ones(3)})
    s = service(tmp_path, {"A": [{"since": 1, "file": "a.npz"}, {"since": 3, "file": "b.npz"}]})
    s.check({"m": ["A"]})
    ids = {key: id(s.for_lumi(*key).get("A")) for key in [(1, 1), (1, 2), (2, 7), (3, 1), (4, 2)]}
    assert ids[(1, 1)] == ids[(1, 2)] == ids[(2, 7)] != ids[(3, 1)] == ids[(4, 2)]
    assert s.report()["records"]["A"]["iovs_loaded"] == ["1 to 2", "3 to the end"]


# -- 3. derived records ---------------------------------------------------------------------------

class Scaled(ConditionsProducer):
    """Test producer: the ``x`` of its input times ``factor``; counts its calls, and waits a
    little so that threads asking at once overlap."""

    source = Record("Base", doc="input with an 'x' array")
    factor = Param(float, 2.0, doc="scale")
    calls: list = []

    def produce(self, records):
        type(self).calls.append(threading.get_ident())
        threading.Event().wait(0.05)
        return {"x": np.asarray(records[self.source]["x"]) * self.factor}


class Summed(ConditionsProducer):
    """Test producer of a derived record from a derived one and a file one."""

    scaled = Record("Scaled")
    offset = Record("Offset")

    def produce(self, records):
        assert isinstance(records, ReadOnlyDict)
        return records[self.scaled]["x"] + records[self.offset]


class Loop(ConditionsProducer):
    other = Record(doc="the next record of a loop")

    def produce(self, records):
        return None


DERIVED = {
    "Base": [{"since": 1, "value": {"x": [1.0, 2.0]}}, {"since": 3, "value": {"x": [10.0, 20.0]}}],
    "Offset": [{"since": 1, "value": 0.5}, {"since": "2:5", "value": 1.5}],
}


def test_derived_records_once_per_iov_even_when_four_threads_ask(tmp_path):
    Scaled.calls = []
    s = service(tmp_path, DERIVED, derived={"Scaled": f"{HERE}:Scaled"})
    lumis = [s.for_lumi(1, 1), s.for_lumi(1, 2), s.for_lumi(2, 9), s.for_lumi(3, 1)]
    barrier = threading.Barrier(4)
    got: list = []

    def ask(lumi):
        barrier.wait()
        got.append(lumi.get("Scaled"))

    for lumi in lumis:                       # per lumi, four threads at once
        threads = [threading.Thread(target=ask, args=(lumi,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(Scaled.calls) == 2            # IOVs 1-2 and 3-
    assert len({id(p) for p in got[:12]}) == 1 and len({id(p) for p in got[12:]}) == 1
    np.testing.assert_array_equal(got[0]["x"], [2.0, 4.0])
    np.testing.assert_array_equal(got[-1]["x"], [20.0, 40.0])
    assert not got[0]["x"].flags.writeable          # the producer's arrays are frozen
    assert s.report()["records"]["Scaled"]["iovs_computed"] == ["1 to 2", "3 to the end"]


def test_a_derived_record_of_a_derived_one_has_the_intersection_iov(tmp_path):
    Scaled.calls = []
    s = service(tmp_path, DERIVED, derived={
        "Scaled": {"type": f"{HERE}:Scaled", "factor": 3.0},
        "Summed": f"{HERE}:Summed"})
    s.check({"m": ["Summed"]})
    values = {key: s.for_lumi(*key) for key in [(1, 1), (2, 4), (2, 5), (2, 9), (3, 1)]}
    assert str(values[(1, 1)].iov("Summed")) == "1 to 2:4"
    assert str(values[(2, 5)].iov("Summed")) == "2:5 to 2"
    assert str(values[(3, 1)].iov("Summed")) == "3 to the end"
    assert values[(1, 1)].get("Summed") is values[(2, 4)].get("Summed")
    assert values[(2, 5)].get("Summed") is values[(2, 9)].get("Summed")
    np.testing.assert_array_equal(values[(2, 5)].get("Summed"), [4.5, 7.5])
    np.testing.assert_array_equal(values[(3, 1)].get("Summed"), [31.5, 61.5])
    assert len(Scaled.calls) == 2            # Scaled's IOVs: 1-2, 3- (not one per Summed IOV)


def test_derived_record_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="derived record 'A'.*cycle: A -> B -> A"):
        service(tmp_path, DERIVED, derived={"A": {"type": f"{HERE}:Loop", "other": "B"},
                                            "B": {"type": f"{HERE}:Loop", "other": "A"}})
    with pytest.raises(ConfigError, match="derived record 'S'.*reads record 'Bsae'.*did you "
                                          "mean 'Base'"):
        service(tmp_path, DERIVED, derived={"S": {"type": f"{HERE}:Scaled", "source": "Bsae"}})
    with pytest.raises(ConfigError, match="derived record 'S'.*parameter 'factr'"):
        service(tmp_path, DERIVED, derived={"S": {"type": f"{HERE}:Scaled", "factr": 1}})
    with pytest.raises(ConfigError, match="derived record 'Base'.*read from files or derived"):
        service(tmp_path, DERIVED, derived={"Base": f"{HERE}:Scaled"})
    with pytest.raises(ConfigError, match="derived record 'S'.*unknown conditions type 'Nope'"):
        service(tmp_path, DERIVED, derived={"S": "Nope"})
    with pytest.raises(ConfigError, match="derived record 'S'.*not a ConditionsProducer"):
        service(tmp_path, DERIVED, derived={"S": f"{HERE}:Collect"})


# -- 4. check() and the engine --------------------------------------------------------------------

def test_check_names_the_module_and_the_record(tmp_path):
    s = service(tmp_path, DERIVED, derived={"Scaled": f"{HERE}:Scaled"})
    s.check({"reco": ["Base", "Scaled"]})
    with pytest.raises(ConfigError) as info:
        s.check({"reco": ["Base"], "calib": ["Ofset"]})
    text = str(info.value)
    assert info.value.label == "calib"
    for fragment in ("module 'calib'", "'Ofset'", "did you mean 'Offset'",
                     "Base, Offset, Scaled", "conditions.yaml"):
        assert fragment in text, text


class ReadCalib(Producer):
    """Test module: reads record ``calib`` per event and per luminosity block."""

    calib = Record("Calib", doc="the record read")
    recorder = Param(object, doc="the test's Recorder")

    def begin_run(self, run):
        self.recorder.record("run", run.run, run.record(self.calib))

    def begin_luminosity_block(self, lumi):
        self.recorder.record("lumi", lumi.key, lumi.record(self.calib))

    def produce(self, event):
        payload = event.record(self.calib)
        self.recorder.record("event", tuple(event.id), payload, id(payload))
        event.put(0)


def engine_workflow(files, recorder, events=12, **modules) -> dict:
    return {"process": {"report_every_s": 0, "threads": 2, "streams": 2},
            "source": {"type": "EmptySource", "count": events, "events_per_lumi": 2,
                       "lumis_per_run": 2},
            "services": {"conditions": {"type": "ConditionsService", "files": files}},
            "modules": {"read": {"type": ReadCalib, "recorder": recorder}, **modules},
            "paths": {"p": ["read"]}}


def test_modules_read_records_per_event_lumi_and_run(tmp_path, new_recorder, run_guarded):
    files = [conditions(tmp_path, {"Calib": [{"since": 1, "value": {"v": 1}},
                                             {"since": "2:2", "value": {"v": 2}},
                                             {"since": 3, "value": {"v": 3}}]})]
    recorder = new_recorder()
    result = run_guarded(engine_workflow(files, recorder))      # runs 1-3, lumis 1-2
    assert result.exit_code == 0, result.error
    expected = {(1, 1): 1, (1, 2): 1, (2, 1): 1, (2, 2): 2, (3, 1): 3, (3, 2): 3}
    assert {key: p["v"] for _, key, p in recorder.where("lumi")} == expected
    assert {run: p["v"] for _, run, p in recorder.where("run")} == {1: 1, 2: 1, 3: 3}
    events = recorder.where("event")
    assert len(events) == 12
    for _, (run, lumi, _), payload, _ in events:
        assert payload["v"] == expected[(run, lumi)]
    ids: dict[int, set] = {}                  # payload value -> ids of the objects read
    for _, (run, lumi, _), _, ident in events:
        ids.setdefault(expected[(run, lumi)], set()).add(ident)
    assert all(len(v) == 1 for v in ids.values())          # one object per IOV
    assert len(set.union(*ids.values())) == 3


def test_a_lumi_without_payload_stops_the_job_with_exit_code_2(tmp_path, new_recorder,
                                                              run_guarded):
    files = [conditions(tmp_path, {"Calib": [{"since": 1, "till": 1, "value": 1},
                                             {"since": 3, "value": 3}]})]
    recorder = new_recorder()
    result = run_guarded(engine_workflow(files, recorder))
    assert result.exit_code == 2
    text = str(result.error)
    assert "'Calib'" in text and "2:1" in text and "conditions.yaml" in text, text
    assert {run for _, (run, _, _), _, _ in recorder.where("event")} == {1}


def test_undeclared_reads_and_missing_service_are_errors(tmp_path, new_recorder, run_guarded):
    class Sneaky(Producer):
        def produce(self, event):
            event.record("Calib")

    recorder = new_recorder()
    wf = engine_workflow([conditions(tmp_path, {"Calib": [{"since": 1, "value": 1}]})],
                         recorder, sneaky={"type": Sneaky})
    wf["paths"]["q"] = ["sneaky"]
    result = run_guarded(wf)
    assert result.exit_code != 0 and "without declaring it" in str(result.error)
    # a module that declares a record, and no ConditionsService: before the first event
    recorder = new_recorder()
    wf = engine_workflow([], recorder)
    del wf["services"]
    with pytest.raises(ConfigError, match="module 'read'.*'Calib'.*no ConditionsService"):
        run_workflow(wf)
    # a record the service does not provide: before the first event, naming the module
    wf = engine_workflow([conditions(tmp_path, {"Calibs": [{"since": 1, "value": 1}]})],
                         recorder)
    with pytest.raises(ConfigError, match="module 'read'.*'Calib'.*did you mean 'Calibs'"):
        run_workflow(wf)
    assert recorder.where() == []


def test_the_cli_exits_2_for_a_bad_conditions_file(tmp_path):
    (tmp_path / "conditions.yaml").write_text(
        "Calib:\n  - {since: 1, value: 1}\n  - {since: '1:x', value: 2}\n")
    wf = {"process": {"name": "TEST"},
          "source": {"type": "EmptySource", "count": 3},
          "services": {"conditions": {"type": "ConditionsService",
                                      "files": ["${WORKFLOW_DIR}/conditions.yaml"]}},
          "modules": {"reco": {"type": "HcalSimpleReco", "calibrations": "Calib"}},
          "paths": {"p": ["reco"]}}
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "recorun.framework.cli", "wf.yaml"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "conditions.yaml" in run.stderr and "record 'Calib', entry 2" in run.stderr
    assert "'1:x'" in run.stderr and "Traceback" not in run.stderr, run.stderr


# -- 5. HCAL calibrations from conditions ---------------------------------------------------------

def hcal_conditions(folder: Path, scale_run_2: float | None = None) -> str:
    """The HLT's HCAL conditions in ``folder``; with ``scale_run_2``, run 2's gains scaled."""
    write_hcal(folder)
    gains = [{"since": 1, "file": "hcal_gains.npz"}]
    if scale_run_2 is not None:
        arrays = dict(hcal_payloads()["hcal_gains.npz"])
        arrays["gain"] = (arrays["gain"] * scale_run_2).astype(np.float32)
        write_npz(folder / "hcal_gains_run2.npz", arrays)
        gains.append({"since": 2, "file": "hcal_gains_run2.npz"})
    return conditions(folder, {"HcalGains": gains,
                               "HcalPedestals": [{"since": 1, "file": "hcal_pedestals.npz"}]})


def test_committed_hcal_conditions_are_the_generators(tmp_path):
    """data/conditions/*.npz are what ``python -m recorun.data.conditions`` writes, and the
    calibrations derived from them give every channel the generator's gain and pedestal."""
    for path in write_hcal(tmp_path):
        assert path.read_bytes() == (HLT_CONDITIONS.parent / path.name).read_bytes(), path.name
    s = ConditionsService(files=[str(HLT_CONDITIONS)],
                          derived={"HcalChannelCalibrations": "HcalChannelCalibrations"})
    lumi = s.for_lumi(1, 1)
    assert lumi.get("SonicModel") == {"model": "facile", "version": ""}
    calib = lumi.get("HcalChannelCalibrations")
    assert isinstance(calib, HcalCalibrations) and len(calib) == hcal.N_CHANNELS
    order = np.random.default_rng(3).permutation(hcal.N_CHANNELS)
    rows = calib.lookup(*(hcal.GEOMETRY[f][order] for f in ("ieta", "iphi", "depth")))
    np.testing.assert_array_equal(calib.gain[rows], hcal.CONDITIONS["gain"][order])
    np.testing.assert_array_equal(calib.pedestal[rows], hcal.CONDITIONS["pedestal"][order])
    with pytest.raises(ValueError, match=r"no calibration for channel .* = \(30, 1, 1\)"):
        calib.lookup(np.array([1, 30]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match=r"= \(21, 2, 1\)"):        # even iphi at |ieta| 21
        calib.lookup(np.array([21]), np.array([2]), np.array([1]))


def test_hlt_reconstructions_are_unchanged_with_conditions(tmp_path, new_recorder, run_guarded):
    """HcalSimpleReco and HcalMahiReco with gains and pedestals from the HLT conditions give the
    rechits they give with the digis' own fields."""
    recorder = new_recorder()
    modules = {}
    for kind in ("HcalSimpleReco", "HcalMahiReco"):
        modules[f"{kind}_own"] = {"type": kind}
        modules[f"{kind}_cond"] = {"type": kind, "calibrations": "HcalChannelCalibrations"}
    wf = {"process": {"report_every_s": 0, "max_events": 6, "threads": 2, "streams": 2},
          "source": {"type": "RootSource", "files": [str(HLT_SAMPLE)], "step_size": 3},
          "services": {"conditions": {"type": "ConditionsService",
                                      "files": [str(HLT_CONDITIONS)],
                                      "derived": {"HcalChannelCalibrations":
                                                  "HcalChannelCalibrations"}}},
          "modules": {**modules, "collect": {"type": Collect, "products": list(modules),
                                             "recorder": recorder}},
          "paths": {"p": ["collect"]}}
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    assert len(recorder.entries) == 6
    for _, _, got in recorder.entries:
        for kind in ("HcalSimpleReco", "HcalMahiReco"):
            own, cond = got[f"{kind}_own"], got[f"{kind}_cond"]
            assert len(own) > 100 and own.dtype == cond.dtype
            np.testing.assert_array_equal(own, cond)


def two_run_digis(path: Path, per_run: int = 4, channels: int = 400) -> ak.Array:
    """A ROOT file of HCAL digis: ``per_run`` events in run 1, then ``per_run`` in run 2 (two
    lumis each). Returns the digis."""
    n = 2 * per_run
    digis = hcal.generate(range(1, n + 1), seed=11, channels=channels)
    runs = np.repeat([1, 2], per_run).astype(np.uint32)
    lumis = np.tile(np.repeat([1, 2], per_run // 2), 2).astype(np.uint32)
    branches = {"run": runs, "luminosityBlock": lumis,
                "event": np.arange(1, n + 1, dtype=np.uint64), "HcalDigi": digis}
    with uproot.recreate(path) as f:
        f.mktree("Events", {"run": np.uint32, "luminosityBlock": np.uint32,
                            "event": np.uint64, "HcalDigi": digis.type.content})
        f["Events"].extend(branches)
    return digis


def test_gains_that_change_at_a_run_boundary(tmp_path, new_recorder, run_guarded):
    """A two-run file; run 2's gains are 1.1 times run 1's: run 2's rechit energies are 1.1
    times those with run 1's gains (the digis' own), run 1's are unchanged."""
    digis = two_run_digis(tmp_path / "digis.root")
    files = [hcal_conditions(tmp_path, scale_run_2=1.1)]
    recorder = new_recorder()
    wf = {"process": {"report_every_s": 0, "threads": 2, "streams": 2},
          "source": {"type": "RootSource", "files": [str(tmp_path / "digis.root")],
                     "step_size": 3},
          "services": {"conditions": {"type": "ConditionsService", "files": files,
                                      "derived": {"HcalChannelCalibrations":
                                                  "HcalChannelCalibrations"}}},
          "modules": {"rechits": {"type": "HcalSimpleReco", "threshold": -1e9,
                                  "calibrations": "HcalChannelCalibrations"},
                      "collect": {"type": Collect, "products": ["rechits"],
                                  "recorder": recorder}},
          "paths": {"p": ["collect"]}}
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    events = sorted(recorder.entries)
    assert [e[1][0] for e in events] == [1] * 4 + [2] * 4
    for index, (run, _, _), got in events:
        reference = hcal.simple_energy(digis[index]).astype(np.float32)   # run-1 gains
        hits = got["rechits"]
        assert len(hits) == len(reference)
        np.testing.assert_array_equal(hits["ieta"], np.asarray(digis[index]["ieta"]))
        if run == 1:
            np.testing.assert_array_equal(hits["energy"], reference)
        else:
            np.testing.assert_allclose(hits["energy"], 1.1 * reference, rtol=2e-6, atol=1e-6)
    calib = result.report["services"]["conditions"]["records"]["HcalChannelCalibrations"]
    assert calib["iovs_computed"] == ["1 to 1", "2 to the end"]


# -- 6. a SONIC producer's model from conditions --------------------------------------------------

from recorun.producers.facile import FacileProducer  # noqa: E402


class ModelLog(FacileProducer):
    """FacileProducer that records its model, version and client after each begin_run."""

    recorder = Param(object, doc="the test's Recorder")

    def begin_run(self, run):
        super().begin_run(run)
        self.recorder.record(run.run, self.model, self.version, self.sonic)


def sonic_job(tmp_path, run_2_model: dict, recorder) -> dict:
    two_run_digis(tmp_path / "digis.root", per_run=2, channels=200)
    files = [conditions(tmp_path, {"SonicModel": [
        {"since": 1, "value": {"model": "facile", "version": ""}},
        {"since": 2, "value": run_2_model}]})]
    return {"process": {"report_every_s": 0},
            "source": {"type": "RootSource", "files": [str(tmp_path / "digis.root")]},
            "services": {"conditions": {"type": "ConditionsService", "files": files}},
            "modules": {"rechits": {"type": ModelLog, "client": "inprocess", "backend": "torch",
                                    "model_record": "SonicModel", "recorder": recorder}},
            "paths": {"p": ["rechits"]}}


def test_a_sonic_producer_changes_model_when_the_conditions_do(tmp_path, new_recorder,
                                                              run_guarded):
    recorder = new_recorder()
    result = run_guarded(sonic_job(tmp_path, {"model": "facile", "version": "2"}, recorder),
                         timeout=120)
    assert result.exit_code == 0, result.error
    (r1, m1, v1, c1), (r2, m2, v2, c2) = recorder.entries
    assert (r1, m1, v1, r2, m2, v2) == (1, "facile", "", 2, "facile", "2")
    assert c1 is not c2                                # a new client for the new version
    # a model whose inputs do not fit stops the job at the run's start, exit code 2
    recorder = new_recorder()
    result = run_guarded(sonic_job(tmp_path, {"model": "deepcalo"}, recorder), timeout=120)
    assert result.exit_code == 2
    assert "'rechits'" in str(result.error) and "deepcalo" in str(result.error)
    assert [e[0] for e in recorder.entries] == [1]
    recorder = new_recorder()
    result = run_guarded(sonic_job(tmp_path, {"version": "1"}, recorder), timeout=120)
    assert result.exit_code == 2 and "expected {model: name" in str(result.error)
