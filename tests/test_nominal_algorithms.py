"""The nominal (non-ML) CPU algorithms: MAHI-like HCAL reconstruction (modules/hcal_mahi.py),
anti-kt jets and jet images (modules/jets.py)."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from recorun.data import hcal
from recorun.data.generate import generate_hcal_events
from recorun import Analyzer, Concurrency, InputTagList, Param
from recorun.modules.hcal_mahi import (DEFAULT_ACTIVE_BX, HcalMahiReco, mahi_fit, nnls,
                               pulse_templates)
from recorun.modules.hcal_reco import RECHIT_DTYPE
from recorun.modules.jets import CONSTITUENT_DTYPE, JET_DTYPE, cluster_antikt, jet_images

REPO = Path(__file__).resolve().parent.parent
JETS_SAMPLE = REPO / "data" / "samples" / "jets_sample.root"
HLT_SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"
ENERGY_BINS = [(0.5, 1.0), (1.0, 2.0), (2.0, 5.0), (5.0, 10.0), (10.0, 20.0)]


class Collect(Analyzer):
    """Records ``(event.index, {tag: summarize(product)})`` in the test's Recorder."""

    concurrency = Concurrency.SHARED
    products = InputTagList(doc="products to record")
    recorder = Param(object, doc="the test's Recorder")
    summarize = Param(object, None, doc="function applied to each product before recording")

    def analyze(self, event):
        f = self.summarize or (lambda tag, value: value)
        self.recorder.record(event.index, {t: f(t, event.get(t)) for t in self.products})


def collected(recorder) -> list[dict]:
    entries = sorted(recorder.entries, key=lambda e: e[0])
    assert [e[0] for e in entries] == list(range(len(entries)))
    return [e[1] for e in entries]


# ---------------------------------------------------------------------------- MAHI
@pytest.fixture(scope="module")
def generated_digis() -> dict:
    """12 HLT-like events (4500 channels each, out-of-time pileup in BX -8..+4), flattened."""
    digis = generate_hcal_events(12, seed=11, channels=4500)["HcalDigi"]
    return {f: ak.to_numpy(ak.flatten(digis[f])) for f in digis.fields}


def synthetic_digis(amplitudes: dict[int, np.ndarray], noise: float = 0.0, seed: int = 0):
    """Digis of pulses of the given charges (fC) arriving in the given crossings."""
    n = len(next(iter(amplitudes.values())))
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.08, 0.13, n)
    pedestal = rng.uniform(6.0, 10.0, n)
    q = pedestal[:, None] + noise * rng.standard_normal((n, hcal.N_SAMPLES))
    for bx, a in amplitudes.items():
        q += a[:, None] * pulse_templates([bx])[:, 0]
    digis = {f"q{i}": q[:, i] for i in range(hcal.N_SAMPLES)}
    digis.update(gain=gain, pedestal=pedestal, noise=np.full(n, max(noise, 1e-3)),
                 ieta=np.ones(n, np.int16), iphi=np.arange(n, dtype=np.int16) % 72 + 1,
                 depth=np.ones(n, np.int8))
    return digis


def test_pulse_templates_are_the_shifted_pulse_shape():
    t = pulse_templates(DEFAULT_ACTIVE_BX)
    assert t.shape == (hcal.N_SAMPLES, len(DEFAULT_ACTIVE_BX))
    in_time = t[:, DEFAULT_ACTIVE_BX.index(0)]
    np.testing.assert_allclose(in_time[:hcal.SOI], 0.0)
    np.testing.assert_allclose(in_time[hcal.SOI:],
                               hcal.PULSE_FRACTIONS[:hcal.N_SAMPLES - hcal.SOI])
    np.testing.assert_allclose(t[:, DEFAULT_ACTIVE_BX.index(-3)], hcal.PULSE_FRACTIONS)
    np.testing.assert_allclose(t[:, DEFAULT_ACTIVE_BX.index(4)], [0] * 7 + [hcal.PULSE_FRACTIONS[0]])
    np.testing.assert_allclose(pulse_templates([-4])[:, 0], hcal.PULSE_FRACTIONS[1:].tolist() + [0])
    assert np.linalg.matrix_rank(t) == len(DEFAULT_ACTIVE_BX)


def _brute_force_nnls(t, y):
    """The NNLS optimum by trying every active set (the least-squares solution on each set
    that is non-negative; the best of them)."""
    best, best_value = np.zeros(t.shape[1]), float(y @ y)
    for r in range(1, t.shape[1] + 1):
        for p in itertools.combinations(range(t.shape[1]), r):
            sol = np.linalg.lstsq(t[:, p], y, rcond=None)[0]
            if (sol >= 0).all():
                x = np.zeros(t.shape[1])
                x[list(p)] = sol
                value = float(((y - t @ x) ** 2).sum())
                if value < best_value:
                    best, best_value = x, value
    return best, best_value


@pytest.mark.parametrize("active_bx", [[-1, 0, 1], DEFAULT_ACTIVE_BX])
def test_vectorized_nnls_is_the_exact_optimum(active_bx):
    rng = np.random.default_rng(5)
    t = pulse_templates(active_bx)
    n = 60
    pulses = rng.exponential(20.0, (n, len(active_bx))) * (rng.random((n, len(active_bx))) < 0.4)
    y = pulses @ t.T + rng.normal(0.0, 2.0, (n, hcal.N_SAMPLES))
    for warm in (True, False):
        x = nnls(t, y, warm_start=warm)
        assert (x >= 0).all()
        gradient = (y - x @ t.T) @ t                      # KKT: <= 0 where x = 0, 0 where x > 0
        assert (gradient[x == 0] <= 1e-8).all()
        np.testing.assert_allclose(gradient[x > 0], 0.0, atol=1e-8)
        for i in range(n):
            _, best = _brute_force_nnls(t, y[i])
            assert ((y[i] - t @ x[i]) ** 2).sum() <= best + 1e-9
    assert nnls(t, np.empty((0, hcal.N_SAMPLES))).shape == (0, len(active_bx))


@pytest.mark.parametrize("oot_bx", [-2, -1, 1, 2])
def test_mahi_recovers_the_in_time_amplitude_next_to_an_out_of_time_pulse(oot_bx):
    rng = np.random.default_rng(oot_bx + 10)
    n = 2000
    a0 = rng.uniform(5.0, 500.0, n)                  # in-time charge, fC
    a_oot = rng.uniform(0.5, 2.0, n) * a0            # as large as the in-time pulse, or more
    # without noise: exact
    digis = synthetic_digis({0: a0, oot_bx: a_oot})
    fit = mahi_fit(digis)
    np.testing.assert_allclose(fit["energy"], a0 * digis["gain"], rtol=1e-9)
    np.testing.assert_allclose(fit["amplitudes"][:, DEFAULT_ACTIVE_BX.index(oot_bx)], a_oot,
                               rtol=1e-9)
    assert fit["chi2"].max() < 1e-12
    simple = hcal.simple_energy(digis) / (a0 * digis["gain"]) - 1
    sees_it = oot_bx != 2           # a BX +2 pulse starts after TS3 and TS4, the two summed
    if sees_it:
        assert np.abs(simple).mean() > 0.02
    # with 1.2 fC of noise per sample: within the noise. (The empty OOT templates take up
    # upward noise fluctuations but not downward ones, which costs the in-time amplitude about
    # half a noise sigma: MAHI's small negative offset at low energy.)
    noisy = synthetic_digis({0: a0, oot_bx: a_oot}, noise=1.2, seed=oot_bx + 20)
    error = mahi_fit(noisy)["energy"] / noisy["gain"] - a0          # fC
    simple_error = hcal.simple_energy(noisy) / noisy["gain"] - a0
    assert abs(error.mean()) < 1.0 and error.std() < 3.0
    if sees_it:
        assert abs(simple_error.mean()) > 10 * abs(error.mean())


def _bias_and_rms(e, true, lo, hi):
    s = (true >= lo) & (true < hi)
    r = (e[s] - true[s]) / true[s]
    return r.mean(), r.std(), (e[s] - true[s]).mean()


def test_mahi_is_less_biased_than_the_two_sample_method_with_pileup(generated_digis):
    digis = generated_digis
    true = digis["trueEnergy"].astype(np.float64)
    mahi = mahi_fit(digis)["energy"]
    simple = hcal.simple_energy(digis)
    for lo, hi in ENERGY_BINS:
        m_bias, m_rms, m_abs = _bias_and_rms(mahi, true, lo, hi)
        s_bias, s_rms, s_abs = _bias_and_rms(simple, true, lo, hi)
        # out-of-time pileup adds ~0.16 GeV to the two-sample sum; MAHI's OOT pulses take it
        assert s_abs > 0.10, (lo, hi, s_abs)
        assert abs(m_abs) < 0.08, (lo, hi, m_abs)
        assert abs(m_bias) < abs(s_bias) and m_rms < s_rms, (lo, hi, m_bias, s_bias,
                                                             m_rms, s_rms)
    high = true >= 20.0
    r = mahi[high] / true[high] - 1
    assert high.sum() > 20 and abs(r.mean()) < 0.015 and r.std() < 0.05


def test_mahi_rechits_in_a_workflow_feed_calo_towers(new_recorder, run_guarded):
    recorder = new_recorder()
    wf = {"process": {"report_every_s": 0, "max_events": 4},
          "source": {"type": "RootSource", "files": [str(HLT_SAMPLE)], "step_size": 4},
          "modules": {
              "mahi": {"type": "HcalMahiReco", "digis": "source:HcalDigi"},
              "simple": {"type": "HcalSimpleReco", "digis": "source:HcalDigi"},
              "towers": {"type": "CaloTowerProducer", "hits": "mahi", "geometry": "hcal",
                         "threshold": 0.0},
              "collect": {"type": Collect, "products": ["mahi", "simple", "towers",
                                                        "source:HcalDigi"],
                          "recorder": recorder,
                          "summarize": lambda tag, v: v.to_numpy() if tag.startswith("source")
                          else np.array(v)}},
          "paths": {"p": ["collect"]}}
    result = run_guarded(wf)
    assert result.exit_code == 0, result.error
    events = collected(recorder)
    assert len(events) == 4
    for ev in events:
        hits, digis = ev["mahi"], ev["source:HcalDigi"]
        assert hits.dtype == RECHIT_DTYPE == ev["simple"].dtype
        assert hits.dtype.names == ("ieta", "iphi", "depth", "energy")
        assert len(hits) > 1000 and (hits["energy"] >= 0.5).all()
        energy = mahi_fit(digis)["energy"]
        np.testing.assert_allclose(hits["energy"], energy[energy >= 0.5], rtol=1e-6)
        np.testing.assert_array_equal(hits["ieta"], digis["ieta"][energy >= 0.5])
        assert len(ev["towers"]) > 100
        np.testing.assert_allclose(                   # towers sum the rechits' energy
            (ev["towers"]["et"] * np.cosh(ev["towers"]["eta"])).sum(),
            hits["energy"].sum(), rtol=0.02)
    assert result.report["modules"]["mahi"]["runs"] == 4


def test_mahi_costs_milliseconds_per_event(generated_digis):
    one_event = {f: v[:4500] for f, v in generated_digis.items()}
    mahi_fit(one_event)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        mahi_fit(one_event)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.1                # ~4-6 ms on the 2-core development machine


def test_mahi_rejects_bad_crossings():
    with pytest.raises(ValueError, match="contain 0"):
        mahi_fit(synthetic_digis({0: np.ones(3)}), [-1, 1])
    with pytest.raises(ValueError, match="linearly dependent|templates"):
        mahi_fit(synthetic_digis({0: np.ones(3)}), list(range(-4, 5)))
    module = HcalMahiReco(active_bx=[-1, 1])
    with pytest.raises(ValueError, match="including 0"):
        module.begin_job()


# ---------------------------------------------------------------------------- jets
@pytest.fixture(scope="module")
def jet_events():
    fastjet = pytest.importorskip("fastjet")          # the `test` extra
    with uproot.open(JETS_SAMPLE) as f:
        arrays = f["Events"].arrays(["is_top", "Particle_px", "Particle_py", "Particle_pz",
                                     "Particle_E", "Particle_charge"])
    particles = [{f: ak.to_numpy(arrays[f"Particle_{f}"][i])
                  for f in ("px", "py", "pz", "E", "charge")} for i in range(len(arrays))]
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, 0.8)
    clustered = [cluster_antikt(p, 0.8, 20.0, definition) for p in particles]
    return ak.to_numpy(arrays["is_top"]), particles, clustered


def test_antikt_top_jets_peak_at_the_top_mass(jet_events):
    is_top, particles, clustered = jet_events
    assert all(len(jets) >= 1 for jets, _ in clustered)
    mass = np.array([jets["mass"][0] for jets, _ in clustered])
    top, qcd = mass[is_top], mass[~is_top]
    counts, edges = np.histogram(top, bins=np.arange(100, 260, 10))
    assert 160 <= edges[np.argmax(counts)] <= 180                  # the peak bin: 170-180
    assert 150 <= np.median(top) <= 195
    assert np.median(qcd) < 80 and np.median(qcd) < np.median(top) - 60
    for (jets, constituents), p in zip(clustered[:50], particles[:50]):
        assert jets.dtype == JET_DTYPE and constituents.dtype == CONSTITUENT_DTYPE
        assert (np.diff(jets["pt"]) <= 0).all() and (jets["pt"] >= 20).all()
        np.testing.assert_array_equal(np.bincount(constituents["jet"], minlength=len(jets)),
                                      jets["n_constituents"])
        for k, jet in enumerate(jets):               # E scheme: the jet is its particles' sum
            idx = constituents["index"][constituents["jet"] == k]
            px, py = p["px"][idx].sum(dtype=np.float64), p["py"][idx].sum(dtype=np.float64)
            assert np.hypot(px, py) == pytest.approx(jet["pt"], rel=1e-5)
        np.testing.assert_array_equal(constituents["charge"], p["charge"][constituents["index"]])


def test_jet_images_shape_normalisation_and_centre(jet_events):
    _, _, clustered = jet_events
    npix, hw = 224, 0.8
    centre = (np.arange(npix) + 0.5) / npix * 2 * hw - hw
    for jets, constituents in clustered[:40]:
        images = jet_images(jets, constituents)
        assert images.shape == (len(jets), 3, npix, npix) and images.dtype == np.float32
        for k in range(len(jets)):
            c = constituents[constituents["jet"] == k]
            y = np.arcsinh(jets["pt"][k] * np.sinh(jets["eta"][k])
                           / np.hypot(jets["pt"][k], jets["mass"][k]))
            deta = c["eta"] - y
            dphi = (c["phi"] - jets["phi"][k] + np.pi) % (2 * np.pi) - np.pi
            inside = (np.abs(deta) < hw) & (np.abs(dphi) < hw)
            image = images[k]
            assert image[0].sum() == pytest.approx(c["pt"][inside].sum() / jets["pt"][k],
                                                   rel=1e-4)
            assert image[1].sum() == pytest.approx(
                c["pt"][inside & (c["charge"] != 0)].sum() / jets["pt"][k], rel=1e-4, abs=1e-6)
            assert image[2].sum() == np.count_nonzero(inside & (c["charge"] != 0))
            assert (image[1] <= image[0] + 1e-6).all()
            if jets["pt"][k] > 300:                  # the hard jet: all of it in the window
                assert 0.99 < image[0].sum() < 1.15
                total = image[0].sum()
                assert abs(image[0].sum(axis=1) @ centre / total) < 2 * (2 * hw / npix)
                assert abs(image[0].sum(axis=0) @ centre / total) < 2 * (2 * hw / npix)


def test_jet_images_leading_jets_only():
    jets = np.zeros(12, JET_DTYPE)
    jets["pt"] = np.arange(12, 0, -1) * 10.0           # 120, 110, ..., 10 GeV
    jets["phi"] = np.linspace(-3, 3, 12)
    constituents = np.zeros(12, CONSTITUENT_DTYPE)
    constituents["jet"] = np.arange(12)
    constituents["pt"], constituents["phi"] = jets["pt"], jets["phi"]
    constituents["charge"] = 1
    images = jet_images(jets, constituents)
    assert images.shape == (10, 3, 224, 224)
    np.testing.assert_allclose(images[:, 0].sum(axis=(1, 2)), 1.0)
    assert images[:, 0, 112, 112].min() == 1.0            # the one particle on the axis
    assert jet_images(jets, constituents, min_pt=85.0).shape[0] == 4
    assert jet_images(jets[:0], constituents[:0]).shape == (0, 3, 224, 224)
    assert jet_images(jets, constituents, max_jets=3, npix=32).shape == (3, 3, 32, 32)


def test_jet_workflow_gives_every_event_images(new_recorder, run_guarded):
    pytest.importorskip("fastjet")
    recorder = new_recorder()

    def summarize(tag, value):
        if tag == "images":
            return value.shape, value[:, 0].sum(axis=(1, 2))
        return np.array(value)

    wf = {"process": {"report_every_s": 0, "threads": 2, "streams": 2},
          "source": {"type": "RootSource", "files": [str(JETS_SAMPLE)], "step_size": 100},
          "modules": {
              "jets": {"type": "AntiKtJetProducer", "particles": "source:Particle",
                       "R": 0.8, "min_pt": 20.0},
              "images": {"type": "JetImageProducer", "jets": "jets",
                         "constituents": "jets:constituents", "max_jets": 10},
              "collect": {"type": Collect, "products": ["jets", "images"],
                          "recorder": recorder, "summarize": summarize}},
          "paths": {"p": ["collect"]}}
    result = run_guarded(wf, timeout=120)
    assert result.exit_code == 0, result.error
    events = collected(recorder)
    assert len(events) == 500
    for ev in events:
        (shape, sums), jets = ev["images"], ev["jets"]
        assert shape == (min(len(jets), 10), 3, 224, 224) and shape[0] >= 1
        assert 0.99 < sums[0] < 1.15
    modules = result.report["modules"]
    assert modules["jets"]["runs"] == modules["images"]["runs"] == 500
