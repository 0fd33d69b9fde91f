"""Conditions: data valid for intervals of validity (IOVs), CMSSW's EventSetup.

A *record* is a named piece of conditions data (``HcalGains``, ``SonicModel``): a *payload*
(any Python value: a dict of NumPy arrays, a mapping read from YAML...) valid for an *IOV*, a
range of runs or of ``run:lumi`` luminosity blocks. The workflow's :class:`ConditionsService`
reads the records from conditions files (YAML or JSON, format in docs/CONDITIONS.md)::

    HcalGains:
      - {since: 1, file: gains_v1.npz}                  # from run 1 on, till the next entry
      - {since: "2:1", till: "2:3", value: {...}}       # run 2 lumi 1 to run 2 lumi 3

and computes *derived* records with :class:`ConditionsProducer` types, from other records,
once per distinct combination of their inputs' IOVs (the derived record's IOV is the
intersection of theirs).

A module declares what it reads with :class:`~recorun.framework.params.Record` parameters;
before the first event the graph checks, through :meth:`ConditionsService.check`, that the
service provides every one. At the start of each luminosity block the scheduler asks
:meth:`ConditionsService.for_lumi` for the block's conditions (a :class:`LumiConditions`): it
resolves every declared record then, so a block that a record does not cover stops the job
with a configuration error (exit code 2) before its first event. Events read a record with
``event.record(self.gains)``, transition hooks with ``lumi.record(name)`` / ``run.record(name)``.

Payloads are loaded once per IOV (when a block first needs them) and shared by every stream
and thread: they are read-only. NumPy arrays are frozen (``flags.writeable = False``);
mappings read from files are :class:`ReadOnlyDict` and lists tuples.
"""
from __future__ import annotations

import bisect
import copy
import difflib
import json
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .errors import ConfigError
from .params import Configurable, Param, ParamError
from .service import Service

#: the last luminosity block of a run (an IOV ``till: 5`` ends at ``(5, LAST_LUMI)``)
LAST_LUMI = sys.maxsize
#: the file types a payload may come from
PAYLOAD_TYPES = (".npz", ".json", ".yaml", ".yml", ".root")
ENTRY_KEYS = ("since", "till", "file", "value", "tree")
_RUN_LUMI = re.compile(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?")


# -- read-only payloads -----------------------------------------------------------------------

class ReadOnlyDict(dict):
    """A dict that refuses changes: the mappings of conditions payloads, shared by every
    stream. ``dict(payload)`` or ``copy.deepcopy(payload)`` give a plain, writable copy."""

    __slots__ = ()

    def _read_only(self, *args, **kwargs):
        raise TypeError("conditions payloads are read-only (shared by every stream); "
                        "change a copy: dict(payload) or copy.deepcopy(payload)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self):
        return dict(self)

    def __deepcopy__(self, memo):
        return {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self):
        return dict, (dict(self),)


def freeze(value: Any) -> Any:
    """``value`` made read-only: NumPy arrays frozen in place, mappings as
    :class:`ReadOnlyDict`, lists as tuples, recursively."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
        return value
    if isinstance(value, Mapping):
        return ReadOnlyDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _freeze_arrays(value: Any, seen: set | None = None) -> None:
    """Freeze the NumPy arrays of a derived payload in place (in its dicts, lists and tuples,
    and the attributes of plain objects), leaving its types as the producer made them."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, Mapping):
        for v in value.values():
            _freeze_arrays(v, seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _freeze_arrays(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for v in vars(value).values():
            _freeze_arrays(v, seen)


# -- YAML without sexagesimal numbers --------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``2:1`` is the string "2:1" (PyYAML's safe
    loader reads base-60 numbers: ``2:1`` would be the integer 121)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _read_text_file(path: Path, what: str) -> Any:
    """A YAML or JSON file's content; ConfigError naming the file when it cannot be read."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", file=str(path)) from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON ({what}): {exc}", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({what}): {exc}", file=str(path)) from None


# -- intervals of validity --------------------------------------------------------------------

@dataclass(frozen=True)
class IOV:
    """An interval of validity: from ``first`` to ``last``, both ``(run, lumi)`` and
    inclusive; ``last`` None: open-ended. A whole run ``r`` is ``(r, 0)`` to
    ``(r, LAST_LUMI)``."""

    first: tuple[int, int]
    last: tuple[int, int] | None

    def __contains__(self, key: tuple[int, int]) -> bool:
        return self.first <= key and (self.last is None or key <= self.last)

    def intersection(self, other: IOV) -> IOV:
        first = max(self.first, other.first)
        lasts = [x for x in (self.last, other.last) if x is not None]
        return IOV(first, min(lasts) if lasts else None)

    def __str__(self) -> str:
        if self.last is None:
            return f"{_point(self.first)} to the end"
        return f"{_point(self.first)} to {_point(self.last, end=True)}"


ALL_TIME = IOV((0, 0), None)


def parse_run_lumi(value: Any, *, end: bool = False) -> tuple[int, int]:
    """``5`` or ``"5"`` (a run: its first lumi, or with ``end`` its last) or ``"5:3"`` (run 5,
    lumi 3) as ``(run, lumi)``; ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a run number may not be negative: {value}")
        return (value, LAST_LUMI if end else 0)
    match = _RUN_LUMI.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a run (5) or a run:lumi (\"5:3\"; quote it)")
    run, lumi = match.groups()
    if lumi is None:
        return (int(run), LAST_LUMI if end else 0)
    return (int(run), int(lumi))


def _point(key: tuple[int, int], end: bool = False) -> str:
    """``(5, 0)`` as "5" (``(5, LAST_LUMI)`` too, with ``end``), ``(5, 3)`` as "5:3"."""
    return str(key[0]) if key[1] == (LAST_LUMI if end else 0) else "%d:%d" % key


def _before(key: tuple[int, int]) -> tuple[int, int]:
    run, lumi = key
    return (run, lumi - 1) if lumi > 0 else (run - 1, LAST_LUMI)


# -- records read from files ------------------------------------------------------------------

class _Entry:
    """One IOV of a record read from a file, and its payload (loaded once, when needed)."""

    __slots__ = ("record", "file", "number", "first", "till", "last", "path", "tree",
                 "value", "inline", "_payload", "_loaded", "_lock")

    def __init__(self, record: str, file: str, number: int, first, till, path, tree, value,
                 inline: bool):
        self.record, self.file, self.number = record, file, number
        self.first, self.till = first, till
        self.last = till                       # set for every entry once the record is sorted
        self.path, self.tree, self.value, self.inline = path, tree, value, inline
        self._payload, self._loaded = None, False
        self._lock = threading.Lock()

    @property
    def iov(self) -> IOV:
        return IOV(self.first, self.last)

    @property
    def where(self) -> str:
        return f"record '{self.record}', entry {self.number}"

    def payload(self) -> Any:
        if self._loaded:
            return self._payload
        with self._lock:
            if not self._loaded:
                self._payload = freeze(self.value) if self.inline else self._load()
                self.value = None
                self._loaded = True
        return self._payload

    def _load(self) -> Any:
        path, suffix = self.path, self.path.suffix.lower()
        what = f"payload of {self.where} (IOV {self.iov})"
        try:
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    return freeze({name: data[name] for name in data.files})
            if suffix == ".root":
                return freeze(_read_root(path, self.tree))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot read the {what}: {type(exc).__name__}: {exc}",
                              file=str(path)) from None
        return freeze(_read_text_file(path, what))


def _read_root(path: Path, tree_name: str) -> dict[str, np.ndarray]:
    """Every branch (field) of a TTree or RNTuple as a NumPy array, one row per entry."""
    import awkward as ak
    import uproot

    with uproot.open(path) as f:
        trees = sorted({key.split(";")[0] for key, cls in f.classnames().items()
                        if cls in ("TTree", "TNtuple", "ROOT::RNTuple")})
        if not tree_name:
            if len(trees) != 1:
                raise ConfigError(f"the file has {len(trees)} trees ({', '.join(trees) or 'none'})"
                                  f": name one with 'tree:'", file=str(path))
            tree_name = trees[0]
        elif tree_name not in trees:
            raise ConfigError(f"no tree '{tree_name}' (trees: {', '.join(trees) or 'none'})",
                              file=str(path))
        arrays = f[tree_name].arrays()
    out = {}
    for name in arrays.fields:
        try:
            out[name] = ak.to_numpy(arrays[name])
        except ValueError:
            raise ConfigError(f"tree '{tree_name}': branch '{name}' is not a number or a "
                              f"fixed-size array per entry; a conditions tree holds those only",
                              file=str(path)) from None
    return out


class _FileRecord:
    """A record's IOVs, from one or more files, sorted and checked for overlaps."""

    def __init__(self, name: str, entries: list[_Entry]):
        self.name = name
        entries.sort(key=lambda e: e.first)
        for a, b in zip(entries, entries[1:]):
            if a.first == b.first or (a.till is not None and a.till >= b.first):
                files = a.file if a.file == b.file else f"{a.file} and {b.file}"
                raise ConfigError(
                    f"record '{name}': entry {a.number} (IOV {IOV(a.first, a.till)}, {a.file}) "
                    f"and entry {b.number} (since {_point(b.first)}, "
                    f"{b.file}) overlap: a run or luminosity block may have one payload",
                    file=files)
            if a.till is None:
                a.last = _before(b.first)
        self.entries = entries
        self.firsts = [e.first for e in entries]
        self.files = list(dict.fromkeys(e.file for e in entries))

    def find(self, key: tuple[int, int]) -> _Entry | None:
        i = bisect.bisect_right(self.firsts, key) - 1
        if i < 0:
            return None
        entry = self.entries[i]
        return entry if entry.last is None or key <= entry.last else None

    def iovs(self) -> str:
        return ", ".join(str(e.iov) for e in self.entries)


def _parse_file(path: Path, found: dict[str, list[_Entry]]) -> None:
    """Add the entries of one conditions file to ``found`` (record name -> entries)."""
    file = str(path)
    if not path.is_file():
        raise ConfigError("conditions file not found" if not path.exists() else
                          "a conditions file must be a file", file=file)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"a conditions file is YAML (.yaml, .yml) or JSON (.json), not "
                          f"'{path.suffix}'", file=file)
    content = _read_text_file(path, "conditions file")
    if not isinstance(content, dict) or not content:
        raise ConfigError(f"a conditions file maps record names to lists of entries "
                          f"({{HcalGains: [{{since: 1, file: gains.npz}}]}}); this one holds "
                          f"{type(content).__name__} {content!r:.80}", file=file)
    for record, entries in content.items():
        if not isinstance(record, str) or not record.strip():
            raise ConfigError(f"record names are non-empty strings, not {record!r}", file=file)
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"record '{record}': expected a list of entries ({{since: 1, "
                              f"file: ...}} or {{since: 1, value: ...}}), got "
                              f"{type(entries).__name__} {entries!r:.80}", file=file)
        for number, raw in enumerate(entries, 1):
            found.setdefault(record, []).append(_parse_entry(path, record, number, raw))


def _parse_entry(path: Path, record: str, number: int, raw: Any) -> _Entry:
    file = str(path)
    where = f"record '{record}', entry {number}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping ({{since: 1, file: ...}}), got "
                          f"{type(raw).__name__} {raw!r:.80}", file=file)
    for key in raw:
        if key not in ENTRY_KEYS:
            near = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint} (an entry has "
                              f"{', '.join(ENTRY_KEYS)})", file=file)
    if "since" not in raw:
        raise ConfigError(f"{where}: no 'since' (the first run, or \"run:lumi\", it is valid "
                          f"for)", file=file)
    try:
        first = parse_run_lumi(raw["since"])
    except ValueError as exc:
        raise ConfigError(f"{where}: since: {exc}", file=file) from None
    till = None
    if raw.get("till") is not None:
        try:
            till = parse_run_lumi(raw["till"], end=True)
        except ValueError as exc:
            raise ConfigError(f"{where}: till: {exc}", file=file) from None
        if till < first:
            raise ConfigError(f"{where}: till {raw['till']!r} is before since "
                              f"{raw['since']!r}", file=file)
    if ("file" in raw) == ("value" in raw):
        raise ConfigError(f"{where}: give the payload as either 'file' (a .npz, .json, .yaml "
                          f"or .root file) or 'value' (inline), not "
                          f"{'both' if 'file' in raw else 'neither'}", file=file)
    tree = raw.get("tree", "")
    if "value" in raw:
        if "tree" in raw:
            raise ConfigError(f"{where}: 'tree' is for .root payload files", file=file)
        return _Entry(record, file, number, first, till, None, "", raw["value"], True)
    name = raw["file"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: file: expected a file name, got {name!r}", file=file)
    payload = Path(name) if Path(name).is_absolute() else path.parent / name
    if payload.suffix.lower() not in PAYLOAD_TYPES:
        raise ConfigError(f"{where}: payload file {name}: its type must be one of "
                          f"{', '.join(PAYLOAD_TYPES)}", file=file)
    if not payload.is_file():
        raise ConfigError(f"{where}: payload file {payload} not found", file=file)
    if "tree" in raw and (payload.suffix.lower() != ".root" or not isinstance(tree, str)):
        raise ConfigError(f"{where}: 'tree' names the TTree of a .root payload file",
                          file=file)
    return _Entry(record, file, number, first, till, payload, tree, None, False)


# -- derived records --------------------------------------------------------------------------

class ConditionsProducer(Configurable):
    """A derived conditions record: computed from other records (its inputs), once per
    distinct combination of their IOVs, and shared by every stream.

    Declare the inputs as :class:`~recorun.framework.params.Record` parameters and compute the
    payload in :meth:`produce`; register the class under the entry-point group
    ``recorun.conditions`` (or name it ``package.module:Class``) and give it a record name in
    the ConditionsService's ``derived``::

        class HcalRespCorrs(ConditionsProducer):
            gains = Record("HcalGains", doc="per-channel gains")

            def produce(self, records):
                return {"gain": records[self.gains]["gain"] * 1.02}

    ``produce`` is called under a lock (never twice at once for one record) and must not
    change its inputs; what it returns is read-only from then on (its NumPy arrays are
    frozen)."""

    def input_records(self) -> list[str]:
        """The records this producer reads: the values of its Record parameters."""
        return [value for name, param in self.parameters().items()
                if param.records and (value := getattr(self, name)) is not None]

    def produce(self, records: Mapping[str, Any]) -> Any:
        """The payload from ``records``, ``{input record name: its payload}``."""
        raise NotImplementedError(f"{type(self).__name__} must define produce(records)")


class _DerivedRecord:
    def __init__(self, name: str, type_name: str, producer: ConditionsProducer):
        self.name, self.type_name, self.producer = name, type_name, producer
        self.inputs = producer.input_records()
        self.lock = threading.Lock()
        self.cache: dict[tuple, tuple[IOV, Any]] = {}


# -- the service ------------------------------------------------------------------------------

class LumiConditions:
    """The conditions of one luminosity block: ``get(name)`` returns the payload of record
    ``name`` valid for it (the same object for every block of one IOV); ``iov(name)`` its
    :class:`IOV`. Thread-safe."""

    __slots__ = ("run", "luminosity_block", "_service", "_found")

    def __init__(self, service: ConditionsService, run: int, lumi: int, found: dict):
        self.run, self.luminosity_block = run, lumi
        self._service = service
        self._found = found                    # record name -> (iov, payload)

    def _resolve(self, name: str) -> tuple[IOV, Any]:
        found = self._found.get(name)
        if found is None:
            found = self._service._resolve(name, (self.run, self.luminosity_block))[1:]
            self._found[name] = found          # racing threads store the same objects
        return found

    def get(self, name: str) -> Any:
        return self._resolve(name)[1]

    def iov(self, name: str) -> IOV:
        return self._resolve(name)[0]

    def __repr__(self) -> str:
        return f"LumiConditions({self.run}:{self.luminosity_block})"


class ConditionsService(Service):
    """Conditions records read from files, valid for IOVs; derived records computed once per
    IOV and shared by every stream (docs/CONDITIONS.md).

    The files are read and checked when the service is made, before the first event (unknown
    keys, bad ``run:lumi``, overlapping IOVs, missing payload files: configuration errors
    naming the file and the record); payloads are loaded when a luminosity block first
    needs them, once per IOV."""

    files = Param(list[str], doc="conditions files (YAML or JSON)")
    derived = Param(dict[str, str | dict], {},
                    doc="derived records: record name -> ConditionsProducer type (entry-point "
                        "group 'recorun.conditions', or 'package.module:Class'), or a mapping "
                        "{type: ..., its parameters}")

    def __init__(self, **params: Any):
        super().__init__(**params)
        found: dict[str, list[_Entry]] = {}
        for name in self.files:
            _parse_file(Path(name), found)
        self._records = {name: _FileRecord(name, entries) for name, entries in found.items()}
        self._derived = {name: self._make_derived(name, spec)
                         for name, spec in self.derived.items()}
        self._check_derived()
        self._declared: dict[str, list[str]] = {}        # record -> labels of its readers

    # -- configuration ------------------------------------------------------------------------
    def _make_derived(self, name: str, spec: str | dict) -> _DerivedRecord:
        from .registry import PluginNotFound, load

        where = {"label": name, "what": "ConditionsService derived record"}
        if name in self._records:
            raise ConfigError(f"is also a record of the files "
                              f"({', '.join(self._records[name].files)}): a record is read "
                              f"from files or derived, not both", **where)
        params = dict(spec) if isinstance(spec, dict) else {"type": spec}
        type_name = params.pop("type", None)
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"give its ConditionsProducer type: {{{name}: TypeName}} or "
                              f"{{{name}: {{type: TypeName, ...}}}}", **where)
        try:
            cls = load("conditions", type_name)
        except PluginNotFound as exc:
            raise ConfigError(str(exc), **where) from None
        if not (isinstance(cls, type) and issubclass(cls, ConditionsProducer)):
            raise ConfigError(f"'{type_name}' is not a ConditionsProducer subclass", **where)
        try:
            producer = cls(**params)
        except ParamError as exc:
            raise ConfigError(str(exc), parameter=exc.name, **where) from None
        return _DerivedRecord(name, type_name, producer)

    def _check_derived(self) -> None:
        for record in self._derived.values():
            for name in record.inputs:
                if name not in self._records and name not in self._derived:
                    raise ConfigError(f"its {record.type_name} reads record '{name}', which "
                                      f"{self._unknown_hint(name)}", label=record.name,
                                      what="ConditionsService derived record")
        state: dict[str, int] = {}             # 1: being visited, 2: done

        def visit(name: str, chain: list[str]) -> None:
            if state.get(name) == 2 or name not in self._derived:
                return
            if state.get(name) == 1:
                cycle = chain[chain.index(name):] + [name]
                raise ConfigError(f"derived records depend on each other in a cycle: "
                                  f"{' -> '.join(cycle)}", label=name,
                                  what="ConditionsService derived record")
            state[name] = 1
            for dep in self._derived[name].inputs:
                visit(dep, chain + [name])
            state[name] = 2

        for name in self._derived:
            visit(name, [])

    def records(self) -> list[str]:
        """Every record this service provides, read from files or derived."""
        return sorted([*self._records, *self._derived])

    def _unknown_hint(self, name: str) -> str:
        known = self.records()
        near = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        return (f"the ConditionsService does not provide{hint} (its records: "
                f"{', '.join(known) or 'none'}; files: {', '.join(self.files) or 'none'})")

    def check_workflow(self, workflow, modules: dict) -> None:
        """Before the first event: every record the modules declare is provided
        (:meth:`check`)."""
        self.check({label: names for label, m in modules.items()
                    if (names := m.consumed_records())})

    def check(self, records: dict[str, list[str]]) -> None:
        """``{module label: [record names it declares]}``: raise ConfigError naming the module
        and the record for one this service cannot provide. The records are remembered:
        :meth:`for_lumi` resolves them at the start of every luminosity block."""
        for label, names in records.items():
            for name in names:
                if name not in self._records and name not in self._derived:
                    raise ConfigError(f"reads conditions record '{name}', which "
                                      f"{self._unknown_hint(name)}", label=label)
        declared: dict[str, list[str]] = {}
        for label, names in records.items():
            for name in names:
                declared.setdefault(name, []).append(label)
        self._declared = declared

    # -- lookup -------------------------------------------------------------------------------
    def for_lumi(self, run: int, lumi: int) -> LumiConditions:
        """The conditions of one luminosity block (an object whose ``get(name)`` returns the
        record's payload valid for it). Every record the modules declared is resolved now: a
        ConfigError names the record, the ``run:lumi`` and the file when one has no payload
        for this block."""
        key = (int(run), int(lumi))
        found = {}
        for name, labels in self._declared.items():
            found[name] = self._resolve(name, key, readers=labels)[1:]
        return LumiConditions(self, key[0], key[1], found)

    def _resolve(self, name: str, key: tuple[int, int], *, readers=(),
                 needed_by: str = "") -> tuple[Any, IOV, Any]:
        """``(cache key, IOV, payload)`` of record ``name`` for ``key = (run, lumi)``."""
        record = self._records.get(name)
        if record is not None:
            entry = record.find(key)
            if entry is None:
                self._no_payload(name, key, record, readers, needed_by)
            return entry, entry.iov, entry.payload()
        derived = self._derived.get(name)
        if derived is None:
            raise ConfigError(f"conditions record '{name}' asked for run {key[0]} lumi "
                               f"{key[1]}, which {self._unknown_hint(name)}")
        inputs = [(dep, *self._resolve(dep, key, readers=readers, needed_by=name))
                  for dep in derived.inputs]
        cache_key = tuple(found[1] for found in inputs)
        done = derived.cache.get(cache_key)
        if done is None:
            with derived.lock:
                done = derived.cache.get(cache_key)
                if done is None:
                    iov = ALL_TIME
                    for _, _, dep_iov, _ in inputs:
                        iov = iov.intersection(dep_iov)
                    payload = self._produce(derived, iov, {dep: p for dep, _, _, p in inputs})
                    done = derived.cache[cache_key] = (iov, payload)
        return (name, cache_key), done[0], done[1]

    @staticmethod
    def _produce(derived: _DerivedRecord, iov: IOV, records: dict) -> Any:
        try:
            payload = derived.producer.produce(ReadOnlyDict(records))
        except ConfigError:
            raise
        except Exception as exc:
            raise RuntimeError(f"derived conditions record '{derived.name}' "
                               f"({derived.type_name}) failed for IOV {iov}: "
                               f"{type(exc).__name__}: {exc}") from exc
        _freeze_arrays(payload)
        return payload

    def _no_payload(self, name, key, record: _FileRecord, readers, needed_by) -> None:
        run, lumi = key
        by = f", needed by derived record '{needed_by}'" if needed_by else ""
        who = f" (read by {', '.join(repr(r) for r in readers)}{by})" if readers or by else ""
        raise ConfigError(f"conditions record '{name}'{who} has no payload for run {run} lumi "
                          f"{lumi} ({run}:{lumi}); its IOVs: {record.iovs()}",
                          file=", ".join(record.files))

    # -- report -------------------------------------------------------------------------------
    def report(self) -> dict | None:
        """The IOVs each record served (payloads loaded, derived payloads computed)."""
        records: dict[str, dict] = {}
        for name, record in self._records.items():
            used = [str(e.iov) for e in record.entries if e._loaded]
            records[name] = {"files": record.files, "iovs_loaded": used}
        for name, derived in self._derived.items():
            with derived.lock:
                iovs = [str(iov) for iov, _ in derived.cache.values()]
            records[name] = {"derived": derived.type_name, "inputs": derived.inputs,
                             "iovs_computed": iovs}
        return {"files": list(self.files), "records": records}
