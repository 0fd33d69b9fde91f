"""Module base classes: what a physicist subclasses.

=================  ==========================================  ==============================
kind               method(s) the framework calls               on a path
=================  ==========================================  ==============================
Producer           ``produce(event)``                          run on demand, once per event
ExternalWork       ``acquire(event, holder)``, then            as Producer
producer           ``produce(event, result)``
Filter             ``filter(event) -> bool``                   false stops the path
Analyzer           ``analyze(event)``                          runs in path order
OutputModule       ``write(event)``                            on end paths
=================  ==========================================  ==============================

Every module may define ``begin_job()`` and ``end_job()``, and the transition hooks
``begin_run(run)``, ``begin_luminosity_block(lumi)``, ``end_luminosity_block(lumi)`` and
``end_run(run)`` (:mod:`recorun.framework.transitions`), each called once per transition on
every instance, never beside an event. Parameters are declared with
:class:`~recorun.framework.params.Param` / :class:`~recorun.framework.params.InputTag` class
attributes and arrive as instance attributes; :class:`~recorun.framework.params.Record`
parameters name the conditions records a module reads. ``produces`` lists the product
instance names a producer puts (``""`` is the default instance, tagged by the label alone).

``concurrency`` says how the framework may call a module:

* ``"stream"`` (the default of producers and filters): one copy per stream; a copy sees one
  event at a time, so it may keep per-event state in ``self``. A copy sees only its stream's
  events: a module that sums over events defines :meth:`Module.merge_streams`, which folds the
  other copies into the first before ``end_job`` (CMSSW's stream summaries); one that does
  not, and defines ``end_job``, is warned about when there is more than one stream.
* ``"serial"`` (the default of analyzers): one instance, calls queued one at a time (CMSSW's
  "one" modules): an analyzer that fills a histogram in ``analyze`` and writes it in
  ``end_job`` sees every event, whatever the number of streams. The queue does not block
  pool threads.
* ``"shared"``: one instance, called from several threads at once; it must be thread-safe.

ExternalWork: ``acquire`` starts work outside the framework (a gRPC call, a device) and
returns at once; the work calls ``holder.done(result)`` (or ``holder.fail(error)``) from any
thread. ``produce(event, result)`` then runs on a pool thread with that result, never before
``acquire`` has returned, and not at all when the work failed: the error fails the event with
the module's context. The result travels with the event: a module keeps nothing per event.
"""
from __future__ import annotations

import threading
import time
from enum import Enum
from typing import Any, ClassVar

from .params import Configurable


class Concurrency(str, Enum):
    STREAM = "stream"
    SHARED = "shared"
    SERIAL = "serial"


class Module(Configurable):
    """Base of all modules. ``label`` is the module's name in the workflow."""

    kind: ClassVar[str] = "module"
    concurrency: ClassVar[Concurrency] = Concurrency.STREAM
    produces: ClassVar[tuple[str, ...]] = ()

    def __init__(self, label: str = "", **params: Any):
        self.label = label or type(self).__name__
        self.services: dict[str, Any] = {}
        super().__init__(**params)

    def consumed_tags(self) -> list[str]:
        """Products this module reads: the values of its InputTag parameters."""
        tags: list[str] = []
        for name, param in self.parameters().items():
            if param.consumes:
                tags.extend(param.tags(getattr(self, name)))
        return tags

    def consumed_records(self) -> list[str]:
        """Conditions records this module reads: the values of its Record parameters."""
        return [value for name, param in self.parameters().items()
                if param.records and (value := getattr(self, name)) is not None]

    def produced_instances(self) -> tuple[str, ...]:
        return tuple(self.produces)

    def check_workflow(self, workflow) -> None:
        """Called when the workflow is built (also by ``recorun --check``), with
        :attr:`services` set: raise :class:`~framework.ConfigError` when the workflow around
        this module cannot work (a service it needs is missing, it is on no path...).
        ``workflow``: the :class:`~recorun.framework.config.WorkflowConfig` (``paths``,
        ``endpaths``, ``modules``, ``file``)."""

    def begin_job(self) -> None:
        """Called once per instance before the first event. Raise
        :class:`~framework.ConfigError` for a configuration found wrong here (exit code 2)."""

    def post_begin_job(self) -> None:
        """Called once per instance after every service's and module's ``begin_job``, before
        the first event (CMSSW's postBeginJob): for work that needs all of them set up."""

    def begin_run(self, run) -> None:
        """Called before the first event of each run (``run.run``)."""

    def begin_luminosity_block(self, lumi) -> None:
        """Called before the first event of each luminosity block (``lumi.run``,
        ``lumi.luminosity_block``, ``lumi.record(name)``)."""

    def end_luminosity_block(self, lumi) -> None:
        """Called after the last event of each luminosity block, before its run ends; also
        when the job stops early (after the events in flight)."""

    def end_run(self, run) -> None:
        """Called after the last luminosity block of each run."""

    def merge_streams(self, others: list) -> None:
        """Per-stream modules only: fold the other streams' copies (``others``) into this one,
        the first copy, after the last event and before ``end_job``. A module that defines it
        gets ``end_job`` on this first copy only. Not defined (the default): every copy's
        ``end_job`` is called, each having seen its own stream's events."""
        raise NotImplementedError

    def end_job(self) -> None:
        """Called once per instance after the last event, also after a failure."""

    def report(self) -> dict | None:
        """Extra figures for this module's entry in the job report (``details``), e.g. a
        client's timing; asked once, after ``end_job``."""
        return None

    def provenance(self) -> dict | None:
        """What this module adds to the provenance of the products it contributes to (JSON
        data; :mod:`recorun.framework.provenance`), beyond its type and parameters: asked by
        output modules at their ``begin_job`` and ``end_job``, while this module is begun.
        Servers it used go under ``servers`` as ``[{"name", "address", "requests",
        ...}]``: ``requests`` only grow during the job (an output counts from its own
        ``begin_job``, and merging part files adds them up). ``None`` (the default):
        nothing to add."""
        return None

    def metrics(self) -> dict | None:
        """Live figures for a metrics exporter (:mod:`recorun.monitoring.prometheus`), read at each
        scrape from the exporter's own thread while the job runs, and after it::

            {"labels": {"model": "facile"},                # besides the module's label
             "counters": {"sonic_requests": 120, ...},     # only ever grow
             "gauges": {"sonic_requests_in_flight": 2}}    # go up and down

        Names become ``recorun_<name>_total`` (counters) and ``recorun_<name>`` (gauges),
        labelled ``module`` and the ``labels``; the copies of a per-stream module are added
        up. It must be cheap and thread-safe (read counters, do not compute); ``None`` (the
        default): nothing to export."""
        return None


class Producer(Module):
    kind = "producer"
    produces = ("",)

    def produce(self, event) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define produce(event)")


class ExternalWorkProducer(Producer):
    """A producer that waits for external work between ``acquire`` and ``produce``: the
    value the work passes to ``holder.done(value)`` is ``produce``'s ``result``. (A
    ``produce(self, event)`` without ``result`` is called without it.)"""

    kind = "producer"

    def acquire(self, event, holder: "WaitingTaskHolder") -> None:
        raise NotImplementedError(f"{type(self).__name__} must define acquire(event, holder)")

    def produce(self, event, result=None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define produce(event, result)")


class Filter(Module):
    kind = "filter"

    def filter(self, event) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must define filter(event)")


class Analyzer(Module):
    kind = "analyzer"
    concurrency = Concurrency.SERIAL

    def analyze(self, event) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define analyze(event)")


class OutputModule(Module):
    """Writes selected events, one call at a time. With ``ordered = True`` (the default) the
    calls come in event order (``event.index``), whatever the number of threads and streams;
    an event waits for the events before it to be written or passed over.

    Before ``end_job`` the framework sets ``job_complete``: True when every event of the source
    was processed (events failed under ``on_error: skip_event`` included), False when the job
    stopped early. An output should only give its file the final name when it is True.
    """

    kind = "output"
    concurrency = Concurrency.SERIAL
    ordered: ClassVar[bool] = True
    job_complete = False
    #: ``{tag: shape}``: products the source declared fixed-size (:meth:`Source.product_shapes`),
    #: set by the framework before ``begin_job``.
    product_shapes: dict = {}
    #: The parameter that names the file this output writes. A farm (``recorun --executor
    #: dask``, :mod:`recorun.farm.executor`) points it at one part file per chunk of the input and
    #: merges the parts with :meth:`merge`. None: this output cannot run on a farm.
    output_file_param: ClassVar[str | None] = None

    #: While True, :meth:`skipped` is called for the events this output does not write.
    wants_skipped: bool = False

    def write(self, event) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define write(event)")

    def skipped(self, event) -> None:
        """Called, in event order and never beside ``write``, for an event this output does
        not write (not selected; not for failed events) while :attr:`wants_skipped` is True:
        an output can learn its products' types there (an output that writes no event still
        knows its branches). The products of modules that did not run are absent; what it
        raises is logged and ignored."""

    @classmethod
    def check_destination(cls, destination: str, **params: Any) -> None:
        """Raise ConfigError if :meth:`merge` could not write ``destination``: called by a
        chunked job before its first chunk, so that no chunk runs for nothing."""

    @classmethod
    def merge(cls, parts: list[str], destination: str, **params: Any) -> None:
        """Merge ``parts``, the files this output type wrote for consecutive chunks of one
        job's input (in that order), into ``destination``, so that it reads like the file a
        single job over all the chunks would have written. ``params`` are the module's
        parameters in the workflow. A part may hold no event. Outputs that set
        :attr:`output_file_param` implement it."""
        raise NotImplementedError(f"{cls.__name__} cannot merge the files of a farm's chunks")


class WaitingTaskHolder:
    """Given to ``acquire``; the external work calls :meth:`done` (or :meth:`fail`) exactly
    once, from any thread.

    The framework continues (runs ``produce(event, result)`` or fails the event) only when both
    ``acquire`` has returned and ``done`` has been called, whichever comes last. The holder
    belongs to its event: when the event is over, the result goes with it.
    """

    __slots__ = ("_lock", "_left", "_continue", "error", "result", "acquire_failed", "done_ns",
                 "acquire_end_ns", "finished", "on_external_end")

    def __init__(self, on_complete):
        self._lock = threading.Lock()
        self._left = 2                   # acquire returned + done called
        self._continue = on_complete
        self.error: BaseException | None = None
        self.result: Any = None
        self.acquire_failed = False
        self.done_ns = 0                 # perf_counter_ns() when done() was called
        # set by the scheduler:
        self.acquire_end_ns = 0
        self.finished = None             # an Event to wait on, in synchronous mode
        self.on_external_end = None

    def done(self, result: Any = None, *, error: BaseException | None = None) -> None:
        """Report the external work finished: ``result`` is handed to ``produce``. With
        ``error`` (or an exception as ``result``, the older form ``done(exc)``) the work
        failed and the event fails without ``produce``."""
        if error is None and isinstance(result, BaseException):
            result, error = None, result
        with self._lock:
            if self.done_ns:
                raise RuntimeError("WaitingTaskHolder.done() called twice")
            self.done_ns = time.perf_counter_ns()
            if self.error is None:
                self.error = error
            if error is None:
                self.result = result
        self._arrive()

    def fail(self, error: BaseException) -> None:
        """Report the external work failed with ``error``."""
        self.done(error=error)

    def _acquire_returned(self, error: BaseException | None = None) -> None:
        if error is None:
            self._arrive()
            return
        with self._lock:                 # acquire raised: do not wait for done()
            self.error = error
            self.acquire_failed = True
            self._left = 0
        self._continue(self)

    def _arrive(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._continue(self)
