"""The top tagger's sample and figures of merit, shared by its training
(:mod:`recorun.server.train_toptag`) and its validation (:mod:`recorun.server.validate`).

* :func:`toptag_sample`: the leading jet's image of each generated event, made exactly as the
  top-tagging workflows make them (:data:`TOPTAG`, checked against the workflows' YAML in
  ``tests/test_models.py``);
* :func:`roc_auc`, :func:`roc_curve`, :func:`rejection_at`: the ROC curve of a score.

Needs numpy, awkward and fastjet (through ``recorun.modules.jets``), not torch.
"""
from __future__ import annotations

import awkward as ak
import numpy as np

#: the jet pipeline of workflows/workflow_resnet50_inprocess.yaml (AntiKtJetProducer,
#: JetImageProducer); the tagger scores the leading jet's image only
TOPTAG = {"R": 0.8, "jet_min_pt": 1.0, "max_jets": 10, "image_min_pt": 1.0, "npix": 224,
          "half_width": 0.8}
SIGNAL_EFFICIENCY = 0.5                              # where the rejection is quoted


def toptag_sample(events: int, seed: int, first_event: int = 1
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leading-jet images ``(k, 3, npix, npix)`` float32, ``is_top`` ``(events,)`` bool,
    ``has_jet`` ``(events,)`` bool) of ``events`` events of ``recorun.data.jets.generate``
    from ``first_event`` on, through the jet pipeline of
    ``workflows/workflow_resnet50_inprocess.yaml`` (:data:`TOPTAG`): one image per event with
    a jet (``k = has_jet.sum()``), of its highest-pT jet."""
    from recorun.data import jets as jet_data
    from recorun.modules.jets import cluster_antikt, fastjet_quietly, jet_images

    fastjet = fastjet_quietly()
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, TOPTAG["R"])
    is_top, particles, _ = jet_data.generate(range(first_event, first_event + events), seed)
    images, has_jet = [], np.zeros(events, dtype=bool)
    fields = ("px", "py", "pz", "E", "charge")
    columns = {f: ak.to_numpy(ak.flatten(particles[f])) for f in fields}
    offsets = np.concatenate([[0], np.cumsum(ak.to_numpy(ak.num(particles, axis=1)))])
    for k in range(events):
        one = {f: v[offsets[k]:offsets[k + 1]] for f, v in columns.items()}
        jets, constituents = cluster_antikt(one, TOPTAG["R"], TOPTAG["jet_min_pt"], definition)
        image = jet_images(jets, constituents, TOPTAG["max_jets"], TOPTAG["image_min_pt"],
                           TOPTAG["npix"], TOPTAG["half_width"])[:1]
        if len(image):
            images.append(image)
            has_jet[k] = True
    npix = TOPTAG["npix"]
    return (np.concatenate(images) if images else np.zeros((0, 3, npix, npix), np.float32),
            np.asarray(is_top, dtype=bool), has_jet)


def roc_auc(scores, labels) -> float:
    """The area under the ROC curve of ``scores`` for ``labels`` (True: signal), by ranks
    (Mann-Whitney U / (n_signal n_background)), ties counted half: the probability that a
    random signal entry scores above a random background one. NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_sig, n_bkg = int(labels.sum()), int((~labels).sum())
    if n_sig == 0 or n_bkg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average rank within each group of equal scores
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    mean_rank = 0.5 * (starts + 1 + ends)               # ranks starts+1 .. ends
    ranks[order] = np.repeat(mean_rank, ends - starts)
    u = ranks[labels].sum() - n_sig * (n_sig + 1) / 2.0
    return float(u / (n_sig * n_bkg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(signal efficiency, background efficiency) of the cuts ``score >= t`` over the distinct
    scores ``t`` from the highest down, starting at (0, 0): the ROC curve, whose trapezoidal
    area is :func:`roc_auc`."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, dtype=bool)
    sig = np.cumsum(lab)[last]
    bkg = np.cumsum(~lab)[last]
    n_sig, n_bkg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, sig / n_sig], np.r_[0.0, bkg / n_bkg]


def rejection_at(eff_sig: np.ndarray, eff_bkg: np.ndarray,
                 target: float = SIGNAL_EFFICIENCY) -> float:
    """1 / background efficiency at signal efficiency ``target``, linear along the ROC curve
    (inf where no background passes; NaN for an empty curve)."""
    if len(eff_sig) < 2 or eff_sig[-1] < target:
        return float("nan")
    i = int(np.searchsorted(eff_sig, target, side="left"))   # eff_sig[i - 1] < target <= [i]
    i = max(i, 1)
    lo, hi = eff_sig[i - 1], eff_sig[i]
    frac = 1.0 if hi == lo else (target - lo) / (hi - lo)
    bkg = eff_bkg[i - 1] + frac * (eff_bkg[i] - eff_bkg[i - 1])
    return float("inf") if bkg <= 0 else float(1.0 / bkg)
