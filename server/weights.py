"""Where each model's weights come from, and loading a model ready to serve.

A model's weights are the file ``server/trained/<name>.pt`` when it exists (written by
``python -m recorun.server.train``; it records how it was made), else the model as initialised from
the fixed seed :data:`INIT_SEED` (untrained). :func:`origin` says which, in words that the
server also publishes with the model. Needs only torch, imported when a model or a checkpoint
is loaded (:func:`weights_path` and the constants need nothing: the ONNX cache of
recorun-server, :mod:`recorun.server.onnx_cache`, keys its entries on them without torch).

A checkpoint is ``{"state_dict": ..., "origin": str}`` (and, when written by
``recorun.server.train.write_checkpoint``, ``"model"`` and ``"sha256"``: the model it is for
and a checksum of its tensors, both checked at load), and may hold only part of the model:
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


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``; :class:`WeightsError` naming the file when it cannot be read
    as one (damaged, truncated, or another kind of file)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} cannot be read as a checkpoint (damaged, truncated or not "
                           f"one): {type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise WeightsError(f"{path} is not a checkpoint of python -m recorun.server.train (no "
                           f"'state_dict')")
    return checkpoint


def _checkpoint(name: str) -> dict | None:
    path = weights_path(name)
    return read_checkpoint(path) if path.exists() else None


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


def _digest(state: dict, keys) -> str:
    """sha256 of the names and tensors' bytes of ``state``'s ``keys``, in that order."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the :func:`seeded_keys` tensors, in the model's order."""
    return _digest(model.state_dict(), seeded_keys(model))


def state_digest(state: dict) -> str:
    """sha256 of a state dict's tensors, sorted by name: the checksum a checkpoint is written
    with (``recorun.server.train.write_checkpoint``)."""
    return _digest(state, sorted(state))


def model_from_checkpoint(name: str, checkpoint: dict | None, where: str = "") -> torch.nn.Module:
    """Model ``name`` in eval mode: the seeded initialisation with ``checkpoint``'s weights
    (none: untrained). Raises :class:`WeightsError`, naming ``where``, when the checkpoint is of
    another model, does not fit this one, fails its checksum, holds non-finite numbers or
    negative variances (damaged), or keeps a backbone this torch does not draw from the seed
    (another torch version)."""
    import torch

    from .models import make_model

    torch.manual_seed(INIT_SEED)
    model = make_model(name)
    if checkpoint is None:
        return model.eval()
    at = f"model '{name}'{f' ({where})' if where else ''}"
    made_for = checkpoint.get("model")
    if made_for is not None and made_for != name:
        raise WeightsError(f"{at}: this is a checkpoint of model '{made_for}'")
    state = checkpoint["state_dict"]
    if "sha256" in checkpoint and checkpoint["sha256"] != state_digest(state):
        raise WeightsError(f"{at}: the checkpoint is damaged: its tensors do not match the "
                           f"checksum it was written with")
    expected = model.state_dict()
    backbone = checkpoint.get("backbone")
    seeded = set(seeded_keys(model)) if backbone is not None else set()
    missing = [k for k in expected if k not in state and k not in seeded]
    stray = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape)
             != tuple(expected[k].shape)]
    if missing or stray or wrong:
        problems = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for what, keys in (("missing", missing), ("not in the model", stray),
                                       ("of another shape", wrong)) if keys]
        raise WeightsError(f"{at}: the checkpoint does not fit the model ({'; '.join(problems)}"
                           f"); its origin: {str(checkpoint.get('origin', '?'))[:120]}")
    if backbone is not None and (backbone.get("seed") != INIT_SEED
                                 or backbone.get("fingerprint") != backbone_fingerprint(model)):
        raise WeightsError(
            f"{at}: its checkpoint keeps the backbone of torch.manual_seed({backbone.get('seed')}) "
            f"as drawn by the torch that trained it, and torch {torch.__version__} draws other "
            f"weights from that seed; retrain with: python -m recorun.server.train {name}")
    model.load_state_dict(state, strict=backbone is None)
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"{at}: the checkpoint is damaged: {key} holds non-finite values")
        if key.endswith("running_var") and (value < 0).any():
            raise WeightsError(f"{at}: the checkpoint is damaged: {key} holds negative variances")
    return model.eval()


def load_model(name: str) -> torch.nn.Module:
    """The model ``name`` (``facile``, ``deepcalo``, ``resnet50``) in eval mode, on the CPU."""
    if name not in SPECS:
        raise KeyError(f"no model '{name}' (models: {', '.join(SPECS)})")
    return model_from_checkpoint(name, _checkpoint(name), str(weights_path(name)))
