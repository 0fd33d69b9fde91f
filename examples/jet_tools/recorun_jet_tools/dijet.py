"""Dijet invariant mass and a jet-multiplicity filter, as a physicist would add them."""
from __future__ import annotations

import numpy as np

from recorun import Concurrency, Filter, InputTag, Param, Producer


class DijetMassProducer(Producer):
    """Invariant mass (GeV) of the two leading jets, treated as massless; 0 with < 2 jets."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with fields pt, eta, phi")

    def produce(self, event):
        jets = np.sort(event.get(self.jets), order="pt")[::-1]
        if jets.size < 2:
            event.put(0.0)
            return
        j1, j2 = jets[0], jets[1]
        m2 = 2 * j1["pt"] * j2["pt"] * (np.cosh(j1["eta"] - j2["eta"]) - np.cos(j1["phi"] - j2["phi"]))
        event.put(float(np.sqrt(max(m2, 0.0))))


class JetCountFilter(Filter):
    """Accepts events with at least ``min_jets`` jets above ``min_pt``."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with a 'pt' field")
    min_jets = Param(int, 2, doc="minimum number of jets")
    min_pt = Param(float, 30.0, doc="jet pT threshold, GeV")

    def filter(self, event):
        return int(np.count_nonzero(event.get(self.jets)["pt"] >= self.min_pt)) >= self.min_jets
