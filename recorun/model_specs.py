"""The paper's three models as a server offers them: tensor names, shapes, dtypes, batch sizes.

This is the contract between the two sides of SONIC, and the one module both import: the
clients (:mod:`recorun.sonic_clients`) describe a model that a local fallback server will
serve from it, and the server (:mod:`recorun.server`) serves and exports the models by it. It
needs nothing but the standard library, so that either side can import it alone (a GPU site
has torch and no framework; an analysis has the framework and no torch).

=========  ======================  =========  ===============  ====================
model      input per inference     output     max batch        inferences per event
=========  ======================  =========  ===============  ====================
facile     hcal_channels (15,)     energy     16384            16000 (4500 at HLT)
deepcalo   electron_images         energy     1024             5
           (4, 56, 11)
resnet50   jet_images (3,224,224)  scores (2) 32               10
=========  ======================  =========  ===============  ====================
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]        # per inference, without the batch dimension
    dtype: str = "float32"


@dataclass(frozen=True)
class ModelSpec:
    """A model as a server offers it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int           # the largest batch one request may carry
    event_batch: int              # the paper's inferences per event (offline)


SPECS: dict[str, ModelSpec] = {
    "facile": ModelSpec("facile", (TensorSpec("hcal_channels", (15,)),),
                        (TensorSpec("energy", (1,)),), max_batch_size=16384,
                        event_batch=16000),
    "deepcalo": ModelSpec("deepcalo", (TensorSpec("electron_images", (4, 56, 11)),),
                          (TensorSpec("energy", (1,)),), max_batch_size=1024, event_batch=5),
    "resnet50": ModelSpec("resnet50", (TensorSpec("jet_images", (3, 224, 224)),),
                          (TensorSpec("scores", (2,)),), max_batch_size=32, event_batch=10),
}


def parse_model_names(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"facile,deepcalo"`` or ``"all"`` (or a list of such) as a tuple of model names;
    ValueError naming an unknown model."""
    parts = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in parts:
        for name in (p.strip().lower() for p in part.split(",")):
            if not name:
                continue
            if name == "all":
                names.extend(SPECS)
            elif name in SPECS:
                names.append(name)
            else:
                raise ValueError(f"unknown model '{name}' (models: {', '.join(SPECS)}, or all)")
    unique = tuple(dict.fromkeys(names))
    if not unique:
        raise ValueError("no model given")
    return unique
