"""Configuration errors: ``recorun`` exits with 2 before reading any event, and says on stderr
which YAML file, which module label and which parameter is wrong, with a suggestion where a
name was mistyped.

Every workflow here is a small but complete HLT-like workflow (toy calorimeter hits -> towers
-> jets / missing ET -> filters -> a RootOutput end path) with one mistake in it. The CLI runs
as a subprocess in ``tmp_path``; each test also checks that no event was processed: nothing on
stdout, no run summary on stderr and no output file.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

OUTPUT_FILE = "out/accepted.root"

BASE = {
    "process": {"name": "TEST"},
    "source": {"type": "EmptySource", "count": 20},
    "modules": {
        "hits": {"type": "ToyCaloHitProducer", "seed": 7},
        "rawTowers": {"type": "CaloTowerProducer", "hits": "hits"},
        "jets": {"type": "TowerJetProducer", "towers": "rawTowers", "radius": 0.4},
        "met": {"type": "MissingEtProducer", "towers": "rawTowers"},
        "htFilter": {"type": "HTFilter", "jets": "jets", "min_ht": 300.0},
        "metFilter": {"type": "MinimumFilter", "value": "met", "minimum": 60.0},
        "output": {"type": "RootOutput", "select_events": ["HLT_HT", "HLT_MET"],
                   "products": ["jets", "met"], "file": OUTPUT_FILE},
    },
    "paths": {"HLT_HT": ["htFilter"], "HLT_MET": ["metFilter"]},
    "endpaths": {"out": ["output"]},
}


def workflow(tmp_path: Path, name: str, edit=None) -> str:
    """Write BASE (changed by ``edit(raw)``) as ``tmp_path/name``; return the name as the user
    would type it (the CLI runs in tmp_path)."""
    raw = copy.deepcopy(BASE)
    if edit is not None:
        edit(raw)
    (tmp_path / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return name


def recorun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "recorun.framework.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


def assert_config_error(run: subprocess.CompletedProcess, tmp_path: Path, file: str,
                        *fragments: str) -> str:
    """Exit 2, one clean message naming ``file`` and containing every fragment, no event."""
    err = run.stderr
    assert run.returncode == 2, f"exit {run.returncode}\nstderr:\n{err}\nstdout:\n{run.stdout}"
    assert "Traceback" not in err, err
    assert f"recorun: configuration error: {file}:" in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in stderr:\n{err}"
    assert_no_event_processed(run, tmp_path)
    return err


def assert_no_event_processed(run: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert run.stdout == "", run.stdout
    assert "events read" not in run.stderr
    assert "TrigReport" not in run.stderr
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").iterdir())


# -- the base workflow is good: the errors below come from the one change each makes ----------

def test_base_workflow_runs(tmp_path):
    name = workflow(tmp_path, "good.yaml")
    run = recorun(tmp_path, name, "-q")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / OUTPUT_FILE).exists()


# -- module types ---------------------------------------------------------------------------

def test_unknown_module_type_suggests_nearest_registered(tmp_path):
    name = workflow(tmp_path, "unknown_type.yaml",
                    lambda raw: raw["modules"]["htFilter"].update(type="HTFiltr"))
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name,
                              "module 'htFilter'", "unknown module type 'HTFiltr'",
                              "did you mean 'HTFilter'")
    assert "recorun.modules" in err          # where registered types come from


def test_unknown_source_type_suggests_nearest(tmp_path):
    name = workflow(tmp_path, "unknown_source.yaml",
                    lambda raw: raw["source"].update(type="EmptySorce"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name,
                        "unknown source type 'EmptySorce'", "did you mean 'EmptySource'")


def test_dotted_type_whose_module_does_not_exist(tmp_path):
    name = workflow(tmp_path, "dotted_missing.yaml", lambda raw: raw["modules"]["jets"].update(
        type="myanalysis.jetalgos:AntiKtProducer"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'jets'",
                        "cannot import 'myanalysis.jetalgos'",
                        "myanalysis.jetalgos:AntiKtProducer", "No module named 'myanalysis'")


def test_dotted_type_naming_a_missing_class(tmp_path):
    (tmp_path / "jetalgos.py").write_text(
        "from recorun.modules.calo_towers import TowerJetProducer\n\n\n"
        "class ConeJetProducer(TowerJetProducer):\n    pass\n")
    name = workflow(tmp_path, "dotted_noclass.yaml", lambda raw: raw["modules"]["jets"].update(
        type="jetalgos:AntiKtProducer"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'jets'",
                        "'jetalgos' has no 'AntiKtProducer'")


def test_dotted_type_that_is_not_a_module_class(tmp_path):
    name = workflow(tmp_path, "dotted_notmodule.yaml", lambda raw: raw["modules"]["jets"].update(
        type="numpy:ndarray"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'jets'",
                        "'numpy:ndarray' is not a Module subclass")


@pytest.mark.parametrize("source_text, expected", [
    ("import numpy as np\n\n\nclass AntiKtProducer(:\n    pass\n", "SyntaxError"),
    ("import numpy as np\n\nRADIUS = np.float64(undefined_radius)\n", "NameError"),
], ids=["syntax-error", "error-at-import"])
def test_dotted_type_whose_module_fails_to_import(tmp_path, source_text, expected):
    """A helper module that exists but cannot be imported is a configuration error too (the
    YAML names a type that does not load), not a crash with a traceback."""
    (tmp_path / "jetalgos_broken.py").write_text(source_text)
    name = workflow(tmp_path, "dotted_broken.yaml", lambda raw: raw["modules"]["jets"].update(
        type="jetalgos_broken:AntiKtProducer"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'jets'",
                        "jetalgos_broken", expected)


# -- parameters -------------------------------------------------------------------------------

def test_unknown_parameter_suggests_nearest(tmp_path):
    def edit(raw):
        del raw["modules"]["htFilter"]["min_ht"]
        raw["modules"]["htFilter"]["min_htt"] = 300.0
    name = workflow(tmp_path, "unknown_param.yaml", edit)
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'htFilter'",
                        "parameter 'min_htt'", "unknown parameter 'min_htt' for HTFilter",
                        "did you mean 'min_ht'")


def test_unknown_source_parameter(tmp_path):
    def edit(raw):
        raw["source"]["events"] = raw["source"].pop("count")
    name = workflow(tmp_path, "unknown_source_param.yaml", edit)
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "parameter 'events'",
                        "unknown parameter 'events' for EmptySource")


def test_missing_required_parameter(tmp_path):
    name = workflow(tmp_path, "missing_param.yaml",
                    lambda raw: raw["modules"]["metFilter"].pop("minimum"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'metFilter'",
                        "parameter 'minimum'", "missing required parameter 'minimum'",
                        "MinimumFilter")


def test_missing_required_input_tag(tmp_path):
    name = workflow(tmp_path, "missing_tag.yaml",
                    lambda raw: raw["modules"]["metFilter"].pop("value"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'metFilter'",
                        "parameter 'value'", "missing required parameter 'value'")


@pytest.mark.parametrize("label, param, value, fragments", [
    ("htFilter", "min_ht", "high", ["expected float", "str 'high'"]),
    ("htFilter", "min_ht", True, ["expected float", "bool"]),
    ("hits", "seed", 2021.5, ["expected int", "float"]),
    ("output", "products", "jets", ["expected a list", "str 'jets'"]),
    ("jets", "towers", 3, ["expected str", "int"]),
], ids=["str-for-float", "bool-for-float", "float-for-int", "str-for-list", "int-for-tag"])
def test_wrong_parameter_type(tmp_path, label, param, value, fragments):
    name = workflow(tmp_path, "wrong_type.yaml",
                    lambda raw: raw["modules"][label].update({param: value}))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, f"module '{label}'",
                        f"parameter '{param}'", *fragments)


def test_int_is_accepted_for_a_float_parameter(tmp_path):
    def edit(raw):
        raw["modules"]["htFilter"]["min_ht"] = 300          # int for float
        raw["modules"]["jets"]["radius"] = 1                # int for float
    name = workflow(tmp_path, "int_for_float.yaml", edit)
    assert "min_ht: 300\n" in (tmp_path / name).read_text()
    run = recorun(tmp_path, name, "-q")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / OUTPUT_FILE).exists()


# -- products and the graph ---------------------------------------------------------------------

def test_consumed_product_nobody_produces(tmp_path):
    name = workflow(tmp_path, "missing_product.yaml",
                    lambda raw: raw["modules"]["jets"].update(towers="caloTowers"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'jets'",
                        "parameter 'towers'", "'caloTowers'", "no module")


def test_consumed_instance_the_producer_does_not_make(tmp_path):
    name = workflow(tmp_path, "missing_instance.yaml",
                    lambda raw: raw["modules"]["output"].update(products=["jets", "hits:truht"]))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'output'",
                        "parameter 'products'", "'hits:truht'", "did you mean 'hits:truth'")


def test_reading_from_a_filter_is_an_error(tmp_path):
    """The graph's own message for this case is "reads 'htFilter' from 'htFilter', a filter;
    only producers can be read from"."""
    name = workflow(tmp_path, "read_filter.yaml",
                    lambda raw: raw["modules"]["metFilter"].update(value="htFilter"))
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'metFilter'",
                              "parameter 'value'", "'htFilter'", "a filter", "only producers")
    assert "produces only nothing" not in err, err


def test_dependency_cycle_is_printed(tmp_path):
    def edit(raw):
        # towers are calibrated from themselves: rawTowers -> calibrated -> rawTowers
        raw["modules"]["rawTowers"]["hits"] = "calibrated"
        raw["modules"]["calibrated"] = {"type": "ThreadPoolEnergyCalibrator",
                                        "towers": "rawTowers"}
    name = workflow(tmp_path, "cycle.yaml", edit)
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name, "dependency cycle")
    assert re.search(r"rawTowers -> calibrated -> rawTowers|calibrated -> rawTowers -> calibrated",
                     err), err


def test_three_module_cycle_is_printed(tmp_path):
    def edit(raw):
        raw["modules"]["rawTowers"]["hits"] = "smoothed"
        raw["modules"]["calibrated"] = {"type": "ThreadPoolEnergyCalibrator",
                                        "towers": "rawTowers"}
        raw["modules"]["smoothed"] = {"type": "ThreadPoolEnergyCalibrator",
                                      "towers": "calibrated"}
    name = workflow(tmp_path, "cycle3.yaml", edit)
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name, "dependency cycle")
    cycle = re.search(r"dependency cycle: (\S+(?: -> \S+)+)", err)
    assert cycle, err
    labels = cycle.group(1).split(" -> ")
    assert labels[0] == labels[-1] and len(labels) == 4, labels
    rotations = [["rawTowers", "calibrated", "smoothed"][i:] + ["rawTowers", "calibrated",
                                                               "smoothed"][:i] for i in range(3)]
    assert labels[:-1] in rotations, labels


# -- paths --------------------------------------------------------------------------------------

def test_path_naming_an_unknown_label(tmp_path):
    name = workflow(tmp_path, "path_label.yaml",
                    lambda raw: raw["paths"].update(HLT_HT=["htFiltr"]))
    assert_config_error(recorun(tmp_path, name), tmp_path, name,
                        "path 'HLT_HT' names unknown module label 'htFiltr'",
                        "did you mean 'htFilter'")


def test_end_path_naming_an_unknown_label(tmp_path):
    name = workflow(tmp_path, "endpath_label.yaml",
                    lambda raw: raw["endpaths"].update(out=["outptu"]))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "'out'",
                        "unknown module label 'outptu'", "did you mean 'output'")


def test_select_events_naming_an_unknown_path(tmp_path):
    name = workflow(tmp_path, "select_events.yaml", lambda raw: raw["modules"]["output"].update(
        select_events=["HLT_HT", "HLT_MET60"]))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'output'",
                        "parameter 'select_events'", "unknown path 'HLT_MET60'",
                        "HLT_HT, HLT_MET")


def test_output_module_on_a_trigger_path(tmp_path):
    def edit(raw):
        raw["paths"]["HLT_HT"] = ["htFilter", "output"]
        raw["modules"]["output"].pop("select_events")
        del raw["endpaths"]
    name = workflow(tmp_path, "output_on_path.yaml", edit)
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'output'",
                        "end path")


def test_output_module_on_no_path(tmp_path):
    name = workflow(tmp_path, "output_no_path.yaml", lambda raw: raw.pop("endpaths"))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "module 'output'", "end path")


# -- the file and the process options -----------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    def edit(raw):
        raw["endpath"] = raw.pop("endpaths")
    name = workflow(tmp_path, "top_key.yaml", edit)
    assert_config_error(recorun(tmp_path, name), tmp_path, name,
                        "unknown top-level key 'endpath'", "did you mean 'endpaths'")


def test_unknown_process_option(tmp_path):
    name = workflow(tmp_path, "process_option.yaml",
                    lambda raw: raw["process"].update(thread=2))
    assert_config_error(recorun(tmp_path, name), tmp_path, name,
                        "unknown process option 'thread'", "did you mean 'threads'")


def test_process_option_of_the_wrong_type_says_what_it_expects(tmp_path):
    name = workflow(tmp_path, "process_type.yaml",
                    lambda raw: raw["process"].update(threads="two"))
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name, "process.threads",
                              "'two'")
    # like module parameters ("expected float, got str 'abc'"), say which type is expected
    assert "int" in err, err


def test_invalid_yaml_syntax(tmp_path):
    name = "bad_syntax.yaml"
    (tmp_path / name).write_text(
        "source: {type: EmptySource, count: 20}\n"
        "modules:\n"
        "  hits: {type: ToyCaloHitProducer, seed: 7\n"     # unclosed flow mapping
        "  rawTowers: {type: CaloTowerProducer, hits: hits}\n")
    err = assert_config_error(recorun(tmp_path, name), tmp_path, name, "not valid YAML",
                              "line 3")
    # the location lines of the YAML message should name the file, not a placeholder
    assert "<unicode string>" not in err, err


def test_invalid_yaml_indentation(tmp_path):
    name = "bad_indent.yaml"
    (tmp_path / name).write_text("source:\n  type: EmptySource\n count: 20\n")
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "not valid YAML", "line 3")


def test_workflow_that_is_not_a_mapping(tmp_path):
    name = "a_list.yaml"
    (tmp_path / name).write_text("- source\n- modules\n")
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "mapping")


def test_missing_workflow_file(tmp_path):
    run = recorun(tmp_path, "no_such_workflow.yaml")
    assert_config_error(run, tmp_path, "no_such_workflow.yaml", "cannot read workflow",
                        "No such file")


def test_synchronous_with_two_threads_in_yaml(tmp_path):
    name = workflow(tmp_path, "sync.yaml",
                    lambda raw: raw["process"].update(synchronous=True, threads=2))
    assert_config_error(recorun(tmp_path, name), tmp_path, name, "process.synchronous",
                        "threads: 1", "got 2")


def test_synchronous_with_two_threads_from_the_command_line(tmp_path):
    name = workflow(tmp_path, "sync_cli.yaml")
    run = recorun(tmp_path, name, "-j", "2", "--set", "process.synchronous=true")
    assert_config_error(run, tmp_path, name, "process.synchronous", "got 2")


@pytest.mark.parametrize("option, fragment", [
    (["-j", "0"], "process.threads"),
    (["-s", "0"], "process.streams"),
    (["-n", "-1"], "process.max_events"),
    (["--set", "process.on_error=ignore"], "'stop' or 'skip_event'"),
], ids=["zero-threads", "zero-streams", "negative-max-events", "bad-on-error"])
def test_bad_process_values(tmp_path, option, fragment):
    name = workflow(tmp_path, "process_values.yaml")
    assert_config_error(recorun(tmp_path, name, *option), tmp_path, name, fragment)


# -- --set --------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", ["modules.htFilter.min_ht", "=300", "modules..min_ht=300",
                                  "modules.htFilter.=300"],
                         ids=["no-equals", "no-key", "empty-part", "trailing-dot"])
def test_set_with_a_malformed_item(tmp_path, item):
    name = workflow(tmp_path, "set_malformed.yaml")
    assert_config_error(recorun(tmp_path, name, "--set", item), tmp_path, name,
                        f"--set '{item}'", "dotted.key=value")


def test_set_through_a_value_that_is_not_a_mapping(tmp_path):
    name = workflow(tmp_path, "set_scalar.yaml")
    item = "modules.htFilter.min_ht.value=300"
    assert_config_error(recorun(tmp_path, name, "--set", item), tmp_path, name,
                        f"--set '{item}'", "'modules.htFilter.min_ht' is not a mapping")


def test_set_value_of_the_wrong_type(tmp_path):
    name = workflow(tmp_path, "set_type.yaml")
    assert_config_error(recorun(tmp_path, name, "--set", "modules.htFilter.min_ht=high"),
                        tmp_path, name, "module 'htFilter'", "parameter 'min_ht'",
                        "expected float")


def test_set_naming_a_mistyped_module_label(tmp_path):
    """``--set modules.htFiltr.min_ht=350`` (label mistyped) must not be read as a new module
    'htFiltr' "with no type": the error should point at the --set item and suggest the label."""
    name = workflow(tmp_path, "set_label.yaml")
    err = assert_config_error(recorun(tmp_path, name, "--set", "modules.htFiltr.min_ht=350"),
                              tmp_path, name, "htFiltr")
    assert "--set" in err, err
    assert "did you mean 'htFilter'" in err, err
