"""The models as callables in the caller's process: what in-process inference runs.

:func:`load_runner` is the one entry point the job side uses (the in-process SONIC client,
:mod:`recorun.sonic_clients.inprocess`, the paper's "direct connection" baseline); everything
else of :mod:`recorun.server` reaches the job across a process boundary (recorun-server).
Needs torch, and onnxruntime for the ``onnxruntime`` backend (the ``server`` extra).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from recorun.model_specs import SPECS


def load_runner(model: str, backend: str):
    """A thread-safe callable ``runner(x) -> y`` for one of recorun's models, its trained
    weights loaded: ``backend`` ``onnxruntime`` (exported to ONNX in a temporary folder, removed
    once the session is made; one intra-op thread per call) or ``torch`` (eager)."""
    from .serve import OnnxRunner, TorchRunner
    from .weights import load_model

    torch_model = load_model(model)
    if backend == "torch":
        return TorchRunner(torch_model)
    from .export import export_onnx

    workdir = Path(tempfile.mkdtemp(prefix=f"recorun-inprocess-{model}-"))
    try:
        path = export_onnx(model, torch_model, workdir / "model.onnx")
        return OnnxRunner(path, SPECS[model], threads=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
