"""``recorun WORKFLOW.yaml``: validate, run and report a workflow.

Exit codes: 0 success; 2 configuration error; 3 input data error; 4 a module failed on an
event (with ``on_error: stop``); 130 interrupted. 1 means a bug in recorun itself.

Subcommands: ``recorun compare A.json B.json`` (:mod:`framework.compare`) and
``recorun scale ...`` (:mod:`framework.scaling`). ``--executor dask`` runs the workflow on a
Dask cluster (:mod:`framework.farm`, docs/FARM.md).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys

from . import __version__, compare, farm, scaling
from .build import build_workflow
from .config import load_workflow
from .errors import EXIT_CONFIG, EXIT_OK, ConfigError, RecorunError
from .process import run_job
from .registry import GROUPS, PluginNotFound, available, load
from .reports import resources_json, time_report, trig_report, write_json
from .sonic_metrics import Nominal, sonic_report

SUBCOMMANDS = {"compare": compare.main, "scale": scaling.main}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recorun", description="Run a recorun workflow (a YAML file of modules and paths).",
        epilog="exit codes: 0 ok, 2 configuration error, 3 input data error, "
               "4 module error on an event, 130 interrupted")
    p.add_argument("workflow", nargs="?", help="the workflow YAML file")
    p.add_argument("-n", "--max-events", type=int, metavar="N",
                   help="process at most N events (process.max_events)")
    p.add_argument("-j", "--threads", type=int, metavar="N", help="pool threads (process.threads)")
    p.add_argument("-s", "--streams", type=int, metavar="N",
                   help="events in flight (process.streams; default: as many as threads)")
    p.add_argument("--sync", action="store_true",
                   help="debugging mode: 1 thread, 1 stream, ExternalWork waits right after "
                        "acquire, so modules run in one fixed order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a workflow value, e.g. --set modules.ht.min_ht=300 "
                        "(repeatable; values are YAML)")
    p.add_argument("--report-json", metavar="PATH", help="write the job report as JSON")
    p.add_argument("--resources-json", metavar="PATH",
                   help="write per-module times in FastTimerService's resources.json shape")
    p.add_argument("--nominal", metavar="REPORT.json",
                   help="the job report (--report-json) of the nominal workflow: X, the CPU "
                        "time of the algorithm each SONIC module replaces (same label), for "
                        "F_GPU^eq in the SonicReport (docs/METRICS.md)")
    p.add_argument("--start-at", type=float, metavar="UNIX_TIME",
                   help="after set-up, wait until this time (seconds since the epoch) before "
                        "the first event: many jobs then process events together")
    p.add_argument("--trace", metavar="PATH",
                   help="write a Chrome/Perfetto trace of every module call")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics while the "
                        "job runs (0: a free port, logged); adds the service "
                        "services.prometheus (PrometheusExporter)")
    p.add_argument("--check", action="store_true",
                   help="validate the workflow and its graph, run nothing")
    p.add_argument("--dump-graph", metavar="PATH",
                   help="write the module graph as DOT (PNG/SVG when graphviz is installed)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="no progress, no reports on the terminal; errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="also list every failed event and the graph's warnings")
    dask = p.add_argument_group("on a Dask cluster (docs/FARM.md)")
    dask.add_argument("--executor", choices=("local", "dask"), default="local",
                      help="local: this process (default); dask: cut the input into chunks and "
                           "run each on a Dask worker, then merge outputs and reports")
    dask.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                      help="the Dask scheduler to use (default: start a local cluster)")
    dask.add_argument("--local-workers", type=int, metavar="N",
                      help="workers of the local Dask cluster (default: CPUs / threads)")
    dask.add_argument("--chunk-size", type=int, metavar="N",
                      help=f"entries per task, cut on the files' cluster boundaries "
                           f"(default {farm.DEFAULT_CHUNK_SIZE})")
    dask.add_argument("--resubmit", metavar="FAILED.json",
                      help="run only the chunks that a farm run with failures left in this "
                           "file (with its --set, then these), and merge with its done chunks")
    p.add_argument("--list", action="store_true",
                   help="list the registered module, source and service types")
    p.add_argument("--describe", metavar="TYPE",
                   help="print a module (or source, service) type's docstring and parameters")
    p.add_argument("--version", action="version", version=f"recorun {__version__}")
    return p


def _overrides(args) -> list[str]:
    extra = []
    for flag, key in (("max_events", "process.max_events"), ("threads", "process.threads"),
                      ("streams", "process.streams")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    if args.sync:
        extra += ["process.threads=1", "process.streams=1", "process.synchronous=true"]
    metrics = ([f"services.prometheus={{type: PrometheusExporter, port: {args.metrics_port}}}"]
               if args.metrics_port is not None else [])   # first: --set may then refine it
    return metrics + list(args.overrides) + extra


def _check_farm_options(cli, args) -> None:
    given = [flag for flag, value in (("--scheduler-address", args.scheduler_address),
                                      ("--local-workers", args.local_workers),
                                      ("--chunk-size", args.chunk_size),
                                      ("--resubmit", args.resubmit)) if value is not None]
    if args.executor != "dask":
        if given:
            cli.error(f"{given[0]} goes with --executor dask")
        return
    if args.scheduler_address and args.local_workers is not None:
        cli.error("--local-workers starts a local cluster; it cannot go with "
                  "--scheduler-address")
    for flag, value in (("--chunk-size", args.chunk_size), ("--local-workers",
                                                            args.local_workers)):
        if value is not None and value < 1:
            cli.error(f"{flag} must be at least 1")
    for flag, value in (("--trace", args.trace), ("--start-at", args.start_at),
                        ("--metrics-port", getattr(args, "metrics_port", None))):
        if value is not None:
            cli.error(f"{flag} is not supported with --executor dask (each chunk is a job of "
                      f"its own)")


def _list_types() -> None:
    for kind in GROUPS:
        names = available(kind)
        print(f"{kind} types ({GROUPS[kind]}): {', '.join(names) or 'none'}")


def _describe(name: str) -> int:
    first_error = None
    for kind in GROUPS:
        try:
            cls = load(kind, name)
        except PluginNotFound as exc:
            first_error = first_error or exc
            continue
        print(f"{name}: {kind} {cls.__module__}.{cls.__qualname__}")
        if cls.__doc__:
            print(inspect.cleandoc(cls.__doc__))
        for param in cls.parameters().values():
            print(f"  {param.describe()}")
        return EXIT_OK
    sys.stderr.write(f"recorun: {first_error} (recorun --list shows every type)\n")
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    cli = parser()
    args = cli.parse_args(argv)
    err = sys.stderr
    logging.basicConfig(stream=err, format="%(message)s",
                        level=logging.WARNING if args.quiet else logging.INFO)
    if args.list:
        _list_types()
        return EXIT_OK
    if args.describe:
        return _describe(args.describe)
    if args.workflow is None:
        cli.error("a workflow file is required (or --list / --describe TYPE)")
    if args.sync and (args.threads or 1, args.streams or 1) != (1, 1):
        cli.error("--sync runs one thread and one stream; it cannot go with -j or -s above 1")
    _check_farm_options(cli, args)
    overrides = _overrides(args)
    try:
        nominal = Nominal.load(args.nominal) if args.nominal else None
        resubmit = farm.Resubmission.load(args.resubmit) if args.resubmit else None
        if resubmit is not None:
            overrides = resubmit.overrides + overrides
        config = load_workflow(args.workflow, overrides)
        built = build_workflow(config)
    except ConfigError as exc:
        err.write(f"recorun: configuration error: {exc}\n")
        return EXIT_CONFIG
    except RecorunError as exc:
        err.write(f"recorun: error: {exc}\n")
        return exc.exit_code
    for warning in built.graph.warnings():
        err.write(f"recorun: warning: {config.file}: {warning}\n")
    if args.dump_graph:
        written = built.graph.write(args.dump_graph)
        err.write(f"recorun: module graph written to {written}\n")
    if args.check:
        g = built.graph
        print(f"{config.file}: OK: {len(g.nodes)} modules, {len(config.paths)} paths, "
              f"{len(config.endpaths)} end paths, {g.graph.number_of_edges()} product edges")
        return EXIT_OK

    if args.executor == "dask":
        try:
            result = farm.run_farm(built, farm.FarmOptions(
                args.workflow, overrides, args.scheduler_address, args.local_workers,
                args.chunk_size or farm.DEFAULT_CHUNK_SIZE, resubmit,
                farm.resubmission_path(args.report_json)), quiet=args.quiet, out=err,
                nominal=nominal)
        except RecorunError as exc:
            err.write(f"recorun: error: {exc}\n")
            return exc.exit_code
    else:
        result = run_job(built, trace=bool(args.trace), quiet=args.quiet, out=err,
                         nominal=nominal, start_at=args.start_at)
    report = result.report
    if not args.quiet:
        print(trig_report(report))
        print()
        print(time_report(report))
        if "sonic" in report:
            print()
            print(sonic_report(report["sonic"]))
    if args.report_json:
        write_json(args.report_json, report)
    if args.resources_json:
        write_json(args.resources_json, resources_json(report))
    if args.trace and result.tracer is not None:
        result.tracer.write(args.trace)

    sys.stdout.flush()
    ev = report["events"]
    if result.error is not None:
        err.write(f"recorun: error: {result.error}\n")
    failures = report["failed_events"]
    if failures and (args.verbose or len(failures) <= 10):
        for failure in failures:
            where = ("external work" if failure["method"] == "external"
                     else f"{failure['method']}()")
            err.write(f"recorun: failed event {failure['event']}: module '{failure['label']}' "
                      f"{where}: {failure['error']}\n")
    elif failures:
        err.write(f"recorun: {len(failures)} failed events (-v lists them, and "
                  f"--report-json keeps them)\n")
    if report["not_processed"]:
        err.write(f"recorun: stopped ({report['stop_reason']}): {report['not_processed']}\n")
    if not args.quiet:
        err.write(f"recorun: {ev['read']} events read: {ev['accepted']} accepted, "
                  f"{ev['rejected']} rejected, {ev['failed']} failed; "
                  f"{report['throughput_hz']:.1f} events/s\n")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
