"""RootOutput writes what physicists have, safely: strings and lists of strings, products whose
tags hold characters ROOT treats specially (Delphes ``Jet.FracPt[5]``), fixed-size arrays the
source declares, collections with fixed-size fields; configuration mistakes found before the
first event (exit 2); products it cannot write found at the first event that has them (exit 4);
a job that selects no event; farm merges of all of these.

Every file written here is read back by plain uproot and by ``RootSource``. Sources and
producers compute their products from the event number (or read them from scikit-hep-testdata's
Delphes file), so the expected values are known without the code under test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import skhep_testdata
import uproot
import yaml

from recorun import ConfigError, Event, EventID, Filter, Param, Producer, Source
from recorun.data.layout import (decode_string_list, read_shapes, read_string_lists,
                                 restore_inner, safe_name)
from recorun.modules.root_output import RootOutput

DELPHES = skhep_testdata.data_path("uproot-issue513.root")
WORDS = ["", "muon", "é-ü ✓ jet", "x" * 300, "tab\tand\"quote\"", "[0]/a.b:c"]
HIT = np.dtype([("e", "f4"), ("p4", "f4", (4,)), ("det.id", "i4")])


# -- products -----------------------------------------------------------------------------------

def word(n: int) -> str:
    return WORDS[n % len(WORDS)]


def words(n: int) -> list[str]:
    """A list of 0 to 3 strings for event number ``n``."""
    return [word(n + k) for k in range(n % 4)]


def hits(n: int) -> np.ndarray:
    """``n % 4`` hits: energy, a four-vector (a fixed-size field) and a detector id."""
    out = np.zeros(n % 4, HIT)
    out["e"] = np.arange(len(out), dtype=np.float32) + n
    out["p4"] = np.arange(4 * len(out), dtype=np.float32).reshape(-1, 4) * n
    out["det.id"] = 1000 * n + np.arange(len(out))
    return out


def calib(n: int) -> np.ndarray:
    return np.arange(5, dtype=np.float32) + n


def grid(n: int) -> np.ndarray:
    return np.arange(6, dtype=np.int16).reshape(2, 3) * n


class Words(Producer):
    """A string, a list of strings and a NumPy array of strings per event."""

    produces = ("word", "words", "tags")

    def produce(self, event):
        n = event.id.event
        event.put(word(n), "word")
        event.put(words(n), "words")
        event.put(np.array(words(n + 1), dtype=str), "tags")


class FixedShapeSource(Source):
    """``count`` events numbered from ``first_event``, with products ``source:calib`` (float32
    (5,)) and ``source:grid`` (int16 (2, 3)), which it declares fixed-size, and ``source:hits``
    (records with a fixed-size field). Event number ``bad_event`` (0: none) gets a ``calib`` of
    shape (4,)."""

    count = Param(int, 12)
    first_event = Param(int, 1)
    bad_event = Param(int, 0)

    def product_tags(self):
        return ["source:calib", "source:grid", "source:hits"]

    def product_shapes(self):
        return {"source:calib": (5,), "source:grid": (2, 3)}

    def open(self, max_events):
        self._n = self.count if max_events is None else min(self.count, max_events)

    def next_event(self, index):
        if index >= self._n:
            return None
        n = self.first_event + index
        value = calib(n)[:4] if n == self.bad_event else calib(n)
        return Event(EventID(1, 1, n), index, {"source:calib": value, "source:grid": grid(n),
                                               "source:hits": hits(n)})

    def total_events(self):
        return self._n


class FourVector:
    """A TLorentzVector-like object: RootOutput cannot write it."""

    def __init__(self, px, py, pz, e):
        self.px, self.py, self.pz, self.e = px, py, pz, e


class Unwritable(Producer):
    """From event number ``from_event`` on, instance ``bad`` is ``mode``: ``"lists"`` (a list
    of lists), ``"object"`` (a FourVector) or ``"float64"`` (a float64 array where earlier
    events had float32); before, a float32 array."""

    produces = ("good", "bad")
    mode = Param(str)
    from_event = Param(int, 1)

    def produce(self, event):
        n = event.id.event
        event.put(np.float32(n), "good")
        if n < self.from_event:
            event.put(np.arange(n % 3, dtype=np.float32), "bad")
        elif self.mode == "lists":
            event.put([[1.0, 2.0], [3.0]], "bad")
        elif self.mode == "object":
            event.put(FourVector(1.0, 2.0, 3.0, 4.0), "bad")
        else:
            event.put(np.arange(n % 3, dtype=np.float64), "bad")


class RejectAll(Filter):
    def filter(self, event):
        return False


class Numbers(Producer):
    """The event number as float32 (default instance) and as float64 (instances ``x.y`` and
    ``x_y``, whose safe branch names are the same)."""

    produces = ("", "x.y", "x_y")

    def produce(self, event):
        event.put(np.float32(event.id.event))
        event.put(float(event.id.event), "x.y")
        event.put(float(event.id.event), "x_y")


# -- helpers ------------------------------------------------------------------------------------

def output(path: Path, products: list[str], **params) -> dict:
    return {"type": "RootOutput", "file": str(path), "products": products, **params}


def job(source: dict, modules: dict, *, paths=None, select=None, events=None) -> dict:
    out = modules["out"]
    if select:
        out["select_events"] = select
    return {"process": {"report_every_s": 0, **({"max_events": events} if events else {})},
            "source": source, "modules": modules, "paths": paths or {},
            "endpaths": {"e": ["out"]}}


def empty_source(count: int = 12, first: int = 1) -> dict:
    return {"type": "EmptySource", "count": count, "first_event": first}


def run_ok(run_guarded, wf: dict):
    result = run_guarded(wf)
    assert result.exit_code == 0, result.error
    return result


class Box(dict):
    def __deepcopy__(self, memo):
        return self


def read_with_source(run_guarded, path: Path, products: list[str]) -> dict:
    """RootSource over ``path``: ``{event number: {tag: product}}`` (exit 0 checked)."""
    box = Box()
    from recorun import Analyzer

    class Keep(Analyzer):
        def analyze(self, event):
            box[event.id.event] = {tag: event.get(tag) for tag in products}

        def consumed_tags(self):
            return list(products)

    run_ok(run_guarded, {"process": {"report_every_s": 0},
                         "source": {"type": "RootSource", "files": str(path)},
                         "modules": {"keep": {"type": Keep}}, "paths": {"p": ["keep"]}})
    return box


# -- 1. strings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_strings_and_lists_of_strings_round_trip(tmp_path, fmt, run_guarded):
    path = tmp_path / "words.root"
    run_ok(run_guarded, job(empty_source(12), {
        "w": {"type": Words},
        "out": output(path, ["w:word", "w:words", "w:tags"], format=fmt, flush_events=5,
                      rename={"w:word": "word"})}))
    numbers = range(1, 13)
    with uproot.open(path) as f:
        tree = f["Events"]
        assert tree.num_entries == 12
        assert tree["word"].array(library="np").tolist() == [word(n) for n in numbers]
        lists, tags = tree["w_words"].array(), tree["w_tags"].array()
        if fmt == "ttree":
            assert tree["word"].typename == "char*" and tree["w_words"].typename == "char*"
            assert read_string_lists(f) == {"w_words", "w_tags"}
            lists = [decode_string_list(text) for text in lists]
            tags = [decode_string_list(text) for text in tags]
        else:
            assert str(lists.type) == "12 * var * string"
        assert ak.to_list(lists) == [words(n) for n in numbers]
        assert ak.to_list(tags) == [words(n + 1) for n in numbers]
    got = read_with_source(run_guarded, path, ["source:word", "source:w_words"])
    assert sorted(got) == list(numbers)


# -- 2. safe branch names -----------------------------------------------------------------------

def test_safe_name_rule():
    assert safe_name("source_Jet.FracPt[5]") == "source_Jet_FracPt"
    assert safe_name("x[2][3]") == "x"
    assert safe_name("a/b:c-d e") == "a_b_c_d_e"
    assert safe_name("det.id") == "det_id"
    assert safe_name("2mu") == "_2mu"


def test_delphes_products_with_dots_and_dimensions_round_trip(tmp_path, run_guarded):
    """``source:Jet.FracPt[5]`` (per event: jets x 5) is written as ``source_Jet_FracPt``,
    flat with its shape recorded, and reads back by plain uproot and by RootSource."""
    path = tmp_path / "delphes.root"
    products = ["source:Jet.FracPt[5]", "source:Jet.PT", "source:Particle.PID"]
    run_ok(run_guarded, {"process": {"report_every_s": 0},
                         "source": {"type": "RootSource", "files": DELPHES},
                         "modules": {"out": output(path, products)},
                         "endpaths": {"e": ["out"]}})
    ref = uproot.open(DELPHES)["Delphes"].arrays(["Jet.FracPt[5]", "Jet.PT", "Particle.PID"])
    with uproot.open(path) as f:
        tree = f["Events"]
        assert {"source_Jet_FracPt", "source_Jet_PT", "source_Particle_PID"} <= set(tree.keys())
        assert read_shapes(f) == {"source_Jet_FracPt": (5,)}
        frac = restore_inner(tree["source_Jet_FracPt"].array(), (5,))
        assert ak.array_equal(frac, ref["Jet.FracPt[5]"])
        assert ak.array_equal(tree["source_Jet_PT"].array(), ref["Jet.PT"])
    got = read_with_source(run_guarded, path, ["source:source_Jet_FracPt",
                                               "source:source_Particle_PID"])
    assert len(got) == len(ref) == 10
    for i, n in enumerate(sorted(got)):
        expected = ak.to_numpy(ref["Jet.FracPt[5]"][i])
        assert np.array_equal(got[n]["source:source_Jet_FracPt"], expected)
        assert np.array_equal(got[n]["source:source_Particle_PID"],
                              ak.to_numpy(ref["Particle.PID"][i]))


# -- 3. fixed-size arrays and fixed-size fields ---------------------------------------------------

@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_declared_fixed_size_products_are_written_fixed_size(tmp_path, fmt, run_guarded):
    path = tmp_path / "fixed.root"
    run_ok(run_guarded, job({"type": FixedShapeSource, "count": 12},
                            {"out": output(path, ["source:calib", "source:grid", "source:hits"],
                                           format=fmt, flush_events=5,
                                           rename={"source:hits": "Hit"})}))
    numbers = range(1, 13)
    with uproot.open(path) as f:
        tree = f["Events"]
        if fmt == "ttree":
            assert tree["source_calib"].typename == "float[5]"
            assert tree["source_grid"].typename == "int16_t[2][3]"
            # the records' fixed-size field: its own flat branch, shape recorded
            assert read_shapes(f) == {"Hit_p4": (4,)}
            assert tree["Hit_det_id"].typename == "int32_t[]"
            p4 = restore_inner(tree["Hit_p4"].array(), (4,))
            e, det = tree["Hit_e"].array(), tree["Hit_det_id"].array()
        else:
            hit = tree["Hit"].array()
            p4, e, det = hit["p4"], hit["e"], hit["det_id"]
        assert np.array_equal(tree["source_calib"].array(library="np"),
                              np.stack([calib(n) for n in numbers]))
        assert np.array_equal(tree["source_grid"].array(library="np"),
                              np.stack([grid(n) for n in numbers]))
        assert ak.to_list(p4) == [hits(n)["p4"].tolist() for n in numbers]
        assert ak.to_list(e) == [hits(n)["e"].tolist() for n in numbers]
        assert ak.to_list(det) == [hits(n)["det.id"].tolist() for n in numbers]
    got = read_with_source(run_guarded, path, ["source:source_calib", "source:source_grid"])
    assert sorted(got) == list(numbers)
    for n, products in got.items():
        assert np.array_equal(products["source:source_calib"], calib(n))
        assert np.array_equal(products["source:source_grid"], grid(n))


def test_a_fixed_size_product_of_another_shape_fails_naming_it(tmp_path, run_guarded):
    path = tmp_path / "bad_shape.root"
    result = run_guarded(job({"type": FixedShapeSource, "count": 12, "bad_event": 7},
                             {"out": output(path, ["source:calib"], flush_events=100)}))
    assert result.exit_code == 4
    message = str(result.error)
    for part in ("source:calib", "'source_calib'", "1:1:7", "(5,)", "(4,)", "module 'out'"):
        assert part in message, (part, message)
    assert not path.exists()


# -- 4. configuration errors before the first event ---------------------------------------------

def _config_error(run_guarded, tmp_path, out: dict) -> str:
    """Run ``out`` on products of ``a`` and ``b`` (Numbers): a ConfigError (exit 2) before
    the first event, no file."""
    with pytest.raises(ConfigError) as caught:
        run_guarded(job(empty_source(5), {"a": {"type": Numbers}, "b": {"type": Numbers},
                                          "out": out}))
    assert caught.value.exit_code == 2
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".root", ".partial")]
    assert written == []
    message = str(caught.value)
    assert "module 'out'" in message, message
    return message


@pytest.mark.parametrize("params, parts", [
    ({"rename": {"a": "pt", "b": "pt"}}, ["products a and b are both renamed to 'pt'"]),
    ({"products": ["a:x.y", "a:x_y"]},
     ["products a:x.y and a:x_y are both written as branch 'a_x_y'"]),
    ({"rename": {"a": "b"}}, ["products a and b are both written as branch 'b'"]),
    ({"rename": {"a": "event"}}, ["product a", "'event'", "event IDs"]),
    ({"rename": {"a": "Jet", "b": "nJet"}}, ["product b", "'nJet'", "product a", "counter"]),
    ({"rename": {"a": "Jet.pt"}}, ["'Jet.pt'", "'Jet_pt'"]),
    ({"flush_events": 0}, ["flush_events", "at least 1"]),
], ids=["renamed-alike", "alike-after-rule", "renamed-onto-default", "reserved", "counter",
        "unsafe-rename", "flush_events"])
def test_bad_names_and_flush_events_are_configuration_errors(tmp_path, params, parts,
                                                             run_guarded):
    message = _config_error(run_guarded, tmp_path,
                            output(tmp_path / "o.root", **{"products": ["a", "b"], **params}))
    for part in parts:
        assert part in message, (part, message)


def test_an_output_folder_under_a_regular_file_is_a_configuration_error(tmp_path, run_guarded):
    blocker = tmp_path / "results"
    blocker.write_text("a regular file")
    message = _config_error(run_guarded, tmp_path, output(blocker / "sub" / "o.root", ["a"]))
    assert "module 'out'" in message and "parameter 'file'" in message
    assert str(blocker / "sub" / "o.root") in message and "is not a folder" in message


def test_the_cli_exits_2_for_an_output_under_a_regular_file(tmp_path):
    (tmp_path / "results").write_text("a regular file")
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({
        "source": {"type": "EmptySource", "count": 5},
        "modules": {"hits": {"type": "ToyCaloHitProducer"},
                    "out": {"type": "RootOutput", "products": ["hits"],
                            "file": "results/o.root"}},
        "endpaths": {"e": ["out"]}}))
    job_ = subprocess.run([sys.executable, "-m", "recorun.framework.cli", "w.yaml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert job_.returncode == 2, job_.stderr
    assert "module 'out'" in job_.stderr and "results is not a folder" in job_.stderr
    assert "Traceback" not in job_.stderr and job_.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_configuration_error(tmp_path, run_guarded):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        message = _config_error(run_guarded, tmp_path, output(folder / "o.root", ["a"]))
    finally:
        folder.chmod(0o755)
    assert "module 'out'" in message and "no permission to write" in message


# -- 5. products RootOutput cannot write: the first event that has one ---------------------------

@pytest.mark.parametrize("mode, from_event, parts", [
    ("lists", 1, ["a Python list of list", "cannot write"]),
    ("object", 1, [f"a {__name__}.FourVector", "cannot write"]),
    ("object", 3, [f"a {__name__}.FourVector", "cannot write"]),
    ("float64", 4, ["float64", "float32", "1:1:1"]),
])
def test_an_unwritable_product_fails_at_the_first_event_that_has_it(tmp_path, mode, from_event,
                                                                    parts, run_guarded):
    path = tmp_path / "o.root"
    result = run_guarded(job(empty_source(50), {
        "p": {"type": Unwritable, "mode": mode, "from_event": from_event},
        "out": output(path, ["p:good", "p:bad"], flush_events=1000)}))
    assert result.exit_code == 4, result.error
    message = str(result.error)
    for part in ("module 'out'", "write()", f"on event 1:1:{from_event} ", "'p:bad'",
                 "'p_bad'", *parts):
        assert part in message, (part, message)
    assert result.report["events"]["read"] <= from_event + 4      # not 1000 events later


# -- 6. no event selected -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
@pytest.mark.parametrize("path_modules, branches", [
    (["w", "none"], {"w_word", "w_words"}),     # the products exist in the rejected events
    (["none"], set()),                          # their producer never ran: event IDs only
])
def test_a_job_without_selected_events_writes_an_empty_tree_readable_by_root_source(
        tmp_path, fmt, path_modules, branches, run_guarded):
    path = tmp_path / "none.root"
    run_ok(run_guarded, job(empty_source(8), {
        "w": {"type": Words}, "none": {"type": RejectAll},
        "out": output(path, ["w:word", "w:words"], format=fmt)},
        paths={"p": path_modules}, select=["p"]))
    with uproot.open(path) as f:
        tree = f["Events"]
        assert tree.num_entries == 0
        assert set(tree.keys(recursive=False)) == {"event", "luminosityBlock", "run", *branches}
    got = read_with_source(run_guarded, path, ["source:event"])
    assert got == {}
    if branches:                # a next job consuming the written products: 0 events, no error
        assert read_with_source(run_guarded, path, ["source:w_word"]) == {}


# -- 7. merging parts of all of these -------------------------------------------------------------

def _write_words(path: Path, first: int, count: int, fmt: str, run_guarded) -> str:
    """Words and the FixedShapeSource products of events first..first+count-1."""
    source = {"type": FixedShapeSource, "count": count, "first_event": first}
    run_ok(run_guarded, job(source, {
        "w": {"type": Words},
        "out": output(path, ["w:word", "w:words", "source:calib", "source:grid", "source:hits"],
                      format=fmt, flush_events=3,
                      rename={"w:word": "Word", "source:hits": "Hit"})}))
    return str(path)


@pytest.mark.parametrize("fmt", ["ttree", "rntuple"])
def test_merge_keeps_strings_fixed_sizes_renames_and_empty_parts(tmp_path, fmt, run_guarded):
    single = _write_words(tmp_path / "single.root", 1, 10, fmt, run_guarded)
    parts = [_write_words(tmp_path / name, first, count, fmt, run_guarded)
             for name, first, count in (("a.root", 1, 4), ("b.root", 5, 0), ("c.root", 5, 6))]
    assert uproot.open(parts[1])["Events"].num_entries == 0
    merged = tmp_path / "merged.root"
    RootOutput.merge(parts, str(merged), format=fmt)
    with uproot.open(merged) as a, uproot.open(single) as b:
        assert sorted(a.keys(cycle=False)) == sorted(b.keys(cycle=False))
        assert read_shapes(a) == read_shapes(b)
        assert read_string_lists(a) == read_string_lists(b)
        ta, tb = a["Events"], b["Events"]
        assert ta.num_entries == tb.num_entries == 10
        assert ta.keys() == tb.keys()
        if fmt == "ttree":
            assert ta.typenames() == tb.typenames()
            assert ta["source_calib"].typename == "float[5]"
        assert ak.array_equal(ta.arrays(), tb.arrays())
    # only empty parts: an empty tree, still readable
    only_empty = tmp_path / "only_empty.root"
    RootOutput.merge([parts[1], parts[1]], str(only_empty), format=fmt)
    assert uproot.open(only_empty)["Events"].num_entries == 0
    assert read_with_source(run_guarded, only_empty, []) == {}
    assert sorted(read_with_source(run_guarded, merged, ["source:Word"])) == list(range(1, 11))
