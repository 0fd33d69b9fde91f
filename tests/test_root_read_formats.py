"""``RootSource`` on ROOT files as physicists have them: strings, collections in the NanoAOD
(``nX``/``NX``) and Delphes (``X.a``) styles, the same data as a TTree and as an RNTuple giving
the same products, fixed-size branches (``product_shapes``), checks of ``skip`` and
``step_size`` before the first event, and RNTuples of the pre-release format.

Files are either public (scikit-hep-testdata) or written here with plain uproot. Reference
values come from plain uproot's ``arrays()`` on the same files.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import skhep_testdata
import uproot
import yaml
from recorun.data.layout import write_shapes, write_string_lists
from recorun import Analyzer, Collection, Concurrency, ConfigError, InputError, Param
from recorun.modules.root_source import RootSource

from collect import Collect

HZZ = skhep_testdata.data_path("uproot-HZZ.root")                       # tree 'events', 2421
DELPHES = skhep_testdata.data_path("uproot-issue513.root")              # Delphes, 10 events
FULLSPLIT = skhep_testdata.data_path("uproot-small-evnt-tree-fullsplit.root")  # strings
OLD_RNTUPLE = skhep_testdata.data_path("uproot-ntpl001_staff.root")     # pre-release RNTuple
HZZ_EVENTS = 2421


@pytest.fixture
def read_job(new_recorder, run_guarded):
    """``read_job(source, products, **process)``: the events (in index order) and the report
    of a job that collects ``products`` from a RootSource."""
    def read(source: dict, products: list[str], **process):
        recorder = new_recorder()
        process.setdefault("report_every_s", 0)
        result = run_guarded({"process": process, "source": {"type": "RootSource", **source},
                              "modules": {"collect": {"type": Collect, "products": products,
                                                      "recorder": recorder}},
                              "paths": {"p": ["collect"]}})
        assert result.exit_code == 0, result.error
        events = sorted(recorder.entries, key=lambda e: e[0])
        assert [e[0] for e in events] == list(range(len(events)))
        return events, result.report
    return read


def per_event(jagged) -> list[np.ndarray]:
    """A ``var * T`` awkward array as a list of per-event NumPy arrays."""
    return [ak.to_numpy(x) for x in jagged]


# -- 1. strings ---------------------------------------------------------------------------------

def test_string_branches_of_a_public_file_are_python_strings(read_job):
    """``TString`` (Str, Beg), ``std::string`` (StdStr): a ``str`` per event;
    ``std::vector<std::string>`` (StlVecStr): a list of ``str``."""
    names = ["Str", "Beg", "StdStr", "StlVecStr"]
    events, report = read_job({"files": FULLSPLIT, "step_size": 30},
                              [f"source:{n}" for n in names])
    ref = uproot.open(FULLSPLIT)["tree"].arrays(names).tolist()
    assert len(events) == len(ref) == 100
    for (_, _, got), expected in zip(events, ref):
        for name in names[:3]:
            assert type(got[f"source:{name}"]) is str
            assert got[f"source:{name}"] == expected[name]
        strings = got["source:StlVecStr"]
        assert type(strings) is list and all(type(s) is str for s in strings)
        assert strings == expected["StlVecStr"]
    assert sorted(report["source"]["branches"]) == sorted(names)
    assert events[2][2]["source:StlVecStr"] == ["vec-002", "vec-002"]


STRINGS = ["", "muon", "électron", "a longer label with spaces"]
STRING_LISTS = [["HLT_Mu50"], [], ["HLT_Ele32", "HLT_PFHT1050", "ü"], ["x"]]


def test_strings_written_by_plain_uproot_in_ttree_and_rntuple(tmp_path, read_job):
    """``char*`` in a TTree; ``std::string`` and ``std::vector<std::string>`` in an RNTuple;
    a TTree string branch that recorun lists as JSON-encoded string lists."""
    n = len(STRINGS)
    with uproot.recreate(tmp_path / "t.root") as f:
        f.mktree("Events", {"label": ak.Array(STRINGS).type.content,
                            "paths": ak.Array(STRINGS).type.content})
        f["Events"].extend({"label": ak.Array(STRINGS),
                            "paths": ak.Array([json.dumps(s) for s in STRING_LISTS])})
        write_string_lists(f, ["paths"])
    with uproot.recreate(tmp_path / "r.root") as f:
        f.mkrntuple("Events", {"label": ak.Array(STRINGS), "paths": ak.Array(STRING_LISTS)})
    for name in ("t.root", "r.root"):
        events, _ = read_job({"files": str(tmp_path / name)},
                             ["source:label", "source:paths"])
        assert len(events) == n
        for k, (_, _, got) in enumerate(events):
            assert type(got["source:label"]) is str and got["source:label"] == STRINGS[k], name
            assert type(got["source:paths"]) is list and got["source:paths"] == STRING_LISTS[k]


# -- 2. collections -----------------------------------------------------------------------------

def test_counter_named_N_makes_a_collection(read_job):
    """HZZ: ``NJet`` counts ``Jet_Px``, ``Jet_Py``...: ``source:Jet`` is a Collection of those
    fields; the member branches stay products of their own."""
    fields = ["Px", "Py", "Pz", "E", "btag", "ID"]
    events, report = read_job({"files": HZZ, "step_size": 500},
                              ["source:Jet", "source:Jet_Px", "source:NJet", "source:Muon"])
    ref = uproot.open(HZZ)["events"].arrays(["NJet", "NMuon", "Muon_Charge",
                                             *(f"Jet_{f}" for f in fields)])
    columns = {f: per_event(ref[f"Jet_{f}"]) for f in fields}
    charges = per_event(ref["Muon_Charge"])
    assert len(events) == HZZ_EVENTS
    for i, (_, _, got) in enumerate(events):
        jets = got["source:Jet"]
        assert isinstance(jets, Collection) and jets.fields == tuple(fields)
        assert len(jets) == got["source:NJet"] == ref["NJet"][i]
        for f in fields:
            assert jets[f].dtype == columns[f][i].dtype, f
            assert np.array_equal(jets[f], columns[f][i]), f
        assert np.array_equal(got["source:Jet_Px"], columns["Px"][i])
        assert len(got["source:Muon"]) == ref["NMuon"][i]
        assert np.array_equal(got["source:Muon"]["Charge"], charges[i])
    assert "Muon_Charge" in report["source"]["branches"]


def test_delphes_class_branches_make_collections(read_job):
    """Delphes ``Particle.PT``, ``Particle.Eta``...: ``source:Particle`` is a Collection of the
    numeric fields (no ``fUniqueID``/``fBits``, no TRef or TLorentzVector); ``Jet.FracPt[5]``
    is field ``FracPt`` of shape (n, 5); the count is ``len()`` (= ``Particle_size``)."""
    events, report = read_job({"files": DELPHES},
                              ["source:Particle", "source:Jet", "source:Particle_size",
                               "source:Particle.PT"])
    tree = uproot.open(DELPHES)["Delphes"]
    ref = tree.arrays(["Particle.PT", "Particle.PID", "Particle_size", "Jet.PT", "Jet.FracPt[5]",
                       "Jet_size"])
    assert len(events) == len(ref) == 10
    for i, (_, _, got) in enumerate(events):
        particles, jets = got["source:Particle"], got["source:Jet"]
        assert isinstance(particles, Collection) and isinstance(jets, Collection)
        assert len(particles) == got["source:Particle_size"] == ref["Particle_size"][i]
        assert {"PT", "Eta", "PID", "Charge"} <= set(particles.fields)
        assert not {"fUniqueID", "fBits"} & set(particles.fields)
        assert np.array_equal(particles["PT"], ak.to_numpy(ref["Particle.PT"][i]))
        assert particles["PID"].dtype == np.int32
        assert np.array_equal(got["source:Particle.PT"], particles["PT"])
        assert len(jets) == ref["Jet_size"][i]
        assert np.array_equal(jets["PT"], ak.to_numpy(ref["Jet.PT"][i]))
        frac = ak.to_numpy(ref["Jet.FracPt[5]"][i])
        assert jets["FracPt"].shape == (len(jets), 5) and np.array_equal(jets["FracPt"], frac)
        assert not {"Constituents", "SoftDroppedJet", "TrimmedP4"} & set(jets.fields)
        assert len(jets[jets["PT"] > 20]) == int(np.count_nonzero(jets["PT"] > 20))
    branches = report["source"]["branches"]
    assert "Particle.PT" in branches and "Jet.FracPt[5]" in branches
    assert "Particle.fUniqueID" not in branches and "Jet.Constituents" not in branches


def test_fixed_size_field_with_its_own_counter_joins_the_collection(tmp_path, read_job):
    """recorun's TTree layout of a collection field of fixed-size entries: ``Jet_p4`` of
    n*4 values per event, counted by ``nJet_p4``, its shape recorded: field ``p4`` (n, 4) of
    ``source:Jet``."""
    pt = ak.Array([[10.0, 20.0], [], [30.0]])
    p4 = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat_p4 = ak.unflatten(p4.reshape(-1), [8, 0, 4])
    with uproot.recreate(tmp_path / "jets.root") as f:
        f.mktree("Events", {"Jet": ak.zip({"pt": pt}).type.content,
                            "Jet_p4": flat_p4.type.content})
        f["Events"].extend({"Jet": ak.zip({"pt": pt}), "Jet_p4": flat_p4})
        write_shapes(f, {"Jet_p4": (4,)})
    assert {"nJet", "nJet_p4"} <= set(uproot.open(tmp_path / "jets.root")["Events"].keys())
    events, _ = read_job({"files": str(tmp_path / "jets.root")}, ["source:Jet"])
    starts = [0, 2, 2, 3]
    for i, (_, _, got) in enumerate(events):
        jets = got["source:Jet"]
        assert jets.fields == ("pt", "p4") and len(jets) == len(pt[i])
        assert np.array_equal(jets["p4"], p4[starts[i]:starts[i + 1]])


def test_rntuple_collection_with_a_fixed_size_subfield(tmp_path, read_job):
    """An RNTuple ``std::vector<X>`` whose ``v`` is ``std::array<double, 3>``: field ``v`` of
    shape (n, 3); also ``X_v`` (n, 3) and the count ``nX``."""
    v = np.arange(9, dtype=np.float64).reshape(3, 3)
    x = ak.zip({"a": ak.Array([[1.0], [], [2.0, 3.0]]),
                "v": ak.unflatten(ak.to_regular(ak.Array(v.tolist()), axis=1), [1, 0, 2])},
               depth_limit=2)
    with uproot.recreate(tmp_path / "x.root") as f:
        f.mkrntuple("Events", {"X": x})
    events, _ = read_job({"files": str(tmp_path / "x.root")},
                         ["source:X", "source:X_v", "source:nX"])
    starts = [0, 1, 1, 3]
    for i, (_, _, got) in enumerate(events):
        assert got["source:X"].fields == ("a", "v") and got["source:nX"] == len(x[i])
        assert got["source:X"]["v"].shape == (len(x[i]), 3)
        assert np.array_equal(got["source:X"]["v"], v[starts[i]:starts[i + 1]])
        assert np.array_equal(got["source:X_v"], v[starts[i]:starts[i + 1]])


# -- 3. the same data as a TTree and as an RNTuple ----------------------------------------------

def same_data(n: int = 257) -> dict:
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 4, n)
    total = int(counts.sum())
    muons = ak.zip({"pt": ak.unflatten(rng.random(total, dtype=np.float32) * 50, counts),
                    "eta": ak.unflatten(rng.normal(size=total).astype(np.float32), counts),
                    "charge": ak.unflatten(rng.choice([-1, 1], total).astype(np.int32),
                                           counts)})
    return {"run": np.full(n, 3, np.int32), "luminosityBlock": np.arange(n, dtype=np.int32) // 100,
            "event": np.arange(1000, 1000 + n, dtype=np.int64), "Muon": muons,
            "MET": rng.random(n, dtype=np.float32), "x5": rng.random((n, 5), dtype=np.float32),
            "label": ak.Array([f"event-{k}" for k in range(n)])}


@pytest.fixture(scope="module")
def same_data_files(tmp_path_factory) -> dict[str, Path]:
    """``same_data()`` written by plain uproot as a TTree (NanoAOD style) and as an RNTuple."""
    directory = tmp_path_factory.mktemp("same")
    data = same_data()
    with uproot.recreate(directory / "ttree.root") as f:
        f.mktree("Events", {k: v.type.content if isinstance(v, ak.Array) else
                            (v.dtype, v.shape[1:]) for k, v in data.items()})
        for start in range(0, len(data["event"]), 100):
            f["Events"].extend({k: v[start:start + 100] for k, v in data.items()})
    with uproot.recreate(directory / "rntuple.root") as f:
        f.mkrntuple("Events", data)
    assert isinstance(uproot.open(directory / "ttree.root")["Events"], uproot.TTree)
    assert not isinstance(uproot.open(directory / "rntuple.root")["Events"], uproot.TTree)
    return {"ttree": directory / "ttree.root", "rntuple": directory / "rntuple.root"}


SAME_PRODUCTS = ["Muon", "Muon_pt", "Muon_eta", "Muon_charge", "nMuon", "MET", "x5", "label",
                 "run", "event"]


def assert_same(a, b, where):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, Collection):
        assert a.fields == b.fields, where
        for field in a.fields:
            assert_same(a[field], b[field], (where, field))
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), (where, a.dtype, b.dtype)
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def test_ttree_and_rntuple_of_the_same_data_give_the_same_products(same_data_files, read_job):
    tags = [f"source:{name}" for name in SAME_PRODUCTS]
    got = {}
    for flavour, path in same_data_files.items():
        got[flavour], _ = read_job({"files": str(path), "step_size": 64}, tags,
                                   threads=2, streams=3)
    data = same_data()
    assert len(got["ttree"]) == len(got["rntuple"]) == len(data["event"])
    for i, (t, r) in enumerate(zip(got["ttree"], got["rntuple"])):
        assert t[1] == r[1] == (3, i // 100, 1000 + i)           # IDs from run, lumi, event
        for tag in tags:
            assert_same(t[2][tag], r[2][tag], (i, tag))
        products = t[2]
        assert products["source:nMuon"].dtype == np.int32
        assert products["source:nMuon"] == len(products["source:Muon"]) == len(data["Muon"][i])
        assert np.array_equal(products["source:Muon_pt"], ak.to_numpy(data["Muon"]["pt"][i]))
        assert products["source:x5"].shape == (5,)
        assert np.array_equal(products["source:x5"], data["x5"][i])
        assert products["source:label"] == f"event-{i}"
    for flavour, path in same_data_files.items():
        source = RootSource(files=str(path))
        assert set(SAME_PRODUCTS) <= {t.partition(":")[2] for t in source.product_tags()}
        assert source.product_shapes() == {"source:x5": (5,)}, flavour


def test_rntuple_reads_only_the_subfields_consumed(same_data_files, read_job):
    """``Muon_pt`` and ``nMuon`` of the RNTuple read the subfield ``Muon.pt`` only (its offsets
    give the count), as the TTree flavour reads ``Muon_pt`` and ``nMuon`` only."""
    reads = {}
    for flavour, path in same_data_files.items():
        events, report = read_job({"files": str(path)}, ["source:Muon_pt", "source:nMuon"])
        assert len(events) == 257
        reads[flavour] = sorted(report["source"]["branches"])
    assert reads["ttree"] == ["Muon_pt", "event", "luminosityBlock", "nMuon", "run"]
    assert reads["rntuple"] == ["Muon.pt", "event", "luminosityBlock", "run"]


# -- 4. skip and step_size are checked before the first event -----------------------------------

@pytest.fixture
def hzz_copies(tmp_path) -> list[str]:
    copies = [str(tmp_path / "a.root"), str(tmp_path / "b.root")]
    for copy in copies:
        shutil.copyfile(HZZ, copy)
    return copies


@pytest.mark.parametrize("params, parameter, message", [
    ({"skip": 5000}, "skip", "skip 5000 is past the end of the input (4842 entries in 2 files: "),
    ({"skip": 4842}, "skip", "skip 4842 is past the end of the input (4842 entries in 2 files"),
    ({"skip": -1}, "skip", "skip must be 0 or more (got -1)"),
    ({"step_size": 0}, "step_size", "step_size must be at least 1 (got 0)")])
def test_bad_skip_or_step_size_is_a_configuration_error(hzz_copies, run_guarded, params,
                                                        parameter, message):
    with pytest.raises(ConfigError) as error:
        run_guarded({"source": {"type": "RootSource", "files": hzz_copies, **params},
                     "modules": {}})
    assert error.value.exit_code == 2 and error.value.parameter == parameter
    assert f"source: parameter '{parameter}': {message}" in str(error.value)


def test_skip_counts_only_the_readable_files(hzz_copies, tmp_path, read_job, run_guarded):
    files = [hzz_copies[0], str(tmp_path / "missing.root")]
    with pytest.raises(ConfigError, match=r"skip 2421 is past the end of the input \(2421 "
                                          r"entries in 1 file: .*a\.root\)"):
        run_guarded({"source": {"type": "RootSource", "files": files, "skip": HZZ_EVENTS,
                                "skip_bad_files": True}, "modules": {}})
    events, report = read_job({"files": files, "skip": HZZ_EVENTS - 2, "skip_bad_files": True},
                              ["source:NJet"])
    assert [e[1] for e in events] == [(1, 1, HZZ_EVENTS - 1), (1, 1, HZZ_EVENTS)]
    assert report["source"]["skipped_files"][0]["file"] == files[1]


def run_cli(tmp_path: Path, source: dict) -> subprocess.CompletedProcess:
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({
        "source": {"type": "RootSource", **source}, "process": {"report_every_s": 0}}))
    return subprocess.run([sys.executable, "-m", "recorun.framework.cli", "w.yaml", "-q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_skip_past_the_end_exits_2_naming_file_and_parameter(tmp_path, hzz_copies):
    run = run_cli(tmp_path, {"files": hzz_copies, "skip": 5000})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "w.yaml: source: parameter 'skip': skip 5000 is past the end of the input " \
           "(4842 entries in 2 files: " in run.stderr, run.stderr


# -- 5. RNTuple of the pre-release format -------------------------------------------------------

@pytest.mark.parametrize("tree", ["", "Staff"])
def test_pre_release_rntuple_is_named_with_the_uproot_version(tree):
    assert uproot.open(OLD_RNTUPLE).classnames() == {"Staff;1": "ROOT::Experimental::RNTuple"}
    with pytest.raises(InputError) as error:
        RootSource(files=OLD_RNTUPLE, tree=tree)
    assert str(error.value) == (
        f"{OLD_RNTUPLE}: 'Staff' is an RNTuple of the pre-release format "
        f"(ROOT::Experimental::RNTuple, ROOT < 6.34), which uproot {uproot.__version__} cannot "
        f"read; convert it with ROOT 6.34 or newer")
    assert error.value.exit_code == 3


def test_cli_pre_release_rntuple_exits_3(tmp_path):
    run = run_cli(tmp_path, {"files": OLD_RNTUPLE})
    assert run.returncode == 3, run.stderr
    assert "'Staff' is an RNTuple of the pre-release format" in run.stderr, run.stderr


class CountEvents(Analyzer):
    """Consumes nothing; counts the events it sees."""

    concurrency = Concurrency.SHARED
    recorder = Param(object, doc="the test's Recorder")

    def analyze(self, event):
        self.recorder.record(tuple(event.id))


def test_every_entry_is_an_event_when_no_branch_is_consumed(new_recorder, run_guarded):
    recorder = new_recorder()
    result = run_guarded({"process": {"report_every_s": 0, "threads": 2, "streams": 2},
                          "source": {"type": "RootSource", "files": HZZ, "step_size": 1000},
                          "modules": {"count": {"type": CountEvents, "recorder": recorder}},
                          "paths": {"p": ["count"]}})
    assert result.exit_code == 0 and result.report["events"]["read"] == HZZ_EVENTS
    assert sorted(e[0][2] for e in recorder.entries) == list(range(1, HZZ_EVENTS + 1))


def test_an_empty_file_first_in_the_list_gives_no_event_and_no_error(tmp_path, read_job):
    """A job that selected no event wrote a tree with the event IDs only; read before a full
    file, it adds no event and does not hide the full file's branches."""
    empty = tmp_path / "empty.root"
    with uproot.recreate(empty) as f:
        f.mktree("events", {"event": np.int64, "run": np.int32, "luminosityBlock": np.int32})
    events, report = read_job({"files": [str(empty), HZZ]}, ["source:Jet", "source:NJet"])
    assert len(events) == HZZ_EVENTS and report["events"]["read"] == HZZ_EVENTS
    assert all(len(e[2]["source:Jet"]) == e[2]["source:NJet"] for e in events)
    # empty files alone: zero events, whatever they lack
    events, report = read_job({"files": [str(empty), str(empty)]}, ["source:Jet"])
    assert events == [] and report["events"]["read"] == 0
