"""Synthetic HCAL digis: 8 time samples of charge per channel, as FACILE reads them.

The model (details and numbers in ``data/README.md``):

* **Geometry** (:data:`GEOMETRY`): HB |ieta| 1-16 with depths 1-4, HE |ieta| 17-29 with 2-7
  depths per ring; iphi 1-72, but only odd iphi (10 degree towers) for |ieta| >= 21. That is
  :data:`N_CHANNELS` = 16128 channels, the "full detector".
* **Conditions** (fixed, from :data:`CONDITIONS_SEED`, the same for every event and seed): a
  gain in GeV/fC (~10 % spread around a subdetector/depth-dependent mean), a pedestal and a
  pedestal noise width in fC, per channel.
* **In-time energy** (``trueEnergy``, GeV): pileup (Poisson number of hits per channel, each
  exponential) plus hadronic deposits of jets and isolated hadrons (falling spectra) spread
  over towers by a lateral profile and over depths by a longitudinal one, with shower
  fluctuations.
* **Readout**: which ``channels`` channels an event reads out: every channel whose in-time
  energy passes a zero-suppression threshold (the highest first if there are too many), the
  rest drawn at random; sorted by detector index.
* **Digis**: 8 samples (TS0-TS7, 25 ns) of charge in fC = pedestal + Gaussian noise + the
  pulses of the in-time energy (sample of interest :data:`SOI` = TS3) and of out-of-time
  pileup (bunch crossings -8..+4), each pulse shared over samples by :data:`PULSE_FRACTIONS`
  after photostatistics smearing.

Everything is deterministic: event ``k`` of seed ``s`` uses ``numpy.random.default_rng([s, k,
STREAM])`` and nothing else.
"""
from __future__ import annotations

import math

import awkward as ak
import numpy as np

STREAM = 1                 # third element of the seed sequence: HCAL's own random stream
CONDITIONS_SEED = 20210101
N_SAMPLES = 8
SOI = 3

# ---------------------------------------------------------------------------- pulse shape
PULSE_GAMMA_SHAPE = 3       # fast component: gamma distribution, shape 3, scale 6 ns
PULSE_GAMMA_SCALE_NS = 6.0
PULSE_SLOW_WEIGHT = 0.10    # slow scintillation tail: exponential, 30 ns, 10 % of the charge
PULSE_SLOW_TAU_NS = 30.0
PULSE_PHASE_NS = 3.0        # the pulse starts 3 ns into its bunch crossing's 25 ns sample


def _pulse_cdf(t):
    t = np.maximum(np.asarray(t, dtype=np.float64), 0.0)
    x = t / PULSE_GAMMA_SCALE_NS
    fast = 1.0 - np.exp(-x) * sum(x ** i / math.factorial(i) for i in range(PULSE_GAMMA_SHAPE))
    slow = 1.0 - np.exp(-t / PULSE_SLOW_TAU_NS)
    return (1.0 - PULSE_SLOW_WEIGHT) * fast + PULSE_SLOW_WEIGHT * slow


def pulse_fractions(n: int = N_SAMPLES) -> np.ndarray:
    """Fraction of a pulse's charge in the sample where it arrives and the ``n - 1`` after."""
    edges = 25.0 * np.arange(n + 1) - PULSE_PHASE_NS
    return np.diff(_pulse_cdf(edges))


#: charge fractions in samples SOI, SOI+1, ... of an in-time pulse:
#: 0.690, 0.275, 0.0254, 0.0056, 0.0022, 0.0010, 0.0005, 0.0002 (sum 0.99986)
PULSE_FRACTIONS = pulse_fractions()
#: fraction in SOI and SOI+1, the two samples the simple reconstruction sums
CONTAINMENT_2TS = float(PULSE_FRACTIONS[0] + PULSE_FRACTIONS[1])

# ---------------------------------------------------------------------------- geometry
HB_MAX_IETA = 16
HE_MAX_IETA = 29
HB_DEPTHS = 4
HE_DEPTHS = {17: 2, 18: 5, 19: 6, 20: 6, 21: 6, 22: 6, 23: 6, 24: 6, 25: 6,
             26: 7, 27: 7, 28: 7, 29: 7}
#: |eta| edges of the rings |ieta| = 1..29 (0.087 wide up to 20, then CMS HE's edges)
ETA_EDGES = np.concatenate([0.087 * np.arange(21),
                            [1.830, 1.930, 2.043, 2.172, 2.322, 2.500, 2.650, 2.868, 3.000]])
SUBDET_HB, SUBDET_HE = 1, 2          # CMS HcalSubdetector: HcalBarrel = 1, HcalEndcap = 2


def n_depths(ieta_abs: int) -> int:
    return HB_DEPTHS if ieta_abs <= HB_MAX_IETA else HE_DEPTHS[ieta_abs]


def _build_geometry():
    towers = []                       # (ieta, iphi)
    for ieta in list(range(-HE_MAX_IETA, 0)) + list(range(1, HE_MAX_IETA + 1)):
        phis = range(1, 73, 2) if abs(ieta) >= 21 else range(1, 73)
        towers += [(ieta, iphi) for iphi in phis]
    towers = np.array(towers, dtype=np.int16)
    t_ieta, t_iphi = towers[:, 0], towers[:, 1]
    absi = np.abs(t_ieta).astype(np.int64)
    t_eta = np.sign(t_ieta) * 0.5 * (ETA_EDGES[absi - 1] + ETA_EDGES[absi])
    width = np.where(absi >= 21, 2, 1)            # in units of 5 degrees
    t_phi = np.deg2rad(5.0 * (t_iphi - 1 + 0.5 * width))
    t_phi = (t_phi + np.pi) % (2 * np.pi) - np.pi
    ndep = np.array([n_depths(int(a)) for a in absi])
    tower = np.repeat(np.arange(len(towers)), ndep)
    depth = np.concatenate([np.arange(1, n + 1) for n in ndep]).astype(np.int8)
    ch_ndep = ndep[tower]
    # longitudinal sharing of a hadronic shower over the depths of a tower:
    # w_d ~ x^1.5 exp(-2.5 x), x = (d - 0.5) / n_depths
    x = (depth - 0.5) / ch_ndep
    w = x ** 1.5 * np.exp(-2.5 * x)
    wsum = np.zeros(len(towers))
    np.add.at(wsum, tower, w)
    geometry = {
        "ieta": t_ieta[tower].astype(np.int16),
        "iphi": t_iphi[tower].astype(np.int16),
        "depth": depth,
        "subdet": np.where(absi[tower] <= HB_MAX_IETA, SUBDET_HB, SUBDET_HE).astype(np.int8),
        "tower": tower,
        "depth_weight": w / wsum[tower],
    }
    return geometry, {"ieta": t_ieta, "iphi": t_iphi, "eta": t_eta, "phi": t_phi}


#: per-channel coordinates (ieta, iphi, depth, subdet), the channel's tower index and the
#: share of a tower's hadronic energy its depth receives, in detector-index order
GEOMETRY, TOWERS = _build_geometry()
N_CHANNELS = len(GEOMETRY["ieta"])            # 16128
N_TOWERS = len(TOWERS["ieta"])                # 3528


def _build_conditions():
    rng = np.random.default_rng(CONDITIONS_SEED)
    n = N_CHANNELS
    he = GEOMETRY["subdet"] == SUBDET_HE
    depth = GEOMETRY["depth"].astype(np.float64)
    mean_gain = np.where(he, 0.120, 0.100) * (1.0 + 0.03 * (depth - 1))       # GeV/fC
    gain = mean_gain * np.clip(1.0 + 0.10 * rng.standard_normal(n), 0.7, 1.3)
    pedestal = rng.normal(8.0, 1.0, n).clip(4.0, 12.0)                         # fC
    noise = rng.normal(1.2, 0.15, n).clip(0.8, 1.8)                            # fC
    return {"gain": gain.astype(np.float32), "pedestal": pedestal.astype(np.float32),
            "noise": noise.astype(np.float32)}


#: per-channel gain (GeV/fC), pedestal (fC) and pedestal noise width (fC), float32
CONDITIONS = _build_conditions()

# ---------------------------------------------------------------------------- energy model
PU_HITS_PER_BX = 0.25        # mean number of pileup hits per channel and bunch crossing
PU_HIT_MEAN_GEV = 0.6        # each exponential with this mean
OOT_BX = tuple(b for b in range(-8, 5) if b != 0)
JETS_MEAN = 2.0              # jets per event: 1 + Poisson(2)
JET_EMIN, JET_EMAX, JET_INDEX = 30.0, 1000.0, 2.0        # hadronic energy, pdf ~ E^-2
JET_LATERAL = 0.05           # exp(-dR / 0.05) over towers with dR < 0.4
HADRONS_MEAN = 25.0          # isolated hadrons per event: Poisson(25)
HADRON_EMIN, HADRON_EMAX, HADRON_INDEX = 2.0, 500.0, 1.8
HADRON_LATERAL = 0.03        # exp(-dR / 0.03) over towers with dR < 0.15
SHOWER_SHAPE = 4.0           # channel shares fluctuate by Gamma(4, 1/4) (mean 1, 50 %)
DEPOSIT_ETA_MAX = 3.0
ADC_LSB_FC = 0.25            # digitization step of the charges (well below the noise)
PE_PER_GEV = 40.0            # photostatistics: Poisson(40 E) photoelectrons
ZS_THRESHOLD_GEV = 0.5       # channels above this are read out first


def _power_law(rng, n, lo, hi, index):
    """``n`` values with pdf ~ x^-index on [lo, hi] (index != 1)."""
    u = rng.random(n)
    a = 1.0 - index
    return (lo ** a + u * (hi ** a - lo ** a)) ** (1.0 / a)


def _deposits(rng, n, emin, emax, index, lateral, dr_max):
    """Tower energies (N_TOWERS,) of ``n`` showers with a falling energy spectrum."""
    energy = _power_law(rng, n, emin, emax, index)
    eta = rng.uniform(-DEPOSIT_ETA_MAX, DEPOSIT_ETA_MAX, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    deta = TOWERS["eta"][None, :] - eta[:, None]
    dphi = (TOWERS["phi"][None, :] - phi[:, None] + np.pi) % (2 * np.pi) - np.pi
    dr = np.hypot(deta, dphi)
    w = np.where(dr < dr_max, np.exp(-dr / lateral), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    return (energy[:, None] * w).sum(axis=0)


def _pileup(rng, shape):
    hits = rng.poisson(PU_HITS_PER_BX, shape)
    return rng.gamma(hits, PU_HIT_MEAN_GEV)       # sum of `hits` exponentials (0 for none)


def generate_event(rng: np.random.Generator, channels: int = 16000) -> dict[str, np.ndarray]:
    """One event's digis: a dict of per-channel NumPy arrays (the fields of ``HcalDigi``)."""
    if not 1 <= channels <= N_CHANNELS:
        raise ValueError(f"channels must be in 1..{N_CHANNELS}, got {channels}")
    # in-time energy of every channel of the detector
    tower_e = _deposits(rng, 1 + rng.poisson(JETS_MEAN), JET_EMIN, JET_EMAX, JET_INDEX,
                        JET_LATERAL, 0.4)
    tower_e += _deposits(rng, rng.poisson(HADRONS_MEAN), HADRON_EMIN, HADRON_EMAX,
                         HADRON_INDEX, HADRON_LATERAL, 0.15)
    hard = tower_e[GEOMETRY["tower"]] * GEOMETRY["depth_weight"]
    hard *= rng.gamma(SHOWER_SHAPE, 1.0 / SHOWER_SHAPE, N_CHANNELS)
    true_e = hard + _pileup(rng, N_CHANNELS)

    # which channels are read out
    above = np.flatnonzero(true_e > ZS_THRESHOLD_GEV)
    if len(above) >= channels:
        chosen = above[np.argsort(-true_e[above], kind="stable")[:channels]]
    else:
        rest = np.flatnonzero(true_e <= ZS_THRESHOLD_GEV)
        chosen = np.concatenate([above, rng.choice(rest, channels - len(above),
                                                   replace=False)])
    chosen.sort()
    n = channels

    # energy per bunch crossing (columns: OOT_BX..., then in-time), photostatistics
    bx = np.array(OOT_BX + (0,))
    energy = np.empty((n, len(bx)))
    energy[:, :-1] = _pileup(rng, (n, len(OOT_BX)))
    energy[:, -1] = true_e[chosen]
    seen = rng.poisson(PE_PER_GEV * energy) / PE_PER_GEV

    gain = CONDITIONS["gain"][chosen].astype(np.float64)
    pedestal = CONDITIONS["pedestal"][chosen].astype(np.float64)
    noise = CONDITIONS["noise"][chosen].astype(np.float64)
    # pulse matrix: charge fraction in TS i of a pulse arriving in BX b (relative to SOI)
    j = np.arange(N_SAMPLES)[None, :] - (SOI + bx[:, None])
    shape = np.where(j >= 0, PULSE_FRACTIONS[np.clip(j, 0, N_SAMPLES - 1)], 0.0)
    charge = (seen / gain[:, None]) @ shape
    charge += pedestal[:, None] + noise[:, None] * rng.standard_normal((n, N_SAMPLES))
    charge = np.round(charge / ADC_LSB_FC) * ADC_LSB_FC          # digitization

    out = {"ieta": GEOMETRY["ieta"][chosen], "iphi": GEOMETRY["iphi"][chosen],
           "depth": GEOMETRY["depth"][chosen], "subdet": GEOMETRY["subdet"][chosen],
           "gain": gain.astype(np.float32), "pedestal": pedestal.astype(np.float32),
           "noise": noise.astype(np.float32)}
    for i in range(N_SAMPLES):
        out[f"q{i}"] = charge[:, i].astype(np.float32)
    out["trueEnergy"] = true_e[chosen].astype(np.float32)
    return out


#: the fields of an ``HcalDigi`` record, in the order they are written
FIELDS = ("ieta", "iphi", "depth", "subdet", "gain", "pedestal", "noise",
          *(f"q{i}" for i in range(N_SAMPLES)), "trueEnergy")


def jagged_records(per_event: list[dict[str, np.ndarray]], fields) -> ak.Array:
    """``var * {field: number}`` from one dict of equal-length NumPy arrays per event."""
    counts = np.array([len(ev[fields[0]]) for ev in per_event], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    contents = [ak.contents.NumpyArray(np.concatenate([ev[f] for ev in per_event]))
                for f in fields]
    record = ak.contents.RecordArray(contents, list(fields), length=int(offsets[-1]))
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), record))


def generate(events, seed: int, channels: int = 16000) -> ak.Array:
    """``HcalDigi`` of the given event numbers: ``var * {ieta, iphi, ..., trueEnergy}``."""
    per_event = [generate_event(np.random.default_rng([seed, int(k), STREAM]), channels)
                 for k in events]
    return jagged_records(per_event, FIELDS)


# ---------------------------------------------------------------------------- FACILE
#: the 15 FACILE inputs per channel, in column order
FACILE_INPUTS = ("q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7",
                 "ieta", "iphi", "depth", "gain", "pedestal", "noise", "subdet")


def _field(digis, name):
    value = digis[name]
    if isinstance(value, ak.Array):
        value = ak.flatten(value, axis=None)
    return np.asarray(value)


def facile_inputs(digis) -> np.ndarray:
    """The ``(n_channels, 15)`` float32 FACILE input matrix, columns :data:`FACILE_INPUTS`.

    ``digis``: an ``HcalDigi`` awkward array (one event's or several events', flattened in
    order), a structured NumPy array or a dict of per-channel arrays.
    """
    columns = [_field(digis, name) for name in FACILE_INPUTS]
    # contiguous rows, then one transposing copy: faster than 15 strided column writes
    return np.ascontiguousarray(np.array(columns, dtype=np.float32).T)


def simple_energy(digis) -> np.ndarray:
    """The simple reconstruction: ``gain * (q3 + q4 - 2 pedestal) / (f0 + f1)`` (GeV), per
    channel (flattened), where f0, f1 are the pulse fractions in SOI and SOI+1."""
    q = _field(digis, f"q{SOI}").astype(np.float64) + _field(digis, f"q{SOI + 1}")
    ped = _field(digis, "pedestal").astype(np.float64)
    return _field(digis, "gain") * (q - 2.0 * ped) / CONTAINMENT_2TS
