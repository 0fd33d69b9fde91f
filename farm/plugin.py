"""The Dask farm's hooks: ``--executor dask`` and its options (:mod:`recorun.framework.hookspecs`)."""
from __future__ import annotations

from recorun.framework.errors import ConfigError
from recorun.framework.extras import check
from recorun.framework.hookspecs import hookimpl

#: options that only a farm takes
FARM_ONLY = ("scheduler_address", "local_workers")


@hookimpl
def recorun_add_options(parser) -> None:
    dask = parser.add_argument_group("on a Dask cluster (--executor dask, docs/FARM.md)")
    dask.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                      help="the Dask scheduler to use (default: start a local cluster)")
    dask.add_argument("--local-workers", type=int, metavar="N",
                      help="workers of the local Dask cluster (default: CPUs / threads)")


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
    if options.local_workers is not None and options.local_workers < 1:
        raise ConfigError("--local-workers must be at least 1")


@hookimpl
def recorun_executors() -> dict:
    from .executor import DaskExecutor

    return {DaskExecutor.name: DaskExecutor}
