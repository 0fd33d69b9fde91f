"""Trigger filters: each returns true to let the path go on."""
from __future__ import annotations


from recorun import Concurrency, Filter, InputTag, Param


class HTFilter(Filter):
    """Accepts events whose scalar sum of jet pT (jets above ``min_jet_pt``) is >= ``min_ht``."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with a 'pt' field")
    min_ht = Param(float, 250.0, doc="threshold on HT, GeV")
    min_jet_pt = Param(float, 30.0, doc="jets counted in HT, GeV")

    def filter(self, event):
        pt = event.get(self.jets)["pt"]
        return float(pt[pt >= self.min_jet_pt].sum()) >= self.min_ht


class MinimumFilter(Filter):
    """Accepts events whose scalar product (e.g. missing ET) is >= ``minimum``."""

    concurrency = Concurrency.SHARED
    value = InputTag(doc="a scalar product")
    minimum = Param(float, doc="threshold")

    def filter(self, event):
        return float(event.get(self.value)) >= self.minimum


class PrescaleFilter(Filter):
    """Accepts one event in ``prescale``, chosen by event number (the same for any threads)."""

    concurrency = Concurrency.SHARED
    prescale = Param(int, 100, doc="accept events whose number is a multiple of this")
    offset = Param(int, 0, doc="shift of the accepted event numbers")

    def begin_job(self):
        if self.prescale < 1:
            raise ValueError(f"prescale must be >= 1, got {self.prescale}")

    def filter(self, event):
        return (event.id.event + self.offset) % self.prescale == 0
