"""Where each model's weights come from, and loading a model ready to serve.

A model's weights are the file ``server/trained/<name>.pt`` when it exists (written by
``python -m recorun.server.train``; it records how it was made), else the model as initialised from
the fixed seed :data:`INIT_SEED` (untrained). :func:`origin` says which, in words that the
server also publishes with the model. Needs only torch, imported when a model or a checkpoint
is loaded (:func:`weights_path` and the constants need nothing: the ONNX cache of
recorun-server, :mod:`recorun.server.onnx_cache`, keys its entries on them without torch).

A checkpoint is ``{"state_dict": ..., "origin": str}``, and may hold only part of the model:
with ``"backbone": {"seed": INIT_SEED, "fingerprint": sha256}`` (the top tagger of
:mod:`recorun.server.train_toptag`), the parameters it lacks (:func:`seeded_keys`) are the
initialisation from that seed, regenerated at load and checked against the fingerprint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from recorun.model_specs import SPECS

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "trained"
INIT_SEED = 2021


class WeightsError(RuntimeError):
    """A checkpoint that does not fit its model."""


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


def seeded_keys(model: torch.nn.Module) -> list[str]:
    """The parameters a partial checkpoint leaves at the seeded initialisation: all but the
    final ``fc`` layer's (the batch norms' statistics are buffers, always stored)."""
    return [k for k, _ in model.named_parameters() if not k.startswith("fc.")]


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the :func:`seeded_keys` tensors' bytes, in order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in seeded_keys(model):
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_from_checkpoint(name: str, checkpoint: dict | None, where: str = "") -> torch.nn.Module:
    """Model ``name`` in eval mode: the seeded initialisation with ``checkpoint``'s weights
    (none: untrained). Raises :class:`WeightsError` when a partial checkpoint's backbone is
    not what this torch draws from the seed (another torch version), naming ``where``."""
    import torch

    from .models import make_model

    torch.manual_seed(INIT_SEED)
    model = make_model(name)
    if checkpoint is None:
        return model.eval()
    backbone = checkpoint.get("backbone")
    if backbone is None:
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()
    if backbone.get("seed") != INIT_SEED or backbone.get("fingerprint") != backbone_fingerprint(model):
        raise WeightsError(
            f"model '{name}'{f' ({where})' if where else ''}: its checkpoint keeps the backbone "
            f"of torch.manual_seed({backbone.get('seed')}) as drawn by the torch that trained "
            f"it, and torch {torch.__version__} draws other weights from that seed; retrain "
            f"with: python -m recorun.server.train {name}")
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    stray = sorted(set(missing) - set(seeded_keys(model))) + sorted(unexpected)
    if stray:
        raise WeightsError(f"model '{name}'{f' ({where})' if where else ''}: the checkpoint "
                           f"does not fit the model: {', '.join(stray[:5])}")
    return model.eval()


def load_model(name: str) -> torch.nn.Module:
    """The model ``name`` (``facile``, ``deepcalo``, ``resnet50``) in eval mode, on the CPU."""
    if name not in SPECS:
        raise KeyError(f"no model '{name}' (models: {', '.join(SPECS)})")
    return model_from_checkpoint(name, _checkpoint(name), str(weights_path(name)))
