"""Provenance: what made the products of a file recorun writes (CMSSW's process history).

Every output module is given, before its ``begin_job``, the job's :class:`JobProvenance`
(``OutputModule.job_provenance``, set by :func:`recorun.framework.build.build_workflow`); at its
``end_job`` it asks it for the provenance of the products it wrote and stores it in its file.
RootOutput stores it as JSON text in a ``TObjString`` named :data:`KEY` (``recorun_provenance``).

What a file holds (``format`` 1)::

    {"format": 1,
     "processes": [<earlier process>, ..., <the process that wrote this file>]}

Each process (the last one wrote the file; those before it are its history, oldest first)::

    {"id": "5d0c...",                      # unique per job
     "process": "RECO",                    # process.name
     "recorun_version": "0.2.0",
     "host": "node1", "hosts": ["node1"],  # where it ran (a chunked job: every worker's host)
     "started": "2025-01-01T12:00:00+00:00",
     "workflow_file": "workflows/w.yaml",
     "workflow": {...},                    # the workflow mapping after --set overrides
     "source": {"type": "RootSource", "parameters": {...}},
     "inputs": ["/abs/in.root", ...],      # the source's input files
     "output": {"label": "output", "type": "RootOutput", "file": "out.root",
                "select_events": [...], "parameters": {...}, "events": 100},
     "products": {"jets": {"branch": "jets", "producer": "jets",
                           "modules": {"towers": {"type": ..., "parameters": {...}},
                                       "jets": {"type": ..., "parameters": {...},
                                                "provenance": {...}}}}}}

A product's ``modules`` are its producer and every module it depends on (its ancestors in the
module graph, :mod:`recorun.framework.graph`), dependencies first, each with its type and all
its parameters (defaults included). A module whose
:meth:`~recorun.framework.module.Module.provenance` hook answers adds that under
``provenance``: a SONIC producer its model, the version asked, its client and the servers that
answered, ``servers: [{name, address, requests, version}]`` (``requests``: those it answered;
``version``: the model version it answered with, when it says).

History: a source that reads recorun files gives their provenance
(``input_provenance()``, RootSource); every process listed there comes before this job's,
each once (by ``id``), in the order first met. A chain of jobs therefore keeps every step.

Counts: an output module that begins more than once in one process (a chunked job begins its
outputs once per chunk) asks :meth:`JobProvenance.mark` at ``begin_job``: the ``servers``'
``requests`` of its record are then those since that mark. :func:`merge_records` makes one
record of the part files of a chunked job: the same process, the union of the inputs and
hosts, the earliest start, the events and the servers' requests added up.

``recorun provenance FILE [--json]`` (:func:`main`) prints it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx

from . import __version__
from .errors import EXIT_CONFIG, EXIT_OK

log = logging.getLogger(__name__)

#: the name of the provenance object in a ROOT file
KEY = "recorun_provenance"
FORMAT = 1


# -- JSON data ------------------------------------------------------------------------------------

def type_name(value) -> str:
    """A type as a workflow names it: a string as is, a class as ``module:QualName``."""
    if isinstance(value, type):
        return f"{value.__module__}:{value.__qualname__}"
    return str(value)


def plain(value):
    """``value`` as JSON data: NumPy scalars and arrays as numbers and lists, classes by name,
    sets sorted, anything else as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=str)
    if isinstance(value, type):
        return type_name(value)
    if hasattr(value, "tolist"):             # NumPy
        return plain(value.tolist())
    return str(value)


def parameters_of(configurable) -> dict:
    """Every declared parameter of a module or source, with the value it has."""
    return {name: plain(getattr(configurable, name, None))
            for name in type(configurable).parameters()}


def _server_key(server: dict) -> tuple:
    return (str(server.get("name", "")), str(server.get("address", "")))


def _requests(server: dict) -> int:
    value = server.get("requests", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _server_counts(answer: dict | None) -> dict:
    servers = (answer or {}).get("servers")
    if not isinstance(servers, list):
        return {}
    return {_server_key(s): _requests(s) for s in servers if isinstance(s, dict)}


def _since(answer: dict, before: dict) -> dict:
    """A hook's answer with its servers' requests counted from the mark ``before``; servers
    with none since are left out."""
    servers = answer.get("servers")
    if not before or not isinstance(servers, list):
        return answer
    kept = []
    for server in servers:
        if not isinstance(server, dict):
            continue
        count = _requests(server) - before.get(_server_key(server), 0)
        if count > 0:
            kept.append({**server, "requests": count})
    return {**answer, "servers": kept}


def _where(file: str) -> str:
    """A workflow file's absolute path (a workflow built in Python: its name as given)."""
    return os.path.abspath(file) if file and os.path.isfile(file) else file


# -- one job ------------------------------------------------------------------------------------

class JobProvenance:
    """The provenance of one job's products: made once per job (per process of a chunked job)
    when the workflow is built, asked by output modules."""

    def __init__(self, config, source, graph):
        self.config, self.source, self.graph = config, source, graph
        self.id = uuid.uuid4().hex
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.host = socket.gethostname()
        self._history: list[dict] | None = None

    # -- the modules' hooks -------------------------------------------------------------------
    def _answers(self, labels) -> dict[str, dict]:
        """``{label: answer}`` of the provenance hooks of ``labels`` that answer; a hook that
        raises is logged and left out."""
        answers = {}
        for label in labels:
            node = self.graph.nodes.get(label)
            if node is None:
                continue
            try:
                answer = node.module.provenance()
            except Exception as exc:
                log.warning("module '%s': its provenance() raised %s: %s; left out of the "
                            "provenance", label, type(exc).__name__, exc)
                continue
            if answer:
                answers[label] = plain(answer)
        return answers

    def mark(self) -> dict:
        """The modules' server counts now: an output that begins several times in one process
        (once per chunk) gives it back to :meth:`record`, which counts from it."""
        return {label: _server_counts(answer)
                for label, answer in self._answers(list(self.graph.nodes)).items()}

    # -- what a file gets ---------------------------------------------------------------------
    def history(self) -> list[dict]:
        """The processes that made the job's input files (read once)."""
        if self._history is None:
            records = []
            reader = getattr(self.source, "input_provenance", None)
            if callable(reader):
                try:
                    records = reader()
                except Exception as exc:
                    log.warning("the provenance of the input files cannot be read (%s: %s); "
                                "the output's history starts with this job",
                                type(exc).__name__, exc)
            self._history = history_of(records)
        return self._history

    def contributors(self, tag: str) -> tuple[str | None, list[str]]:
        """The producer of product ``tag`` and every module it depends on, dependencies
        first (the source excluded)."""
        producer = self.graph.producer_of.get(tag)
        if producer is None or producer not in self.graph.nodes:
            return producer, []
        labels = nx.ancestors(self.graph.graph, producer) | {producer}
        return producer, [label for label in self.graph.topological_labels()
                          if label in labels]

    def _module(self, label: str) -> dict:
        spec = self.config.modules.get(label)
        module = self.graph.nodes[label].module
        return {"type": type_name(spec.type_name if spec is not None else type(module)),
                "parameters": parameters_of(module)}

    def _output(self, label: str) -> dict:
        spec = self.config.modules.get(label)
        node = self.graph.nodes.get(label)
        entry = {"label": label, "type": type_name(spec.type_name) if spec else None,
                 "select_events": list(spec.select_events) if spec else []}
        if node is not None:
            params = parameters_of(node.module)
            param = getattr(type(node.module), "output_file_param", None)
            if param and spec is not None and param in spec.params:
                params[param] = plain(spec.params[param])   # not a chunk's part file
            file = params.get(param) if param else None
            entry["file"] = os.path.abspath(file) if isinstance(file, str) and file else file
            entry["parameters"] = params
        return entry

    def process(self, output_label: str, tags, *, since: dict | None = None,
                branches: dict | None = None) -> dict:
        """This job's entry for the output ``output_label`` that wrote products ``tags``."""
        source = self.source
        try:
            inputs = [os.path.abspath(p) for p in source.input_files()]
        except Exception:
            inputs = []
        spec = self.config.source
        contributors = {tag: self.contributors(tag) for tag in tags}
        labels = {label for _, chain in contributors.values() for label in chain}
        answers = self._answers(sorted(labels))
        since = since or {}
        products = {}
        for tag, (producer, chain) in contributors.items():
            modules = {}
            for label in chain:
                modules[label] = self._module(label)
                if label in answers:
                    modules[label]["provenance"] = _since(answers[label], since.get(label, {}))
            entry = {"producer": producer, "modules": modules}
            if branches and tag in branches:
                entry = {"branch": branches[tag], **entry}
            products[tag] = entry
        return {
            "id": self.id, "process": self.config.process.name,
            "recorun_version": __version__, "host": self.host, "hosts": [self.host],
            "started": self.started, "workflow_file": _where(self.config.file),
            "workflow": plain(self.config.raw),
            "source": {"type": type_name(spec.type_name if spec else type(source)),
                       "parameters": parameters_of(source)},
            "inputs": inputs, "output": self._output(output_label), "products": products}

    def record(self, output_label: str, tags, *, since: dict | None = None,
               branches: dict | None = None) -> dict:
        """What output ``output_label`` stores: the history, then this job's entry."""
        return {"format": FORMAT,
                "processes": [*copy.deepcopy(self.history()),
                              self.process(output_label, tags, since=since,
                                           branches=branches)]}


# -- histories and merges -----------------------------------------------------------------------

def _union(first: list, second: list) -> list:
    return list(dict.fromkeys([*(first or []), *(second or [])]))


def _identity(entry: dict) -> str:
    return str(entry.get("id") or json.dumps(entry, sort_keys=True, default=str))


def history_of(records) -> list[dict]:
    """The processes of several files' provenance records, each once (by ``id``), in the order
    first met: an earlier process seen through two files is listed once, its products and
    inputs joined."""
    seen: dict[str, dict] = {}
    for record in records or []:
        for entry in (record or {}).get("processes") or []:
            if not isinstance(entry, dict):
                continue
            key = _identity(entry)
            if key not in seen:
                seen[key] = copy.deepcopy(entry)
                continue
            into = seen[key]
            for name in ("inputs", "hosts"):
                if name in into or name in entry:
                    into[name] = _union(into.get(name), entry.get(name))
            for tag, product in (entry.get("products") or {}).items():
                into.setdefault("products", {}).setdefault(tag, copy.deepcopy(product))
    return list(seen.values())


def _add_servers(into: dict, other: dict) -> None:
    """Add ``other``'s servers' requests to ``into``'s (a module's provenance)."""
    servers = into.get("servers")
    theirs = other.get("servers")
    if not isinstance(theirs, list):
        return
    if not isinstance(servers, list):
        into["servers"] = copy.deepcopy(theirs)
        return
    index = {_server_key(s): s for s in servers if isinstance(s, dict)}
    for server in theirs:
        if not isinstance(server, dict):
            continue
        mine = index.get(_server_key(server))
        if mine is None:
            servers.append(dict(server))
            index[_server_key(server)] = servers[-1]
        else:
            mine["requests"] = _requests(mine) + _requests(server)
            if not mine.get("version") and server.get("version"):
                mine["version"] = server["version"]


def _combine(into: dict, other: dict) -> None:
    """Fold the entry ``other`` of a part file into ``into`` (parts of one output)."""
    into["inputs"] = _union(into.get("inputs"), other.get("inputs"))
    into["hosts"] = _union(into.get("hosts"), other.get("hosts"))
    if other.get("started") and (not into.get("started") or other["started"] < into["started"]):
        into["started"] = other["started"]
    output, theirs = into.get("output"), other.get("output") or {}
    if isinstance(output, dict) and isinstance(theirs.get("events"), int):
        output["events"] = int(output.get("events") or 0) + theirs["events"]
    products = into.setdefault("products", {})
    for tag, product in (other.get("products") or {}).items():
        if tag not in products:
            products[tag] = copy.deepcopy(product)
            continue
        modules = products[tag].setdefault("modules", {})
        for label, module in (product.get("modules") or {}).items():
            if label not in modules:
                modules[label] = copy.deepcopy(module)
            elif isinstance(module.get("provenance"), dict):
                mine = modules[label].setdefault("provenance", {})
                _add_servers(mine, module["provenance"])


def merge_records(records) -> dict | None:
    """One record for a file merged from part files (consecutive chunks of one job, in
    order): their history, each earlier process once; this job's entry from the first part,
    with the union of the parts' inputs and hosts, the earliest start, the events and every
    server's requests added up. None when no part has provenance."""
    records = [r for r in records if isinstance(r, dict) and r.get("processes")]
    if not records:
        return None
    current = copy.deepcopy(records[0]["processes"][-1])
    for record in records[1:]:
        _combine(current, record["processes"][-1])
    current["merged_parts"] = len(records)
    ids = {_identity(r["processes"][-1]) for r in records}
    history = [entry for entry in history_of({"processes": r["processes"][:-1]}
                                             for r in records)
               if _identity(entry) not in ids]
    return {"format": FORMAT, "processes": [*history, current]}


# -- in a ROOT file -----------------------------------------------------------------------------

class ProvenanceError(Exception):
    """A file's provenance cannot be read: the file is missing, not ROOT, or the entry is
    damaged (the message names the file)."""


def write(file, record: dict) -> None:
    """Store ``record`` in an open, writable uproot file (a TObjString of JSON)."""
    file[KEY] = json.dumps(record, sort_keys=False, separators=(",", ":"))


def read(file, where: str = "") -> dict | None:
    """The provenance record of an open uproot file, or None when it has none."""
    if KEY not in file:
        return None
    text = str(file[KEY])
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ProvenanceError(f"{where or 'the file'}: its {KEY} is not valid JSON: "
                              f"{exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("processes"), list):
        raise ProvenanceError(f"{where or 'the file'}: its {KEY} is not a recorun "
                              f"provenance record")
    return record


def read_file(path: str | Path) -> dict | None:
    """The provenance record of the ROOT file ``path`` (None when it has none); a missing or
    unreadable file is a :class:`ProvenanceError` naming it."""
    import uproot

    path = str(path)
    if not os.path.exists(path):
        raise ProvenanceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ProvenanceError(f"{path} is a folder, not a ROOT file")
    try:
        file = uproot.open(path)
    except Exception as exc:
        raise ProvenanceError(f"{path}: cannot open as a ROOT file: {type(exc).__name__}: "
                              f"{exc}") from None
    try:
        with file:
            return read(file, path)
    except ProvenanceError:
        raise
    except Exception as exc:
        raise ProvenanceError(f"{path}: cannot read its {KEY}: {type(exc).__name__}: "
                              f"{exc}") from None


# -- recorun provenance FILE ----------------------------------------------------------------------

def _value_text(value) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def _parameters_text(parameters: dict, indent: str, width: int = 96) -> list[str]:
    """``name=value`` pairs, wrapped."""
    lines, line = [], ""
    for name, value in (parameters or {}).items():
        item = f"{name}={_value_text(value)}"
        if line and len(indent) + len(line) + 1 + len(item) > width:
            lines.append(indent + line)
            line = item
        else:
            line = f"{line} {item}" if line else item
    if line:
        lines.append(indent + line)
    return lines


def _hook_text(answer: dict, indent: str) -> list[str]:
    """A module's provenance hook answer: SONIC's model, versions and servers, then the
    rest as ``key=value``."""
    lines = []
    rest = dict(answer)
    if "model" in rest:
        model = rest.pop("model")
        version = rest.pop("version", "") or "latest"
        client = rest.pop("client", "")
        how = ", ".join(str(x) for x in (rest.pop("mode", ""), rest.pop("backend", "")) if x)
        lines.append(f"{indent}SONIC model '{model}', version asked: {version}; client "
                     f"{client}{f' ({how})' if how else ''}")
    servers = rest.pop("servers", None)
    if isinstance(servers, list):
        if not servers:
            lines.append(f"{indent}no server answered")
        for server in servers:
            name, address = server.get("name", ""), server.get("address", "")
            where = f"{name} ({address})" if address and address != name else name or address
            answered = f", version {server['version']}" if server.get("version") else ""
            lines.append(f"{indent}answered by {where}: {_requests(server)} requests"
                         f"{answered}")
    lines += _parameters_text(rest, indent)
    return lines


def format_record(record: dict, path: str = "") -> str:
    """The readable form of a provenance record (what ``recorun provenance FILE`` prints)."""
    processes = record.get("processes") or []
    count = len(processes)
    lines = [f"{path + ': ' if path else ''}written by "
             + (f"{count} processes, the oldest first" if count != 1 else "1 process")
             + f" (provenance format {record.get('format')})"]
    for number, entry in enumerate(processes, 1):
        last = " (wrote this file)" if number == count else ""
        lines += ["", f"process {number} of {count}: {entry.get('process')}{last}",
                  f"  id         {entry.get('id')}",
                  f"  recorun    {entry.get('recorun_version')}",
                  f"  started    {entry.get('started')} on "
                  f"{', '.join(entry.get('hosts') or [entry.get('host') or '?'])}",
                  f"  workflow   {entry.get('workflow_file')}"]
        source = entry.get("source") or {}
        lines.append(f"  source     {source.get('type')}")
        lines += _parameters_text(source.get("parameters"), "               ")
        inputs = entry.get("inputs") or []
        lines.append(f"  inputs     {inputs[0] if inputs else '(none)'}")
        lines += [f"             {p}" for p in inputs[1:]]
        output = entry.get("output") or {}
        events = output.get("events")
        merged = entry.get("merged_parts")
        lines.append(f"  output     {output.get('label')} ({output.get('type')}): "
                     f"{output.get('file')}"
                     + (f", {events} events" if events is not None else "")
                     + (f", merged from {merged} part files" if merged else ""))
        if output.get("select_events"):
            lines.append(f"             events selected by {', '.join(output['select_events'])}")
        products = entry.get("products") or {}
        lines.append(f"  products   {len(products)}")
        modules: dict[str, dict] = {}          # each module once, in the order first met
        for tag, product in products.items():
            branch = product.get("branch")
            producer = product.get("producer")
            chain = product.get("modules") or {}
            modules.update((label, m) for label, m in chain.items() if label not in modules)
            made = ("read from the input files" if producer == "source"
                    else f"made by {' <- '.join(reversed(list(chain))) or producer}")
            lines.append(f"    {tag}" + (f" (branch {branch})" if branch and branch != tag
                                         else "") + f", {made}")
        if modules:
            lines.append(f"  modules    {len(modules)}")
        for label, module in modules.items():
            lines.append(f"    {label}: {module.get('type')}")
            lines += _parameters_text(module.get("parameters"), "        ")
            if isinstance(module.get("provenance"), dict):
                lines += _hook_text(module["provenance"], "        ")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``recorun provenance FILE [--json]``: exit code 0, or 2 when the file is missing,
    unreadable or has no provenance."""
    parser = argparse.ArgumentParser(
        prog="recorun provenance",
        description="Print what made the products of a ROOT file recorun wrote: every "
                    "process in order (workflow, recorun version, host, start time, input "
                    "files), and for each product the modules and parameters that made it and "
                    "the SONIC models and servers that answered.",
        epilog="exit codes: 0 ok, 2 the file is missing, unreadable or has no provenance")
    parser.add_argument("file", help="a ROOT file written by recorun")
    parser.add_argument("--json", action="store_true", help="print the provenance as JSON")
    args = parser.parse_args(argv)
    try:
        record = read_file(args.file)
    except ProvenanceError as exc:
        sys.stderr.write(f"recorun provenance: {exc}\n")
        return EXIT_CONFIG
    if record is None:
        sys.stderr.write(f"recorun provenance: {args.file} has no recorun provenance (no "
                         f"'{KEY}' in it: it was not written by recorun's RootOutput, or by "
                         f"a recorun that did not record provenance)\n")
        return EXIT_CONFIG
    text = json.dumps(record, indent=1) if args.json else format_record(record, args.file)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        from .cli import stdout_closed
        stdout_closed()
    return EXIT_OK
