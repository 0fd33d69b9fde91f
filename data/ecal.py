"""Synthetic ECAL electrons: 4-layer 56x11 images of deposited energy, as DeepCalo reads them.

An image covers 0.175 in eta (56 pixels of 0.003125, the strip granularity) by 0.270 in phi
(11 pixels of 0.0245, the middle-layer granularity) around the cluster centre, in 4 layers:
presampler, strips, middle, back. Energies are in GeV at the electromagnetic scale.

The model (numbers and their reasons in ``data/README.md``, "ECAL electrons"), ATLAS-like:

* **Energy**: pdf ~ E^-1.5 between 5 and 500 GeV; eta uniform in |eta| < 2.47, phi uniform.
* **Longitudinal**: the gamma-function profile dE/dt = E b (bt)^(a-1) e^(-bt) / Gamma(a),
  t in radiation lengths X0 along the electron's path from where the material starts. The
  path crosses, in order (:func:`segment_boundaries`): the upstream material (inner
  detector, solenoid, cryostat; :data:`UPSTREAM_X0`, growing with |eta|), the presampler
  (an active slab, :data:`PRESAMPLER_X0`), the dead material between presampler and strips
  (:data:`GAP_X0`), then the strips, middle and back layers, whose depths in X0
  (:data:`LAYER_DEPTH_X0` at eta 0) grow with the path length (:data:`DEPTH_SCALE`); beyond
  the back layer the energy leaks out. Energy in the upstream material, the gap and the
  leakage is lost; the presampler sees the shower where the upstream material ends, so
  that its energy measures part of the loss. The mean profile has t_max = ln(E / Ec) - 0.5,
  b = 0.5; each electron's t_max and a fluctuate as in GFLASH (correlated log-normal), so
  that early and late showers lose more or less upstream; the 7 segments' shares are then
  drawn from a Dirichlet distribution around them (local, uncorrelated fluctuations).
* **Lateral**: per layer, a core and a tail Gaussian (:data:`LATERAL`), integrated exactly
  over the pixels, centred on the impact point, offset from the image centre by up to half a
  middle-layer cell (0.0125) in eta and phi. In a projective geometry the shower's width in
  eta-phi units hardly depends on eta in the barrel: it is not varied.
* **Sampling**: each pixel's energy is Gamma-distributed with mean its expected energy and
  variance ``STOCHASTIC**2 * mean`` (so the sum over pixels has resolution
  ``STOCHASTIC / sqrt(E)``), times a per-electron constant term ``1 + N(0, CONSTANT)``.
* **Pileup**: per event a number of interactions mu, uniform in :data:`MU_RANGE`; per image
  and layer a Poisson number of single-pixel deposits (mean proportional to mu), each of
  exponential energy with mean :data:`PILEUP_DEPOSIT_ET` x cosh(eta) (pileup is flat in
  transverse energy per unit eta): sparse, positive, more energetic at large |eta|.
* **Noise**: Gaussian electronic noise per pixel, :data:`NOISE_GEV` per layer.

The nominal energy (:func:`nominal_energy`) is the window sum calibrated on average:
``NOMINAL_SCALE * (window sum - NOMINAL_PILEUP_OFFSET)``, one scale and one offset
for all electrons, from the model's mean over the energy spectrum, eta and mu.

Event ``k`` of seed ``s`` uses ``numpy.random.default_rng([s, k, STREAM])`` only.
"""
from __future__ import annotations

import math

import awkward as ak
import numpy as np

STREAM = 2
IMAGE_SHAPE = (4, 56, 11)
LAYERS = ("presampler", "strips", "middle", "back")
#: the segments of the electron's path, in order; "upstream", "gap" and "leakage" are lost
SEGMENTS = ("upstream", "presampler", "gap", "strips", "middle", "back", "leakage")
VISIBLE = (1, 3, 4, 5)                       # the segments that are the image's 4 layers
ETA_WIDTH, PHI_WIDTH = 0.175, 0.270
D_ETA = ETA_WIDTH / IMAGE_SHAPE[1]           # 0.003125
D_PHI = PHI_WIDTH / IMAGE_SHAPE[2]           # 0.02455
ETA_EDGES = D_ETA * (np.arange(IMAGE_SHAPE[1] + 1) - IMAGE_SHAPE[1] / 2)
PHI_EDGES = D_PHI * (np.arange(IMAGE_SHAPE[2] + 1) - IMAGE_SHAPE[2] / 2)

ELECTRONS_MEAN = 5.0                         # per event: max(1, Poisson(5))
E_MIN, E_MAX, E_INDEX = 5.0, 500.0, 1.5      # pdf ~ E^-1.5 on [5, 500] GeV
ETA_MAX = 2.47
IMPACT_OFFSET = 0.0125                       # uniform in +-half a middle cell, eta and phi

# ---- longitudinal: material and layer depths (X0 along the electron's path)
#: material in front of the presampler vs |eta| (ATLAS-like: ~2 X0 at eta 0, rising to
#: 4.5 X0 over 1.5-2 where the inner detector's services and the cryostat are crossed
#: obliquely, less towards 2.47)
UPSTREAM_ETA = (0.0, 0.8, 1.2, 1.5, 2.0, 2.47)
UPSTREAM_X0 = (2.0, 2.3, 3.0, 4.5, 4.5, 3.5)
PRESAMPLER_X0 = 0.3                          # the presampler's active slab
GAP_X0 = 0.4                                 # dead material between presampler and strips
#: strips, middle, back at eta 0 (ATLAS barrel: ~4.4, ~16, ~2 X0; 22 X0 in all)
LAYER_DEPTH_X0 = (4.4, 16.0, 2.0)
#: factor on LAYER_DEPTH_X0 vs |eta|: the path length through the layers (ATLAS: 22-30 X0
#: over |eta| 0-0.8, 24-33 X0 over 0.8-1.3 where the barrel's lead gets thinner, 24-38 X0
#: over the endcap 1.475-2.5)
DEPTH_ETA = (0.0, 0.8, 0.81, 1.37, 1.52, 2.47)
DEPTH_SCALE = (1.00, 1.36, 1.09, 1.50, 1.09, 1.60)

PROFILE_B = 0.5
CRITICAL_ENERGY_GEV = 0.010
#: Dirichlet concentration of the segments' shares around the electron's own profile
DIRICHLET_CONCENTRATION = 1000.0

# ---- lateral, sampling, noise
#: per layer: (core sigma, tail sigma, core fraction); sigmas in eta/phi units
LATERAL = ((0.010, 0.025, 0.55),
           (0.0035, 0.015, 0.70),
           (0.006, 0.020, 0.75),
           (0.012, 0.025, 0.50))
STOCHASTIC = 0.10                            # sampling term, GeV^0.5
CONSTANT = 0.007
NOISE_GEV = (0.004, 0.002, 0.004, 0.003)     # per pixel and layer

# ---- pileup
MU_RANGE = (20.0, 60.0)                      # interactions per crossing, uniform per event
#: pileup transverse energy in the ECAL per unit eta x phi area and per interaction (GeV):
#: minimum bias at 13 TeV, dET/deta ~ 4.5 GeV, ~40 % of it electromagnetic, over 2 pi
PILEUP_ET_DENSITY = 0.3
PILEUP_LAYER_SHARES = (0.10, 0.35, 0.50, 0.05)   # soft particles shower early
PILEUP_DEPOSIT_ET = 0.02                     # mean transverse energy of one pixel deposit
IMAGE_AREA = ETA_WIDTH * PHI_WIDTH
#: mean pileup deposits per image, per layer and per interaction
PILEUP_DEPOSITS_PER_MU = tuple(PILEUP_ET_DENSITY * IMAGE_AREA * s / PILEUP_DEPOSIT_ET
                               for s in PILEUP_LAYER_SHARES)

# nominal cluster: 3x7 middle-layer cells (24 x 7 pixels) around the centre, all layers
WINDOW_ETA = slice(IMAGE_SHAPE[1] // 2 - 12, IMAGE_SHAPE[1] // 2 + 12)
WINDOW_PHI = slice(IMAGE_SHAPE[2] // 2 - 3, IMAGE_SHAPE[2] // 2 + 4)
WINDOW_AREA = 24 * D_ETA * 7 * D_PHI


# ---------------------------------------------------------------------------- geometry
def upstream_x0(eta) -> np.ndarray:
    """Material in front of the presampler (X0 along the path) at pseudorapidity ``eta``."""
    return np.interp(np.abs(np.asarray(eta, dtype=np.float64)), UPSTREAM_ETA, UPSTREAM_X0)


def depth_scale(eta) -> np.ndarray:
    """Path-length factor on the strips', middle's and back's depths in X0."""
    return np.interp(np.abs(np.asarray(eta, dtype=np.float64)), DEPTH_ETA, DEPTH_SCALE)


def segment_boundaries(eta) -> np.ndarray:
    """Depths (X0 from the start of the material) where the :data:`SEGMENTS` end, but the
    leakage: ``(n, 6)``: upstream, presampler, gap, strips, middle, back."""
    eta = np.atleast_1d(np.asarray(eta, dtype=np.float64))
    thick = np.empty((len(eta), 6))
    thick[:, 0] = upstream_x0(eta)
    thick[:, 1] = PRESAMPLER_X0
    thick[:, 2] = GAP_X0
    thick[:, 3:] = depth_scale(eta)[:, None] * np.asarray(LAYER_DEPTH_X0)
    return np.cumsum(thick, axis=1)


# ---------------------------------------------------------------------------- profile
def _gamma_cdf(a, x, terms: int = 200) -> np.ndarray:
    """Regularised lower incomplete gamma function P(a, x) (the CDF of Gamma(a, 1)), by its
    series x^a e^-x / Gamma(a + 1) sum_n x^n / ((a + 1)...(a + n)); arrays broadcast. Exact
    to ~1e-12 for the a < 20 and x <= 60 used here (1 beyond)."""
    a, x = np.broadcast_arrays(np.asarray(a, dtype=np.float64),
                               np.clip(np.asarray(x, dtype=np.float64), 0.0, 60.0))
    term = np.ones_like(x)
    total = np.ones_like(x)
    for n in range(1, terms):
        term = term * x / (a + n)
        total += term
    lgam = np.vectorize(math.lgamma, otypes=[np.float64])(a + 1.0)
    with np.errstate(divide="ignore"):
        log_prefactor = a * np.log(x) - x - lgam
    return np.clip(np.exp(log_prefactor) * total, 0.0, 1.0)


def mean_profile(energy) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the mean longitudinal profile at ``energy`` (GeV)."""
    energy = np.atleast_1d(np.asarray(energy, dtype=np.float64))
    tmax = np.maximum(np.log(energy / CRITICAL_ENERGY_GEV) - 0.5, 0.5)
    return 1.0 + PROFILE_B * tmax, np.full_like(tmax, PROFILE_B)


def shower_fluctuations(energy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of each electron's own profile: ln t_max and ln a drawn around the mean
    profile's with GFLASH's widths and correlation (Grindhammer & Peters, homogeneous
    media): sigma(ln T) = 1 / (1.26 ln y - 1.4), sigma(ln a) = 1 / (0.86 ln y - 0.58),
    rho = 0.705 - 0.023 ln y, y = E / Ec."""
    a0, b0 = mean_profile(energy)
    lny = np.log(np.asarray(energy, dtype=np.float64) / CRITICAL_ENERGY_GEV)
    sigma_t = 1.0 / (1.26 * lny - 1.4)
    sigma_a = 1.0 / (0.86 * lny - 0.58)
    rho = 0.705 - 0.023 * lny
    z1, z2 = rng.standard_normal((2, len(lny)))
    tmax = (a0 - 1.0) / b0 * np.exp(sigma_t * z1)
    a = a0 * np.exp(sigma_a * (rho * z1 + np.sqrt(1.0 - rho ** 2) * z2))
    a = np.maximum(a, 1.05)
    return a, (a - 1.0) / tmax


def segment_shares(a, b, eta) -> np.ndarray:
    """Shares of the shower energy in the :data:`SEGMENTS`, ``(n, 7)``, for profiles (a, b)
    crossing the material at ``eta``."""
    a = np.atleast_1d(a)
    cdf = _gamma_cdf(a[:, None], np.atleast_1d(b)[:, None] * segment_boundaries(eta))
    return np.diff(np.concatenate([np.zeros((len(a), 1)), cdf, np.ones((len(a), 1))],
                                  axis=1), axis=1)


def profile_shares(energy, eta=0.0) -> np.ndarray:
    """Shares of the mean profile in the :data:`SEGMENTS`, ``(n, 7)``, for ``energy``
    (GeV) and ``eta`` (broadcast together)."""
    energy, eta = np.broadcast_arrays(np.atleast_1d(np.asarray(energy, dtype=np.float64)),
                                      np.atleast_1d(np.asarray(eta, dtype=np.float64)))
    a, b = mean_profile(energy)
    return segment_shares(a, b, eta)


def layer_fractions(energy, eta=0.0) -> np.ndarray:
    """Mean fraction of the *visible* energy in each layer of the image, ``(n, 4)``."""
    s = profile_shares(energy, eta)[:, VISIBLE]
    return s / s.sum(axis=1, keepdims=True)


def visible_fraction(energy, eta=0.0) -> np.ndarray:
    """Mean fraction of the electron's energy seen in the 4 layers (not lost upstream, in
    the gap or by leakage), ``(n,)``."""
    return profile_shares(energy, eta)[:, VISIBLE].sum(axis=1)


# ---------------------------------------------------------------------------- lateral
def _erf(x):
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7
    s = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-x * x)
    return s * y


def _gauss_bins(edges, centre, sigma):
    """Fraction of a Gaussian(centre, sigma) in each bin: (n, len(edges) - 1)."""
    z = (edges[None, :] - centre[:, None]) / (np.sqrt(2.0) * sigma)
    return 0.5 * np.diff(_erf(z), axis=1)


def lateral_maps(eta_offset, phi_offset) -> np.ndarray:
    """Share of each layer's energy in each pixel, ``(n, 4, 56, 11)`` (sums to < 1: the
    part outside the image is lost)."""
    eta_offset = np.atleast_1d(eta_offset)
    phi_offset = np.atleast_1d(phi_offset)
    maps = np.empty((len(eta_offset),) + IMAGE_SHAPE)
    for layer, (core, tail, fcore) in enumerate(LATERAL):
        maps[:, layer] = (
            fcore * np.einsum("ni,nj->nij", _gauss_bins(ETA_EDGES, eta_offset, core),
                              _gauss_bins(PHI_EDGES, phi_offset, core))
            + (1.0 - fcore) * np.einsum("ni,nj->nij", _gauss_bins(ETA_EDGES, eta_offset, tail),
                                        _gauss_bins(PHI_EDGES, phi_offset, tail)))
    return maps


# ---------------------------------------------------------------------------- pileup
def pileup_energy_density(mu, eta) -> np.ndarray:
    """Mean pileup energy (GeV) per unit eta x phi area for ``mu`` interactions at ``eta``."""
    return PILEUP_ET_DENSITY * np.asarray(mu) * np.cosh(np.asarray(eta, dtype=np.float64))


def add_pileup(image: np.ndarray, mu: float, eta: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Add pileup deposits to ``image`` (n, 4, 56, 11) in place; returns the pileup alone."""
    n = len(image)
    counts = rng.poisson(mu * np.asarray(PILEUP_DEPOSITS_PER_MU)[None, :], (n, 4))
    total = int(counts.sum())
    electron, layer = np.repeat(np.indices((n, 4)).reshape(2, -1), counts.ravel(), axis=1)
    pixel = rng.integers(0, IMAGE_SHAPE[1] * IMAGE_SHAPE[2], total)
    energy = rng.exponential(PILEUP_DEPOSIT_ET, total) * np.cosh(eta[electron])
    pileup = np.zeros(image.shape)
    flat = pileup.reshape(n, 4, -1)
    np.add.at(flat, (electron, layer, pixel), energy)
    image += pileup
    return pileup


# ---------------------------------------------------------------------------- nominal
def _mean_window_fraction(energy, eta) -> np.ndarray:
    """Mean share of the energy in the nominal window (all layers), impact points averaged
    over the +-half-cell offsets: ``(n,)`` for the (energy, eta) pairs."""
    grid = (np.arange(5) - 2) / 2 * IMPACT_OFFSET
    oe, op = np.meshgrid(grid, grid)
    maps = lateral_maps(oe.ravel(), op.ravel())
    contained = maps[:, :, WINDOW_ETA, WINDOW_PHI].sum(axis=(2, 3)).mean(axis=0)   # (4,)
    return profile_shares(energy, eta)[:, VISIBLE] @ contained


def _nominal_calibration() -> tuple[float, float]:
    """(scale, pileup offset): the offset is the mean pileup energy in the window over mu and
    eta; the scale the inverse of the median window fraction over the energy spectrum and
    eta (uniform), from the mean profiles: the median electron comes out right."""
    mean_cosh = np.sinh(ETA_MAX) / ETA_MAX
    offset = PILEUP_ET_DENSITY * np.mean(MU_RANGE) * WINDOW_AREA * mean_cosh
    # energies at the spectrum's quantiles (equal weights), eta uniform in [0, ETA_MAX]
    u = (np.arange(40) + 0.5) / 40
    k = 1.0 - E_INDEX
    energy = (E_MIN ** k + u * (E_MAX ** k - E_MIN ** k)) ** (1.0 / k)
    eta = (np.arange(25) + 0.5) / 25 * ETA_MAX
    e, h = np.meshgrid(energy, eta)
    return float(1.0 / np.median(_mean_window_fraction(e.ravel(), h.ravel()))), float(offset)


#: the nominal cluster's calibration, the same for every electron (data/README.md)
NOMINAL_SCALE, NOMINAL_PILEUP_OFFSET = _nominal_calibration()


def nominal_energy(images: np.ndarray) -> np.ndarray:
    """The nominal estimate: the sum over all layers of a 3x7 middle-cell window, less the
    mean pileup in it, times the mean calibration scale."""
    window = images[..., WINDOW_ETA, WINDOW_PHI].sum(axis=(-3, -2, -1))
    return NOMINAL_SCALE * (window - NOMINAL_PILEUP_OFFSET)


def expected_resolution(energy) -> np.ndarray:
    """Expected standard deviation (GeV) of the image sum around the energy the layers
    receive (``energy``: the visible energy, GeV): sampling, constant term and noise, the
    calorimeter's intrinsic resolution. Upstream loss, leakage and pileup come on top."""
    energy = np.asarray(energy, dtype=np.float64)
    noise2 = np.prod(IMAGE_SHAPE[1:]) * np.sum(np.square(NOISE_GEV))
    return np.sqrt(STOCHASTIC ** 2 * energy + (CONSTANT * energy) ** 2 + noise2)


# ---------------------------------------------------------------------------- events
def generate_event(rng: np.random.Generator, truth: bool = False) -> dict[str, np.ndarray]:
    """One event's electrons: per-electron arrays ``energy``, ``eta``, ``phi``,
    ``trueEnergy`` (float32) and ``image`` (n, 4, 56, 11) float32.

    ``truth=True`` adds what the files do not hold: ``mu`` (the event's interactions),
    ``shares`` (n, 7) (each electron's energy shares in the :data:`SEGMENTS`) and
    ``pileup`` (n, 4, 56, 11) (the pileup part of the images)."""
    n = max(1, int(rng.poisson(ELECTRONS_MEAN)))
    u = rng.random(n)
    k = 1.0 - E_INDEX
    energy = (E_MIN ** k + u * (E_MAX ** k - E_MIN ** k)) ** (1.0 / k)
    eta = rng.uniform(-ETA_MAX, ETA_MAX, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    offsets = rng.uniform(-IMPACT_OFFSET, IMPACT_OFFSET, (2, n))
    mu = rng.uniform(*MU_RANGE)

    a, b = shower_fluctuations(energy, rng)
    # Dirichlet(concentration * the electron's shares), drawn as normalised Gamma variates
    # (+1e-12: a share can be exactly 0, e.g. no leakage behind a deep endcap)
    shares = rng.gamma(DIRICHLET_CONCENTRATION * segment_shares(a, b, eta) + 1e-12)
    shares /= shares.sum(axis=1, keepdims=True)
    expected = energy[:, None, None, None] * shares[:, VISIBLE, None, None] \
        * lateral_maps(offsets[0], offsets[1])
    scale = STOCHASTIC ** 2
    image = rng.gamma(expected / scale, scale)
    image *= (1.0 + CONSTANT * rng.standard_normal(n))[:, None, None, None]
    pileup = add_pileup(image, mu, eta, rng)
    image += np.asarray(NOISE_GEV)[None, :, None, None] * rng.standard_normal(image.shape)
    image = image.astype(np.float32)
    out = {"energy": nominal_energy(image).astype(np.float32),
           "eta": eta.astype(np.float32), "phi": phi.astype(np.float32),
           "trueEnergy": energy.astype(np.float32), "image": image}
    if truth:
        out.update(mu=mu, shares=shares, pileup=pileup)
    return out


#: the scalar fields of an ``Electron`` record, in the order they are written
FIELDS = ("energy", "eta", "phi", "trueEnergy")


def generate(events, seed: int) -> tuple[ak.Array, ak.Array]:
    """(``Electron`` ``var * {energy, eta, phi, trueEnergy}``, images ``var * 4 * 56 * 11 *
    float32``) of the given event numbers."""
    per_event = [generate_event(np.random.default_rng([seed, int(k), STREAM])) for k in events]
    counts = np.array([len(ev["energy"]) for ev in per_event], dtype=np.int64)
    offsets = ak.index.Index64(np.concatenate([[0], np.cumsum(counts)]))
    record = ak.contents.RecordArray(
        [ak.contents.NumpyArray(np.concatenate([ev[f] for ev in per_event])) for f in FIELDS],
        list(FIELDS), length=int(counts.sum()))
    images = ak.contents.NumpyArray(np.concatenate([ev["image"] for ev in per_event]))
    return (ak.Array(ak.contents.ListOffsetArray(offsets, record)),
            ak.Array(ak.contents.ListOffsetArray(offsets, images)))
