"""Workflow configuration: the YAML file, its overrides and its structural checks.

A workflow is a mapping with these keys (only ``source`` and ``modules`` are required)::

    process:   {name, threads, streams, processes, native_threads, max_events,
                on_error: stop|skip_event, watchdog_s, report_every_s, synchronous,
                drain_timeout_s}
    source:    {type: EmptySource, <parameters>}
    services:  {label: {type: ..., <parameters>}}
    modules:   {label: {type: ..., [select_events: [path, ...]], <parameters>}}
    paths:     {name: [label, ...]}     # trigger paths, filters stop them
    endpaths:  {name: [label, ...]}     # outputs and analyzers, after the trigger paths

This file only checks the shape of the YAML; module types and parameters are checked when the
plugins are loaded (:mod:`recorun.framework.build`), the products and the graph in
:mod:`recorun.framework.graph`. Every error names the file, and the label and key where there is one.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

TOP_KEYS = ("process", "source", "services", "modules", "paths", "endpaths")
RESERVED_MODULE_KEYS = ("type", "select_events")


@dataclass
class ProcessOptions:
    name: str = "RECO"
    threads: int = 1
    streams: int | None = None          # default: as many as threads
    processes: int = 1                  # worker processes of this node (a chunked job if > 1)
    native_threads: int = 1             # threads a numerical library (BLAS, OpenMP) may use per
                                        # call; 0: the library's own default
    max_events: int | None = None
    on_error: str = "stop"
    watchdog_s: float = 300.0           # warn about a module call running longer (0: off)
    drain_timeout_s: float = 60.0       # after a signal, how long events in flight may take
                                        # to finish before they are abandoned (0: no limit)
    report_every_s: float = 10.0        # period of the rate lines (0: off)
    synchronous: bool = False           # debugging: one thread, one stream, one fixed order

    def __post_init__(self):
        if self.streams is None:
            self.streams = self.threads


PROCESS_TYPES = {"name": (str,), "threads": (int,), "streams": (int, type(None)),
                 "processes": (int,), "native_threads": (int,),
                 "max_events": (int, type(None)), "on_error": (str,),
                 "watchdog_s": (int, float), "report_every_s": (int, float),
                 "drain_timeout_s": (int, float),
                 "synchronous": (bool,)}


@dataclass
class PluginSpec:
    """One ``label: {type: ..., parameters}`` entry (or the source)."""

    label: str
    type_name: str
    params: dict[str, Any]
    select_events: list[str] = field(default_factory=list)


@dataclass
class WorkflowConfig:
    file: str
    process: ProcessOptions
    source: PluginSpec
    services: dict[str, PluginSpec]
    modules: dict[str, PluginSpec]
    paths: dict[str, list[str]]
    endpaths: dict[str, list[str]]
    #: the workflow mapping as the job used it (after ``--set`` and ``${WORKFLOW_DIR}``), kept
    #: for the provenance written into output files (:mod:`recorun.framework.provenance`)
    raw: dict | None = field(default=None, repr=False, compare=False)

    def error(self, message, label=None, parameter=None) -> ConfigError:
        return ConfigError(message, file=self.file, label=label, parameter=parameter)


def parse_value(text: str) -> Any:
    """Values given on the command line are YAML scalars or flow collections."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str], file: str) -> None:
    """Apply ``dotted.key=value`` overrides (``--set``) to the raw YAML mapping, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set '{item}': expected dotted.key=value, "
                              f"e.g. process.threads=4 or modules.ht.min_ht=300", file=file)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and depth == 1 and parts[0] in ("modules", "services"):
                near = difflib.get_close_matches(part, list(node), n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ConfigError(f"--set '{item}': no {parts[0][:-1]} '{part}'{hint}",
                                  file=file)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{'.'.join(parts[:depth + 1])}' is not a "
                                  f"mapping", file=file)
            node = child
        node[parts[-1]] = parse_value(value)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as stream:          # a stream, so that YAML's marks name the file
            raw = yaml.safe_load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read workflow: {exc.strerror}", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("a workflow is a YAML mapping with keys "
                          f"{', '.join(TOP_KEYS)}", file=str(path))
    return raw


def _mapping(raw: dict, key: str, file: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__}", file=file)
    return value


def _plugin_spec(label: str, entry: Any, file: str, what: str) -> PluginSpec:
    if isinstance(entry, str):
        entry = {"type": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{what} '{label}' must be a mapping with a 'type', "
                          f"got {type(entry).__name__}", file=file, label=label)
    entry = dict(entry)
    type_name = entry.pop("type", None)
    if not (isinstance(type_name, str) and type_name) and not isinstance(type_name, type):
        raise ConfigError(f"{what} '{label}' has no 'type'", file=file, label=label)
    select = entry.pop("select_events", []) if what == "module" else []
    if isinstance(select, str):
        select = [select]
    if not isinstance(select, list) or not all(isinstance(p, str) for p in select):
        raise ConfigError("select_events must be a list of path names", file=file, label=label,
                          parameter="select_events")
    return PluginSpec(label, type_name, entry, select)


def _sequences(raw: dict, key: str, file: str) -> dict[str, list[str]]:
    result = {}
    for name, labels in _mapping(raw, key, file).items():
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"{key[:-1]} '{name}' must be a list of module labels", file=file)
        result[str(name)] = labels
    return result


def parse_workflow(raw: dict, file: str) -> WorkflowConfig:
    """Check the YAML's shape and turn it into a :class:`WorkflowConfig`."""
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], TOP_KEYS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown top-level key '{unknown[0]}'{hint} "
                          f"(known: {', '.join(TOP_KEYS)})", file=file)

    process_raw = _mapping(raw, "process", file)
    for key, value in process_raw.items():
        if key not in PROCESS_TYPES:
            near = difflib.get_close_matches(key, PROCESS_TYPES, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown process option '{key}'{hint} "
                              f"(known: {', '.join(PROCESS_TYPES)})", file=file)
        expected = PROCESS_TYPES[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise ConfigError(f"process.{key}: expected {names}, got {type(value).__name__} "
                              f"{value!r}", file=file)
    process = ProcessOptions(**process_raw)
    if process.threads < 1 or process.streams < 1 or process.processes < 1:
        raise ConfigError(f"process.threads, process.streams and process.processes must be at "
                          f"least 1 (got {process.threads}, {process.streams} and "
                          f"{process.processes})", file=file)
    if process.synchronous and (process.threads, process.streams, process.processes) != (1, 1, 1):
        raise ConfigError(f"process.synchronous needs threads: 1, streams: 1 and processes: 1 "
                          f"(got {process.threads}, {process.streams} and "
                          f"{process.processes})", file=file)
    if process.native_threads < 0:
        raise ConfigError(f"process.native_threads must be >= 0 (0: the libraries' own "
                          f"default), got {process.native_threads}", file=file)
    if process.drain_timeout_s < 0:
        raise ConfigError(f"process.drain_timeout_s must be >= 0 (0: no limit), got "
                          f"{process.drain_timeout_s}", file=file)
    if process.max_events is not None and process.max_events < 0:
        raise ConfigError(f"process.max_events must be >= 0, got {process.max_events}", file=file)
    if process.on_error not in ("stop", "skip_event"):
        raise ConfigError(f"process.on_error must be 'stop' or 'skip_event', "
                          f"got {process.on_error!r}", file=file)

    if "source" not in raw:
        raise ConfigError("the workflow has no 'source' (e.g. source: {type: EmptySource, "
                          "count: 100})", file=file)
    source = _plugin_spec("source", raw["source"], file, "source")
    services = {str(k): _plugin_spec(str(k), v, file, "service")
                for k, v in _mapping(raw, "services", file).items()}
    modules = {str(k): _plugin_spec(str(k), v, file, "module")
               for k, v in _mapping(raw, "modules", file).items()}
    for label in modules:
        if label in ("source", "TriggerResults") or ":" in label:
            raise ConfigError(f"'{label}' cannot be a module label (reserved or has ':')",
                              file=file, label=label)

    paths = _sequences(raw, "paths", file)
    endpaths = _sequences(raw, "endpaths", file)
    clash = set(paths) & set(endpaths)
    if clash:
        raise ConfigError(f"'{sorted(clash)[0]}' is both a path and an end path", file=file)
    for kind, sequences in (("path", paths), ("end path", endpaths)):
        for name, labels in sequences.items():
            for label in labels:
                if label not in modules:
                    near = difflib.get_close_matches(label, modules, n=1)
                    hint = f"; did you mean '{near[0]}'?" if near else ""
                    raise ConfigError(f"{kind} '{name}' names unknown module label '{label}'"
                                      f"{hint}", file=file)
            if len(set(labels)) != len(labels):
                raise ConfigError(f"{kind} '{name}' names a module twice", file=file)
    for spec in modules.values():
        for path in spec.select_events:
            if path not in paths:
                raise ConfigError(f"select_events names unknown path '{path}' "
                                  f"(paths: {', '.join(paths) or 'none'})", file=file,
                                  label=spec.label, parameter="select_events")
    return WorkflowConfig(file, process, source, services, modules, paths, endpaths,
                          raw=_kept(raw))


def _kept(raw: dict) -> dict:
    """A copy of the workflow mapping that later changes to ``raw`` do not reach."""
    try:
        return copy.deepcopy(raw)
    except Exception:                   # an object of a workflow built in Python
        return dict(raw)


WORKFLOW_DIR = "${WORKFLOW_DIR}"


def expand_workflow_dir(value: Any, directory: str) -> Any:
    """``${WORKFLOW_DIR}`` in any string stands for the folder of the workflow file, so that a
    workflow can name files shipped beside it whatever the working directory."""
    if isinstance(value, str):
        if WORKFLOW_DIR not in value:
            return value
        expanded = value.replace(WORKFLOW_DIR, directory)
        # a path (${WORKFLOW_DIR}/../data/x.root): without the "..", as the user reads it
        return os.path.normpath(expanded) if value.startswith(WORKFLOW_DIR) else expanded
    if isinstance(value, list):
        return [expand_workflow_dir(v, directory) for v in value]
    if isinstance(value, dict):
        return {k: expand_workflow_dir(v, directory) for k, v in value.items()}
    return value


def load_workflow(path: str | Path, overrides: list[str] = ()) -> WorkflowConfig:
    raw = load_yaml(path)
    apply_overrides(raw, list(overrides), str(path))
    raw = expand_workflow_dir(raw, str(Path(path).resolve().parent))
    return parse_workflow(raw, str(path))
