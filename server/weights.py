"""Where each model's weights come from, and loading a model ready to serve.

A model's weights are the file ``server/trained/<name>.pt`` when it exists (written by
``python -m recorun.server.train``; it records how it was made), else the model as initialised from
the fixed seed :data:`INIT_SEED` (untrained). :func:`origin` says which, in words that the
server also publishes with the model. Needs only torch, imported when a model or a checkpoint
is loaded (:func:`weights_path` and the constants need nothing: the ONNX cache of
recorun-server, :mod:`recorun.server.onnx_cache`, keys its entries on them without torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recorun.model_specs import SPECS

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "trained"
INIT_SEED = 2021


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def _checkpoint(name: str) -> dict | None:
    path = weights_path(name)
    if not path.exists():
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def origin(name: str) -> str:
    """How the weights that :func:`load_model` gives were made."""
    checkpoint = _checkpoint(name)
    if checkpoint is None:
        return f"untrained: initialised from torch.manual_seed({INIT_SEED})"
    return str(checkpoint["origin"])


def load_model(name: str) -> torch.nn.Module:
    """The model ``name`` (``facile``, ``deepcalo``, ``resnet50``) in eval mode, on the CPU."""
    if name not in SPECS:
        raise KeyError(f"no model '{name}' (models: {', '.join(SPECS)})")
    import torch

    from .models import make_model

    torch.manual_seed(INIT_SEED)
    model = make_model(name)
    checkpoint = _checkpoint(name)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
