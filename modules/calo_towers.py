"""Calorimeter towers, jets and missing transverse energy from calorimeter hits.

* :class:`CaloTowerProducer`: sums hit transverse energies into an (ieta, iphi) tower grid.
* :class:`TowerJetProducer`: an iterative seeded-cone jet algorithm on the towers.
* :class:`MissingEtProducer`: the magnitude of the negative vector sum of tower ET.
"""
from __future__ import annotations

import numpy as np

from framework import Concurrency, InputTag, Param, Producer

from .toy_calo import N_IETA, N_IPHI, cell_centers

JET_DTYPE = np.dtype([("pt", "f4"), ("eta", "f4"), ("phi", "f4"), ("n_towers", "i4")])

_ETA, _PHI = cell_centers()
_COSH_ETA = np.cosh(_ETA)


class CaloTowerProducer(Producer):
    """Tower ET grid (GeV), shape (56, 72); towers under ``threshold`` are zeroed."""

    concurrency = Concurrency.SHARED
    hits = InputTag("hits", doc="calorimeter hits with fields ieta, iphi, energy")
    threshold = Param(float, 0.5, doc="zero-suppression threshold on tower ET, GeV")

    def produce(self, event):
        hits = event.get(self.hits)
        cell = hits["ieta"].astype(np.intp) * N_IPHI + hits["iphi"]
        energy = np.bincount(cell, weights=hits["energy"], minlength=N_IETA * N_IPHI)
        et = (energy.reshape(N_IETA, N_IPHI) / _COSH_ETA).astype(np.float32)
        et[et < self.threshold] = 0.0
        event.put(et)


class TowerJetProducer(Producer):
    """Jets from towers: the highest unused tower above ``seed_et`` seeds a cone of radius
    ``radius``; its towers form a jet (ET-weighted axis) and are removed; repeat."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="tower ET grid")
    radius = Param(float, 0.4, doc="cone radius in (eta, phi)")
    seed_et = Param(float, 3.0, doc="minimum ET of a seed tower, GeV")
    min_pt = Param(float, 15.0, doc="minimum jet pT, GeV")

    def produce(self, event):
        et = np.asarray(event.get(self.towers), dtype=np.float64).ravel()
        eta, phi = _ETA.ravel(), _PHI.ravel()
        free = et > 0
        jets = []
        for seed in np.argsort(et)[::-1]:
            if et[seed] < self.seed_et:
                break
            if not free[seed]:
                continue
            dphi = np.mod(phi - phi[seed] + np.pi, 2 * np.pi) - np.pi
            members = free & ((eta - eta[seed]) ** 2 + dphi ** 2 < self.radius ** 2)
            free &= ~members
            w = et[members]
            pt = w.sum()
            if pt < self.min_pt:
                continue
            jet_phi = phi[seed] + np.dot(w, dphi[members]) / pt
            jets.append((pt, np.dot(w, eta[members]) / pt,
                         np.mod(jet_phi + np.pi, 2 * np.pi) - np.pi, members.sum()))
        event.put(np.array(jets, dtype=JET_DTYPE))


class MissingEtProducer(Producer):
    """Missing transverse energy (GeV) as a float: |sum over towers of -ET (cos phi, sin phi)|."""

    concurrency = Concurrency.SHARED
    towers = InputTag("towers", doc="tower ET grid")

    def produce(self, event):
        et = np.asarray(event.get(self.towers), dtype=np.float64)
        mex = -np.sum(et * np.cos(_PHI))
        mey = -np.sum(et * np.sin(_PHI))
        event.put(float(np.hypot(mex, mey)))
