"""The Prometheus exporter's hook: ``recorun --metrics-port N`` (:mod:`recorun.framework.hookspecs`)."""
from __future__ import annotations

from recorun.framework.extras import check
from recorun.framework.hookspecs import hookimpl


@hookimpl
def recorun_add_options(parser) -> None:
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics while "
                             "the job runs (0: a free port, logged); adds the service "
                             "services.prometheus (PrometheusExporter)")


@hookimpl
def recorun_check_options(options) -> None:
    if getattr(options, "metrics_port", None) is not None:
        check({"prometheus_client": "recorun[metrics]"}, "--metrics-port")


@hookimpl
def recorun_workflow_overrides(options) -> list[str] | None:
    port = getattr(options, "metrics_port", None)
    if port is None:
        return None
    return [f"services.prometheus={{type: PrometheusExporter, port: {port}}}"]
