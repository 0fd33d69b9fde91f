"""A workflow on a Dask cluster: ``recorun WORKFLOW.yaml --executor dask`` (docs/FARM.md).

The farm is a chunked executor (:mod:`recorun.framework.chunked` plans the chunks, runs one
chunk's job and merges the outputs and reports); this module runs the chunks as Dask tasks.

Tasks
    One Dask task per chunk runs :func:`~recorun.framework.chunked.run_chunk` in the worker's
    process, with its own thread pool, streams and SONIC clients, exactly as ``recorun`` would.

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

Merging
    When every chunk is done, the outputs and reports are merged
    (:func:`~recorun.framework.chunked.merge_outputs`,
    :func:`~recorun.framework.chunked.merge_reports`); ``wall_s`` is the farm's wall time
    (first submission to last result, over all submissions) and the report's ``farm`` section
    says how the work was cut and run.

Resubmission
    ``recorun WORKFLOW.yaml --executor dask --resubmit FILE [--set ...]`` runs the first run's
    overrides, then the new ones (to fix the cause), reruns only the chunks that are not done
    (and any done chunk whose part file is gone), and merges as above.

Dask itself is imported only when a farm runs: it is the ``farm`` extra.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from recorun.framework.build import BuiltWorkflow
from recorun.framework.chunked import (DEFAULT_CHUNK_SIZE, RESUBMISSION_DEFAULT, ChunkFailed,
                                       ChunkState, Resubmission, initial_states, merge_outputs,
                                       merge_reports, not_processed, output_targets,
                                       raw_workflow, resubmission_path, run_chunk)
from recorun.framework.errors import EXIT_INTERRUPTED, EXIT_MODULE, EXIT_OK, ConfigError, RecorunError
from recorun.framework.executors import JobExecutor, JobRequest
from recorun.framework.extras import require
from recorun.framework.module import OutputModule
from recorun.framework.process import JobResult
from recorun.framework.reports import summarize
from recorun.framework.scheduler import Scheduler

log = logging.getLogger(__name__)


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
                    say(f"{state.line()} done: {state.report['events']['read']} events "
                        f"in {state.wall_s:.1f} s on {state.worker}; {finished} of {total} "
                        f"chunks, {events} events")
                else:
                    shout(f"{state.line()} FAILED (tried twice): {state.error}")
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


def _farm_section(options: FarmOptions, states, todo, failed, targets, workers,
                  chunk_size: int, submissions: int, resubmission) -> dict:
    """The report's ``farm`` section: how the work was cut and run."""
    return {
        "executor": "dask", "scheduler": options.scheduler_address or "local",
        "workers": workers, "chunk_size": chunk_size, "chunks": len(states),
        "chunks_run": len(todo), "chunks_done": len(states) - len(failed),
        "failed_chunks": [{"chunk": s.chunk.id, "file": s.chunk.file,
                           "entries": [s.chunk.first_entry, s.chunk.stop_entry],
                           "events": s.chunk.size,
                           "error": s.error, "exit_code": s.exit_code} for s in failed],
        "chunk_wall_s_total": sum(s.wall_s for s in states if s.status == "done"),
        "submissions": submissions,
        "resubmission_file": resubmission.path if resubmission else None,
        "outputs": {label: t.destination for label, t in targets.items()}}


def run_farm(built: BuiltWorkflow, options: FarmOptions, *, quiet: bool = False, out=None,
             cli_options=None) -> JobResult:
    """Run the workflow ``built`` (from ``options.workflow`` and ``options.overrides``) on a
    Dask cluster; the merged report and the exit code as :func:`recorun.framework.process.run_job`
    gives them. Raises :class:`~recorun.framework.errors.RecorunError` for what stops it before any
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
    states = initial_states(built, options.workflow, options.chunk_size, previous, targets, say)
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
    report = merge_reports(template, states, wall_s=wall, options=cli_options)
    report.update(exit_code=exit_code, not_processed=not_processed(failed),
                  stop_reason=None if not failed else
                  ("interrupted" if not completed else "chunks failed"))
    report["farm"] = _farm_section(options, states, todo, failed, targets, workers, chunk_size,
                                   submissions, resubmission)
    return JobResult(exit_code, report, None, None, error)


class DaskExecutor(JobExecutor):
    """``--executor dask``: the input in chunks, one Dask task each (see the module doc)."""

    name = "dask"

    def run(self, request: JobRequest) -> JobResult:
        require("distributed", "recorun[farm]", "--executor dask")
        args = request.options
        resubmit = getattr(args, "resubmit", None)
        options = FarmOptions(
            request.workflow, request.overrides, getattr(args, "scheduler_address", None),
            getattr(args, "local_workers", None),
            getattr(args, "chunk_size", None) or DEFAULT_CHUNK_SIZE,
            Resubmission.load(resubmit) if resubmit else None,
            resubmission_path(getattr(args, "report_json", None)))
        return run_farm(request.built, options, quiet=request.quiet, out=request.out,
                        cli_options=args)
