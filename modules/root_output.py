"""``RootOutput``: writes products of selected events to a ROOT file with uproot.

One entry per written event, in event order (the framework calls ordered outputs in event
order), so the file is the same for any number of threads. ``event_id`` columns ``run``,
``luminosityBlock`` and ``event`` are always written.

**Branch names.** Product ``label:instance`` becomes the branch ``label_instance`` (``label``
for the default instance), or the name ``rename`` gives it. One rule makes every name safe for
ROOT and uproot (:func:`recorun.data.layout.safe_name`): a trailing dimension suffix ``[N]``
is dropped (the shape lives in the array), and every character other than a letter, a digit
or ``_`` becomes ``_``: the Delphes product ``source:Jet.FracPt[5]`` is written as
``source_Jet_FracPt``. Collection field names follow the same rule. ``rename`` targets must
already be safe names. Two products may not end up with one name, nor with ``run``,
``luminosityBlock``, ``event`` or ``n<name>`` of another product's branch (the counter
RootOutput writes for a list per event): configuration errors (exit 2) before the first event.

**Layouts.** Each product is laid out by what it holds in the first written event; every later
event must hold the same kind of value (same Python type, same dtype, same number of
dimensions), or the job fails at that event naming the product, the branch and both types:

==================================  ===================================================
product per event                   TTree branch(es)
==================================  ===================================================
a number (Python or NumPy)          a number (``double``, ``int64_t``, ``float``...)
a ``str``                           a string (``char*``)
a list/tuple/array of ``str``       a string holding the list as JSON, listed in the file
                                    (see :mod:`recorun.data.layout`)
a NumPy array whose shape the       a fixed-size branch ``float x[5]``; a value of another
source declared fixed               shape is an error
(:attr:`product_shapes`)
1-D NumPy array of numbers          a jagged branch with counter ``n<name>``
(n, K, ...) NumPy array             flat jagged ``n*K*...`` values; the shape is kept in
                                    the file (see :mod:`recorun.data.layout`) and restored on
                                    reading
structured NumPy array or           NanoAOD-style: ``<name>_<field>`` branches sharing the
Collection (records)                counter ``n<name>``; a field with a fixed shape per entry
                                    is its own flat branch (see :mod:`recorun.data.layout`)
==================================  ===================================================

RNTuple (``format: rntuple``) stores every layout of this table natively (lists of strings as
``var * string``, no flattened shapes). An awkward array per event is written as the NumPy
arrays it converts to. Anything else (lists of lists, such as a ``vector<vector<double>>``
branch read by RootSource; Python lists of numbers: use NumPy arrays; arbitrary Python
objects) cannot be written, in a TTree or an RNTuple: the job fails at the first event that
has it, naming the product, the branch and the type.

**No event.** A job that writes no event still writes the tree with no entry, its branches
typed from the products of an event it did not write (:meth:`skipped`: the first one holding
every product); when no event held them all (their producer ran only for this output), the
tree has the ``run``, ``luminosityBlock`` and ``event`` branches only. A reader finds a
valid, empty tree.

**Provenance.** When it closes the file (also one with no event), RootOutput writes what made
its products as JSON text in the ``TObjString`` ``recorun_provenance``
(:mod:`recorun.framework.provenance`): the workflow after ``--set``, recorun's version, the
process name, host and start time, the input files and the processes that made them, and for
each product the type and parameters of every module it depends on (a SONIC producer's model,
version and the servers that answered). ``recorun provenance FILE`` prints it.

The file is written as ``<file>.partial`` and renamed to ``file`` only when the job processed
every event; a job that stopped early leaves the ``.partial`` file and says so. The output's
folder, ``rename`` and ``flush_events`` are checked when the module is built, before the first
event.

On a farm (``recorun --executor dask``, :mod:`recorun.farm.executor`) each chunk of the input writes
its own part file and :meth:`RootOutput.merge` concatenates the parts in chunk order: the
same tree, branches (counters and NanoAOD-style collections rebuilt as written), entries and
``recorun_shapes`` / ``recorun_string_lists`` entries as one job's file, and one provenance
(the parts' inputs joined, the events and the SONIC servers' requests added up).
"""
from __future__ import annotations

import logging
import math
import os
from itertools import chain
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from recorun.data.layout import (branch_name, encode_string_list, read_shapes,
                                 read_string_lists, safe_name, write_shapes, write_string_lists)
from recorun import Collection, ConfigError, InputTagList, OutputModule, Param, ProductNotFound
from recorun.framework import provenance as provenance_io
from recorun.framework.event import canonical_tag
from recorun.framework.params import ParamError

log = logging.getLogger(__name__)

COMPRESSION = {"zstd": uproot.ZSTD, "zlib": uproot.ZLIB, "lzma": uproot.LZMA, "lz4": uproot.LZ4}
ID_TYPES = {"run": np.dtype(np.int32), "luminosityBlock": np.dtype(np.int32),
            "event": np.dtype(np.int64)}
NUMBER_KINDS = "biuf"
GATHER_BYTES = 32768        # records per event from which they are gathered event by event


def parse_compression(text: str):
    """``"zstd:1"``, ``"lz4:4"``, ``"zlib:1"``, ``"lzma:2"`` or ``"none"``."""
    if text == "none":
        return None
    algorithm, _, level = text.partition(":")
    if algorithm not in COMPRESSION or not level.isdigit():
        raise ValueError(f"compression '{text}': expected one of "
                         f"{', '.join(f'{a}:LEVEL' for a in COMPRESSION)} or 'none'")
    return COMPRESSION[algorithm](int(level))


def open_partial(partial: Path):
    """``partial`` (``<file>.partial``) created anew for writing, never through a symbolic
    link: a link planted at that name is refused (ConfigError, exit 2), a file left by an
    earlier job is replaced, and the new one is created exclusively (``O_EXCL | O_NOFOLLOW``),
    so that nothing else can be overwritten through it. Its folder is made if needed."""
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output's folder {partial.parent}: "
                          f"{exc.strerror or exc}") from None
    if partial.is_symlink():
        raise ConfigError(f"{partial} is a symbolic link: the output is written there first "
                          f"and recorun does not write through links (remove it)")
    try:
        partial.unlink()                      # an earlier job's, interrupted
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot replace {partial}: {exc.strerror or exc}") from None
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(partial, flags, 0o644)
    except FileExistsError:
        raise ConfigError(f"{partial} appeared while recorun was creating it: another job "
                          f"writes the same output") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {partial}: {exc.strerror or exc}") from None
    return os.fdopen(fd, "w+b")


def unwritable_path(path: Path) -> str | None:
    """Why ``path`` cannot be created (None when it can): its nearest existing folder is a
    regular file, or is not writable, or the path itself is a folder."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return f"{path} is a folder"
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


# -- what a product is per event -----------------------------------------------------------------

def describe(value) -> str:
    """A value's type as an error message names it."""
    if isinstance(value, np.ndarray):
        return f"a NumPy array of {value.dtype} with shape {value.shape}"
    if isinstance(value, Collection):
        return f"a Collection of fields {list(value.fields)}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a Python {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    if isinstance(value, ak.Array):
        return f"an awkward array of type {value.type}"
    cls = type(value)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _scalar_dtype(value) -> np.dtype | None:
    """The dtype of a number (Python or NumPy, or a 0-d array); None for anything else."""
    if isinstance(value, bool):
        return np.dtype(np.bool_)
    if isinstance(value, int):
        return np.dtype(np.int64)
    if isinstance(value, float):
        return np.dtype(np.float64)
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        return value.dtype
    return None


def _all_str(value) -> bool:
    return all(isinstance(s, str) for s in value)


def _from_awkward(value):
    """An awkward array of numbers (or records of numbers) as NumPy arrays (the value itself
    when it is not one)."""
    if not isinstance(value, ak.Array):
        return value
    try:
        if value.fields:
            return Collection({f: ak.to_numpy(value[f]) for f in value.fields})
        return ak.to_numpy(value)
    except (ValueError, TypeError):
        return value


def _offsets(counts: np.ndarray, scale: int = 1) -> ak.index.Index64:
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    if scale != 1:
        offsets *= scale
    return ak.index.Index64(offsets)


def _counts(values: list) -> np.ndarray:
    return np.fromiter(map(len, values), np.int64, len(values))


def _numbers(content: np.ndarray) -> ak.contents.Content:
    """``content`` as an awkward layout, its inner dimensions as regular lists."""
    layout = ak.contents.NumpyArray(content)
    return layout.to_RegularArray() if content.ndim > 1 else layout


def _strings(texts: list) -> ak.Array:
    """Python strings as an awkward string array, built from one buffer."""
    encoded = [t.encode() for t in texts]
    return ak.Array(_string_layout(encoded))


def _string_layout(encoded: list) -> ak.contents.Content:
    content = np.frombuffer(b"".join(encoded), np.uint8)
    chars = ak.contents.NumpyArray(content, parameters={"__array__": "char"})
    return ak.contents.ListOffsetArray(_offsets(_counts(encoded)), chars,
                                       parameters={"__array__": "string"})


class _Column:
    """One product's values in the buffered events, and the branches they become.

    ``matches`` is the cheap per-event check that a value has the first event's kind;
    ``arrays`` turns the buffered values into uproot's columns (``{branch: array}``)."""

    convert = None          # applied to each event's value before ``matches``

    def __init__(self, tag: str, name: str, first, first_id):
        self.tag, self.name = tag, name
        self.first, self.first_id = describe(first), first_id
        self.values: list = []

    def matches(self, value) -> bool:
        raise NotImplementedError

    def mismatch(self, value, event_id) -> Exception:
        return TypeError(f"product '{self.tag}' (branch '{self.name}') holds {describe(value)} "
                         f"in event {event_id}, but held {self.first} in the first written "
                         f"event {self.first_id}: a branch keeps the type of the first event")

    def branches(self, fmt: str) -> list[str]:
        """Every branch (counters included) this product writes."""
        return [self.name]

    def arrays(self, fmt: str) -> dict:
        raise NotImplementedError

    def shapes(self, fmt: str) -> dict[str, tuple]:
        """Inner shapes of branches written flat (TTree)."""
        return {}

    def string_lists(self, fmt: str) -> list[str]:
        """Branches holding JSON-encoded lists of strings (TTree)."""
        return []


class _Scalars(_Column):
    def __init__(self, tag, name, first, first_id, dtype):
        super().__init__(tag, name, first, first_id)
        self.type, self.dtype = type(first), dtype

    def matches(self, value):
        return type(value) is self.type or _scalar_dtype(value) == self.dtype

    def arrays(self, fmt):
        return {self.name: np.fromiter(self.values, self.dtype, len(self.values))}


class _Strings(_Column):
    def matches(self, value):
        return isinstance(value, str)

    def arrays(self, fmt):
        return {self.name: _strings(self.values)}


class _StringLists(_Column):
    def matches(self, value):
        return (isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray)
                                                     and value.ndim == 1)) and _all_str(value)

    def arrays(self, fmt):
        if fmt == "ttree":
            return {self.name: _strings([encode_string_list(v) for v in self.values])}
        encoded = [s.encode() for v in self.values for s in v]
        return {self.name: ak.Array(ak.contents.ListOffsetArray(
            _offsets(_counts(self.values)), _string_layout(encoded)))}

    def string_lists(self, fmt):
        return [self.name] if fmt == "ttree" else []


class _Fixed(_Column):
    """A product the source declared fixed-size: every value has ``shape``."""

    def __init__(self, tag, name, first, first_id, shape):
        super().__init__(tag, name, first, first_id)
        self.shape, self.dtype = shape, first.dtype

    def matches(self, value):
        return type(value) is np.ndarray and value.shape == self.shape \
            and value.dtype == self.dtype

    def mismatch(self, value, event_id):
        return ValueError(f"product '{self.tag}' (branch '{self.name}') is fixed-size "
                          f"{self.shape} ({self.dtype}), as the source declared it, but holds "
                          f"{describe(value)} in event {event_id}")

    def arrays(self, fmt):
        return {self.name: np.stack(self.values)}


class _Jagged(_Column):
    """A NumPy array of numbers per event, of shape ``(n, *inner)``."""

    def __init__(self, tag, name, first, first_id):
        super().__init__(tag, name, first, first_id)
        self.dtype, self.ndim, self.inner = first.dtype, first.ndim, first.shape[1:]

    def matches(self, value):
        return type(value) is np.ndarray and value.ndim == self.ndim \
            and (value.dtype is self.dtype or value.dtype == self.dtype) \
            and value.shape[1:] == self.inner

    def branches(self, fmt):
        return [self.name, f"n{self.name}"]

    def arrays(self, fmt):
        counts = _counts(self.values)
        content = np.concatenate(self.values)
        if fmt == "ttree" and self.inner:
            size = math.prod(self.inner)
            layout = ak.contents.ListOffsetArray(_offsets(counts, size),
                                                 ak.contents.NumpyArray(content.reshape(-1)))
        else:
            layout = ak.contents.ListOffsetArray(_offsets(counts), _numbers(content))
        return {self.name: ak.Array(layout)}

    def shapes(self, fmt):
        return {self.name: self.inner} if fmt == "ttree" and self.inner else {}


class _Records(_Column):
    """A structured NumPy array or a Collection per event: ``fields`` maps each written field
    name to the value's key, its dtype and its inner shape."""

    def __init__(self, tag, name, first, first_id, fields: dict):
        super().__init__(tag, name, first, first_id)
        self.fields = fields
        self.type = type(first)
        self.dtype = first.dtype if isinstance(first, np.ndarray) else None
        self.keys = tuple(key for key, _, _ in fields.values())

    def matches(self, value):
        if self.dtype is not None:
            return type(value) is np.ndarray and (value.dtype is self.dtype
                                                  or value.dtype == self.dtype)
        return type(value) is Collection and value.fields == self.keys

    def _flat(self, fmt):
        """Fields written as separate flat branches (TTree fields with a fixed inner shape)."""
        return {f for f, (_, _, inner) in self.fields.items() if inner and fmt == "ttree"}

    def branches(self, fmt):
        if fmt != "ttree":
            return [self.name]
        flat = self._flat(fmt)
        names = [self.name, f"n{self.name}"]
        for field in self.fields:
            names.append(f"{self.name}_{field}")
            if field in flat:
                names.append(f"n{self.name}_{field}")
        return names

    def _contents(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """Each field's values of all buffered events. Structured arrays: large ones are
        copied event by event into contiguous fields, all fields of one event while it is in
        the cache; small ones are joined as raw bytes in one copy, their fields strided views
        (uproot's own conversion to big-endian then gathers them). Collections: field by
        field."""
        values = self.values
        if self.dtype is not None:
            if counts.sum() * self.dtype.itemsize >= GATHER_BYTES * len(values):
                return self._gathered(counts)
            if all(v.flags.c_contiguous for v in values):
                joined = np.concatenate([v.view(np.uint8) for v in values]).view(self.dtype)
                return {field: joined[key] for field, (key, _, _) in self.fields.items()}
        contents = {}
        for field, (key, dtype, _) in self.fields.items():
            content = contents[field] = np.concatenate([v[key] for v in values])
            if content.dtype != dtype:
                raise TypeError(f"product '{self.tag}' (branch '{self.name}'): field '{key}' "
                                f"holds {content.dtype} in some of these events, {dtype} in the "
                                f"first written event {self.first_id}")
        return contents

    def _gathered(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        edges = np.concatenate([[0], np.cumsum(counts)]).tolist()
        contents = {field: np.empty((edges[-1], *inner), dtype)
                    for field, (_, dtype, inner) in self.fields.items()}
        targets = [(key, contents[field]) for field, (key, _, _) in self.fields.items()]
        for value, start, stop in zip(self.values, edges, edges[1:]):
            for key, target in targets:
                target[start:stop] = value[key]
        return contents

    def arrays(self, fmt):
        counts = _counts(self.values)
        flat = self._flat(fmt)
        out, names, contents = {}, [], []
        for field, content in self._contents(counts).items():
            inner = self.fields[field][2]
            if field in flat:
                out[f"{self.name}_{field}"] = ak.Array(ak.contents.ListOffsetArray(
                    _offsets(counts, math.prod(inner)),
                    ak.contents.NumpyArray(content.reshape(-1))))
            else:
                names.append(field)
                contents.append(_numbers(content))
        if names:
            record = ak.contents.RecordArray(contents, names, length=int(counts.sum()))
            out[self.name] = ak.Array(ak.contents.ListOffsetArray(_offsets(counts), record))
        return out

    def shapes(self, fmt):
        return {f"{self.name}_{f}": self.fields[f][2] for f in self._flat(fmt)}


def _record_fields(tag: str, name: str, value, event_id) -> dict:
    """``{safe field name: (key, dtype, inner shape)}`` of a structured array or Collection."""
    if isinstance(value, Collection):
        items = [(key, value[key].dtype, value[key].shape[1:]) for key in value.fields]
    else:
        items = [(key, value.dtype[key].base, value.dtype[key].shape) for key in value.dtype.names]
    fields: dict = {}
    for key, dtype, inner in items:
        if dtype.kind not in NUMBER_KINDS:
            raise TypeError(f"product '{tag}' (branch '{name}'): field '{key}' holds {dtype} "
                            f"in event {event_id}; RootOutput writes collections of numbers")
        field = safe_name(key)
        if field in fields:
            raise ValueError(f"product '{tag}' (branch '{name}'): fields '{fields[field][0]}' "
                             f"and '{key}' are both written as '{name}_{field}' (branch names "
                             f"hold letters, digits and '_' only)")
        fields[field] = (key, dtype, inner)
    if not fields:
        raise TypeError(f"product '{tag}' (branch '{name}') is a collection without fields in "
                        f"event {event_id}")
    return fields


class _Example:
    """An event's ID and products, kept to type the branches of an output that wrote none."""

    def __init__(self, event_id, products: dict):
        self.id, self._products = event_id, products

    def get(self, tag: str):
        return self._products[tag]


def new_column(tag: str, name: str, value, event_id, shape=None) -> _Column:
    """The column for a product whose first written value is ``value``; TypeError when
    RootOutput cannot write it. ``shape``: the fixed shape the source declared, if any."""
    convert = _from_awkward if isinstance(value, ak.Array) else None
    original, value = value, convert(value) if convert else value
    column = _column_for(tag, name, value, event_id, shape)
    if column is None:
        raise TypeError(f"product '{tag}' (branch '{name}') holds {describe(original)} in "
                        f"event {event_id}, which RootOutput cannot write: it writes numbers, "
                        f"strings, lists of strings, NumPy arrays of numbers (not Python lists "
                        f"of numbers), structured arrays and Collections")
    column.convert = convert
    return column


def _column_for(tag, name, value, event_id, shape) -> _Column | None:
    if shape is not None:
        if not (isinstance(value, np.ndarray) and value.dtype.kind in NUMBER_KINDS):
            raise TypeError(f"product '{tag}' (branch '{name}') is fixed-size {tuple(shape)}, "
                            f"as the source declared it, but holds {describe(value)} in event "
                            f"{event_id}")
        column = _Fixed(tag, name, value, event_id, tuple(shape))
        if not column.matches(value):
            raise column.mismatch(value, event_id)
        return column
    if isinstance(value, str):
        return _Strings(tag, name, value, event_id)
    dtype = _scalar_dtype(value)
    if dtype is not None:
        return _Scalars(tag, name, value, event_id, dtype) if dtype.kind in NUMBER_KINDS \
            else None
    if isinstance(value, Collection) or (isinstance(value, np.ndarray) and value.dtype.names):
        return _Records(tag, name, value, event_id, _record_fields(tag, name, value, event_id))
    if isinstance(value, np.ndarray):
        if value.dtype.kind in NUMBER_KINDS:
            return _Jagged(tag, name, value, event_id)
        if value.ndim == 1 and _all_str(value):
            return _StringLists(tag, name, value, event_id)
        return None
    if isinstance(value, (list, tuple)) and _all_str(value):
        return _StringLists(tag, name, value, event_id)
    return None


def _branch_type(array):
    """What ``mktree`` / ``mkrntuple`` take for the type of ``array``'s branch."""
    if isinstance(array, ak.Array):
        return array.type.content
    return array.dtype if array.ndim == 1 else np.dtype((array.dtype, array.shape[1:]))


def _branch_names(names: list[str], tags: list[str], renamed: set[str]) -> None:
    """ParamError when two products share a branch name, or one takes a name RootOutput
    writes itself (``run``, ``luminosityBlock``, ``event``, another product's counter)."""
    owner: dict[str, str] = {}
    for tag, name in zip(tags, names):
        if name in owner:
            other = owner[name]
            if other == tag:
                raise ParamError("products", f"lists product {tag} twice")
            if tag in renamed and other in renamed:
                raise ParamError("rename", f"products {other} and {tag} are both renamed to "
                                           f"'{name}'")
            raise ParamError("rename", f"products {other} and {tag} are both written as branch "
                                       f"'{name}' (branch names hold letters, digits and '_' "
                                       f"only; see RootOutput's documentation): rename one")
        if name in ID_TYPES:
            raise ParamError("rename", f"product {tag} would be written as branch '{name}', "
                                       f"which holds the event IDs: rename it")
        owner[name] = tag
    for tag, name in zip(tags, names):
        counted = name[1:]
        if name.startswith("n") and counted in owner:
            raise ParamError("rename", f"product {tag} would be written as branch '{name}', the "
                                       f"counter RootOutput writes for product {owner[counted]} "
                                       f"(branch '{counted}') when it holds a list or a "
                                       f"collection per event: rename one of them")


class RootOutput(OutputModule):
    """Writes products of the selected events to a ROOT file (TTree or RNTuple)."""

    products = InputTagList(doc="products to write")
    file = Param(str, doc="output ROOT file")
    tree = Param(str, "Events", doc="tree name")
    rename = Param(dict[str, str], {}, doc="branch names for some products: {tag: name}")
    format = Param(str, "ttree", doc="ttree or rntuple", choices=("ttree", "rntuple"))
    compression = Param(str, "zstd:1", doc="zstd:N, lz4:N, zlib:N, lzma:N or none")
    flush_events = Param(int, 1000, doc="events buffered before they are written")
    output_file_param = "file"
    #: the job's :class:`~recorun.framework.provenance.JobProvenance`, set by the framework
    #: before begin_job (None: the file gets no provenance)
    job_provenance = None

    def __init__(self, label="", **params):
        super().__init__(label, **params)
        try:
            self._compression = parse_compression(self.compression)
        except ValueError as exc:
            raise ParamError("compression", str(exc)) from None
        if self.flush_events < 1:
            raise ParamError("flush_events", f"must be at least 1 (got {self.flush_events})")
        problem = unwritable_path(Path(self.file))
        if problem:
            raise ParamError("file", f"cannot write {self.file}: {problem}")
        self.names = self._branch_names()

    def _branch_names(self) -> list[str]:
        try:
            rename = {canonical_tag(tag): name for tag, name in self.rename.items()}
        except ValueError as exc:
            raise ParamError("rename", str(exc)) from None
        unknown = set(rename) - set(self.products)
        if unknown:
            raise ParamError("rename", f"names products that are not written: "
                                       f"{sorted(unknown)} (products: {self.products})")
        for tag, name in rename.items():
            if safe_name(name) != name:
                raise ParamError("rename", f"renames {tag} to '{name}', which is not a safe "
                                           f"branch name: use letters, digits and '_' only "
                                           f"(e.g. '{safe_name(name)}')")
        names = [rename.get(tag) or branch_name(tag) for tag in self.products]
        _branch_names(names, self.products, set(rename))
        return names

    def begin_job(self):
        self._path = Path(self.file)
        self._partial = self._path.with_name(self._path.name + ".partial")
        self._handle = open_partial(self._partial)
        self._file = uproot.recreate(self._handle, compression=self._compression)
        self._tree = None
        self._columns: list[_Column] | None = None
        self._shapes: dict[str, tuple] = {}
        self._string_lists: set[str] = set()
        self._ids: list = []
        self._example = None            # an unwritten event's products, for the types
        self.wants_skipped = True
        self.written = 0
        self._provenance_mark = (self.job_provenance.mark()
                                 if self.job_provenance is not None else None)

    def skipped(self, event):
        """An event not written: its products give the branches' types, should no event be
        written (a first event holding every product is kept)."""
        try:
            products = {tag: event.get(tag) for tag in self.products}
        except ProductNotFound:
            return
        self._example = _Example(event.id, products)
        self.wants_skipped = False

    def write(self, event):
        if self._columns is None:
            self.wants_skipped = False
            self._columns = self._new_columns(event)
            self._plan = [(c.tag, c.convert, c.matches, c.values.append) for c in self._columns]
        get = event.get
        for tag, convert, matches, append in self._plan:
            value = get(tag)
            if convert is not None:
                value = convert(value)
            if not matches(value):
                self._reject(tag, value, event.id)
            append(value)
        self._ids.append(event.id)
        if len(self._ids) >= self.flush_events:
            self._flush()

    def _reject(self, tag: str, value, event_id) -> None:
        """Take this event's values out of the buffer; raise what is wrong with product
        ``tag``'s value: a type RootOutput cannot write at all (an empty first value may have
        passed for a list of strings), else a change of type."""
        for column in self._columns:
            if len(column.values) > len(self._ids):
                column.values.pop()
        column = next(c for c in self._columns if c.tag == tag)
        new_column(tag, column.name, value, event_id, self.product_shapes.get(tag))
        raise column.mismatch(value, event_id)

    def _new_columns(self, event) -> list[_Column]:
        """Each product's column, from its value in the first written event."""
        shapes = self.product_shapes
        columns = [new_column(tag, name, event.get(tag), event.id, shapes.get(tag))
                   for tag, name in zip(self.products, self.names)]
        owner = dict.fromkeys(ID_TYPES, "the event IDs")
        for column in columns:
            for branch in column.branches("ttree"):   # the names readers give, any format
                if branch in owner:
                    raise ConfigError(f"product '{column.tag}' writes branch "
                                      f"'{branch}', as {owner[branch]} does (a collection "
                                      f"writes <name>_<field>): rename one of them or write "
                                      f"only one", label=self.label, parameter="products")
                owner[branch] = f"product '{column.tag}'"
        return columns

    def _chunk(self) -> dict:
        """The buffered events as uproot's columns."""
        ids = np.fromiter(chain.from_iterable(self._ids), np.int64,
                          3 * len(self._ids)).reshape(-1, 3)
        chunk = {"run": ids[:, 0].astype(np.int32), "luminosityBlock": ids[:, 1].astype(np.int32),
                 "event": ids[:, 2]}
        for column in self._columns:
            try:
                chunk.update(column.arrays(self.format))
            except (TypeError, ValueError, OverflowError) as exc:
                raise TypeError(f"events {self._ids[0]} to {self._ids[-1]}, product "
                                f"'{column.tag}' (branch '{column.name}'): {exc}") from exc
            self._shapes.update(column.shapes(self.format))
            self._string_lists.update(column.string_lists(self.format))
        return chunk

    def _types_without_events(self) -> dict:
        """The branch types of a job that wrote no event: from an event it did not write
        when one held every product (:meth:`skipped`), else the event IDs only."""
        if self._example is not None:
            try:
                self._columns = self._new_columns(self._example)
                for column in self._columns:
                    column.values.append(self._example.get(column.tag))
                self._ids = [self._example.id]
                return _part_types(self._chunk())
            except (TypeError, ValueError, ConfigError) as exc:
                log.warning("%s: the products of the events not written cannot be written "
                            "(%s): %s has the event IDs only", self.label, exc, self._path)
            finally:
                self._ids = []
        log.info("%s: no event was written and none held every product; %s has an empty "
                 "tree '%s' (event IDs only)", self.label, self._path, self.tree)
        return dict(ID_TYPES)

    def _make_tree(self, types: dict) -> None:
        make = self._file.mktree if self.format == "ttree" else self._file.mkrntuple
        self._tree = make(self.tree, types)

    def _flush(self) -> None:
        """Write the buffered events; they leave the buffer even when that fails."""
        if not self._ids:
            return
        try:
            chunk = self._chunk()
            if self._tree is None:
                self._make_tree(_part_types(chunk))
            try:
                self._tree.extend(chunk)
            except (ValueError, TypeError) as exc:
                raise TypeError(f"events {self._ids[0]} to {self._ids[-1]} do not fit the "
                                f"branch types set by the first events: {exc}") from exc
            self.written += len(self._ids)
        finally:
            self._ids = []
            for column in self._columns:
                column.values.clear()          # the same lists: write() holds their append

    def end_job(self):
        try:
            self._flush()
            if self._tree is None:
                self._make_tree(self._types_without_events())
            write_shapes(self._file, self._shapes)
            write_string_lists(self._file, self._string_lists)
            self._write_provenance()
        finally:
            self._file.close()
            self._handle.close()
        if self.job_complete:
            os.replace(self._partial, self._path)
            log.info("%s: wrote %d events to %s", self.label, self.written, self._path)
        else:
            log.warning("%s: the job stopped early; %d events were written to %s, which is not "
                        "complete", self.label, self.written, self._partial)

    def _write_provenance(self) -> None:
        """The job's provenance of the products written (:mod:`recorun.framework.provenance`),
        as the TObjString ``recorun_provenance``; a failure to make it is logged, never the
        job's failure."""
        if self.job_provenance is None:
            return
        try:
            record = self.job_provenance.record(
                self.label, list(self.products), since=self._provenance_mark,
                branches=dict(zip(self.products, self.names)))
            record["processes"][-1]["output"]["events"] = self.written
            provenance_io.write(self._file, record)
        except Exception as exc:
            log.warning("%s: the provenance of %s cannot be written (%s: %s): the file has "
                        "none", self.label, self._path, type(exc).__name__, exc)

    @classmethod
    def check_destination(cls, destination, **params):
        """The merged file is written as ``<destination>.partial``: a link planted there is
        refused before the first chunk (as :func:`open_partial` would refuse it at the end)."""
        partial = Path(destination).with_name(Path(destination).name + ".partial")
        if partial.is_symlink():
            raise ConfigError(f"{partial} is a symbolic link: the output is written there first "
                              f"and recorun does not write through links (remove it)")

    @classmethod
    def merge(cls, parts, destination, **params):
        """Concatenate the RootOutput files ``parts`` (consecutive chunks of one job's input,
        in that order) into ``destination``: it reads like the file one job would have written
        (tree, branch names and types, entries in order, the inner shapes of flattened
        branches, the string branches holding lists). Parts whose tree has no entry add
        nothing; when no part has one, the tree of the first part that has it is written
        empty. The parts' provenance becomes one
        (:func:`recorun.framework.provenance.merge_records`). Written as
        ``<destination>.partial`` and renamed when complete."""
        tree_name = params.get("tree", "Events")
        fmt = params.get("format", "ttree")
        step = max(int(params.get("flush_events", 1000)), 1)
        destination = Path(destination)
        partial = destination.with_name(destination.name + ".partial")
        shapes: dict[str, tuple] = {}
        string_lists: set[str] = set()
        records: list = []
        written = 0
        with open_partial(partial) as handle, uproot.recreate(handle, compression=(
                parse_compression(params.get("compression", "zstd:1")))) as out:
            merged, empty_types = None, None
            for part in parts:
                with uproot.open(part) as source:
                    shapes.update(read_shapes(source))
                    string_lists.update(read_string_lists(source))
                    records.append(_part_provenance(source, part))
                    if tree_name not in source:
                        continue
                    tree = source[tree_name]
                    if tree.num_entries == 0:
                        if empty_types is None:
                            empty_types = _part_types(_part_columns(
                                tree, tree.arrays(entry_stop=0, library="ak"), fmt))
                        continue
                    for arrays in tree.iterate(step_size=step, library="ak"):
                        chunk = _part_columns(tree, arrays, fmt)
                        if merged is None:
                            make = out.mktree if fmt == "ttree" else out.mkrntuple
                            merged = make(tree_name, _part_types(chunk))
                        merged.extend(chunk)
                        written += len(arrays)
            if merged is None and empty_types is not None:
                (out.mktree if fmt == "ttree" else out.mkrntuple)(tree_name, empty_types)
            write_shapes(out, shapes)
            write_string_lists(out, string_lists)
            merged_provenance = provenance_io.merge_records(records)
            if merged_provenance is not None:
                provenance_io.write(out, merged_provenance)
        os.replace(partial, destination)
        log.debug("merged %d parts (%d events) into %s", len(parts), written, destination)


def _part_provenance(source, part) -> dict | None:
    """A part file's provenance (None, logged, when it cannot be read)."""
    try:
        return provenance_io.read(source, str(part))
    except provenance_io.ProvenanceError as exc:
        log.warning("merging %s: %s; its provenance is left out", part, exc)
        return None


def _part_types(chunk: dict) -> dict:
    return {name: _branch_type(c) for name, c in chunk.items()}


def _part_columns(tree, arrays, fmt: str) -> dict:
    """One chunk of a part's entries as RootOutput handed it to uproot: for a TTree, the
    counters ``nX`` dropped (uproot writes them again), ``X`` kept jagged and ``X_a``,
    ``X_b``... counted by ``nX`` zipped back into the collection ``X``; columns of numbers
    (fixed-size ones included) as NumPy."""
    columns: dict = {}
    if fmt == "rntuple":
        for name in arrays.fields:
            columns[name] = arrays[name]
    else:
        counters = {b.count_branch.name for b in tree.branches
                    if getattr(b, "count_branch", None) is not None}
        for branch in tree.branches:
            name = branch.name
            if name in counters:
                continue
            counter = getattr(branch, "count_branch", None)
            prefix = counter.name[1:] if counter is not None and counter.name.startswith("n") \
                else None
            if prefix and name != prefix and name.startswith(prefix + "_"):
                columns.setdefault(prefix, {})[name[len(prefix) + 1:]] = arrays[name]
            else:
                columns[name] = arrays[name]
    for name, column in columns.items():
        if isinstance(column, dict):
            columns[name] = ak.zip(column)
        elif _regular_numbers(column.layout):
            columns[name] = ak.to_numpy(column)
    return columns


def _regular_numbers(layout) -> bool:
    """A column of numbers, or of fixed-size arrays of numbers (no lists, no strings)."""
    while isinstance(layout, ak.contents.RegularArray):
        layout = layout.content
    return isinstance(layout, ak.contents.NumpyArray)
