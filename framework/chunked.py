"""A job cut into chunks: the plan, one chunk's job, and putting the pieces back together.

This is what every chunked executor shares (the Dask farm, :mod:`recorun.farm`); it knows
the workflow only through the engine's interfaces: the source cuts itself
(:meth:`~recorun.framework.source.Source.chunks`), each output module names its file
(:attr:`~recorun.framework.module.OutputModule.output_file_param`) and merges its parts
(:meth:`~recorun.framework.module.OutputModule.merge`).

Chunking (:func:`plan_chunks`)
    The driver builds the workflow first, as a plain run does: a configuration or input error
    stops it before anything runs. The source's events, after its own ``skip`` and up to
    ``max_events``, are cut into :class:`~recorun.framework.source.SourceChunk` pieces of about
    ``chunk_size`` events (a RootSource cuts on cluster boundaries, each piece within a file).

One chunk's job (:func:`run_chunk`)
    The unchanged workflow with the source restricted to the chunk (its parameters updated by
    the chunk's, ``process.max_events`` its size) and each output module's file pointed at a
    part file ``<file>.parts/chunk-NNNNN-<attempt><suffix>``. Every attempt writes its own part
    files, so that a lost attempt cannot spoil another one. A job whose exit code is not 0
    raises :class:`ChunkFailed`, which carries its exit code.

Merging (:func:`merge_outputs`, :func:`merge_reports`)
    When every chunk is done, each output module's parts are merged in chunk order by its
    type's ``merge(parts, destination, **params)`` into the file the workflow names, which then
    reads like a single job's. The chunk reports become one job report: counters summed,
    per-call means weighted by the calls (``runs``), failed events given their job-wide index
    with their file and entry; the plugins' report sections are made again on the merged
    report.

Resubmission (:class:`Resubmission`)
    With failed chunks, the done chunks' parts are kept and the resubmission file
    (``<report>.failed.json``, or ``recorun-failed-chunks.json`` without ``--report-json``)
    records the plan, the done chunks with their parts and reports, and the failed chunks with
    their errors, so that a later run redoes only what is missing.
"""
from __future__ import annotations

import copy
import io
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import BuiltWorkflow, build_workflow
from .config import apply_overrides, expand_workflow_dir, load_yaml, parse_workflow
from .errors import EXIT_MODULE, EXIT_OK, ConfigError, InputError, RecorunError
from .hooks import report_sections
from .module import OutputModule
from .process import run_job
from .source import SourceChunk

DEFAULT_CHUNK_SIZE = 1000
RESUBMISSION_VERSION = 2
RESUBMISSION_DEFAULT = "recorun-failed-chunks.json"
EVENT_KEYS = ("read", "accepted", "rejected", "failed")
PATH_KEYS = ("visited", "passed", "rejected", "failed")
PATH_MODULE_KEYS = ("visited", "passed", "rejected", "errors")


# -- the plan -----------------------------------------------------------------------------------

def plan_chunks(built: BuiltWorkflow, chunk_size: int) -> list[SourceChunk]:
    """The chunks of the job's events, in job order (see the module docstring)."""
    source = built.source
    try:
        return source.chunks(built.config.process.max_events, chunk_size)
    except NotImplementedError:
        raise ConfigError(f"a chunked executor cuts the input into chunks, and source type "
                          f"{type(source).__name__} cannot be cut (it does not implement "
                          f"Source.chunks)", file=built.config.file, what="source",
                          label="source") from None


@dataclass
class OutputTarget:
    """An output module of the workflow: the file it names, and how to merge its parts."""

    label: str
    type: type
    param: str
    destination: str
    params: dict

    @property
    def parts_dir(self) -> str:
        return self.destination + ".parts"


def output_targets(built: BuiltWorkflow) -> dict[str, OutputTarget]:
    targets = {}
    for label, node in built.graph.nodes.items():
        module = node.module
        if not isinstance(module, OutputModule):
            continue
        cls = type(module)
        if cls.output_file_param is None or cls.merge.__func__ is OutputModule.merge.__func__:
            raise ConfigError(f"output module type {cls.__name__} cannot run in chunks: it "
                              f"sets no output_file_param or has no merge() "
                              f"(recorun.framework.module.OutputModule)",
                              file=built.config.file, label=label)
        destination = os.path.abspath(str(getattr(module, cls.output_file_param)))
        targets[label] = OutputTarget(label, cls, cls.output_file_param, destination,
                                      dict(built.config.modules[label].params))
    return targets


def raw_workflow(path: str | Path, overrides) -> dict:
    """The workflow mapping as :func:`recorun.framework.config.load_workflow` parses it."""
    raw = load_yaml(path)
    apply_overrides(raw, list(overrides), str(path))
    return expand_workflow_dir(raw, str(Path(path).resolve().parent))


# -- one chunk ----------------------------------------------------------------------------------

class ChunkFailed(Exception):
    """A chunk's job did not end with exit code 0 (raised where it ran, read by the driver; it
    carries only its message, exit code and worker, so that it travels between processes)."""

    def __init__(self, message: str, exit_code: int = EXIT_MODULE, worker: str = ""):
        super().__init__(message, exit_code, worker)
        self.message, self.exit_code, self.worker = message, exit_code, worker

    def __str__(self) -> str:
        return self.message


def chunk_workflow(raw: dict, chunk: SourceChunk, outputs: dict, attempt: str
                   ) -> tuple[dict, dict]:
    """The workflow mapping of one chunk's job, and its part file per output label.
    ``outputs``: ``{label: [parameter, parts folder, suffix]}``."""
    raw = copy.deepcopy(raw)
    source = raw["source"] if isinstance(raw["source"], dict) else {"type": raw["source"]}
    raw["source"] = {**source, **chunk.parameters}
    raw["process"] = {**(raw.get("process") or {}), "max_events": chunk.size,
                      "report_every_s": 0}
    parts = {}
    for label, (param, folder, suffix) in outputs.items():
        entry = raw["modules"][label]
        entry = dict(entry) if isinstance(entry, dict) else {"type": entry}
        parts[label] = entry[param] = str(Path(folder) / f"chunk-{chunk.id:05d}-{attempt}{suffix}")
        raw["modules"][label] = entry
    return raw, parts


def plain(data: dict) -> dict:
    """``data`` as JSON data (NumPy scalars as Python numbers), to travel and be stored."""
    def default(obj):
        return obj.tolist() if hasattr(obj, "tolist") else str(obj)
    return json.loads(json.dumps(data, default=default))


def run_chunk(task: dict) -> dict:
    """Run one chunk's job in this process; its result, or :class:`ChunkFailed`. ``task``:
    ``{"workflow": raw mapping, "file": YAML file, "chunk": SourceChunk as a dict, "outputs":
    {label: [parameter, parts folder, suffix]}}``."""
    began = time.time()
    where = f"{socket.gethostname()}:{os.getpid()}"
    chunk = SourceChunk(**task["chunk"])
    raw, parts = chunk_workflow(task["workflow"], chunk, task["outputs"], uuid.uuid4().hex[:8])
    try:
        built = build_workflow(parse_workflow(raw, task["file"]))
    except RecorunError as exc:
        raise ChunkFailed(f"{type(exc).__name__}: {exc}", exc.exit_code, where) from None
    result = run_job(built, quiet=True, out=io.StringIO())
    if result.exit_code != EXIT_OK:
        reason = result.error or result.report.get("stop_reason") or "the job failed"
        raise ChunkFailed(str(reason), result.exit_code, where)
    missing = [p for p in parts.values() if not Path(p).is_file()]
    if missing:
        raise ChunkFailed(f"the job ended but its output {missing[0]} is missing", EXIT_MODULE,
                          where)
    return {"report": plain(result.report), "parts": parts, "worker": where,
            "wall_s": time.time() - began}


# -- the state of every chunk, and the resubmission file ----------------------------------------

@dataclass
class ChunkState:
    chunk: SourceChunk
    status: str = "todo"             # todo, done, failed
    parts: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None
    exit_code: int | None = None
    worker: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"chunk": asdict(self.chunk), "status": self.status, "parts": self.parts,
                "report": self.report, "error": self.error, "exit_code": self.exit_code,
                "worker": self.worker, "wall_s": self.wall_s}

    @classmethod
    def from_dict(cls, data: dict) -> ChunkState:
        return cls(SourceChunk(**data["chunk"]), data["status"], data.get("parts") or {},
                   data.get("report"), data.get("error"), data.get("exit_code"),
                   data.get("worker"), data.get("wall_s", 0.0))

    def line(self) -> str:
        c = self.chunk
        where = (f"{Path(c.file).name} entries {c.first_entry}-{c.stop_entry - 1}" if c.file
                 else f"events {c.first_index}-{c.first_index + c.size - 1}")
        return f"chunk {c.id} ({where})"


def resubmission_path(report_json: str | None) -> str:
    return f"{report_json}.failed.json" if report_json else RESUBMISSION_DEFAULT


@dataclass
class Resubmission:
    """A resubmission file: what a chunked run that had failed chunks leaves for the next."""

    path: str
    workflow: str
    overrides: list[str]
    chunk_size: int
    states: list[ChunkState]
    wall_s: float = 0.0
    submissions: int = 1

    @classmethod
    def load(cls, path: str) -> Resubmission:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"{path}: cannot read the resubmission file: "
                             f"{exc.strerror or exc}") from None
        except ValueError as exc:
            raise InputError(f"{path}: not a JSON file: {exc}") from None
        if not (isinstance(data, dict) and data.get("recorun_resubmission")):
            raise InputError(f"{path}: not a recorun resubmission file (one is written by a "
                             f"chunked run when chunks fail)")
        if data["recorun_resubmission"] != RESUBMISSION_VERSION:
            raise InputError(f"{path}: written by another recorun version (format "
                             f"{data['recorun_resubmission']}, this one reads "
                             f"{RESUBMISSION_VERSION}); run the whole job again")
        try:
            return cls(path, data["workflow"], list(data["overrides"]), data["chunk_size"],
                       [ChunkState.from_dict(c) for c in data["chunks"]],
                       data.get("wall_s", 0.0), data.get("submissions", 1))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{path}: damaged resubmission file: {exc!r}") from None

    def write(self) -> None:
        data = {"recorun_resubmission": RESUBMISSION_VERSION, "workflow": self.workflow,
                "overrides": self.overrides, "chunk_size": self.chunk_size,
                "wall_s": self.wall_s, "submissions": self.submissions,
                "not_done": [s.chunk.id for s in self.states if s.status != "done"],
                "chunks": [s.to_dict() for s in self.states]}
        Path(self.path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def initial_states(built: BuiltWorkflow, workflow: str, chunk_size: int,
                   previous: Resubmission | None, targets, say) -> list[ChunkState]:
    """Every chunk's state at the start: all to do, or those a resubmission file left."""
    if previous is None:
        return [ChunkState(c) for c in plan_chunks(built, chunk_size)]
    if Path(previous.workflow).resolve() != Path(workflow).resolve():
        say(f"warning: {previous.path} was written for {previous.workflow}, not {workflow}")
    states = previous.states
    for state in states:
        if state.status != "done":
            state.status, state.error, state.exit_code = "todo", None, None
            continue
        missing = [t for t in targets if not Path(state.parts.get(t, "")).is_file()]
        if missing:
            say(f"warning: chunk {state.chunk.id}'s part for '{missing[0]}' is gone; "
                f"running it again")
            state.status, state.parts, state.report = "todo", {}, None
    return states


# -- merging ------------------------------------------------------------------------------------

def _add_module(into: dict, entry: dict) -> None:
    before, runs = into.get("runs", 0), entry.get("runs", 0)
    for key, value in entry.items():
        if key == "details":
            into[key] = _merge_details(into.get(key), value, before, runs)
        elif key.endswith("_ms_mean"):
            total = before + runs
            into[key] = (into.get(key, 0.0) * before + value * runs) / total if total else 0.0
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            into.setdefault(key, value)
        else:
            into[key] = into.get(key, 0) + value


def _merge_details(mine, theirs, before: int, runs: int):
    """A module's ``details`` of two chunks: counts summed, other numbers weighted by runs,
    flags or-ed, anything else kept from the first."""
    if mine is None:
        return copy.deepcopy(theirs)
    if isinstance(mine, list) and isinstance(theirs, list) and len(mine) == len(theirs):
        return [_merge_details(a, b, before, runs) for a, b in zip(mine, theirs)]
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return mine
    merged = dict(mine)
    for key, value in theirs.items():
        old = mine.get(key)
        if isinstance(value, bool) or isinstance(old, bool):
            merged[key] = bool(old) or bool(value)
        elif isinstance(value, int) and isinstance(old, int):
            merged[key] = old + value
        elif isinstance(value, (int, float)) and isinstance(old, (int, float)):
            merged[key] = (old * before + value * runs) / (before + runs) if before + runs \
                else value
        elif isinstance(value, dict) and isinstance(old, dict):
            merged[key] = _merge_details(old, value, before, runs)
        elif old is None:
            merged[key] = value
    return merged


def _add_path(into: dict, entry: dict) -> None:
    for key in PATH_KEYS:
        into[key] += entry[key]
    for mine, theirs in zip(into["modules"], entry["modules"]):
        for key in PATH_MODULE_KEYS:
            mine[key] += theirs[key]


def merge_reports(template: dict, states: list[ChunkState], *, wall_s: float,
                  options=None) -> dict:
    """One job report of the done chunks' reports, on the zero ``template`` of the workflow
    (events, paths, modules added up; see the module docstring)."""
    report = copy.deepcopy(template)
    report["events"] = dict.fromkeys(EVENT_KEYS, 0)
    report["failed_events"] = []
    report["services"] = {}
    skipped = list(report["source"].get("skipped_files") or [])
    for state in sorted(states, key=lambda s: s.chunk.id):
        if state.status != "done":
            continue
        chunk, part = state.chunk, state.report
        for key in EVENT_KEYS:
            report["events"][key] += part["events"][key]
        for failure in part["failed_events"]:
            local = failure.get("index", 0)
            report["failed_events"].append({**failure, "index": chunk.first_index + local,
                                            "file": chunk.file,
                                            "entry": chunk.first_entry + local})
        for kind in ("paths", "endpaths"):
            for name, entry in part[kind].items():
                _add_path(report[kind][name], entry)
        for label, entry in part["modules"].items():
            _add_module(report["modules"][label], entry)
        for label, section in (part.get("services") or {}).items():
            report["services"].setdefault(label, section)     # the first chunk's
        for item in part["source"].get("skipped_files") or []:
            skipped.append({**item, "chunk": chunk.id,
                            "entries": [chunk.first_entry, chunk.stop_entry]})
    report["source"]["skipped_files"] = skipped
    ev = report["events"]
    report["wall_s"] = max(wall_s, 1e-9)
    report["throughput_hz"] = (ev["accepted"] + ev["rejected"] + ev["failed"]) / report["wall_s"]
    report.update(report_sections(report, options))   # from the merged figures
    return report


def merge_outputs(targets: dict[str, OutputTarget], states: list[ChunkState], say) -> None:
    ordered = sorted(states, key=lambda s: s.chunk.id)
    for target in targets.values():
        parts = [s.parts[target.label] for s in ordered]
        target.type.merge(parts, target.destination, **target.params)
        say(f"output '{target.label}': {len(parts)} parts merged into {target.destination}")
        folder = Path(target.parts_dir)
        for leftover in folder.glob("chunk-*"):
            leftover.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass                               # something of the user's is in it


def not_processed(failed: list[ChunkState]) -> str | None:
    if not failed:
        return None
    events = sum(s.chunk.size for s in failed)
    listed = "; ".join(f"chunk {s.chunk.id} ({s.chunk.size} events: {s.chunk.describe()}, "
                       f"job event indices {s.chunk.first_index} to "
                       f"{s.chunk.first_index + s.chunk.size - 1}): {s.error}" for s in failed)
    return f"{events} events in {len(failed)} failed chunks were not processed: {listed}"
