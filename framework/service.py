"""Services: job-wide helpers that modules share (a server registry, a metrics exporter...).

Configured under ``services:`` in the workflow, registered in the entry-point group
``recorun.services``; modules find them in ``self.services[label]``. A service is shared by
every thread: it must be thread-safe.

Order of the calls: every service's ``begin_job``, then the modules' ``begin_job`` and
``post_begin_job``, then every service's ``job_started(scheduler)``, the events, and at the end
``end_job`` in the reverse order (modules first, then services).
"""
from __future__ import annotations

from .params import Configurable


class Service(Configurable):

    def check_workflow(self, workflow, modules: dict) -> None:
        """Called when the workflow is built (also by ``recorun --check``), after the modules'
        ``check_workflow``, with the modules by label: raise ConfigError for a workflow that
        cannot work with this service, or log a warning for one that looks wrong."""

    def begin_job(self) -> None:
        """Called before the modules' begin_job."""

    def job_started(self, scheduler) -> None:
        """Called once every service and module has begun, before the first event, with the
        job's :class:`~recorun.framework.scheduler.Scheduler`: a service that watches the job (a
        metrics exporter) may read, never change, its ``status`` (a
        :class:`~recorun.framework.scheduler.JobStatus`) and its ``workers`` (each module label's
        instances and per-stream :class:`~recorun.framework.stats.ModuleStats`), from any thread,
        until its ``end_job``. Not called when the job failed to begin."""

    def begin_run(self, run) -> None:
        """Called at each run's beginning, before the modules' (``run.run``)."""

    def begin_luminosity_block(self, lumi) -> None:
        """Called at each luminosity block's beginning, before the modules' (``lumi.run``,
        ``lumi.luminosity_block``): a service that changes per lumi (a prescale column) does
        it here."""

    def end_luminosity_block(self, lumi) -> None:
        """Called at each luminosity block's end, before the modules'."""

    def end_run(self, run) -> None:
        """Called at each run's end, before the modules'."""

    def end_job(self) -> None:
        """Called after the modules' end_job."""

    def report(self) -> dict | None:
        """What this service has to say in the job report (``services: {label: ...}``), asked
        once after its end_job; None (the default): nothing."""
        return None
