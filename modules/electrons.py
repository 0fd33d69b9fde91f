"""Electrons at the HLT: the nominal ECAL energy from each electron's calorimeter image, and a
filter on electron transverse energy."""
from __future__ import annotations

import numpy as np

from recorun.data import ecal
from recorun import Concurrency, Filter, InputTag, Param, Producer

ELECTRON_DTYPE = np.dtype([("energy", "f4"), ("et", "f4"), ("eta", "f4"), ("phi", "f4")])


class ElectronEnergyProducer(Producer):
    """Electrons with the nominal energy: a calibrated sum over the 4 layers of a window
    around the impact point of each 4x56x11 image (``recorun.data.ecal.nominal_energy``)."""

    concurrency = Concurrency.SHARED
    images = InputTag("source:Electron_image", doc="(n, 4, 56, 11) images, GeV per cell")
    electrons = InputTag("source:Electron", doc="Electron collection with eta and phi")

    def produce(self, event):
        images = event.get(self.images)
        candidates = event.get(self.electrons)
        if len(images) != len(candidates):
            raise ValueError(f"{len(images)} images for {len(candidates)} electrons")
        out = np.empty(len(images), ELECTRON_DTYPE)
        out["energy"] = ecal.nominal_energy(images)
        out["eta"], out["phi"] = candidates["eta"], candidates["phi"]
        out["et"] = out["energy"] / np.cosh(out["eta"])
        event.put(out)


class ElectronFilter(Filter):
    """Accepts events with at least ``min_count`` electrons of ET >= ``min_et`` in |eta| <
    ``max_eta``."""

    concurrency = Concurrency.SHARED
    electrons = InputTag("electrons", doc="electrons with fields et and eta")
    min_et = Param(float, 30.0, doc="ET threshold, GeV")
    max_eta = Param(float, 2.5, doc="acceptance")
    min_count = Param(int, 1, doc="electrons needed")

    def filter(self, event):
        e = event.get(self.electrons)
        passing = (e["et"] >= self.min_et) & (np.abs(e["eta"]) < self.max_eta)
        return int(np.count_nonzero(passing)) >= self.min_count
