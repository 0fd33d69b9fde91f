"""A job cut into chunks: the plan, the build-once worker, and the pieces put back together.

This is what every chunked executor shares (``--processes N``, the Dask farm; the driver is
:mod:`recorun.framework.chunked_run`); it knows the workflow only through the engine's
interfaces: the source cuts itself (:meth:`~recorun.framework.source.Source.chunks`), each
output module names its file (:attr:`~recorun.framework.module.OutputModule.output_file_param`)
and merges its parts (:meth:`~recorun.framework.module.OutputModule.merge`).

Chunking (:func:`plan_chunks`)
    The driver builds the workflow first, as a plain run does: a configuration or input error
    stops it before anything runs. The source's events, after its own ``skip`` and up to
    ``max_events``, are cut into :class:`~recorun.framework.source.SourceChunk` pieces of about
    ``chunk_size`` events (a RootSource cuts on cluster boundaries, each piece within a file).

The worker (:class:`ChunkWorker`)
    Builds and begins the workflow once per process, then runs chunks one after another: a
    chunk's source is a new source restricted to it, each output writes a part file of its
    own, the counters of each chunk go back to the driver; at the end, end_job once and the
    process report (the modules' details, CPU time, peak RSS).

Merging (:func:`merge_outputs`, :func:`merge_reports`)
    When every chunk is complete, each output module's parts are merged in chunk order by its
    type's ``merge(parts, destination, **params)`` into the file the workflow names, which then
    reads like a single job's. The chunk reports become one job report: counters summed,
    per-call means weighted by the calls (``runs``), failed events given their job-wide index
    with their file and entry, the modules' details merged from the processes' reports; the
    plugins' report sections are made again on the merged report.

Resubmission (:class:`Resubmission`)
    With chunks not complete, the complete chunks' parts are kept and the resubmission file
    (``<report>.failed.json``, or ``recorun-failed-chunks.json`` without ``--report-json``)
    records the plan, the complete chunks with their parts and reports, and the others with
    their errors, so that ``--resubmit FILE`` redoes only what is missing.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import resource
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import BuiltWorkflow, build_workflow
from .config import apply_overrides, expand_workflow_dir, load_yaml, parse_workflow
from .errors import EXIT_MODULE, EXIT_OK, ConfigError, InputError, ModuleError, RecorunError
from .hooks import report_sections
from .module import OutputModule
from .native_threads import limited
from .process import (STOP_REASONS, begin_job, begin_module, close_source_of, end_job,
                      exit_code_of)
from .reports import cpu_efficiency, merge_lumis, summarize, thread_advice
from .scheduler import Scheduler
from .source import SourceChunk

MIN_CHUNK, MAX_CHUNK = 10, 10_000     # the default chunk size's bounds (default_chunk_size)
RESUBMISSION_VERSION = 2
RESUBMISSION_DEFAULT = "recorun-failed-chunks.json"
EVENT_KEYS = ("read", "accepted", "rejected", "failed")
PATH_KEYS = ("visited", "passed", "rejected", "failed")
PATH_MODULE_KEYS = ("visited", "passed", "rejected", "errors")

log = logging.getLogger(__name__)


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
        target = OutputTarget(label, cls, cls.output_file_param, destination,
                              dict(built.config.modules[label].params))
        where = {"file": built.config.file, "label": label, "parameter": cls.output_file_param}
        if os.path.islink(target.parts_dir):
            raise ConfigError(f"{target.parts_dir} is a symbolic link: the chunks' part files "
                              f"are written there and recorun does not write through links "
                              f"(remove it)", **where)
        try:
            cls.check_destination(destination, **target.params)
        except ConfigError as exc:
            exc.file, exc.label = exc.file or built.config.file, exc.label or label
            raise
        targets[label] = target
    return targets


def raw_workflow(path: str | Path, overrides) -> dict:
    """The workflow mapping as :func:`recorun.framework.config.load_workflow` parses it."""
    raw = load_yaml(path)
    apply_overrides(raw, list(overrides), str(path))
    return expand_workflow_dir(raw, str(Path(path).resolve().parent))


# -- the build-once worker -----------------------------------------------------------------------

class ChunkFailed(Exception):
    """A chunk could not be run (raised where it ran, read by the driver; it carries only its
    message, exit code and worker, so that it travels between processes)."""

    def __init__(self, message: str, exit_code: int = EXIT_MODULE, worker: str = ""):
        super().__init__(message, exit_code, worker)
        self.message, self.exit_code, self.worker = message, exit_code, worker

    def __str__(self) -> str:
        return self.message


class WorkerStartError(ChunkFailed):
    """The workflow could not be built or begun in a worker."""

    def as_dict(self) -> dict:
        return {"error": self.message, "exit_code": self.exit_code, "worker": self.worker}


def plain(data: dict) -> dict:
    """``data`` as JSON data (NumPy scalars as Python numbers), to travel and be stored."""
    def default(obj):
        return obj.tolist() if hasattr(obj, "tolist") else str(obj)
    return json.loads(json.dumps(data, default=default))


class ChunkWorker:
    """The workflow built once in this process, running chunks one after another: a worker of
    a chunked executor (a local process, a Dask worker).

    ``task``: ``{"workflow": raw mapping, "file": YAML file, "outputs": {label: [parameter,
    parts folder, suffix]}}``.

    Set-up (once): the workflow is built and begun as one job's: services' and modules'
    ``begin_job`` and ``post_begin_job`` (a SONIC producer's client, a fallback server), but
    for the output modules, which begin and end once per chunk.

    A chunk (:meth:`run`): a new source of the workflow's source type with the chunk's
    parameters; each output module's file parameter pointed at the chunk's part file
    ``<folder>/chunk-NNNNN-<attempt>-<run><suffix>`` and begun; the scheduler run over the chunk's
    events with the workflow's threads and streams; the outputs ended (the part gets its final
    name when the chunk is complete). Its result: the chunk's report (counts and times, no
    module details), its parts, its exit code. Every run of a chunk writes part files of its
    own, so that a lost run cannot spoil another one.

    :meth:`finish` (once): end_job of every module and service, and the process report: the
    modules' ``details`` (their clients' figures), chunks and events run, CPU time, peak RSS.
    """

    def __init__(self, task: dict):
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.began, self.cpu_began = time.time(), time.process_time()
        self.file = task["file"]
        self.outputs = task["outputs"]
        self.chunks = self.events = 0
        self.runs: dict[str, int] = {}
        self.finished: dict | None = None
        self._drain: threading.Timer | None = None
        try:
            self.built = build_workflow(parse_workflow(task["workflow"], task["file"]))
        except RecorunError as exc:
            raise WorkerStartError(f"{type(exc).__name__}: {exc}", exc.exit_code,
                                   self.where) from None
        self.scheduler = Scheduler(self.built)
        self.begun: list = []
        try:
            begin_job(self.built, self.scheduler, self.begun, skip=frozenset(self.outputs),
                      open_source=False)
        except (ConfigError, ModuleError, InputError) as exc:
            end_job(self.built, self.scheduler, self.begun, close_source=False)
            raise WorkerStartError(str(exc), exc.exit_code, self.where) from None
        self.output_instances = [(w, m) for w, m in self.scheduler.all_instances()
                                 if w.label in self.outputs]
        self.setup_s = time.time() - self.began

    def interrupt(self) -> None:
        """Stop reading events: the chunk under way ends after the events in flight (those
        not done after ``process.drain_timeout_s`` are abandoned), and no other chunk runs."""
        self.scheduler.stop("interrupted")
        limit = self.built.config.process.drain_timeout_s
        if limit and self._drain is None:
            self._drain = self.scheduler.abandon_after(
                limit, lambda text: log.warning("recorun: worker %s: %s", self.where, text))

    def run(self, chunk: SourceChunk, attempt: str) -> dict:
        began = time.time()
        parts: dict[str, str] = {}
        begun_outputs: list = []
        source, error = None, None
        try:
            source = self.built.source_for(chunk.parameters)
            self.scheduler.prepare(source)
            for worker, module in self.output_instances:
                param, folder, suffix = self.outputs[worker.label]
                parts[worker.label] = path = str(Path(folder) / (
                    f"chunk-{chunk.id:05d}-{attempt}-{uuid.uuid4().hex[:6]}{suffix}"))
                setattr(module, param, path)
                module.job_complete = False
                begin_module(worker, module)
                begun_outputs.append(module)
            source.open(chunk.size)
        except (ConfigError, ModuleError, InputError) as exc:
            error = exc
            if source is None:
                self.scheduler.prepare(self.built.source)
            self.scheduler.stop(next(r for kind, r in STOP_REASONS if isinstance(exc, kind)),
                                exc)
        if error is None and self.scheduler.status.stop_reason is None:
            with limited(self.built.config.process.native_threads):
                self.scheduler.run()
            error = self.scheduler.status.stop_error
        complete = error is None and self.scheduler.status.stop_reason is None
        for module in begun_outputs:
            module.job_complete = complete
        end_errors = end_job(self.built, self.scheduler, begun_outputs, close_source=False)
        if source is not None:
            end_errors += close_source_of(source)
        if error is None and end_errors:
            error = end_errors[0]
            complete = False
        reason = self.scheduler.status.stop_reason
        code = exit_code_of(reason, error)
        report = summarize(self.scheduler, workflow=self.file, exit_code=code,
                           not_processed=None, details=False)
        self.scheduler.reset_stats()
        self.chunks += 1
        self.events += report["events"]["read"]
        for label, entry in report["modules"].items():
            self.runs[label] = self.runs.get(label, 0) + entry["runs"]
        wall = time.time() - began
        return {"report": plain(report), "parts": parts, "worker": self.where,
                "wall_s": wall, "overhead_s": max(wall - report["wall_s"], 0.0),
                "exit_code": code, "complete": complete, "stop_reason": reason,
                "error": None if error is None else str(error)}

    def finish(self) -> dict:
        """End the job in this process (once); its process report."""
        if self.finished is not None:
            return self.finished
        errors = end_job(self.built, self.scheduler, self.begun, close_source=False)
        final = summarize(self.scheduler, workflow=self.file, exit_code=EXIT_OK,
                          not_processed=None)
        details = {label: entry["details"] for label, entry in final["modules"].items()
                   if "details" in entry}
        self.finished = plain({
            "worker": self.where, "pid": os.getpid(), "chunks": self.chunks,
            "events": self.events, "runs": self.runs, "details": details,
            "services": final["services"],
            "setup_s": self.setup_s, "wall_s": time.time() - self.began,
            "cpu_s": time.process_time() - self.cpu_began, "peak_rss_mb": peak_rss_mb(),
            "errors": [str(e) for e in errors]})
        return self.finished


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    overhead_s: float = 0.0          # the chunk's time outside its event loop

    def to_dict(self) -> dict:
        return {"chunk": asdict(self.chunk), "status": self.status, "parts": self.parts,
                "report": self.report, "error": self.error, "exit_code": self.exit_code,
                "worker": self.worker, "wall_s": self.wall_s, "overhead_s": self.overhead_s}

    @classmethod
    def from_dict(cls, data: dict) -> ChunkState:
        return cls(SourceChunk(**data["chunk"]), data["status"], data.get("parts") or {},
                   data.get("report"), data.get("error"), data.get("exit_code"),
                   data.get("worker"), data.get("wall_s", 0.0), data.get("overhead_s", 0.0))

    def line(self) -> str:
        c = self.chunk
        where = (f"{Path(c.file).name} entries {c.first_entry}-{c.stop_entry - 1}" if c.file
                 else f"event indices {c.first_index}-{c.first_index + c.size - 1}")
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
        if state.status != "done":                  # run it whole again
            state.status, state.error, state.exit_code = "todo", None, None
            state.report, state.parts = None, {}
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
                  options=None, processes: list[dict] = (), workers: int | None = None
                  ) -> dict:
    """One job report of the chunks' reports (every chunk that ran, all or part of it), on the
    zero ``template`` of the workflow: events, paths and modules added up, failed events given
    their job-wide index; the modules' ``details`` and the services' entries from the worker
    processes' reports (:meth:`ChunkWorker.finish`), weighted by the calls each made."""
    report = copy.deepcopy(template)
    report["events"] = dict.fromkeys(EVENT_KEYS, 0)
    report["failed_events"] = []
    report["abandoned_events"] = []
    lumis: list[dict] = []
    skipped = list(report["source"].get("skipped_files") or [])
    cpu = 0.0
    for state in sorted(states, key=lambda s: s.chunk.id):
        if state.report is None:
            continue
        chunk, part = state.chunk, state.report
        for key in EVENT_KEYS:
            report["events"][key] += part["events"][key]
        for failure in part["failed_events"]:
            local = failure.get("index", 0)
            report["failed_events"].append({**failure, "index": chunk.first_index + local,
                                            "file": chunk.file,
                                            "entry": chunk.first_entry + local})
        for lost in part.get("abandoned_events", []):
            local = lost["index"]
            report["abandoned_events"].append({**lost, "index": chunk.first_index + local,
                                               "file": chunk.file,
                                               "entry": chunk.first_entry + local})
        lumis += part.get("luminosity_blocks", [])
        for kind in ("paths", "endpaths"):
            for name, entry in part[kind].items():
                _add_path(report[kind][name], entry)
        for label, entry in part["modules"].items():
            _add_module(report["modules"][label], entry)
        for item in part["source"].get("skipped_files") or []:
            skipped.append({**item, "chunk": chunk.id,
                            "entries": [chunk.first_entry, chunk.stop_entry]})
        cpu += part.get("cpu_s", 0.0)
    runs: dict[str, int] = {}
    services: dict = {}
    for process in processes:
        for label, details in process.get("details", {}).items():
            mine = process.get("runs", {}).get(label, 0)
            entry = report["modules"][label]
            entry["details"] = _merge_details(entry.get("details"), details,
                                              runs.get(label, 0), mine)
            runs[label] = runs.get(label, 0) + mine
        for label, section in (process.get("services") or {}).items():
            services.setdefault(label, section)
    report["services"] = services
    report["luminosity_blocks"] = merge_lumis(lumis)
    report["source"]["skipped_files"] = skipped
    ev = report["events"]
    report["wall_s"] = max(wall_s, 1e-9)
    report["throughput_hz"] = (ev["accepted"] + ev["rejected"] + ev["failed"]) / report["wall_s"]
    workers = workers or max(len(processes), 1)
    report["processes"] = workers
    report["cpu_s"] = cpu
    report["cpu_efficiency"] = cpu_efficiency(cpu, report["wall_s"], report["threads"] * workers)
    report["advice"] = thread_advice(report)
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


def not_processed(states: list[ChunkState]) -> str | None:
    """The events no chunk processed: of chunks that never ran or were lost, and the rest of
    chunks that stopped part-way."""
    pieces, events = [], 0
    for s in sorted(states, key=lambda s: s.chunk.id):
        c = s.chunk
        done = s.report["events"]["read"] if s.report is not None else 0
        if s.status == "done" or done >= c.size:
            continue
        first = c.first_index + done
        where = (f"{c.file} entries {c.first_entry + done} to {c.stop_entry - 1}, " if c.file
                 else "")
        why = s.error or ("not run: the job stopped first" if s.status == "todo" else s.status)
        pieces.append(f"chunk {c.id} ({c.size - done} events: {where}job event indices "
                      f"{first} to {c.first_index + c.size - 1}): {why}")
        events += c.size - done
    if not pieces:
        return None
    return f"{events} events were not processed: " + "; ".join(pieces)

