"""SONIC's hooks (:mod:`recorun.framework.hookspecs`): the ``sonic`` section of every job report
and its SonicReport table (:mod:`recorun.sonic_clients.report`), ``--nominal``, the
subcommands ``recorun compare`` and ``recorun scale``, and one local fallback server for all
the worker processes of a node (``--processes``, a local Dask cluster)."""
from __future__ import annotations

from recorun.framework.hookspecs import hookimpl

from .base import ClientConfig, ClientConfigError
from .report import Nominal, sonic_report, sonic_section


@hookimpl
def recorun_add_options(parser) -> None:
    parser.add_argument("--nominal", metavar="REPORT.json",
                        help="the job report (--report-json) of the nominal workflow: X, the "
                             "CPU time of the algorithm each SONIC module replaces (same "
                             "label), for F_GPU^eq in the SonicReport (docs/METRICS.md)")


@hookimpl
def recorun_check_options(options) -> None:
    if getattr(options, "nominal", None):
        Nominal.load(options.nominal)            # a ConfigError naming the file (exit 2)


@hookimpl
def recorun_report_sections(report: dict, options) -> dict | None:
    path = getattr(options, "nominal", None)
    section = sonic_section(report["modules"], Nominal.load(path) if path else None)
    return {"sonic": section} if section else None


@hookimpl
def recorun_text_report(report: dict) -> str | None:
    return sonic_report(report["sonic"]) if report.get("sonic") else None


@hookimpl
def recorun_subcommands() -> dict:
    from . import compare, scaling

    return {"compare": compare.main, "scale": scaling.main}


@hookimpl
def recorun_node_setup(built, stack, say) -> dict | None:
    """The workflow's SONIC clients that would start a local fallback server: start one here,
    for every worker process of this node, and tell them its address."""
    from recorun.framework.errors import ConfigError

    from .registry import find_registry

    configs = [config for node in built.graph.nodes.values()
               if isinstance(config := getattr(node.module, "client_config", None),
                             ClientConfig)]
    if not any(c.client == "triton" for c in configs):
        return None
    registry = find_registry(built.services)
    try:
        env = registry.share_fallback(configs)
    except ClientConfigError as exc:
        registry.end_job()
        raise ConfigError(f"the node's fallback server: {exc}") from exc
    stack.callback(registry.end_job)
    if env:
        say(f"one local fallback server for the workers of this node: "
            f"{env['RECORUN_FALLBACK_MODELS']} at {env['RECORUN_FALLBACK_SERVER']}")
    return env
