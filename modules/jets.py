"""Jets from particles, and jet images for the ResNet-50 top tagger.

* :class:`AntiKtJetProducer` clusters an event's particles (``px, py, pz, E``) with FastJet's
  anti-kt algorithm (E-scheme recombination, radius ``R``) through its Python bindings and
  puts the jets above ``min_pt``, highest pT first, as a structured array
  (:data:`JET_DTYPE`: ``pt, eta, phi, mass, n_constituents``), and their constituents as the
  product instance ``constituents`` (:data:`CONSTITUENT_DTYPE`: ``jet`` = index of the jet in
  the jets array, ``index`` = index of the particle in the input collection, ``pt, eta,
  phi``, ``charge``), grouped by jet and by decreasing pT within a jet.
* :class:`JetImageProducer` makes a ``(n, 3, npix, npix)`` float32 image (``npix`` = 224) of
  each of the leading ``max_jets`` jets with pT >= ``min_pt`` (as many as there are, no
  padding: ``n`` may be 0).

**Jet images.** An image is centred on the jet axis: pixel ``[c, i, j]`` covers
``deta = eta - y_jet`` in ``[-h + i d, -h + (i + 1) d)`` (rows: eta) and ``dphi = phi -
phi_jet`` (wrapped into [-pi, pi)) in ``[-h + j d, -h + (j + 1) d)`` (columns: phi), with ``h``
= ``half_width`` (default 0.8 = the default R: an anti-kt jet of radius R is, up to soft
particles at its edge, a disc of radius R around its axis, so the square of half-width R holds
practically all its constituents) and ``d = 2 h / npix`` (0.0071 for the defaults, finer than
the angular separation of a 500 GeV top's decay products, ~2 m / pT ~ 0.7). No rotation or
flip is applied: the images are in detector (eta, phi) orientation. ``y_jet`` is the jet's
rapidity (from its pt, eta and mass), not its pseudorapidity: anti-kt clusters in (y, phi),
and the constituents, (nearly) massless, have eta = y; for a 500 GeV top jet the two differ
by up to ~0.07, ten pixels.

The channels follow the "jet images in colour" of Komiske, Metodiev and Schwartz (JHEP 01
(2017) 110), with the total pT in place of their neutral pT:

* channel 0: sum of the pT of the jet's constituents in the pixel / the jet pT (so the image
  sums to the pT fraction of the jet inside the window, ~1; a scalar sum over the vector sum,
  so slightly above 1 for a massive jet);
* channel 1: the same for the charged constituents only (channel 0 - channel 1 is the neutral,
  here photon, pT);
* channel 2: the number of charged constituents in the pixel (the charged multiplicity,
  which separates three-prong tops from one-prong QCD jets and quarks from gluons; counts are
  already of order 1, so not normalised).

Charge comes from the particles' ``charge`` field; a particle collection without one is taken
as all neutral (channels 1 and 2 then empty). Only the jet's own constituents enter its image,
not other particles inside the window.

**Performance** (2-core development machine, one thread, ``data/samples/jets_sample.root``:
~124 particles per event): anti-kt R = 0.8, 0.53 ms per event (building the PseudoJets in
Python is about half of it); images, 0.12 ms per event (1.1 jets above 20 GeV per event). The
leading jet's mass peaks in the 170-180 GeV bin for top events (median 155 GeV: a tail from
decay products outside R), median 47 GeV for QCD.
"""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from recorun import Concurrency, InputTag, Param, Producer

__all__ = ["AntiKtJetProducer", "CONSTITUENT_DTYPE", "JET_DTYPE", "JetImageProducer",
           "cluster_antikt", "jet_images"]

JET_DTYPE = np.dtype([("pt", "f4"), ("eta", "f4"), ("phi", "f4"), ("mass", "f4"),
                      ("n_constituents", "i4")])
CONSTITUENT_DTYPE = np.dtype([("jet", "i4"), ("index", "i4"), ("pt", "f4"), ("eta", "f4"),
                              ("phi", "f4"), ("charge", "i1")])
N_CHANNELS = 3


def _fields(collection) -> tuple[str, ...]:
    if isinstance(collection, dict):
        return tuple(collection)
    names = getattr(getattr(collection, "dtype", None), "names", None)
    if names:
        return tuple(names)
    return tuple(getattr(collection, "fields", ()))


def _pt_eta_phi(px, py, pz):
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.where(pt > 0, np.arcsinh(pz / np.where(pt > 0, pt, 1.0)),
                       np.sign(pz) * np.inf)
    return pt, eta, np.arctan2(py, px)


_BANNER_SHOWN = False


def fastjet_quietly():
    """The ``fastjet`` module, its banner (which FastJet prints on stdout at a process's first
    clustering) already printed, on stderr (nowhere when the job is quiet, ``-q``: logging
    above INFO): stdout keeps only the job's reports."""
    global _BANNER_SHOWN
    import fastjet

    if not _BANNER_SHOWN:
        _BANNER_SHOWN = True
        sys.stdout.flush()
        saved = os.dup(1)
        quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
        target = os.open(os.devnull, os.O_WRONLY) if quiet else os.dup(2)
        try:
            os.dup2(target, 1)
            fastjet.ClusterSequence([fastjet.PseudoJet(1.0, 0.0, 0.0, 1.0)],
                                    fastjet.JetDefinition(fastjet.antikt_algorithm, 0.4))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(target)
    return fastjet


def cluster_antikt(particles, radius: float = 0.8, min_pt: float = 20.0,
                   jet_definition=None) -> tuple[np.ndarray, np.ndarray]:
    """Anti-kt jets of one event's particles (a Collection, structured array or dict with
    fields px, py, pz, E and optionally charge). Returns (jets, constituents) as
    :data:`JET_DTYPE` and :data:`CONSTITUENT_DTYPE` arrays, jets by decreasing pT."""
    fastjet = fastjet_quietly()

    if jet_definition is None:
        jet_definition = fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    px, py, pz, energy = (np.asarray(particles[f], dtype=np.float64)
                          for f in ("px", "py", "pz", "E"))
    charge = (np.asarray(particles["charge"], dtype=np.int8) if "charge" in _fields(particles)
              else np.zeros(len(px), dtype=np.int8))
    inputs = []
    for k, p4 in enumerate(zip(px.tolist(), py.tolist(), pz.tolist(), energy.tolist())):
        pj = fastjet.PseudoJet(*p4)
        pj.set_user_index(k)
        inputs.append(pj)
    if not inputs:
        return np.empty(0, JET_DTYPE), np.empty(0, CONSTITUENT_DTYPE)
    sequence = fastjet.ClusterSequence(inputs, jet_definition)
    found = fastjet.sorted_by_pt(sequence.inclusive_jets(min_pt))
    jets = np.empty(len(found), JET_DTYPE)
    members = []
    for i, jet in enumerate(found):
        index = np.fromiter((c.user_index() for c in jet.constituents()), dtype=np.int64)
        members.append(index)
        jets[i] = (jet.pt(), jet.eta(), jet.phi_std(), np.sqrt(max(jet.m2(), 0.0)),
                   len(index))
    index = np.concatenate(members) if members else np.empty(0, np.int64)
    constituents = np.empty(len(index), CONSTITUENT_DTYPE)
    constituents["jet"] = np.repeat(np.arange(len(jets)), jets["n_constituents"])
    constituents["index"] = index
    pt, eta, phi = _pt_eta_phi(px[index], py[index], pz[index])
    constituents["pt"], constituents["eta"], constituents["phi"] = pt, eta, phi
    constituents["charge"] = charge[index]
    # by jet, then by decreasing pT
    order = np.lexsort((-constituents["pt"], constituents["jet"]))
    return jets, constituents[order]


class AntiKtJetProducer(Producer):
    """Anti-kt jets (FastJet, E scheme) of the particles: the jets (pt, eta, phi, mass,
    n_constituents; highest pT first) and, as instance ``constituents``, their particles
    (jet, index, pt, eta, phi, charge)."""

    requires = {"fastjet": "recorun[jets]"}
    produces = ("", "constituents")
    particles = InputTag("source:Particle", doc="particles with fields px, py, pz, E "
                                                "(and charge, carried to the constituents)")
    R = Param(float, 0.8, doc="anti-kt radius parameter")
    min_pt = Param(float, 20.0, doc="jets below this pT (GeV) are dropped")

    def begin_job(self):
        fastjet = fastjet_quietly()

        if not self.R > 0:
            raise ValueError(f"R must be positive, got {self.R}")
        self._definition = fastjet.JetDefinition(fastjet.antikt_algorithm, self.R)

    def produce(self, event):
        definition = getattr(self, "_definition", None)
        jets, constituents = cluster_antikt(event.get(self.particles), self.R, self.min_pt,
                                            definition)
        event.put(jets)
        event.put(constituents, "constituents")


def _axis_eta(jets) -> np.ndarray:
    """The jets' axes in the constituents' eta: the jet rapidity (computed from pt, eta and
    mass when there is a mass field), the coordinate anti-kt clusters in, which for (nearly)
    massless constituents equals their pseudorapidity."""
    eta = np.asarray(jets["eta"], dtype=np.float64)
    if "mass" not in _fields(jets):
        return eta
    pt = np.asarray(jets["pt"], dtype=np.float64)
    mt = np.hypot(pt, np.asarray(jets["mass"], dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.arcsinh(pt * np.sinh(eta) / mt)
    return np.where(mt > 0, y, eta)


def jet_images(jets, constituents, max_jets: int = 10, min_pt: float = 0.0,
               npix: int = 224, half_width: float = 0.8) -> np.ndarray:
    """``(n, 3, npix, npix)`` float32 images of the leading jets (see the module docstring):
    ``jets`` with fields pt, eta, phi (highest pT first); ``constituents`` with fields jet
    (index into ``jets``), pt, eta, phi and optionally charge."""
    jet_pt = np.asarray(jets["pt"], dtype=np.float64)
    order = np.argsort(-jet_pt, kind="stable")
    chosen = order[jet_pt[order] >= min_pt][:max_jets]
    n = len(chosen)
    images = np.zeros((n, N_CHANNELS, npix, npix), dtype=np.float32)
    if n == 0 or len(constituents) == 0:
        return images
    slot = np.full(len(jet_pt), -1, dtype=np.int64)
    slot[chosen] = np.arange(n)
    c_slot = slot[np.asarray(constituents["jet"], dtype=np.int64)]
    use = c_slot >= 0
    c_slot = c_slot[use]
    c_jet = np.asarray(constituents["jet"], dtype=np.int64)[use]
    pt = np.asarray(constituents["pt"], dtype=np.float64)[use]
    deta = np.asarray(constituents["eta"], dtype=np.float64)[use] - _axis_eta(jets)[c_jet]
    dphi = (np.asarray(constituents["phi"], dtype=np.float64)[use]
            - np.asarray(jets["phi"], dtype=np.float64)[c_jet] + np.pi) % (2 * np.pi) - np.pi
    scale = npix / (2.0 * half_width)
    i = np.floor((deta + half_width) * scale)
    j = np.floor((dphi + half_width) * scale)
    inside = (i >= 0) & (i < npix) & (j >= 0) & (j < npix)
    fields = _fields(constituents)
    charged = (np.asarray(constituents["charge"])[use] != 0 if "charge" in fields
               else np.zeros(len(pt), dtype=bool))
    c_slot, pt, charged = c_slot[inside], pt[inside], charged[inside]
    pixel = i[inside].astype(np.int64) * npix + j[inside].astype(np.int64)
    frac = pt / jet_pt[chosen][c_slot]
    flat = images.reshape(n, N_CHANNELS, npix * npix)
    np.add.at(flat, (c_slot, 0, pixel), frac)
    np.add.at(flat, (c_slot[charged], 1, pixel[charged]), frac[charged])
    np.add.at(flat, (c_slot[charged], 2, pixel[charged]), 1.0)
    return images


class JetImageProducer(Producer):
    """(n, 3, npix, npix) float32 jet images of the leading ``max_jets`` jets with pT >=
    ``min_pt``, centred on each jet's axis, |deta|, |dphi| < ``half_width``; channels: pT /
    jet pT, charged pT / jet pT, charged multiplicity (see modules/jets.py)."""

    concurrency = Concurrency.SHARED
    jets = InputTag("jets", doc="jets with fields pt, eta, phi")
    constituents = InputTag("jets:constituents",
                            doc="constituents with fields jet, pt, eta, phi (and charge)")
    max_jets = Param(int, 10, doc="images for at most this many jets, the highest pT first")
    min_pt = Param(float, 0.0, doc="jets below this pT (GeV) get no image")
    npix = Param(int, 224, doc="pixels per side")
    half_width = Param(float, 0.8, doc="half-width of the window in eta and in phi")

    def begin_job(self):
        if self.max_jets < 0 or self.npix < 1 or not self.half_width > 0:
            raise ValueError(f"need max_jets >= 0, npix >= 1 and half_width > 0 (got "
                             f"{self.max_jets}, {self.npix}, {self.half_width})")

    def produce(self, event):
        event.put(jet_images(event.get(self.jets), event.get(self.constituents),
                             self.max_jets, self.min_pt, self.npix, self.half_width))
