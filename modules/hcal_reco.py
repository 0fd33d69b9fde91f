"""HCAL local reconstruction: rechits (ieta, iphi, depth, energy) from digis.

:class:`HcalSimpleReco` is the fast two-sample method: the pedestal-subtracted charge in the
sample of interest and the next one, over the pulse containment of those two samples, times
the channel's gain (see ``data/README.md`` for the pulse shape). It is blind to out-of-time
pileup, which the template fit of CMS's nominal reconstruction (MAHI) removes.
"""
from __future__ import annotations

import numpy as np

from recorun.data import hcal
from recorun import Concurrency, InputTag, Param, Producer

RECHIT_DTYPE = np.dtype([("ieta", "i2"), ("iphi", "i2"), ("depth", "i1"), ("energy", "f4")])


def rechits(digis: np.ndarray, energy: np.ndarray, threshold: float) -> np.ndarray:
    """Rechits of the channels whose energy (GeV) is at least ``threshold``."""
    keep = energy >= threshold
    hits = np.empty(int(np.count_nonzero(keep)), RECHIT_DTYPE)
    for field in ("ieta", "iphi", "depth"):
        hits[field] = np.compress(keep, digis[field])      # faster than digis[field][keep]
    hits["energy"] = np.compress(keep, energy)
    return hits


class HcalSimpleReco(Producer):
    """HCAL rechits from ``HcalDigi`` digis with the two-sample method."""

    concurrency = Concurrency.SHARED
    digis = InputTag("source:HcalDigi", doc="HcalDigi collection (fields of data/README.md)")
    threshold = Param(float, 0.5, doc="rechits below this energy (GeV) are dropped")

    def produce(self, event):
        digis = event.get(self.digis)
        event.put(rechits(digis, hcal.simple_energy(digis), self.threshold))
