"""A workflow on a Dask cluster: ``recorun WORKFLOW.yaml --executor dask`` (docs/FARM.md).

The farm is the chunked executor of ``--processes`` (:mod:`recorun.framework.chunked_run`:
the plan, the build-once workers, the retries, the merged outputs and report) with its
workers on a Dask cluster: :class:`DaskPool`.

Workers
    Each Dask worker process builds the workflow once, when the job starts (``Client.run``:
    begin_job once per worker, a SONIC client and its fallback server once per worker), and
    keeps it for every chunk it is given: a task is one chunk, run by the worker's
    :class:`~recorun.framework.chunked.ChunkWorker`, with the workflow's threads and streams.
    At the end every worker ends its job (end_job once) and sends its process report. A
    worker that joins later builds the workflow at its first chunk.

Retries
    Dask puts back a task whose worker died (killed, out of memory) and runs it on another
    worker, up to ``distributed.scheduler.allowed-failures``; a chunk still lost then is run
    once more by the driver, then reported as not processed. A chunk whose job failed (input
    or module error) is not run again, as with ``--processes``.

What Dask costs inside a worker, and what the farm turns off (a local cluster; a remote
cluster's workers are configured by whoever started them, docs/FARM.md): the nanny's
``MALLOC_TRIM_THRESHOLD_=65536`` (glibc then gives memory back to the system at every large
free: the modules' CPU time per call rose by ~30 %) and the statistical profiler's thread.

Dask itself is imported only when a farm runs: it is the ``farm`` extra.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass

from recorun.framework.build import BuiltWorkflow
from recorun.framework.chunked import (ChunkFailed, ChunkWorker, Resubmission,
                                       resubmission_path)
from recorun.framework.chunked_run import WorkerPool, run_chunked
from recorun.framework.errors import ConfigError
from recorun.framework.executors import JobExecutor, JobRequest
from recorun.framework.extras import require
from recorun.framework.module import OutputModule
from recorun.framework.process import JobResult

log = logging.getLogger(__name__)

#: what a local cluster's workers run without (see the module docstring)
DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
               "distributed.worker.profile.enabled": False}

#: the ChunkWorker of each job (by token) built in this worker process
_WORKERS: dict[str, ChunkWorker] = {}


def _start_worker(token: str, task: dict) -> dict | None:
    """On every worker (``Client.run``): build and begin the workflow; None, or the failure."""
    try:
        _WORKERS[token] = ChunkWorker(task)
    except ChunkFailed as exc:
        return {"error": exc.message, "exit_code": exc.exit_code, "worker": exc.worker}
    return None


def _run_on_worker(token: str, task: dict, chunk, attempt: str) -> dict:
    """A task: one chunk on this worker's ChunkWorker (built now if the worker joined late)."""
    worker = _WORKERS.get(token)
    if worker is None:
        worker = _WORKERS[token] = ChunkWorker(task)
    return worker.run(chunk, attempt)


def _interrupt_worker(token: str) -> None:
    worker = _WORKERS.get(token)
    if worker is not None:
        worker.interrupt()


def _finish_worker(token: str) -> dict | None:
    worker = _WORKERS.pop(token, None)
    return worker.finish() if worker is not None else None


def farm_warnings(built: BuiltWorkflow, remote: bool = True) -> list[str]:
    """What would go wrong quietly on a farm: on a remote cluster, SONIC producers that would
    start a local fallback server in every worker; modules other than outputs that write
    files."""
    warnings = []
    has_servers = any(getattr(s, "servers", None) for s in built.services.values())
    for label, node in built.graph.nodes.items():
        module = node.module
        client = getattr(getattr(module, "client_config", None), "client", None)
        if remote and client == "triton" and not has_servers:
            warnings.append(
                f"module '{label}' ({type(module).__name__}) sends its requests to a Triton "
                f"server but the workflow names none: every worker of the remote cluster "
                f"would start its own local fallback recorun-server. Point the farm at "
                f"servers: --set 'services.sonic={{type: ServerRegistry, servers: [{{name: "
                f"gpu1, address: \"HOST:8001\"}}]}}' (docs/FARM.md)")
        if not isinstance(module, OutputModule):
            params = type(module).parameters()
            for name in ("output", "file"):
                value = getattr(module, name, None)
                if name in params and isinstance(value, str) and value:
                    warnings.append(f"module '{label}' ({type(module).__name__}) writes "
                                    f"'{value}' itself: every worker writes it again; a "
                                    f"chunked job merges only output modules' files")
    return warnings


@dataclass
class FarmOptions:
    scheduler_address: str | None = None    # None: a LocalCluster of local_workers
    local_workers: int | None = None        # None: CPUs / process.threads


class DaskPool(WorkerPool):
    """The workers of a Dask cluster (see the module docstring)."""

    kind = "dask"

    def __init__(self, options: FarmOptions, threads: int, quiet: bool, say):
        self.options, self.threads, self.quiet, self.say = options, threads, quiet, say
        self.local = not options.scheduler_address          # we start the workers here
        self.token = uuid.uuid4().hex
        self.client = self.cluster = None
        self.pending: dict = {}
        self.size = 0
        self.task: dict = {}

    def start(self, task: dict) -> list[dict]:
        import dask
        from distributed import Client, LocalCluster

        level = logging.ERROR if self.quiet else logging.WARNING
        logging.getLogger("distributed").setLevel(level)    # the scheduler's and nannies' news
        options = self.options
        if options.scheduler_address:
            try:
                self.client = Client(options.scheduler_address, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"cannot connect to the Dask scheduler at "
                                  f"{options.scheduler_address}: {exc}") from None
        else:
            workers = options.local_workers or max(1, (os.cpu_count() or 1) //
                                                   max(self.threads, 1))
            with dask.config.set(DASK_CONFIG):
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                            processes=True, host="127.0.0.1",
                                            dashboard_address="127.0.0.1:0",
                                            silence_logs=level)
            self.client = Client(self.cluster)
        self.size = len(self.client.nthreads())
        self.say(f"dask scheduler {self.client.scheduler.address} (dashboard "
                 f"{self.client.dashboard_link}): {self.size} workers"
                 + ("; the chunks wait for workers to join" if self.size == 0 else ""))
        self.task = task
        results = self.client.run(_start_worker, self.token, task) if self.size else {}
        return [r for r in results.values() if r]

    def submit(self, state, attempt: str) -> None:
        state.status = "queued"
        future = self.client.submit(_run_on_worker, self.token, self.task, state.chunk, attempt,
                                    key=f"recorun-chunk-{state.chunk.id:05d}-{attempt}",
                                    pure=False)
        self.pending[future] = state

    def poll(self, timeout: float) -> list[tuple]:
        done = [f for f in self.pending if f.done()]
        if not done:
            time.sleep(min(timeout, 0.1))
            return []
        events = []
        for future in done:
            state = self.pending.pop(future)
            if future.status == "finished":
                events.append(("done", state, future.result()))
                continue
            try:
                exc = future.exception()
            except Exception as other:                   # cancelled futures raise here
                exc = other
            events.append(("lost", state, f"{type(exc).__name__}: {exc}"))
        return events

    def interrupt(self) -> list:
        """The workers stop reading events; chunks not started come back with no event read."""
        self.client.run(_interrupt_worker, self.token)
        return []

    def finish(self) -> list[dict]:
        try:
            results = self.client.run(_finish_worker, self.token)
        except Exception as exc:                         # pragma: no cover
            log.warning("the Dask workers did not end their jobs cleanly: %s", exc)
            results = {}
        self.close()
        return [r for r in results.values() if r]

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.close()

    def describe(self) -> str:
        return f"{self.size} Dask workers"

    def section(self) -> dict:
        return {"executor": "dask", "workers": self.size,
                "scheduler": self.options.scheduler_address or "local"}


class DaskExecutor(JobExecutor):
    """``--executor dask``: the input in chunks on a Dask cluster (see the module doc)."""

    name = "dask"

    def run(self, request: JobRequest) -> JobResult:
        require("distributed", "recorun[farm]", "--executor dask")
        args = request.options
        say = (lambda text: None) if request.quiet else (
            lambda text: print(f"recorun: {text}", file=request.out, flush=True))
        remote = bool(getattr(args, "scheduler_address", None))
        for warning in farm_warnings(request.built, remote):
            say(f"warning: {warning}")
        resubmit = getattr(args, "resubmit", None)
        pool = DaskPool(FarmOptions(getattr(args, "scheduler_address", None),
                                    getattr(args, "local_workers", None)),
                        request.built.config.process.threads, request.quiet, say)
        try:
            return run_chunked(request, pool, chunk_size=getattr(args, "chunk_size", None),
                               resubmit=Resubmission.load(resubmit) if resubmit else None,
                               resubmission_file=resubmission_path(
                                   getattr(args, "report_json", None)))
        finally:
            pool.close()
