"""``RootOutput``: writes products of selected events to a ROOT file with uproot.

One entry per written event, in event order (the framework calls ordered outputs in event
order), so the file is the same for any number of threads. Each product becomes a branch
named after its tag (``label_instance``, or as ``rename`` says) and is laid out by what it holds:

==================================  ===================================================
product per event                   TTree branch(es)
==================================  ===================================================
a number                            a number (``float``, ``int64_t``...)
1-D NumPy array                     a jagged branch with counter ``n<name>``
(n, K, ...) NumPy array             flat jagged ``n*K*...`` values; the shape is kept in
                                    the file (see :mod:`recorun.data.layout`) and restored on
                                    reading
structured NumPy array or          NanoAOD-style: ``<name>_<field>`` branches sharing the
Collection (records)                counter ``n<name>``
==================================  ===================================================

``event_id`` columns ``run``, ``luminosityBlock`` and ``event`` are always written. RNTuple
(``format: rntuple``) stores every layout natively. The file is written as ``<file>.partial``
and renamed to ``file`` only when the job processed every event; a job that stopped early
leaves the ``.partial`` file and says so.

On a farm (``recorun --executor dask``, :mod:`recorun.farm.executor`) each chunk of the input writes
its own part file and :meth:`RootOutput.merge` concatenates the parts in chunk order: the
same tree, branches (counters and NanoAOD-style collections rebuilt as written), entries and
``recorun_shapes`` entry as one job's file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from recorun.data.layout import flatten_inner, read_shapes, write_shapes
from recorun import Collection, ConfigError, InputTagList, OutputModule, Param
from recorun.framework.params import ParamError

log = logging.getLogger(__name__)

COMPRESSION = {"zstd": uproot.ZSTD, "zlib": uproot.ZLIB, "lzma": uproot.LZMA, "lz4": uproot.LZ4}


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


def _column(values: list, name: str):
    """The per-event values of one product as one awkward/NumPy array for uproot."""
    first = values[0]
    if isinstance(first, Collection):
        counts = np.fromiter((len(v) for v in values), np.int64, len(values))
        return ak.zip({f: ak.unflatten(ak.from_numpy(np.concatenate([v[f] for v in values])),
                                       counts) for f in first.fields})
    if isinstance(first, np.ndarray) and first.ndim >= 1:
        counts = np.fromiter((len(v) for v in values), np.int64, len(values))
        content = np.concatenate(values)
        if first.dtype.names:                       # records: NanoAOD-style collection
            return ak.zip({f: ak.unflatten(ak.from_numpy(np.ascontiguousarray(content[f])),
                                           counts) for f in first.dtype.names})
        return ak.unflatten(ak.from_numpy(content), counts)
    if isinstance(first, (ak.Array, ak.Record)):
        return ak.Array([v.to_list() if hasattr(v, "to_list") else v for v in values])
    array = np.asarray(values)
    if array.dtype == object:
        raise TypeError(f"product for branch '{name}' holds {type(first).__name__}, which "
                        f"cannot be written to ROOT")
    return array


def _part_columns(tree, arrays, fmt: str) -> dict:
    """One chunk of a part's entries as RootOutput handed it to uproot: for a TTree, the
    counters ``nX`` dropped (uproot writes them again), ``X`` kept jagged and ``X_a``,
    ``X_b``... counted by ``nX`` zipped back into the collection ``X``; flat columns as NumPy."""
    columns: dict = {}
    if fmt == "rntuple":
        names = arrays.fields
        for name in names:
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
        elif isinstance(column.layout, ak.contents.NumpyArray):
            columns[name] = ak.to_numpy(column)
    return columns


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

    def __init__(self, label="", **params):
        super().__init__(label, **params)
        try:
            self._compression = parse_compression(self.compression)
        except ValueError as exc:
            raise ParamError("compression", str(exc)) from None
        unknown = set(self.rename) - set(self.products)
        if unknown:
            raise ParamError("rename", f"names products that are not written: "
                                       f"{sorted(unknown)} (products: {self.products})")

    def begin_job(self):
        self._names = [self.rename.get(tag, tag.replace(":", "_")) for tag in self.products]
        self._path = Path(self.file)
        self._partial = self._path.with_name(self._path.name + ".partial")
        self._handle = open_partial(self._partial)
        self._file = uproot.recreate(self._handle, compression=self._compression)
        self._tree = None
        self._shapes: dict[str, tuple] = {}
        self._ids: list[tuple] = []
        self._rows: list[list] = [[] for _ in self.products]
        self.written = 0

    def write(self, event):
        self._ids.append(tuple(event.id))
        for rows, tag in zip(self._rows, self.products):
            rows.append(event.get(tag))
        if len(self._ids) >= self.flush_events:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        ids = np.array(self._ids, dtype=np.int64)
        chunk = {"run": ids[:, 0].astype(np.int32), "luminosityBlock": ids[:, 1].astype(np.int32),
                 "event": ids[:, 2]}
        for name, rows in zip(self._names, self._rows):
            column = _column(rows, name)
            if self.format == "ttree" and isinstance(column, ak.Array):
                column, shape = flatten_inner(column)
                if shape:
                    self._shapes[name] = shape
            chunk[name] = column
        if self._tree is None:
            types = {name: (c.type.content if isinstance(c, ak.Array) else c.dtype)
                     for name, c in chunk.items()}
            make = self._file.mktree if self.format == "ttree" else self._file.mkrntuple
            self._tree = make(self.tree, types)
        try:
            self._tree.extend(chunk)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"events {self._ids[0]} to {self._ids[-1]} do not fit the branch "
                            f"types set by the first events: {exc}") from exc
        self.written += len(self._ids)
        self._ids = []
        self._rows = [[] for _ in self.products]

    def end_job(self):
        try:
            self._flush()
            write_shapes(self._file, self._shapes)
        finally:
            self._file.close()
            self._handle.close()
        if self._tree is None:
            log.warning("%s: no event was selected; %s has no tree", self.label, self._path)
        if self.job_complete:
            os.replace(self._partial, self._path)
            log.info("%s: wrote %d events to %s", self.label, self.written, self._path)
        else:
            log.warning("%s: the job stopped early; %d events were written to %s, which is not "
                        "complete", self.label, self.written, self._partial)

    @classmethod
    def merge(cls, parts, destination, **params):
        """Concatenate the RootOutput files ``parts`` (consecutive chunks of one job's input,
        in that order) into ``destination``: it reads like the file one job would have written
        (tree, branch names and types, entries in order, the inner shapes of flattened
        branches). Parts without the tree (no event selected in their chunk) add nothing.
        Written as ``<destination>.partial`` and renamed when complete."""
        tree_name = params.get("tree", "Events")
        fmt = params.get("format", "ttree")
        step = max(int(params.get("flush_events", 1000)), 1)
        destination = Path(destination)
        partial = destination.with_name(destination.name + ".partial")
        shapes: dict[str, tuple] = {}
        written = 0
        with open_partial(partial) as handle, uproot.recreate(handle, compression=(
                parse_compression(params.get("compression", "zstd:1")))) as out:
            merged = None
            for part in parts:
                with uproot.open(part) as source:
                    shapes.update(read_shapes(source))
                    if tree_name not in source:
                        continue
                    tree = source[tree_name]
                    if tree.num_entries == 0:
                        continue
                    for arrays in tree.iterate(step_size=step, library="ak"):
                        chunk = _part_columns(tree, arrays, fmt)
                        if merged is None:
                            types = {name: (c.type.content if isinstance(c, ak.Array)
                                            else c.dtype) for name, c in chunk.items()}
                            make = out.mktree if fmt == "ttree" else out.mkrntuple
                            merged = make(tree_name, types)
                        merged.extend(chunk)
                        written += len(arrays)
            write_shapes(out, shapes)
        os.replace(partial, destination)
        log.debug("merged %d parts (%d events) into %s", len(parts), written, destination)
