"""HLT prescales per luminosity block: the prescale table's checks, PrescaleService's column per
lumi and HLTPrescaler's decisions (docs/PRESCALES.md).

The jobs run on an EmptySource of 2 runs of 3 lumis of 10 events (events 1..60); the table's
column changes at run 1 lumi 2 and at run 2 lumi 1.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from recorun import Analyzer, Concurrency, ConfigError, Filter, Param, run_workflow
from recorun.modules.prescale import HLTPrescaler, PrescaleService, PrescaleTable

REPO = Path(__file__).resolve().parents[1]
RECORUN = [sys.executable, "-m", "recorun.framework.cli"]
TWO_RUNS = {"type": "EmptySource", "count": 60, "events_per_lumi": 10, "lumis_per_run": 3}
LUMIS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]

TABLE = """\
columns: [2e34, 1e34, emergency]
default_column: 2e34
prescales:
  HLT_MinBias: [5, 2, 0]
  HLT_HT600:   [1, 3, 10]
lumis:
  - {run: 1, lumi: 2, column: 1e34}
  - {run: 2, lumi: 1, column: emergency}
"""
#: the column in force in each lumi of TWO_RUNS with TABLE
COLUMNS = ["2e34", "1e34", "1e34", "emergency", "emergency", "emergency"]
PRESCALES = {"2e34": {"HLT_MinBias": 5, "HLT_HT600": 1},
             "1e34": {"HLT_MinBias": 2, "HLT_HT600": 3},
             "emergency": {"HLT_MinBias": 0, "HLT_HT600": 10}}


class Shared(list):
    """A list the test and its modules share (run_workflow deep-copies the workflow)."""

    def __deepcopy__(self, memo):
        return self


class Accepted(Analyzer):
    """Put after a prescaler on its path: writes (path, event number) into ``out``."""

    concurrency = Concurrency.SHARED
    out = Param(list, None)
    path = Param(str, "")

    def begin_job(self):
        self.lock = threading.Lock()

    def analyze(self, event):
        with self.lock:
            self.out.append((self.path, event.id.event))


class Jitter(Filter):
    """Passes every event after a pause that depends on its number, so that at several
    streams the events reach the prescalers out of order."""

    concurrency = Concurrency.SHARED

    def filter(self, event):
        time.sleep((event.id.event * 7 % 5) * 0.002)
        return True


@pytest.fixture
def table(tmp_path) -> Path:
    file = tmp_path / "prescales.yaml"
    file.write_text(TABLE)
    return file


def prescale_workflow(table: Path, out: list | None = None, *, threads: int = 1,
                      streams: int = 1, column: str | None = None, extra_paths=(),
                      jitter: bool = False, **prescaler) -> dict:
    """Two trigger paths, each a prescaler (its path found by itself) and a recorder; with
    ``jitter``, a Jitter filter first."""
    service = {"type": "PrescaleService", "table": str(table)}
    if column is not None:
        service["column"] = column
    modules, paths = {}, {}
    for path in ("HLT_MinBias", "HLT_HT600", *extra_paths):
        modules[f"pre_{path}"] = {"type": "HLTPrescaler", **prescaler}
        modules[f"rec_{path}"] = {"type": Accepted, "out": Shared() if out is None else out,
                                  "path": path}
        paths[path] = [*(["jitter"] if jitter else []), f"pre_{path}", f"rec_{path}"]
    if jitter:
        modules["jitter"] = {"type": Jitter}
    return {"process": {"threads": threads, "streams": streams},
            "source": dict(TWO_RUNS), "services": {"prescales": service},
            "modules": modules, "paths": paths}


def expected_events(prescale: int, first: int, n: int = 10, offset: int = 0) -> list[int]:
    """The event numbers of a lumi of ``n`` events from event ``first`` that prescale N accepts:
    those whose number plus ``offset`` is a multiple of N."""
    if prescale == 0:
        return []
    return [e for e in range(first, first + n) if (e + offset) % prescale == 0]


# -- the table's checks ----------------------------------------------------------------------
BAD_TABLES = [
    ("unknown top-level key",
     "columns: [a, b]\nprescales: {P: [1, 1]}\ncolums: [a]\n", "colums", "unknown key"),
    ("columns missing", "prescales: {P: [1]}\n", "columns", "missing"),
    ("a column YAML reads as a boolean", "columns: [on, off]\nprescales: {}\n",
     "columns[0]", "quote the name"),
    ("a column named twice", "columns: [a, a]\nprescales: {}\n", "columns[1]", "named twice"),
    ("a row with too few columns",
     "columns: [a, b, c]\nprescales:\n  HLT_MinBias: [100, 50]\n",
     "prescales.HLT_MinBias", "has 2 prescales, expected 3"),
    ("a row with too many columns",
     "columns: [a]\nprescales:\n  HLT_HT600: [1, 2]\n", "prescales.HLT_HT600", "expected 1"),
    ("a negative prescale",
     "columns: [a, b]\nprescales:\n  HLT_HT600: [1, -2]\n", "prescales.HLT_HT600",
     "negative"),
    ("a prescale that is not an integer",
     "columns: [a, b]\nprescales:\n  HLT_HT600: [1, 2.5]\n", "prescales.HLT_HT600",
     "not an integer"),
    ("an unknown default column",
     "columns: [a, b]\ndefault_column: c\nprescales: {}\n", "default_column", "unknown column"),
    ("an unknown column in lumis",
     "columns: [a, b]\nprescales: {}\nlumis:\n  - {run: 1, lumi: 2, column: b}\n"
     "  - {run: 1, lumi: 3, column: emergency}\n", "lumis[1].column", "unknown column"),
    ("an unknown key in a lumis entry",
     "columns: [a, b]\nprescales: {}\nlumis:\n  - {run: 1, lumy: 2, column: b}\n",
     "lumis[0].lumy", "unknown key"),
    ("a lumis entry without its run",
     "columns: [a, b]\nprescales: {}\nlumis:\n  - {lumi: 2, column: b}\n",
     "lumis[0].run", "missing"),
    ("lumis going back",
     "columns: [a, b]\nprescales: {}\nlumis:\n  - {run: 2, lumi: 1, column: b}\n"
     "  - {run: 1, lumi: 5, column: a}\n", "lumis[1]", "not in increasing order"),
    ("the same lumi twice",
     "columns: [a, b]\nprescales: {}\nlumis:\n  - {run: 1, lumi: 3, column: b}\n"
     "  - {run: 1, lumi: 3, column: a}\n", "lumis[1]", "not in increasing order"),
]


@pytest.mark.parametrize("text, key, phrase", [c[1:] for c in BAD_TABLES],
                         ids=[c[0] for c in BAD_TABLES])
def test_a_wrong_table_is_a_config_error_naming_the_file_and_the_key(tmp_path, text, key,
                                                                      phrase):
    file = tmp_path / "bad_prescales.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        PrescaleService(table=str(file))
    message = str(caught.value)
    assert str(file) in message
    assert f"key '{key}'" in message
    assert phrase in message


@pytest.mark.parametrize("text, phrase", [
    (None, "not found"),
    ("columns: [a\n", "not a valid YAML"),
    ("- just\n- a list\n", "is a mapping"),
])
def test_an_unreadable_table_is_a_config_error_naming_the_file(tmp_path, text, phrase):
    file = tmp_path / "prescales.yaml"
    if text is not None:
        file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        PrescaleService(table=str(file))
    assert str(file) in str(caught.value) and phrase in str(caught.value)


def test_a_wrong_table_stops_the_workflow_before_its_first_event(tmp_path):
    file = tmp_path / "prescales.yaml"
    file.write_text("columns: [a]\nprescales:\n  HLT_MinBias: [-1]\n")
    with pytest.raises(ConfigError, match="prescales.HLT_MinBias"):
        run_workflow(prescale_workflow(file))


def test_an_unknown_column_override_is_a_config_error(table):
    with pytest.raises(ConfigError) as caught:
        PrescaleService(table=str(table), column="5e34")
    message = str(caught.value)
    assert "parameter 'column'" in message and "5e34" in message
    assert "2e34, 1e34, emergency" in message


def test_the_table_gives_the_column_in_force_and_prescale_1_for_unlisted_paths(table):
    parsed = PrescaleTable.load(table)
    assert parsed.columns == ["2e34", "1e34", "emergency"]
    assert [parsed.column_for(r, l) for r, l in LUMIS] == COLUMNS
    assert parsed.column_for(1, 1, default="emergency") == "emergency"
    assert parsed.column_for(7, 1, default="emergency") == "emergency"   # last entry holds
    assert parsed.prescale("HLT_MinBias", "1e34") == 2
    assert parsed.prescale("HLT_Unlisted", "emergency") == 1


def test_default_column_and_lumis_are_optional(tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text("columns: [only]\nprescales: {HLT_X: [4]}\n")
    parsed = PrescaleTable.load(file)
    assert parsed.default_column == "only" and parsed.switches == []


# -- jobs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads, streams", [(1, 1), (4, 4)])
def test_accepted_events_per_lumi_follow_the_column_in_force(table, threads, streams):
    out = Shared()
    result = run_workflow(prescale_workflow(table, out, threads=threads, streams=streams,
                                            jitter=True))
    assert result.exit_code == 0
    lumis = result.report["luminosity_blocks"]
    assert [(x["run"], x["luminosity_block"]) for x in lumis] == LUMIS
    for i, (entry, column) in enumerate(zip(lumis, COLUMNS)):
        assert entry["events"] == 10 and entry["failed"] == 0
        for path, prescale in PRESCALES[column].items():
            # one in N of the lumi's 10 consecutive event numbers; none with prescale 0
            expected = len(expected_events(prescale, 1 + 10 * i))
            assert expected in ((10 // prescale, -(-10 // prescale)) if prescale else (0,))
            assert entry["accepted"].get(path, 0) == expected, (entry, path)
    # the same events whatever the threads and streams: numbers that are multiples of N
    expected = sorted((path, e) for i, column in enumerate(COLUMNS)
                      for path, prescale in PRESCALES[column].items()
                      for e in expected_events(prescale, 1 + 10 * i))
    assert sorted(out) == expected


def test_prescale_0_turns_the_path_off(tmp_path):
    file = tmp_path / "off.yaml"
    file.write_text("columns: [open, closed]\ndefault_column: closed\nprescales:\n"
                    "  HLT_MinBias: [1, 0]\n  HLT_HT600: [1, 0]\n")
    result = run_workflow(prescale_workflow(file, threads=2, streams=2))
    assert result.exit_code == 0
    assert result.report["paths"]["HLT_MinBias"]["passed"] == 0
    assert result.report["paths"]["HLT_MinBias"]["visited"] == 60
    assert all(x["accepted"] == {} for x in result.report["luminosity_blocks"])
    assert result.report["events"]["rejected"] == 60


def test_the_service_report_names_the_column_of_each_lumi(table):
    result = run_workflow(prescale_workflow(table, threads=2, streams=2))
    report = result.report["services"]["prescales"]
    assert report["columns"] == ["2e34", "1e34", "emergency"]
    assert report["default_column"] == "2e34"
    assert report["lumis"] == [{"run": r, "luminosity_block": l, "column": c}
                               for (r, l), c in zip(LUMIS, COLUMNS)]
    assert report["prescales"]["HLT_MinBias"] == {"2e34": 5, "1e34": 2, "emergency": 0}
    details = result.report["modules"]["pre_HLT_MinBias"]["details"]
    details = details[0] if isinstance(details, list) else details
    assert details["path"] == "HLT_MinBias"
    assert [(x["column"], x["prescale"], x["seen"], x["accepted"]) for x in details["lumis"]] \
        == [(c, PRESCALES[c]["HLT_MinBias"], 10, 10 // PRESCALES[c]["HLT_MinBias"]
             if PRESCALES[c]["HLT_MinBias"] else 0) for c in COLUMNS]


def test_the_column_parameter_replaces_the_default_column(table):
    result = run_workflow(prescale_workflow(table, column="emergency"))
    report = result.report["services"]["prescales"]
    assert [x["column"] for x in report["lumis"]] == ["emergency", *COLUMNS[1:]]
    assert result.report["luminosity_blocks"][0]["accepted"] == {"HLT_HT600": 1}


def test_offset_shifts_the_accepted_events(table):
    out = Shared()
    result = run_workflow(prescale_workflow(table, out, threads=2, streams=2, offset=1))
    assert result.exit_code == 0
    lumi_1_2 = sorted(e for path, e in out if path == "HLT_HT600" and 11 <= e <= 20)
    assert lumi_1_2 == expected_events(3, 11, offset=1) == [11, 14, 17, 20]   # ceil(10 / 3)
    assert result.report["luminosity_blocks"][1]["accepted"]["HLT_HT600"] == 4


def test_an_explicit_path_picks_the_table_row(table):
    workflow = prescale_workflow(table)
    workflow["modules"]["pre_HLT_HT600"]["path"] = "HLT_MinBias"   # the MinBias row applies
    result = run_workflow(workflow)
    assert [x["accepted"]["HLT_HT600"] for x in result.report["luminosity_blocks"][:3]] \
        == [2, 5, 5]


def test_a_path_missing_from_the_table_is_warned_about_and_prescaled_by_1(table, caplog):
    with caplog.at_level(logging.WARNING):
        result = run_workflow(prescale_workflow(table, extra_paths=("HLT_Other",)))
    assert result.exit_code == 0
    assert "module 'pre_HLT_Other' (HLTPrescaler): path 'HLT_Other' is not in the " \
           "prescale table" in caplog.text
    assert all(x["accepted"]["HLT_Other"] == 10 for x in result.report["luminosity_blocks"])


def test_a_prescaler_on_two_paths_must_name_its_path(table):
    workflow = prescale_workflow(table)
    workflow["paths"]["HLT_HT600"].insert(0, "pre_HLT_MinBias")
    with pytest.raises(ConfigError) as info:          # when the workflow is built
        run_workflow(workflow)
    assert info.value.exit_code == 2
    assert "module 'pre_HLT_MinBias'" in str(info.value)
    assert "parameter 'path'" in str(info.value)
    assert "HLT_MinBias, HLT_HT600" in str(info.value)


def test_a_table_row_naming_no_path_is_warned_about_with_the_nearest_path(table, caplog):
    workflow = prescale_workflow(table)
    workflow["paths"]["HLT_MinBiass"] = workflow["paths"].pop("HLT_MinBias")
    workflow["modules"]["pre_HLT_MinBias"]["path"] = "HLT_MinBias"
    with caplog.at_level(logging.WARNING):
        run_workflow(workflow)
    assert ("has a row for 'HLT_MinBias', which is no trigger path of the workflow (did you "
            "mean 'HLT_MinBiass'?)") in caplog.text


@pytest.mark.subprocess
def test_a_prescaler_without_a_prescale_service_exits_with_code_2(tmp_path):
    file = tmp_path / "w.yaml"
    file.write_text(json.dumps({
        "source": TWO_RUNS,
        "modules": {"minBiasPrescale": {"type": "HLTPrescaler"}},
        "paths": {"HLT_MinBias": ["minBiasPrescale"]}}))
    for check in ([], ["--check"]):                 # --check finds it too
        done = subprocess.run([*RECORUN, str(file), "-q", *check], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"{file}: module 'minBiasPrescale'" in done.stderr
        assert "needs a PrescaleService" in done.stderr


# -- the HLT workflow's table ------------------------------------------------------------------
def test_the_hlt_table_prescales_minbias_as_the_hlt_does_today():
    """workflows/prescales_hlt.yaml: every HLT path 1 but HLT_MinBias 10 in its default
    column, which accepts the events PrescaleFilter (prescale 10) accepts on the sample."""
    file = REPO / "workflows" / "prescales_hlt.yaml"
    parsed = PrescaleTable.load(file)
    assert len(parsed.columns) == 2
    default = parsed.default_column
    assert {p: parsed.prescale(p, default) for p in parsed.prescales} == {
        "HLT_HT600": 1, "HLT_MET400": 1, "HLT_AK8Jet450": 1, "HLT_Ele150": 1,
        "HLT_MinBias": 10}
    out = Shared()
    result = run_workflow({
        "process": {"threads": 2, "streams": 2},
        "source": {"type": "RootSource",
                   "files": [str(REPO / "data" / "samples" / "hlt_sample.root")]},
        "services": {"prescales": {"type": "PrescaleService", "table": str(file)}},
        "modules": {"new": {"type": HLTPrescaler},
                    "old": {"type": "PrescaleFilter", "prescale": 10},
                    "recNew": {"type": Accepted, "out": out, "path": "HLT_MinBias"},
                    "recOld": {"type": Accepted, "out": out, "path": "old"}},
        "paths": {"HLT_MinBias": ["new", "recNew"], "old": ["old", "recOld"]}})
    assert result.exit_code == 0
    new = sorted(e for p, e in out if p == "HLT_MinBias")
    old = sorted(e for p, e in out if p == "old")
    assert new == old and len(new) == 10
