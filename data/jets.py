"""Synthetic boosted-jet events: one hadronic top-quark jet or one QCD jet, plus soft particles.

The model (numbers in ``data/README.md``):

* **Top** (``is_top``): pT uniform in [400, 600] GeV, |eta| < 2, phi uniform, mass from a
  Breit-Wigner (173.0, width 1.42, kept within 5 widths). t -> b W and W -> q q' are
  two-body decays, isotropic in the parent's rest frame, boosted to the lab with exact Lorentz
  boosts; the W mass is a Breit-Wigner (80.4, width 2.09). The b and the light quarks leave
  their decay as *prongs* with a virtual mass (the b: sqrt(4.8^2 + m^2); light: sqrt(0.33^2 +
  m^2), m ~ lognormal, median 4 % of the prong's expected energy), so the prongs' four-momenta
  add up exactly to the W's and the top's.
* **QCD**: one parton (a gluon 60 % of the time, else a light quark), same pT/eta/phi
  spectrum, with a jet mass ~ lognormal (median 8 % of pT, capped at 35 % of pT): the
  one-prong analogue of the top.
* **Fragmentation** (both): each prong is a "cluster" that splits again and again, 1 -> 2,
  isotropically in its rest frame, into two clusters of masses r1 M and r2 M (r uniform in
  [0.15, 0.6], r1 + r2 <= 0.95), until a cluster is lighter than 1 GeV; it then decays into
  pi+ pi- (2/3) or two photons (1/3; always when lighter than two pions). Four-momentum is
  conserved exactly at every step, and the emissions are collinear (opening angle ~ 2M/E).
* **Underlying event / pileup**: Poisson(80) particles, pT = 0.2 + exponential(0.6) GeV,
  |eta| < 3 uniform, phi uniform; pi+- (2/3) or photons.

Event ``k`` of seed ``s`` uses ``numpy.random.default_rng([s, k, STREAM])`` only.
"""
from __future__ import annotations

import awkward as ak
import numpy as np

from recorun.data.hcal import jagged_records

STREAM = 3
MT, GAMMA_T = 173.0, 1.42
MW, GAMMA_W = 80.4, 2.09
MB, MQ = 4.8, 0.33
M_PION = 0.13957
PT_MIN, PT_MAX = 400.0, 600.0
JET_ETA_MAX = 2.0
PRONG_MASS_MEDIAN, PRONG_MASS_SIGMA = 0.04, 0.5          # of the prong's expected energy
QCD_MASS_MEDIAN, QCD_MASS_SIGMA, QCD_MASS_MAX = 0.08, 0.55, 0.35   # of the jet's pT
QCD_GLUON_FRACTION = 0.6
SPLIT_R = (0.15, 0.6)
SPLIT_MAX_SUM = 0.95
CLUSTER_STOP = 1.0                   # GeV: lighter clusters decay to two hadrons
CHARGED_FRACTION = 2.0 / 3.0
UE_MEAN, UE_PT_MIN, UE_PT_MEAN, UE_ETA_MAX = 80.0, 0.2, 0.6, 3.0

#: PDG ids of the generator-level particles (``GenPart``)
PDG_TOP, PDG_W, PDG_B, PDG_GLUON = 6, 24, 5, 21


def four_vector(pt, eta, phi, mass) -> np.ndarray:
    """``(n, 4)`` array of (px, py, pz, E)."""
    pt, eta, phi, mass = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                               for v in (pt, eta, phi, mass)))
    pz = pt * np.sinh(eta)
    return np.stack([pt * np.cos(phi), pt * np.sin(phi), pz,
                     np.sqrt(pt ** 2 + pz ** 2 + mass ** 2)], axis=-1)


def mass(p) -> np.ndarray:
    """Invariant mass of ``(..., 4)`` four-vectors (0 where m^2 < 0 by rounding)."""
    p = np.asarray(p, dtype=np.float64)
    m2 = p[..., 3] ** 2 - (p[..., :3] ** 2).sum(axis=-1)
    return np.sqrt(np.maximum(m2, 0.0))


def pt_eta_phi(p):
    p = np.asarray(p, dtype=np.float64)
    pt = np.hypot(p[..., 0], p[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(np.where(pt > 0, p[..., 2] / np.where(pt > 0, pt, 1.0), 0.0))
    return pt, eta, np.arctan2(p[..., 1], p[..., 0])


def boost(p_rest, parent, parent_mass) -> np.ndarray:
    """Boost four-vectors ``(n, 4)`` from the rest frame of ``parent`` ``(n, 4)`` (of mass
    ``parent_mass``) to the frame where the parent has four-momentum ``parent``."""
    gamma = parent[:, 3] / parent_mass
    beta = parent[:, :3] / parent[:, 3:4]
    b2 = (beta ** 2).sum(axis=1)
    bp = (beta * p_rest[:, :3]).sum(axis=1)
    g2 = np.where(b2 > 0, (gamma - 1.0) / np.where(b2 > 0, b2, 1.0), 0.0)
    out = np.empty_like(p_rest)
    out[:, :3] = p_rest[:, :3] + ((g2 * bp + gamma * p_rest[:, 3]))[:, None] * beta
    out[:, 3] = gamma * (p_rest[:, 3] + bp)
    return out


def two_body(rng, parent, parent_mass, m1, m2):
    """Isotropic two-body decays of ``parent`` ``(n, 4)`` into masses ``m1``, ``m2``:
    the two daughters' lab four-vectors."""
    M = parent_mass
    pstar = np.sqrt(np.maximum((M ** 2 - (m1 + m2) ** 2) * (M ** 2 - (m1 - m2) ** 2), 0.0)) \
        / (2.0 * M)
    cos = rng.uniform(-1.0, 1.0, len(M))
    phi = rng.uniform(-np.pi, np.pi, len(M))
    sin = np.sqrt(1.0 - cos ** 2)
    direction = np.stack([sin * np.cos(phi), sin * np.sin(phi), cos], axis=1)
    d1 = np.empty((len(M), 4))
    d2 = np.empty((len(M), 4))
    d1[:, :3] = pstar[:, None] * direction
    d2[:, :3] = -d1[:, :3]
    d1[:, 3] = np.sqrt(pstar ** 2 + m1 ** 2)
    d2[:, 3] = np.sqrt(pstar ** 2 + m2 ** 2)
    return boost(d1, parent, M), boost(d2, parent, M)


def _breit_wigner(rng, m0, width, n=None, k=5.0):
    lo = np.arctan(-2.0 * k)
    return m0 + 0.5 * width * np.tan(lo + rng.random(n) * (-2.0 * lo))


def fragment(rng, partons, masses, origin):
    """Fragment clusters ``partons`` ``(k, 4)`` of virtual masses ``masses`` into final
    particles. Returns (four-vectors ``(m, 4)``, charges ``(m,)`` int8, origin index ``(m,)``
    copied from ``origin`` of the cluster each comes from)."""
    p = np.asarray(partons, dtype=np.float64)
    m = np.asarray(masses, dtype=np.float64)
    org = np.asarray(origin)
    final_p, final_q, final_o = [], [], []
    while len(m):
        split = m > CLUSTER_STOP
        # clusters heavier than CLUSTER_STOP: 1 -> 2 clusters
        ps, ms, os_ = p[split], m[split], org[split]
        r = rng.uniform(*SPLIT_R, (2, len(ms)))
        scale = np.minimum(1.0, SPLIT_MAX_SUM / r.sum(axis=0))
        m1, m2 = r * scale * ms
        d1, d2 = two_body(rng, ps, ms, m1, m2)
        # light clusters: two hadrons (pi+ pi- or two photons)
        pl, ml, ol = p[~split], m[~split], org[~split]
        charged = (rng.random(len(ml)) < CHARGED_FRACTION) & (ml > 2.0 * M_PION)
        mh = np.where(charged, M_PION, 0.0)
        h1, h2 = two_body(rng, pl, ml, mh, mh)
        final_p += [h1, h2]
        final_q += [np.where(charged, 1, 0), np.where(charged, -1, 0)]
        final_o += [ol, ol]
        p = np.concatenate([d1, d2])
        m = np.concatenate([m1, m2])
        org = np.concatenate([os_, os_])
    return (np.concatenate(final_p) if final_p else np.empty((0, 4)),
            np.concatenate(final_q).astype(np.int8) if final_q else np.empty(0, np.int8),
            np.concatenate(final_o) if final_o else np.empty(0, np.int64))


def _prong_mass(rng, energy, rest_mass):
    virt = PRONG_MASS_MEDIAN * energy * np.exp(PRONG_MASS_SIGMA * rng.standard_normal())
    return float(np.hypot(rest_mass, virt))


def generate_event(rng: np.random.Generator, top_fraction: float = 0.5) -> dict:
    """One event: ``is_top`` (bool), ``Particle`` (dict of per-particle arrays: px, py, pz, E,
    pt, eta, phi float32; charge int8; parton int8 = index into GenPart of the parton it comes
    from, -1 for the underlying event) and ``GenPart`` (px, py, pz, E, pt, eta, phi, mass
    float32; pdgId int32)."""
    is_top = bool(rng.random() < top_fraction)
    pt = rng.uniform(PT_MIN, PT_MAX)
    eta = rng.uniform(-JET_ETA_MAX, JET_ETA_MAX)
    phi = rng.uniform(-np.pi, np.pi)
    if is_top:
        mt = float(_breit_wigner(rng, MT, GAMMA_T))
        mw = float(_breit_wigner(rng, MW, GAMMA_W))
        top = four_vector(pt, eta, phi, mt)[None]
        e_top = top[0, 3]
        mb = min(_prong_mass(rng, e_top / 3.0, MB), mt - mw - 5.0)
        mq1 = _prong_mass(rng, e_top / 3.0, MQ)
        mq2 = _prong_mass(rng, e_top / 3.0, MQ)
        if mq1 + mq2 > mw - 5.0:
            f = (mw - 5.0) / (mq1 + mq2)
            mq1, mq2 = mq1 * f, mq2 * f
        b, w = two_body(rng, top, np.array([mt]), np.array([mb]), np.array([mw]))
        q1, q2 = two_body(rng, w, np.array([mw]), np.array([mq1]), np.array([mq2]))
        up = rng.random() < 0.5
        gen = np.concatenate([top, w, b, q1, q2])
        pdg = np.array([PDG_TOP, PDG_W, PDG_B, 2 if up else 4, -1 if up else -3], np.int32)
        gen_mass = np.array([mt, mw, mb, mq1, mq2])
        prongs, prong_mass, origin = gen[2:], gen_mass[2:], np.array([2, 3, 4])
    else:
        mj = QCD_MASS_MEDIAN * pt * np.exp(QCD_MASS_SIGMA * rng.standard_normal())
        mj = float(min(mj, QCD_MASS_MAX * pt))
        gluon = rng.random() < QCD_GLUON_FRACTION
        gen = four_vector(pt, eta, phi, mj)[None]
        pdg = np.array([PDG_GLUON if gluon else int(rng.integers(1, 4))], np.int32)
        gen_mass = np.array([mj])
        prongs, prong_mass, origin = gen, gen_mass, np.array([0])
    p, charge, parton = fragment(rng, prongs, prong_mass, origin)

    n_ue = int(rng.poisson(UE_MEAN))
    ue_charged = rng.random(n_ue) < CHARGED_FRACTION
    ue = four_vector(UE_PT_MIN + rng.exponential(UE_PT_MEAN, n_ue),
                     rng.uniform(-UE_ETA_MAX, UE_ETA_MAX, n_ue),
                     rng.uniform(-np.pi, np.pi, n_ue), np.where(ue_charged, M_PION, 0.0))
    ue_q = np.where(ue_charged, np.where(rng.random(n_ue) < 0.5, 1, -1), 0).astype(np.int8)
    p = np.concatenate([p, ue.reshape(-1, 4)])
    charge = np.concatenate([charge, ue_q])
    parton = np.concatenate([parton, np.full(n_ue, -1)]).astype(np.int8)

    def kinematics(vectors):
        ppt, peta, pphi = pt_eta_phi(vectors)
        out = {"px": vectors[:, 0], "py": vectors[:, 1], "pz": vectors[:, 2],
               "E": vectors[:, 3], "pt": ppt, "eta": peta, "phi": pphi}
        return {k: v.astype(np.float32) for k, v in out.items()}

    particles = kinematics(p)
    particles["charge"] = charge
    particles["parton"] = parton
    genpart = kinematics(gen)
    genpart["mass"] = gen_mass.astype(np.float32)
    genpart["pdgId"] = pdg
    return {"is_top": is_top, "Particle": particles, "GenPart": genpart}


PARTICLE_FIELDS = ("px", "py", "pz", "E", "pt", "eta", "phi", "charge", "parton")
GENPART_FIELDS = ("px", "py", "pz", "E", "pt", "eta", "phi", "mass", "pdgId")


def generate(events, seed: int, top_fraction: float = 0.5):
    """(``is_top`` bool NumPy array, ``Particle`` ``var * {...}``, ``GenPart`` ``var * {...}``)
    of the given event numbers."""
    per_event = [generate_event(np.random.default_rng([seed, int(k), STREAM]), top_fraction)
                 for k in events]
    is_top = np.array([ev["is_top"] for ev in per_event], dtype=np.bool_)
    return (is_top, jagged_records([ev["Particle"] for ev in per_event], PARTICLE_FIELDS),
            jagged_records([ev["GenPart"] for ev in per_event], GENPART_FIELDS))


def jet_images(particles, eta0, phi0, npix: int = 224, half_width: float = 1.2) -> np.ndarray:
    """Optional helper: pT-weighted ``(n_events, npix, npix)`` float32 images of the particles
    of each event in a square of +-``half_width`` in eta and phi around (eta0, phi0) (e.g. the
    jet axis, GenPart[0]); rows are eta, columns phi."""
    counts = np.asarray(ak.num(particles, axis=1))
    eta0 = np.repeat(np.asarray(eta0, dtype=np.float64), counts)
    phi0 = np.repeat(np.asarray(phi0, dtype=np.float64), counts)
    pt = np.asarray(ak.flatten(particles.pt), dtype=np.float64)
    deta = np.asarray(ak.flatten(particles.eta), dtype=np.float64) - eta0
    dphi = (np.asarray(ak.flatten(particles.phi), dtype=np.float64) - phi0 + np.pi) \
        % (2 * np.pi) - np.pi
    i = np.floor((deta + half_width) / (2 * half_width) * npix).astype(np.int64)
    j = np.floor((dphi + half_width) / (2 * half_width) * npix).astype(np.int64)
    event = np.repeat(np.arange(len(counts)), counts)
    keep = (i >= 0) & (i < npix) & (j >= 0) & (j < npix)
    images = np.zeros(len(counts) * npix * npix, dtype=np.float64)
    np.add.at(images, (event[keep] * npix + i[keep]) * npix + j[keep], pt[keep])
    return images.reshape(len(counts), npix, npix).astype(np.float32)
