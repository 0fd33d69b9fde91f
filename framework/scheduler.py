"""The scheduler: runs the module graph over events on a thread pool.

State of the job
----------------
``streams`` events are in flight at once. A stream that is free asks for the source: the
source is read by one stream at a time, the others wait in line (``_reading``, ``_waiting``),
and whoever finishes reading hands the source to the next stream in line. The job ends when
every stream has found the source empty or the job has been told to stop (an error with
``on_error: stop``, an input error, an interrupt); events already in flight are always
finished, so every event read is accounted for: accepted, rejected or failed.

Runs and luminosity blocks
--------------------------
One luminosity block at a time (docs/TRANSITIONS.md). The stream that reads the first event of
another block keeps the source and holds the event (``_held``) until no event is in flight
(``_running``); the last event to finish resumes it: the old block (and run) end, the new
ones begin (``_transition``: every service, then every module instance), the event starts and
the source goes to the next stream in line. Transition hooks therefore never run beside an
event. The last stream to find the source empty ends the open block and run.

State of an event
-----------------
``paths running`` -> ``end paths running`` -> ``done``. All trigger paths start together;
each walks its modules in order and stops at a filter that rejects. When the last path ends,
``TriggerResults`` is put and the end paths run the same way; a module on an end path with
``select_events`` runs only for events one of those paths accepted. An event that hit an
error is failed; the modules still to run for it are skipped.

State of a module within an event
---------------------------------
``not requested`` -> ``prefetching`` -> ``running`` -> ``done`` (passed / rejected / failed).
A module is requested by a path or by a consumer (on demand). The first request starts it: it
requests the producers it reads from and runs when they are all done; later requests only wait
for its result. It therefore runs at most once per event, and producers nobody asks for never
run. A serial module waits in its serial queue instead of running directly.

``EventRun.states[worker.index]`` holds this state: ``None`` (not requested), ``STARTED`` (a
module called at once, or given to the shared queue to be, its producers done already and no
queue to wait in; a second request replaces the marker with a :class:`ModuleState` that holds
its callback), a
:class:`ModuleState` (started, waiting for producers, a queue or external work) or, once done,
the result itself: ``True``, ``False`` or ``FAILED``. A result never changes, so a result read
without the lock is final.

An ExternalWork module runs ``acquire``, then its state is ``external``: no thread is held.
When both ``acquire`` has returned and ``holder.done(result)`` was called, ``produce(event,
result)`` is scheduled on a pool thread (or the module fails, without ``produce``, if the work
failed); the result lives in the holder, which only the event's callbacks reference.

Threads and the stack
---------------------
The calling thread is pool thread 0, so with ``threads: 1`` every module runs on it. With
``synchronous: true`` (which needs one thread and one stream) ExternalWork also waits for its
external work right after ``acquire``: modules then run in one fixed order, for debugging.
Otherwise, even on one thread and one stream, other modules of the event run while the external
work is out.

Work that can go on at once does so on the calling thread: a path's walk is a loop over its
modules, and a module whose producers are all done runs inside the request for it. With more
than one thread, independent upstream producers that can all run now are split: the calling
thread runs the first, the others go to the shared queue (:meth:`_spread_ready`), so that
idle threads run them within the same event. What has to
wait (a result not known yet, an event's start) resumes as a task through
:meth:`ThreadPool.soon`, so the stack is bounded whatever the path length and the number of
events: an event's task walks at most its first path and then its first end path, and the end
of an event only reads the next one, whose start is a new task. Further paths and end paths
of the event are given to the shared queue at once (:meth:`ThreadPool.share`), where an idle
thread takes them.

Locks: ``lock`` guards the job's counters and the source's line; ``_state_lock`` guards every
event's module states and counts (held only for a few assignments, never while a module runs,
and never together with ``lock``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from threading import get_ident

import networkx as nx

import inspect

from .build import BuiltWorkflow, conditions_service
from .errors import ConfigError, InputError, ModuleError
from .event import Event, ModuleEvent, TriggerResults
from .pool import OrderedQueue, SerialQueue, ThreadPool
from .graph import TRIGGER_RESULTS
from .module import Concurrency, ExternalWorkProducer, Module, WaitingTaskHolder
from .stats import ModuleStats, PathStats
from .transitions import LuminosityBlock, Run

log = logging.getLogger(__name__)

PENDING = object()     # the result is not known yet: the requester is called back
FAILED = object()      # the module failed, or was skipped because its event had failed
STARTED = object()     # the state of a module running with nothing to wait for
DONE = (True, False, FAILED)   # the states of a module done: its results

perf_ns = time.perf_counter_ns
cpu_ns = time.thread_time_ns

METHODS = {"producer": "produce", "filter": "filter", "analyzer": "analyze", "output": "write"}


class Worker:
    """One module label: its instances (one per stream or one shared), its stats."""

    __slots__ = ("label", "index", "type_name", "kind", "method", "external", "deps",
                 "upstream", "consumes", "records", "instances", "select_events", "copies",
                 "queue", "stats", "plain", "calls", "result_arg", "result_dropped")

    def __init__(self, index, node, copies, streams, queue):
        self.label = node.label
        self.index = index
        self.type_name = type(node.module).__name__
        self.kind = node.kind
        self.method = METHODS[node.kind]
        self.external = isinstance(node.module, ExternalWorkProducer)
        self.deps: list[Worker] = []        # producers it reads from
        self.upstream: list[Worker] = []    # all producers it needs, dependencies first
        self.consumes = frozenset(node.consumes)
        self.records = frozenset(node.module.consumed_records())
        self.instances = frozenset(node.module.produced_instances())
        self.select_events: tuple[str, ...] = ()
        self.copies = copies
        self.queue = queue
        self.stats = [ModuleStats() for _ in range(streams)]
        self.plain = False     # neither queued nor ExternalWork: called once its inputs are done
        self.calls: list = []  # per stream: the bound method `method` (`produce` for ExternalWork)
        # ExternalWork: produce(event, result) takes the holder's result
        self.result_arg = self.external and _takes_result(type(node.module).produce)
        self.result_dropped = False    # warned: a result given to a produce(event) form

    def instance(self, stream: int):
        copies = self.copies
        return copies[stream] if len(copies) > 1 else copies[0]


def merges_streams(cls) -> bool:
    """Whether a module type folds its per-stream copies together (defines merge_streams)."""
    return cls.merge_streams is not Module.merge_streams


def _takes_result(produce) -> bool:
    """Whether an ExternalWork ``produce`` takes the work's result after the event."""
    try:
        params = list(inspect.signature(produce).parameters.values())[1:]   # after self
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


class ModuleState:
    """A module started in an event and not done yet: who waits for it, what it waits for."""

    __slots__ = ("waiters", "deps_left", "path")

    def __init__(self, path):
        self.waiters: list[tuple] = []    # (fn, args): fn(*args, result) once done
        self.deps_left = 0
        self.path = path                  # who requested it first, for an error's context


class Sequence:
    """A path or an end path: workers in order."""

    __slots__ = ("name", "workers", "is_end", "stats")

    def __init__(self, name, workers, is_end, streams):
        self.name, self.workers, self.is_end = name, workers, is_end
        self.stats = [PathStats(len(workers)) for _ in range(streams)]


class EventRun:
    """One event in flight."""

    __slots__ = ("event", "stream", "states", "error", "left", "trigger", "started_ns")

    def __init__(self, event: Event, stream: int, n_workers: int):
        self.event = event
        self.stream = stream
        self.states: list = [None] * n_workers     # see the module docstring
        self.error: ModuleError | None = None
        self.left = 0                               # paths (then end paths) not done yet
        self.trigger: dict[str, bool] = {}
        self.started_ns = 0                         # for the tracer only


@dataclass
class JobStatus:
    """What the scheduler knows at the end (or at any moment, for progress)."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    stop_reason: str | None = None        # None: source exhausted
    stop_error: BaseException | None = None
    abandoned: list[dict] = field(default_factory=list)   # in flight when the drain timed out
    started: float = 0.0
    finished: float = 0.0
    cpu_started: float = 0.0           # the process's CPU time (every thread), seconds
    cpu_finished: float = 0.0

    @property
    def done(self) -> int:
        return self.accepted + self.rejected + self.failed


class Scheduler:
    def __init__(self, built: BuiltWorkflow, *, tracer=None, inflight=None):
        cfg = built.config
        self.built = built
        self.options = cfg.process
        self.streams = self.options.streams
        self.sync = self.options.synchronous
        self.skip_failed = self.options.on_error == "skip_event"
        self.pool = ThreadPool(self.options.threads)
        self._spread = self.options.threads > 1 and not self.sync
        self.tracer = tracer
        self.inflight = inflight
        self._calls = inflight.calls if inflight is not None else None
        self.lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.source = built.source
        self.conditions = conditions_service(built.services)
        self._new_run()
        self.workers: dict[str, Worker] = {}
        self._make_workers()
        self._n_workers = len(self.workers)
        self.ordered = [w for w in self.workers.values() if isinstance(w.queue, OrderedQueue)]
        self.paths = [Sequence(n, [self.workers[x] for x in labels], False, self.streams)
                      for n, labels in cfg.paths.items()]
        self.endpaths = [Sequence(n, [self.workers[x] for x in labels], True, self.streams)
                         for n, labels in cfg.endpaths.items()]

    # -- setup -----------------------------------------------------------------------------
    def _make_workers(self) -> None:
        graph = self.built.graph
        for index, label in enumerate(graph.topological_labels()):
            node = graph.nodes[label]
            concurrency = Concurrency(type(node.module).concurrency)
            if concurrency is Concurrency.STREAM:
                copies = [node.module] + [self.built.new_instance(label)
                                          for _ in range(self.streams - 1)]
            else:
                copies = [node.module]
            if node.kind == "output" and getattr(node.module, "ordered", False):
                queue = OrderedQueue(self.pool)
            elif concurrency is Concurrency.SERIAL:
                queue = SerialQueue(self.pool)
            else:
                queue = None
            worker = Worker(index, node, copies, self.streams, queue)
            worker.select_events = tuple(self.built.config.modules[label].select_events)
            self.workers[label] = worker
        for label, worker in self.workers.items():
            worker.deps = [self.workers[d] for d in graph.nodes[label].deps]
            ancestors = nx.ancestors(graph.graph, label)
            worker.upstream = sorted((self.workers[a] for a in ancestors if a in self.workers),
                                     key=lambda w: w.index)
            worker.plain = worker.queue is None and not worker.external

    def _new_run(self) -> None:
        """The state of one run over a source (the job's, or one chunk's)."""
        self.status = JobStatus()
        self.finished = threading.Event()
        self._reading = False                 # a stream is reading the source
        self._waiting: deque[int] = deque()   # streams in line for the source
        self._next_index = 0
        self._active_streams = self.streams
        self._running: dict[int, EventRun] = {}   # events started and not finished, by index
        self.abandoned = False                # see abandon()
        self._held: EventRun | None = None    # read, waiting for its luminosity block to begin
        self._run: Run | None = None
        self._lumi: LuminosityBlock | None = None
        self.lumis: list[LuminosityBlock] = []   # this run's, in order

    def reset_stats(self) -> None:
        """Zero every module's and path's counters (a chunked job's worker reports each chunk's
        own figures)."""
        for worker in self.workers.values():
            worker.stats = [ModuleStats() for _ in range(self.streams)]
        for seq in (*self.paths, *self.endpaths):
            seq.stats = [PathStats(len(seq.workers)) for _ in range(self.streams)]

    def all_instances(self):
        for worker in self.workers.values():
            for module in worker.copies:
                yield worker, module

    # -- the job ---------------------------------------------------------------------------
    def prepare(self, source) -> None:
        """Make the next :meth:`run` a new run over ``source`` (a chunk's) on the same modules:
        the status starts afresh, events are numbered from 0, the counters go on adding up. An
        interruption of the previous run carries over (nothing more is read)."""
        interrupted = self.status.stop_reason == "interrupted"
        self.source = source
        self._new_run()
        for worker in self.ordered:
            worker.queue.restart()
        if interrupted:
            self.stop("interrupted")

    def run(self) -> JobStatus:
        """Process events until the source is exhausted or the job is stopped."""
        for worker in self.workers.values():      # bound after begin_job, once per run
            worker.calls = [getattr(worker.instance(s), worker.method)
                            for s in range(self.streams)]
        self.status.started = time.time()
        self.status.cpu_started = time.process_time()
        self.pool.run(self._start_streams, self.finished)
        self.status.finished = time.time()
        self.status.cpu_finished = time.process_time()
        if self.pool.fatal is not None:
            raise RuntimeError("internal error in the scheduler:\n"
                               + self.pool.fatal_traceback) from self.pool.fatal
        return self.status

    def abandon(self) -> None:
        """End the run now, with events still in flight (a signal's drain timed out): they are
        listed in ``status.abandoned``, no module is called for them any more, and the
        luminosity block and run are not ended (their events are not all done)."""
        with self.lock:
            if self.finished.is_set():
                return
            self.abandoned = True
            held = [self._held] if self._held is not None else []
            self.status.abandoned = [{"index": r.event.index, "event": str(r.event.id)}
                                     for r in sorted([*self._running.values(), *held],
                                                     key=lambda r: r.event.index)]
        self.finished.set()
        self.pool.wake()

    def abandon_after(self, limit: float, say) -> threading.Timer:
        """A started timer (cancel it when the run ends): the events still in flight after
        ``limit`` seconds are abandoned (:meth:`abandon`), ``say(text)`` told first."""
        def expire():
            if not self.finished.is_set():
                say(f"events in flight not finished {limit:g} s after the signal "
                    f"(process.drain_timeout_s): abandoning them")
                self.abandon()

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        timer.start()
        return timer

    def stop(self, reason: str, error: BaseException | None = None) -> None:
        """Read no more events; those in flight are finished. The first reason wins."""
        with self.lock:
            if self.status.stop_reason is None:
                self.status.stop_reason = reason
                self.status.stop_error = error

    def _start_streams(self) -> None:
        for stream in range(self.streams):
            self._want_source(stream)

    def _want_source(self, stream: int) -> None:
        """``stream`` is free: read its next event now, or wait in line for the source (as
        :meth:`_finish_event` does too)."""
        with self.lock:
            if self._reading:
                self._waiting.append(stream)
                return
            self._reading = True
        self._read(stream)

    def _read(self, stream: int) -> None:
        """With the source held: read ``stream``'s next event and start it as a task, then hand
        the source to the next stream in line (as a task) or let it go."""
        run = None
        status = self.status
        if status.stop_reason is None:
            index = self._next_index
            try:
                event = self.source.next_event(index)
            except InputError as exc:
                event = None
                self.stop("input error", exc)
            except Exception as exc:
                event = None
                self.stop("input error", InputError(
                    f"source {type(self.source).__name__} failed reading event index "
                    f"{index}: {type(exc).__name__}: {exc}"))
            if event is not None:
                self._next_index = index + 1
                event.stream = stream
                run = EventRun(event, stream, self._n_workers)
                if self.tracer is not None:
                    run.started_ns = perf_ns()
                lumi = self._lumi
                eid = event.id
                if lumi is not None and lumi.luminosity_block == eid.lumi and lumi.run == eid.run:
                    event.lumi = lumi
                else:                    # a new luminosity block: once nothing is in flight
                    with self.lock:
                        status.read += 1
                        held = bool(self._running)
                        if held:         # the last event in flight resumes it, source held
                            self._held = run
                    if not held:
                        self._begin_event_lumi(run)
                        self._hand_over(run, True)
                    return
        self._hand_over(run, False)

    def _hand_over(self, run: EventRun | None, counted: bool) -> None:
        """After a read (``run`` None: the source is empty or the job stopped): start the event
        as a task, then hand the source to the next stream in line or let it go."""
        last = False
        status = self.status
        with self.lock:
            if run is not None:
                if not counted:
                    status.read += 1
                self._running[run.event.index] = run
            else:
                self._active_streams -= 1
                last = self._active_streams == 0
            if self._waiting:
                after = self._waiting.popleft()
            else:
                after = None
                self._reading = False
        if run is not None:
            if self.paths:
                self.pool.soon(self._start_sequences, run, self.paths)
            else:
                self.pool.soon(self._after_paths, run)
        if after is not None:
            self.pool.soon(self._read, after)
        if last:
            self._end_lumi(None)
            self.finished.set()
            self.pool.wake()

    # -- runs and luminosity blocks -----------------------------------------------------------
    def _begin_event_lumi(self, run: EventRun) -> None:
        """Nothing in flight: end the luminosity block (and run) before ``run``'s event, begin
        its own. A hook's failure fails the event and stops the job."""
        eid = run.event.id
        error = self._end_lumi(eid.run, eid)
        conditions = None
        before = f"at the beginning of lumi {eid.run}:{eid.lumi}, before event {eid}"
        if error is None and self.conditions is not None:
            try:
                conditions = self.conditions.for_lumi(eid.run, eid.lumi)
            except Exception as exc:
                label = next(k for k, v in self.built.services.items() if v is self.conditions)
                error = self._transition_error(exc, label, type(self.conditions).__name__,
                                               "for_lumi", before, eid, "service")
        if error is None and self._run is None:
            self._run = Run(eid.run, conditions)
            error = self._transition("begin_run", self._run, before, eid)
        lumi = LuminosityBlock(eid.run, eid.lumi, conditions)
        self._lumi = lumi
        self.lumis.append(lumi)
        if error is None:
            error = self._transition("begin_luminosity_block", lumi, before, eid)
        run.event.lumi = lumi
        if error is not None:
            run.error = error

    def _end_lumi(self, next_run: int | None, waiting="(none)"):
        """End the current luminosity block, and its run unless the next one (``next_run``) is
        the same; the first hook error, or None. ``waiting``: the ID of the event that waits
        for the next block (it fails with the error)."""
        error = None
        lumi, self._lumi = self._lumi, None
        if lumi is not None:
            error = self._transition("end_luminosity_block", lumi,
                                     f"at the end of lumi {lumi.run}:{lumi.luminosity_block}",
                                     waiting)
        if self._run is not None and self._run.run != next_run:
            run, self._run = self._run, None
            error = self._transition("end_run", run, f"at the end of run {run.run}",
                                     waiting) or error
        return error

    def _transition(self, hook: str, what, where: str, event_id="(none)"):
        """Call ``hook(what)`` on every service, then on every module instance in graph order;
        the first error (the job stops), or None. ``where`` (the transition) goes in its
        message; ``event_id``: the event that waits for it."""
        error = None
        for label, service in self.built.services.items():
            method = getattr(service, hook, None)
            if method is None:
                continue
            try:
                method(what)
            except Exception as exc:
                error = error or self._transition_error(exc, label, type(service).__name__,
                                                        hook, where, event_id, "service")
        for worker in self.workers.values():
            for module in worker.copies:
                try:
                    getattr(module, hook)(what)
                except Exception as exc:
                    error = error or self._transition_error(exc, worker.label,
                                                            worker.type_name, hook, where,
                                                            event_id)
        return error

    def _transition_error(self, exc, label, type_name, method, where, event_id,
                          what="module") -> ModuleError:
        error = ModuleError(exc, event_id=event_id, stream=-1, module_type=type_name,
                            label=label, method=method, what=what, context=where)
        error.__cause__ = exc
        if isinstance(exc, ConfigError):
            self.stop("configuration error", error)
        else:
            self.stop("module error", error)
        return error

    def _resume_held(self, run: EventRun) -> None:
        """The last event of the previous luminosity block is done: begin ``run``'s."""
        self._begin_event_lumi(run)
        self._hand_over(run, True)

    def _start_sequences(self, run: EventRun, sequences: list[Sequence]) -> None:
        """Walk the first sequence here; the others go to the shared queue first, so that an
        idle thread can take them meanwhile."""
        run.left = len(sequences)
        if run.left > 1:
            for seq in sequences[1:]:
                self.pool.share(self._walk, run, seq, 0, None)
        self._walk(run, sequences[0], 0, None)

    def _after_paths(self, run: EventRun) -> None:
        # every path is done: run.trigger changes no more
        run.event.put(TRIGGER_RESULTS, TriggerResults(run.trigger))
        if self.endpaths:
            self._start_sequences(run, self.endpaths)
        else:
            self._finish_event(run)

    def _sequence_done(self, run: EventRun, seq: Sequence, accepted: bool) -> None:
        if not seq.is_end:
            run.trigger[seq.name] = accepted
        if run.left == 1:
            # this sequence was the only one left: nobody else counts down any more
            last = True
        else:
            with self._state_lock:
                run.left -= 1
                last = run.left == 0
        if last:
            if seq.is_end:
                self._finish_event(run)
            else:
                self._after_paths(run)

    def _finish_event(self, run: EventRun) -> None:
        index = run.event.index
        if self.abandoned:                   # too late: the job has ended without it
            return
        for worker in self.ordered:          # outputs that did not write this event
            if (worker.copies[0].wants_skipped and run.error is None
                    and run.states[worker.index] is None):
                worker.queue.push(index, self._skipped, worker, run.event)
            else:
                worker.queue.release(index)
        error = run.error
        failure = None if error is None else {"index": index, **error.to_dict()}
        trigger = run.trigger
        status = self.status
        if self.tracer is not None:
            self.tracer.complete(f"event {run.event.id}", "event", run.started_ns,
                                 perf_ns() - run.started_ns, lane=f"stream {run.stream}")
        lumi = run.event.lumi
        with self.lock:              # count the event, and its stream asks for the source
            lumi.events += 1
            if failure is not None:
                status.failed += 1
                lumi.failed += 1
                status.failures.append(failure)
            else:
                if not trigger or any(trigger.values()):    # as TriggerResults.accept
                    status.accepted += 1
                else:
                    status.rejected += 1
                accepted = lumi.accepted
                for name, passed in trigger.items():
                    if passed:
                        accepted[name] = accepted.get(name, 0) + 1
            del self._running[index]
            held = None
            if self._held is not None and not self._running:
                held, self._held = self._held, None
            reading = self._reading
            if reading:
                self._waiting.append(run.stream)
            else:
                self._reading = True
        if held is not None:
            self.pool.soon(self._resume_held, held)
        if not reading:
            self._read(run.stream)

    # -- paths ------------------------------------------------------------------------------
    def _walk(self, run: EventRun, seq: Sequence, i: int, result) -> None:
        """Advance ``seq`` from position ``i``; ``result`` is position i's result if known."""
        workers = seq.workers
        stats = seq.stats[run.stream]
        if i == 0 and result is None:
            stats.visited += 1
        trigger = run.trigger if seq.is_end else None
        n = len(workers)
        while i < n:
            worker = workers[i]
            if result is None:
                if run.error is not None:
                    result = FAILED
                elif trigger is not None and worker.select_events and not any(
                        trigger.get(p) for p in worker.select_events):
                    i += 1
                    continue
                else:
                    stats.module_visited[i] += 1
                    result = self.request(run, worker, seq.name, self._walk, run, seq, i)
                    if result is PENDING:
                        return
            if result is FAILED:
                stats.module_errors[i] += 1
                stats.errors += 1
                self._sequence_done(run, seq, False)
                return
            if result is False:
                stats.module_rejected[i] += 1
                stats.rejected += 1
                self._sequence_done(run, seq, False)
                return
            stats.module_passed[i] += 1
            result = None
            i += 1
        stats.passed += 1
        self._sequence_done(run, seq, True)

    # -- modules ----------------------------------------------------------------------------
    def request(self, run: EventRun, worker: Worker, path: str | None, fn, *args):
        """Ask for ``worker``'s result in this event: the result now, or PENDING, and then
        ``fn(*args, result)`` is called later, as a task. The first request starts the module
        (``path``, who asked, is the context of its errors)."""
        states = run.states
        index = worker.index
        ready = False
        if states[index] is None:
            if worker.upstream:
                self._start_upstream(run, worker.upstream, path)
            ready = worker.plain and (not worker.deps or self._deps_done(states, worker))
        with self._state_lock:
            state = states[index]
            if state is None:
                state = states[index] = STARTED if ready else ModuleState(path)
            elif state is STARTED:               # running on another thread: wait for it
                state = states[index] = ModuleState(path)
                state.waiters.append((fn, args))
                return PENDING
            elif state.__class__ is ModuleState:
                state.waiters.append((fn, args))
                return PENDING
            else:
                return state
        if state is STARTED:                      # as _begin does, one call less
            if run.error is not None:
                result = FAILED
            else:
                result = self._call(run, worker, path, worker.method, worker.calls[run.stream])
            self._finish(run, worker, result)
            return result
        result = self._begin(run, worker, path, state)
        if result is PENDING:
            with self._state_lock:
                state = states[index]
                if state.__class__ is ModuleState:
                    state.waiters.append((fn, args))
                    return PENDING
            return state                          # it finished meanwhile, on another thread
        return result

    @staticmethod
    def _deps_done(states, worker) -> bool:
        """Whether every producer ``worker`` reads from is done (a result is final, so this
        needs no lock when true)."""
        for dep in worker.deps:
            if states[dep.index] not in DONE:
                return False
        return True

    def _start_upstream(self, run, upstream, path) -> None:
        """Start every producer a module needs, dependencies first. Each one's own
        dependencies have then been started already, so requesting them never recurses; those
        that run at once have their dependencies done already, and run here.

        With more than one thread, the producers that can run at once and do not depend on
        one another start as separate tasks: all but the first go to the shared queue, where
        idle threads take them while this thread runs the first (intra-event parallelism)."""
        states = run.states
        if self._spread and len(upstream) > 1:
            self._spread_ready(run, upstream, path)
        for producer in upstream:
            index = producer.index
            if states[index] is not None:     # started already (it stays so)
                continue
            ready = producer.plain and (not producer.deps
                                        or self._deps_done(states, producer))
            with self._state_lock:
                if states[index] is not None:
                    continue
                state = states[index] = STARTED if ready else ModuleState(path)
            self._begin(run, producer, path, state)

    def _spread_ready(self, run, upstream, path) -> None:
        """Mark the producers of ``upstream`` that can run now started and give all but the
        first to the shared queue (the caller's loop runs the first)."""
        states = run.states
        first = True
        for producer in upstream:
            if not producer.plain or states[producer.index] is not None or (
                    producer.deps and not self._deps_done(states, producer)):
                continue
            if first:                     # left to the caller, which runs it at once
                first = False
                continue
            with self._state_lock:
                if states[producer.index] is not None:
                    continue
                states[producer.index] = STARTED
            self.pool.share(self._begin, run, producer, path, STARTED)

    def _begin(self, run, worker, path, state):
        """Run a module just marked started, its upstream producers started: its result, or
        PENDING. ``STARTED``: it has nothing to wait for and is called now."""
        if state is STARTED:
            if run.error is not None:
                result = FAILED
            else:
                result = self._call(run, worker, path, worker.method, worker.calls[run.stream])
        else:
            result = self._prefetch(run, worker, state)
            if result is PENDING:
                return PENDING
        self._finish(run, worker, result)
        return result

    def _prefetch(self, run, worker, state):
        deps = worker.deps
        if self._deps_done(run.states, worker):
            return self._execute(run, worker, state)
        state.deps_left = len(deps) + 1
        ready = 1
        for dep in deps:
            if self.request(run, dep, state.path, self._dep_arrived, run, worker,
                            state) is not PENDING:
                ready += 1
        with self._state_lock:
            state.deps_left -= ready
            if state.deps_left:
                return PENDING
        return self._execute(run, worker, state)

    def _dep_arrived(self, run, worker, state, _result) -> None:
        with self._state_lock:
            state.deps_left -= 1
            if state.deps_left:
                return
        result = self._execute(run, worker, state)
        if result is not PENDING:
            self._finish(run, worker, result)

    def _execute(self, run, worker, state):
        if run.error is not None:
            return FAILED
        queue = worker.queue
        if queue is not None:                # on this thread if it is the module's turn now
            if isinstance(queue, OrderedQueue):
                return queue.run_or_push(run.event.index, self._queued_result,
                                         self._run_queued, run, worker, state, pending=PENDING)
            return queue.run_or_push(self._queued_result, self._run_queued, run, worker, state,
                                     pending=PENDING)
        if worker.external:
            return self._acquire(run, worker, state)
        return self._call(run, worker, state.path, worker.method, worker.calls[run.stream])

    @staticmethod
    def _skipped(worker, event) -> None:
        """An ordered output's :meth:`~OutputModule.skipped` for an event it does not write."""
        try:
            worker.copies[0].skipped(ModuleEvent(event, worker))
        except Exception as exc:                 # it only learns from the event: no failure
            log.debug("%s: skipped(%s) raised %s: %s", worker.label, event.id,
                      type(exc).__name__, exc)

    def _queued_result(self, run, worker, state):
        """A queued module's turn: its result, or PENDING (ExternalWork acquired)."""
        if run.error is not None:
            return FAILED
        if worker.external:
            return self._acquire(run, worker, state)
        return self._call(run, worker, state.path, worker.method, worker.calls[run.stream])

    def _run_queued(self, run, worker, state) -> None:
        result = self._queued_result(run, worker, state)
        if result is not PENDING:
            self._finish(run, worker, result)

    def _finish(self, run, worker, result) -> None:
        states = run.states
        with self._state_lock:
            state = states[worker.index]
            states[worker.index] = result
        if state is not STARTED:
            soon = self.pool.soon
            for fn, args in state.waiters:
                soon(fn, *args, result)

    def _call(self, run, worker, path, method: str, fn, *extra):
        """Call one module method ``fn(event, *extra)``, timed; return True/False or FAILED."""
        if self.abandoned:
            return FAILED
        view = ModuleEvent(run.event, worker)
        stats = worker.stats[run.stream]
        calls = self._calls
        t0 = perf_ns()
        if calls is not None:
            thread = get_ident()
            calls[thread] = (worker.label, method, run.event.id, t0, None)
        c0 = cpu_ns()
        error = None
        try:
            value = fn(view, *extra)
        except Exception as exc:
            error = exc
        dc = cpu_ns() - c0
        dt = perf_ns() - t0
        if calls is not None:
            calls[thread] = None
        stats.real_ns += dt
        stats.cpu_ns += dc
        if worker.external:                  # its produce; acquire counted the run
            stats.produce_real_ns += dt
            stats.produce_cpu_ns += dc
        else:
            stats.runs += 1
        if self.tracer is not None:
            self.tracer.complete(worker.label, method, t0, dt, event=str(run.event.id))
        if error is not None:
            self._fail(run, worker, path, method, error)
            return FAILED
        if method == "filter":
            if value:
                stats.passed += 1
                return True
            stats.rejected += 1
            return False
        return True

    def _acquire(self, run, worker, state):
        if self.abandoned:
            return FAILED
        module = worker.instance(run.stream)
        stats = worker.stats[run.stream]
        holder = WaitingTaskHolder(partial(self._external_done, run, worker, state))
        calls = self._calls
        t0 = perf_ns()
        if calls is not None:
            thread = get_ident()
            calls[thread] = (worker.label, "acquire", run.event.id, t0, None)
        c0 = cpu_ns()
        try:
            module.acquire(ModuleEvent(run.event, worker), holder)
            error = None
        except Exception as exc:
            error = exc
        dc = cpu_ns() - c0
        t1 = perf_ns()
        if calls is not None:
            calls[thread] = None
            calls[holder] = (worker.label, "external", run.event.id, t1,
                             "waiting for holder.done()")
            holder.on_external_end = partial(calls.pop, holder, None)
        stats.runs += 1
        stats.real_ns += t1 - t0
        stats.cpu_ns += dc
        stats.acquire_real_ns += t1 - t0
        stats.acquire_cpu_ns += dc
        holder.acquire_end_ns = t1
        if self.tracer is not None:
            self.tracer.complete(worker.label, "acquire", t0, t1 - t0, event=str(run.event.id))
        if self.sync and error is None:
            holder.finished = threading.Event()
        holder._acquire_returned(error)
        if holder.finished is not None:  # synchronous mode: wait here, then produce at once,
            holder.finished.wait()       # whichever thread the external work finished on
            self._produce(run, worker, state, holder)
        return PENDING

    def _external_done(self, run, worker, state, holder) -> None:
        """Called once, by whichever of acquire's return and holder.done() came last."""
        if holder.on_external_end is not None:
            holder.on_external_end()
        end = max(holder.done_ns, holder.acquire_end_ns)
        worker.stats[run.stream].external_ns += end - holder.acquire_end_ns
        if self.tracer is not None and holder.done_ns:
            self.tracer.complete(worker.label, "external", holder.acquire_end_ns,
                                 end - holder.acquire_end_ns, event=str(run.event.id),
                                 lane=f"external {worker.label}")
        if holder.finished is not None:
            holder.finished.set()
        else:
            self.pool.soon(self._produce, run, worker, state, holder)

    def _produce(self, run, worker, state, holder) -> None:
        if holder.error is not None:
            method = "acquire" if holder.acquire_failed else "external"
            self._fail(run, worker, state.path, method, holder.error)
            result = FAILED
        elif run.error is not None:
            result = FAILED
        elif worker.queue is not None:
            worker.queue.push(self._queued_produce, run, worker, state, holder)
            return
        else:
            result = self._call_produce(run, worker, state, holder)
        self._finish(run, worker, result)

    def _queued_produce(self, run, worker, state, holder) -> None:
        self._finish(run, worker, self._call_produce(run, worker, state, holder))

    def _call_produce(self, run, worker, state, holder):
        """An ExternalWork ``produce``, given the work's result (the holder goes with the
        event: nothing is kept per event elsewhere)."""
        fn = worker.calls[run.stream]
        if worker.result_arg:
            return self._call(run, worker, state.path, "produce", fn, holder.result)
        if holder.result is not None and not worker.result_dropped:
            worker.result_dropped = True
            log.warning("recorun: warning: module '%s' (%s): its external work passed a result "
                        "to holder.done(), but its produce(event) takes none: define "
                        "produce(self, event, result) to receive it", worker.label,
                        worker.type_name)
        return self._call(run, worker, state.path, "produce", fn)

    def _fail(self, run, worker, path, method, exc) -> None:
        error = ModuleError(exc, event_id=run.event.id, stream=run.stream,
                            module_type=worker.type_name, label=worker.label, method=method,
                            path=path)
        error.__cause__ = exc
        worker.stats[run.stream].errors += 1
        with self._state_lock:
            first = run.error is None
            if first:
                run.error = error
        if isinstance(exc, ConfigError):     # found only with an event: it stops the job
            self.stop("configuration error", error)
        elif first and not self.skip_failed:
            self.stop("module error", error)
