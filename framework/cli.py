"""``recorun WORKFLOW.yaml``: validate, run and report a workflow.

Exit codes: 0 success; 2 configuration error; 3 input data error; 4 a module failed on an
event (with ``on_error: stop``); 130 interrupted. 1 means a bug in recorun itself.

The command line is extended by plugins (:mod:`recorun.framework.hookspecs`): their options
(``--nominal``, ``--metrics-port``, the Dask farm's), executors (``--executor dask``), report
sections and subcommands (``recorun compare``, ``recorun scale``). ``recorun provenance FILE``
(what made an output file's products, :mod:`recorun.framework.provenance`) is built in.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys

from . import __version__
from .build import build_workflow
from .chunked import Resubmission
from .config import load_workflow
from .errors import EXIT_CONFIG, EXIT_OK, ConfigError, RecorunError
from .executors import BUILTIN, JobRequest
from .extras import installed
from .hooks import hook, merged, plugin_manager, text_reports
from .registry import GROUPS, PluginNotFound, available, load, registered_twice
from .reports import resources_json, time_report, trig_report, write_json
from .signals import JobInterrupted, job_signals
from .signals import exit_code as signal_exit_code


def _provenance(argv: list[str]) -> int:
    from .provenance import main as provenance_main
    return provenance_main(argv)


#: subcommands of recorun itself (plugins add theirs through ``recorun_subcommands``)
BUILTIN_SUBCOMMANDS = {"provenance": _provenance}


def parser(executors: dict, subcommands=()) -> argparse.ArgumentParser:
    commands = "".join(f"  recorun {name} ...\n" for name in sorted(subcommands))
    p = argparse.ArgumentParser(
        prog="recorun", description="Run a recorun workflow (a YAML file of modules and paths).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"subcommands (each with its own --help):\n{commands}\n" if commands else "")
        + "exit codes: 0 ok, 2 configuration error, 3 input data error, 4 module error on an "
          "event,\n128 + N stopped by signal N (130: Ctrl-C, 143: SIGTERM)")
    p.add_argument("workflow", nargs="?", help="the workflow YAML file")
    p.add_argument("-n", "--max-events", type=int, metavar="N",
                   help="process at most N events (process.max_events)")
    p.add_argument("-j", "--threads", type=int, metavar="N", help="pool threads (process.threads)")
    p.add_argument("-s", "--streams", type=int, metavar="N",
                   help="events in flight (process.streams; default: as many as threads)")
    p.add_argument("-p", "--processes", type=int, metavar="N",
                   help="worker processes on this node, each with its threads and streams, "
                        "taking chunks of the input (process.processes; default 1)")
    p.add_argument("--chunk-size", type=int, metavar="N",
                   help="events per chunk of a chunked job (--processes, --executor dask), "
                        "cut on the files' cluster boundaries (default: about four chunks "
                        "per worker)")
    p.add_argument("--resubmit", metavar="FAILED.json",
                   help="run only the chunks that a chunked job left undone in this file "
                        "(with its --set, then these), and merge with its complete chunks")
    p.add_argument("--sync", action="store_true",
                   help="debugging mode: 1 thread, 1 stream, ExternalWork waits right after "
                        "acquire, so modules run in one fixed order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a workflow value, e.g. --set modules.ht.min_ht=300 "
                        "(repeatable; values are YAML)")
    p.add_argument("--report-json", metavar="PATH", help="write the job report as JSON")
    p.add_argument("--resources-json", metavar="PATH",
                   help="write per-module times in FastTimerService's resources.json shape")
    p.add_argument("--start-at", type=float, metavar="UNIX_TIME",
                   help="after set-up, wait until this time (seconds since the epoch) before "
                        "the first event: many jobs then process events together")
    p.add_argument("--trace", metavar="PATH",
                   help="write a Chrome/Perfetto trace of every module call")
    p.add_argument("--check", action="store_true",
                   help="validate the workflow and its graph, run nothing")
    p.add_argument("--dump-graph", metavar="PATH",
                   help="write the module graph as DOT (PNG/SVG when graphviz is installed)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="no progress, no reports on the terminal; errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="also list every failed event and the graph's warnings")
    p.add_argument("--executor", choices=sorted(executors), default="local",
                   help="where the events are processed: local (this node: one process, or "
                        "--processes N; the default)"
                        + "".join(f"; {name}" for name in sorted(executors) if name != "local"))
    p.add_argument("--list", action="store_true",
                   help="list the registered module, source and service types")
    p.add_argument("--describe", metavar="TYPE",
                   help="print a module (or source, service) type's docstring and parameters")
    p.add_argument("--version", action="version", version=f"recorun {__version__}")
    hook().recorun_add_options(parser=p)
    return p


def _overrides(args) -> list[str]:
    extra = []
    for flag, key in (("max_events", "process.max_events"), ("threads", "process.threads"),
                      ("streams", "process.streams"), ("processes", "process.processes")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    if args.sync:
        extra += ["process.threads=1", "process.streams=1", "process.synchronous=true"]
    from_plugins = [item for items in hook().recorun_workflow_overrides(options=args)
                    for item in items or ()]             # first: --set may then refine them
    first = Resubmission.load(args.resubmit).overrides if args.resubmit else []
    return first + from_plugins + list(args.overrides) + extra


#: options that a job cut into chunks cannot take (each chunk is run by a worker of its own)
NOT_IN_CHUNKS = (("trace", "--trace"), ("start_at", "--start-at"),
                 ("metrics_port", "--metrics-port"))


def chunked_options_problem(args, processes: int) -> str | None:
    """What is wrong with the options of a chunked job (``processes`` > 1 or another executor
    than local), or with chunk options on a job that is not one; None if nothing."""
    chunked = processes > 1 or args.executor != "local"
    if not chunked:
        given = [flag for flag, value in (("--chunk-size", args.chunk_size),
                                          ("--resubmit", args.resubmit)) if value is not None]
        if given:
            return (f"{given[0]} goes with a job cut into chunks: --processes N (N > 1) or "
                    f"--executor dask")
        return None
    if processes > 1 and args.executor != "local":
        return (f"--processes runs worker processes of this node; the {args.executor} "
                f"executor has workers of its own")
    for name, flag in NOT_IN_CHUNKS:
        if getattr(args, name, None) is not None:
            return (f"{flag} is not supported in a job cut into chunks (--processes, "
                    f"--executor dask): each worker runs chunks of its own")
    return None


def _list_types(executors: dict) -> None:
    for kind in GROUPS:
        twice = set(registered_twice(kind))
        names = [f"{n} (registered twice!)" if n in twice else n for n in available(kind)]
        print(f"{kind} types ({GROUPS[kind]}): {', '.join(names) or 'none'}")
    print(f"executors: {', '.join(sorted(executors))}")
    plugins = [name.partition(":")[0] for name, _ in plugin_manager().list_name_plugin()]
    print(f"plugins (recorun.plugins): {', '.join(sorted(plugins)) or 'none'}")


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
        for package, install in cls.requires.items():
            state = "installed" if installed(package) else "NOT installed"
            print(f"  needs {package} ({state}; pip install '{install}')")
        for param in cls.parameters().values():
            print(f"  {param.describe()}")
        return EXIT_OK
    sys.stderr.write(f"recorun: {first_error} (recorun --list shows every type)\n")
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """``recorun``: SIGINT and SIGTERM are handled from here to the last report written
    (:mod:`recorun.framework.signals`)."""
    stderr, sys.stderr = sys.stderr, ReaderSafeStream(sys.stderr)
    try:
        return _main_with_signals(argv)
    finally:
        sys.stderr = stderr


def _main_with_signals(argv: list[str] | None) -> int:
    with job_signals(sys.stderr) as signals:
        try:
            return _main(argv)
        except BrokenPipeError:                  # stdout closed by its reader (| head)
            stdout_closed()
            return EXIT_OK
        except JobInterrupted as exc:            # before any job began: nothing ran
            sys.stderr.write(f"recorun: {exc}: nothing was run\n")
            return signal_exit_code(exc.signum)
        finally:
            del signals


class ReaderSafeStream:
    """Standard error whose reader may go away (``recorun W.yaml 2>&1 | head -1``): what is
    written after that goes nowhere, so that the job runs to its end and keeps its exit
    code."""

    def __init__(self, stream):
        self._stream = stream if stream is not None else open(os.devnull, "w")   # 2>&-
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self.reader_gone = True
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self.reader_gone = True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stdout_closed() -> None:
    """Standard output was closed by its reader (``recorun --list | head -1``): what is left
    to print goes nowhere, and Python's flush at exit raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _print_reports(report: dict) -> None:
    """The text reports on standard output; a closed standard output ends them quietly (the
    job is over and its files are written: its exit code stands)."""
    try:
        print(trig_report(report))
        print()
        print(time_report(report))
        for text in text_reports(report):
            print()
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()


def _report_folders_problem(args) -> str | None:
    """The folders of ``--report-json``, ``--resources-json``, ``--trace`` and
    ``--dump-graph`` made before the job runs; what is wrong when one cannot be (the job would
    lose its report at the end)."""
    for flag, path in (("--report-json", args.report_json),
                       ("--resources-json", args.resources_json), ("--trace", args.trace),
                       ("--dump-graph", args.dump_graph)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            return f"{flag} {path}: cannot create its folder {folder}: {exc.strerror or exc}"
        if os.path.isdir(path):
            return f"{flag} {path} is a folder: name a file"
    return None


def _stopped_by(exc: RecorunError, err) -> int:
    """Say what stopped the command before any job ran; its exit code."""
    kind = "configuration error" if isinstance(exc, ConfigError) else "error"
    err.write(f"recorun: {kind}: {exc}\n")
    return EXIT_CONFIG if isinstance(exc, ConfigError) else exc.exit_code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    err = sys.stderr
    try:
        plugin_manager()
        subcommands = merged([*hook().recorun_subcommands(), BUILTIN_SUBCOMMANDS])
        executors = {**BUILTIN, **merged(hook().recorun_executors())}
    except ConfigError as exc:
        err.write(f"recorun: configuration error: {exc}\n")
        return EXIT_CONFIG
    if argv and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    cli = parser(executors, subcommands)
    args = cli.parse_args(argv)
    logging.basicConfig(stream=err, format="%(message)s",
                        level=logging.WARNING if args.quiet else logging.INFO)
    if args.list:
        _list_types(executors)
        return EXIT_OK
    if args.describe:
        return _describe(args.describe)
    if args.workflow is None:
        cli.error("a workflow file is required (or --list / --describe TYPE)")
    if args.sync and (args.threads or 1, args.streams or 1, args.processes or 1) != (1, 1, 1):
        cli.error("--sync runs one thread, one stream and one process; it cannot go with -j, "
                  "-s or -p above 1")
    for flag, value in (("--processes", args.processes), ("--chunk-size", args.chunk_size)):
        if value is not None and value < 1:
            cli.error(f"{flag} must be at least 1")
    try:
        hook().recorun_check_options(options=args)
        overrides = _overrides(args)
        config = load_workflow(args.workflow, overrides)
        built = build_workflow(config)
    except RecorunError as exc:
        return _stopped_by(exc, err)
    problem = chunked_options_problem(args, config.process.processes)
    if problem:
        err.write(f"recorun: configuration error: {problem}\n")
        return EXIT_CONFIG
    for warning in built.graph.warnings():
        err.write(f"recorun: warning: {config.file}: {warning}\n")
    problem = _report_folders_problem(args)
    if problem:
        err.write(f"recorun: configuration error: {problem}\n")
        return EXIT_CONFIG
    if args.dump_graph:
        written = built.graph.write(args.dump_graph)
        if not args.quiet:
            err.write(f"recorun: module graph written to {written}\n")
    if args.check:
        g = built.graph
        print(f"{config.file}: OK: {len(g.nodes)} modules, {len(config.paths)} paths, "
              f"{len(config.endpaths)} end paths, {g.graph.number_of_edges()} product edges")
        return EXIT_OK

    request = JobRequest(built, args.workflow, overrides, args, quiet=args.quiet, out=err)
    try:
        result = executors[args.executor]().run(request)
    except RecorunError as exc:
        return _stopped_by(exc, err)
    report = result.report
    set_up_failed = report["events"]["read"] == 0 and result.exit_code != EXIT_OK
    if not args.quiet and not set_up_failed:
        _print_reports(report)
    if args.report_json:
        write_json(args.report_json, report)
    if args.resources_json:
        write_json(args.resources_json, resources_json(report))
    if args.trace and result.tracer is not None:
        result.tracer.write(args.trace)

    ev = report["events"]
    if result.error is not None and not isinstance(result.error, JobInterrupted):
        err.write(f"recorun: error: {result.error}\n")      # (an interruption: said below)
    failures = report["failed_events"]
    if failures and (args.verbose or len(failures) <= 10):
        for failure in failures:
            where = ("external work" if failure["method"] == "external"
                     else f"{failure['method']}()")
            when = f" {failure['context']}" if failure.get("context") else ""
            err.write(f"recorun: failed event {failure['event']}: {failure.get('what', 'module')} "
                      f"'{failure['label']}' {where}{when}: {failure['error']}\n")
    elif failures:
        err.write(f"recorun: {len(failures)} failed events (-v lists them, and "
                  f"--report-json keeps them)\n")
    if not args.quiet:
        for line in report.get("advice") or []:
            err.write(f"recorun: advice: {line}\n")
    if report["not_processed"]:
        err.write(f"recorun: stopped ({report['stop_reason']}): {report['not_processed']}\n")
    if not args.quiet:
        err.write(f"recorun: {ev['read']} events read: {ev['accepted']} accepted, "
                  f"{ev['rejected']} rejected, {ev['failed']} failed; "
                  f"{report['throughput_hz']:.1f} events/s\n")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
