"""recorun-server: the paper's models behind a real Triton Inference Server (pytriton).

:class:`RecorunServer` loads the models (:mod:`recorun.server.weights`), prepares one runtime per model
instance, starts ``tritonserver`` through pytriton (its python backend hands each batch to an
inference callable in this process) and checks that every model is ready. ``recorun-server``
(:mod:`recorun.server.cli`) is its command line; tests and the framework's fallback server run that
command as a subprocess.

What it takes care of, so that nothing in the user's environment needs setting:

- ``PYTRITON_HOME`` and pytriton's workspace live in a temporary directory that the server owns
  (``recorun-server-*`` under ``$TMPDIR``) and removes when it stops; the ONNX exports and
  torch's caches go there too.
- ``LD_LIBRARY_PATH`` starts with the running interpreter's ``LIBDIR`` when tritonserver starts:
  the python backend's stub links ``libpython3.11.so`` and must get the one whose standard
  library it imports (else models fail with ``'_thread.RLock' object has no attribute
  '_recursion_count'``).
- Port 0 means a free port, chosen here (Triton itself cannot report one it chose); the actual
  ports are in :class:`Endpoints`. Everything binds to 127.0.0.1 unless told otherwise.
- pytriton protects some endpoints with a random access token; recorun-server keeps
  model-repository, shared-memory, trace and logging protected and opens ``statistics`` (so
  ``get_inference_statistics`` works), see :data:`DEFAULT_RESTRICTED_ENDPOINTS`.
- tritonserver's own log goes to the server's log stream (stderr for the command), not stdout.

Backends: ``onnxruntime`` (the default on CPU; the model exported to ONNX at start by
:func:`recorun.server.export.export_onnx` and checked against torch) or ``torch`` (eager, in
``inference_mode``; the default with ``device="cuda"``). Threads: each onnxruntime instance has
its own intra-op pool of ``threads`` non-spinning threads; torch's intra-op pool is one per
process, set to ``threads`` and shared by the instances. The default, :func:`default_threads`,
is 2 threads for one instance and 1 per instance beyond, never more than the cores divided by
the instances: a server shares its machine with its clients.

pytriton and tritonclient are imported here, lazily (after ``PYTRITON_HOME`` is set). Nothing
here imports the framework.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from recorun.model_specs import SPECS, ModelSpec, parse_model_names
from recorun.processes import descendants

from . import weights as weights_module
from .export import (
    check_onnx,
    environment,
    export_onnx,
    import_onnxruntime,
    onnx_session,
    preferred_sizes_for,
)
from .models import make_model

LOG = logging.getLogger("recorun.server")

ALL_MODELS: tuple[str, ...] = tuple(SPECS)
BACKENDS = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")

#: endpoints pytriton's access token keeps closed: loading/unloading models, registering shared
#: memory, traces and log settings stay with pytriton. ``statistics`` is open (pytriton would
#: close it too), so that clients can read queue and compute times with
#: ``get_inference_statistics``. Triton's names: health, metadata, inference, shared-memory,
#: model-config, model-repository, statistics, trace, logging.
DEFAULT_RESTRICTED_ENDPOINTS: tuple[str, ...] = ("model-repository", "shared-memory", "trace",
                                                 "logging")

TRITON_ENDPOINTS = ("health", "metadata", "inference", "shared-memory", "model-config",
                    "model-repository", "statistics", "trace", "logging")

#: model config parameters that recorun-server publishes with each model (``parameters`` in
#: ``get_model_config``), if pytriton lets it (see :meth:`RecorunServer._publish_parameters`).
ORIGIN_PARAMETER = "weights_origin"
RUNTIME_PARAMETER = "recorun_runtime"

READY_TIMEOUT_S = 120.0
PORT_ATTEMPTS = 3          # free ports chosen here can be taken before tritonserver binds them
STOP_TIMEOUT_S = 20.0       # pytriton's stop, after which its processes are killed
EXIT_TIMEOUT_S = 5          # tritonserver --exit-timeout-secs: in-flight requests at shutdown


class ServerError(RuntimeError):
    """recorun-server could not start, or stopped on its own."""


class ConfigurationError(ServerError):
    """The options are inconsistent, or ask for something this machine cannot do."""


class ModelLoadError(ServerError):
    """A model could not be loaded, exported or prepared."""


class ServerStartError(ServerError):
    """tritonserver did not start, or did not load every model; ``log`` has its output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def default_threads(instances: int = 1) -> int:
    """Intra-op threads per model instance by default: 2 for a single instance, else 1, and at
    most the machine's cores divided by the instances (at least 1)."""
    cores = os.cpu_count() or 1
    wanted = 2 if instances <= 1 else 1
    return max(1, min(wanted, cores // max(1, instances)))


def parse_models(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"facile,deepcalo"`` or ``"all"`` (or a list of such) as a tuple of model names."""
    try:
        return parse_model_names(text)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


@dataclass
class ServerOptions:
    """Everything ``recorun-server`` takes on its command line (see :mod:`recorun.server.cli`)."""

    models: tuple[str, ...] = ALL_MODELS
    address: str = "127.0.0.1"
    grpc_port: int = 8001                 # 0: a free port
    http_port: int = 8000
    metrics_port: int = 8002
    backend: str | None = None            # None: onnxruntime on the CPU, torch on CUDA
    device: str = "cpu"
    instances: int = 1
    threads: int | None = None            # None: default_threads(instances)
    max_batch_size: int | None = None     # None: each model's SPECS value
    dynamic_batching: bool = True
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    weights_dir: Path | None = None       # None: server/trained (recorun.server.weights)
    restricted_endpoints: tuple[str, ...] = DEFAULT_RESTRICTED_ENDPOINTS
    log_verbose: int = 0                  # tritonserver --log-verbose
    ready_timeout_s: float = READY_TIMEOUT_S

    def resolved_backend(self) -> str:
        return self.backend or ("torch" if self.device == "cuda" else "onnxruntime")

    def resolved_threads(self) -> int:
        return int(self.threads) if self.threads else default_threads(self.instances)

    def max_batch_for(self, spec: ModelSpec) -> int:
        return int(self.max_batch_size or spec.max_batch_size)

    def validate(self) -> None:
        self.models = parse_models(self.models)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigurationError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            raise ConfigurationError(f"device must be one of {', '.join(DEVICES)}")
        for label, port in (("grpc", self.grpc_port), ("http", self.http_port),
                            ("metrics", self.metrics_port)):
            if not 0 <= int(port) <= 65535:
                raise ConfigurationError(f"--{label}-port {port}: not a port (0 = a free one)")
        fixed = [p for p in (self.grpc_port, self.http_port, self.metrics_port) if p]
        if len(set(fixed)) != len(fixed):
            raise ConfigurationError("the grpc, http and metrics ports must differ")
        if self.instances < 1:
            raise ConfigurationError("--instances must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigurationError("--threads must be at least 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigurationError("--max-batch-size must be at least 1")
        if any(int(p) < 1 for p in self.preferred_batch_sizes):
            raise ConfigurationError("preferred batch sizes must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ConfigurationError("--max-queue-delay-us must not be negative")
        unknown = set(self.restricted_endpoints) - set(TRITON_ENDPOINTS)
        if unknown:
            raise ConfigurationError(f"unknown endpoints {sorted(unknown)} (Triton's: "
                                     f"{', '.join(TRITON_ENDPOINTS)})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(
                "--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                "use --device cpu")


@dataclass(frozen=True)
class Endpoints:
    """Where a started server listens."""

    address: str
    grpc_port: int
    http_port: int
    metrics_port: int

    @property
    def grpc(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def metrics(self) -> str:
        return f"{self.address}:{self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics}/metrics"

    def ready_line(self) -> str:
        """The line ``recorun-server`` prints on stdout once every model is ready."""
        return f"READY grpc={self.grpc} http={self.http} metrics={self.metrics}"

    @classmethod
    def parse_ready_line(cls, line: str) -> Endpoints:
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        hosts = {k: v.rsplit(":", 1) for k, v in fields.items()}
        return cls(hosts["grpc"][0], int(hosts["grpc"][1]), int(hosts["http"][1]),
                   int(hosts["metrics"][1]))


def free_ports(address: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``address`` now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
            sock.bind((address, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- models -----------------------------------------------------------------------------------

def load_weights(name: str, weights_dir: str | os.PathLike | None = None
                 ) -> tuple[torch.nn.Module, str]:
    """The model ``name`` in eval mode on the CPU and its weights' origin.

    Without ``weights_dir`` these are :func:`recorun.server.weights.load_model` and
    :func:`recorun.server.weights.origin`. With it, ``weights_dir/<name>.pt`` (the checkpoint format of
    ``recorun.server.train``: ``state_dict`` and ``origin``) when it exists, else the seeded
    initialisation. Raises :class:`ModelLoadError` when the checkpoint cannot be used."""
    if name not in SPECS:
        raise ModelLoadError(f"no model '{name}' (models: {', '.join(ALL_MODELS)})")
    directory = Path(weights_dir) if weights_dir is not None else weights_module.WEIGHTS_DIR
    path = directory / f"{name}.pt"
    try:
        if weights_dir is None:
            return weights_module.load_model(name), weights_module.origin(name)
        torch.manual_seed(weights_module.INIT_SEED)
        if not path.exists():
            return (make_model(name).eval(),
                    f"untrained: initialised from torch.manual_seed({weights_module.INIT_SEED})")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = make_model(name)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval(), str(checkpoint["origin"])
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model '{name}': cannot load its weights from {path}: "
                             f"{type(exc).__name__}: {exc}") from exc


class OnnxRunner:
    """One model instance on onnxruntime."""

    def __init__(self, path: Path, spec: ModelSpec, *, threads: int, device: str = "cpu"):
        self.session = onnx_session(path, threads=threads, device=device)
        self.input = spec.inputs[0].name
        self.dtype = np.dtype(spec.inputs[0].dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        return self.session.run(None, {self.input: x})[0]


class TorchRunner:
    """One model instance on torch (eager, ``inference_mode``); instances share the module,
    whose forward pass does not change it."""

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
        return out.cpu().numpy()


@dataclass
class PreparedModel:
    """A model ready to bind: its runners (one per instance) and what the server says of it."""

    spec: ModelSpec
    origin: str
    runtime: str
    runners: list[Callable[[np.ndarray], np.ndarray]]
    max_batch_size: int
    preferred_batch_sizes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def prepare_models(options: ServerOptions, workdir: Path) -> list[PreparedModel]:
    """Load every model of ``options`` and build its runners; ONNX exports go to
    ``workdir/onnx``. Raises :class:`ModelLoadError` naming the model that failed."""
    backend, threads = options.resolved_backend(), options.resolved_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):       # only before torch's first parallel work
        torch.set_num_interop_threads(1)
    prepared = []
    for name in options.models:
        spec = SPECS[name]
        start = time.perf_counter()
        model, origin = load_weights(name, options.weights_dir)
        try:
            if backend == "onnxruntime":
                path = export_onnx(name, model, workdir / "onnx" / name / "model.onnx")
                check_onnx(name, model, path)
                runners = [OnnxRunner(path, spec, threads=threads, device=options.device)
                           for _ in range(options.instances)]
                onnxruntime = import_onnxruntime()
                provider = runners[0].session.get_providers()[0]
                runtime = (f"onnxruntime {onnxruntime.__version__} ({provider}), "
                           f"{threads} intra-op thread(s) per instance")
            else:
                runner = TorchRunner(model, device=options.device)
                runners = [runner] * options.instances
                runtime = (f"torch {torch.__version__} eager on {options.device}, "
                           f"{threads} intra-op thread(s) per process")
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model '{name}': cannot prepare the {backend} backend: "
                                 f"{type(exc).__name__}: {exc}") from exc
        max_batch = options.max_batch_for(spec)
        preferred = preferred_sizes_for(max_batch, options.preferred_batch_sizes)
        dropped = sorted(set(options.preferred_batch_sizes) - set(preferred))
        if options.dynamic_batching and dropped:
            LOG.warning("%s: preferred batch sizes %s exceed its max_batch_size %d: not used",
                        name, dropped, max_batch)
        prepared.append(PreparedModel(spec, origin, runtime, runners, max_batch, preferred))
        LOG.info("%s: ready in %.1f s; %s; weights: %s", name, time.perf_counter() - start,
                 runtime, origin)
    return prepared


def _infer_function(model: PreparedModel, runner) -> Callable:
    """The pytriton inference callable of one instance: batches of requests concatenated
    (pytriton's ``@batch``), run, split back."""
    from pytriton.decorators import batch

    input_name, output_name = model.spec.inputs[0].name, model.spec.outputs[0].name

    @batch
    def infer(**inputs):
        return {output_name: runner(inputs[input_name])}

    infer.__name__ = f"infer_{model.name}"
    return infer


# --- the server -------------------------------------------------------------------------------

def _libpython_path() -> str:
    """LD_LIBRARY_PATH with the running interpreter's LIBDIR first (pitfall 1)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(p for p in (libdir, rest) if p)


class RecorunServer:
    """A Triton server for some of the paper's models, run by pytriton in this process.

    ``start()`` returns the :class:`Endpoints` once every model is ready (raises
    :class:`ModelLoadError` or :class:`ServerStartError` otherwise, leaving nothing behind);
    ``stop()`` stops tritonserver and its helpers and removes the temporary directory. Also a
    context manager. ``log`` receives tritonserver's output (default: ``sys.stderr``)."""

    def __init__(self, options: ServerOptions | None = None, *, log: TextIO | None = None):
        self.options = options or ServerOptions()
        self.options.validate()
        self._log = log
        self._tmp: Path | None = None
        self._triton = None
        self._lock = threading.Lock()
        self.endpoints: Endpoints | None = None
        self.models: list[PreparedModel] = []
        self.parameters_published = False
        self.timings: dict[str, float] = {}
        self._chosen_ports: set[int] = set()
        self._saved_home: str | None = None
        self._last_logs = ""

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> Endpoints:
        began = time.perf_counter()
        self._tmp = Path(tempfile.mkdtemp(prefix="recorun-server-"))
        try:
            home = self._tmp / "pytriton-home"
            home.mkdir()
            self._saved_home = os.environ.get("PYTRITON_HOME")
            os.environ["PYTRITON_HOME"] = str(home)     # read once, when pytriton is imported
            LOG.info("work directory %s (PYTRITON_HOME, pytriton's workspace, ONNX exports; "
                     "removed at exit)", self._tmp)
            self.models = prepare_models(self.options, self._tmp)
            self.timings["models_s"] = time.perf_counter() - began
            for model in self.models:
                LOG.info("%s: max_batch_size %d, dynamic batching %s%s, %d instance(s)",
                         model.name, model.max_batch_size,
                         "on" if self.options.dynamic_batching else "off",
                         (f" (preferred {model.preferred_batch_sizes}, max queue delay "
                          f"{self.options.max_queue_delay_us} us)"
                          if self.options.dynamic_batching else ""), len(model.runners))
            for attempt in range(PORT_ATTEMPTS):
                try:
                    self.endpoints = self._start_triton(attempt)
                    break
                except ServerStartError as exc:
                    if attempt + 1 >= PORT_ATTEMPTS or not self._chosen_port_taken(exc.log):
                        raise
                    LOG.warning("a free port was taken before tritonserver bound it: retrying")
                    self._stop_triton()
            self.timings["ready_s"] = time.perf_counter() - began
            return self.endpoints
        except ServerStartError as exc:
            self.stop()
            exc.log = self.logs() or exc.log      # complete now that tritonserver has exited
            raise
        except BaseException:
            self.stop()
            raise

    def is_alive(self) -> bool:
        triton = self._triton
        return triton is not None and triton.is_alive()

    def logs(self) -> str:
        """tritonserver's output so far (of the last one, once stopped)."""
        server = getattr(self._triton, "_triton_server", None)
        return server.logs() if server is not None else self._last_logs

    def stop(self) -> None:
        with self._lock:
            self._stop_triton()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
                if self._saved_home is None:
                    os.environ.pop("PYTRITON_HOME", None)
                else:
                    os.environ["PYTRITON_HOME"] = self._saved_home

    def __enter__(self) -> RecorunServer:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------------
    def _stop_triton(self) -> None:
        triton, self._triton = self._triton, None
        if triton is not None:
            stopper = threading.Thread(target=self._stop_pytriton, args=(triton,),
                                       name="pytriton-stop", daemon=True)
            stopper.start()
            stopper.join(STOP_TIMEOUT_S)
            if stopper.is_alive():               # a helper died under it (a Ctrl-C to the
                LOG.warning("pytriton did not stop within %.0f s: killing the processes "
                            "it started", STOP_TIMEOUT_S)      # whole group): do not hang
                for pid in descendants(os.getpid()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stopper.join(5.0)
            server = getattr(triton, "_triton_server", None)
            self._last_logs = server.logs() if server is not None else ""

    @staticmethod
    def _stop_pytriton(triton) -> None:
        try:
            triton.stop()
        except Exception as exc:                  # still remove what we own
            LOG.warning("stopping tritonserver: %s: %s", type(exc).__name__, exc)

    def _chosen_port_taken(self, log: str) -> bool:
        """Whether tritonserver failed because a port chosen here (for port 0) was in use."""
        busy = [line for line in log.splitlines() if "already in use" in line]
        return any(f":{port}" in line for port in self._chosen_ports for line in busy)

    def _ports(self) -> tuple[int, int, int]:
        o = self.options
        wanted = [o.grpc_port, o.http_port, o.metrics_port]
        taken = {p for p in wanted if p}
        spare = iter(p for p in free_ports(o.address, 6) if p not in taken)
        ports = tuple(p or next(spare) for p in wanted)
        self._chosen_ports = {p for p, w in zip(ports, wanted) if not w}
        return ports

    def _start_triton(self, attempt: int = 0) -> Endpoints:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        o = self.options
        grpc_port, http_port, metrics_port = self._ports()
        endpoints = Endpoints(o.address, grpc_port, http_port, metrics_port)
        config = TritonConfig(
            http_address=o.address, http_port=http_port, grpc_address=o.address,
            grpc_port=grpc_port, metrics_address=o.address, metrics_port=metrics_port,
            allow_http=True, allow_grpc=True, allow_metrics=True, allow_cpu_metrics=True,
            allow_gpu_metrics=o.device == "cuda", strict_readiness=True, exit_on_error=True,
            exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=o.log_verbose or None)
        security = TritonSecurityConfig(restricted_endpoints=list(o.restricted_endpoints))
        triton = Triton(config=config, workspace=self._tmp / f"workspace-{attempt}",
                        security_config=security)
        self._triton = triton
        for model in self.models:
            batcher = (DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us,
                                      preferred_batch_size=model.preferred_batch_sizes or None)
                       if o.dynamic_batching else None)
            spec = model.spec
            triton.bind(
                model_name=model.name,
                infer_func=[_infer_function(model, r) for r in model.runners],
                inputs=[Tensor(name=t.name, dtype=np.dtype(t.dtype).type, shape=t.shape)
                        for t in spec.inputs],
                outputs=[Tensor(name=t.name, dtype=np.dtype(t.dtype).type, shape=t.shape)
                         for t in spec.outputs],
                config=ModelConfig(batching=True, max_batch_size=model.max_batch_size,
                                   batcher=batcher),
                strict=False)
        self.parameters_published = self._publish_parameters(triton)
        if not self.parameters_published:
            LOG.warning("pytriton did not let recorun-server add model config parameters; "
                        "the weights' origin is only in this log and in recorun-server --list")

        began = time.perf_counter()
        with environment(LD_LIBRARY_PATH=_libpython_path()):
            self._launch(triton)
        deadline = began + o.ready_timeout_s
        self._wait_live(triton, endpoints, deadline)
        try:
            triton.connect()                      # pytriton loads the models over HTTP
        except Exception as exc:
            raise ServerStartError(f"tritonserver did not load the models: "
                                   f"{type(exc).__name__}: {exc}", self.logs()) from exc
        self._wait_models_ready(triton, endpoints, deadline)
        self.timings["triton_s"] = time.perf_counter() - began
        return endpoints

    def _publish_parameters(self, triton) -> bool:
        """Add the weights' origin and the runtime to each model's config ``parameters``.

        pytriton 0.7 has no public way to set model config parameters (its ``ModelConfig`` has
        none; it fills ``parameters`` with its own ``workspace-path``): this adds entries to the
        generated config of each bound model, through pytriton internals, before the models
        are loaded. Returns False, changing nothing, if those internals are not as expected."""
        try:
            by_name = {m.model_name: m for m in triton._model_manager.models}
            configs = {p.name: by_name[p.name]._get_triton_model_config() for p in self.models}
            if not all(isinstance(c.backend_parameters, dict) for c in configs.values()):
                return False
        except Exception:                         # noqa: BLE001 - internals changed
            return False
        for model in self.models:
            configs[model.name].backend_parameters[ORIGIN_PARAMETER] = model.origin
            configs[model.name].backend_parameters[RUNTIME_PARAMETER] = model.runtime
        return True

    def _launch(self, triton) -> None:
        """Start tritonserver, its output going to the log stream rather than stdout."""
        triton._initialize_server()
        server = triton._triton_server
        stream = self._log

        def record(line):
            if isinstance(line, bytes):
                line = line.decode("utf-8", errors="replace")
            server._tritonserver_logs += line
            out = stream if stream is not None else sys.stderr
            with contextlib.suppress(Exception):
                out.write(line)
                out.flush()

        server._record_logs = record
        triton._run_server()

    def _wait_live(self, triton, endpoints: Endpoints, deadline: float) -> None:
        """Wait until tritonserver answers on gRPC, failing fast if it exits."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(endpoints.grpc)
        try:
            while True:
                if not triton._triton_server.is_alive():
                    raise ServerStartError(
                        f"tritonserver exited while starting (ports grpc {endpoints.grpc_port}, "
                        f"http {endpoints.http_port}, metrics {endpoints.metrics_port})",
                        self.logs())
                with contextlib.suppress(Exception):
                    if client.is_server_live(client_timeout=1.0):
                        return
                if time.perf_counter() > deadline:
                    raise ServerStartError("tritonserver did not come up in "
                                           f"{self.options.ready_timeout_s:.0f} s", self.logs())
                time.sleep(0.05)
        finally:
            client.close()

    def _wait_models_ready(self, triton, endpoints: Endpoints, deadline: float) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(endpoints.grpc)
        try:
            waiting = [m.name for m in self.models]
            while waiting:
                if not triton.is_alive():
                    raise ServerStartError("tritonserver stopped while loading the models",
                                           self.logs())
                with contextlib.suppress(Exception):
                    waiting = [n for n in waiting
                               if not client.is_model_ready(n, client_timeout=1.0)]
                if not waiting:
                    return
                if time.perf_counter() > deadline:
                    raise ServerStartError(f"models not ready in "
                                           f"{self.options.ready_timeout_s:.0f} s: "
                                           f"{', '.join(waiting)}", self.logs())
                time.sleep(0.05)
        finally:
            client.close()


def describe_models(models: Sequence[str] = ALL_MODELS, *, max_batch_size: int | None = None,
                    weights_dir: str | os.PathLike | None = None) -> list[dict]:
    """What ``recorun-server --list`` prints: per model its tensors, max batch, the paper's
    batch per event and the weights' origin."""
    rows = []
    for name in parse_models(models):
        spec = SPECS[name]
        if weights_dir is None:
            origin = weights_module.origin(name)
        else:
            try:
                origin = load_weights(name, weights_dir)[1]
            except ModelLoadError as exc:
                origin = f"UNUSABLE: {exc}"
        rows.append({
            "name": name,
            "inputs": [(t.name, t.shape, t.dtype) for t in spec.inputs],
            "outputs": [(t.name, t.shape, t.dtype) for t in spec.outputs],
            "max_batch_size": int(max_batch_size or spec.max_batch_size),
            "event_batch": spec.event_batch,
            "origin": origin,
        })
    return rows
