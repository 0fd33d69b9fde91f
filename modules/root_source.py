"""``RootSource``: events from ROOT files (TTree or RNTuple), read with uproot.

Each branch (or RNTuple field) a module consumes becomes the product ``source:<branch>`` of
every event:

* a number per event (``float``, ``int32_t``...): a NumPy scalar of the branch's dtype;
* a fixed-size array per event (``float x[5]``, RNTuple ``std::array<float, 5>``): a NumPy
  array of shape ``(5,)`` (:meth:`RootSource.product_shapes` tells output modules so);
* a string per event (``char*``, ``std::string``, ``TString``): a Python ``str``;
* a list of strings per event (``std::vector<std::string>``, RNTuple
  ``std::vector<std::string>``, and the JSON-encoded string lists recorun writes in TTrees,
  see :mod:`recorun.data.layout`): a Python ``list`` of ``str`` (made once per chunk by
  awkward's ``to_list``, the cheapest way to Python strings);
* a list of numbers per event (``float[]``, NanoAOD's ``Jet_pt``): a 1-D NumPy array, a view
  into the chunk (no copy);
* a list of fixed-size entries (written by recorun, see :mod:`recorun.data.layout`): an
  ``(n, K, ...)`` NumPy array;
* a list of records: a :class:`~framework.Collection`, NumPy views of its fields
  (``c["pt"]``, ``len(c)``, ``c[mask]``); a field of fixed-size entries (Delphes
  ``Jet.FracPt[5]``) is an ``(n, 5)`` array. Collections come from
    - an RNTuple record field ``X`` (``std::vector<Muon>``): ``source:X``;
    - NanoAOD-style branches ``X_a``, ``X_b``... counted by ``nX`` or ``NX`` (``nJet``
      counts ``Jet_pt``; ``NJet`` counts ``Jet_Px`` in older ntuples): ``source:X``, fields
      ``a``, ``b``...;
    - Delphes class branches ``X.a``, ``X.b``... (``Particle.PT``): ``source:X``, fields
      ``a``, ``b``... of numbers or fixed-size arrays of numbers (``FracPt[5]`` is field
      ``FracPt``); ROOT's bookkeeping ``fUniqueID``, ``fBits`` and the fields that are not
      numbers (``TRef``, ``TLorentzVector``...) are left out. Delphes's count branch ``X``
      is replaced by the collection: the count is ``len(source:X)`` (``X_size`` still is a
      branch of its own);
* anything else (lists of lists...): the event's awkward value.

Every member branch of a collection stays a product of its own (``source:Jet_pt``,
``source:Particle.PT``). The two flavours of the same data give the same names: an RNTuple
record field ``Muon`` (subfields ``pt``, ``eta``) gives, besides ``source:Muon``,
``source:Muon_pt`` and ``source:Muon_eta`` (1-D arrays, as the TTree's ``Muon_pt``) and
``source:nMuon`` (the count, an int32 scalar, as NanoAOD's counter), unless the RNTuple has
fields of those names itself.

Only the branches some module consumes are read (plus ``branches``, plus ``run``,
``luminosityBlock`` and ``event``, which give the event IDs when present). Files are read in
order, ``step_size`` events at a time; with ``prefetch`` the next chunk is read, and turned
into per-event products, by a background thread while the current one is processed. Every
entry is an event, also when no branch is consumed. The branches are those of the first file
with entries: an empty file (a job that selected no event writes one with the event IDs only)
gives no event, and when every file is empty a consumed branch may be missing (0 events).

A wrong ``step_size`` or ``skip`` (``skip`` at or past the end of the readable input) is a
configuration error naming the parameter. Every problem with the input is an
:class:`~framework.InputError` naming the file (and tree, branch or entries): missing or
unreadable files, files that are not ROOT, missing trees or branches (with the nearest
names), branches uproot cannot interpret, RNTuples of the pre-release format that uproot
cannot read. With ``skip_bad_files`` a bad file is skipped and listed, with the reason and
the entries already read, in the report's ``source`` section.

Files written by recorun carry their provenance (``recorun_provenance``); it is read once per
file, when the source opens the files, and handed to the job's outputs as their history
(:meth:`RootSource.input_provenance`, :mod:`recorun.framework.provenance`).
"""
from __future__ import annotations

import difflib
import glob
import itertools
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from recorun.data.layout import (decode_string_list, fixed_size_numpy, per_event_fields,
                                 per_event_numpy, read_shapes, read_string_lists)
from recorun import Collection, Event, EventID, InputError, Param, Source, SourceChunk
from recorun.framework import provenance as provenance_io
from recorun.framework.event import tag_label
from recorun.framework.params import ParamError
from recorun.framework.source import split_entries

log = logging.getLogger(__name__)

ID_BRANCHES = ("run", "luminosityBlock", "event")
OLD_RNTUPLE = "ROOT::Experimental::RNTuple"
DELPHES_BOOKKEEPING = ("fUniqueID", "fBits")
_DIMENSIONS = re.compile(r"(\[\d*\])+$")
_STRINGS = ("string", "bytestring")
_END = object()


def _header_problem(path: str) -> str | None:
    """What is visibly wrong with a file's ROOT header (None if nothing is)."""
    with open(path, "rb") as handle:
        head = handle.read(20)
        size = handle.seek(0, 2)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head[:4] != b"root":
        return "not a ROOT file (it does not start with 'root')"
    if len(head) >= 16:
        version = int.from_bytes(head[4:8], "big")
        end = int.from_bytes(head[12:20] if version >= 1000000 else head[12:16], "big")
        if size < end:
            return f"truncated ROOT file: {size} bytes, the header says {end}"
    return None


def _open(path: str):
    """A local ROOT file, read through a memory map (uproot's ``MemmapSource``): no event-loop
    thread of uproot's own (its default handler's, woken through a socket for every basket
    request) competing with the job's threads for the interpreter."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    problem = _header_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        return uproot.open(path, handler=uproot.MemmapSource)
    except Exception as exc:
        raise InputError(f"{path}: cannot open as a ROOT file: {type(exc).__name__}: {exc}") \
            from None


def _old_rntuple(path: str, name: str) -> InputError:
    return InputError(
        f"{path}: '{name}' is an RNTuple of the pre-release format ({OLD_RNTUPLE}, ROOT < "
        f"6.34), which uproot {uproot.__version__} cannot read; convert it with ROOT 6.34 or "
        f"newer")


def _find_tree(file, path: str, name: str):
    """The named TTree/RNTuple, or the file's only one when ``name`` is empty."""
    classes = {key.rsplit(";", 1)[0]: cls for key, cls in file.classnames().items()}
    trees = [k for k, cls in classes.items() if cls in ("TTree", "ROOT::RNTuple")]
    if name:
        if name not in classes:
            near = difflib.get_close_matches(name, list(classes), n=3)
            hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise InputError(f"{path}: no tree '{name}'{hint} (trees: "
                             f"{', '.join(trees) or 'none'})")
        if classes[name] == OLD_RNTUPLE:
            raise _old_rntuple(path, name)
        if name not in trees:
            raise InputError(f"{path}: '{name}' is a {classes[name]}, not a TTree or RNTuple")
        return file[name]
    old = [k for k, cls in classes.items() if cls == OLD_RNTUPLE]
    if not trees and len(old) == 1:
        raise _old_rntuple(path, old[0])
    if len(trees) != 1:
        raise InputError(f"{path}: " + ("has no TTree or RNTuple" if not trees else
                         f"has several trees ({', '.join(trees)}); name one with 'tree'"))
    return file[trees[0]]


# -- what a tree offers -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Product:
    """How one product is made from what uproot reads.

    ``reads``: the uproot keys it needs (TTree branch names, RNTuple field paths ``X.a``).
    ``kind``: ``"value"`` (one key, converted by its layout), ``"collection"`` (one key per
    field, named by ``fields``, sharing one count) or ``"count"`` (the entries per event of
    the list that ``reads[0]`` belongs to)."""

    kind: str
    reads: tuple[str, ...]
    fields: tuple[str, ...] = ()


def _branch_names(tree) -> list[str]:
    if isinstance(tree, uproot.TTree):         # split objects' leaves by name: Particle.PT
        return list(dict.fromkeys(tree.keys(full_paths=False)))
    return [k for k in tree.keys() if "." not in k]


def _numeric_list(branch) -> bool:
    """A TTree branch of a list of numbers (or of fixed-size arrays of numbers) per event."""
    try:
        interpretation = branch.interpretation
    except Exception:
        return False
    content = getattr(interpretation, "content", None)
    return (isinstance(interpretation, uproot.interpretation.jagged.AsJagged)
            and type(content) is uproot.interpretation.numerical.AsDtype
            and content.to_dtype.base.kind in "biuf")


def _count_leaf(branch) -> str | None:
    try:
        leaf = branch.count_leaf
        return None if leaf is None else leaf.member("fName")
    except Exception:
        return None


def _ttree_products(tree, shapes: dict) -> dict[str, _Product]:
    """Every branch, and the NanoAOD-style and Delphes collections."""
    names = _branch_names(tree)
    products = {name: _Product("value", (name,)) for name in names}
    groups: dict[str, list[str]] = {}
    for name in names:
        counter = _count_leaf(tree[name])
        if not counter or counter[0] not in "nN" or counter not in products:
            continue
        prefix = counter[1:]
        if name.startswith(prefix + "_") and _numeric_list(tree[name]):
            groups.setdefault(prefix, []).append(name)
        elif counter == f"n{name}" and name in shapes:   # recorun's X_f of fixed-size entries
            collection, _, field = name.rpartition("_")
            if collection and f"n{collection}" in products:
                groups.setdefault(collection, []).append(name)
    for collection, members in groups.items():
        if collection not in products:
            products[collection] = _Product("collection", tuple(members),
                                            tuple(m[len(collection) + 1:] for m in members))
    seen = set()
    for branch in tree.branches:                   # Delphes: Particle.PT, Particle.Eta...
        if branch.name in seen:
            continue
        seen.add(branch.name)
        members = [sub.name for sub in branch.branches
                   if sub.name.startswith(branch.name + ".") and _numeric_list(sub)
                   and sub.name[len(branch.name) + 1:] not in DELPHES_BOOKKEEPING]
        if members:
            products[branch.name] = _Product("collection", tuple(members), tuple(
                _DIMENSIONS.sub("", m[len(branch.name) + 1:]) for m in members))
    return products


def _numeric_form(form) -> bool:
    while isinstance(form, ak.forms.RegularForm):
        form = form.content
    return isinstance(form, ak.forms.NumpyForm) and not form.parameter("__array__")


def _rntuple_products(tree) -> dict[str, _Product]:
    """Every top-level field, and for a field ``X`` that is a list of records, the TTree
    flavour's names: ``X_a`` for each numeric subfield ``a`` and the count ``nX``."""
    names = _branch_names(tree)
    products = {name: _Product("value", (name,)) for name in names}
    form = tree.to_akform()[0]
    for name in names:
        field = form.content(name)
        if not (isinstance(field, (ak.forms.ListOffsetForm, ak.forms.ListForm))
                and isinstance(field.content, ak.forms.RecordForm)):
            continue
        record = field.content
        numeric = [sub for sub in record.fields if _numeric_form(record.content(sub))]
        for sub in numeric:
            products.setdefault(f"{name}_{sub}", _Product("value", (f"{name}.{sub}",)))
        if record.fields:
            products.setdefault(f"n{name}", _Product("count", (f"{name}.{record.fields[0]}",)))
    return products


def _fixed_shapes(tree, names) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the event-level fixed-size arrays of numbers among ``names``."""
    shapes = {}
    if isinstance(tree, uproot.TTree):
        for name in names:
            try:
                interpretation = tree[name].interpretation
            except Exception:
                continue
            if (type(interpretation) is uproot.interpretation.numerical.AsDtype
                    and interpretation.inner_shape):
                shapes[name] = tuple(interpretation.inner_shape)
        return shapes
    form = tree.to_akform()[0]
    for name in names:
        field, shape = form.content(name), []
        while isinstance(field, ak.forms.RegularForm):
            shape.append(field.size)
            field = field.content
        if shape and _numeric_form(field):
            shapes[name] = (*shape, *field.inner_shape)
    return shapes


def _cluster_edges(path: str, tree_name: str) -> list[int]:
    """The entry numbers where the clusters of a file's tree begin (and its end)."""
    try:
        with uproot.open(path) as file:
            tree = file[tree_name]
            if callable(getattr(tree, "common_entry_offsets", None)):        # TTree
                return [int(e) for e in tree.common_entry_offsets()]
            edges, at = [0], 0                                              # RNTuple
            for cluster in getattr(tree, "cluster_summaries", None) or []:
                at += int(getattr(cluster, "num_entries", 0))
                edges.append(at)
            return edges
    except Exception as exc:
        raise InputError(f"{path}: cannot read the layout of tree '{tree_name}' to cut it into "
                         f"chunks: {type(exc).__name__}: {exc}") from None


def _check_readable(tree, path: str, names) -> None:
    if not isinstance(tree, uproot.TTree):
        return
    for name in names:
        interpretation = tree[name].interpretation
        if isinstance(interpretation, uproot.interpretation.identify.UnknownInterpretation):
            raise InputError(f"{path}: branch '{name}' of type '{tree[name].typename}' cannot "
                             f"be read by uproot ({interpretation})")


# -- per-event values of a chunk --------------------------------------------------------------

def _slices(values: np.ndarray, offsets: np.ndarray) -> list:
    bounds = offsets.tolist()
    return [values[a:b] for a, b in zip(bounds, bounds[1:])]


def _collections(fields: dict[str, np.ndarray], offsets: np.ndarray) -> list:
    bounds = offsets.tolist()
    items = list(fields.items())
    return [Collection({name: values[a:b] for name, values in items})
            for a, b in zip(bounds, bounds[1:])]


def _per_event(array: ak.Array, shape=(), string_list: bool = False) -> list:
    """One branch's values of a chunk, one Python object per event (see the module doc)."""
    layout = array.layout
    values = fixed_size_numpy(layout)
    if values is not None:                       # numbers, fixed-size arrays of numbers
        return list(values)
    if layout.parameter("__array__") in _STRINGS:
        strings = array.to_list()
        return [decode_string_list(s) for s in strings] if string_list else strings
    if layout.is_list and layout.content.parameter("__array__") in _STRINGS:
        return array.to_list()
    fields = per_event_fields(array)
    if fields is not None:
        return _collections(*fields)
    split = per_event_numpy(array, shape)
    if split is not None:
        return _slices(*split)
    return list(array)


class _Chunk:
    """One chunk of events: their IDs and their product dicts, ready to hand out."""

    __slots__ = ("size", "ids", "products")

    def __init__(self, ids: list, products: list):
        self.size, self.ids, self.products = len(ids), ids, products


def _entries_only(start: int, stop: int, step: int):
    """Chunks of entries with no branch read (no module consumes any, the file has no event
    IDs): records without fields, one per entry, so that every entry is still an event."""
    for first in range(start, stop, step):
        yield ak.Array(ak.contents.RecordArray([], [], length=min(step, stop - first)))


class _ChunkReader:
    """Turns the arrays uproot reads from one file's tree into :class:`_Chunk` s."""

    def __init__(self, source: "RootSource", path: str, tree, file):
        self.source, self.path = source, path
        self.rntuple = not isinstance(tree, uproot.TTree)
        keys = set(tree.keys() if self.rntuple else tree.keys(full_paths=False))
        missing = [key for key in source.selected if key not in keys]
        if missing:
            raise InputError(f"{path}: tree '{tree.name}' has no branch "
                             f"'{missing[0]}' ({source._first_path} has it)")
        # a whole RNTuple field makes the keys of its subfields moot
        self.reads = [key for key in source.selected
                      if not (self.rntuple and key.partition(".")[0] in source.selected
                              and "." in key)]
        self.shapes = read_shapes(file)
        self.string_lists = read_string_lists(file)
        self.tags = [f"{source.label}:{name}" for name in source.wanted]
        self.products = [source._products[name] for name in source.wanted]

    def chunk(self, arrays: ak.Array, numbered: int) -> _Chunk:
        """``numbered``: the events read before this chunk (they number events when the
        files have no 'event' branch)."""
        size = len(arrays)
        columns = [self._values(arrays, product) for product in self.products]
        products = ([dict(zip(self.tags, row)) for row in zip(*columns)] if columns
                    else [{} for _ in range(size)])
        return _Chunk(self._ids(arrays, size, numbered), products)

    def _column(self, arrays: ak.Array, key: str) -> ak.Array:
        if self.rntuple and "." in key:                  # an RNTuple subfield: X.a
            outer, _, inner = key.partition(".")
            return arrays[outer][inner]
        return arrays[key]

    def _values(self, arrays: ak.Array, product: _Product) -> list:
        """One product's per-event values."""
        if product.kind == "count":
            counts = ak.num(self._column(arrays, product.reads[0]), axis=1)
            return list(ak.to_numpy(counts).astype(np.int32))
        if product.kind == "value":
            key = product.reads[0]
            return _per_event(self._column(arrays, key), self.shapes.get(key, ()),
                              key in self.string_lists)
        fields, offsets = {}, None
        for field, key in zip(product.fields, product.reads):
            split = per_event_numpy(self._column(arrays, key), self.shapes.get(key, ()))
            if split is None:
                raise InputError(f"{self.path}: branch '{key}' is not a list of numbers per event "
                                 f"and cannot be a field of a collection")
            if offsets is None:
                offsets = split[1]
            elif not np.array_equal(split[1], offsets):
                raise InputError(f"{self.path}: branch '{key}' has not as many entries per event as "
                                 f"'{product.reads[0]}': they cannot form one collection")
            fields[field] = split[0]
        return _collections(fields, offsets)

    def _ids(self, arrays: ak.Array, size: int, numbered: int) -> list:
        source = self.source
        if "event" in arrays.fields:
            def ints(name, default):
                if name not in arrays.fields:
                    return itertools.repeat(default)
                return ak.to_numpy(arrays[name]).tolist()
            return list(map(EventID, ints("run", source.run), ints("luminosityBlock", 1),
                            ints("event", 0)))
        first = source.first_event + source.skip + numbered
        return [EventID(source.run, 1, number) for number in range(first, first + size)]


class RootSource(Source):
    """Events from ROOT files (TTree or RNTuple), read with uproot."""

    files = Param(str | list[str], doc="files or glob patterns, read in this order")
    tree = Param(str, "", doc="TTree or RNTuple name (empty: the file's only one)")
    branches = Param(list[str], [], doc="branches to read even when no module consumes them")
    step_size = Param(int, 1000, doc="events read per chunk (at least 1)")
    skip = Param(int, 0, doc="entries to skip at the start (across files); less than the "
                             "entries of the readable files")
    first_event = Param(int, 1, doc="number of the first entry when the files have no 'event' "
                                    "branch (entry k is event first_event + k, skip or not)")
    run = Param(int, 1, doc="run number when the files have no 'run' branch")
    skip_bad_files = Param(bool, False, doc="skip unreadable files (listed in the report)")
    prefetch = Param(bool, True, doc="read the next chunk in a background thread")

    def __init__(self, **params):
        super().__init__(**params)
        if self.step_size < 1:
            raise ParamError("step_size", f"step_size must be at least 1 (got {self.step_size})")
        if self.skip < 0:
            raise ParamError("skip", f"skip must be 0 or more (got {self.skip})")
        self.skipped: list[dict] = []
        self.paths = self._expand(self.files)
        self._entries: dict[str, int] = {}
        self._edges: dict[str, list[int]] = {}           # cluster edges, once asked (chunks)
        self._provenance: dict[str, dict] = {}           # recorun files' provenance, per file
        first = None
        for path in self.paths:
            try:
                file = _open(path)
                tree = _find_tree(file, path, self.tree)
                self._entries[path] = tree.num_entries
                self._read_provenance(file, path)
                # the branches are those of the first file with entries: an empty file
                # (a job that selected no event) may lack the products' branches
                if first is None or (first[2].num_entries == 0 and tree.num_entries > 0):
                    first = (path, file, tree)
            except InputError as exc:
                self._bad_file(path, exc, 0)
        if first is None:
            raise InputError("RootSource: no readable input file among "
                             f"{', '.join(self.paths)}")
        self.paths = [p for p in self.paths if p in self._entries]
        self._check_skip()
        self._first_path, self._first_file, self._first_tree = first
        self.tree_name = self._first_tree.name
        self.available = _branch_names(self._first_tree)
        self._products = (_ttree_products(self._first_tree, read_shapes(self._first_file))
                          if isinstance(self._first_tree, uproot.TTree)
                          else _rntuple_products(self._first_tree))
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.wanted: list[str] = []                  # the products every event carries
        self.selected: list[str] = []                # the uproot keys read
        self._want([b for b in ID_BRANCHES if b in self.available], "event ID")
        self._want(self.branches, "branches")

    # -- set-up -----------------------------------------------------------------------------
    def _expand(self, patterns) -> list[str]:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        paths: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    self._bad_file(pattern, InputError(f"{pattern}: no file matches"), 0)
                paths.extend(matches)
            else:
                paths.append(pattern)
        if not paths:
            raise InputError("RootSource: 'files' names no file")
        return paths

    def _check_skip(self) -> None:
        """``skip`` must leave at least one entry of the readable files."""
        total = sum(self._entries.values())
        if self.skip and self.skip >= total:
            count = len(self.paths)
            names = ", ".join(self.paths[:3]) + (f" and {count - 3} more" if count > 3 else "")
            files = f"{count} file{'s' if count > 1 else ''}: {names}"
            raise ParamError("skip", f"skip {self.skip} is past the end of the input ({total} "
                                     f"entries in {files})")

    def _read_provenance(self, file, path: str) -> None:
        """Keep the provenance of a file recorun wrote (read once, when the file is opened
        here); a damaged one is logged and left out."""
        try:
            record = provenance_io.read(file, path)
        except Exception as exc:
            log.warning("RootSource: %s: its provenance cannot be read (%s); the output's "
                        "history leaves it out", path, exc)
            return
        if record is not None:
            self._provenance[path] = record

    def _bad_file(self, path: str, error: Exception, entries_read: int) -> None:
        if not self.skip_bad_files:
            raise error if isinstance(error, InputError) else InputError(str(error))
        log.warning("RootSource: skipping %s: %s", path, error)
        self.skipped.append({"file": path, "reason": str(error), "entries_read": entries_read})

    def _want(self, names, what: str) -> None:
        for name in names:
            product = self._products.get(name)
            if product is None and not sum(self._entries.values()):
                # every file is empty (jobs that selected no event): no event will need it
                log.info("RootSource: %s has no branch '%s', and no entry: 0 events",
                         self._first_path, name)
                self._products[name] = _Product("absent", ())
                continue
            if product is None:
                near = difflib.get_close_matches(name, list(self._products), n=3)
                hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
                raise InputError(f"{self._first_path}: tree '{self.tree_name}' has no branch "
                                 f"'{name}' ({what}){hint}")
            _check_readable(self._first_tree, self._first_path, product.reads)
            if name not in self.wanted:
                self.wanted.append(name)
            self.selected.extend(r for r in product.reads if r not in self.selected)

    def product_tags(self) -> list[str]:
        return [f"{self.label}:{name}" for name in self._products]

    def product_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{tag: shape}`` of the event-level fixed-size arrays among the tree's branches
        (TTree ``float x[5]``, RNTuple ``std::array<float, 5>``: ``(5,)``)."""
        if self._shapes is None:
            tree = self._first_tree
            if tree is None:
                tree = _find_tree(_open(self._first_path), self._first_path, self.tree)
            names = [n for n, p in self._products.items() if p.kind == "value" and p.reads == (n,)]
            self._shapes = _fixed_shapes(tree, names)
        return {f"{self.label}:{name}": shape for name, shape in self._shapes.items()}

    def select_products(self, tags) -> None:
        wanted = [tag.partition(":")[2] for tag in sorted(tags) if tag_label(tag) == self.label]
        self._want([w for w in wanted if w], "consumed by a module")

    # -- reading ----------------------------------------------------------------------------
    def total_events(self) -> int | None:
        return self.planned_events(self._max)

    def open(self, max_events):
        self._max = max_events
        self._chunks: queue.Queue = queue.Queue(maxsize=1 if self.prefetch else 0)
        self._stop = threading.Event()
        self._chunk = _Chunk([], [])
        self._row = 0
        self._first_tree = None          # the reader opens files itself
        if self.prefetch:
            self._reader = threading.Thread(target=self._read_all, name="recorun-root-reader",
                                            daemon=True)
            self._reader.start()
        else:
            self._reader = None
            self._sync_chunks = self._chunk_iter()

    def _chunk_iter(self):
        """Chunks of all files in order, after ``skip`` entries; at most ``max_events``."""
        to_skip = self.skip
        left = self._max
        numbered = 0
        for path in self.paths:
            if left == 0 or self._stop.is_set():
                return
            entries = self._entries[path]
            if to_skip >= entries:
                to_skip -= entries
                continue
            start, to_skip = to_skip, 0
            stop = entries if left is None else min(entries, start + left)
            done = start
            try:
                file, self._first_file = self._first_file, None   # the constructor's, once
                if file is None or path != self._first_path:
                    file = _open(path)
                tree = _find_tree(file, path, self.tree)
                reader = _ChunkReader(self, path, tree, file)
                pieces = (tree.iterate(reader.reads, step_size=self.step_size,
                                       entry_start=start, entry_stop=stop, library="ak")
                          if reader.reads else _entries_only(start, stop, self.step_size))
                for arrays in pieces:
                    yield reader.chunk(arrays, numbered)
                    done += len(arrays)
                    numbered += len(arrays)
                    if left is not None:
                        left -= len(arrays)
                    if self._stop.is_set():
                        return
            except InputError as exc:
                self._bad_file(path, exc, done - start)
            except Exception as exc:
                self._bad_file(path, InputError(
                    f"{path}: reading entries {done} to {stop - 1} of tree '{self.tree_name}' "
                    f"failed: {type(exc).__name__}: {exc}"), done - start)

    def _read_all(self) -> None:
        try:
            for chunk in self._chunk_iter():
                self._hand_over(chunk)
        except Exception as exc:
            self._hand_over(exc)
            return
        self._hand_over(_END)

    def _hand_over(self, item) -> None:
        """Queue ``item`` for the framework; give up when the job is closing the source."""
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _next_chunk(self) -> _Chunk | None:
        if self._reader is None:
            try:
                return next(self._sync_chunks)
            except StopIteration:
                return None
        item = self._chunks.get()
        if item is _END:
            self._chunks.put(_END)
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def next_event(self, index: int) -> Event | None:
        chunk, row = self._chunk, self._row
        if row >= chunk.size:
            chunk, row = self._next_nonempty_chunk(), 0
            if chunk is None:
                return None
        self._row = row + 1
        return Event(chunk.ids[row], index, chunk.products[row])

    def _next_nonempty_chunk(self) -> _Chunk | None:
        while True:
            chunk = self._next_chunk()
            if chunk is None:
                return None
            if chunk.size:
                self._chunk = chunk
                return chunk

    def planned_events(self, max_events):
        total = max(sum(self._entries.values()) - self.skip, 0)
        return total if max_events is None else min(total, max_events)

    def chunks(self, max_events, size):
        """The job's entries (after ``skip``, up to ``max_events``) cut into chunks of about
        ``size`` entries, each within one file, cut on the file's cluster boundaries
        (``TTree.common_entry_offsets()``, RNTuple cluster summaries) when one lies within half
        a chunk of the target, so that each cluster's baskets are read by one chunk."""
        to_skip, left = self.skip, max_events
        found: list[SourceChunk] = []
        before = index = 0                  # entries of earlier files; events planned so far
        for path in self.paths:
            if left == 0:
                break
            entries = self._entries[path]
            start = min(to_skip, entries)
            to_skip -= start
            stop = entries if left is None else min(entries, start + left)
            if stop > start:
                if path not in self._edges:
                    self._edges[path] = _cluster_edges(path, self.tree_name)
                edges = self._edges[path]
                for a, b in split_entries(start, stop, edges, size):
                    where = os.path.abspath(path)
                    found.append(SourceChunk(len(found), index, b - a, {
                        "files": [where], "skip": a, "first_event": self.first_event + before},
                        where, a))
                    index += b - a
            if left is not None:
                left -= stop - start
            before += entries
        return found

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def input_files(self) -> list[str]:
        return list(self.paths)

    def input_provenance(self) -> list[dict]:
        """The provenance of each input file recorun wrote, in file order (read when the
        source was made): the history of the job's outputs
        (:mod:`recorun.framework.provenance`)."""
        return [self._provenance[p] for p in self.paths if p in self._provenance]

    def summary(self) -> dict:
        return {"type": "RootSource", "files": self.paths, "tree": self.tree_name,
                "branches": self.selected, "skipped_files": self.skipped}
