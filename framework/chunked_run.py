"""The driver of a chunked job: one executor, two back ends (local processes, a Dask cluster).

``recorun W.yaml --processes N`` and ``recorun W.yaml --executor dask`` differ only in where
their workers run (a :class:`WorkerPool`: :class:`~recorun.framework.process_pool.ProcessPool`,
:class:`recorun.farm.executor.DaskPool`). Everything else is here and in
:mod:`recorun.framework.chunked`:

1. The plan: the input cut into chunks by the source (:meth:`Source.chunks`), of
   ``chunk_size`` events (default :func:`default_chunk_size`: about four per worker), or what a
   resubmission file left to do.
2. The workers start; each builds the workflow once (:class:`ChunkWorker`). Things every
   worker of this node should share are set up first, once, by the plugins
   (``recorun_node_setup``: a SONIC workflow's local fallback server).
3. Every chunk is submitted; the pool runs each on an idle worker. A chunk whose worker died
   is run once more on another worker, then counted as lost. A chunk whose job failed (an
   input or a module error with ``on_error: stop``) is not run again, and the job stops as a
   one-process job would: no new events, those in flight finished.
4. SIGINT or SIGTERM: the workers are told to stop (they finish the events in flight), the
   chunks not started are not run; a second signal kills the workers at once.
5. Every worker ends its job (end_job once) and sends its process report (its modules'
   details, CPU time, peak RSS).
6. When every chunk is complete, the outputs' parts are merged in chunk order; the chunks' and
   the processes' reports become one job's report, with the events not processed named.
   Chunks that did not complete are written to a resubmission file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from .chunked import (MAX_CHUNK, MIN_CHUNK, ChunkState, Resubmission, initial_states,
                      merge_outputs, merge_reports, not_processed, output_targets, raw_workflow)
from .errors import EXIT_CONFIG, EXIT_MODULE, EXIT_OK, RecorunError
from .hooks import hook
from .process import JobResult, abandoned_text
from .reports import summarize
from .scheduler import Scheduler
from .signals import JobInterrupted, exit_code, job_signals

#: how often a lost chunk (its worker died) is run in all
ATTEMPTS = 2
#: exit codes of a chunk's job that stop the whole job (as they stop a one-process job)
STOPPING = (3, 4)


def default_chunk_size(events: int, workers: int) -> int:
    """About four chunks per worker, so that the last chunks balance the load, and at least
    ``MIN_CHUNK`` events, so that a chunk's fixed cost (a source opened, part files begun and
    ended, a report sent: tens of ms) stays a few per cent of its time."""
    return max(MIN_CHUNK, min(MAX_CHUNK, -(-events // max(4 * workers, 1))))


class WorkerPool:
    """Where a chunked job's :class:`~recorun.framework.chunked.ChunkWorker` s run. The driver
    submits chunks and reads what happened; a pool runs each chunk on one of its workers, one
    chunk per worker at a time."""

    kind = ""
    size = 0                      # workers
    local = True                  # its workers are started here (they inherit this node's set-up)

    def start(self, task: dict) -> list[dict]:
        """Start the workers on ``task`` (each builds the workflow once); their start
        failures (``{"error", "exit_code", "worker"}``)."""
        raise NotImplementedError

    def submit(self, state: ChunkState, attempt: str) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[tuple]:
        """``("done", state, result)`` for a chunk run (whatever its exit code), ``("lost",
        state, reason)`` for a chunk whose worker died or vanished."""
        raise NotImplementedError

    def interrupt(self) -> list[ChunkState]:
        """Stop: the workers finish the events in flight; the chunks not started are given
        back."""
        raise NotImplementedError

    def finish(self) -> list[dict]:
        """End every worker's job (end_job once each); their process reports."""
        raise NotImplementedError

    def close(self) -> None:
        """Kill whatever still runs (an abort)."""

    def section(self) -> dict:
        """What the report says about the workers."""
        return {"executor": self.kind, "workers": self.size}

    def describe(self) -> str:
        return f"{self.size} workers ({self.kind})"


class ChunkedJobError(RecorunError):
    """Some chunks failed or were not run: the job is incomplete."""

    exit_code = EXIT_MODULE


def run_chunked(request, pool: WorkerPool, *, chunk_size: int | None = None,
                resubmit: Resubmission | None = None,
                resubmission_file: str | None = None) -> JobResult:
    """Run ``request`` (a :class:`~recorun.framework.executors.JobRequest`) in chunks on
    ``pool``; one job's result (see the module docstring)."""
    with job_signals(request.out) as signals:
        return _ChunkedRun(request, pool, chunk_size, resubmit, resubmission_file,
                           signals).run()


class _ChunkedRun:
    def __init__(self, request, pool, chunk_size, resubmit, resubmission_file, signals):
        self.request, self.pool, self.signals = request, pool, signals
        self.built = request.built
        self.config = request.built.config
        self.previous = resubmit
        self.resubmission_file = resubmission_file
        self.chunk_size = resubmit.chunk_size if resubmit else chunk_size
        self.out = request.out
        self.stopping: str | None = None          # why no more chunks are started
        self.exit_code = EXIT_OK
        self._withdrawn: list | None = None       # the chunks given back when stopping
        self.first_submit: float | None = None
        self.last_done: float | None = None

    def say(self, text: str) -> None:
        if not self.request.quiet:
            self.shout(text)

    def shout(self, text: str) -> None:
        print(f"recorun: {text}", file=self.out, flush=True)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> JobResult:
        built, config, previous = self.built, self.config, self.previous
        targets = output_targets(built)
        outputs = {label: [t.param, t.parts_dir, Path(t.destination).suffix]
                   for label, t in targets.items()}
        task = {"workflow": raw_workflow(self.request.workflow, self.request.overrides),
                "file": config.file, "outputs": outputs,
                "log_level": logging.WARNING if self.request.quiet else logging.INFO}
        began = time.time()
        states: list[ChunkState] = []
        processes: list[dict] = []
        def abort():                              # a second signal: no resubmission
            self.pool.close()
            for target in targets.values():
                shutil.rmtree(target.parts_dir, ignore_errors=True)
        try:
            with contextlib.ExitStack() as node, self.signals.at_abort(abort):
                if self.pool.local:
                    for env in hook().recorun_node_setup(built=built, stack=node,
                                                         say=self.say):
                        node.enter_context(temporary_environment(env or {}))
                processes = self._work(task, targets, states)
        except JobInterrupted as exc:             # while the node was set up
            self.pool.close()
            self.stopping, self.exit_code = "interrupted", exit_code(exc.signum)
        # the events' time: first chunk submitted to last chunk done (a one-process job's
        # wall time is its event loop's too); the set-up before it is reported apart
        setup = (self.first_submit or time.time()) - began
        wall = ((self.last_done or time.time()) - (self.first_submit or time.time())
                + (previous.wall_s if previous else 0.0))
        incomplete = [s for s in states if s.status != "done"]
        error = None
        if states and not incomplete:     # every chunk done (a signal after that included)
            merge_outputs(targets, states, self.say)
        elif not states and self.stopping is None:
            if targets:
                for target in targets.values():
                    shutil.rmtree(target.parts_dir, ignore_errors=True)
                self.say("no event to process: output files left as they are")
        elif not states:
            error = ChunkedJobError(f"the job was stopped ({self.stopping}) before any chunk "
                                    f"ran; nothing was written")
        else:
            if self.exit_code == EXIT_OK:
                self.exit_code = next((s.exit_code for s in incomplete if s.exit_code),
                                      EXIT_MODULE)
            error = self._incomplete(states, incomplete, wall)
        template = summarize(Scheduler(built), workflow=config.file, exit_code=EXIT_OK,
                             not_processed=None)
        report = merge_reports(template, states, wall_s=wall, options=self.request.options,
                               processes=processes, workers=self.pool.size)
        unplanned = None
        if not states and self.stopping is not None:
            planned = built.source.planned_events(config.process.max_events)
            unplanned = (f"{'the job' if planned is None else f'all {planned}'} events were not "
                         f"processed: the job was stopped ({self.stopping}) during set-up")
        report.update(exit_code=self.exit_code, stop_reason=self.stopping,
                      not_processed=abandoned_text(report["abandoned_events"],
                                                   not_processed(states) or unplanned))
        if self.signals.first:
            report["signal"] = signal.Signals(self.signals.first).name
        report["chunked"] = {
            **self.pool.section(), "chunk_size": self.chunk_size, "chunks": len(states),
            "chunks_done": len(states) - len(incomplete),
            "incomplete_chunks": [{"chunk": s.chunk.id, "file": s.chunk.file,
                                   "entries": [s.chunk.first_entry, s.chunk.stop_entry],
                                   "events": s.chunk.size, "status": s.status,
                                   "error": s.error, "exit_code": s.exit_code}
                                  for s in incomplete],
            "setup_s": setup,
            "chunk_wall_s_total": sum(s.wall_s for s in states if s.status == "done"),
            "chunk_overhead_s_total": sum(s.overhead_s for s in states if s.status == "done"),
            "submissions": previous.submissions + 1 if previous else 1,
            "resubmission_file": self.resubmission_file if incomplete else None,
            "outputs": {label: t.destination for label, t in targets.items()},
            "workers": [{k: v for k, v in p.items() if k not in ("details", "runs", "services")}
                        for p in processes]}
        return JobResult(self.exit_code, report, None, None, error)

    def _plan(self, targets, states: list[ChunkState]) -> list[ChunkState]:
        """The chunks (into ``states``), sized for the pool's workers; those to run, the
        largest first (so that the last ones to finish are small)."""
        if self.chunk_size is None and self.previous is None:
            self.chunk_size = self._balanced_size()
        states.extend(initial_states(self.built, self.request.workflow, self.chunk_size,
                                     self.previous, targets, self.say))
        todo = sorted((s for s in states if s.status != "done"),
                      key=lambda s: (-s.chunk.size, s.chunk.id))
        self.say(f"{len(states)} chunks of about {self.chunk_size} events "
                 f"({sum(s.chunk.size for s in states)} events), {len(todo)} to run on "
                 f"{self.pool.describe()}")
        for target in targets.values():
            Path(target.parts_dir).mkdir(parents=True, exist_ok=True)
        return todo

    def _balanced_size(self) -> int:
        """The default chunk size (:func:`default_chunk_size`), made a little smaller where
        that gives every worker as many chunks (cuts on cluster boundaries can leave one
        over, and then one worker runs the last chunk alone)."""
        total = self.built.source.planned_events(self.config.process.max_events)
        size = default_chunk_size(total or MAX_CHUNK, self.pool.size)
        if not total or self.pool.size < 2:
            return size
        max_events = self.config.process.max_events
        for candidate in range(size, max(MIN_CHUNK, int(size * 0.7)) - 1, -1):
            try:
                count = len(self.built.source.chunks(max_events, candidate))
            except NotImplementedError:
                return size
            if count % self.pool.size == 0:
                return candidate
        return size

    def _work(self, task: dict, targets, states: list[ChunkState]) -> list[dict]:
        """Start the workers, plan and run the chunks, end the workers; their reports. A
        first signal while the workers start abandons the job; later, no new chunks and the
        workers finish the events in flight (:mod:`recorun.framework.signals`)."""
        pool = self.pool

        def stop(signum):
            name = signal.Signals(signum).name
            self.shout(f"{name}: no new chunks; the workers finish the events in flight "
                       f"(again to abort)")
            self._stop("interrupted", exit_code(signum))

        try:
            failures = pool.start(task)
            todo = self._plan(targets, states)
        except JobInterrupted as exc:
            pool.close()
            self.stopping, self.exit_code = "interrupted", exit_code(exc.signum)
            return []
        with self.signals.stopping(stop):
            if failures:
                first = failures[0]
                self.shout(f"a worker could not set the job up ({first.get('worker')}): "
                           f"{first['error']}")
                self.exit_code = first.get("exit_code") or EXIT_CONFIG
                self.stopping = "configuration error" if self.exit_code == EXIT_CONFIG \
                    else "worker start failed"
                for state in todo:
                    state.status, state.error = "todo", f"not run: {first['error']}"
                pool.close()
                return []
            token = uuid.uuid4().hex[:6]
            attempts = {id(s): 0 for s in todo}
            self.first_submit = time.time()
            for state in todo:
                pool.submit(state, f"{token}a1")
            self._loop(todo, attempts, token)
            self.last_done = time.time()
            return pool.finish()

    def _loop(self, todo, attempts, token) -> None:
        pool = self.pool
        waiting = {id(s) for s in todo}
        total, finished, events = len(todo), 0, 0
        began = last = time.monotonic()
        every = self.config.process.report_every_s
        while waiting:
            if self.stopping and self._withdrawn is None:
                self._withdrawn = pool.interrupt()
                for state in self._withdrawn:
                    state.status = "todo"
                    waiting.discard(id(state))
                continue
            for kind, state, payload in pool.poll(0.2):
                if kind == "done":
                    waiting.discard(id(state))
                    finished += 1
                    self._done(state, payload)
                    events += state.report["events"]["read"] if state.report else 0
                    if state.status == "done":
                        self.say(f"{state.line()} done: {state.report['events']['read']} "
                                 f"events in {state.wall_s:.1f} s on {state.worker}; "
                                 f"{finished} of {total} chunks, {events} events")
                elif kind == "lost":
                    attempts[id(state)] += 1
                    if attempts[id(state)] < ATTEMPTS and not self.stopping:
                        self.shout(f"{state.line()}: {payload}; running it again")
                        pool.submit(state, f"{token}a{attempts[id(state)] + 1}")
                    else:
                        waiting.discard(id(state))
                        finished += 1
                        state.status, state.exit_code = "lost", EXIT_MODULE
                        state.error = f"{payload} (tried {attempts[id(state)]} times)"
                        self.shout(f"{state.line()} LOST: {state.error}")
            now = time.monotonic()
            if every > 0 and now - last >= every and waiting:
                last = now
                self.say(f"{finished} of {total} chunks done, {events} events "
                         f"({events / (now - began):.1f} Hz), {len(waiting)} to go")

    def _stop(self, reason: str, code: int) -> None:
        if self.stopping is None:
            self.stopping, self.exit_code = reason, code

    def _done(self, state: ChunkState, result: dict) -> None:
        state.report, state.parts = result["report"], result["parts"]
        state.worker, state.wall_s = result["worker"], result["wall_s"]
        state.overhead_s = result["overhead_s"]
        state.exit_code = result["exit_code"]
        if result["complete"] and result["exit_code"] == EXIT_OK:
            state.status, state.error = "done", None
            return
        state.status = "interrupted" if result["stop_reason"] == "interrupted" else "failed"
        state.error = result["error"] or result["stop_reason"]
        if state.status == "failed":
            self.shout(f"{state.line()} FAILED: {state.error}")
            if state.exit_code in STOPPING:
                self._stop(result["stop_reason"] or "chunk failed", state.exit_code)

    def _incomplete(self, states, incomplete, wall) -> ChunkedJobError:
        options = self.request.options
        path = self.resubmission_file
        if path:
            Resubmission(path, str(Path(self.request.workflow).resolve()),
                         list(self.request.overrides), self.chunk_size, states, wall,
                         self.previous.submissions + 1 if self.previous else 1).write()
        again = (f" Run only those chunks again with: recorun {self.request.workflow} "
                 f"{_executor_flags(options)}--resubmit {path}"
                 + ("" if self.stopping == "interrupted" else " [--set ... to fix the cause]")
                 if path else "")
        why = "the job was interrupted: " if self.stopping == "interrupted" else ""
        return ChunkedJobError(
            f"{why}{len(incomplete)} of {len(states)} chunks did not complete; no output was "
            f"merged (the complete chunks' parts are kept).{again}")


def _executor_flags(options) -> str:
    if options is None:
        return ""
    if getattr(options, "executor", "local") != "local":
        return f"--executor {options.executor} "
    processes = getattr(options, "processes", None)
    return f"--processes {processes} " if processes else ""


@contextlib.contextmanager
def temporary_environment(values: dict):
    """``values`` in os.environ while the workers start (they inherit it), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
