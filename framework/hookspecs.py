"""Every way to extend recorun, in one place.

The engine (:mod:`recorun.framework`) knows nothing of SONIC, Dask or Prometheus: those are
plugins, found the same way a physicist's own are. There are two kinds of extension.

Types, by name (entry-point groups)
===================================

A workflow names types; :mod:`recorun.framework.registry` finds them in these entry-point
groups (or as ``package.module:Class``), importing a type only when a workflow names it.

=====================  =========================================================================
group                  what is registered
=====================  =========================================================================
``recorun.modules``    :class:`~recorun.framework.module.Module` subclasses (producers,
                       filters, analyzers, outputs)
``recorun.sources``    :class:`~recorun.framework.source.Source` subclasses
``recorun.services``   :class:`~recorun.framework.service.Service` subclasses
``recorun.conditions`` :class:`~recorun.framework.conditions.ConditionsProducer` subclasses
                       (derived conditions records)
``recorun.plugins``    modules or objects holding ``@hookimpl`` functions (below)
=====================  =========================================================================

A name registered twice in one group (two packages) is a configuration error naming both
when a workflow uses it. A type may declare ``requires = {"fastjet": "recorun[jets]"}`` (import name -> what to install):
a workflow naming it without that package fails before the first event, exit code 2, with the
``pip install`` line (:mod:`recorun.framework.extras`).

What the engine calls on them, and when:

=====================================  ========================================================
method                                 when, and what it may do
=====================================  ========================================================
``Module.begin_job()``                 once per instance before the first event; raise
                                       ConfigError for a configuration found wrong (exit 2)
``Module.post_begin_job()``            after every service's and module's begin_job (start
                                       what needs them all: a fallback server)
``produce / filter / analyze / write``  per event, by the scheduler (module.py's table)
``acquire(event, holder)``             ExternalWork: start work elsewhere and return; the work
                                       calls ``holder.done(result)`` from any thread, and
                                       ``produce(event, result)`` follows
``begin_run(run)``,                    once per transition and instance, services first,
``begin_luminosity_block(lumi)``,      never beside an event (docs/TRANSITIONS.md); a raise
``end_luminosity_block(lumi)``,        stops the job
``end_run(run)``
``Module.merge_streams(others)``       per-stream modules, after the last event: fold the
                                       other copies in; end_job then on the first copy only
``Module.end_job()``                   once per instance after the last event, also after a
                                       failure
``Module.report()``                    after end_job: the ``details`` of its report entry
``Module.metrics()``                   any time, from an exporter's thread: live counters
``Module.provenance()``                at an output's end_job: what the module adds to its
                                       products' provenance (a SONIC model, its servers)
``OutputModule.job_provenance``        set before begin_job: the job's provenance, asked for
                                       the products it wrote (framework/provenance.py)
``OutputModule.output_file_param``     the parameter naming its file: a chunked executor points
``OutputModule.merge(parts, dest)``    it at one part per chunk, then merges the parts
``OutputModule.job_complete``          set before end_job: give the file its final name only
                                       when True
``Service.begin_job()``                before the modules' begin_job
``Service.job_started(scheduler)``     before the first event: may read (never change) the
                                       scheduler's ``status`` and ``workers``
``Service.begin_run(run)`` ...         the transition hooks, before the modules'
``Service.end_job()``                  after the modules' end_job
``Service.report()``                   after end_job: its entry under the report's ``services``
``Source.product_tags()``              before the first event: the products it can put
``Source.select_products(tags)``       before the first event: those some module consumes
``Source.open(max_events)``            once, before the first event
``Source.next_event(index)``           from one thread at a time: the next Event or None
``Source.total_events()``              after open: the events this job will read, if known
``Source.planned_events(max_events)``  before open: how many events the job will read
``Source.chunks(max_events, size)``    asked by a chunked executor: the input cut into
                                       :class:`~recorun.framework.source.SourceChunk` pieces
``Source.close()``, ``summary()``      at the end; summary() goes into the report
=====================================  ========================================================

Hooks (pluggy)
==============

A plugin is a module (or object) registered under ``recorun.plugins`` whose functions are
marked ``@recorun.hookimpl`` and named after the hooks below; it implements any of them. They
are called by the command line and at the end of every job; pluggy checks their signatures
when recorun loads them. A plugin that does not import stops every ``recorun`` command with
exit code 2, naming it.

The job report a report hook gets is the ``--report-json`` dictionary (README, "The report
JSON": ``events``, ``paths``, ``modules`` with each module's ``details``, ``services``...). A
section may not take a name the report already has (it is left out with a warning), and a
report hook that raises is left out with a warning naming the plugin: the report of a job
whose events are processed is always written.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("recorun")
hookimpl = pluggy.HookimplMarker("recorun")


@hookspec
def recorun_add_options(parser) -> None:
    """Add options to ``recorun WORKFLOW.yaml`` (an :class:`argparse.ArgumentParser`); called
    once when the command line is built. Options of an executor go here too."""


@hookspec
def recorun_check_options(options) -> None:
    """Check the parsed ``options`` (an :class:`argparse.Namespace`) before the workflow is
    read; raise :class:`~recorun.framework.errors.ConfigError` (exit 2) for a bad
    combination or a missing extra."""


@hookspec
def recorun_workflow_overrides(options) -> list[str] | None:
    """``--set``-style overrides (``dotted.key=value``) that an option stands for, e.g.
    ``--metrics-port`` adds a service. They come before the user's own ``--set``."""


@hookspec
def recorun_executors() -> dict | None:
    """Executors this plugin provides for ``recorun --executor NAME``: ``{name: class}``, each a
    :class:`~recorun.framework.executors.JobExecutor` subclass."""


@hookspec
def recorun_node_setup(built, stack, say) -> dict | None:
    """Called once by a chunked executor on the node that starts local workers, before they
    start: set up what they should share (a SONIC workflow's fallback server) and return
    environment variables the workers get (``{name: value}``). Register the teardown on
    ``stack`` (a :class:`contextlib.ExitStack`, closed when the job ends, also on failure);
    ``say(text)`` tells the user."""


@hookspec
def recorun_report_sections(report: dict, options) -> dict | None:
    """Sections to add to a finished job report, ``{name: JSON data}``, computed from it (its
    modules' ``details``). Called for every job report: one job's, and a chunked executor's
    merged one. ``options``: the command line's options, or None (a job run from Python)."""


@hookspec
def recorun_text_report(report: dict) -> str | None:
    """Text printed after the TimeReport (unless ``-q``), from a section this plugin added."""


@hookspec
def recorun_subcommands() -> dict | None:
    """``recorun NAME ARGS...`` commands: ``{name: main}``, ``main(argv) -> exit code``."""
