"""Train FACILE and DeepCalo on the synthetic detector (``data/``) and write their weights.

    python -m recorun.server.train facile   [--seed S] [--events N] [--epochs E] [--out PATH]
    python -m recorun.server.train deepcalo [--seed S] [--events N] [--epochs E] [--out PATH]
    python -m recorun.server.train resnet50 [--seed S] [--events N] [--out PATH]

* **FACILE** regresses each HCAL channel's ``trueEnergy`` (GeV) from its 15 inputs
  (``recorun.data.hcal.facile_inputs``), on the digis of ``N`` events of 16000 channels from
  ``recorun.data.generate.generate_hcal_events`` (seed ``S``): mean squared error, Adam, batches of
  5000 channels (as the paper). Most channels hold next to nothing and a few per event tens
  or hundreds of GeV, so the training sample keeps every channel above 1 GeV and a random
  10 % of the others, weighted x10 in the loss (the weighted mean squared error estimates
  the one over all channels): more events, hence more energetic channels, for the same
  training time.
* **DeepCalo** regresses each electron's ``trueEnergy`` (GeV) from its 4x56x11 image, on the
  electrons of ``N`` events from ``recorun.data.generate.generate_electron_events`` (seed ``S``, about
  5 electrons per event): mean squared relative error ``((E_pred - E_true) / E_true)^2``
  (a plain squared error over 5-500 GeV would be dominated by the few most energetic
  electrons), Adam, batches of 256.

The last 10 % of the generated events (at least one) are held out as the validation sample
(all their channels, none dropped); training never sees them. During training the target is
divided by a fixed scale (:data:`TARGET_SCALE`, so that the last layer starts near the right
range); the scale is folded into the last linear layer before saving, so the saved model's
output is the energy in GeV. The learning rate decays by a cosine.

Batch normalisation: in training mode a batch norm divides by its batch's spread, which the
rare energetic inputs dominate: one 100 GeV channel among 5000 quiet ones comes out near
sqrt(5000) whatever its energy. Trained that way, FACILE came out ~10 % low on every channel
above 5 GeV. So FACILE's input batch norm uses the whole training sample's mean and variance
(fixed), and after the first epochs (:attr:`Settings.freeze_norms`) every batch norm's
statistics are recomputed over the training sample and kept fixed for the rest of the
training (their scales and shifts still train). The architecture is unchanged.

Everything is reproducible from the seed: the events (generator seed ``S``), the subsample
(``numpy.random.default_rng([S, event])``), the initial weights (``torch.manual_seed(S)``),
the order of the batches (a ``torch.Generator`` seeded with ``S``), on 2 torch threads. The
checkpoint ``server/trained/<model>.pt`` (``--out`` to write elsewhere) is ``{"state_dict":
..., "origin": ...}``, ``origin`` saying in words how it was made, with the command (see
:mod:`recorun.server.weights`). ``python -m recorun.server.train resnet50`` trains the top
tagger: :mod:`recorun.server.train_toptag` (a seeded backbone, batch-norm statistics measured
on jet images, a trained head).

Progress (epoch, train and validation loss) goes to stderr. Needs torch, numpy and awkward
(through ``data/``), nothing of the framework.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import awkward as ak
import numpy as np
import torch
from torch import nn

from recorun.data import ecal, hcal

from .models import make_model
from .weights import state_digest, weights_path

THREADS = 2
CHANNELS = 16000                    # HCAL channels read out per event (the full detector)
VALIDATION_FRACTION = 0.10          # of the events, the last ones
LOW_GEV = 1.0                       # FACILE training: channels below are subsampled
#: training targets are energy / TARGET_SCALE (GeV); folded back into the last layer on saving
TARGET_SCALE = {"facile": 10.0, "deepcalo": 100.0}


@dataclass(frozen=True)
class Settings:
    events: int
    epochs: int
    batch: int
    lr: float
    lr_final: float
    loss: str                       # "mse" or "relative-mse"
    #: after this fraction of the epochs, the batch norms' statistics are recomputed over the
    #: whole training sample and frozen (eval mode) for the remaining epochs
    freeze_norms: float = 1.0
    recalibrate: int = 1_000_000    # training rows (the first ones) the statistics are from
    keep_low: float = 1.0           # FACILE: fraction of the channels below LOW_GEV trained on


DEFAULTS = {
    "facile": Settings(events=512, epochs=60, batch=5000, lr=1e-2, lr_final=1e-5, loss="mse",
                       freeze_norms=0.1, keep_low=0.1),
    "deepcalo": Settings(events=6000, epochs=8, batch=256, lr=1e-3, lr_final=1e-5,
                         loss="relative-mse", freeze_norms=0.125, recalibrate=4096),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data
def hcal_sample(events: int, seed: int, first_event: int = 1, channels: int = CHANNELS,
                keep_low: float = 1.0, chunk: int = 32
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (n, 15) float32, trueEnergy (n,) float32, simple reconstruction (n,) float64,
    weight (n,) float32) of the channels of ``events`` events of ``generate_hcal_events``.

    ``keep_low`` < 1 keeps only that fraction of the channels with ``trueEnergy`` below
    :data:`LOW_GEV` (drawn with ``numpy.random.default_rng([seed, event])``, deterministic),
    each with weight ``1 / keep_low`` (the others weight 1): a weighted mean over the sample
    estimates the same mean as over all channels, with more of the rare energetic channels
    for the same number of rows."""
    parts = []
    for start in range(first_event, first_event + events, chunk):
        n = min(chunk, first_event + events - start)
        # = recorun.data.generate.generate_hcal_events(n, seed, channels, start)["HcalDigi"], without
        # importing recorun.data.generate (uproot)
        digis = hcal.generate(range(start, start + n), seed, channels)
        x = hcal.facile_inputs(digis)
        y = ak.to_numpy(ak.flatten(digis.trueEnergy)).astype(np.float32)
        simple = np.asarray(hcal.simple_energy(digis), dtype=np.float64)
        w = np.ones(len(y), dtype=np.float32)
        if keep_low < 1.0:
            low = y < LOW_GEV
            keep = ~low | (np.random.default_rng([seed, start]).random(len(y)) < keep_low)
            w[low] = 1.0 / keep_low
            x, y, simple, w = x[keep], y[keep], simple[keep], w[keep]
        parts.append((x, y, simple, w))
    return tuple(np.concatenate(p) for p in zip(*parts))


def electron_sample(events: int, seed: int, first_event: int = 1
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (n, 4, 56, 11) float32, trueEnergy (n,) float32, nominal energy (n,) float64,
    weight (n,) float32, all 1) of the electrons of ``events`` events of
    ``generate_electron_events``."""
    # = recorun.data.generate.generate_electron_events(events, seed, first_event)'s "Electron" and
    # "Electron_image", without importing recorun.data.generate (uproot)
    electrons, images = ecal.generate(range(first_event, first_event + events), seed)
    images = np.ascontiguousarray(ak.to_numpy(ak.flatten(images, axis=1)), dtype=np.float32)
    y = ak.to_numpy(ak.flatten(electrons.trueEnergy)).astype(np.float32)
    nominal = ak.to_numpy(ak.flatten(electrons.energy)).astype(np.float64)
    return images, y, nominal, np.ones(len(y), dtype=np.float32)


def split_events(events: int) -> tuple[int, int]:
    """(training events, validation events): the last 10 % (at least 1) for validation."""
    if events < 2:
        raise ValueError("need at least 2 events (one for training, one for validation)")
    n_val = max(1, round(VALIDATION_FRACTION * events))
    return events - n_val, n_val


def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------------- training
def _loss_fn(kind: str):
    """loss(pred, target, weight): the weighted mean of the squared (relative) error."""
    def loss(pred, target, weight):
        error = pred - target if kind == "mse" else (pred - target) / target
        return torch.sum(weight * error ** 2) / torch.sum(weight)
    if kind not in ("mse", "relative-mse"):
        raise ValueError(kind)
    return loss


def _fold_scale(model: nn.Module, scale: float) -> None:
    """Multiply the model's output by ``scale`` (its last linear layer's weight and bias)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)


def fit(name: str, settings: Settings, seed: int, x_train, y_train, w_train, x_val, y_val):
    """Train a fresh ``name`` model on ``(x_train, y_train)`` with per-row loss weights
    ``w_train``; returns (the model in eval mode, its output in GeV; the last epoch's
    training loss; the final validation loss), losses on the scaled target."""
    scale = TARGET_SCALE[name]
    torch.manual_seed(seed)
    model = make_model(name)
    x_train = torch.from_numpy(x_train)
    t_train = torch.from_numpy(y_train / scale).unsqueeze(1)
    w_train = torch.from_numpy(w_train).unsqueeze(1)
    x_val = torch.from_numpy(x_val)
    t_val = torch.from_numpy(y_val / scale).unsqueeze(1)
    w_val = torch.ones_like(t_val)
    loss_fn = _loss_fn(settings.loss)
    frozen = [_freeze_input_norm(model, x_train)] if name == "facile" else []
    freeze_epoch = round(settings.freeze_norms * settings.epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    steps_per_epoch = max(1, math.ceil(len(x_train) / settings.batch))
    total = settings.epochs * steps_per_epoch
    # cosine decay from lr to lr_final over the whole training
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (settings.lr_final + 0.5 * (settings.lr - settings.lr_final)
                                 * (1 + math.cos(math.pi * min(step, total) / total)))
        / settings.lr)
    order = torch.Generator().manual_seed(seed)
    train_loss = val_loss = float("nan")
    start = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        if epoch == freeze_epoch + 1:
            frozen = recalibrate_norms(model, x_train, frozen, limit=settings.recalibrate,
                                       batch=settings.batch)
            log(f"{name}: from epoch {epoch} on, batch-norm statistics fixed to their "
                f"averages over the training sample")
        model.train()
        for m in frozen:
            m.eval()
        perm = torch.randperm(len(x_train), generator=order)
        running, seen = 0.0, 0
        for i in range(0, len(perm), settings.batch):
            idx = perm[i:i + settings.batch]
            if len(idx) < 2:                 # batch norm needs two samples
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), t_train[idx], w_train[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            weight = w_train[idx].sum().item()
            running += loss.item() * weight
            seen += weight
        train_loss = running / max(seen, 1)
        val_loss = loss_fn(predict(model, x_val), t_val, w_val).item()
        log(f"{name} epoch {epoch}/{settings.epochs}: train loss "
            f"{_in_units(train_loss, settings, scale)}, val loss "
            f"{_in_units(val_loss, settings, scale)} "
            f"({time.perf_counter() - start:.0f} s)")
    if freeze_epoch >= settings.epochs:
        recalibrate_norms(model, x_train, frozen, limit=settings.recalibrate,
                          batch=settings.batch)
        val_loss = loss_fn(predict(model, x_val), t_val, w_val).item()
        log(f"{name}: batch-norm statistics recomputed on the whole training sample: "
            f"val loss {_in_units(val_loss, settings, scale)}")
    model.eval()
    _fold_scale(model, scale)
    return model, train_loss, val_loss


def _freeze_input_norm(model: nn.Module, x: torch.Tensor) -> nn.BatchNorm1d:
    """Set the first batch norm's statistics to the training sample's mean and variance and
    keep them fixed (its scale and shift are still trained). The inputs' distributions are
    heavy-tailed (charges up to thousands of fC where the median is ~10): a batch's variance
    depends on whether it holds one of the rare energetic channels, and would make each
    channel's normalised inputs depend on the others in its batch."""
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    x64 = x.double()
    with torch.no_grad():
        first.running_mean.copy_(x64.mean(0).float())
        first.running_var.copy_(x64.var(0).float())
    first.eval()
    return first


def recalibrate_norms(model: nn.Module, x: torch.Tensor, frozen: list[nn.Module],
                      batch: int = 1024, limit: int = 1_000_000) -> list[nn.Module]:
    """Replace the running statistics of the batch norms (all but those in ``frozen``) by
    their exact averages over the training sample ``x``; returns all the batch norms.

    In training mode a batch norm divides by its batch's spread: where one energetic
    channel dominates a batch's variance, its own normalised activation comes out near
    sqrt(batch) whatever its energy, so the rare high-energy inputs are fitted poorly, and
    the running averages are noisy. Fixed statistics make the normalisation the same affine
    map for every input (training continues with it)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    todo = [m for m in norms if not any(m is f for f in frozen)]
    x = x[:limit]
    # layer by layer, so that each layer's statistics see the already-fixed ones before it
    model.eval()
    with torch.no_grad():
        for m in todo:
            m.reset_running_stats()
            m.momentum = None                # cumulative average
            m.train()
            for i in range(0, len(x), batch):
                if len(x) - i >= 2:
                    model(x[i:i + batch])
            m.momentum = 0.1
            m.eval()
    return norms


def _in_units(loss: float, settings: Settings, scale: float) -> str:
    """A loss computed on scaled targets, in the units of the energy."""
    if settings.loss == "mse":
        return f"{loss * scale ** 2:.4g} GeV^2"
    return f"{loss:.4g}"


# ---------------------------------------------------------------------------- main
def _command(argv: list[str]) -> str:
    return "python -m recorun.server.train " + " ".join(argv)


def train(name: str, seed: int, settings: Settings, command: str) -> dict:
    """Generate the sample, train, and return the checkpoint dict."""
    torch.set_num_threads(THREADS)
    n_train, n_val = split_events(settings.events)
    start = time.perf_counter()
    # events 1..n_train train, n_train+1..events validate (event k is the same event
    # whether generated alone or with others: data/README.md, Determinism)
    if name == "facile":
        x_train, y_train, _, w_train = hcal_sample(n_train, seed, 1, keep_low=settings.keep_low)
        x_val, y_val, _, _ = hcal_sample(n_val, seed, n_train + 1)
        unit = "channel"
        sample = (f"{settings.events * CHANNELS} synthetic HCAL channels ({settings.events} "
                  f"events x {CHANNELS} channels read out) from "
                  f"recorun.data.generate.generate_hcal_events(seed={seed})")
        used = f"{len(y_train)} channels of events 1-{n_train}"
        if settings.keep_low < 1.0:
            used += (f" (all channels with trueEnergy >= {LOW_GEV:g} GeV, a random "
                     f"{settings.keep_low:g} of the others, weighted {1 / settings.keep_low:g} "
                     f"in the loss so that it estimates the mean over all channels)")
        inputs = "the 15 FACILE inputs (recorun.data.hcal.facile_inputs)"
    else:
        x_train, y_train, _, w_train = electron_sample(n_train, seed, 1)
        x_val, y_val, _, _ = electron_sample(n_val, seed, n_train + 1)
        unit = "electron"
        sample = (f"{len(y_train) + len(y_val)} synthetic electrons with 4x56x11 images "
                  f"({settings.events} events) from "
                  f"recorun.data.generate.generate_electron_events(seed={seed})")
        used = f"{len(y_train)} electrons of events 1-{n_train}"
        inputs = "the 4x56x11 images"
    log(f"{name}: generated in {time.perf_counter() - start:.1f} s; training on "
        f"{len(y_train)} {unit}s (events 1-{n_train}), validating on {len(y_val)} (events "
        f"{n_train + 1}-{settings.events})")
    model, train_loss, val_loss = fit(name, settings, seed, x_train, y_train, w_train, x_val,
                                      y_val)
    elapsed = time.perf_counter() - start
    scale = TARGET_SCALE[name]
    loss_words = ("mean squared error on the energy" if settings.loss == "mse" else
                  "mean squared relative error ((E_pred - E_true) / E_true)^2")
    freeze_epoch = round(settings.freeze_norms * settings.epochs)
    norms = ("input batch norm with the training sample's fixed mean and variance; "
             if name == "facile" else "")
    rows = f"the first {settings.recalibrate}" if settings.recalibrate < len(y_train) else "all"
    norms += ("batch-norm statistics recomputed over the training sample and fixed "
              + (f"after epoch {freeze_epoch}" if freeze_epoch else "from the start")
              if freeze_epoch < settings.epochs else
              "batch-norm statistics recomputed over the training sample at the end")
    norms += f" ({rows} training {unit}s)"
    origin = (
        f"trained on {sample}: {used} for training, all {len(y_val)} {unit}s of events "
        f"{n_train + 1}-{settings.events} held out for validation; input {inputs}, target "
        f"trueEnergy (GeV; trained as trueEnergy/{scale:g}, the scale folded into the last "
        f"layer, so the output is GeV); loss {loss_words}; optimizer Adam, lr "
        f"{settings.lr:g} cosine-decayed to {settings.lr_final:g}; batch {settings.batch}; "
        f"{settings.epochs} epochs; {norms}; init torch.manual_seed({seed}); final train "
        f"loss {_in_units(train_loss, settings, scale)}, final validation loss "
        f"{_in_units(val_loss, settings, scale)}; torch {torch.__version__}, {THREADS} CPU "
        f"threads, {elapsed:.0f} s; command: {command}")
    return {"state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "origin": origin}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recorun.server.train",
        description="Train FACILE or DeepCalo on synthetic events (data/) and write "
                    "server/trained/<model>.pt with the weights' origin (resnet50: "
                    "python -m recorun.server.train resnet50 --help).")
    parser.add_argument("model", choices=sorted(DEFAULTS) + ["resnet50"],
                        help="the model to train")
    parser.add_argument("--seed", type=int, default=1,
                        help="generator seed, torch seed and batch order (default 1)")
    parser.add_argument("--events", type=int, default=None,
                        help="events to generate, 10%% of them held out for validation "
                             "(default: facile 512 x 16000 channels, deepcalo 6000 x ~5 "
                             "electrons)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (default: facile 60, deepcalo 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default server/trained/<model>.pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["resnet50"]:
        from . import train_toptag

        return train_toptag.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    base = DEFAULTS[args.model]
    settings = replace(base,
                       events=args.events if args.events is not None else base.events,
                       epochs=args.epochs if args.epochs is not None else base.epochs)
    if settings.events < 2:
        parser.error(f"--events must be >= 2, not {settings.events}")
    if settings.epochs < 1:
        parser.error(f"--epochs must be >= 1, not {settings.epochs}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    out = output_path(parser, args.out, args.model)
    write_checkpoint(train(args.model, args.seed, settings, _command(argv)), out, args.model)
    return 0


def output_path(parser: argparse.ArgumentParser, out: Path | None, name: str) -> Path:
    """``--out``, or ``server/trained/<name>.pt``; a usage error when its folder is missing."""
    out = out if out is not None else weights_path(name)
    if not out.parent.is_dir():
        parser.error(f"cannot write {out}: directory {out.parent} does not exist")
    return out


def write_checkpoint(checkpoint: dict, out: Path, name: str) -> None:
    """Save ``checkpoint`` of model ``name`` to ``out`` atomically (a reader never sees half a
    file), with the model's name and the checksum of its tensors (checked at load)."""
    checkpoint = {**checkpoint, "model": name, "sha256": state_digest(checkpoint["state_dict"])}
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1e3:.1f} kB): {checkpoint['origin']}")


if __name__ == "__main__":
    sys.exit(main())
