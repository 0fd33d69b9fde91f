"""The SONIC report's hooks (:mod:`recorun.framework.hookspecs`): the ``sonic`` section of every
job report and its SonicReport table (:mod:`recorun.sonic_clients.report`), ``--nominal``, and
the subcommands ``recorun compare`` and ``recorun scale``."""
from __future__ import annotations

from recorun.framework.hookspecs import hookimpl

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
