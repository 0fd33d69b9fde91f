"""One job: begin-job hooks, the scheduler run, end-job hooks, signals, the final accounting.

``run_job`` never loses track of an event: whatever stops the job (end of input, a module
error with ``on_error: stop``, an input error, Ctrl-C), events in flight are finished and the
summary says which events were read, which failed and which were never read.
"""
from __future__ import annotations

import copy
import logging
import signal
import sys
import time
from dataclasses import dataclass

from .build import BuiltWorkflow, build_workflow
from .config import apply_overrides, parse_workflow
from .errors import (EXIT_CONFIG, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MODULE, EXIT_OK,
                     ConfigError, InputError, ModuleError)
from .module import OutputModule
from .monitor import InFlight, Monitor
from .native_threads import limited
from .hooks import report_sections
from .reports import summarize, thread_advice
from .scheduler import Scheduler, merges_streams
from .signals import JobInterrupted, job_signals
from .signals import exit_code as signal_exit_code
from .trace import Tracer

log = logging.getLogger(__name__)

STOP_EXIT_CODES = {"interrupted": EXIT_INTERRUPTED, "input error": EXIT_INPUT,
                   "module error": EXIT_MODULE, "configuration error": EXIT_CONFIG}
STOP_REASONS = ((ConfigError, "configuration error"), (InputError, "input error"),
                (ModuleError, "module error"))


@dataclass
class JobResult:
    exit_code: int
    report: dict
    scheduler: Scheduler
    tracer: Tracer | None
    error: BaseException | None


def begin_module(worker, module, method: str = "begin_job") -> None:
    """Call ``begin_job`` (or ``post_begin_job``) of one module instance, its errors given the
    module's context: a ConfigError stays one (exit 2), anything else is a ModuleError."""
    try:
        getattr(module, method)()
    except ConfigError as exc:       # the module found its configuration wrong: exit 2
        exc.label = exc.label or worker.label
        raise
    except Exception as exc:
        raise ModuleError(exc, event_id="(none)", stream=-1, module_type=worker.type_name,
                          label=worker.label, method=method) from exc


def begin_job(built: BuiltWorkflow, scheduler: Scheduler, begun: list, *,
              skip: frozenset = frozenset(), open_source: bool = True) -> None:
    """Every service's begin_job, the source opened, every module instance's begin_job then
    post_begin_job, every service's job_started; what began is appended to ``begun``. Modules
    whose label is in ``skip`` are left alone (a chunked job begins its outputs per chunk)."""
    for service in built.services.values():
        service.begin_job()
        begun.append(service)
    if open_source:
        built.source.open(built.config.process.max_events)
    instances = [(w, m) for w, m in scheduler.all_instances() if w.label not in skip]
    for worker, module in instances:
        begin_module(worker, module)
        begun.append(module)
    for worker, module in instances:
        begin_module(worker, module, "post_begin_job")
    for service in built.services.values():
        service.job_started(scheduler)


def end_job(built: BuiltWorkflow, scheduler: Scheduler, begun: list, *,
            close_source: bool = True) -> list[ModuleError]:
    """Call end_job on everything that began, in reverse order; collect the errors."""
    errors = []
    labels = {id(m): w for w, m in scheduler.all_instances()}
    merged = merge_stream_copies(scheduler, errors)
    for thing in reversed(begun):
        if id(thing) in merged:
            continue
        try:
            thing.end_job()
        except Exception as exc:
            worker = labels.get(id(thing))
            errors.append(ModuleError(
                exc, event_id="(none)", stream=-1,
                module_type=worker.type_name if worker else type(thing).__name__,
                label=worker.label if worker else type(thing).__name__, method="end_job"))
    if close_source:
        errors += close_source_of(built.source)
    return errors


def merge_stream_copies(scheduler: Scheduler, errors: list) -> set[int]:
    """Fold the per-stream copies of every module that defines ``merge_streams`` into its
    first copy (before end_job); the ``id`` of the copies folded away, whose end_job is not
    called. An error is appended to ``errors``."""
    folded: set[int] = set()
    for worker in scheduler.workers.values():
        copies = worker.copies
        if len(copies) < 2 or not merges_streams(type(copies[0])):
            continue
        try:
            copies[0].merge_streams(list(copies[1:]))
        except Exception as exc:
            errors.append(ModuleError(exc, event_id="(none)", stream=-1,
                                      module_type=worker.type_name, label=worker.label,
                                      method="merge_streams"))
        folded.update(id(c) for c in copies[1:])
    return folded


def close_source_of(source) -> list[ModuleError]:
    try:
        source.close()
    except Exception as exc:
        return [ModuleError(exc, event_id="(none)", stream=-1, module_type=type(source).__name__,
                            label="source", method="close")]
    return []


def exit_code_of(stop_reason: str | None, error: BaseException | None) -> int:
    """A run's exit code: from what stopped it (a signal: 128 + its number), else from its
    error, else 0."""
    if isinstance(error, JobInterrupted):
        return signal_exit_code(error.signum)
    if stop_reason in STOP_EXIT_CODES:
        return STOP_EXIT_CODES[stop_reason]
    if error is not None:
        return getattr(error, "exit_code", 1)
    return EXIT_OK


def not_processed(scheduler: Scheduler, source) -> str | None:
    status = scheduler.status
    if status.stop_reason is None:
        return None
    try:
        total = source.total_events()
    except Exception:        # never opened: a service's begin_job failed before the source's
        total = None
    if total is not None:
        left = total - status.read
        unread = (f"{left} events not read (event indices {status.read} to {total - 1})"
                  if left > 0 else None)
    else:
        unread = f"the source's events from index {status.read} on were not read"
    return abandoned_text(status.abandoned, unread)


def abandoned_text(abandoned: list[dict], rest: str | None) -> str | None:
    """``not_processed`` with the events abandoned after a signal's drain first."""
    if not abandoned:
        return rest
    indices = ", ".join(str(a["index"]) for a in abandoned)
    text = (f"{len(abandoned)} events in flight abandoned when the drain timed out (event "
            f"indices {indices})")
    return f"{text}; {rest}" if rest else text


def _wait_until(start_at: float, scheduler: Scheduler, out, quiet: bool) -> None:
    """Wait, after begin_job, until the wall-clock time ``start_at`` (Unix seconds) before the
    first event, so that many jobs started at different moments process events together (as
    the paper's client scans do); a Ctrl-C ends the wait."""
    left = start_at - time.time()
    if left <= 0:
        return
    if not quiet:
        print(f"waiting {left:.1f} s for the common start time", file=out, flush=True)
    while scheduler.status.stop_reason is None and time.time() < start_at:
        time.sleep(min(0.05, max(0.0, start_at - time.time())))


def _run_events(built: BuiltWorkflow, scheduler: Scheduler, out, quiet: bool, inflight,
                start_at: float | None, signals):
    """The event loop, with its monitor, a signal's stop (finish the events in flight) and the
    numerical libraries' threads limited (:mod:`recorun.framework.native_threads`); the error
    that stopped it."""
    process = built.config.process
    drain = []

    def stop(signum):
        status = scheduler.status
        limit = process.drain_timeout_s
        within = f" within {limit:g} s" if limit else ""
        out.write(f"\nrecorun: {signal.Signals(signum).name}: finishing the "
                  f"{status.read - status.done} events in flight{within} (interrupt again to "
                  f"abort)\n")
        out.flush()
        scheduler.stop("interrupted", JobInterrupted(signum))
        if limit and not drain:
            drain.append(scheduler.abandon_after(limit, say))

    def say(text):
        out.write(f"\nrecorun: {text}\n")
        out.flush()

    monitor = Monitor(scheduler.status, total=built.source.total_events(),
                      report_every_s=process.report_every_s,
                      watchdog_s=process.watchdog_s, inflight=inflight, stream=out,
                      quiet=quiet)
    monitor.start()
    try:
        with signals.stopping(stop), limited(process.native_threads):
            if start_at is not None:
                _wait_until(start_at, scheduler, out, quiet)
            scheduler.run()
    finally:
        monitor.stop()
        for timer in drain:
            timer.cancel()
    return scheduler.status.stop_error


def run_job(built: BuiltWorkflow, *, trace: bool = False, quiet: bool = False,
            out=None, start_at: float | None = None, options=None) -> JobResult:
    """Run the job; its report gets the plugins' sections (``recorun_report_sections``, given
    the command line's ``options``, or None). With ``start_at`` (Unix seconds) the first event
    waits for that time (:func:`_wait_until`). SIGINT and SIGTERM are handled in every phase
    (:mod:`recorun.framework.signals`)."""
    out = out or sys.stderr
    with job_signals(out) as signals:
        return _run_job(built, trace, quiet, out, start_at, options, signals)


def _run_job(built, trace, quiet, out, start_at, options, signals) -> JobResult:
    process = built.config.process
    tracer = Tracer() if trace else None
    inflight = InFlight() if process.watchdog_s > 0 else None
    scheduler = Scheduler(built, tracer=tracer, inflight=inflight)
    begun: list = []
    error: BaseException | None = None
    try:
        begin_job(built, scheduler, begun, skip=_outputs_left_alone(built, scheduler))
    except (ConfigError, ModuleError, InputError) as exc:
        error = exc
        scheduler.stop(next(r for kind, r in STOP_REASONS if isinstance(exc, kind)), exc)
    except JobInterrupted as exc:               # during set-up: abandon it
        error = exc
        scheduler.stop("interrupted", exc)
    if error is None:
        error = _run_events(built, scheduler, out, quiet, inflight, start_at, signals)
    with signals.ending():
        complete = scheduler.status.stop_reason is None and begun and error is None
        for _, module in scheduler.all_instances():
            if isinstance(module, OutputModule):
                module.job_complete = bool(complete)
        end_errors = end_job(built, scheduler, begun)
        if error is None and end_errors:
            error = end_errors[0]
        exit_code = exit_code_of(scheduler.status.stop_reason, error)
        if signals.first and exit_code == EXIT_OK:      # a signal during end-job
            exit_code = signal_exit_code(signals.first)
        report = summarize(scheduler, workflow=built.config.file, exit_code=exit_code,
                           not_processed=not_processed(scheduler, built.source))
        if signals.first:
            report["signal"] = signal.Signals(signals.first).name
        report["advice"] = thread_advice(report)
        report.update(report_sections(report, options))
    return JobResult(exit_code, report, scheduler, tracer, error)


def _outputs_left_alone(built: BuiltWorkflow, scheduler: Scheduler) -> frozenset:
    """With ``max_events: 0`` (``-n 0``) no event is read: output modules are not begun, so
    that the files an earlier job wrote stay as they are."""
    if built.config.process.max_events != 0:
        return frozenset()
    labels = frozenset(w.label for w, m in scheduler.all_instances()
                       if isinstance(m, OutputModule))
    if labels:
        log.info("no event requested (max_events 0): output modules %s write nothing and "
                    "leave their files as they are", ", ".join(sorted(labels)))
    return labels


def run_workflow(workflow: dict, *, file: str = "<workflow>", overrides=(), trace: bool = False,
                 quiet: bool = True, out=None) -> JobResult:
    """Run a workflow given as a mapping (as the YAML would hold; ``type`` may be a class)."""
    raw = copy.deepcopy(workflow)
    apply_overrides(raw, list(overrides), file)
    built = build_workflow(parse_workflow(raw, file))
    for warning in built.graph.warnings():
        log.warning("recorun: warning: %s: %s", file, warning)
    return run_job(built, trace=trace, quiet=quiet, out=out)
