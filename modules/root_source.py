"""``RootSource``: events from ROOT files (TTree or RNTuple), read with uproot.

Each branch a module consumes becomes the product ``source:<branch>`` of every event:

* a number per event (``float``, ``int32_t``...): a NumPy scalar;
* a list of numbers per event (``float[]``, NanoAOD's ``Jet_pt``): a 1-D NumPy array, a view
  into the chunk (no copy);
* a list of fixed-size entries (written by recorun, see :mod:`recorun.data.layout`): an
  ``(n, K, ...)`` NumPy array;
* a list of records (an RNTuple record field, or a NanoAOD-style collection: branches
  ``X_a``, ``X_b``... counted by ``nX``, read together as the product ``source:X``): a
  :class:`~framework.Collection`, NumPy views of fields ``a``, ``b``... (``c["a"]``,
  ``len(c)``, ``c[mask]``, ``c.to_numpy()``);
* anything else (lists of lists...): the event's awkward value.

Only the branches some module consumes are read (plus ``branches``, plus ``run``,
``luminosityBlock`` and ``event``, which give the event IDs when present). Files are read in
order, ``step_size`` events at a time; with ``prefetch`` the next chunk is read by a
background thread while the current one is processed.

Every problem with the input is an :class:`~framework.InputError` naming the file (and tree,
branch or entries): missing or unreadable files, files that are not ROOT, missing trees or
branches (with the nearest names), branches uproot cannot interpret. With ``skip_bad_files``
a bad file is skipped and listed, with the reason and the entries already read, in the
report's ``source`` section.
"""
from __future__ import annotations

import difflib
import glob
import logging
import os
import queue
import threading
from pathlib import Path

import awkward as ak
import uproot

from recorun.data.layout import per_event_fields, per_event_numpy, read_shapes
from recorun import Collection, Event, EventID, InputError, Param, Source, SourceChunk
from recorun.framework.source import split_entries
from recorun.framework.event import tag_label

log = logging.getLogger(__name__)

ID_BRANCHES = ("run", "luminosityBlock", "event")
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
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    problem = _header_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    try:
        return uproot.open(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot open as a ROOT file: {type(exc).__name__}: {exc}") \
            from None


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
        if name not in trees:
            raise InputError(f"{path}: '{name}' is a {classes[name]}, not a TTree or RNTuple")
        return file[name]
    if len(trees) != 1:
        raise InputError(f"{path}: " + ("has no TTree or RNTuple" if not trees else
                         f"has several trees ({', '.join(trees)}); name one with 'tree'"))
    return file[trees[0]]


def _branch_names(tree) -> list[str]:
    if isinstance(tree, uproot.TTree):         # split objects' leaves by name: Particle.PT
        return list(dict.fromkeys(tree.keys(full_paths=False)))
    return [k for k in tree.keys() if "." not in k]


def _collections(tree, names: list[str]) -> dict[str, list[str]]:
    """NanoAOD-style collections of a TTree: {X: [X_a, X_b, ...]} for branches counted by nX."""
    if not isinstance(tree, uproot.TTree):
        return {}
    found: dict[str, list[str]] = {}
    for name in names:
        counter = getattr(tree[name], "count_branch", None)
        if counter is None or not counter.name.startswith("n"):
            continue
        prefix = counter.name[1:]
        if name.startswith(prefix + "_"):
            found.setdefault(prefix, []).append(name)
    return {k: v for k, v in found.items() if k not in names}


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


class _Chunk:
    """One chunk of events, turned into cheap per-event accessors."""

    def __init__(self, arrays: ak.Array, shapes: dict, collections: dict, path: str,
                 entry_start: int, hidden: frozenset = frozenset()):
        self.path = path
        self.entry_start = entry_start
        self.size = len(arrays)
        self.columns = {}
        for name, members in collections.items():
            zipped = ak.zip({m[len(name) + 1:]: arrays[m] for m in members})
            self.columns[name] = ("collection", per_event_fields(zipped))
        for name in arrays.fields:
            if name in hidden:                    # read only as part of a collection
                continue
            array = arrays[name]
            layout = array.layout
            if isinstance(layout, ak.contents.NumpyArray):
                self.columns[name] = ("scalar", ak.to_numpy(array))
                continue
            fields = per_event_fields(array)
            if fields is not None:
                self.columns[name] = ("collection", fields)
                continue
            split = per_event_numpy(array, shapes.get(name, ()))
            if split is not None:
                self.columns[name] = ("jagged", split)
            else:
                self.columns[name] = ("awkward", array)

    def event_products(self, i: int) -> dict:
        products = {}
        for name, (kind, data) in self.columns.items():
            if kind == "scalar":
                products[name] = data[i]
            elif kind == "jagged":
                values, offsets = data
                products[name] = values[offsets[i]:offsets[i + 1]]
            elif kind == "collection":
                fields, offsets = data
                start, stop = offsets[i], offsets[i + 1]
                products[name] = Collection({f: v[start:stop] for f, v in fields.items()})
            else:
                products[name] = data[i]
        return products


class RootSource(Source):
    """Events from ROOT files (TTree or RNTuple), read with uproot."""

    files = Param(str | list[str], doc="files or glob patterns, read in this order")
    tree = Param(str, "", doc="TTree or RNTuple name (empty: the file's only one)")
    branches = Param(list[str], [], doc="branches to read even when no module consumes them")
    step_size = Param(int, 1000, doc="events read per chunk")
    skip = Param(int, 0, doc="entries to skip at the start (across files)")
    first_event = Param(int, 1, doc="number of the first entry when the files have no 'event' "
                                    "branch (entry k is event first_event + k, skip or not)")
    run = Param(int, 1, doc="run number when the files have no 'run' branch")
    skip_bad_files = Param(bool, False, doc="skip unreadable files (listed in the report)")
    prefetch = Param(bool, True, doc="read the next chunk in a background thread")

    def __init__(self, **params):
        super().__init__(**params)
        if self.step_size < 1 or self.skip < 0:
            raise InputError(f"RootSource: step_size must be >= 1 and skip >= 0 "
                             f"(got {self.step_size}, {self.skip})")
        self.skipped: list[dict] = []
        self.paths = self._expand(self.files)
        self._entries: dict[str, int] = {}
        self._edges: dict[str, list[int]] = {}           # cluster edges, once asked (chunks)
        first = None
        for path in self.paths:
            try:
                file = _open(path)
                tree = _find_tree(file, path, self.tree)
                self._entries[path] = tree.num_entries
                if first is None:
                    first = (path, file, tree, read_shapes(file))
            except InputError as exc:
                self._bad_file(path, exc, 0)
        if first is None:
            raise InputError("RootSource: no readable input file among "
                             f"{', '.join(self.paths)}")
        self._first_path, self._first_file, first_tree, self.shapes = first
        self.tree_name = first_tree.name
        self.available = _branch_names(first_tree)
        self.collections = _collections(first_tree, self.available)
        self._read_collections: dict[str, list[str]] = {}
        self._members_only: set[str] = set()     # branches read only for a collection
        self._first_tree = first_tree
        self.paths = [p for p in self.paths if p in self._entries]
        self.selected = [b for b in ID_BRANCHES if b in self.available]
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

    def _bad_file(self, path: str, error: Exception, entries_read: int) -> None:
        if not self.skip_bad_files:
            raise error if isinstance(error, InputError) else InputError(str(error))
        log.warning("RootSource: skipping %s: %s", path, error)
        self.skipped.append({"file": path, "reason": str(error), "entries_read": entries_read})

    def _want(self, names, what: str) -> None:
        for name in names:
            if name in self.collections:
                self._read_collections[name] = self.collections[name]
                members = [m for m in self.collections[name] if m not in self.selected]
                self._want(self.collections[name], f"member of collection '{name}'")
                self._members_only.update(members)
                continue
            self._members_only.discard(name)
            if name not in self.available:
                near = difflib.get_close_matches(name, self.available + list(self.collections),
                                                 n=3)
                hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
                raise InputError(f"{self._first_path}: tree '{self.tree_name}' has no branch "
                                 f"'{name}' ({what}){hint}")
            if name not in self.selected:
                self.selected.append(name)
        _check_readable(self._first_tree, self._first_path,
                        [n for n in names if n not in self.collections])

    def product_tags(self) -> list[str]:
        return [f"{self.label}:{name}" for name in [*self.available, *self.collections]]

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
        self._chunk: _Chunk | None = None
        self._row = 0
        self._numbered = 0
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
                missing = [b for b in self.selected if b not in _branch_names(tree)]
                if missing:
                    raise InputError(f"{path}: tree '{tree.name}' has no branch "
                                     f"'{missing[0]}' (the first file has it)")
                shapes = read_shapes(file)
                for arrays in tree.iterate(self.selected, step_size=self.step_size,
                                           entry_start=start, entry_stop=stop, library="ak"):
                    yield _Chunk(arrays, shapes, self._read_collections, path, done,
                                 frozenset(self._members_only))
                    done += len(arrays)
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
        while self._chunk is None or self._row >= self._chunk.size:
            self._chunk = self._next_chunk()
            self._row = 0
            if self._chunk is None:
                return None
        products = self._chunk.event_products(self._row)
        self._row += 1
        if "event" in products:
            event_id = EventID(int(products.get("run", self.run)),
                               int(products.get("luminosityBlock", 1)), int(products["event"]))
        else:
            event_id = EventID(self.run, 1, self.first_event + self.skip + self._numbered)
        self._numbered += 1
        return Event(event_id, index, {f"{self.label}:{k}": v for k, v in products.items()})

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

    def summary(self) -> dict:
        return {"type": "RootSource", "files": self.paths, "tree": self.tree_name,
                "branches": self.selected, "skipped_files": self.skipped}
