"""recorun-server: the paper's models behind a real Triton Inference Server (pytriton).

:class:`RecorunServer` loads the models (:mod:`recorun.server.weights`), prepares one runtime per model
instance, starts ``tritonserver`` through pytriton (its python backend hands each batch to an
inference callable in this process) and checks that every model is ready. ``recorun-server``
(:mod:`recorun.server.cli`) is its command line; tests and the framework's fallback server run that
command as a subprocess.

What it takes care of, so that nothing in the user's environment needs setting:

- ``PYTRITON_HOME`` and pytriton's workspace live in a temporary directory that the server owns
  (``recorun-server-*`` under ``$TMPDIR``) and removes when it stops; fresh ONNX exports and
  torch's caches go there too (a checked export is then copied into the ONNX cache, the one
  thing the server keeps: ``~/.cache/recorun/onnx``, see :mod:`recorun.server.onnx_cache`).
- ``LD_LIBRARY_PATH`` starts with the running interpreter's ``LIBDIR`` when tritonserver starts:
  the python backend's stub links ``libpython3.11.so`` and must get the one whose standard
  library it imports (else models fail with ``'_thread.RLock' object has no attribute
  '_recursion_count'``).
- Port 0 means a free port, chosen here (Triton itself cannot report one it chose); the actual
  ports are in :class:`Endpoints`. Everything binds to 127.0.0.1 unless told otherwise.
- pytriton protects some endpoints with a random access token; recorun-server keeps
  model-repository, trace and logging protected and opens ``statistics`` (so
  ``get_inference_statistics`` works) and ``shared-memory`` (so that clients on this host can
  send tensors through system shared memory, ``transport: shm``), see
  :data:`DEFAULT_RESTRICTED_ENDPOINTS`.
- tritonserver's own log goes to the server's log stream (stderr for the command), not stdout.

Backends: ``onnxruntime`` (the default on CPU; the model exported to ONNX by
:func:`recorun.server.export.export_onnx` and checked against torch the first time, then served
from the ONNX cache, :mod:`recorun.server.onnx_cache`, without importing torch) or ``torch``
(eager, in ``inference_mode``; the default with ``device="cuda"``). Threads: each onnxruntime instance has
its own intra-op pool of ``threads`` non-spinning threads; torch's intra-op pool is one per
process, set to ``threads`` and shared by the instances. The default, :func:`default_threads`,
is 2 threads for one instance and 1 per instance beyond, never more than the cores divided by
the instances: a server shares its machine with its clients.

Start and stop, and what they cost (FACILE, 2 cores): see :meth:`RecorunServer.start` and
:meth:`RecorunServer._stop_pytriton`; server/README.md has the figures.

pytriton, tritonclient and torch are imported here lazily (pytriton after ``PYTRITON_HOME`` is
set; torch only to export a model or to run the torch backend). Nothing here imports the
framework.
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

from recorun.model_specs import SPECS, ModelSpec, parse_model_names
from recorun.processes import descendants

from . import weights as weights_module
from .export import (
    CHECK_SEED,
    check_onnx,
    environment,
    export_onnx,
    import_onnxruntime,
    onnx_session,
    preferred_sizes_for,
    torch_reference,
)
from .onnx_cache import OnnxCache, export_fingerprint

LOG = logging.getLogger("recorun.server")

ALL_MODELS: tuple[str, ...] = tuple(SPECS)
BACKENDS = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")

#: endpoints pytriton's access token keeps closed: loading/unloading models, traces and log
#: settings stay with pytriton. ``statistics`` and ``shared-memory`` are open (pytriton would
#: close them too), so that clients can read queue and compute times with
#: ``get_inference_statistics`` and register system shared-memory regions (``transport: shm``;
#: docs/SECURITY.md). Triton's names: health, metadata, inference, shared-memory,
#: model-config, model-repository, statistics, trace, logging.
DEFAULT_RESTRICTED_ENDPOINTS: tuple[str, ...] = ("model-repository", "trace", "logging")

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
#: how long a stop with nothing in flight waits for the models to unload (the python backend
#: takes ~1-2 s per model instance) before it stops tritonserver the slow way
UNLOAD_TIMEOUT_S = 15.0
POLL_S = 0.02               # polling period of the start and stop waits
#: tritonserver --metrics-interval-ms: how often it samples CPU (and GPU) use. Its sampling
#: thread sleeps this long between samples and tritonserver joins it when it exits: the
#: default, 2000, kept each stop waiting ~0.5-1 s for nothing. Inference counters and queue
#: gauges are updated as requests go, whatever this is.
METRICS_INTERVAL_MS = 100
#: how often pytriton's request loop in a model's stub checks whether it must stop (pytriton
#: itself: every second; see :meth:`RecorunServer._quicker_stub_stop`)
STUB_STOP_CHECK_S = 0.1


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
    onnx_cache: str | None = None         # None: $RECORUN_ONNX_CACHE or ~/.cache/recorun/onnx;
                                          # "off": none (recorun.server.onnx_cache)
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
        if self.device == "cuda" and not _torch().cuda.is_available():
            torch = _torch()
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

def _torch():
    """torch, imported on first use: a server whose models all come from the ONNX cache never
    imports it (~1.5 s of a start on a small machine)."""
    import torch

    return torch


def load_weights(name: str, weights_dir: str | os.PathLike | None = None) -> tuple[object, str]:
    """The model ``name`` (a ``torch.nn.Module``) in eval mode on the CPU and its weights' origin.

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
        if not path.exists():
            LOG.warning("model '%s': no %s in --weights-dir %s: serving the untrained "
                        "initialisation (torch.manual_seed(%d))", name, path.name, directory,
                        weights_module.INIT_SEED)
            return (weights_module.model_from_checkpoint(name, None),
                    f"untrained: initialised from torch.manual_seed({weights_module.INIT_SEED})")
        try:
            checkpoint = weights_module.read_checkpoint(path)
        except weights_module.WeightsError as exc:
            raise ModelLoadError(f"model '{name}': {exc}") from exc
        return (weights_module.model_from_checkpoint(name, checkpoint, str(path)),
                str(checkpoint.get("origin", "?")))
    except ModelLoadError:
        raise
    except weights_module.WeightsError as exc:
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:
        raise ModelLoadError(f"model '{name}': cannot load its weights from {path}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _drain_output(server) -> None:
    """Wait (at most ~2 s) until pytriton has read all the output of its exited tritonserver:
    the process is seen dead before its reader thread has passed on the last lines, which say
    why it exited (e.g. a port already in use, which a start retries)."""
    process = getattr(getattr(server, "_tritonserver_running_cmd", None), "process", None)
    try:
        if process is not None:
            process.wait()      # sh's OProc: reaps the child, joins its output readers
    except Exception as exc:    # noqa: BLE001 - the logs are then what was read so far
        LOG.debug("tritonserver's output not drained: %s", exc)


class OnnxRunner:
    """One model instance on onnxruntime; ``model`` is an ONNX file or the bytes of one."""

    def __init__(self, model: Path | bytes, spec: ModelSpec, *, threads: int,
                 device: str = "cpu"):
        self.session = onnx_session(model, threads=threads, device=device)
        self.input = spec.inputs[0].name
        self.dtype = np.dtype(spec.inputs[0].dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        return self.session.run(None, {self.input: x})[0]


class TorchRunner:
    """One model instance on torch (eager, ``inference_mode``); instances share the module,
    whose forward pass does not change it."""

    def __init__(self, model, *, device: str = "cpu"):
        torch = _torch()
        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
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
    source: str = ""                       # where its runtime came from (the log says)

    @property
    def name(self) -> str:
        return self.spec.name


def prepare_models(options: ServerOptions, workdir: Path) -> list[PreparedModel]:
    """Load every model of ``options`` and build its runners. With onnxruntime, a model whose
    export is in the ONNX cache (:mod:`recorun.server.onnx_cache`) is served from it without
    torch; any other is loaded with torch, exported to ``workdir/onnx``, checked against torch
    and stored in the cache. Raises :class:`ModelLoadError` naming the model that failed."""
    backend, threads = options.resolved_backend(), options.resolved_threads()
    cache = OnnxCache.open(options.onnx_cache) if backend == "onnxruntime" else None
    prepared = []
    for name in options.models:
        spec = SPECS[name]
        start = time.perf_counter()
        try:
            if backend == "onnxruntime":
                runners, origin, source = _onnx_runners(name, options, threads, workdir, cache)
                onnxruntime = import_onnxruntime()
                provider = runners[0].session.get_providers()[0]
                runtime = (f"onnxruntime {onnxruntime.__version__} ({provider}), "
                           f"{threads} intra-op thread(s) per instance")
            else:
                _torch_threads(threads)
                model, origin = load_weights(name, options.weights_dir)
                runner = TorchRunner(model, device=options.device)
                runners = [runner] * options.instances
                runtime = (f"torch {_torch().__version__} eager on {options.device}, "
                           f"{threads} intra-op thread(s) per process")
                source = "torch"
        except (ConfigurationError, ModelLoadError):
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
        prepared.append(PreparedModel(spec, origin, runtime, runners, max_batch, preferred,
                                      source))
        LOG.info("%s: ready in %.1f s (%s); %s; weights: %s", name, time.perf_counter() - start,
                 source, runtime, origin)
    return prepared


def _torch_threads(threads: int) -> None:
    """torch's intra-op threads (the torch backend, and the export and its check)."""
    torch = _torch()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):       # only before torch's first parallel work
        torch.set_num_interop_threads(1)


def _onnx_runners(name: str, options: ServerOptions, threads: int, workdir: Path,
                  cache: OnnxCache | None) -> tuple[list[OnnxRunner], str, str]:
    """The onnxruntime runners of model ``name``, its weights' origin and where the ONNX file
    came from: the cache (checked against torch's recorded answer), else a fresh export
    checked against torch (then stored in the cache)."""
    spec = SPECS[name]

    def runners(model) -> list[OnnxRunner]:
        return [OnnxRunner(model, spec, threads=threads, device=options.device)
                for _ in range(options.instances)]

    fingerprint, replace = None, False
    if cache is not None:
        try:
            fingerprint = export_fingerprint(name, options.weights_dir)
        except OSError as exc:                    # the export below says it with the load
            LOG.debug("%s: no ONNX cache key (%s)", name, exc)
        hit = cache.lookup(name, fingerprint) if fingerprint is not None else None
        if hit is not None:
            try:
                made = runners(hit.data)
                hit.verify(made[0].session)
                return made, hit.origin, f"ONNX export from the cache {hit.path}"
            except Exception as exc:              # noqa: BLE001 - any doubt: export again
                LOG.warning("%s: the cached ONNX export %s is not usable (%s: %s): exporting "
                            "it again", name, hit.path, type(exc).__name__, exc)
                replace = True
    _torch_threads(threads)
    model, origin = load_weights(name, options.weights_dir)
    path = export_onnx(name, model, workdir / "onnx" / name / "model.onnx")
    reference = torch_reference(name, model)
    diff = check_onnx(name, model, path, reference=reference)
    made = runners(path)
    source = "exported to ONNX and checked against torch"
    if cache is not None and fingerprint is not None:
        if cache.store(name, fingerprint, path, origin=origin, reference=reference,
                       max_diff=diff, check_seed=CHECK_SEED, replace=replace) is not None:
            source += f", cached in {cache.root}"
    elif cache is None:
        source += ", ONNX cache off"
    return made, origin, source


class _Running:
    """How many inference calls run in this process now (a stop reads it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *_) -> None:
        with self._lock:
            self.count -= 1


def _infer_function(model: PreparedModel, runner, running: _Running | None = None) -> Callable:
    """The pytriton inference callable of one instance: batches of requests concatenated
    (pytriton's ``@batch``), run, split back; counted in ``running`` while it runs."""
    from pytriton.decorators import batch

    input_name, output_name = model.spec.inputs[0].name, model.spec.outputs[0].name
    running = running or _Running()

    @batch
    def infer(**inputs):
        with running:
            return {output_name: runner(inputs[input_name])}

    infer.__name__ = f"infer_{model.name}"
    return infer


# --- the server -------------------------------------------------------------------------------

def _libpython_path() -> str:
    """LD_LIBRARY_PATH with the running interpreter's LIBDIR first (pitfall 1)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    rest = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(p for p in (libdir, rest) if p)


def _http_post(url: str, headers: dict[str, str], timeout_s: float = 5.0) -> bytes:
    """POST an empty body to tritonserver's HTTP endpoint (a fresh connection, closed at once:
    tritonserver waits for open HTTP connections when it exits)."""
    import urllib.request

    request = urllib.request.Request(url, data=b"", method="POST",
                                     headers={**headers, "Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return answer.read()


def _handshake_race(log: str) -> bool:
    """Whether a model failed to load because one of its instances connected to the first
    instance's handshake socket between its ``bind`` and its ``listen`` (pytriton 0.7's proxy
    waits for the socket file, not for a listener; rare, with two instances or more on a busy
    machine): starting again is the cure."""
    return "get_config_from_handshake_server" in log and "Connection refused" in log


def _accepts(address: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``address:port`` now."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((address, port)) == 0


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
        self._running = _Running()
        self.stop_path = ""                  # how the last stop went (the log says it too)

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> Endpoints:
        """Prepare the models (:func:`prepare_models`: from the ONNX cache when it has them, no
        torch then), start tritonserver and load them; return once every model is ready.

        FACILE from the cache, 2 cores: ~1 s from the command's start to READY (imports ~0.5
        s, tritonserver answering ~0.1 s, the model loaded ~0.4 s). tritonserver runs with
        ``--strict-model-config=true`` (:meth:`_skip_config_completion`) and the wait for it
        probes its ports before gRPC (:meth:`_wait_live`): ~2 s of pytriton's start."""
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
                    port_taken = self._chosen_port_taken(exc.log)
                    if attempt + 1 >= PORT_ATTEMPTS or not (port_taken
                                                            or _handshake_race(exc.log)):
                        raise
                    LOG.warning("%s: retrying", "a free port was taken before tritonserver "
                                "bound it" if port_taken else "a model's second instance "
                                "found the first one's handshake socket not listening yet (a "
                                "race in pytriton's proxy)")
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
        """Stop tritonserver and pytriton's helpers (:meth:`_stop_pytriton`: ~1.5 s with
        nothing in flight; requests in flight get :data:`EXIT_TIMEOUT_S` s to finish) and
        remove the work directory. Idempotent."""
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

    def _stop_pytriton(self, triton) -> None:
        """Stop tritonserver and pytriton's helpers in this process.

        pytriton's own stop (SIGINT to tritonserver, then its helpers here) spends 4-7 s on a
        small machine, mostly waiting: tritonserver checks once a second whether its models
        have unloaded, the python backend gives each model instance's stub a second to answer
        a health check before it asks it to finish, pytriton's request loops, in the stub and
        here, notice a stop only when their one-second receive times out, and tritonserver
        joins its CPU-metrics thread, which sleeps between samples. The health check's second
        stays; the stubs' loops look every :data:`STUB_STOP_CHECK_S` s
        (:meth:`_quicker_stub_stop`), the metrics thread samples every
        :data:`METRICS_INTERVAL_MS` ms, and the rest goes as follows. With nothing in
        flight (no inference running here, none queued in tritonserver) the stop first asks
        tritonserver to unload the models (the repository API, with pytriton's access token)
        and tells this process's request loops to stop, so that their waits overlap, then
        waits until tritonserver reports the models unloaded; tritonserver then has nothing to
        wait for when it gets SIGINT. With requests in flight, or when any of that fails, it is
        pytriton's stop as it was: tritonserver lets in-flight requests finish for up to
        :data:`EXIT_TIMEOUT_S` s. Either way tritonserver exits with its code 0, its helpers
        are joined and the workspace is removed."""
        began = time.perf_counter()
        try:
            self.stop_path = "pytriton's stop"
            if triton.is_connected() and self.endpoints is not None:
                self.stop_path = self._unload_models(triton, self.endpoints)
        except Exception as exc:                  # noqa: BLE001 - the slow way still works
            self.stop_path = f"pytriton's stop ({type(exc).__name__}: {exc})"
        try:
            triton.stop()
        except Exception as exc:                  # still remove what we own
            LOG.warning("stopping tritonserver: %s: %s", type(exc).__name__, exc)
        self.timings["stop_s"] = time.perf_counter() - began
        LOG.info("tritonserver stopped in %.1f s (%s)", self.timings["stop_s"], self.stop_path)

    def _unload_models(self, triton, endpoints: Endpoints) -> str:
        """The fast stop's first part (see :meth:`_stop_pytriton`); returns how it went."""
        from pytriton.triton import TRITON_ACCESS_HEADER

        names = [model.name for model in self.models]
        pending = self._pending(endpoints)
        busy = self._running.count + sum(pending.values())
        if busy or set(pending) != set(names):
            what = (f"{busy} request(s) in flight" if busy else
                    f"no queue metrics for {sorted(set(names) - set(pending))}")
            return f"{what}: pytriton's stop, in-flight requests get {EXIT_TIMEOUT_S} s"
        token = triton._security_config.access_token
        headers = ({TRITON_ACCESS_HEADER: token}
                   if token and "model-repository" in self.options.restricted_endpoints else {})
        for name in names:
            _http_post(f"http://{endpoints.http}/v2/repository/models/{name}/unload", headers)
        for model in triton._model_manager.models:         # their loops now stop with the
            for connector in list(model._requests_respones_connectors):  # stubs', not after
                connector.close()
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while True:                # a model's metrics go when tritonserver has unloaded it
            loaded = sorted(self._pending(endpoints))
            if not loaded:
                return "models unloaded first: nothing was in flight"
            if time.monotonic() > deadline or not triton._triton_server.is_alive():
                return (f"{', '.join(loaded)} not unloaded in {UNLOAD_TIMEOUT_S:.0f} s: "
                        "pytriton's stop")
            time.sleep(POLL_S)

    def _pending(self, endpoints: Endpoints) -> dict[str, float]:
        """Requests queued in tritonserver now, per loaded model (its
        ``nv_inference_pending_request_count`` metric, which goes when the model is unloaded)."""
        import urllib.request

        with urllib.request.urlopen(endpoints.metrics_url, timeout=2.0) as answer:
            text = answer.read().decode()
        pending: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("nv_inference_pending_request_count{"):
                labels, value = line.rsplit(" ", 1)
                model = labels.split('model="', 1)[1].split('"', 1)[0]
                pending[model] = pending.get(model, 0.0) + float(value)
        return pending

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
            exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=o.log_verbose or None,
            metrics_interval_ms=METRICS_INTERVAL_MS)
        security = TritonSecurityConfig(restricted_endpoints=list(o.restricted_endpoints))
        triton = Triton(config=config, workspace=self._tmp / f"workspace-{attempt}",
                        security_config=security)
        self._triton = triton
        self._skip_config_completion(triton)
        for model in self.models:
            batcher = (DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us,
                                      preferred_batch_size=model.preferred_batch_sizes or None)
                       if o.dynamic_batching else None)
            spec = model.spec
            triton.bind(
                model_name=model.name,
                infer_func=[_infer_function(model, r, self._running) for r in model.runners],
                inputs=[Tensor(name=t.name, dtype=np.dtype(t.dtype).type, shape=t.shape)
                        for t in spec.inputs],
                outputs=[Tensor(name=t.name, dtype=np.dtype(t.dtype).type, shape=t.shape)
                         for t in spec.outputs],
                config=ModelConfig(batching=True, max_batch_size=model.max_batch_size,
                                   batcher=batcher),
                strict=False)
        self.parameters_published = self._publish_parameters(triton)
        self._quicker_stub_stop(triton)
        if not self.parameters_published:
            LOG.warning("pytriton did not let recorun-server add model config parameters; "
                        "the weights' origin is only in this log and in recorun-server --list")

        began = time.perf_counter()
        with environment(LD_LIBRARY_PATH=_libpython_path()):
            self._launch(triton)
        deadline = began + o.ready_timeout_s
        self._wait_live(triton, endpoints, deadline)
        self.timings["live_s"] = time.perf_counter() - began
        try:
            triton.connect()                      # pytriton loads the models over HTTP
        except Exception as exc:
            raise ServerStartError(f"tritonserver did not load the models: "
                                   f"{type(exc).__name__}: {exc}", self.logs()) from exc
        self._wait_models_ready(triton, endpoints, deadline)
        self.timings["triton_s"] = time.perf_counter() - began
        return endpoints

    @staticmethod
    def _quicker_stub_stop(triton) -> bool:
        """Make the request loop in each model's stub notice a stop within
        :data:`STUB_STOP_CHECK_S` instead of pytriton's second.

        pytriton's proxy code runs in tritonserver's python-backend stubs from copies of its
        files that it sends with each model; there the request loop waits for a request with a
        one-second timeout and looks at its stop flag only when that runs out, so a model's
        unload waited a further 0-1 s. This shortens that timeout in the copies sent (the
        constant ``flag_check_interval_s = 1.0`` in ``communication.py``); the installed
        pytriton is not changed. A loop that wakes ten times a second while idle costs nothing
        measurable. Left as it is, and False returned, if the files are not as expected."""
        old = b"flag_check_interval_s = 1.0"
        new = f"flag_check_interval_s = {STUB_STOP_CHECK_S!r}".encode()
        try:
            models = list(triton._model_manager.models)
            originals = [m.get_proxy_model_files for m in models]
            keys = [[k for k in get() if k.endswith("/communication.py")] for get in originals]
        except Exception:                         # noqa: BLE001 - pytriton's internals changed
            return False
        for model, get, found in zip(models, originals, keys):
            if len(found) != 1 or get()[found[0]].count(old) != 2:
                LOG.debug("pytriton's proxy files are not as expected: its stubs notice a stop "
                          "within a second")
                return False

            def files(get=get, key=found[0]):
                sent = dict(get())
                sent[key] = sent[key].replace(old, new)
                return sent

            model.get_proxy_model_files = files
        return True

    @staticmethod
    def _skip_config_completion(triton) -> None:
        """Start tritonserver with ``--strict-model-config=true`` (Triton's
        ``--disable-auto-complete-config``, a flag without a value, which pytriton's option
        list cannot pass). pytriton writes each model's configuration complete, yet the python
        backend would otherwise start the model's stub an extra time only to ask it to complete
        the configuration, then give that stub a second to answer a health check before it
        stops it: ~1.3 s of every start. Left as pytriton has it if its internals differ."""
        config = getattr(triton, "_triton_server_config", None)
        allowed = getattr(type(config), "allowed_keys", None)
        if config is None or allowed is None or "strict-model-config" not in allowed():
            LOG.debug("pytriton's server configuration is not as expected: tritonserver "
                      "completes the model configurations itself")
            return
        config["strict-model-config"] = "true"

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
        """Wait until tritonserver answers on gRPC, failing fast if it exits. Its ports are
        probed with plain TCP connections first: a gRPC channel that found its port closed
        waits out gRPC's reconnection backoff (a second) before it tries again, while
        tritonserver itself is up in ~0.1 s."""
        import tritonclient.grpc as grpcclient

        while True:
            if not triton._triton_server.is_alive():
                _drain_output(triton._triton_server)
                raise ServerStartError(
                    f"tritonserver exited while starting (ports grpc {endpoints.grpc_port}, "
                    f"http {endpoints.http_port}, metrics {endpoints.metrics_port})",
                    self.logs())
            if (_accepts(endpoints.address, endpoints.grpc_port)
                    and _accepts(endpoints.address, endpoints.http_port)):
                client = grpcclient.InferenceServerClient(endpoints.grpc)
                try:
                    if client.is_server_live(client_timeout=1.0):
                        return
                except Exception:                 # noqa: BLE001 - not yet
                    pass
                finally:
                    client.close()
            if time.perf_counter() > deadline:
                raise ServerStartError("tritonserver did not come up in "
                                       f"{self.options.ready_timeout_s:.0f} s", self.logs())
            time.sleep(POLL_S)

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
                time.sleep(POLL_S)
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
