"""Module base classes: what a physicist subclasses.

=================  ==========================================  ==============================
kind               method(s) the framework calls               on a path
=================  ==========================================  ==============================
Producer           ``produce(event)``                          run on demand, once per event
ExternalWork       ``acquire(event, holder)``, then            as Producer
producer           ``produce(event)``
Filter             ``filter(event) -> bool``                   false stops the path
Analyzer           ``analyze(event)``                          runs in path order
OutputModule       ``write(event)``                            on end paths
=================  ==========================================  ==============================

Every module may define ``begin_job()`` and ``end_job()``. Parameters are declared with
:class:`~recorun.framework.params.Param` / :class:`~recorun.framework.params.InputTag` class attributes and
arrive as instance attributes. ``produces`` lists the product instance names a producer puts
(``""`` is the default instance, tagged by the label alone).

``concurrency`` says how the framework may call a module:

* ``"stream"`` (default): one copy per stream; a copy sees one event at a time, so it may keep
  per-event state in ``self``.
* ``"shared"``: one instance, called from several threads at once; it must be thread-safe.
* ``"serial"``: one instance, calls queued one at a time (CMSSW's "one" modules). The queue
  does not block pool threads.

ExternalWork: ``acquire`` starts work outside the framework (a gRPC call, a device) and
returns at once; the work calls ``holder.done()`` or ``holder.done(error)`` from any thread.
``produce`` then runs on a pool thread, never before ``acquire`` has returned, and not at all
when the work failed: the error fails the event with the module's context.
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

    def produced_instances(self) -> tuple[str, ...]:
        return tuple(self.produces)

    def begin_job(self) -> None:
        """Called once per instance before the first event. Raise
        :class:`~framework.ConfigError` for a configuration found wrong here (exit code 2)."""

    def post_begin_job(self) -> None:
        """Called once per instance after every service's and module's ``begin_job``, before
        the first event (CMSSW's postBeginJob): for work that needs all of them set up."""

    def end_job(self) -> None:
        """Called once per instance after the last event, also after a failure."""

    def report(self) -> dict | None:
        """Extra figures for this module's entry in the job report (``details``), e.g. a
        client's timing; asked once, after ``end_job``."""
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
    """A producer that waits for external work between ``acquire`` and ``produce``."""

    kind = "producer"

    def acquire(self, event, holder: "WaitingTaskHolder") -> None:
        raise NotImplementedError(f"{type(self).__name__} must define acquire(event, holder)")


class Filter(Module):
    kind = "filter"

    def filter(self, event) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must define filter(event)")


class Analyzer(Module):
    kind = "analyzer"

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
    """Given to ``acquire``; the external work calls :meth:`done` exactly once, from any thread.

    The framework continues (runs ``produce`` or fails the event) only when both ``acquire`` has
    returned and ``done`` has been called, whichever comes last.
    """

    __slots__ = ("_lock", "_left", "_continue", "error", "acquire_failed", "done_ns",
                 "acquire_end_ns", "finished", "on_external_end")

    def __init__(self, on_complete):
        self._lock = threading.Lock()
        self._left = 2                   # acquire returned + done called
        self._continue = on_complete
        self.error: BaseException | None = None
        self.acquire_failed = False
        self.done_ns = 0                 # perf_counter_ns() when done() was called
        # set by the scheduler:
        self.acquire_end_ns = 0
        self.finished = None             # an Event to wait on, in synchronous mode
        self.on_external_end = None

    def done(self, error: BaseException | None = None) -> None:
        """Report the external work finished; pass the exception if it failed."""
        with self._lock:
            if self.done_ns:
                raise RuntimeError("WaitingTaskHolder.done() called twice")
            self.done_ns = time.perf_counter_ns()
            if self.error is None:
                self.error = error
        self._arrive()

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
