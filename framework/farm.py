"""A workflow on a Dask cluster: ``recorun WORKFLOW.yaml --executor dask``.

The farm cuts the input into chunks, runs the unchanged workflow on each chunk on a Dask
worker, and puts the pieces back together so that the outputs and the report read like one
job's. It knows the workflow only as ``recorun`` does (the YAML mapping after ``--set``, and
the built workflow); it finds output modules by their base class, :class:`OutputModule`.

Chunking (:func:`plan_chunks`)
    The driver builds the workflow first, as a plain run does: a configuration or input error
    stops it before anything is submitted. The source's entries, after ``skip`` and up to
    ``max_events``, are cut into chunks of about ``chunk_size`` entries, each within one file.
    A cut falls on a cluster boundary of the file (``TTree.common_entry_offsets()``; each
    cluster's baskets are then read by one task) when one lies within half a chunk of the
    target; a larger cluster is cut where the target falls. The source must be a
    RootSource-like source: parameters ``files`` and ``skip`` and an attribute ``paths``
    (the readable files, globs expanded; with ``skip_bad_files`` the others are already
    listed as skipped).

Tasks (:func:`run_chunk`)
    One Dask task per chunk runs the workflow in the worker's process, with its own thread
    pool, streams and SONIC clients, exactly as ``recorun`` would: the source restricted to
    the chunk (``files: [file]``, ``skip: start``, ``process.max_events: size``, and
    ``first_event`` shifted so that files without an ``event`` branch number their events as
    one job would) and each output module's file (its ``output_file_param``) pointed at a part
    file ``<file>.parts/chunk-NNNNN-<attempt><suffix>``. Every attempt writes its own part
    files, so a lost attempt cannot spoil another one. A job whose exit code is not 0 raises
    :class:`ChunkFailed`, which carries its exit code.

Retries
    Each task is submitted with ``retries=1``: a task that raised is run once more. A task
    whose worker died (killed, out of memory) is put back by the Dask scheduler and run on
    another worker (a nanny restarts the dead one), up to the scheduler's
    ``distributed.scheduler.allowed-failures``, then it fails with ``KilledWorker``. A chunk
    that still fails is a failed chunk: the run lists it with its error and entries (the
    report's ``not_processed`` and ``farm.failed_chunks``), exits with its job's exit code
    (3 input data, 4 module error; 4 also for a worker that died on it every time) and writes
    the resubmission file. Every event is accounted for: counted in a done chunk's report, or
    named as not processed.

Merging (:func:`merge_outputs`, :func:`merge_reports`)
    When every chunk is done, each output module's parts are merged in chunk order by its
    type's ``merge(parts, destination, **params)`` into the file the workflow names, which
    then reads like a single job's. The chunk reports become one job report: counters summed,
    per-call means weighted by the calls (``runs``), failed events given their job-wide index
    with their file and entry, ``wall_s`` the farm's wall time (first submission to last
    result, over all submissions) and ``throughput_hz`` the events per second of the farm; its
    ``farm`` section says how the work was cut and run.

Resubmission (:class:`Resubmission`)
    With failed chunks, the done chunks' parts are kept and the resubmission file
    (``<report>.failed.json``, or ``recorun-failed-chunks.json`` without ``--report-json``)
    records the plan, the done chunks with their parts and reports, and the failed chunks with
    their errors. ``recorun WORKFLOW.yaml --executor dask --resubmit FILE [--set ...]`` runs
    the first run's overrides, then the new ones (to fix the cause), reruns only the chunks
    that are not done (and any done chunk whose part file is gone), and merges as above.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import BuiltWorkflow, build_workflow
from .config import apply_overrides, expand_workflow_dir, load_yaml, parse_workflow
from .errors import (EXIT_INTERRUPTED, EXIT_MODULE, EXIT_OK, ConfigError, InputError,
                     RecorunError)
from .module import OutputModule
from .process import JobResult, run_job
from .reports import summarize
from .scheduler import Scheduler
from .sonic_metrics import sonic_section

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1000
RESUBMISSION_VERSION = 1
RESUBMISSION_DEFAULT = "recorun-failed-chunks.json"
EVENT_KEYS = ("read", "accepted", "rejected", "failed")
PATH_KEYS = ("visited", "passed", "rejected", "failed")
PATH_MODULE_KEYS = ("visited", "passed", "rejected", "errors")


# -- the plan -----------------------------------------------------------------------------------

@dataclass
class Chunk:
    """Entries ``[start, stop)`` of one input file: one task."""

    id: int
    file: str
    start: int
    stop: int
    first_index: int                 # job-wide index of its first event
    first_event: int | None = None   # the source's first_event for it (None: no such param)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.file} entries {self.start} to {self.stop - 1}"


def split_entries(start: int, stop: int, edges, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into pieces of about ``size`` entries: a cut goes on the cluster
    edge nearest to its target when one lies within half a piece of it; the last piece takes
    a remainder under half a piece."""
    inner = sorted(e for e in set(edges) if start < e < stop)
    pieces, a = [], start
    while a < stop:
        target = a + size
        if stop - target < size / 2:
            b = stop
        else:
            near = [e for e in inner if a + size / 2 <= e <= a + 1.5 * size]
            b = min(near, key=lambda e: (abs(e - target), e)) if near else target
        pieces.append((a, b))
        a = b
    return pieces


def _file_layout(path: str, tree_name: str) -> tuple[int, list[int]]:
    """Entries and cluster edges of the tree ``tree_name`` of ``path``."""
    import uproot
    try:
        with uproot.open(path) as file:
            tree = file[tree_name]
            entries = int(tree.num_entries)
            if callable(getattr(tree, "common_entry_offsets", None)):        # TTree
                edges = [int(e) for e in tree.common_entry_offsets()]
            else:                                                           # RNTuple
                edges, at = [0], 0
                for cluster in getattr(tree, "cluster_summaries", None) or []:
                    at += int(getattr(cluster, "num_entries", 0))
                    edges.append(at)
    except Exception as exc:
        raise InputError(f"{path}: cannot read the layout of tree '{tree_name}' to cut it into "
                         f"chunks: {type(exc).__name__}: {exc}") from None
    return entries, edges


def _check_splittable(source) -> None:
    params = type(source).parameters()
    if not ({"files", "skip"} <= set(params) and hasattr(source, "paths")):
        raise ConfigError(f"the dask executor cuts a RootSource-like source (parameters "
                          f"'files' and 'skip') into chunks; {type(source).__name__} is not one",
                          what="source", label="source")


def plan_chunks(built: BuiltWorkflow, chunk_size: int) -> list[Chunk]:
    """The chunks of the job's entries, in job order (see the module docstring)."""
    source = built.source
    _check_splittable(source)
    numbered = "first_event" in type(source).parameters()
    tree_name = getattr(source, "tree_name", "") or getattr(source, "tree", "")
    to_skip, left = int(source.skip), built.config.process.max_events
    chunks: list[Chunk] = []
    before = index = 0                      # entries of earlier files; events planned so far
    for path in source.paths:
        if left == 0:
            break
        entries, edges = _file_layout(path, tree_name)
        start = min(to_skip, entries)
        to_skip -= start
        stop = entries if left is None else min(entries, start + left)
        for a, b in split_entries(start, stop, edges, chunk_size):
            chunks.append(Chunk(len(chunks), os.path.abspath(path), a, b, index,
                                source.first_event + before if numbered else None))
            index += b - a
        if left is not None:
            left -= stop - start
        before += entries
    return chunks


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
            raise ConfigError(f"output module type {cls.__name__} cannot run on a farm: it "
                              f"sets no output_file_param or has no merge() "
                              f"(framework.module.OutputModule)", file=built.config.file,
                              label=label)
        destination = os.path.abspath(str(getattr(module, cls.output_file_param)))
        targets[label] = OutputTarget(label, cls, cls.output_file_param, destination,
                                      dict(built.config.modules[label].params))
    return targets


def farm_warnings(built: BuiltWorkflow) -> list[str]:
    """What would go wrong quietly on a farm: SONIC producers that would start a local
    fallback server in every chunk's job; modules other than outputs that write files."""
    warnings = []
    has_servers = any(getattr(s, "servers", None) for s in built.services.values())
    for label, node in built.graph.nodes.items():
        module = node.module
        client = getattr(getattr(module, "client_config", None), "client", None)
        if client == "triton" and not has_servers:
            warnings.append(
                f"module '{label}' ({type(module).__name__}) sends its requests to a Triton "
                f"server but the workflow names none: every chunk's job would start its own "
                f"local fallback recorun-server on its worker. Point the farm at servers: "
                f"--set 'services.sonic={{type: ServerRegistry, servers: [{{name: gpu1, "
                f"address: \"HOST:8001\"}}]}}' (docs/FARM.md)")
        if not isinstance(module, OutputModule):
            params = type(module).parameters()
            for name in ("output", "file"):
                value = getattr(module, name, None)
                if name in params and isinstance(value, str) and value:
                    warnings.append(f"module '{label}' ({type(module).__name__}) writes "
                                    f"'{value}' itself: every chunk's job writes it again; "
                                    f"the farm merges only output modules' files")
    return warnings


def raw_workflow(path: str | Path, overrides) -> dict:
    """The workflow mapping as :func:`framework.config.load_workflow` parses it."""
    raw = load_yaml(path)
    apply_overrides(raw, list(overrides), str(path))
    return expand_workflow_dir(raw, str(Path(path).resolve().parent))


# -- one chunk, on a worker ---------------------------------------------------------------------

class ChunkFailed(Exception):
    """A chunk's job did not end with exit code 0 (raised on the worker, read by the driver;
    the worker logs it, so it carries only its message, exit code and worker)."""

    def __init__(self, message: str, exit_code: int = EXIT_MODULE, worker: str = ""):
        super().__init__(message, exit_code, worker)
        self.message, self.exit_code, self.worker = message, exit_code, worker

    def __str__(self) -> str:
        return self.message


def chunk_workflow(raw: dict, chunk: Chunk, outputs: dict, attempt: str) -> tuple[dict, dict]:
    """The workflow mapping of one chunk's job, and its part file per output label.
    ``outputs``: ``{label: [parameter, parts folder, suffix]}``."""
    raw = copy.deepcopy(raw)
    source = raw["source"] if isinstance(raw["source"], dict) else {"type": raw["source"]}
    source = {**source, "files": [chunk.file], "skip": chunk.start}
    if chunk.first_event is not None:
        source["first_event"] = chunk.first_event
    raw["source"] = source
    raw["process"] = {**(raw.get("process") or {}), "max_events": chunk.size,
                      "report_every_s": 0}
    parts = {}
    for label, (param, folder, suffix) in outputs.items():
        entry = raw["modules"][label]
        entry = dict(entry) if isinstance(entry, dict) else {"type": entry}
        parts[label] = entry[param] = str(Path(folder) / f"chunk-{chunk.id:05d}-{attempt}{suffix}")
        raw["modules"][label] = entry
    return raw, parts


def _plain(data: dict) -> dict:
    """``data`` as JSON data (NumPy scalars as Python numbers), to travel and be stored."""
    def default(obj):
        return obj.tolist() if hasattr(obj, "tolist") else str(obj)
    return json.loads(json.dumps(data, default=default))


def run_chunk(task: dict) -> dict:
    """Run one chunk's job here (a Dask task); its result, or :class:`ChunkFailed`."""
    began = time.time()
    where = f"{socket.gethostname()}:{os.getpid()}"
    chunk = Chunk(**task["chunk"])
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
    return {"report": _plain(result.report), "parts": parts, "worker": where, "wall_s": time.time() - began}


# -- the state of every chunk, and the resubmission file ----------------------------------------

@dataclass
class ChunkState:
    chunk: Chunk
    status: str = "todo"             # todo, done, failed
    parts: dict = field(default_factory=dict)
    report: dict | None = None
    error: str | None = None
    exit_code: int | None = None
    worker: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self.chunk), "status": self.status, "parts": self.parts,
                "report": self.report, "error": self.error, "exit_code": self.exit_code,
                "worker": self.worker, "wall_s": self.wall_s}

    @classmethod
    def from_dict(cls, data: dict) -> ChunkState:
        keys = ("id", "file", "start", "stop", "first_index", "first_event")
        return cls(Chunk(**{k: data[k] for k in keys}), data["status"], data.get("parts") or {},
                   data.get("report"), data.get("error"), data.get("exit_code"),
                   data.get("worker"), data.get("wall_s", 0.0))


def resubmission_path(report_json: str | None) -> str:
    return f"{report_json}.failed.json" if report_json else RESUBMISSION_DEFAULT


@dataclass
class Resubmission:
    """A resubmission file: what a farm run that had failed chunks leaves for the next one."""

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
            raise InputError(f"{path}: not a recorun resubmission file (one is written by "
                             f"--executor dask when chunks fail)")
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


# -- the driver ---------------------------------------------------------------------------------

@dataclass
class FarmOptions:
    workflow: str                           # the YAML file
    overrides: list[str]                    # --set and the like, in order (after a resubmitted
                                            # run's own)
    scheduler_address: str | None = None    # None: a LocalCluster of local_workers
    local_workers: int | None = None        # None: CPUs / process.threads
    chunk_size: int = DEFAULT_CHUNK_SIZE
    resubmit: Resubmission | None = None
    resubmission_file: str = RESUBMISSION_DEFAULT


class FarmError(RecorunError):
    """Some chunks failed: the run is incomplete (see the resubmission file)."""

    exit_code = EXIT_MODULE


@contextmanager
def _client(options: FarmOptions, threads: int, quiet: bool, say):
    from distributed import Client, LocalCluster
    level = logging.ERROR if quiet else logging.WARNING
    logging.getLogger("distributed").setLevel(level)     # the scheduler's and nannies' news
    cluster = None
    if options.scheduler_address:
        try:
            client = Client(options.scheduler_address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot connect to the Dask scheduler at "
                              f"{options.scheduler_address}: {exc}") from None
    else:
        workers = options.local_workers or max(1, (os.cpu_count() or 1) // max(threads, 1))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=level)
        client = Client(cluster)
    try:
        workers = len(client.nthreads())
        say(f"dask scheduler {client.scheduler.address} (dashboard {client.dashboard_link}): "
            f"{workers} workers"
            + ("; the chunks wait for workers to join" if workers == 0 else ""))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _initial_states(built: BuiltWorkflow, options: FarmOptions, targets, say
                    ) -> list[ChunkState]:
    previous = options.resubmit
    if previous is None:
        return [ChunkState(c) for c in plan_chunks(built, options.chunk_size)]
    if Path(previous.workflow).resolve() != Path(options.workflow).resolve():
        say(f"warning: {previous.path} was written for {previous.workflow}, not "
            f"{options.workflow}")
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


def _chunk_line(state: ChunkState) -> str:
    c = state.chunk
    return f"chunk {c.id} ({Path(c.file).name} entries {c.start}-{c.stop - 1})"


def _collect(future, state: ChunkState) -> None:
    if future.status == "finished":
        result = future.result()
        state.status, state.report, state.parts = "done", result["report"], result["parts"]
        state.worker, state.wall_s = result["worker"], result["wall_s"]
        return
    state.status = "failed"
    try:
        exc = future.exception()
    except Exception as other:                  # cancelled futures raise here
        exc = other
    if isinstance(exc, ChunkFailed):
        state.error, state.exit_code, state.worker = exc.message, exc.exit_code, exc.worker
    else:                                       # KilledWorker, a lost connection...
        state.error, state.exit_code = f"{type(exc).__name__}: {exc}", EXIT_MODULE


def _run_chunks(client, raw: dict, file: str, todo: list[ChunkState], targets, *,
                report_every_s: float, say, shout) -> bool:
    """Submit ``todo``, wait for every chunk; False when interrupted (the rest cancelled)."""
    outputs = {label: [t.param, t.parts_dir, Path(t.destination).suffix]
               for label, t in targets.items()}
    for target in targets.values():
        Path(target.parts_dir).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    pending = {}
    for state in todo:
        task = {"workflow": raw, "file": file, "chunk": asdict(state.chunk), "outputs": outputs}
        future = client.submit(run_chunk, task, key=f"recorun-chunk-{state.chunk.id:05d}-"
                                                    f"{token}", retries=1)
        pending[future] = state
    total, began, last = len(todo), time.monotonic(), time.monotonic()
    finished = events = 0
    try:
        while pending:
            ready = [f for f in pending if f.done()]
            for future in ready:
                state = pending.pop(future)
                _collect(future, state)
                finished += 1
                if state.status == "done":
                    events += state.report["events"]["read"]
                    say(f"{_chunk_line(state)} done: {state.report['events']['read']} events "
                        f"in {state.wall_s:.1f} s on {state.worker}; {finished} of {total} "
                        f"chunks, {events} events")
                else:
                    shout(f"{_chunk_line(state)} FAILED (tried twice): {state.error}")
            now = time.monotonic()
            if report_every_s > 0 and now - last >= report_every_s and pending:
                last = now
                say(f"{finished} of {total} chunks done, {events} events "
                    f"({events / (now - began):.1f} Hz), {len(pending)} to go")
            if not ready:
                time.sleep(0.1)
    except KeyboardInterrupt:
        shout(f"interrupted: cancelling the {len(pending)} chunks not finished")
        for future, state in pending.items():
            future.cancel()
            state.status, state.exit_code = "failed", EXIT_INTERRUPTED
            state.error = "interrupted before it finished"
        return False
    return True


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
                  nominal=None) -> dict:
    """One job report of the done chunks' reports, on the zero ``template`` of the workflow
    (events, paths, modules added up; see the module docstring)."""
    report = copy.deepcopy(template)
    report["events"] = dict.fromkeys(EVENT_KEYS, 0)
    report["failed_events"] = []
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
                                            "file": chunk.file, "entry": chunk.start + local})
        for kind in ("paths", "endpaths"):
            for name, entry in part[kind].items():
                _add_path(report[kind][name], entry)
        for label, entry in part["modules"].items():
            _add_module(report["modules"][label], entry)
        for item in part["source"].get("skipped_files") or []:
            skipped.append({**item, "chunk": chunk.id,
                            "entries": [chunk.start, chunk.stop]})
    report["source"]["skipped_files"] = skipped
    ev = report["events"]
    report["wall_s"] = max(wall_s, 1e-9)
    report["throughput_hz"] = (ev["accepted"] + ev["rejected"] + ev["failed"]) / report["wall_s"]
    sonic = sonic_section(report["modules"], nominal)
    if sonic:
        report["sonic"] = sonic
    else:
        report.pop("sonic", None)
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


def _not_processed(failed: list[ChunkState]) -> str | None:
    if not failed:
        return None
    events = sum(s.chunk.size for s in failed)
    listed = "; ".join(f"chunk {s.chunk.id} ({s.chunk.size} events: {s.chunk.describe()}, "
                       f"job event indices {s.chunk.first_index} to "
                       f"{s.chunk.first_index + s.chunk.size - 1}): {s.error}" for s in failed)
    return f"{events} events in {len(failed)} failed chunks were not processed: {listed}"


def _farm_section(options: FarmOptions, states, todo, failed, targets, workers,
                  chunk_size: int, submissions: int, resubmission) -> dict:
    """The report's ``farm`` section: how the work was cut and run."""
    return {
        "executor": "dask", "scheduler": options.scheduler_address or "local",
        "workers": workers, "chunk_size": chunk_size, "chunks": len(states),
        "chunks_run": len(todo), "chunks_done": len(states) - len(failed),
        "failed_chunks": [{"chunk": s.chunk.id, "file": s.chunk.file,
                           "entries": [s.chunk.start, s.chunk.stop], "events": s.chunk.size,
                           "error": s.error, "exit_code": s.exit_code} for s in failed],
        "chunk_wall_s_total": sum(s.wall_s for s in states if s.status == "done"),
        "submissions": submissions,
        "resubmission_file": resubmission.path if resubmission else None,
        "outputs": {label: t.destination for label, t in targets.items()}}


def run_farm(built: BuiltWorkflow, options: FarmOptions, *, quiet: bool = False, out=None,
             nominal=None) -> JobResult:
    """Run the workflow ``built`` (from ``options.workflow`` and ``options.overrides``) on a
    Dask cluster; the merged report and the exit code as :func:`framework.process.run_job`
    gives them. Raises :class:`~framework.errors.RecorunError` for what stops it before any
    chunk runs (a source that cannot be cut, an unreachable scheduler...)."""
    out = out or sys.stderr

    def shout(text: str) -> None:
        print(f"recorun: {text}", file=out, flush=True)

    say = (lambda text: None) if quiet else shout
    config, previous = built.config, options.resubmit
    targets = output_targets(built)
    for warning in farm_warnings(built):
        say(f"warning: {warning}")
    raw = raw_workflow(options.workflow, options.overrides)
    states = _initial_states(built, options, targets, say)
    todo = [s for s in states if s.status != "done"]
    chunk_size = previous.chunk_size if previous else options.chunk_size
    submissions = previous.submissions + 1 if previous else 1
    say(f"{len(states)} chunks of about {chunk_size} entries "
        f"({sum(s.chunk.size for s in states)} events); {len(todo)} to run")
    began, completed, workers = time.time(), True, None
    if todo:
        with _client(options, config.process.threads, quiet, say) as client:
            workers = len(client.nthreads())
            completed = _run_chunks(client, raw, config.file, todo, targets,
                                    report_every_s=config.process.report_every_s, say=say,
                                    shout=shout)
    wall = time.time() - began + (previous.wall_s if previous else 0.0)
    failed = [s for s in states if s.status != "done"]
    exit_code, error, resubmission = EXIT_OK, None, None
    if not failed:
        merge_outputs(targets, states, say)
    else:
        exit_code = EXIT_INTERRUPTED if not completed else next(
            (s.exit_code for s in failed if s.exit_code), EXIT_MODULE)
        resubmission = Resubmission(options.resubmission_file,
                                    str(Path(options.workflow).resolve()),
                                    list(options.overrides), chunk_size, states, wall,
                                    submissions)
        resubmission.write()
        what = "failed" if completed else "were cancelled or failed (interrupted)"
        error = FarmError(
            f"{len(failed)} of {len(states)} chunks {what}; their events were not processed "
            f"and no output was merged (the done chunks' parts are kept). Run only those "
            f"chunks again with: recorun {options.workflow} --executor dask --resubmit "
            f"{options.resubmission_file} [--set ... to fix the cause]")
    template = summarize(Scheduler(built), workflow=config.file, exit_code=EXIT_OK,
                         not_processed=None)
    report = merge_reports(template, states, wall_s=wall, nominal=nominal)
    report.update(exit_code=exit_code, not_processed=_not_processed(failed),
                  stop_reason=None if not failed else
                  ("interrupted" if not completed else "chunks failed"))
    report["farm"] = _farm_section(options, states, todo, failed, targets, workers, chunk_size,
                                   submissions, resubmission)
    return JobResult(exit_code, report, None, None, error)
