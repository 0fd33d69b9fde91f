"""ROOT I/O: ``RootSource`` over real ROOT files that nobody here wrote (scikit-hep-testdata),
several files, ``skip`` / ``max_events`` / ``first_event``; ``RootOutput`` round trips (TTree and
RNTuple) read back with plain uproot and with ``RootSource``; bad input through the CLI (exit
code 3 and a message naming the file); interrupted and failed jobs that write a ROOT file.

Every module here computes on the events' data (jet pT from Jet_Px/Jet_Py, HT, MET...). The
reference values come from plain ``uproot``'s ``arrays()`` on the same files. Modules that
inject latency or faults say so in their names (``LatencyInjectedJetPt``, ``FaultInjectedJetPt``).

CLI tests run ``python -m recorun.framework.cli`` in ``tmp_path`` with this directory on PYTHONPATH, so
workflows name these modules as ``test_root_io:ClassName``.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import skhep_testdata
import uproot
import yaml
from recorun.data.layout import SHAPES_KEY, read_shapes, restore_inner
from recorun import (Collection, ConfigError, Concurrency, ExternalWorkProducer, Filter,
                     InputTag, Param, Producer)

from collect import Collect

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HZZ = skhep_testdata.data_path("uproot-HZZ.root")                       # tree 'events', 2421
DY = skhep_testdata.data_path("uproot-small-dy-withoffsets.root")       # NanoAOD-style, 501
DELPHES = skhep_testdata.data_path("uproot-issue513.root")              # Delphes + TProcessID
HZZ_EVENTS = 2421


# -- modules ------------------------------------------------------------------------------------

class JetPt(Producer):
    """Jet transverse momenta ``hypot(Jet_Px, Jet_Py)`` of each event (default instance) and
    their scalar sum HT (instance ``ht``)."""

    concurrency = Concurrency.SHARED
    produces = ("", "ht")
    px = InputTag("source:Jet_Px", doc="jet px")
    py = InputTag("source:Jet_Py", doc="jet py")

    def produce(self, event):
        pt = np.hypot(event.get(self.px), event.get(self.py))
        event.put(pt)
        event.put(float(pt.sum(dtype=np.float64)), "ht")


JET = np.dtype([("pt", "f4"), ("eta", "f4"), ("btag", "f4")])


def jet_features(px, py, pz, energy, btag, met_px, met_py) -> dict:
    """Per-event features of HZZ jets in every layout RootOutput writes."""
    pt = np.hypot(px, py)
    jets = np.empty(len(pt), JET)
    jets["pt"], jets["eta"], jets["btag"] = pt, np.arcsinh(pz / pt), btag
    return {"met": np.float32(np.hypot(met_px, met_py)),               # float32 scalar
            "ht": float(pt.sum(dtype=np.float64)),                      # Python float
            "njet": len(pt),                                            # Python int
            "nbtag": np.int32(np.count_nonzero(btag > 0.5)),            # int32 scalar
            "pt": pt,                                                   # 1-D, variable length
            "p4": np.stack([px, py, pz, energy], axis=-1).reshape(-1, 2, 2),   # (n, 2, 2)
            "jets": jets}                                               # records


class JetFeatures(Producer):
    """:func:`jet_features` of each HZZ event."""

    concurrency = Concurrency.SHARED
    produces = ("met", "ht", "njet", "nbtag", "pt", "p4", "jets")
    px = InputTag("source:Jet_Px")
    py = InputTag("source:Jet_Py")
    pz = InputTag("source:Jet_Pz")
    energy = InputTag("source:Jet_E")
    btag = InputTag("source:Jet_btag")
    met_px = InputTag("source:MET_px")
    met_py = InputTag("source:MET_py")

    def produce(self, event):
        features = jet_features(*(event.get(getattr(self, name)) for name in (
            "px", "py", "pz", "energy", "btag", "met_px", "met_py")))
        for name, value in features.items():
            event.put(value, name)


class MinHT(Filter):
    """Accepts events with HT >= ``min_ht``."""

    concurrency = Concurrency.SHARED
    ht = InputTag("features:ht")
    min_ht = Param(float, 100.0)

    def filter(self, event):
        return event.get(self.ht) >= self.min_ht


class LatencyInjectedJetPt(ExternalWorkProducer):
    """Jet pT and HT computed in ``acquire``; the external call's round trip is INJECTED
    LATENCY: ``holder.done()`` comes from a ``threading.Timer`` ``latency_s`` later."""

    concurrency = Concurrency.SHARED
    produces = ("", "ht")
    px = InputTag("source:Jet_Px")
    py = InputTag("source:Jet_Py")
    latency_s = Param(float, 0.05)

    def begin_job(self):
        self._lock = threading.Lock()
        self._results = {}

    def acquire(self, event, holder):
        pt = np.hypot(event.get(self.px), event.get(self.py))
        key = event.index

        def reply():                              # the "external service" answers
            with self._lock:
                self._results[key] = pt
            holder.done()

        timer = threading.Timer(self.latency_s, reply)      # injected latency, not real work
        timer.daemon = True
        timer.start()

    def produce(self, event):
        with self._lock:
            pt = self._results.pop(event.index)
        event.put(pt)
        event.put(float(pt.sum(dtype=np.float64)), "ht")


class FaultInjectedJetPt(JetPt):
    """FAULT INJECTION: JetPt that raises on event number ``fail_event``."""

    fail_event = Param(int)

    def produce(self, event):
        super().produce(event)
        if event.id.event == self.fail_event:
            raise ValueError(f"injected fault on event {event.id}")


# -- reference values from plain uproot ---------------------------------------------------------

def split(jagged) -> list[np.ndarray]:
    """A ``var * T`` awkward array as a list of per-event NumPy arrays."""
    counts = ak.to_numpy(ak.num(jagged, axis=1))
    return np.split(ak.to_numpy(ak.flatten(jagged, axis=1)), np.cumsum(counts)[:-1])


@functools.lru_cache(maxsize=None)
def hzz() -> dict:
    """HZZ's jet and MET branches per event, read with plain uproot."""
    arrays = uproot.open(HZZ)["events"].arrays(
        ["NJet", "Jet_Px", "Jet_Py", "Jet_Pz", "Jet_E", "Jet_btag", "MET_px", "MET_py"])
    ref = {name: split(arrays[name]) for name in ("Jet_Px", "Jet_Py", "Jet_Pz", "Jet_E",
                                                  "Jet_btag")}
    ref.update({name: ak.to_numpy(arrays[name]) for name in ("NJet", "MET_px", "MET_py")})
    ref["pt"] = [np.hypot(px, py) for px, py in zip(ref["Jet_Px"], ref["Jet_Py"])]
    ref["features"] = [jet_features(*(ref[n][i] for n in ("Jet_Px", "Jet_Py", "Jet_Pz", "Jet_E",
                                                          "Jet_btag", "MET_px", "MET_py")))
                       for i in range(HZZ_EVENTS)]
    return ref


def collected(recorder) -> list[tuple]:
    """The recorded events by index; checks that every index 0..n-1 came exactly once."""
    entries = sorted(recorder.entries, key=lambda e: e[0])
    assert [e[0] for e in entries] == list(range(len(entries)))
    return entries


@pytest.fixture
def read_job(new_recorder, run_guarded):
    """``read_job(source, products, modules=None, **process)``: run ``source`` with a Collect of
    ``products`` (and ``modules``); the events and the report."""
    def read(source: dict, products: list[str], *, modules: dict | None = None,
             **process) -> tuple[list[tuple], dict]:
        recorder = new_recorder()
        process.setdefault("report_every_s", 0)
        wf = {"process": process, "source": {"type": "RootSource", **source},
              "modules": {**(modules or {}),
                          "collect": {"type": Collect, "products": products,
                                      "recorder": recorder}},
              "paths": {"p": ["collect"]}}
        result = run_guarded(wf)
        assert result.exit_code == 0, result.error
        return collected(recorder), result.report
    return read


def assert_hzz_event(entry, i: int):
    """Event ``entry`` (from a Collect of JetPt products + MET_px + NJet) is HZZ entry ``i``."""
    ref = hzz()
    _, _, products = entry
    pt = products["jets"]
    assert pt.dtype == np.float32 and np.array_equal(pt, ref["pt"][i]), i
    assert products["jets:ht"] == float(ref["pt"][i].sum(dtype=np.float64)), i
    assert products["source:MET_px"] == ref["MET_px"][i], i
    njet = products["source:NJet"] if "source:NJet" in products else products["source:nJet"]
    assert njet == ref["NJet"][i] == len(pt), i


JET_PT = {"jets": {"type": JetPt}}
JET_PT_PRODUCTS = ["jets", "jets:ht", "source:MET_px", "source:NJet"]
PART_PRODUCTS = ["jets", "jets:ht", "source:MET_px", "source:nJet"]     # see write_part


# -- 1. real files nobody here wrote ------------------------------------------------------------

@pytest.mark.parametrize("threads, streams, step_size, prefetch", [
    (1, 1, 1000, True), (2, 4, 1000, True), (2, 4, 100, True), (2, 4, 100, False),
    (1, 1, 100, False)])
def test_hzz_jet_pt_matches_plain_uproot(threads, streams, step_size, prefetch, read_job):
    events, report = read_job({"files": HZZ, "step_size": step_size, "prefetch": prefetch},
                              JET_PT_PRODUCTS, modules=JET_PT, threads=threads, streams=streams)
    assert len(events) == HZZ_EVENTS
    for i, entry in enumerate(events):
        assert entry[1] == (1, 1, i + 1)          # no 'event' branch: numbered from 1
        assert_hzz_event(entry, i)
    source = report["source"]
    assert source["tree"] == "events" and source["files"] == [HZZ]
    assert source["skipped_files"] == []
    # only the consumed branches are read
    assert sorted(source["branches"]) == ["Jet_Px", "Jet_Py", "MET_px", "NJet"]
    assert report["events"]["read"] == report["events"]["accepted"] == HZZ_EVENTS


def test_nanoaod_event_ids_and_jet_collection(read_job):
    events, report = read_job({"files": DY, "step_size": 64},
                              ["source:Jet", "source:nJet", "source:MET_pt"],
                              threads=2, streams=4)
    ref = uproot.open(DY)["tree"].arrays(["event", "nJet", "Jet_pt", "Jet_jetId", "MET_pt"])
    jet_pt, jet_id = split(ref["Jet_pt"]), split(ref["Jet_jetId"])
    assert len(events) == len(ref) == 501
    for i, (_, event_id, products) in enumerate(events):
        assert event_id == (1, 1, int(ref["event"][i]))      # IDs from the 'event' branch
        jets = products["source:Jet"]
        assert isinstance(jets, Collection) and set(jets.dtype.names) == {"pt", "jetId"}
        assert np.array_equal(jets["pt"], jet_pt[i]) and np.array_equal(jets["jetId"], jet_id[i])
        assert len(jets) == products["source:nJet"] == ref["nJet"][i]
        assert products["source:MET_pt"] == ref["MET_pt"][i]
    assert sorted(report["source"]["branches"]) == ["Jet_jetId", "Jet_pt", "MET_pt", "event",
                                                    "nJet"]
    assert report["source"]["tree"] == "tree"


def test_delphes_tree_is_found_and_split_object_leaves_are_read(read_job):
    assert "TProcessID" in uproot.open(DELPHES).classnames().values()
    products = ["source:Particle.PT", "source:Particle.PID", "source:Particle.Eta"]
    events, report = read_job({"files": DELPHES}, products)      # no 'tree' given
    ref = uproot.open(DELPHES)["Delphes"].arrays([p.partition(":")[2] for p in products])
    assert len(events) == len(ref) == 10
    for i, (_, event_id, got) in enumerate(events):
        assert event_id == (1, 1, i + 1)
        for tag in products:
            expected = ak.to_numpy(ref[tag.partition(":")[2]][i])
            assert isinstance(got[tag], np.ndarray) and got[tag].dtype == expected.dtype
            assert np.array_equal(got[tag], expected), (tag, i)
    assert report["source"]["tree"] == "Delphes"
    assert sorted(report["source"]["branches"]) == ["Particle.Eta", "Particle.PID", "Particle.PT"]


# -- 2. several files, skip, max_events, first_event ---------------------------------------------

PARTS = [(0, 1000), (1000, 2000), (2000, HZZ_EVENTS)]
EVENT_OFFSET = 100000


def write_part(path: Path, start: int, stop: int, basket: int = 100) -> None:
    """HZZ entries [start, stop) written with plain uproot (ZSTD(1), a basket every ``basket``
    entries): ``event`` = 100000 + entry, NanoAOD-style ``Jet_Px``/``Jet_Py`` counted by
    ``nJet``, ``MET_px``."""
    a = uproot.open(HZZ)["events"].arrays(["Jet_Px", "Jet_Py", "MET_px"], entry_start=start,
                                          entry_stop=stop)
    jets = ak.zip({"Px": a["Jet_Px"], "Py": a["Jet_Py"]})
    with uproot.recreate(path, compression=uproot.ZSTD(1)) as f:
        f.mktree("events", {"event": np.int64, "Jet": jets.type.content, "MET_px": np.float32})
        for s in range(0, stop - start, basket):
            f["events"].extend({"event": np.arange(start + s, min(start + s + basket, stop))
                                + EVENT_OFFSET, "Jet": jets[s:s + basket],
                                "MET_px": a["MET_px"][s:s + basket]})


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[Path]:
    """HZZ split in three files part_0.root, part_1.root, part_2.root."""
    directory = tmp_path_factory.mktemp("parts")
    paths = []
    for k, (start, stop) in enumerate(PARTS):
        paths.append(directory / f"part_{k}.root")
        write_part(paths[-1], start, stop)
    return paths


def entries_of(events) -> list[int]:
    """HZZ entry of each event, from its ID (the parts' 'event' = 100000 + entry), after
    checking its values are those of that entry."""
    entries = []
    for entry in events:
        i = entry[1][2] - EVENT_OFFSET
        assert entry[1][:2] == (1, 1)
        assert_hzz_event(entry, i)
        entries.append(i)
    return entries


def test_several_files_in_list_order_and_glob(parts, read_job):
    d = parts[0].parent
    events, report = read_job({"files": [str(p) for p in parts], "step_size": 128},
                              PART_PRODUCTS, modules=JET_PT, threads=2, streams=4)
    assert entries_of(events) == list(range(HZZ_EVENTS))
    assert report["source"]["files"] == [str(p) for p in parts]
    # a glob: sorted
    events, report = read_job({"files": str(d / "part_*.root"), "step_size": 333},
                              PART_PRODUCTS, modules=JET_PT, threads=2, streams=4)
    assert entries_of(events) == list(range(HZZ_EVENTS))
    assert report["source"]["files"] == [str(p) for p in parts]
    # a list is read in its order; a glob in it expands in place
    events, report = read_job({"files": [str(d / "part_[12].root"), str(parts[0])],
                               "step_size": 250}, PART_PRODUCTS, modules=JET_PT)
    assert entries_of(events) == [*range(1000, HZZ_EVENTS), *range(1000)]
    assert report["source"]["files"] == [str(parts[1]), str(parts[2]), str(parts[0])]


@pytest.mark.parametrize("prefetch", [True, False])
def test_skip_across_a_file_boundary_and_max_events(parts, prefetch, read_job):
    files = [str(p) for p in parts]
    # skip 990: 10 entries of part_0, then part_1; at most 30 events
    events, report = read_job({"files": files, "skip": 990, "step_size": 64,
                               "prefetch": prefetch}, PART_PRODUCTS, modules=JET_PT,
                              max_events=30, threads=2, streams=4)
    assert entries_of(events) == list(range(990, 1020))
    assert report["events"]["read"] == 30 and report["not_processed"] is None
    # skip a whole file and part of the next, no limit
    events, _ = read_job({"files": files, "skip": 1995, "prefetch": prefetch}, PART_PRODUCTS,
                         modules=JET_PT)
    assert entries_of(events) == list(range(1995, HZZ_EVENTS))
    # max_events ending exactly at a file boundary, then one past it
    for n, last in ((1000, 1000), (1001, 1001)):
        events, _ = read_job({"files": files, "step_size": 300, "prefetch": prefetch},
                             PART_PRODUCTS, modules=JET_PT, max_events=n)
        assert entries_of(events) == list(range(last))
    # skip everything: a configuration error before the first event
    with pytest.raises(ConfigError, match=f"skip {HZZ_EVENTS} is past the end"):
        read_job({"files": files, "skip": HZZ_EVENTS}, PART_PRODUCTS, modules=JET_PT)


@pytest.fixture
def hzz_copies(tmp_path) -> list[str]:
    copies = [str(tmp_path / "a.root"), str(tmp_path / "b.root")]
    for copy in copies:
        shutil.copyfile(HZZ, copy)
    return copies


def test_first_event_numbers_events_of_files_without_event_branch(hzz_copies, read_job):
    events, _ = read_job({"files": hzz_copies, "first_event": 1000, "run": 7,
                          "step_size": 500}, JET_PT_PRODUCTS, modules=JET_PT,
                         threads=2, streams=4)
    assert len(events) == 2 * HZZ_EVENTS
    for k, entry in enumerate(events):
        assert entry[1] == (7, 1, 1000 + k)
        assert_hzz_event(entry, k % HZZ_EVENTS)


def test_first_event_numbers_the_first_entry_whatever_skip(hzz_copies, read_job):
    """``first_event`` is the number of the files' first entry: skipped entries keep their
    numbers, so an event has the same ID with or without ``skip`` (as with an 'event' branch,
    and as CMSSW's sources number events after skipEvents)."""
    events, _ = read_job({"files": hzz_copies, "first_event": 1000, "skip": 2400},
                         JET_PT_PRODUCTS, modules=JET_PT, max_events=40)
    assert len(events) == 40
    for k, entry in enumerate(events):
        assert_hzz_event(entry, (2400 + k) % HZZ_EVENTS)
    assert [e[1][2] for e in events] == list(range(1000 + 2400, 1000 + 2440))


# -- 3. RootOutput round trips ------------------------------------------------------------------

FEATURES = ["features:met", "features:ht", "features:njet", "features:nbtag", "features:pt",
            "features:p4", "features:jets"]
RENAME = {"features:met": "MET", "features:p4": "p4", "features:jets": "Jet"}
# branch (or RNTuple field) of each feature, with RENAME
BRANCH = {"met": "MET", "ht": "features_ht", "njet": "features_njet",
          "nbtag": "features_nbtag", "pt": "features_pt", "p4": "p4", "jets": "Jet"}
DTYPES = {"met": np.float32, "ht": np.float64, "njet": np.int64, "nbtag": np.int32,
          "pt": np.float32, "p4": np.float32}


@pytest.fixture
def write_features(run_guarded):
    """``write_features(path, fmt, threads=1, streams=1, select=None, **output)``: HZZ ->
    JetFeatures -> RootOutput (flushed every 500 events), optionally of the events that the
    path ``highHT`` (HT >= 100 GeV) accepts."""
    def write(path: Path, fmt: str, *, threads=1, streams=1, select=None, **output):
        output = {"type": "RootOutput", "file": str(path), "format": fmt, "products": FEATURES,
                  "rename": RENAME, "flush_events": 500, **output}
        if select:
            output["select_events"] = select
        wf = {"process": {"threads": threads, "streams": streams, "report_every_s": 0},
              "source": {"type": "RootSource", "files": HZZ, "step_size": 400},
              "modules": {"features": {"type": JetFeatures}, "ht": {"type": MinHT},
                          "out": output},
              "paths": {"highHT": ["ht"]}, "endpaths": {"e": ["out"]}}
        result = run_guarded(wf)
        assert result.exit_code == 0, result.error
        assert path.exists() and not Path(f"{path}.partial").exists()
        return result
    return write


def read_back(path: Path) -> ak.Array:
    return uproot.open(path)["Events"].arrays()


def assert_same_contents(a: ak.Array, b: ak.Array):
    assert a.fields == b.fields and str(a.type) == str(b.type)
    for field in a.fields:
        assert ak.array_equal(a[field], b[field]), field


def assert_features_in_file(arrays: ak.Array, file, fmt: str, entries: list[int]):
    """The file's columns are the features of HZZ ``entries``, event numbers entry + 1."""
    ref = [hzz()["features"][i] for i in entries]
    assert ak.to_numpy(arrays["event"]).tolist() == [i + 1 for i in entries]
    for column in ("run", "luminosityBlock"):
        assert ak.to_list(arrays[column]) == [1] * len(entries), column
    for name in ("met", "ht", "njet", "nbtag"):
        column = ak.to_numpy(arrays[BRANCH[name]])
        assert column.dtype == DTYPES[name], name
        assert np.array_equal(column, np.array([r[name] for r in ref], DTYPES[name])), name
    counts = [r["njet"] for r in ref]
    pt = arrays["features_pt"]
    assert ak.to_list(ak.num(pt)) == counts
    assert np.array_equal(ak.to_numpy(ak.flatten(pt)), np.concatenate([r["pt"] for r in ref]))
    p4 = arrays["p4"]
    if fmt == "ttree":       # stored as n*2*2 flat values; the shape is kept in the file
        assert SHAPES_KEY in file and read_shapes(file) == {"p4": (2, 2)}
        assert ak.to_list(ak.num(p4)) == [4 * n for n in counts]
        p4 = restore_inner(p4, read_shapes(file)["p4"])
    assert str(p4.type).endswith("var * 2 * 2 * float32"), p4.type
    assert ak.to_list(ak.num(p4)) == counts
    assert np.array_equal(ak.to_numpy(ak.flatten(p4, axis=1)),
                          np.concatenate([r["p4"] for r in ref]))
    expected_jets = np.concatenate([r["jets"] for r in ref])
    if fmt == "ttree":       # NanoAOD style: Jet_pt, Jet_eta, Jet_btag counted by nJet
        assert ak.to_list(arrays["nJet"]) == counts
        jets = {field: arrays[f"Jet_{field}"] for field in JET.names}
    else:
        jets = {field: arrays["Jet"][field] for field in JET.names}
    for field, column in jets.items():
        assert ak.to_list(ak.num(column)) == counts
        assert np.array_equal(ak.to_numpy(ak.flatten(column)), expected_jets[field]), field


def assert_features_via_source(read_job, path: Path, entries: list[int]):
    """RootSource gives back every product with its layout: scalars, 1-D arrays, (n, 2, 2)
    arrays and the structured Jet collection."""
    tags = ["source:MET", "source:features_ht", "source:features_njet", "source:features_nbtag",
            "source:features_pt", "source:p4", "source:Jet"]
    events, _ = read_job({"files": str(path), "step_size": 300}, tags, threads=2, streams=4)
    assert len(events) == len(entries)
    for (_, event_id, got), i in zip(events, entries):
        ref = hzz()["features"][i]
        assert event_id == (1, 1, i + 1)
        for name in ("met", "ht", "njet", "nbtag"):
            value = got[f"source:{BRANCH[name]}"]
            assert value == ref[name] and value.dtype == DTYPES[name], (name, i)
        assert np.array_equal(got["source:features_pt"], ref["pt"])
        p4 = got["source:p4"]
        assert p4.shape == (ref["njet"], 2, 2) and p4.dtype == np.float32, (p4.shape, i)
        assert np.array_equal(p4, ref["p4"]), i
        jets = got["source:Jet"]
        assert isinstance(jets, Collection) and jets.dtype.names is not None
        assert sorted(jets.dtype.names) == sorted(JET.names), jets.dtype
        for field in JET.names:
            assert np.array_equal(jets[field], ref["jets"][field]), (field, i)


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_root_output_round_trip_same_for_1_and_4_streams(tmp_path, fmt, write_features, read_job):
    one, four = tmp_path / "one.root", tmp_path / "four.root"
    r1 = write_features(one, fmt)
    r4 = write_features(four, fmt, threads=2, streams=4)
    assert r1.report["events"]["read"] == r4.report["events"]["read"] == HZZ_EVENTS
    kind = "TTree" if fmt == "ttree" else "ROOT::RNTuple"
    assert uproot.open(one).classnames()["Events;1"] == kind
    a1, a4 = read_back(one), read_back(four)
    assert_same_contents(a1, a4)          # the same file content for any threads/streams
    assert_features_in_file(a1, uproot.open(one), fmt, list(range(HZZ_EVENTS)))
    assert_features_via_source(read_job, four, list(range(HZZ_EVENTS)))


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_root_output_writes_only_selected_events_in_order(tmp_path, fmt, write_features, read_job):
    path = tmp_path / "high_ht.root"
    result = write_features(path, fmt, threads=2, streams=4, select=["highHT"])
    accepted = [i for i, r in enumerate(hzz()["features"]) if r["ht"] >= 100.0]
    assert 0 < len(accepted) < HZZ_EVENTS
    assert result.report["paths"]["highHT"]["passed"] == len(accepted)
    assert_features_in_file(read_back(path), uproot.open(path), fmt, accepted)
    assert_features_via_source(read_job, path, accepted)


def test_rntuple_files_in_order_with_skip_across_the_boundary(tmp_path, read_job, write_features):
    path = tmp_path / "features.root"
    write_features(path, "rntuple")
    events, report = read_job({"files": [str(path), str(path)], "skip": 2400, "step_size": 7},
                              ["source:features_pt", "source:p4", "source:Jet"], max_events=50,
                              threads=2, streams=4)
    entries = [(2400 + k) % HZZ_EVENTS for k in range(50)]
    assert [e[1] for e in events] == [(1, 1, i + 1) for i in entries]    # IDs from the file
    for (_, _, got), i in zip(events, entries):
        ref = hzz()["features"][i]
        assert np.array_equal(got["source:features_pt"], ref["pt"])
        assert np.array_equal(got["source:p4"], ref["p4"]) and got["source:p4"].ndim == 3
        assert np.array_equal(got["source:Jet"]["eta"], ref["jets"]["eta"])
    assert report["source"]["tree"] == "Events"
    assert sorted(report["source"]["branches"]) == ["Jet", "event", "features_pt",
                                                    "luminosityBlock", "p4", "run"]


def test_records_with_the_default_branch_name_read_back_as_a_collection(tmp_path, read_job, write_features):
    """A structured product written under its default name ``features_jets`` (branches
    ``features_jets_pt``... counted by ``nfeatures_jets``) is read back as the structured
    product ``source:features_jets``, as the records are when renamed to ``Jet``."""
    path = tmp_path / "default_names.root"
    write_features(path, "ttree", rename={})
    assert "nfeatures_jets" in uproot.open(path)["Events"].keys()
    events, _ = read_job({"files": str(path)}, ["source:features_jets"])
    assert len(events) == HZZ_EVENTS
    for i, (_, _, got) in enumerate(events):
        jets = got["source:features_jets"]
        assert jets.dtype.names is not None and sorted(jets.dtype.names) == sorted(JET.names)
        for field in JET.names:
            assert np.array_equal(jets[field], hzz()["features"][i]["jets"][field])


@pytest.mark.parametrize("compression, f_compress", [(None, 501), ("zstd:1", 501),
                                                      ("lz4:1", 401), ("none", 100)])
def test_root_output_compression(tmp_path, compression, f_compress, write_features):
    path = tmp_path / "c.root"
    write_features(path, "ttree", **({"compression": compression} if compression else {}))
    f = uproot.open(path)
    assert f.file.fCompress == f_compress         # ROOT's algorithm * 100 + level
    event = f["Events"]["event"]
    if f_compress % 100:
        assert event.compressed_bytes < event.uncompressed_bytes
    else:                                         # level 0: stored as is
        assert event.compressed_bytes == event.uncompressed_bytes
    assert_features_in_file(f["Events"].arrays(), f, "ttree", list(range(HZZ_EVENTS)))


# -- CLI helpers --------------------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def recorun(cwd: Path, workflow: dict, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    (cwd / "wf.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "recorun.framework.cli", "wf.yaml", *map(str, args)],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def cli_workflow(files, source: dict | None = None, jets: dict | None = None,
                 output: dict | None = None, **process) -> dict:
    process.setdefault("report_every_s", 0)
    wf = {"process": process,
          "source": {"type": "RootSource", "files": files, **(source or {})},
          "modules": {"jets": {"type": "test_root_io:JetPt", **(jets or {})}},
          "paths": {"p": ["jets"]}}
    if output is not None:
        wf["modules"]["out"] = {"type": "RootOutput", "products": ["jets", "jets:ht"],
                                "file": "out/jets.root", **output}
        wf["endpaths"] = {"e": ["out"]}
    return wf


def assert_ht_file(path: Path, hzz_entries: list[int], event_numbers: list[int]):
    """``path`` holds the JetPt products of ``hzz_entries`` with those event numbers."""
    arrays = uproot.open(path)["Events"].arrays()
    assert ak.to_list(arrays["event"]) == event_numbers
    assert np.array_equal(ak.to_numpy(arrays["jets_ht"]),
                          np.array([hzz()["pt"][i].sum(dtype=np.float64) for i in hzz_entries]))
    assert ak.to_list(ak.num(arrays["jets"])) == [len(hzz()["pt"][i]) for i in hzz_entries]


def test_cli_max_events_writes_the_first_n_events(tmp_path):
    run = recorun(tmp_path, cli_workflow(HZZ, output={}), "-n", 25, "-q",
                  "--report-json", "r.json")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["events"]["read"] == 25 and report["not_processed"] is None
    assert_ht_file(tmp_path / "out/jets.root", list(range(25)), list(range(1, 26)))


def test_bad_compression_or_rename_is_a_configuration_error(tmp_path):
    """A bad ``compression`` or a ``rename`` of a product that is not written is a
    configuration error (exit 2, like any bad parameter value), found before any event (also
    by ``--check``), naming the module, the parameter and the bad value."""
    cases = [({"compression": "gzip:1"}, "compression", ["'gzip:1'", "zstd:LEVEL", "none"]),
             ({"compression": "zstd"}, "compression", ["'zstd'", "zstd:LEVEL"]),
             ({"rename": {"jetz": "Jets"}}, "rename", ["jetz"])]
    for output, parameter, patterns in cases:
        for check in ([], ["--check"]):
            run = recorun(tmp_path, cli_workflow(HZZ, output=output), "-q", *check)
            err = run.stderr
            assert "Traceback" not in err, err
            assert run.returncode == 2, f"{output} {check}: exit {run.returncode}: {err}"
            assert "module 'out'" in err and f"parameter '{parameter}'" in err, err
            for pattern in patterns:
                assert pattern in err, (pattern, err)
            assert not (tmp_path / "out/jets.root").exists()
            assert not (tmp_path / "out/jets.root.partial").exists()


# -- 4. bad input -------------------------------------------------------------------------------

def _overwrite(path: Path, start: int, stop: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes((0xDE, 0xAD, 0xBE, 0xEF)) * ((stop - start) // 4))


def _missing(d):
    return {"files": str(d / "missing.root")}, {}, ["missing.root", "no such file"]


def _text(d):
    (d / "notes.root").write_text("run 1: good\nrun 2: bad\n")
    return {"files": str(d / "notes.root")}, {}, ["notes.root", "not a ROOT file"]


def _truncated(d):
    path = d / "half.root"
    shutil.copyfile(HZZ, path)
    os.truncate(path, os.path.getsize(HZZ) // 2)
    return {"files": str(path)}, {}, ["half.root", "truncated"]


def _garbage(d):
    """Garbage in the middle of the file: inside the Jet_Py basket. uproot opens the file and
    finds the tree; reading the basket fails."""
    path = d / "garbage.root"
    shutil.copyfile(HZZ, path)
    middle = os.path.getsize(HZZ) // 2
    _overwrite(path, middle, middle + 1000)
    tree = uproot.open(path)["events"]                    # opens fine
    assert tree.num_entries == HZZ_EVENTS
    with pytest.raises(Exception):
        tree["Jet_Py"].array()                            # the read fails
    return {"files": str(path)}, {}, ["garbage.root", "tree 'events'",
                                      rf"entries 0 to {HZZ_EVENTS - 1}"]


def _no_tree(d):
    return ({"files": HZZ, "tree": "event"}, {},
            [re.escape(Path(HZZ).name), "no tree 'event'", "did you mean 'events'"])


def _no_consumed_branch(d):
    return ({"files": HZZ}, {"px": "source:Jet_Pxx"},
            [re.escape(Path(HZZ).name), "tree 'events'", "'Jet_Pxx'", "did you mean 'Jet_Px'"])


def _no_listed_branch(d):
    return ({"files": HZZ, "branches": ["Jet_Pxx"]}, {},
            [re.escape(Path(HZZ).name), "tree 'events'", "'Jet_Pxx'", "did you mean 'Jet_Px'"])


def _empty(d):
    uproot.recreate(d / "empty.root").close()
    return {"files": str(d / "empty.root")}, {}, ["empty.root", "has no TTree or RNTuple"]


def _no_match(d):
    return ({"files": str(d / "run2021_*.root")}, {},
            [re.escape("run2021_*.root"), "no file matches"])


def _unreadable_type(d):
    """A branch of a class uproot cannot interpret (a public file from uproot's issues)."""
    path = skhep_testdata.data_path("uproot-issue371.root")
    return ({"files": path, "tree": "Header", "branches": ["Header.TObject"]}, None,
            ["uproot-issue371.root", "branch 'Header.TObject'", "cannot be read"])


@pytest.mark.parametrize("case", [_missing, _text, _truncated, _garbage, _no_tree,
                                  _no_consumed_branch, _no_listed_branch, _empty, _no_match,
                                  _unreadable_type],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_exits_3_naming_the_file(tmp_path, case):
    source, jets, patterns = case(tmp_path)
    files = source.pop("files")
    run = recorun(tmp_path, cli_workflow(files, source, jets), "-q", "--report-json", "r.json")
    err = run.stderr
    assert run.returncode == 3, f"exit {run.returncode}: {err}"
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("recorun: error:")]
    assert error_lines, err
    message = err[err.index("recorun: error:"):]
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    if (tmp_path / "r.json").exists():        # the job started: nothing was processed
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["exit_code"] == 3 and report["events"]["accepted"] == 0


def corrupt_basket(path: Path, branch: str, basket: int) -> tuple[int, int]:
    """Overwrite the payload of one basket of ``branch`` with garbage; its entry range."""
    br = uproot.open(path)["events"][branch]
    key = br.basket_key(basket)
    _overwrite(path, key.fSeekKey + key.fKeylen, key.fSeekKey + key.fNbytes)
    return br.basket_entry_start_stop(basket)


def test_skip_bad_files_goes_on_with_the_good_files(tmp_path, parts):
    bad_part = tmp_path / "part_1_corrupt.root"
    shutil.copyfile(parts[1], bad_part)
    assert corrupt_basket(bad_part, "Jet_Py", 5) == (500, 600)
    (tmp_path / "notes.root").write_text("not ROOT\n" * 100)
    uproot.recreate(tmp_path / "empty.root").close()
    half = tmp_path / "half.root"
    shutil.copyfile(HZZ, half)
    os.truncate(half, os.path.getsize(HZZ) // 2)
    files = [str(parts[0]), str(tmp_path / "missing.root"), str(tmp_path / "notes.root"),
             str(bad_part), str(tmp_path / "empty.root"), str(tmp_path / "nomatch_*.root"),
             str(parts[2]), str(half)]
    run = recorun(tmp_path, cli_workflow(files, {"skip_bad_files": True, "step_size": 100},
                                         output={}, threads=2, streams=4),
                  "-q", "--report-json", "r.json")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    skipped = {s["file"]: s for s in report["source"]["skipped_files"]}
    assert set(skipped) == {files[1], files[2], files[3], files[4], files[5], files[7]}
    for name, reason, entries_read in (
            (files[1], "no such file", 0), (files[2], "not a ROOT file", 0),
            (files[3], r"entries 500 to 999", 500), (files[4], "has no TTree or RNTuple", 0),
            (files[5], "no file matches", 0), (files[7], "half.root", 0)):
        assert re.search(reason, skipped[name]["reason"]), skipped[name]
        assert skipped[name]["entries_read"] == entries_read, skipped[name]
    for name in skipped:
        assert Path(name).name in run.stderr          # each skipped file is named in the log
    # every event of the good files, and the 500 read before part_1's bad basket
    entries = [*range(1000), *range(1000, 1500), *range(2000, HZZ_EVENTS)]
    ev = report["events"]
    assert ev["read"] == ev["accepted"] == len(entries) and ev["failed"] == 0
    assert report["exit_code"] == 0 and report["stop_reason"] is None
    assert_ht_file(tmp_path / "out/jets.root", entries, [EVENT_OFFSET + i for i in entries])


def test_corrupt_basket_without_skip_bad_files_stops_naming_file_and_entries(tmp_path, parts):
    bad_part = tmp_path / "part_1_corrupt.root"
    shutil.copyfile(parts[1], bad_part)
    corrupt_basket(bad_part, "Jet_Py", 5)
    run = recorun(tmp_path, cli_workflow([str(parts[0]), str(bad_part), str(parts[2])],
                                         {"step_size": 100}, output={}),
                  "-q", "--report-json", "r.json")
    err = run.stderr
    assert run.returncode == 3, err
    assert "Traceback" not in err, err
    assert re.search(r"recorun: error: .*part_1_corrupt\.root: reading entries 500 to 999 of "
                     r"tree 'events' failed", err), err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stop_reason"] == "input error" and report["events"]["read"] == 1500
    assert report["not_processed"] == (f"{HZZ_EVENTS - 1500} events not read "
                                       f"(event indices 1500 to {HZZ_EVENTS - 1})")
    assert not (tmp_path / "out/jets.root").exists()
    assert (tmp_path / "out/jets.root.partial").exists()


# -- 5. jobs that stop while writing ------------------------------------------------------------

def test_sigint_while_writing_leaves_only_the_partial_file(tmp_path):
    wf = cli_workflow(HZZ, {"step_size": 100},
                      {"type": "test_root_io:LatencyInjectedJetPt", "latency_s": 0.05},
                      output={"flush_events": 50}, threads=2, streams=4, report_every_s=0.2)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf, sort_keys=False))
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "recorun.framework.cli", "wf.yaml",
                                 "--report-json", "r.json"], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            deadline = time.monotonic() + 20          # wait for events to flow
            while time.monotonic() < deadline and proc.poll() is None:
                if re.search(r"^[1-9]\d* events processed", stderr_path.read_text(), re.M):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, stderr_path.read_text()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr_path.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    report = json.loads((tmp_path / "r.json").read_text())
    ev = report["events"]
    assert 0 < ev["read"] < HZZ_EVENTS and ev["read"] == ev["accepted"] and ev["failed"] == 0
    assert report["stop_reason"] == "interrupted" and report["exit_code"] == 130
    assert report["not_processed"] == (f"{HZZ_EVENTS - ev['read']} events not read "
                                       f"(event indices {ev['read']} to {HZZ_EVENTS - 1})")
    final = tmp_path / "out/jets.root"
    assert not final.exists()
    partial = Path(f"{final}.partial")
    assert partial.exists()
    assert "jets.root.partial" in err                  # the log says where the events are
    # the partial file is a readable ROOT file of the events processed, in order
    assert_ht_file(partial, list(range(ev["read"])), list(range(1, ev["read"] + 1)))


def test_module_error_with_on_error_stop_leaves_no_final_file(tmp_path, run_guarded):
    out = tmp_path / "out" / "jets.root"
    wf = {"process": {"threads": 2, "streams": 4, "report_every_s": 0, "on_error": "stop"},
          "source": {"type": "RootSource", "files": HZZ, "step_size": 100},
          "modules": {"jets": {"type": FaultInjectedJetPt, "fail_event": 700},
                      "out": {"type": "RootOutput", "products": ["jets", "jets:ht"],
                              "file": str(out), "format": "rntuple"}},
          "paths": {"p": ["jets"]}, "endpaths": {"e": ["out"]}}
    result = run_guarded(wf)
    assert result.exit_code == 4, result.error
    assert "injected fault on event 1:1:700" in str(result.error)
    report = result.report
    assert report["stop_reason"] == "module error" and report["events"]["failed"] == 1
    assert report["not_processed"].endswith(f"to {HZZ_EVENTS - 1})")
    assert not out.exists()
    assert Path(f"{out}.partial").exists()


def test_job_stopped_early_ends_promptly_and_stops_the_reader_thread(run_guarded):
    """A job that stops on a module error while the prefetching reader has a chunk waiting
    ends at once, and the reader thread ends with it (it holds a chunk and an open file)."""
    before = set(threading.enumerate())
    wf = {"process": {"threads": 1, "streams": 1, "report_every_s": 0},
          "source": {"type": "RootSource", "files": HZZ, "step_size": 100, "prefetch": True},
          "modules": {"jets": {"type": FaultInjectedJetPt, "fail_event": 50}},
          "paths": {"p": ["jets"]}}
    start = time.perf_counter()
    result = run_guarded(wf)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 4, result.error
    assert result.report["events"]["read"] == 50
    readers = [t for t in set(threading.enumerate()) - before if t.name == "recorun-root-reader"]
    for thread in readers:
        thread.join(1.0)
    assert not [t for t in readers if t.is_alive()], "the reader thread is still running"
    assert elapsed < 2.0, f"the job took {elapsed:.1f} s to stop"
