"""``recorun-server``: serve the paper's models with a real Triton server, list them, or write a
Triton model repository for the official container.

    recorun-server [--models facile,deepcalo,resnet50|all] [--address 127.0.0.1]
                   [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
                   [--backend onnxruntime|torch] [--device cpu|cuda] [--instances N]
                   [--threads N] [--max-batch-size N]
                   [--dynamic-batching/--no-dynamic-batching]
                   [--preferred-batch-size N ...] [--max-queue-delay-us N]
                   [--weights-dir DIR] [--onnx-cache DIR|off]
                   [--restricted-endpoints LIST|none] [-v]
    recorun-server --list [--models ...] [--max-batch-size N] [--weights-dir DIR]
    recorun-server export DIR [--models ...] [--max-batch-size N] [--instances N]
                   [--dynamic-batching/--no-dynamic-batching] [--preferred-batch-size N ...]
                   [--max-queue-delay-us N] [--device-kind gpu|cpu] [--weights-dir DIR]
                   [--no-check]

Serving prints exactly one line on stdout, once every model is ready::

    READY grpc=HOST:PORT http=HOST:PORT metrics=HOST:PORT

(port 0 asks for a free port; these are the actual ones). Everything else (tritonserver's log,
the models' origin) goes to stderr. SIGTERM or SIGINT stops the server cleanly (exit 0).

With the onnxruntime backend (the default on CPU) each model is exported to ONNX and checked
against torch the first time, then served from the ONNX cache (``$RECORUN_ONNX_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/recorun/onnx``; ``--onnx-cache DIR|off`` overrides it): a start
from the cache does not import torch (FACILE: READY in ~1.5 s instead of ~7 s on 2 cores). A
stop with nothing in flight unloads the models first and takes ~2 s; with requests in flight
they get 5 s to finish (:meth:`recorun.server.serve.RecorunServer._stop_pytriton`).

Exit codes: 0 stopped by a signal (or export/list done); 1 a model failed to load or the server
failed to start or died; 2 bad options, or the ``server`` extra is not installed
(``pip install 'recorun[server]'``: torch, nvidia-pytriton, onnxruntime, onnx).
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from recorun.model_specs import SPECS, parse_model_names
from recorun.processes import become_subreaper, reap_children

LOG = logging.getLogger("recorun.server")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: not a port (0..65535; 0 = a free one)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must not be negative")
    return value


def _models(text: str) -> tuple[str, ...]:
    try:
        return parse_model_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=_models, default="all",
                        help="comma-separated: facile,deepcalo,resnet50 or all (default: all)")
    parser.add_argument("--max-batch-size", type=_positive, default=None, metavar="N",
                        help="max_batch_size of every model (default: each model's own: "
                        + ", ".join(f"{n} {s.max_batch_size}" for n, s in SPECS.items()) + ")")
    parser.add_argument("--weights-dir", type=_directory, default=None, metavar="DIR",
                        help="read <model>.pt from DIR instead of server/trained "
                             "(a model without one there is initialised from the fixed seed, "
                             "with a warning)")


def _add_batching_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=_positive, default=1, metavar="N",
                        help="model instances (instance_group count) per model (default 1)")
    parser.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction,
                        default=True, help="Triton's dynamic batcher (default: on)")
    parser.add_argument("--preferred-batch-size", type=_positive, nargs="+", action="extend",
                        default=[], metavar="N", dest="preferred_batch_sizes",
                        help="preferred batch sizes of the dynamic batcher; sizes above a "
                             "model's max_batch_size are left out for that model")
    parser.add_argument("--max-queue-delay-us", type=_non_negative, default=0, metavar="N",
                        help="how long the dynamic batcher may hold a request to form a "
                             "larger batch, in microseconds (default 0)")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recorun-server",
        description="Serve the SONIC paper's models (FACILE, DeepCalo, ResNet-50) with a real "
                    "Triton Inference Server (pytriton). Prints 'READY grpc=... http=... "
                    "metrics=...' on stdout when every model is ready. "
                    "Also: 'recorun-server export DIR ...' (see 'recorun-server export -h').",
        epilog="exit codes: 0 stopped by SIGTERM/SIGINT; 1 a model failed to load or the "
               "server failed; 2 bad options")
    _add_model_options(parser)
    parser.add_argument("--list", action="store_true",
                        help="list the models (tensors, max batch, weights' origin) and exit")
    parser.add_argument("--check-options", action="store_true",
                        help="check these options and exit: 0, or 2 with the reason (needs "
                             "neither torch nor pytriton)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to bind gRPC, HTTP and metrics to (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=_port, default=8001, help="0: a free port")
    parser.add_argument("--http-port", type=_port, default=8000, help="0: a free port")
    parser.add_argument("--metrics-port", type=_port, default=8002, help="0: a free port")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default=None,
                        help="run the models with onnxruntime (default on cpu) or torch "
                             "(default on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda needs torch with a CUDA device (default cpu)")
    parser.add_argument("--threads", type=_positive, default=None, metavar="N",
                        help="intra-op threads per instance (default: 2 for one instance, 1 "
                             "each for more, at most cores/instances)")
    _add_batching_options(parser)
    parser.add_argument("--onnx-cache", default=None, metavar="DIR|off",
                        help="where checked ONNX exports are kept between starts, or 'off' "
                             "(default: $RECORUN_ONNX_CACHE, else "
                             "${XDG_CACHE_HOME:-~/.cache}/recorun/onnx)")
    parser.add_argument("--restricted-endpoints", default=None, metavar="LIST",
                        help="Triton endpoints kept behind pytriton's access token, "
                             "comma-separated, or 'none' (default: model-repository,"
                             "trace,logging)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv: tritonserver --log-verbose 1)")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recorun-server export",
        description="Write a Triton model repository for the official Triton container's "
                    "onnxruntime backend: DIR/<model>/config.pbtxt and DIR/<model>/1/model.onnx "
                    "(weights inside the file), each checked against torch with onnxruntime.")
    parser.add_argument("directory", type=Path, metavar="DIR")
    _add_model_options(parser)
    _add_batching_options(parser)
    parser.add_argument("--device-kind", choices=("gpu", "cpu"), default="gpu",
                        help="instance_group kind: KIND_GPU (default) or KIND_CPU")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip running each model.onnx against torch")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("recorun").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    for name in ("pytriton", "tritonclient", "torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _list(args) -> int:
    from .serve import describe_models

    def shape(t):
        return f"{t[0]} [-1, {', '.join(map(str, t[1]))}] {t[2]}"

    rows = describe_models(args.models, max_batch_size=args.max_batch_size,
                           weights_dir=args.weights_dir)
    for row in rows:
        print(f"{row['name']}")
        for t in row["inputs"]:
            print(f"  input   {shape(t)}")
        for t in row["outputs"]:
            print(f"  output  {shape(t)}")
        print(f"  max_batch_size {row['max_batch_size']}; the paper's batch per event "
              f"{row['event_batch']}")
        print(f"  weights {row['origin']}")
    unusable = [row["name"] for row in rows if row["origin"].startswith("UNUSABLE")]
    if unusable:
        print(f"recorun-server: unusable weights for {', '.join(unusable)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _export(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .export import ExportError, TritonModelOptions, write_repository
    from .serve import ModelLoadError, load_weights

    options = TritonModelOptions(
        max_batch_size=args.max_batch_size, instances=args.instances,
        dynamic_batching=args.dynamic_batching,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes),
        max_queue_delay_us=args.max_queue_delay_us, device_kind=args.device_kind)
    try:
        written = write_repository(args.directory, args.models, options,
                                   load=lambda name: load_weights(name, args.weights_dir),
                                   check=args.check)
    except (ExportError, ModelLoadError) as exc:
        print(f"recorun-server export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for model_dir in written:
        print(model_dir)
    return EXIT_OK


class _Stop(BaseException):
    """Raised by the SIGTERM/SIGINT handler in the main thread: leave serving, clean up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _ports_in_use(args) -> list[str]:
    """The ports asked for (not 0) that another process holds on ``--address``."""
    taken = []
    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port),
                       ("--metrics-port", args.metrics_port)):
        if not port:
            continue
        family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind
            try:
                probe.bind((args.address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken.append(f"{flag} {port}")
    return taken


def _serve(args) -> int:
    from .serve import (
        DEFAULT_RESTRICTED_ENDPOINTS,
        ConfigurationError,
        ModelLoadError,
        RecorunServer,
        ServerError,
        ServerOptions,
        ServerStartError,
    )

    if args.restricted_endpoints is None:
        restricted = DEFAULT_RESTRICTED_ENDPOINTS
    elif args.restricted_endpoints.strip().lower() == "none":
        restricted = ()
    else:
        restricted = tuple(e.strip() for e in args.restricted_endpoints.split(",") if e.strip())
    options = ServerOptions(
        models=args.models, address=args.address, grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port, backend=args.backend,
        device=args.device, instances=args.instances, threads=args.threads,
        max_batch_size=args.max_batch_size, dynamic_batching=args.dynamic_batching,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes),
        max_queue_delay_us=args.max_queue_delay_us, weights_dir=args.weights_dir,
        onnx_cache=args.onnx_cache, restricted_endpoints=restricted,
        log_verbose=1 if args.verbose > 1 else 0)
    taken = _ports_in_use(args)
    if taken:
        print(f"recorun-server: port in use on {args.address}: {', '.join(taken)} (another "
              f"server listens there; pick another port, or 0 for a free one)", file=sys.stderr)
        return EXIT_USAGE
    # what the server and the processes it starts create (pytriton's shared-memory segments,
    # its workspace) is for this user only
    os.umask(0o077)
    # the python backend's helpers outlive their parents for a moment when they stop: they
    # become this process's children, and it waits for them before it exits
    become_subreaper()
    try:
        server = RecorunServer(options, log=sys.stderr)
    except ConfigurationError as exc:
        print(f"recorun-server: {exc}", file=sys.stderr)
        return EXIT_USAGE

    # pytriton prints tritonserver's output with print(): keep stdout for the READY line.
    ready_out, sys.stdout = sys.stdout, sys.stderr
    stopping = False
    received: list[int] = []

    def on_signal(signum, _frame):
        nonlocal stopping
        received.append(signum)
        if stopping:
            return                    # already stopping: finish cleaning up
        stopping = True
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = EXIT_FAILED
    try:
        endpoints = server.start()
        if received:                  # the exception was swallowed on the way (e.g. by gRPC)
            raise _Stop(received[0])
        LOG.info("every model ready in %.1f s (models %.1f s, tritonserver %.1f s of which "
                 "%.1f s until it answered); origin published in the model config: %s",
                 server.timings["ready_s"], server.timings["models_s"],
                 server.timings["triton_s"], server.timings.get("live_s", 0.0),
                 "yes" if server.parameters_published else "no")
        print(endpoints.ready_line(), file=ready_out, flush=True)
        while server.is_alive():
            time.sleep(0.2)
        print("recorun-server: tritonserver stopped on its own", file=sys.stderr)
    except _Stop as stop:
        LOG.info("%s received: stopping", signal.Signals(stop.signum).name)
        code = EXIT_OK
    except ModelLoadError as exc:
        print(f"recorun-server: a model failed to load: {exc}", file=sys.stderr)
    except ServerStartError as exc:
        print(f"recorun-server: {exc}", file=sys.stderr)
    except ServerError as exc:
        print(f"recorun-server: {exc}", file=sys.stderr)
    finally:
        stopping = True
        try:
            server.stop()
            reap_children()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sys.stdout = ready_out
    if code == EXIT_OK:
        LOG.info("stopped cleanly")
    return code


#: the packages (import name: distribution) each command needs; the ``server`` extra has them
NEEDS = {"serve": {"torch": "torch", "pytriton": "nvidia-pytriton", "onnxruntime": "onnxruntime"},
         "export": {"torch": "torch", "onnx": "onnx", "onnxscript": "onnxscript",
                    "onnxruntime": "onnxruntime"},
         "list": {"torch": "torch"}}


def _missing(command: str) -> str | None:
    """What ``command`` needs and is not installed here, as a message; None if nothing."""
    for package, distribution in NEEDS[command].items():
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"recorun-server needs the Python package '{distribution}', which is not "
                    f"installed: pip install 'recorun[server]'")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "export" if argv and argv[0] == "export" else "list" if "--list" in argv \
        else "serve"
    if "--check-options" in argv and command == "serve":
        serve_parser().parse_args(argv)                 # exits 2 with argparse's message
        return EXIT_OK
    if "-h" not in argv and "--help" not in argv:
        missing = _missing(command)
        if missing:
            print(missing, file=sys.stderr)
            return EXIT_USAGE
    if command == "export":
        return _export(argv[1:])
    args = serve_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.list:
        return _list(args)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
