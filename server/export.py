"""ONNX export of the paper's models and a Triton model repository for the official container.

:func:`export_onnx` writes one self-contained ``.onnx`` file per model (weights inside it, no
``.onnx.data`` side file) with a dynamic batch axis, made by ``torch.onnx.export(...,
dynamo=True)``; :func:`check_onnx` runs it with onnxruntime next to the torch model on a random
batch. ``recorun-server`` serves these files with onnxruntime (its default backend), and
:func:`write_repository` lays them out as a standard Triton model repository::

    DIR/<model>/config.pbtxt        platform "onnxruntime_onnx", max_batch_size, inputs/outputs,
                                    dynamic_batching, instance_group, parameters.weights_origin
    DIR/<model>/1/model.onnx

which the official Triton container serves as it is (``tritonserver --model-repository DIR``)
with its onnxruntime backend, on GPUs (``KIND_GPU``, the default) or CPUs (``KIND_CPU``).

torch's exporter and compiler write caches (``/tmp/torchinductor_<user>`` by default); every
export here runs inside :func:`private_torch_caches`, which points them at a directory next to
the ``.onnx`` file being written (``.torch-cache``) and removes it afterwards.

This module needs torch, onnx, onnxscript and onnxruntime, each imported where it is used (what
runs a cached export, :mod:`recorun.server.onnx_cache`, needs only onnxruntime); it imports
neither the framework nor pytriton nor tritonclient.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recorun.model_specs import SPECS, ModelSpec

LOG = logging.getLogger("recorun.server.export")

#: environment variables through which torch (inductor, its triton, dynamo's debug output)
#: chooses where to write caches; :func:`private_torch_caches` sets them all.
TORCH_CACHE_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "TORCH_COMPILE_DEBUG_DIR": "debug",
}

#: Triton's names for the dtypes of :class:`recorun.model_specs.TensorSpec`.
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}

#: tolerances of :func:`check_onnx` (onnxruntime against torch, float32).
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-5


class ExportError(RuntimeError):
    """An export failed, or its ONNX file disagrees with the torch model."""


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def private_torch_caches(directory: str | os.PathLike | None = None) -> Iterator[Path]:
    """Point torch's cache directories (:data:`TORCH_CACHE_VARIABLES`) at ``directory`` (a new
    temporary directory, removed at the end, when None) for the duration of the block, then
    restore the environment as it was."""
    owned = directory is None
    root = Path(tempfile.mkdtemp(prefix="recorun-torch-cache-") if owned else directory)
    try:
        with environment(**{name: str(root / sub)
                            for name, sub in TORCH_CACHE_VARIABLES.items()}):
            yield root
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def example_input(spec: ModelSpec, batch: int, seed: int = 0) -> np.ndarray:
    """A random float32 batch for the model's (single) input."""
    tensor = spec.inputs[0]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *tensor.shape)).astype(tensor.dtype)


def export_onnx(name: str, model, path: str | os.PathLike, *,
                opset: int | None = None) -> Path:
    """Export ``model`` (the torch model ``name`` of :data:`SPECS`, in eval mode) to the single
    file ``path``: tensor names from the spec, a dynamic batch axis named ``batch``, weights
    inside the file. Returns the path."""
    import torch

    spec = SPECS[name]
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise ExportError(f"{name}: only models with one input and one output are exported")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.from_numpy(example_input(spec, 2))
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                            "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with private_torch_caches(path.parent / ".torch-cache"), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                input_names=[spec.inputs[0].name], output_names=[spec.outputs[0].name],
                verbose=False, report=False)
            program.save(path, external_data=False)
    except Exception as exc:
        raise ExportError(f"{name}: ONNX export failed: {exc}") from exc
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        shutil.rmtree(path.parent / ".torch-cache", ignore_errors=True)
    side_files = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")]
    if side_files:
        raise ExportError(f"{name}: the export left side files {side_files} next to {path}")
    return path


def import_onnxruntime():
    """onnxruntime, with its telemetry off unless the environment says otherwise: onnxruntime
    1.32 otherwise writes a device id and an event database to
    ``$XDG_CACHE_HOME/Microsoft/DeveloperTools`` (``~/.cache``) from the first session on."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def onnx_session(model: str | os.PathLike | bytes, *, threads: int = 1, device: str = "cpu"):
    """An onnxruntime session on ``model`` (a file, or the bytes of one) with ``threads``
    intra-op threads that do not spin (spinning threads would steal the CPU from the rest of a
    small machine between requests). ``device="cuda"`` needs onnxruntime's
    CUDAExecutionProvider."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider here "
                               f"(providers: {ort.get_available_providers()}); "
                               "serve CUDA with --backend torch")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


#: the batch on which :func:`check_onnx` compares onnxruntime with torch (``example_input(spec,
#: CHECK_BATCH, CHECK_SEED)``); the ONNX cache keeps torch's answer to it
CHECK_BATCH, CHECK_SEED = 3, 1


def torch_reference(name: str, model, *, batch: int = CHECK_BATCH,
                    seed: int = CHECK_SEED) -> np.ndarray:
    """torch's output of ``model`` on :func:`example_input` (``batch``, ``seed``)."""
    import torch

    x = example_input(SPECS[name], batch, seed)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def compare_session(name: str, session, want: np.ndarray, *, where: str,
                    seed: int = CHECK_SEED, rtol: float = CHECK_RTOL,
                    atol: float = CHECK_ATOL) -> float:
    """Run ``session`` (onnxruntime) on the input batch that gave ``want`` (torch's answer to
    :func:`example_input` of ``len(want)`` rows and ``seed``): raise :class:`ExportError`, naming
    ``where``, unless its tensors are the spec's and it agrees with ``want`` (``allclose``).
    Returns the largest difference."""
    spec = SPECS[name]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [spec.inputs[0].name] or outputs != [spec.outputs[0].name]:
        raise ExportError(f"{name}: {where} has inputs {inputs} and outputs {outputs}, "
                          f"expected {[spec.inputs[0].name]} and {[spec.outputs[0].name]}")
    batch = len(want)
    got = session.run(None, {inputs[0]: example_input(spec, batch, seed)})[0]
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        raise ExportError(f"{name}: onnxruntime ({where}) and torch disagree on a batch of "
                          f"{batch} (max |diff| {diff:g}, shapes {got.shape} and {want.shape})")
    return float(np.max(np.abs(got - want)))


def check_onnx(name: str, model, path: str | os.PathLike, *, batch: int = CHECK_BATCH,
               seed: int = CHECK_SEED, rtol: float = CHECK_RTOL, atol: float = CHECK_ATOL,
               reference: np.ndarray | None = None) -> float:
    """Check ``path`` with onnx's checker, then run it with onnxruntime and ``model`` with torch
    on the same random batch; raise :class:`ExportError` unless they agree (``allclose``).
    ``reference``: torch's answer already computed (:func:`torch_reference` with ``batch`` and
    ``seed``). Returns the largest difference."""
    import onnx

    onnx.checker.check_model(str(path))
    want = reference if reference is not None else torch_reference(name, model, batch=batch,
                                                                   seed=seed)
    return compare_session(name, onnx_session(path), want, where=str(path), seed=seed,
                           rtol=rtol, atol=atol)


# --- Triton model configuration (protobuf text format) ---------------------------------------

def _pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal (C escapes, UTF-8 bytes in octal)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def preferred_sizes_for(max_batch_size: int, preferred: Sequence[int]) -> list[int]:
    """The preferred batch sizes that a model with ``max_batch_size`` can use (Triton refuses to
    load a model whose preferred batch size exceeds its max_batch_size): sorted, unique."""
    return sorted({int(p) for p in preferred if 0 < int(p) <= max_batch_size})


@dataclass(frozen=True)
class TritonModelOptions:
    """How a model is deployed: what the config.pbtxt says beyond the tensors."""

    max_batch_size: int | None = None          # None: the spec's
    instances: int = 1
    dynamic_batching: bool = True
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    device_kind: str = "gpu"                   # gpu or cpu

    def max_batch_for(self, spec: ModelSpec) -> int:
        return int(self.max_batch_size or spec.max_batch_size)


def config_pbtxt(spec: ModelSpec, options: TritonModelOptions = TritonModelOptions(), *,
                 origin: str | None = None) -> str:
    """The ``config.pbtxt`` of ``spec`` for Triton's onnxruntime backend."""
    if options.device_kind not in ("gpu", "cpu"):
        raise ValueError(f"device kind must be gpu or cpu, not {options.device_kind!r}")
    max_batch = options.max_batch_for(spec)

    def tensors(kind: str, specs) -> list[str]:
        lines = [f"{kind} ["]
        for i, tensor in enumerate(specs):
            dims = ", ".join(str(d) for d in tensor.shape)
            lines += ["  {", f"    name: {_pbtxt_string(tensor.name)}",
                      f"    data_type: {TRITON_DTYPES[tensor.dtype]}", f"    dims: [ {dims} ]",
                      "  }" + ("," if i < len(specs) - 1 else "")]
        return lines + ["]"]

    lines = [f"name: {_pbtxt_string(spec.name)}", 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {max_batch}"]
    lines += tensors("input", spec.inputs) + tensors("output", spec.outputs)
    if options.dynamic_batching:
        lines.append("dynamic_batching {")
        preferred = preferred_sizes_for(max_batch, options.preferred_batch_sizes)
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines.append(f"  max_queue_delay_microseconds: {int(options.max_queue_delay_us)}")
        lines.append("}")
    lines += ["instance_group [", "  {", f"    count: {int(options.instances)}",
              f"    kind: KIND_{options.device_kind.upper()}", "  }", "]"]
    if origin is not None:
        lines += ["parameters {", '  key: "weights_origin"',
                  f"  value: {{ string_value: {_pbtxt_string(origin)} }}", "}"]
    return "\n".join(lines) + "\n"


def write_repository(directory: str | os.PathLike, models: Sequence[str],
                     options: TritonModelOptions = TritonModelOptions(), *,
                     load=None, check: bool = True) -> list[Path]:
    """Write ``DIR/<model>/config.pbtxt`` and ``DIR/<model>/1/model.onnx`` for each model.

    ``load(name) -> (model, origin)`` gives the torch model and its weights' origin (default:
    :func:`recorun.server.weights.load_model` and :func:`recorun.server.weights.origin`). With ``check`` each
    ONNX file is run with onnxruntime against torch (:func:`check_onnx`). Returns the model
    directories written."""
    from . import weights

    if load is None:
        def load(name):
            return weights.load_model(name), weights.origin(name)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name in models:
        spec = SPECS[name]
        model, origin = load(name)
        model_dir = root / name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(name, model, version_dir / "model.onnx")
        if check:
            diff = check_onnx(name, model, onnx_path)
            LOG.info("%s: onnxruntime agrees with torch (max |diff| %.3g)", name, diff)
        (model_dir / "config.pbtxt").write_text(config_pbtxt(spec, options, origin=origin))
        written.append(model_dir)
    return written
