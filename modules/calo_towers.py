"""Calorimeter towers, jets and missing transverse energy.

Towers are a structured array with fields ``ieta``, ``iphi``, ``eta``, ``phi``, ``et`` (GeV),
one entry per tower above threshold, whatever the geometry; jets and missing ET work on them.

* :class:`CaloTowerProducer`: sums the energy of hits (rechits) sharing (ieta, iphi), over
  depths, into towers.
* :class:`TowerJetProducer`: an iterative seeded-cone jet algorithm on the towers.
* :class:`MissingEtProducer`: the magnitude of the negative vector sum of tower ET.
"""
from __future__ import annotations

import numpy as np

from recorun import Concurrency, InputTag, Param, Producer

from .calo_geometry import GEOMETRIES

TOWER_DTYPE = np.dtype([("ieta", "i2"), ("iphi", "i2"), ("eta", "f4"), ("phi", "f4"),
                        ("et", "f4")])
JET_DTYPE = np.dtype([("pt", "f4"), ("eta", "f4"), ("phi", "f4"), ("n_towers", "i4")])


def wrap_phi(phi):
    return np.mod(phi + np.pi, 2 * np.pi) - np.pi


class CaloTowerProducer(Producer):
    """Towers from hits with fields ieta, iphi, energy (GeV); towers under ``threshold`` ET
    are dropped."""

    concurrency = Concurrency.SHARED
    hits = InputTag("hits", doc="hits or rechits with fields ieta, iphi, energy")
    geometry = Param(str, "toy", doc="cell geometry", choices=tuple(GEOMETRIES))
    threshold = Param(float, 0.5, doc="zero-suppression threshold on tower ET, GeV")

    def produce(self, event):
        hits = event.get(self.hits)
        key = (hits["ieta"].astype(np.int64) + 1024) * 1024 + hits["iphi"]    # one int per cell
        cells, inverse = np.unique(key, return_inverse=True)
        energy = np.bincount(inverse, weights=hits["energy"], minlength=len(cells))
        ieta, iphi = cells // 1024 - 1024, cells % 1024
        eta, phi = GEOMETRIES[self.geometry](ieta, iphi)
        et = energy / np.cosh(eta)
        keep = et >= self.threshold
        towers = np.empty(int(keep.sum()), TOWER_DTYPE)
        towers["ieta"], towers["iphi"] = ieta[keep], iphi[keep]
        towers["eta"], towers["phi"], towers["et"] = eta[keep], phi[keep], et[keep]
        event.put(towers)


class TowerJetProducer(Producer):
    """Jets from towers: the highest unused tower above ``seed_et`` seeds a cone of radius
    ``radius``; its towers form a jet (ET-weighted axis) and are removed; repeat."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="towers with fields eta, phi, et")
    radius = Param(float, 0.4, doc="cone radius in (eta, phi)")
    seed_et = Param(float, 3.0, doc="minimum ET of a seed tower, GeV")
    min_pt = Param(float, 15.0, doc="minimum jet pT, GeV")

    def produce(self, event):
        towers = event.get(self.towers)
        et = towers["et"].astype(np.float64)
        eta = towers["eta"].astype(np.float64)
        phi = towers["phi"].astype(np.float64)
        free = et > 0
        jets = []
        for seed in np.argsort(et)[::-1]:
            if et[seed] < self.seed_et:
                break
            if not free[seed]:
                continue
            dphi = wrap_phi(phi - phi[seed])
            members = free & ((eta - eta[seed]) ** 2 + dphi ** 2 < self.radius ** 2)
            free &= ~members
            w = et[members]
            pt = w.sum()
            if pt < self.min_pt:
                continue
            jets.append((pt, np.dot(w, eta[members]) / pt,
                         wrap_phi(phi[seed] + np.dot(w, dphi[members]) / pt), members.sum()))
        event.put(np.array(jets, dtype=JET_DTYPE))


class MissingEtProducer(Producer):
    """Missing transverse energy (GeV) as a float: |sum over towers of -ET (cos phi, sin phi)|."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="towers with fields phi, et")

    def produce(self, event):
        towers = event.get(self.towers)
        et = towers["et"].astype(np.float64)
        phi = towers["phi"].astype(np.float64)
        event.put(float(np.hypot(np.dot(et, np.cos(phi)), np.dot(et, np.sin(phi)))))
