"""Validate the served models on fresh synthetic events and write ``docs/MODELS.md``.

    python -m recorun.server.validate [--out docs/MODELS.md] [--seed 2024] [--hcal-events 1000]
                              [--electron-events 4000]

* **FACILE** against the channels' ``trueEnergy``, side by side with the simple two-sample
  reconstruction ``recorun.data.hcal.simple_energy``, on ``--hcal-events`` events of 16000 channels
  from ``recorun.data.generate.generate_hcal_events(seed=--seed)``;
* **DeepCalo** against the electrons' ``trueEnergy``, side by side with the nominal 3x7
  cluster energy ``recorun.data.ecal.nominal_energy``, on the electrons of ``--electron-events``
  events of ``recorun.data.generate.generate_electron_events(seed=--seed)``;

in bins of true energy: the bias (median of ``(E_reco - E_true) / E_true``) and the resolution
(half the width between its 16 % and 84 % quantiles). The seed must differ from the one the
weights were trained with (read from their origin): the events are fresh. It also prints the
parameter count of each model (``recorun.server.models.parameter_count``) and the weights' origin
(``recorun.server.weights.origin``), and writes all of it to ``--out`` (default ``docs/MODELS.md``)
with the architectures and the commands. ``--out -`` writes nothing.

Needs torch, numpy and awkward (through ``data/``), nothing of the framework.
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recorun.model_specs import SPECS

from .models import ARCHITECTURES, Bottleneck, make_model, parameter_count
from .train import CHANNELS, DEFAULTS, THREADS, electron_sample, hcal_sample
from .weights import INIT_SEED, load_model, origin, weights_path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "MODELS.md"
DEFAULT_SEED = 2024
#: bins of true energy (GeV), then the summary bin that tests/test_models.py checks
HCAL_BINS = ((1.0, 5.0), (5.0, 20.0), (20.0, 50.0), (50.0, 200.0), (200.0, np.inf),
             (20.0, np.inf))
ECAL_BINS = ((5.0, 10.0), (10.0, 20.0), (20.0, 50.0), (50.0, 100.0), (100.0, 200.0),
             (200.0, 500.0), (50.0, np.inf))


# ---------------------------------------------------------------------------- measures
@dataclass(frozen=True)
class Response:
    n: int
    bias: float            # median of (reco - true) / true
    resolution: float      # half the 16-84 % interquantile width of (reco - true) / true


def response(reco, true) -> Response:
    """Bias and resolution of ``reco`` against ``true`` (NaN for fewer than 2 entries)."""
    reco = np.asarray(reco, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if len(true) < 2:
        return Response(len(true), float("nan"), float("nan"))
    rel = (reco - true) / true
    q16, q50, q84 = np.percentile(rel, [16, 50, 84])
    return Response(len(true), float(q50), float(0.5 * (q84 - q16)))


def binned(reco: dict[str, np.ndarray], true: np.ndarray, bins) -> list[tuple]:
    """``[(lo, hi, {name: Response}), ...]`` per bin of true energy ``[lo, hi)``."""
    rows = []
    for lo, hi in bins:
        sel = (true >= lo) & (true < hi)
        rows.append((lo, hi, {name: response(r[sel], true[sel]) for name, r in reco.items()}))
    return rows


def infer(model: torch.nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The model's output (first column, float64) for the rows of ``x``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch]))[:, 0].numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def facile_comparison(events: int, seed: int, model=None, bins=HCAL_BINS,
                      chunk: int = 64) -> list[tuple]:
    """FACILE and the simple reconstruction against truth on ``events`` fresh HCAL events
    (generated ``chunk`` events at a time; only channels inside the bins are kept)."""
    model = load_model("facile") if model is None else model.eval()
    lowest = min(lo for lo, _ in bins)
    reco, simple, true = [], [], []
    for start in range(1, events + 1, chunk):
        x, y, s, _ = hcal_sample(min(chunk, events + 1 - start), seed, start)
        keep = y >= lowest
        reco.append(infer(model, x[keep]))
        simple.append(s[keep])
        true.append(y[keep].astype(np.float64))
    return binned({"FACILE": np.concatenate(reco), "simple": np.concatenate(simple)},
                  np.concatenate(true), bins)


def deepcalo_comparison(events: int, seed: int, model=None, bins=ECAL_BINS) -> list[tuple]:
    """DeepCalo and the nominal cluster energy against truth on ``events`` fresh events."""
    model = load_model("deepcalo") if model is None else model.eval()
    images, true, nominal, _ = electron_sample(events, seed)
    return binned({"DeepCalo": infer(model, images, 512), "nominal": nominal},
                  true.astype(np.float64), bins)


def trained_seed(name: str) -> int | None:
    """The seed the weights of ``name`` were trained with, from their origin (else None)."""
    found = re.search(r"\(seed=(\d+)\)", origin(name))
    return int(found.group(1)) if found else None


# ---------------------------------------------------------------------------- formatting
def _bin(lo: float, hi: float, summary: bool = False) -> str:
    if summary:
        return f"**all > {lo:g}**"
    return f"> {lo:g}" if np.isinf(hi) else f"{lo:g}-{hi:g}"


def _pct(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:+.2f} %"


def _res(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.2f} %"


def table(rows: list[tuple], what: str) -> str:
    """A Markdown table: per bin, the count and each method's bias and resolution, and the
    ratio of the first method's resolution to the second's."""
    names = list(rows[0][2])
    head = (f"| true energy (GeV) | {what} | "
            + " | ".join(f"{n} bias | {n} resolution" for n in names)
            + f" | resolution ratio {names[0]} / {names[1]} |")
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    previous_hi = -np.inf
    for lo, hi, res in rows:
        summary = lo < previous_hi          # a bin overlapping the ones before: a summary
        previous_hi = max(previous_hi, hi)
        first, second = res[names[0]], res[names[1]]
        ratio = (first.resolution / second.resolution
                 if first.n >= 2 and second.resolution > 0 else float("nan"))
        lines.append(f"| {_bin(lo, hi, summary)} | {first.n} | "
                     + " | ".join(f"{_pct(res[n].bias)} | {_res(res[n].resolution)}"
                                  for n in names)
                     + f" | {'-' if np.isnan(ratio) else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = ("GPU: " + torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({cpu}), {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}, {THREADS} torch threads")


def _doc(obj, name: str = "") -> str:
    """A class docstring as one Markdown line (without a leading ``name:``)."""
    text = " ".join(inspect.getdoc(obj).split())
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text).replace("``", "`")
    return text[len(name) + 2:] if name and text.startswith(name + ": ") else text


def _summary(rows: list[tuple]) -> tuple[float, float, float, float, float]:
    """Over the non-summary bins with at least 50 entries: (largest |bias| of the first
    method, least and largest |bias| of the second, least and largest resolution ratio)."""
    names = list(rows[0][2])
    first, second, ratios, previous_hi = [], [], [], -np.inf
    for lo, hi, res in rows:
        if lo < previous_hi:
            continue
        previous_hi = max(previous_hi, hi)
        if res[names[0]].n < 50:
            continue
        first.append(abs(res[names[0]].bias))
        second.append(abs(res[names[1]].bias))
        ratios.append(res[names[0]].resolution / res[names[1]].resolution)
    if not first:
        return (float("nan"),) * 5
    return max(first), min(second), max(second), min(ratios), max(ratios)


def markdown(counts: dict, facile_rows, deepcalo_rows, args, machine: str,
             elapsed: float) -> str:
    spec_rows = "\n".join(
        f"| {name} | `{s.inputs[0].name}` {s.inputs[0].dtype} {list(s.inputs[0].shape)} | "
        f"`{s.outputs[0].name}` {s.outputs[0].dtype} {list(s.outputs[0].shape)} | "
        f"{counts[name]:,} | {s.event_batch} | {s.max_batch_size} |"
        for name, s in SPECS.items())
    origins = "\n".join(f"* **{name}** (`{weights_path(name).relative_to(REPO)}`"
                        f"{'' if weights_path(name).exists() else ', absent'}): {origin(name)}"
                        for name in SPECS)
    command = "python -m recorun.server.validate" + "".join(
        f" {flag} {value}" for flag, value in (
            ("--seed", args.seed), ("--hcal-events", args.hcal_events),
            ("--electron-events", args.electron_events)))
    n_channels = args.hcal_events * CHANNELS
    fd, dd = DEFAULTS["facile"], DEFAULTS["deepcalo"]
    _, _, _, f_rmin, f_rmax = _summary([r for r in facile_rows if r[0] >= 20.0])
    d_bias, d_nmin, d_nmax, d_rmin, d_rmax = _summary(deepcalo_rows)
    f_verdict = ("the simple method is the sharper one: a 1.6 k-parameter network trained "
                 "on the few thousand energetic channels of its training sample does not "
                 "beat it there" if f_rmin > 1.0 else
                 "FACILE is as sharp or sharper" if f_rmax <= 1.0 else
                 "neither is sharper in every bin")
    fd_freeze = round(fd.freeze_norms * fd.epochs)
    dd_freeze = round(dd.freeze_norms * dd.epochs)
    return f"""# The models: architectures, weights, validation

Written by `{command}` ({elapsed:.0f} s) on: {machine}.
Do not edit by hand: rerun the command (after retraining, see below). The training times
in the origins below are wall-clock times on this shared 2-core machine: they vary by up to
a factor 2 with whatever else runs on it.

The three models of the SONIC paper (Krupa et al. 2021, section 4 and table 1), defined in
`server/models.py` (torch only), served with the weights of `server/trained/<name>.pt`
(`server/weights.py`: `load_model(name)`, `origin(name)`).

## Architectures

| model | input | output | parameters | batch per event (paper) | max batch per request |
|---|---|---|---|---|---|
{spec_rows}

Parameter counts are computed by `recorun.server.models.parameter_count` on the models of
`recorun.model_specs.SPECS` (the paper: FACILE ~2 k, DeepCalo 1.8 M, ResNet-50 23 M).

* **FACILE** (`recorun.server.models.Facile`): {_doc(ARCHITECTURES["facile"], "FACILE")}
  The 15 inputs per channel (`recorun.data.hcal.FACILE_INPUTS`): the raw charges q0-q7 of time
  samples TS0-TS7 (fC, pedestal included), ieta, iphi, depth, gain (GeV/fC), pedestal (fC),
  pedestal noise (fC), subdetector (1 HB, 2 HE).
* **DeepCalo** (`recorun.server.models.DeepCalo`): {_doc(ARCHITECTURES["deepcalo"], "DeepCalo")}
  The input: 4 layers (presampler, strips, middle, back) x 56 (eta) x 11 (phi) pixels of
  energy in GeV.
* **ResNet-50** (`recorun.server.models.ResNet50`): {_doc(ARCHITECTURES["resnet50"])}
  {_doc(Bottleneck)} Two classes (QCD, top).

## Where the weights come from

{origins}

FACILE and DeepCalo are trained here, on the CPU, on the project's synthetic detector
(`data/`, described in `data/README.md`), by

    python -m recorun.server.train facile    # --seed 1 --events {fd.events} --epochs {fd.epochs}
    python -m recorun.server.train deepcalo  # --seed 1 --events {dd.events} --epochs {dd.epochs}

(`--out PATH` writes elsewhere than `server/trained/<name>.pt`; the origins above give each
run's sample, loss, optimizer, batch, epochs, final losses and time). Each run is
reproducible from its seed: the same command gives the same weights on the same machine and
library versions. What the training does beyond the paper's recipe (MSE, Adam, batch 5000
for FACILE), all in `server/train.py`, none of it in the architecture:

* the target is divided by a fixed scale (10 GeV for FACILE, 100 GeV for DeepCalo) during
  training and the scale is folded into the last linear layer: the served output is GeV;
* batch normalisation: in training mode a batch norm divides by its batch's spread, which
  the rare energetic inputs dominate (one 100 GeV channel among 5000 quiet ones comes out
  near sqrt(5000) whatever its energy); trained that way, FACILE came out ~10 % low above
  5 GeV. So FACILE's input batch norm uses the training sample's mean and variance (fixed),
  and after the first epochs ({fd_freeze} of {fd.epochs} for FACILE, {dd_freeze} of
  {dd.epochs} for DeepCalo) all batch norms' statistics are recomputed over the training
  sample and kept fixed while the training goes on;
* FACILE's training sample keeps every channel above 1 GeV and a random {fd.keep_low:g} of
  the others, weighted {1 / fd.keep_low:g} in the loss (the weighted mean squared error
  estimates the one over all channels): about 6 times as many events' worth of energetic
  channels for the same training time (the origin above gives the number of rows);
* the learning rate decays by a cosine ({fd.lr:g} to {fd.lr_final:g} for FACILE, {dd.lr:g}
  to {dd.lr_final:g} for DeepCalo, batch {dd.batch});
* DeepCalo's loss is the mean squared *relative* error (a plain squared error over 5-500 GeV
  is dominated by the few most energetic electrons).

**ResNet-50 is not trained**: no pretrained weights can be had offline, and training 23.5 M
parameters on 224x224 jet images (`data/jets.py` generates labelled top and QCD jets and
can make such images) is out of reach of a few minutes on two CPU cores. It is served from
its initialisation after `torch.manual_seed({INIT_SEED})` (`recorun.server.weights.INIT_SEED`):
deterministic, so every server and test gets the same parameters, and its outputs are
meaningless as a top tagger. Its cost (parameters, FLOPs, memory, latency) is that of the
real model, which is what the throughput studies of the paper measure.

## Validation on fresh events

Events generated with seed {args.seed}, a seed the weights were not trained with. Bias: the
median of (E_reco - E_true) / E_true; resolution: half the width between the 16 % and 84 %
quantiles of (E_reco - E_true) / E_true; in bins of the true energy (the last, bold row:
all entries above a threshold, the sample that `tests/test_models.py` checks). The last
column divides the ML model's resolution by the other method's: below 1, the ML model is
sharper. Bins with few entries (see the count) say little.

### FACILE: HCAL channel energy

{n_channels:,} channels ({args.hcal_events} events x {CHANNELS} channels read out,
`recorun.data.generate.generate_hcal_events(seed={args.seed})`); the target is the channel's
`trueEnergy` (in-time deposited energy). The comparison is the simple two-sample
reconstruction `recorun.data.hcal.simple_energy`: gain x (q3 + q4 - 2 pedestal) / 0.9650 (the
pulse's containment in TS3 + TS4).

{table(facile_rows, "channels")}

Reading it: FACILE minimises the squared error, so it estimates the mean true energy given
its inputs; binned in true energy on a steeply falling spectrum, such an estimate reads low
where the resolution is poor (the lowest bin), the price of its smaller spread there. The
simple method reads high at low energy: out-of-time pileup leaks into TS3 and TS4, and it
uses no other sample, while FACILE also sees TS0-TS2. Above 20 GeV, where photostatistics
and noise set the resolution, {f_verdict} (FACILE / simple {f_rmin:.2f}-{f_rmax:.2f} over
the bins with at least 50 channels).

CMS's nominal HCAL reconstruction (MAHI, a template fit of the pulse in several time
samples) is not part of this comparison: recorun's SONIC work adds it and compares it
later. Here the comparison is the simple two-sample method only.

### DeepCalo: electron energy

The electrons of {args.electron_events} events
(`recorun.data.generate.generate_electron_events(seed={args.seed})`, about 5 electrons per event,
true energies 5-500 GeV with a spectrum ~E^-1.5). The comparison is the nominal estimate
`recorun.data.ecal.nominal_energy`: the sum over all layers of a window of 3 x 7 middle-layer cells
around the image centre, times 1.0158.

{table(deepcalo_rows, "electrons")}

Reading it: DeepCalo's bias stays within {d_bias:.1%} of the truth in every bin (with at
least 50 electrons), where the nominal window sum's bias runs from {d_nmin:.1%} to
{d_nmax:.1%} in size (leakage behind the calorimeter grows with energy); DeepCalo's
resolution is {d_rmin:.2f}-{d_rmax:.2f} times the nominal's. The synthetic showers have no
pileup, no upstream material varying with eta and no eta dependence, the effects DeepCalo
corrects in ATLAS: here the window sum's resolution is close to that of the whole image's
sum (`recorun.data.ecal.expected_resolution`: 1.23 % at 100 GeV), which leaves an ML model little
to gain.

## Reproduce

    python -m recorun.server.train facile
    python -m recorun.server.train deepcalo
    {command}

`tests/test_models.py` checks the parameter counts, the output shapes of `SPECS`, that the
trained weights are loaded (and ResNet-50's seeded ones), the trained models' bias and
resolution on a small fresh sample (seed 4242; FACILE above 20 GeV: |bias| < 5 % and
resolution < 1.5 x the simple method's; DeepCalo above 50 GeV: |bias| < 10 % and
resolution < 2 x the nominal's; the same checks fail for the untrained models, also when
those are rescaled to the right median), that `python -m recorun.server.validate` writes this
file, and that training is reproducible from its seed.
"""


# ---------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recorun.server.validate",
        description="Validate FACILE and DeepCalo on fresh synthetic events against truth "
                    "and the non-ML reconstructions; write docs/MODELS.md.")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="Markdown file to write (default docs/MODELS.md; '-': none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"generator seed of the fresh events (default {DEFAULT_SEED}); "
                             "must differ from the training seed")
    parser.add_argument("--hcal-events", type=int, default=1000,
                        help="HCAL events of 16000 channels (default 1000)")
    parser.add_argument("--electron-events", type=int, default=4000,
                        help="electron events, ~5 electrons each (default 4000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.hcal_events < 1 or args.electron_events < 1:
        parser.error("--hcal-events and --electron-events must be >= 1")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    for name in ("facile", "deepcalo"):
        if trained_seed(name) == args.seed:
            parser.error(f"--seed {args.seed} is the seed {name} was trained with: "
                         "choose another, the validation events must be fresh")
    torch.set_num_threads(THREADS)
    start = time.perf_counter()

    counts = {name: parameter_count(make_model(name)) for name in SPECS}
    print("parameters (recorun.server.models.parameter_count):")
    for name, n in counts.items():
        print(f"  {name:9s} {n:>12,}")
    print("\nweights' origin (recorun.server.weights.origin):")
    for name in SPECS:
        print(f"  {name}: {origin(name)}")

    print(f"\nFACILE vs truth and the simple reconstruction, {args.hcal_events} HCAL events, "
          f"seed {args.seed}:", file=sys.stdout, flush=True)
    facile_rows = facile_comparison(args.hcal_events, args.seed)
    print(table(facile_rows, "channels"), flush=True)

    print(f"\nDeepCalo vs truth and the nominal energy, {args.electron_events} electron "
          f"events, seed {args.seed}:", flush=True)
    deepcalo_rows = deepcalo_comparison(args.electron_events, args.seed)
    print(table(deepcalo_rows, "electrons"), flush=True)

    elapsed = time.perf_counter() - start
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(counts, facile_rows, deepcalo_rows, args, _machine(),
                                elapsed))
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
