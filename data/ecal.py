"""Synthetic ECAL electrons: 4-layer 56x11 images of deposited energy, as DeepCalo reads them.

An image covers 0.175 in eta (56 pixels of 0.003125, the strip granularity) by 0.270 in phi
(11 pixels of 0.0245, the middle-layer granularity) around the cluster centre, in 4 layers:
presampler, strips, middle, back. Energies are in GeV at the electromagnetic scale.

The model (numbers in ``data/README.md``):

* **Energy**: pdf ~ E^-1.5 between 5 and 500 GeV; eta uniform in |eta| < 2.47, phi uniform.
* **Longitudinal**: the gamma-function profile dE/dt = E b (bt)^(a-1) e^(-bt) / Gamma(a),
  t in radiation lengths X0, b = 0.5, t_max = (a - 1) / b = ln(E / Ec) - 0.5, Ec = 10 MeV,
  integrated over the layers' depth ranges :data:`LAYER_X0` (beyond the last: leakage, not
  seen). Shower-to-shower fluctuations: the 5 shares (4 layers + leakage) of each electron
  are drawn from a Dirichlet distribution with mean the profile's shares (mean-preserving).
* **Lateral**: per layer, a core and a tail Gaussian (:data:`LATERAL`), integrated exactly
  over the pixels, centred on the impact point, offset from the image centre by up to half a
  middle-layer cell (0.0125) in eta and phi.
* **Sampling**: each pixel's energy is Gamma-distributed with mean its expected energy and
  variance ``STOCHASTIC**2 * mean`` (so the sum over pixels has resolution
  ``STOCHASTIC / sqrt(E)``), times a per-electron constant term ``1 + N(0, CONSTANT)``.
* **Noise**: Gaussian electronic noise per pixel, :data:`NOISE_GEV` per layer.

Event ``k`` of seed ``s`` uses ``numpy.random.default_rng([s, k, STREAM])`` only.
"""
from __future__ import annotations

import awkward as ak
import numpy as np

STREAM = 2
IMAGE_SHAPE = (4, 56, 11)
LAYERS = ("presampler", "strips", "middle", "back")
ETA_WIDTH, PHI_WIDTH = 0.175, 0.270
D_ETA = ETA_WIDTH / IMAGE_SHAPE[1]           # 0.003125
D_PHI = PHI_WIDTH / IMAGE_SHAPE[2]           # 0.02455
ETA_EDGES = D_ETA * (np.arange(IMAGE_SHAPE[1] + 1) - IMAGE_SHAPE[1] / 2)
PHI_EDGES = D_PHI * (np.arange(IMAGE_SHAPE[2] + 1) - IMAGE_SHAPE[2] / 2)

ELECTRONS_MEAN = 5.0                         # per event: max(1, Poisson(5))
E_MIN, E_MAX, E_INDEX = 5.0, 500.0, 1.5      # pdf ~ E^-1.5 on [5, 500] GeV
ETA_MAX = 2.47
IMPACT_OFFSET = 0.0125                       # uniform in +-half a middle cell, eta and phi

#: layer boundaries in radiation lengths from the shower start; beyond the last: leakage
LAYER_X0 = (0.0, 3.0, 7.5, 21.5, 27.5)
PROFILE_B = 0.5
CRITICAL_ENERGY_GEV = 0.010
DIRICHLET_CONCENTRATION = 300.0

#: per layer: (core sigma, tail sigma, core fraction); sigmas in eta/phi units
LATERAL = ((0.010, 0.025, 0.55),
           (0.0035, 0.015, 0.70),
           (0.006, 0.020, 0.75),
           (0.012, 0.025, 0.50))
STOCHASTIC = 0.10                            # sampling term, GeV^0.5
CONSTANT = 0.007
NOISE_GEV = (0.004, 0.002, 0.004, 0.003)     # per pixel and layer

# nominal cluster: 3x7 middle-layer cells (24 x 7 pixels) around the centre, all layers
WINDOW_ETA = slice(IMAGE_SHAPE[1] // 2 - 12, IMAGE_SHAPE[1] // 2 + 12)
WINDOW_PHI = slice(IMAGE_SHAPE[2] // 2 - 3, IMAGE_SHAPE[2] // 2 + 4)

_T_STEP = 0.01
_T_GRID = _T_STEP * np.arange(6001)              # 0..60 X0


def profile_shares(energy) -> np.ndarray:
    """Mean shares of the shower energy in the 4 layers and the leakage, ``(n, 5)``."""
    energy = np.atleast_1d(np.asarray(energy, dtype=np.float64))
    tmax = np.maximum(np.log(energy / CRITICAL_ENERGY_GEV) - 0.5, 0.5)
    a = 1.0 + PROFILE_B * tmax
    x = PROFILE_B * _T_GRID[None, 1:]
    logx = np.log(x)
    idx = np.rint(np.asarray(LAYER_X0) / _T_STEP).astype(np.int64)
    shares = np.empty((len(a), 5))
    for start in range(0, len(a), 256):             # bounded memory: 256 x 6000 at a time
        ac = a[start:start + 256, None]
        # the density on the grid (0 at t = 0), integrated by trapezoids and normalised
        # numerically (the grid reaches far past any shower)
        dens = np.exp((ac - 1.0) * logx - x)
        cdf = np.zeros((len(ac), len(_T_GRID)))
        cdf[:, 1] = 0.5 * dens[:, 0]
        cdf[:, 2:] = cdf[:, 1:2] + np.cumsum(0.5 * (dens[:, 1:] + dens[:, :-1]), axis=1)
        cdf /= cdf[:, -1:]
        at = cdf[:, idx]                             # CDF at the layer boundaries
        shares[start:start + 256, :4] = np.diff(at, axis=1)
        shares[start:start + 256, 4] = 1.0 - at[:, -1]
    return shares


def layer_fractions(energy) -> np.ndarray:
    """Mean fraction of the *visible* (non-leaking) energy in each layer, ``(n, 4)``."""
    s = profile_shares(energy)[:, :4]
    return s / s.sum(axis=1, keepdims=True)


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


def _nominal_calibration() -> float:
    energy = 50.0
    expected = lateral_maps(np.zeros(1), np.zeros(1)) \
        * profile_shares(energy)[:, :4, None, None]
    return float(1.0 / expected[0, :, WINDOW_ETA, WINDOW_PHI].sum())


#: scale of the nominal cluster energy: 1 / (expected window sum / E) of a 50 GeV electron
NOMINAL_CALIBRATION = _nominal_calibration()


def nominal_energy(images: np.ndarray) -> np.ndarray:
    """The nominal estimate: calibrated sum over all layers of a 3x7 middle-cell window."""
    return NOMINAL_CALIBRATION * images[..., WINDOW_ETA, WINDOW_PHI].sum(axis=(-3, -2, -1))


def expected_resolution(energy) -> np.ndarray:
    """Expected standard deviation (GeV) of the image sum for a true energy (GeV)."""
    energy = np.asarray(energy, dtype=np.float64)
    noise2 = np.prod(IMAGE_SHAPE[1:]) * np.sum(np.square(NOISE_GEV))
    return np.sqrt(STOCHASTIC ** 2 * energy + (CONSTANT * energy) ** 2 + noise2)


def generate_event(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One event's electrons: per-electron arrays ``energy``, ``eta``, ``phi``,
    ``trueEnergy`` (float32) and ``image`` (n, 4, 56, 11) float32."""
    n = max(1, int(rng.poisson(ELECTRONS_MEAN)))
    u = rng.random(n)
    a = 1.0 - E_INDEX
    energy = (E_MIN ** a + u * (E_MAX ** a - E_MIN ** a)) ** (1.0 / a)
    eta = rng.uniform(-ETA_MAX, ETA_MAX, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    offsets = rng.uniform(-IMPACT_OFFSET, IMPACT_OFFSET, (2, n))

    # Dirichlet(concentration * mean shares), drawn as normalised Gamma variates
    shares = rng.gamma(DIRICHLET_CONCENTRATION * profile_shares(energy))
    shares /= shares.sum(axis=1, keepdims=True)
    expected = energy[:, None, None, None] * shares[:, :4, None, None] \
        * lateral_maps(offsets[0], offsets[1])
    scale = STOCHASTIC ** 2
    image = rng.gamma(expected / scale, scale)
    image *= (1.0 + CONSTANT * rng.standard_normal(n))[:, None, None, None]
    image += np.asarray(NOISE_GEV)[None, :, None, None] * rng.standard_normal(image.shape)
    image = image.astype(np.float32)
    return {"energy": nominal_energy(image).astype(np.float32),
            "eta": eta.astype(np.float32), "phi": phi.astype(np.float32),
            "trueEnergy": energy.astype(np.float32), "image": image}


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
