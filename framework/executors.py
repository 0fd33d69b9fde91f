"""Executors: where a job's events are processed.

``recorun WORKFLOW.yaml --executor NAME`` picks one. The engine has ``local``: this process, its
thread pool and streams (:func:`~recorun.framework.process.run_job`), or with ``--processes N``
N worker processes of this node taking chunks of the input
(:mod:`recorun.framework.chunked_run`, :mod:`recorun.framework.process_pool`). Plugins add
others through the ``recorun_executors`` hook (:mod:`recorun.framework.hookspecs`), e.g.
``dask`` (:mod:`recorun.farm`), the same chunked job on a Dask cluster. An executor gets the built workflow (checked: a configuration or input
error has stopped the job before) and returns one job's :class:`JobResult`, however it cut the
work.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

from .build import BuiltWorkflow
from .process import JobResult, run_job


@dataclass
class JobRequest:
    """What the command line asks an executor to run."""

    built: BuiltWorkflow
    workflow: str                      # the YAML file
    overrides: list[str] = field(default_factory=list)   # --set items, in order
    options: Any = None                # the command line's options (argparse.Namespace)
    quiet: bool = False
    out: TextIO = sys.stderr


class JobExecutor:
    """Runs a :class:`JobRequest`; subclasses are registered by name (see the module doc)."""

    name: ClassVar[str] = ""

    def run(self, request: JobRequest) -> JobResult:
        raise NotImplementedError


class LocalExecutor(JobExecutor):
    """This process (``threads`` pool threads, ``streams`` events in flight), or with
    ``process.processes`` above 1 (``--processes N``) that many worker processes of this node."""

    name = "local"

    def run(self, request: JobRequest) -> JobResult:
        options = request.options
        processes = request.built.config.process.processes
        resubmit = getattr(options, "resubmit", None)
        if processes > 1 or resubmit:
            from .chunked import Resubmission, resubmission_path
            from .chunked_run import run_chunked
            from .process_pool import ProcessPool

            return run_chunked(request, ProcessPool(processes),
                               chunk_size=getattr(options, "chunk_size", None),
                               resubmit=Resubmission.load(resubmit) if resubmit else None,
                               resubmission_file=resubmission_path(
                                   getattr(options, "report_json", None)))
        return run_job(request.built, trace=bool(getattr(options, "trace", None)),
                       quiet=request.quiet, out=request.out,
                       start_at=getattr(options, "start_at", None), options=options)


BUILTIN = {LocalExecutor.name: LocalExecutor}
