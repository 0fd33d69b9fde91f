"""Train the ResNet-50 top tagger on the project's jets and write its weights.

    python -m recorun.server.train resnet50 [--seed S] [--events N] [--out PATH]

The architecture, its input (3 x 224 x 224 jet images) and its cost are those of the paper's
ResNet-50 (:class:`recorun.server.models.ResNet50`). What is trained, on the CPU in minutes:

1. **Backbone: fixed, seeded.** Every convolution keeps its initialisation from
   ``torch.manual_seed(INIT_SEED)`` (:data:`recorun.server.weights.INIT_SEED`). These 23.5 M
   weights are not stored: :func:`recorun.server.weights.load_model` regenerates them from the
   seed and checks them against the checkpoint's fingerprint (another torch version could draw
   other numbers: the check then fails loudly instead of serving a broken tagger).
2. **Batch-norm statistics measured on jet images.** A freshly initialised network's batch
   norms hold mean 0 and variance 1, which sparse jet images (pT fractions of ~0.01 in a few
   hundred of 50,176 pixels) are far from; each batch norm's mean and variance are measured on
   the images of the first :data:`NORM_EVENTS` training events (cumulative averages over
   batches of 32 in training mode, layer after layer as the images flow through).
3. **A trained head.** The 2048 pooled features of the last stage, standardised, feed a
   logistic regression (L2 penalty, L-BFGS in float64) of ``is_top``, with the penalty chosen
   among :data:`PENALTIES` by the AUC on the validation events (the last 10 %); the
   standardisation and the regression are folded into the final linear layer ``fc`` so that
   the served model's top probability (softmax of its two scores) is the regression's.

Random convolutional features with a trained linear readout are a known baseline ("random
features"); here they reach AUCs above 0.9 because the leading jet's image carries its
substructure (three prongs spread over ~2 m / pT against one), which survives in the
statistics of the random filters' responses. The training sample is the leading jet of each
event of ``recorun.data.jets.generate(seed=S)`` (half top, half QCD), imaged exactly as the
top-tagging workflows do (:func:`recorun.server.toptag.toptag_sample`; an event without a
jet is left out). The checkpoint holds the measured
batch-norm statistics, the head and the backbone's fingerprint (~0.5 MB), and an ``origin``
saying how it was made. Reproducible from the seed on the same machine and library versions.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import make_model
from .toptag import TOPTAG, roc_auc, toptag_sample
from .train import THREADS, log, output_path, write_checkpoint
from .weights import INIT_SEED, backbone_fingerprint, seeded_keys

EVENTS = 3000                       # default: 2700 for training, 300 for validation
VALIDATION_FRACTION = 0.10          # of the events, the last ones, at least MIN_VALIDATION
MIN_VALIDATION = 10
MIN_EVENTS = 40
NORM_EVENTS = 256                   # training events whose images measure the batch norms
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)
CHUNK = 32                          # events per forward pass


class TrainingError(RuntimeError):
    """The sample cannot train or validate the tagger (e.g. one class only)."""


def split_events(events: int) -> tuple[int, int]:
    """(training events, validation events): the last 10 %, at least :data:`MIN_VALIDATION`."""
    n_val = max(MIN_VALIDATION, round(VALIDATION_FRACTION * events))
    return events - n_val, n_val


def measure_norms(model: nn.Module, images: np.ndarray) -> None:
    """Replace every batch norm's statistics by their averages over ``images`` (batches of
    :data:`CHUNK`, training mode, cumulative averages); the model ends in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), CHUNK):
            if len(images) - i >= 2:
                model(torch.from_numpy(images[i:i + CHUNK]))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def features(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The pooled last-stage features ``(n, 2048)`` float64 that ``fc`` reads."""
    with torch.no_grad():
        x = torch.from_numpy(images)
        return torch.flatten(model.pool(model.stages(model.stem(x))), 1).double().numpy()


def sample_features(model: nn.Module, events: int, seed: int, first_event: int,
                    what: str) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, ``is_top``) of the leading jets of events ``first_event``.. (those
    with a jet), :data:`CHUNK` events at a time."""
    parts, labels = [], []
    start = time.perf_counter()
    for first in range(first_event, first_event + events, CHUNK):
        n = min(CHUNK, first_event + events - first)
        images, is_top, has_jet = toptag_sample(n, seed, first)
        parts.append(features(model, images))
        labels.append(is_top[has_jet])
        done = first + n - first_event
        if done % (10 * CHUNK) < CHUNK or done == events:
            log(f"resnet50: {what} features of {done}/{events} events "
                f"({time.perf_counter() - start:.0f} s)")
    return np.concatenate(parts), np.concatenate(labels)


def fit_head(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """(w, b) of the logistic regression ``sigmoid(x @ w + b)`` of ``y`` on standardised
    features ``x``, minimising the mean cross-entropy + ``penalty * |w|^2`` (L-BFGS)."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
                + penalty * (w * w).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy(), float(b.detach())


def set_head(model: nn.Module, w: np.ndarray, b: float, mean: np.ndarray, std: np.ndarray):
    """Fold the standardisation and the regression into ``fc``: the softmax's top probability
    is then ``sigmoid(((x - mean) / std) @ w + b)`` (scores +-half the regression's logit)."""
    slope = w / std
    offset = b - float(np.dot(slope, mean))
    weight = np.stack([-0.5 * slope, 0.5 * slope])
    bias = np.array([-0.5 * offset, 0.5 * offset])
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(weight))
        model.fc.bias.copy_(torch.from_numpy(bias))


def train(seed: int, events: int, command: str) -> dict:
    """Generate the jets, measure the batch norms, fit the head; the checkpoint dict."""
    torch.set_num_threads(THREADS)
    n_train, n_val = split_events(events)
    start = time.perf_counter()
    torch.manual_seed(INIT_SEED)
    model = make_model("resnet50")
    norm_events = min(NORM_EVENTS, n_train)
    norm_images, _, _ = toptag_sample(norm_events, seed, 1)
    measure_norms(model, norm_images)
    del norm_images
    log(f"resnet50: batch-norm statistics measured on {norm_events} jet images "
        f"({time.perf_counter() - start:.0f} s)")
    x_train, y_train = sample_features(model, n_train, seed, 1, "training")
    x_val, y_val = sample_features(model, n_val, seed, n_train + 1, "validation")
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    z_train, z_val = (x_train - mean) / std, (x_val - mean) / std
    for what, labels in (("training", y_train), ("validation", y_val)):
        if labels.all() or not labels.any():
            raise TrainingError(f"the {what} events hold only {'top' if labels.all() else 'QCD'} "
                                f"jets: use more --events (now {events})")
    # the largest penalty first: an equal validation AUC keeps the simpler head
    best = None
    for penalty in sorted(PENALTIES, reverse=True):
        w, b = fit_head(z_train, y_train, penalty)
        val_auc = roc_auc(z_val @ w, y_val)
        log(f"resnet50: penalty {penalty:g}: training AUC {roc_auc(z_train @ w, y_train):.4f}, "
            f"validation AUC {val_auc:.4f}")
        if best is None or val_auc > best[0]:
            best = (val_auc, penalty, w, b)
    val_auc, penalty, w, b = best
    set_head(model, w, b, mean, std)
    elapsed = time.perf_counter() - start
    seeded = set(seeded_keys(model))
    stored = {k: v.clone() for k, v in model.state_dict().items() if k not in seeded}
    origin = (
        f"top tagger trained on the leading jets of {events} synthetic events (half top, half "
        f"QCD) from recorun.data.jets.generate(seed={seed}), imaged as the top-tagging "
        f"workflows do (anti-kt R {TOPTAG['R']:g}, 3x{TOPTAG['npix']}x{TOPTAG['npix']}, "
        f"half-width {TOPTAG['half_width']:g}): "
        f"events 1-{n_train} for training, {n_train + 1}-{events} held out for validation; "
        f"backbone fixed at its initialisation from torch.manual_seed({INIT_SEED}); batch-norm "
        f"statistics measured on the images of events 1-{norm_events}; head (fc) a logistic "
        f"regression of is_top on the 2048 standardised pooled features, L2 penalty "
        f"{penalty:g} chosen among {', '.join(f'{p:g}' for p in PENALTIES)} by the "
        f"validation AUC ({val_auc:.4f}); torch {torch.__version__}, {THREADS} CPU threads, "
        f"{elapsed:.0f} s; command: {command}")
    return {"state_dict": stored, "origin": origin,
            "backbone": {"seed": INIT_SEED, "fingerprint": backbone_fingerprint(model)}}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recorun.server.train resnet50",
        description="Train the ResNet-50 top tagger (seeded backbone, batch-norm statistics "
                    "measured on jet images, trained head) and write server/trained/resnet50.pt.")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    parser.add_argument("--events", type=int, default=EVENTS,
                        help=f"jet events, 10%% held out for validation (default {EVENTS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default server/trained/resnet50.pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.events < MIN_EVENTS:
        parser.error(f"--events must be >= {MIN_EVENTS} (at least {MIN_VALIDATION} of them held "
                     f"out for validation), not {args.events}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    out = output_path(parser, args.out, "resnet50")
    # the command that reproduces the weights (where they are written does not matter)
    command = f"python -m recorun.server.train resnet50 --seed {args.seed} --events {args.events}"
    try:
        checkpoint = train(args.seed, args.events, command)
    except TrainingError as exc:
        parser.error(str(exc))
    write_checkpoint(checkpoint, out, "resnet50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
