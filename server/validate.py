"""Validate the served models on fresh synthetic events and write ``docs/MODELS.md``.

    python -m recorun.server.validate [--out docs/MODELS.md] [--seed 2024] [--hcal-events 1000]
                              [--electron-events 4000] [--jet-events 400]

* **FACILE** against the channels' ``trueEnergy``, side by side with the project's MAHI-like
  multi-pulse fit (``recorun.modules.hcal_mahi.mahi_fit`` with its default crossings, as
  ``HcalMahiReco`` runs it in ``workflows/workflow_hlt_nominal.yaml``) and the simple
  two-sample reconstruction ``recorun.data.hcal.simple_energy``, all three on the same digis:
  ``--hcal-events`` events of 16000 channels from
  ``recorun.data.generate.generate_hcal_events(seed=--seed)``;
* **DeepCalo** against the electrons' ``trueEnergy``, side by side with the nominal
  cluster energy ``recorun.data.ecal.nominal_energy``, on the electrons of ``--electron-events``
  events of ``recorun.data.generate.generate_electron_events(seed=--seed)``;
* **ResNet-50** as a top tagger on ``--jet-events`` events of
  ``recorun.data.jets.generate(seed=--seed)``, through the pipeline of
  ``workflows/workflow_resnet50_inprocess.yaml`` (anti-kt R = 0.8 jets, 224x224 jet images of
  ``recorun.modules.jets``): the area under the ROC curve of the leading jet's P(top) against
  ``is_top``, the background rejection at 50 % signal efficiency and the ROC curve (a PNG in
  ``results/`` next to ``--out``, when matplotlib is installed);

for the energies, in bins of true energy: the bias (median of ``(E_reco - E_true) / E_true``)
and the resolution (half the width between its 16 % and 84 % quantiles). The seed must
differ from the one the weights were trained with (read from their origin): the events are
fresh. It also prints the parameter count of each model
(``recorun.server.models.parameter_count``) and the weights' origin
(``recorun.server.weights.origin``), and writes all of it to ``--out`` (default
``docs/MODELS.md``) with the architectures and the commands. ``--out -`` writes nothing.

Needs torch, numpy and awkward (through ``data/``); the MAHI-like fit and the jet pipeline
come from ``recorun.modules`` (the jets need fastjet).
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

import awkward as ak
import numpy as np
import torch

from recorun.data import ecal, hcal
from recorun.model_specs import SPECS

from .models import ARCHITECTURES, Bottleneck, make_model, parameter_count
from .toptag import (SIGNAL_EFFICIENCY, TOPTAG, rejection_at, roc_auc, roc_curve,
                     toptag_sample)
from . import train_toptag
from .train import CHANNELS, DEFAULTS, THREADS, electron_sample
from .weights import INIT_SEED, load_model, origin, weights_path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "MODELS.md"
DEFAULT_SEED = 2024
ROC_PLOT = Path("results") / "toptag_roc.png"        # relative to the Markdown file
#: bins of true energy (GeV), then the summary bin that tests/test_models.py checks
HCAL_BINS = ((1.0, 5.0), (5.0, 20.0), (20.0, 50.0), (50.0, 200.0), (200.0, np.inf),
             (20.0, np.inf))
ECAL_BINS = ((5.0, 10.0), (10.0, 20.0), (20.0, 50.0), (50.0, 100.0), (100.0, 200.0),
             (200.0, 500.0), (50.0, np.inf))
#: the MAHI-like fit's crossings: HcalMahiReco's default, which workflow_hlt_nominal.yaml
#: keeps (it sets only the rechit threshold, a zero suppression that no method gets here)
MAHI_ACTIVE_BX = (-3, -2, -1, 0, 1, 2, 3, 4)
TOPTAG_BATCH = 32                                    # images per ResNet-50 call


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


def infer(model: torch.nn.Module, x: np.ndarray, batch: int = 4096,
          column: int = 0) -> np.ndarray:
    """The model's output (column ``column``, float64) for the rows of ``x``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch]))[:, column].numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def hcal_reco_sample(events: int, seed: int, first_event: int = 1, lowest: float = 0.0,
                     chunk: int = 32
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(FACILE inputs (n, 15) float32, trueEnergy (n,) float32, simple reconstruction (n,),
    MAHI-like fit (n,), both float64 GeV) of the channels with ``trueEnergy >= lowest`` of
    ``events`` events of ``generate_hcal_events(seed)`` from ``first_event`` on. Every method
    reconstructs each channel from that channel's digi alone, so keeping only the channels
    that enter the bins changes none of their energies."""
    from recorun.modules.hcal_mahi import mahi_fit

    parts = []
    for start in range(first_event, first_event + events, chunk):
        n = min(chunk, first_event + events - start)
        # = recorun.data.generate.generate_hcal_events(n, seed, CHANNELS, start)["HcalDigi"]
        digis = hcal.generate(range(start, start + n), seed, CHANNELS)
        flat = {f: ak.to_numpy(ak.flatten(digis[f])) for f in hcal.FIELDS}
        keep = flat["trueEnergy"] >= lowest
        flat = {f: np.ascontiguousarray(v[keep]) for f, v in flat.items()}
        parts.append((hcal.facile_inputs(flat), flat["trueEnergy"].astype(np.float32),
                      np.asarray(hcal.simple_energy(flat), dtype=np.float64),
                      np.asarray(mahi_fit(flat, list(MAHI_ACTIVE_BX))["energy"],
                                 dtype=np.float64)))
    return tuple(np.concatenate(p) for p in zip(*parts))


def facile_comparison(events: int, seed: int, model=None, bins=HCAL_BINS,
                      chunk: int = 64) -> list[tuple]:
    """FACILE, the MAHI-like fit and the simple reconstruction against truth on ``events``
    fresh HCAL events (generated ``chunk`` events at a time; only channels inside the bins
    are kept)."""
    model = load_model("facile") if model is None else model.eval()
    lowest = min(lo for lo, _ in bins)
    reco, mahi, simple, true = [], [], [], []
    for start in range(1, events + 1, chunk):
        x, y, s, m = hcal_reco_sample(min(chunk, events + 1 - start), seed, start, lowest)
        reco.append(infer(model, x))
        mahi.append(m)
        simple.append(s)
        true.append(y.astype(np.float64))
    return binned({"FACILE": np.concatenate(reco), "MAHI": np.concatenate(mahi),
                   "simple": np.concatenate(simple)}, np.concatenate(true), bins)


def deepcalo_comparison(events: int, seed: int, model=None, bins=ECAL_BINS) -> list[tuple]:
    """DeepCalo and the nominal cluster energy against truth on ``events`` fresh events."""
    model = load_model("deepcalo") if model is None else model.eval()
    images, true, nominal, _ = electron_sample(events, seed)
    return binned({"DeepCalo": infer(model, images, 512), "nominal": nominal},
                  true.astype(np.float64), bins)


# ---------------------------------------------------------------------------- top tagging
def toptag_scores(model: torch.nn.Module, images: np.ndarray,
                  batch: int = TOPTAG_BATCH) -> np.ndarray:
    """P(top) (the second of the (QCD, top) outputs) of each image, ``batch`` at a time."""
    return infer(model, np.ascontiguousarray(images, dtype=np.float32), batch, column=1)


def toptag_comparison(events: int, seed: int, model=None, chunk: int = 64) -> dict:
    """ResNet-50's leading-jet top tag on ``events`` fresh jet events (made ``chunk`` events
    at a time): ``{"events", "n_top", "n_qcd", "no_jet", "auc", "eff_sig", "eff_bkg",
    "rejection"}``; an event without a jet scores 0."""
    model = load_model("resnet50") if model is None else model.eval()
    scores, labels, no_jet = [], [], 0
    for start in range(1, events + 1, chunk):
        images, is_top, has_jet = toptag_sample(min(chunk, events + 1 - start), seed, start)
        score = np.zeros(len(is_top))
        score[has_jet] = toptag_scores(model, images)
        scores.append(score)
        labels.append(is_top)
        no_jet += int(np.count_nonzero(~has_jet))
    scores = np.concatenate(scores) if scores else np.zeros(0)
    labels = np.concatenate(labels) if labels else np.zeros(0, dtype=bool)
    eff_sig, eff_bkg = roc_curve(scores, labels)
    return {"events": len(labels), "n_top": int(labels.sum()), "n_qcd": int((~labels).sum()),
            "no_jet": no_jet, "auc": roc_auc(scores, labels),
            "eff_sig": eff_sig, "eff_bkg": eff_bkg,
            "rejection": (rejection_at(eff_sig, eff_bkg) if labels.any() and not labels.all()
                          else float("nan"))}


def roc_plot(result: dict, path: Path, title: str) -> str | None:
    """Write the ROC curve of :func:`toptag_comparison`'s ``result`` to ``path`` (PNG);
    None, or why no plot was written (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    ax.plot(result["eff_bkg"], result["eff_sig"], lw=1.8,
            label=f"ResNet-50, leading jet (AUC {result['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="random (AUC 0.5)")
    ax.axhline(SIGNAL_EFFICIENCY, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("background (QCD) efficiency")
    ax.set_ylabel("signal (top) efficiency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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


def _ratio(first: Response, other: Response) -> float:
    return (first.resolution / other.resolution
            if first.n >= 2 and other.resolution > 0 else float("nan"))


def table(rows: list[tuple], what: str) -> str:
    """A Markdown table: per bin, the count and each method's bias and resolution, and the
    ratio of the first method's resolution to each other method's."""
    names = list(rows[0][2])
    others = names[1:]
    head = (f"| true energy (GeV) | {what} | "
            + " | ".join(f"{n} bias | {n} resolution" for n in names)
            + "".join(f" | resolution ratio {names[0]} / {n}" for n in others) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(names) + len(others))]
    previous_hi = -np.inf
    for lo, hi, res in rows:
        summary = lo < previous_hi          # a bin overlapping the ones before: a summary
        previous_hi = max(previous_hi, hi)
        first = res[names[0]]
        ratios = [_ratio(first, res[n]) for n in others]
        lines.append(f"| {_bin(lo, hi, summary)} | {first.n} | "
                     + " | ".join(f"{_pct(res[n].bias)} | {_res(res[n].resolution)}"
                                  for n in names)
                     + "".join(f" | {'-' if np.isnan(r) else f'{r:.2f}'}" for r in ratios)
                     + " |")
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


MIN_ENTRIES = 50             # bins with fewer entries are left out of the text's summaries


def _main_rows(rows: list[tuple], lo_min: float = -np.inf,
               hi_max: float = np.inf) -> list[tuple]:
    """The non-summary rows inside ``[lo_min, hi_max]`` with at least :data:`MIN_ENTRIES`
    entries of the first method."""
    names, kept, previous_hi = list(rows[0][2]), [], -np.inf
    for lo, hi, res in rows:
        if lo < previous_hi:
            continue
        previous_hi = max(previous_hi, hi)
        if lo >= lo_min and hi <= hi_max and res[names[0]].n >= MIN_ENTRIES:
            kept.append((lo, hi, res))
    return kept


def _ranges(rows: list[tuple]) -> dict:
    """Over ``rows``: ``{"bias": {name: (least |bias|, largest |bias|)}, "ratio": {other:
    (least, largest resolution ratio first / other)}}`` (NaN without rows)."""
    names = list(rows[0][2]) if rows else []
    nan = (float("nan"), float("nan"))
    out = {"bias": {}, "ratio": {}}
    for n in names:
        b = [abs(res[n].bias) for _, _, res in rows]
        out["bias"][n] = (min(b), max(b)) if b else nan
    for n in names[1:]:
        r = [_ratio(res[names[0]], res[n]) for _, _, res in rows]
        out["ratio"][n] = (min(r), max(r)) if r else nan
    return out


def _span(pair: tuple[float, float], fmt: str = ".2f") -> str:
    lo, hi = pair
    if np.isnan(lo):
        return "-"
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def _sharper(pair: tuple[float, float], first: str, other: str) -> str:
    """Which of two methods has the better resolution, from the range of their ratio."""
    lo, hi = pair
    if np.isnan(lo):
        return f"too few entries to compare {first} with {other}"
    if lo > 1.0:
        return f"{other} is sharper than {first} in every bin"
    if hi < 1.0:
        return f"{first} is sharper than {other} in every bin"
    return f"neither {first} nor {other} is sharper in every bin"


def _facile_reading(rows: list[tuple]) -> str:
    """The text under the FACILE table, from its rows."""
    parts = []
    low = _main_rows(rows, hi_max=20.0)
    if low:
        lo, hi, res = low[0]
        f, m, s = res["FACILE"].bias, res["MAHI"].bias, res["simple"].bias
        parts.append(f"In the lowest bin ({_bin(lo, hi)} GeV) the bias is {_pct(f)} for "
                     f"FACILE, {_pct(m)} for the MAHI-like fit and {_pct(s)} for the simple "
                     "method.")
        if f < 0:
            parts.append("FACILE minimises the squared error, so it estimates the mean true "
                         "energy given its inputs; binned in true energy on a steeply falling "
                         "spectrum, such an estimate reads low where the resolution is poor, "
                         "the price of its smaller spread there.")
        if s > 0:
            parts.append("The simple method reads high: out-of-time pileup leaks into TS3 and "
                         "TS4, and it uses no other sample, while FACILE also sees TS0-TS2 and "
                         "TS5-TS7.")
        if s > 0 and abs(m) < abs(s):
            parts.append("The MAHI-like fit gives that pileup to its out-of-time pulses"
                         + (" and is left slightly low (an out-of-time pulse fitted to an "
                            "upward noise fluctuation takes its share of the samples it has in "
                            "common with the in-time pulse; `modules/hcal_mahi.py`)."
                            if m < 0 else "."))
        r = _ranges(low)["ratio"]
        parts.append(f"Below 20 GeV FACILE's resolution is {_span(r['MAHI'])} times the "
                     f"MAHI-like fit's and {_span(r['simple'])} times the simple method's "
                     f"({_sharper(r['MAHI'], 'FACILE', 'MAHI')}; "
                     f"{_sharper(r['simple'], 'FACILE', 'simple')}).")
    high = _main_rows(rows, lo_min=20.0)
    if high:
        g = _ranges(high)
        r, b = g["ratio"], g["bias"]
        parts.append(f"Above 20 GeV, where photostatistics and noise set the resolution, "
                     f"FACILE / MAHI is {_span(r['MAHI'])} "
                     f"({_sharper(r['MAHI'], 'FACILE', 'MAHI')})"
                     f" and FACILE / simple {_span(r['simple'])} "
                     f"({_sharper(r['simple'], 'FACILE', 'simple')}); the |bias| there is at "
                     f"most {_res(b['FACILE'][1])} for FACILE, {_res(b['MAHI'][1])} for MAHI and "
                     f"{_res(b['simple'][1])} for the simple method.")
    parts.append(f"(Ranges over the bins with at least {MIN_ENTRIES} channels.)")
    return " ".join(parts)


def _deepcalo_reading(rows: list[tuple]) -> str:
    """The text under the DeepCalo table, from its rows."""
    main = _main_rows(rows)
    if not main:
        return (f"No bin has {MIN_ENTRIES} electrons: too few events to read anything "
                "from the table.")
    g = _ranges(main)
    return (f"In the bins with at least {MIN_ENTRIES} electrons, DeepCalo's |bias| is at most "
            f"{_res(g['bias']['DeepCalo'][1])}, the nominal window sum's "
            f"{_span(tuple(100 * x for x in g['bias']['nominal']))} %; DeepCalo's resolution is "
            f"{_span(g['ratio']['nominal'])} times the nominal's "
            f"({_sharper(g['ratio']['nominal'], 'DeepCalo', 'the nominal estimate')}). "
            "The nominal window sum is calibrated on average (one offset, one scale): it "
            "cannot follow the energy lost in the material before the calorimeter, which grows "
            "with |eta| and varies from electron to electron, the layers' eta-dependent depth "
            "(so the leakage), or the event's pileup level. The images carry them: the "
            "presampler samples the upstream shower, the layers' shares follow the depth, and "
            "the cells outside the window measure the pileup; DeepCalo reads all of it. The "
            "detector model and its numbers: `data/README.md`.")


def _nominal_scale() -> str:
    return (f", less the mean pileup in the window ({ecal.NOMINAL_PILEUP_OFFSET:.3f} GeV), times "
            f"{ecal.NOMINAL_SCALE:.4f} (one scale for every energy and eta: calibrated on "
            f"average, `data/README.md`)")


def auc_error(auc: float, n_sig: int, n_bkg: int) -> float:
    """The statistical uncertainty of an AUC (Hanley and McNeil 1982)."""
    if np.isnan(auc) or n_sig < 1 or n_bkg < 1:
        return float("nan")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_sig - 1) * (q1 - auc * auc)
           + (n_bkg - 1) * (q2 - auc * auc)) / (n_sig * n_bkg)
    return float(np.sqrt(max(var, 0.0)))


def _rejection(x: float) -> str:
    if np.isnan(x):
        return "-"
    return "infinite (no QCD event passes)" if np.isinf(x) else f"{x:.2f}"


def _toptag_reading(result: dict, weights: str) -> str:
    auc, n_sig, n_bkg = result["auc"], result["n_top"], result["n_qcd"]
    if np.isnan(auc):
        return "Both top and QCD events are needed for an AUC: too few events."
    err = auc_error(auc, n_sig, n_bkg)
    parts = [f"The AUC, {auc:.3f} +- {err:.3f} (statistical, Hanley-McNeil), is the "
             "probability that a top event scores above a QCD event (ties count half): 0.5 "
             "for a score that does not separate them, 1 for a perfect tagger."]
    if abs(auc - 0.5) <= 2 * err:
        parts.append("It is compatible with 0.5: no separation.")
    elif auc < 0.5:
        parts.append(f"Below 0.5, the score ranks QCD events above top events more often than "
                     f"not (the inverted score would have {1 - auc:.3f}).")
    rej = result["rejection"]
    parts.append(f"Cutting on the score so as to keep {100 * SIGNAL_EFFICIENCY:.0f} % of the "
                 "top "
                 f"events keeps {'-' if np.isnan(rej) else _res(1 / rej)} of the QCD "
                 f"events (a rejection of {_rejection(rej)}; a random score: 2).")
    auc_min = _test_thresholds()["TOPTAG_AUC_MIN"]
    if weights.startswith("untrained"):
        parts.append("The weights are untrained (their origin above): the score is no tagger "
                     f"whatever its AUC; `tests/test_models.py` expects AUC >= {auc_min:g} once "
                     "`server/trained/resnet50.pt` exists.")
    else:
        parts.append(f"`tests/test_models.py` requires AUC >= {auc_min:g} of these weights on a "
                     "small fresh sample.")
    return " ".join(parts)


def _resnet50_weights_text() -> str:
    if origin("resnet50").startswith("untrained"):
        return f"""\
**ResNet-50 is not trained**: no pretrained weights can be had offline, and training 23.5 M
parameters on 224x224 jet images (`data/jets.py` generates labelled top and QCD jets, and
`recorun.modules.jets` makes the images) is out of reach of a few minutes on two CPU cores. It is
served from its initialisation after `torch.manual_seed({INIT_SEED})`
(`recorun.server.weights.INIT_SEED`): deterministic, so every server and test gets the same
parameters, and its outputs are meaningless as a top tagger (its AUC below). Its cost
(parameters, FLOPs, memory, latency) is that of the real model, which is what the
throughput studies of the paper measure."""
    return f"""\
**ResNet-50, the top tagger**, is trained here too, on the CPU, by

    python -m recorun.server.train resnet50  # --seed 1 --events {train_toptag.EVENTS}

(`server/train_toptag.py`). Training all 23.5 M parameters on 224x224 images is out of reach
of two CPU cores in minutes (one forward pass is ~80 ms per image here), so the network
keeps the paper's architecture, input and cost, and only what is cheap to fit is fitted:

* the **backbone** (every convolution) stays at its initialisation from
  `torch.manual_seed({INIT_SEED})`: these weights are not stored but regenerated at load and
  checked against a fingerprint kept in the checkpoint (a torch that draws other numbers from
  the seed is refused with the command to retrain, not served);
* the **batch-norm statistics** are measured on jet images (the first
  {train_toptag.NORM_EVENTS} training events): a new network's mean 0 and variance 1 are far from
  what sparse jet images give;
* the **head** (`fc`, 2048 x 2) is a logistic regression of `is_top` on the 2048 pooled
  features of the training jets, standardised, with an L2 penalty chosen among
  {", ".join(format(p, "g") for p in train_toptag.PENALTIES)} by the AUC on the held-out events;
  standardisation and regression are folded into `fc`, so the served P(top) is the
  regression's.

Random convolutional features with a trained linear readout are a known baseline; here they
separate top from QCD jets because the jet's image carries its substructure (three prongs
against one), which the statistics of the random filters' responses keep. The training
sample is the leading jet of each event of another seed than the validation's, imaged as the
workflows image them (`recorun.server.toptag.toptag_sample`). The checkpoint is
{weights_path("resnet50").stat().st_size / 1e6:.2f} MB (batch-norm statistics, head,
fingerprint); its origin above gives the sample, the penalty and the time."""


#: the thresholds of tests/test_models.py that the generated text quotes (read from there)
TEST_THRESHOLDS = ("FRESH_SEED", "FACILE_BIAS_MAX", "FACILE_SIMPLE_RATIO_MAX",
                   "FACILE_MAHI_RATIO_MAX", "DEEPCALO_BIAS_MAX", "DEEPCALO_RATIO_MAX",
                   "TOPTAG_TEST_EVENTS", "TOPTAG_AUC_MIN")


def _test_thresholds(path: Path = REPO / "tests" / "test_models.py") -> dict:
    """The module-level numbers :data:`TEST_THRESHOLDS` of ``tests/test_models.py`` (NaN for
    any it does not define as a plain number), so that the text follows the tests."""
    import ast

    found = {}
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[node.targets[0].id] = value
    return {name: found.get(name, float("nan")) for name in TEST_THRESHOLDS}


def _short_origin(text: str, width: int = 70) -> str:
    """The first clause of a weights' origin, at most ``width`` characters (a plot title)."""
    first = text.split(";")[0].split(": ")[0] if len(text) > width else text
    return first if len(first) <= width else first[:width - 3] + "..."


def markdown(counts: dict, facile_rows, deepcalo_rows, toptag: dict, args, machine: str,
             elapsed: float, plot_note: str | None = None) -> str:
    """The Markdown of ``docs/MODELS.md``; ``plot_note``: why the ROC plot is missing (None:
    it is at :data:`ROC_PLOT` next to the file)."""
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
            ("--electron-events", args.electron_events), ("--jet-events", args.jet_events)))
    n_channels = args.hcal_events * CHANNELS
    fd, dd = DEFAULTS["facile"], DEFAULTS["deepcalo"]
    resnet_origin = origin("resnet50")
    plot = (f"![ROC curve of the leading jet's score]({ROC_PLOT.as_posix()})"
            if plot_note is None else f"(No ROC plot: {plot_note}.)")
    p = TOPTAG
    t = _test_thresholds()
    n_top, n_qcd, no_jet = toptag["n_top"], toptag["n_qcd"], toptag["no_jet"]
    auc = "-" if np.isnan(toptag["auc"]) else f'{toptag["auc"]:.3f}'
    efficiency = f"{100 * SIGNAL_EFFICIENCY:.0f} %"
    th = {k: f"{100 * v:g} %" if k.endswith("BIAS_MAX") else f"{v:g}" for k, v in t.items()}
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

{_resnet50_weights_text()}

## Validation on fresh events

Events generated with seed {args.seed}, a seed the weights were not trained with. Bias: the
median of (E_reco - E_true) / E_true; resolution: half the width between the 16 % and 84 %
quantiles of (E_reco - E_true) / E_true; in bins of the true energy (the last, bold row:
all entries above a threshold, the sample that `tests/test_models.py` checks). The last
columns divide the ML model's resolution by each other method's: below 1, the ML model is
sharper. Bins with few entries (see the count) say little.

### FACILE: HCAL channel energy

{n_channels:,} channels ({args.hcal_events} events x {CHANNELS} channels read out,
`recorun.data.generate.generate_hcal_events(seed={args.seed})`); the target is the channel's
`trueEnergy` (in-time deposited energy). Two non-ML reconstructions of the same digis
(their gains and pedestals are those of the HLT's conditions) go beside FACILE:

* **MAHI**: the project's MAHI-like multi-pulse fit, `recorun.modules.hcal_mahi.mahi_fit`,
  CMS's nominal HCAL reconstruction as `HcalMahiReco` runs it in
  `workflows/workflow_hlt_nominal.yaml` (default crossings {list(MAHI_ACTIVE_BX)}): a
  non-negative least-squares fit of a pulse template per bunch crossing to the 8
  pedestal-subtracted samples, energy = in-time amplitude x gain;
* **simple**: the two-sample reconstruction `recorun.data.hcal.simple_energy`: gain x (q3 + q4 -
  2 pedestal) / {hcal.CONTAINMENT_2TS:.4f} (the pulse's containment in TS3 + TS4).

No method gets the rechits' 0.5 GeV zero suppression here: every channel with a true
energy in the bins is compared.

{table(facile_rows, "channels")}

Reading it: {_facile_reading(facile_rows)}

### DeepCalo: electron energy

The electrons of {args.electron_events} events
(`recorun.data.generate.generate_electron_events(seed={args.seed})`, about 5 electrons per event,
true energies 5-500 GeV with a spectrum ~E^-1.5). The comparison is the nominal estimate
`recorun.data.ecal.nominal_energy`: the sum over all layers of a window of 3 x 7 middle-layer cells
around the image centre{_nominal_scale()}.

{table(deepcalo_rows, "electrons")}

Reading it: {_deepcalo_reading(deepcalo_rows)}

### ResNet-50: top tagging

{toptag["events"]} events of `recorun.data.jets.generate(seed={args.seed})` ({n_top} top,
{n_qcd} QCD: one hadronic top or one QCD jet per event, plus soft particles; the model in
`data/README.md`), through the pipeline of `workflows/workflow_resnet50_inprocess.yaml`:
anti-kt jets of R = {p["R"]:g} above {p["jet_min_pt"]:g} GeV
(`recorun.modules.jets.cluster_antikt`), and the {p["npix"]}x{p["npix"]} image (half-width
{p["half_width"]:g}, `recorun.modules.jets.jet_images`) of the highest-pT jet, the first of the
workflow's up to {p["max_jets"]} images per event (jets above {p["image_min_pt"]:g} GeV). The score
is ResNet-50's P(top), the second of its (QCD, top) outputs, on that image ({TOPTAG_BATCH}
images per call); an event without a jet scores 0 ({no_jet} here). Weights: {resnet_origin}.

| events | top | QCD | AUC (leading jet vs `is_top`) | rejection at {efficiency} signal efficiency |
|---|---|---|---|---|
| {toptag["events"]} | {n_top} | {n_qcd} | {auc} | {_rejection(toptag["rejection"])} |

{plot}

Reading it: {_toptag_reading(toptag, resnet_origin)}

## Reproduce

    python -m recorun.server.train facile
    python -m recorun.server.train deepcalo
    python -m recorun.server.train resnet50
    {command}

`tests/test_models.py` checks the parameter counts, the output shapes of `SPECS`, that the
trained weights are loaded (ResNet-50's head and batch-norm statistics over its seeded
backbone), the
trained models' bias and resolution on a small fresh sample (seed {t["FRESH_SEED"]}; FACILE
above 20 GeV: |bias| < {th["FACILE_BIAS_MAX"]}, resolution < {th["FACILE_SIMPLE_RATIO_MAX"]} x the simple method's
and < {th["FACILE_MAHI_RATIO_MAX"]} x the MAHI-like fit's; DeepCalo above 50 GeV: |bias| <
{th["DEEPCALO_BIAS_MAX"]}, resolution < {th["DEEPCALO_RATIO_MAX"]} x the nominal's; the same checks fail for the
untrained models, also when those are rescaled to the right median), the AUC and rejection
on known cases, that ResNet-50's leading-jet AUC on {th["TOPTAG_TEST_EVENTS"]} fresh jet events is >=
{th["TOPTAG_AUC_MIN"]} (and that the untrained network fails that check), that the jet
pipeline's parameters are the
workflow's, that `python -m recorun.server.validate` writes this file, and that training is
reproducible from its seed.
"""


# ---------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recorun.server.validate",
        description="Validate FACILE and DeepCalo on fresh synthetic events against truth "
                    "and the non-ML reconstructions, and ResNet-50 as a top tagger; write "
                    "docs/MODELS.md.")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="Markdown file to write (default docs/MODELS.md; '-': none)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"generator seed of the fresh events (default {DEFAULT_SEED}); "
                             "must differ from the training seed")
    parser.add_argument("--hcal-events", type=int, default=1000,
                        help="HCAL events of 16000 channels (default 1000)")
    parser.add_argument("--electron-events", type=int, default=4000,
                        help="electron events, ~5 electrons each (default 4000)")
    parser.add_argument("--jet-events", type=int, default=400,
                        help="jet events (half top, half QCD) for the top tagger "
                             "(default 400; ResNet-50 takes ~0.1 s per event on a CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.hcal_events, args.electron_events, args.jet_events) < 1:
        parser.error("--hcal-events, --electron-events and --jet-events must be >= 1")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")
    for name in SPECS:
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

    print(f"\nFACILE vs truth, the MAHI-like fit and the simple reconstruction, "
          f"{args.hcal_events} HCAL events, seed {args.seed}:", flush=True)
    facile_rows = facile_comparison(args.hcal_events, args.seed)
    print(table(facile_rows, "channels"), flush=True)

    print(f"\nDeepCalo vs truth and the nominal energy, {args.electron_events} electron "
          f"events, seed {args.seed}:", flush=True)
    deepcalo_rows = deepcalo_comparison(args.electron_events, args.seed)
    print(table(deepcalo_rows, "electrons"), flush=True)

    print(f"\nResNet-50 top tagging (leading jet), {args.jet_events} jet events, "
          f"seed {args.seed}:", flush=True)
    toptag = toptag_comparison(args.jet_events, args.seed)
    print(f"  {toptag['n_top']} top, {toptag['n_qcd']} QCD, {toptag['no_jet']} without a jet; "
          f"AUC {toptag['auc']:.3f} +- "
          f"{auc_error(toptag['auc'], toptag['n_top'], toptag['n_qcd']):.3f}; background "
          f"rejection at {100 * SIGNAL_EFFICIENCY:.0f} % signal efficiency "
          f"{_rejection(toptag['rejection'])}", flush=True)

    elapsed = time.perf_counter() - start
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_note = roc_plot(toptag, out.parent / ROC_PLOT,
                             f"ResNet-50 top tagging, {toptag['events']} events, seed "
                             f"{args.seed}\n{_short_origin(origin('resnet50'))}")
        if plot_note is None:
            print(f"wrote {out.parent / ROC_PLOT}", file=sys.stderr)
        out.write_text(markdown(counts, facile_rows, deepcalo_rows, toptag, args, _machine(),
                                elapsed, plot_note))
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
