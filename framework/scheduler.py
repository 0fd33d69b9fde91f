"""The scheduler: runs the module graph over events on a thread pool.

State of the job
----------------
``streams`` events are in flight at once. A stream that is free asks the source for the next
event through the source's serial queue (the source is read by one thread at a time). The job
ends when every stream has found the source empty or the job has been told to stop (an error
with ``on_error: stop``, an input error, an interrupt); events already in flight are always
finished, so every event read is accounted for: accepted, rejected or failed.

State of an event
-----------------
``paths running`` -> ``end paths running`` -> ``done``. All trigger paths start together (as
tasks); each walks its modules in order and stops at a filter that rejects. When the last path
ends, ``TriggerResults`` is put and the end paths run the same way; a module on an end path
with ``select_events`` runs only for events one of those paths accepted. An event that hit an
error is failed; the modules still to run for it are skipped.

State of a module within an event
---------------------------------
``not requested`` -> ``prefetching`` -> ``running`` -> ``done`` (passed / rejected / failed).
A module is requested by a path or by a consumer (on demand). The first request starts it: it
requests the producers it reads from and runs when they are all done; later requests only wait
for its result. It therefore runs at most once per event, and producers nobody asks for never
run. A serial module waits in its serial queue instead of running directly.

An ExternalWork module runs ``acquire``, then its state is ``external``: no thread is held.
When both ``acquire`` has returned and ``holder.done()`` was called, ``produce`` is scheduled
on a pool thread (or the module fails, without ``produce``, if the work failed).

The calling thread is pool thread 0, so with ``threads: 1`` every module runs on it. With
``synchronous: true`` (which needs one thread and one stream) ExternalWork also waits for its
external work right after ``acquire``: modules then run in one fixed order, for debugging.
Otherwise, even on one thread and one stream, other modules of the event run while the external
work is out.

Continuations never call each other directly: they go through :meth:`ThreadPool.soon`, so no
stack grows with the length of a path, whatever the module count.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial

import networkx as nx

from .build import BuiltWorkflow
from .errors import InputError, ModuleError
from .event import Event, ModuleEvent, TriggerResults
from .pool import OrderedQueue, SerialQueue, ThreadPool
from .graph import TRIGGER_RESULTS
from .module import Concurrency, ExternalWorkProducer, WaitingTaskHolder
from .stats import ModuleStats, PathStats

PENDING = object()
FAILED = object()

perf_ns = time.perf_counter_ns
cpu_ns = time.thread_time_ns

METHODS = {"producer": "produce", "filter": "filter", "analyzer": "analyze", "output": "write"}


class Worker:
    """One module label: its instances (one per stream or one shared), its stats."""

    __slots__ = ("label", "index", "type_name", "kind", "method", "external", "deps",
                 "upstream", "consumes", "instances", "select_events", "copies", "queue",
                 "stats")

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
        self.instances = frozenset(node.module.produced_instances())
        self.select_events: tuple[str, ...] = ()
        self.copies = copies
        self.queue = queue
        self.stats = [ModuleStats() for _ in range(streams)]

    def instance(self, stream: int):
        copies = self.copies
        return copies[stream] if len(copies) > 1 else copies[0]


class ModuleState:
    __slots__ = ("done", "result", "waiters", "deps_left", "path")

    def __init__(self, path):
        self.done = False
        self.result = None
        self.waiters: list = []
        self.deps_left = 0
        self.path = path


class Sequence:
    """A path or an end path: workers in order."""

    __slots__ = ("name", "workers", "is_end", "stats")

    def __init__(self, name, workers, is_end, streams):
        self.name, self.workers, self.is_end = name, workers, is_end
        self.stats = [PathStats(len(workers)) for _ in range(streams)]


class EventRun:
    """One event in flight."""

    __slots__ = ("event", "stream", "states", "lock", "error", "left", "trigger", "started_ns")

    def __init__(self, event: Event, stream: int, n_workers: int):
        self.event = event
        self.stream = stream
        self.states: list[ModuleState | None] = [None] * n_workers
        self.lock = threading.Lock()
        self.error: ModuleError | None = None
        self.left = 0
        self.trigger: dict[str, bool] = {}
        self.started_ns = perf_ns()


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
        self.tracer = tracer
        self.inflight = inflight
        self.lock = threading.Lock()
        self.source = built.source
        self._new_run()
        self.workers: dict[str, Worker] = {}
        self._make_workers()
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
                for copy in copies[1:]:
                    copy.services = node.module.services
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

    def _new_run(self) -> None:
        """The state of one run over a source (the job's, or one chunk's)."""
        self.status = JobStatus()
        self.finished = threading.Event()
        self.source_queue = SerialQueue(self.pool)
        self._next_index = 0
        self._active_streams = self.streams

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
        self.status.started = time.time()
        self.status.cpu_started = time.process_time()
        self.pool.run(self._start_streams, self.finished)
        self.status.finished = time.time()
        self.status.cpu_finished = time.process_time()
        if self.pool.fatal is not None:
            raise RuntimeError("internal error in the scheduler:\n"
                               + self.pool.fatal_traceback) from self.pool.fatal
        return self.status

    def stop(self, reason: str, error: BaseException | None = None) -> None:
        """Read no more events; those in flight are finished. The first reason wins."""
        with self.lock:
            if self.status.stop_reason is None:
                self.status.stop_reason = reason
                self.status.stop_error = error

    def _start_streams(self) -> None:
        for stream in range(self.streams):
            self.source_queue.push(self._read_next, stream)

    def _read_next(self, stream: int) -> None:
        event = None
        if self.status.stop_reason is None:
            index = self._next_index
            try:
                event = self.source.next_event(index)
            except InputError as exc:
                self.stop("input error", exc)
            except Exception as exc:
                self.stop("input error", InputError(
                    f"source {type(self.source).__name__} failed reading event index "
                    f"{index}: {type(exc).__name__}: {exc}"))
        if event is None:
            with self.lock:
                self._active_streams -= 1
                last = self._active_streams == 0
            if last:
                self.finished.set()
            return
        self._next_index += 1
        with self.lock:
            self.status.read += 1
        event.stream = stream
        run = EventRun(event, stream, len(self.workers))
        self.pool.soon(self._start_event, run)

    def _start_event(self, run: EventRun) -> None:
        if not self.paths:
            self._after_paths(run)
            return
        run.left = len(self.paths)
        for path in self.paths:
            self.pool.soon(self._walk, run, path, 0, None)

    def _after_paths(self, run: EventRun) -> None:
        run.event.put(TRIGGER_RESULTS, TriggerResults(dict(run.trigger)))
        if not self.endpaths:
            self._finish_event(run)
            return
        run.left = len(self.endpaths)
        for path in self.endpaths:
            self.pool.soon(self._walk, run, path, 0, None)

    def _sequence_done(self, run: EventRun, seq: Sequence, accepted: bool) -> None:
        with run.lock:
            if not seq.is_end:
                run.trigger[seq.name] = accepted
            run.left -= 1
            last = run.left == 0
        if last:
            if seq.is_end:
                self._finish_event(run)
            else:
                self._after_paths(run)

    def _finish_event(self, run: EventRun) -> None:
        for worker in self.ordered:          # outputs that did not write this event
            worker.queue.release(run.event.index)
        status = self.status
        with self.lock:
            if run.error is not None:
                status.failed += 1
                status.failures.append({"index": run.event.index, **run.error.to_dict()})
            elif TriggerResults(run.trigger).accept:
                status.accepted += 1
            else:
                status.rejected += 1
        if self.tracer is not None:
            self.tracer.complete(f"event {run.event.id}", "event", run.started_ns,
                                 perf_ns() - run.started_ns, lane=f"stream {run.stream}")
        self.source_queue.push(self._read_next, run.stream)

    # -- paths ------------------------------------------------------------------------------
    def _walk(self, run: EventRun, seq: Sequence, i: int, result) -> None:
        """Advance ``seq`` from position ``i``; ``result`` is position i's result if known."""
        workers = seq.workers
        stats = seq.stats[run.stream]
        if i == 0 and result is None:
            stats.visited += 1
        trigger = run.trigger if seq.is_end else None
        while i < len(workers):
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
                    result = self.request(run, worker, seq.name,
                                          partial(self._walk, run, seq, i))
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
    def request(self, run: EventRun, worker: Worker, path: str | None, waiter):
        """Ask for ``worker``'s result in this event: the result now, or PENDING (then
        ``waiter(result)`` is called later, as a task)."""
        with run.lock:
            state = run.states[worker.index]
            if state is None:
                state = run.states[worker.index] = ModuleState(path)
            elif state.done:
                return state.result
            else:
                state.waiters.append(waiter)
                return PENDING
        if worker.upstream:
            self._start_upstream(run, worker.upstream, path)
        result = self._prefetch(run, worker, state)
        if result is PENDING:
            with run.lock:
                if not state.done:
                    state.waiters.append(waiter)
                    return PENDING
                return state.result
        self._finish(run, worker, state, result)
        return result

    def _start_upstream(self, run, upstream, path) -> None:
        """Start every producer a module needs, dependencies first. Each one's own
        dependencies have then been started already, so requesting them never recurses."""
        states = run.states
        for producer in upstream:
            with run.lock:
                if states[producer.index] is not None:
                    continue
                state = states[producer.index] = ModuleState(path)
            result = self._prefetch(run, producer, state)
            if result is not PENDING:
                self._finish(run, producer, state, result)

    def _prefetch(self, run, worker, state):
        deps = worker.deps
        if deps:
            state.deps_left = len(deps) + 1
            arrived = partial(self._dep_arrived, run, worker, state)
            ready = 1
            for dep in deps:
                if self.request(run, dep, state.path, arrived) is not PENDING:
                    ready += 1
            with run.lock:
                state.deps_left -= ready
                if state.deps_left:
                    return PENDING
        return self._execute(run, worker, state)

    def _dep_arrived(self, run, worker, state, _result) -> None:
        with run.lock:
            state.deps_left -= 1
            if state.deps_left:
                return
        result = self._execute(run, worker, state)
        if result is not PENDING:
            self._finish(run, worker, state, result)

    def _execute(self, run, worker, state):
        if run.error is not None:
            return FAILED
        queue = worker.queue
        if queue is not None:
            if isinstance(queue, OrderedQueue):
                queue.push(run.event.index, self._run_queued, run, worker, state)
            else:
                queue.push(self._run_queued, run, worker, state)
            return PENDING
        if worker.external:
            return self._acquire(run, worker, state)
        return self._call(run, worker, state, worker.method)

    def _run_queued(self, run, worker, state) -> None:
        if run.error is not None:
            result = FAILED
        elif worker.external:
            result = self._acquire(run, worker, state)
        else:
            result = self._call(run, worker, state, worker.method)
        if result is not PENDING:
            self._finish(run, worker, state, result)

    def _finish(self, run, worker, state, result) -> None:
        with run.lock:
            state.done = True
            state.result = result
            waiters, state.waiters = state.waiters, None
        for waiter in waiters:
            self.pool.soon(waiter, result)

    def _call(self, run, worker, state, method: str):
        """Call one module method, timed; return True/False or FAILED."""
        module = worker.instance(run.stream)
        view = ModuleEvent(run.event, worker)
        stats = worker.stats[run.stream]
        inflight = self.inflight
        if inflight is not None:
            key = inflight.enter(worker.label, method, run.event.id)
        t0 = perf_ns()
        c0 = cpu_ns()
        try:
            value = getattr(module, method)(view)
            error = None
        except Exception as exc:
            error = exc
        dt = perf_ns() - t0
        dc = cpu_ns() - c0
        if inflight is not None:
            inflight.leave(key)
        stats.real_ns += dt
        stats.cpu_ns += dc
        if method == "produce" and worker.external:
            stats.produce_real_ns += dt
            stats.produce_cpu_ns += dc
        else:
            stats.runs += 1
        if self.tracer is not None:
            self.tracer.complete(worker.label, method, t0, dt, event=str(run.event.id))
        if error is not None:
            self._fail(run, worker, state, method, error)
            return FAILED
        if method == "filter":
            passed = bool(value)
            if passed:
                stats.passed += 1
            else:
                stats.rejected += 1
            return passed
        return True

    def _acquire(self, run, worker, state):
        module = worker.instance(run.stream)
        stats = worker.stats[run.stream]
        holder = WaitingTaskHolder(partial(self._external_done, run, worker, state))
        inflight = self.inflight
        if inflight is not None:
            key = inflight.enter(worker.label, "acquire", run.event.id)
        t0 = perf_ns()
        c0 = cpu_ns()
        try:
            module.acquire(ModuleEvent(run.event, worker), holder)
            error = None
        except Exception as exc:
            error = exc
        t1 = perf_ns()
        dc = cpu_ns() - c0
        if inflight is not None:
            inflight.leave(key)
            holder_key = inflight.enter(worker.label, "external", run.event.id,
                                        "waiting for holder.done()")
            holder.on_external_end = partial(inflight.leave, holder_key)
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
            self._fail(run, worker, state, method, holder.error)
            result = FAILED
        elif run.error is not None:
            result = FAILED
        elif worker.queue is not None:
            worker.queue.push(self._queued_produce, run, worker, state)
            return
        else:
            result = self._call(run, worker, state, "produce")
        self._finish(run, worker, state, result)

    def _queued_produce(self, run, worker, state) -> None:
        self._finish(run, worker, state, self._call(run, worker, state, "produce"))

    def _fail(self, run, worker, state, method, exc) -> None:
        error = ModuleError(exc, event_id=run.event.id, stream=run.stream,
                            module_type=worker.type_name, label=worker.label, method=method,
                            path=state.path)
        error.__cause__ = exc
        worker.stats[run.stream].errors += 1
        with run.lock:
            first = run.error is None
            if first:
                run.error = error
        if first and not self.skip_failed:
            self.stop("module error", error)
