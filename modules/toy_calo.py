"""A toy calorimeter: generated hits for workflows that run with no input file.

Each event holds dijets and a soft underlying event. Jets come in pairs balanced in the
transverse plane (back to back in phi within ``dijet_dphi``, ET balanced within
``dijet_balance``); in a fraction ``invisible_fraction`` of events one jet recoils against an
invisible particle instead (genuine missing ET). A jet of transverse energy ET at (eta, phi)
leaves ``hits_per_jet`` hits around its axis with a Gaussian profile of width ``jet_width`` in
eta and phi; the underlying event is ``noise_hits`` hits of exponentially distributed energy
spread uniformly. Hits live on a grid of ``N_IETA x N_IPHI`` cells covering |eta| < 2.8.
The generation is deterministic: the random stream is seeded by (seed, run, event).
"""
from __future__ import annotations

import numpy as np

from recorun import Param, Producer

N_IETA, N_IPHI = 56, 72
ETA_MAX = 2.8
CELL_ETA = 2 * ETA_MAX / N_IETA
CELL_PHI = 2 * np.pi / N_IPHI

HIT_DTYPE = np.dtype([("ieta", "i2"), ("iphi", "i2"), ("energy", "f4")])


class ToyCaloHitProducer(Producer):
    """Generates calorimeter hits (``ieta``, ``iphi``, ``energy`` in GeV) and the true jets."""

    produces = ("", "truth")
    seed = Param(int, 12345, doc="random seed; each event's stream is seeded by (seed, run, event)")
    mean_dijets = Param(float, 1.5, doc="mean number of balanced jet pairs per event (Poisson)")
    dijet_dphi = Param(float, 0.2, doc="spread of a pair's phi difference around pi")
    dijet_balance = Param(float, 0.1, doc="relative spread of a pair's ET ratio around 1")
    invisible_fraction = Param(float, 0.05, doc="events with a jet recoiling on an invisible")
    jet_et_scale = Param(float, 40.0, doc="jet ET spectrum: 20 GeV + exponential of this mean")
    jet_width = Param(float, 0.1, doc="Gaussian width of a jet's energy profile in eta and phi")
    hits_per_jet = Param(int, 60, doc="hits a jet leaves")
    noise_hits = Param(int, 400, doc="underlying-event hits per event")
    noise_energy = Param(float, 0.4, doc="mean energy of an underlying-event hit, GeV")

    def produce(self, event):
        rng = np.random.default_rng([self.seed, event.id.run, event.id.event])
        n_pairs = rng.poisson(self.mean_dijets)
        lead_et = 20.0 + rng.exponential(self.jet_et_scale, n_pairs)
        lead_phi = rng.uniform(-np.pi, np.pi, n_pairs)
        jet_et = np.concatenate([lead_et, lead_et * rng.normal(1.0, self.dijet_balance,
                                                                n_pairs).clip(0.3, 3.0)])
        jet_phi = np.concatenate([lead_phi, lead_phi + np.pi
                                  + rng.normal(0.0, self.dijet_dphi, n_pairs)])
        if rng.random() < self.invisible_fraction:      # a jet against an invisible particle
            jet_et = np.append(jet_et, 30.0 + rng.exponential(self.jet_et_scale))
            jet_phi = np.append(jet_phi, rng.uniform(-np.pi, np.pi))
        n_jets = jet_et.size
        jet_phi = np.mod(jet_phi + np.pi, 2 * np.pi) - np.pi
        jet_eta = rng.uniform(-2.5, 2.5, n_jets)

        # jets: split each jet's ET over its hits (Dirichlet fractions), convert to energy
        eta = rng.normal(np.repeat(jet_eta, self.hits_per_jet), self.jet_width)
        phi = rng.normal(np.repeat(jet_phi, self.hits_per_jet), self.jet_width)
        fractions = rng.dirichlet(np.ones(self.hits_per_jet), n_jets).ravel() if n_jets else []
        et = np.repeat(jet_et, self.hits_per_jet) * fractions
        # underlying event
        eta = np.concatenate([eta, rng.uniform(-ETA_MAX, ETA_MAX, self.noise_hits)])
        phi = np.concatenate([phi, rng.uniform(-np.pi, np.pi, self.noise_hits)])
        et = np.concatenate([et, rng.exponential(self.noise_energy, self.noise_hits)])

        inside = np.abs(eta) < ETA_MAX
        eta, phi, et = eta[inside], np.mod(phi[inside] + np.pi, 2 * np.pi) - np.pi, et[inside]
        hits = np.empty(eta.size, HIT_DTYPE)
        hits["ieta"] = np.clip(((eta + ETA_MAX) / CELL_ETA).astype(np.int16), 0, N_IETA - 1)
        hits["iphi"] = np.clip(((phi + np.pi) / CELL_PHI).astype(np.int16), 0, N_IPHI - 1)
        hits["energy"] = et * np.cosh(eta)
        event.put(hits)

        truth = np.empty(n_jets, [("et", "f4"), ("eta", "f4"), ("phi", "f4")])
        truth["et"], truth["eta"], truth["phi"] = jet_et, jet_eta, jet_phi
        event.put(truth, "truth")
