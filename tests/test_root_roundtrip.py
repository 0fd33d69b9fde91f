"""Round trips of ROOT files as physicists have them: RootSource reads a file, RootOutput writes
its products (TTree and RNTuple), and the written file is read back twice, by RootSource (the
same products, under their written names) and by plain uproot (the same values).

Inputs: public files nobody here wrote (scikit-hep-testdata: ``N<Name>`` counters, NanoAOD,
Delphes class branches with ``[N]`` names, strings and fixed-size arrays) and a file written
here with plain uproot as a TTree and as an RNTuple holding the same data.
"""
from __future__ import annotations

import json

import awkward as ak
import numpy as np
import pytest
import skhep_testdata
import uproot

from recorun import Analyzer, Collection, Concurrency, InputTagList, Param
from recorun.data.layout import branch_name

HZZ = skhep_testdata.data_path("uproot-HZZ.root")
NANOAOD = skhep_testdata.data_path("uproot-small-dy-withoffsets.root")
DELPHES = skhep_testdata.data_path("uproot-issue513.root")
FULLSPLIT = skhep_testdata.data_path("uproot-small-evnt-tree-fullsplit.root")

CASES = {     # a collection and its own member branches are not written together (one name)
    "N<Name> counters (HZZ)": (HZZ, ["source:Jet", "source:Muon", "source:NJet",
                                     "source:MET_px", "source:Photon_Px"]),
    "NanoAOD": (NANOAOD, ["source:Jet", "source:nJet", "source:Muon_pt", "source:nMuon"]),
    "Delphes class branches, [N] names": (DELPHES, ["source:Particle", "source:GenJet",
                                                    "source:Jet.PT", "source:Jet.FracPt[5]"]),
    "strings and fixed-size arrays": (FULLSPLIT, ["source:Str", "source:StdStr",
                                                  "source:StlVecStr", "source:ArrayF32[10]",
                                                  "source:ArrayI64[10]", "source:SliceI16",
                                                  "source:I32", "source:F64"]),
}


class Collect(Analyzer):
    """Records ``(event.index, {tag: product})`` of every event."""

    concurrency = Concurrency.SHARED
    products = InputTagList(doc="products to record")
    recorder = Param(object, doc="the test's Recorder")

    def analyze(self, event):
        self.recorder.record(event.index, {tag: event.get(tag) for tag in self.products})


def run(run_guarded, recorder, source: dict, products: list[str], output: dict | None = None):
    """One job: RootSource, a Collect of ``products`` and, if given, a RootOutput (of
    ``products`` unless it names its own); the products of each event, in event order."""
    modules = {"collect": {"type": Collect, "products": products, "recorder": recorder}}
    endpaths = {}
    if output is not None:
        modules["out"] = {"type": "RootOutput", "products": products, **output}
        endpaths = {"e": ["out"]}
    result = run_guarded({"process": {"threads": 2, "streams": 2, "report_every_s": 0},
                          "source": {"type": "RootSource", **source}, "modules": modules,
                          "paths": {"p": ["collect"]}, "endpaths": endpaths})
    assert result.exit_code == 0, result.error
    return [products for _, products in sorted(recorder.entries)]


def assert_same(a, b, where: str) -> None:
    """Two products of one event hold the same data (collections field by field)."""
    if isinstance(a, Collection):
        assert isinstance(b, Collection), where
        assert sorted(a.fields) == sorted(b.fields) and len(a) == len(b), where
        for field in a.fields:
            assert_same(a[field], b[field], f"{where}[{field}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, (where, b)
        assert a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, (list, str)):
        assert type(a) is type(b) and a == b, where
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype and a == b, (where, a, b)


def assert_uproot_reads(path, tag: str, values: list, fmt: str) -> None:
    """Plain uproot reads the product ``tag``, as written, with the values ``values``."""
    name = branch_name(tag)
    tree = uproot.open(path)["Events"]
    if isinstance(values[0], Collection):
        for field in values[0].fields:
            if values[0][field].ndim != 1:                      # flattened: checked by shape
                continue
            column = (tree[name].array()[field] if fmt == "rntuple"
                      else tree[f"{name}_{field}"].array())
            for i, collection in enumerate(values):
                assert np.array_equal(ak.to_numpy(column[i]), collection[field]), (tag, i)
        return
    column = tree[name].array()
    for i, value in enumerate(values):
        read = column[i]
        if isinstance(value, str):
            assert read == value, (tag, i)
        elif isinstance(value, list):
            got = ak.to_list(read)
            assert (got if isinstance(got, list) else json.loads(got)) == value, (tag, i)
        elif isinstance(value, np.ndarray):
            read = ak.to_numpy(read)
            if fmt == "ttree" and value.ndim > 1:       # flattened, its shape kept apart
                read = read.reshape(value.shape)
            assert np.array_equal(read, value), (tag, i)
        else:
            assert read == value, (tag, i)


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_file_round_trips_through_root_source_and_root_output(case, fmt, tmp_path,
                                                                run_guarded, new_recorder):
    path, products = CASES[case]
    out = tmp_path / f"out.{fmt}.root"
    first = run(run_guarded, new_recorder(), {"files": path}, products,
                {"file": str(out), "format": fmt})
    assert first, "the input has events"
    written = [f"source:{branch_name(tag)}" for tag in products]
    again = run(run_guarded, new_recorder(), {"files": str(out)}, written)
    assert len(again) == len(first)
    for i, (before, after) in enumerate(zip(first, again)):
        for tag, new_tag in zip(products, written):
            assert_same(before[tag], after[new_tag], f"{case}: event {i}, {tag} -> {new_tag}")
    for tag in products:
        assert_uproot_reads(out, tag, [event[tag] for event in first], fmt)


def test_a_ttree_and_an_rntuple_of_the_same_data_round_trip_the_same(tmp_path, run_guarded,
                                                                    new_recorder):
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 5, 200)
    muon = {"pt": ak.unflatten(rng.random(counts.sum()).astype(np.float32), counts),
            "charge": ak.unflatten(rng.choice([-1, 1], counts.sum()).astype(np.int32), counts)}
    event = np.arange(1, 201, dtype=np.int64)
    flavours = {}
    with uproot.recreate(tmp_path / "ttree.root") as f:
        f.mktree("Events", {"event": np.int64, "Muon": ak.zip(muon).type.content})
        f["Events"].extend({"event": event, "Muon": ak.zip(muon)})
    with uproot.recreate(tmp_path / "rntuple.root") as f:
        f.mkrntuple("Events", {"event": event, "Muon": ak.zip(muon)})
    products = ["source:Muon", "source:nMuon"]       # and source:Muon_pt, read not written
    for name in ("ttree", "rntuple"):
        out = tmp_path / f"{name}.out.root"
        first = run(run_guarded, new_recorder(), {"files": str(tmp_path / f"{name}.root")},
                    [*products, "source:Muon_pt"], {"file": str(out), "products": products})
        assert all(np.array_equal(e["source:Muon_pt"], e["source:Muon"]["pt"]) for e in first)
        written = [f"source:{branch_name(tag)}" for tag in products]
        flavours[name] = run(run_guarded, new_recorder(), {"files": str(out)}, written)
        for before, after in zip(first, flavours[name]):
            for tag, new_tag in zip(products, written):
                assert_same(before[tag], after[new_tag], f"{name}: {tag}")
        assert_uproot_reads(out, "source:Muon", [e["source:Muon"] for e in first], "ttree")
    assert len(flavours["ttree"]) == len(flavours["rntuple"]) == 200
    for a, b in zip(flavours["ttree"], flavours["rntuple"]):
        for tag in a:
            assert_same(a[tag], b[tag], tag)


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_a_collection_written_with_its_own_member_is_a_configuration_error(tmp_path, fmt,
                                                                          run_guarded):
    """``source:Jet`` writes ``source_Jet_Px``, as ``source:Jet_Px`` would (an RNTuple's
    record gives that name when read back): only the first event shows that ``source:Jet`` is
    a collection; the job stops there with exit 2."""
    result = run_guarded({
        "process": {"report_every_s": 0},
        "source": {"type": "RootSource", "files": HZZ},
        "modules": {"out": {"type": "RootOutput", "file": str(tmp_path / "o.root"),
                            "format": fmt, "products": ["source:Jet", "source:Jet_Px"]}},
        "endpaths": {"e": ["out"]}})
    assert result.exit_code == 2
    assert "source_Jet_Px" in str(result.error) and "source:Jet_Px" in str(result.error)
    assert result.report["stop_reason"] == "configuration error"
    assert not (tmp_path / "o.root").exists()
