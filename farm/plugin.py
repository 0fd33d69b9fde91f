"""The Dask farm's hooks: ``--executor dask`` and its options (:mod:`recorun.framework.hookspecs`)."""
from __future__ import annotations

from recorun.framework.chunked import DEFAULT_CHUNK_SIZE, Resubmission
from recorun.framework.errors import ConfigError
from recorun.framework.extras import check
from recorun.framework.hookspecs import hookimpl

#: options that only a farm takes, and the reason a farm cannot take the others
FARM_ONLY = ("scheduler_address", "local_workers", "chunk_size", "resubmit")
NOT_ON_A_FARM = (("trace", "--trace"), ("start_at", "--start-at"),
                 ("metrics_port", "--metrics-port"))


@hookimpl
def recorun_add_options(parser) -> None:
    dask = parser.add_argument_group("on a Dask cluster (--executor dask, docs/FARM.md)")
    dask.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                      help="the Dask scheduler to use (default: start a local cluster)")
    dask.add_argument("--local-workers", type=int, metavar="N",
                      help="workers of the local Dask cluster (default: CPUs / threads)")
    dask.add_argument("--chunk-size", type=int, metavar="N",
                      help=f"entries per task, cut on the files' cluster boundaries "
                           f"(default {DEFAULT_CHUNK_SIZE})")
    dask.add_argument("--resubmit", metavar="FAILED.json",
                      help="run only the chunks that a farm run with failures left in this "
                           "file (with its --set, then these), and merge with its done chunks")


@hookimpl
def recorun_check_options(options) -> None:
    given = [f"--{name.replace('_', '-')}" for name in FARM_ONLY
             if getattr(options, name, None) is not None]
    if options.executor != "dask":
        if given:
            raise ConfigError(f"{given[0]} goes with --executor dask")
        return
    check({"distributed": "recorun[farm]"}, "--executor dask")
    if options.scheduler_address and options.local_workers is not None:
        raise ConfigError("--local-workers starts a local cluster; it cannot go with "
                          "--scheduler-address")
    for flag, value in (("--chunk-size", options.chunk_size),
                        ("--local-workers", options.local_workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1")
    for name, flag in NOT_ON_A_FARM:
        if getattr(options, name, None) is not None:
            raise ConfigError(f"{flag} is not supported with --executor dask (each chunk is a "
                              f"job of its own)")


@hookimpl
def recorun_workflow_overrides(options) -> list[str] | None:
    """A resubmission runs the first run's overrides first, then the new ``--set``."""
    if getattr(options, "resubmit", None):
        return Resubmission.load(options.resubmit).overrides
    return None


@hookimpl
def recorun_executors() -> dict:
    from .executor import DaskExecutor

    return {DaskExecutor.name: DaskExecutor}
