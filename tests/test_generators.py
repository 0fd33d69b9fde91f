"""Plausibility tests of the synthetic-detector generators (data/) and of ``recorun-gen``.

These check physics the generators are meant to reproduce, with tolerances set by the
models' resolutions, so that a broken generator fails them: jet masses, HCAL energy
reconstruction from the digis, ECAL longitudinal shares and energy response, determinism,
and the ROOT files written by ``recorun-gen``.
"""
from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from recorun.data import ecal, hcal, jets
from recorun.data.generate import (generate_electron_events, generate_hcal_events,
                           generate_hlt_events, generate_jet_events)
from recorun.data.layout import read_shapes, restore_inner

ROOT_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- samples
@pytest.fixture(scope="module")
def jet_sample():
    return generate_jet_events(400, seed=11)


@pytest.fixture(scope="module")
def hlt_sample():
    return generate_hlt_events(60, seed=5, channels=4500)


@pytest.fixture(scope="module")
def electron_sample():
    return generate_electron_events(300, seed=21)


def _sum4(particles) -> np.ndarray:
    return np.stack([ak.to_numpy(ak.sum(particles[f], axis=1)).astype(np.float64)
                     for f in ("px", "py", "pz", "E")], axis=-1)


def _cone_mass(particles, eta0, phi0, radius=0.8) -> np.ndarray:
    deta = particles.eta - eta0
    dphi = (particles.phi - phi0 + np.pi) % (2 * np.pi) - np.pi
    return jets.mass(_sum4(particles[deta ** 2 + dphi ** 2 < radius ** 2]))


def _mode(values, lo, hi, width) -> float:
    counts, edges = np.histogram(values, bins=np.arange(lo, hi + width, width))
    i = int(np.argmax(counts))
    return 0.5 * (edges[i] + edges[i + 1])


# ---------------------------------------------------------------------------- jets
def test_two_body_decays_conserve_four_momentum_and_are_isotropic():
    rng = np.random.default_rng(1)
    n = 20000
    parent = jets.four_vector(rng.uniform(300, 700, n), rng.uniform(-2, 2, n),
                              rng.uniform(-np.pi, np.pi, n), np.full(n, jets.MT))
    m1, m2 = np.full(n, jets.MB), np.full(n, jets.MW)
    d1, d2 = jets.two_body(rng, parent, np.full(n, jets.MT), m1, m2)
    np.testing.assert_allclose(d1 + d2, parent, atol=1e-6 * parent[:, 3:].max())
    np.testing.assert_allclose(jets.mass(d1), jets.MB, rtol=1e-4)
    np.testing.assert_allclose(jets.mass(d2), jets.MW, rtol=1e-6)
    # back in the parent's rest frame the b has the two-body momentum, isotropically
    back = jets.boost(d1, parent * np.array([-1, -1, -1, 1]), np.full(n, jets.MT))
    pstar = np.linalg.norm(back[:, :3], axis=1)
    expected = np.sqrt((jets.MT ** 2 - (jets.MB + jets.MW) ** 2)
                       * (jets.MT ** 2 - (jets.MW - jets.MB) ** 2)) / (2 * jets.MT)
    np.testing.assert_allclose(pstar, expected, rtol=1e-5)
    cos = (back[:, :3] * parent[:, :3]).sum(1) / (pstar * np.linalg.norm(parent[:, :3], axis=1))
    assert abs(cos.mean()) < 0.02 and abs((cos ** 2).mean() - 1 / 3) < 0.01
    direction = back[:, :3] / pstar[:, None]              # isotropic in the fixed frame too
    assert np.all(np.abs(direction.mean(axis=0)) < 0.02)


def test_jet_events_structure(jet_sample):
    is_top, particles, gen = (jet_sample[k] for k in ("is_top", "Particle", "GenPart"))
    assert 0.4 < is_top.mean() < 0.6
    assert np.all(ak.num(gen)[is_top] == 5) and np.all(ak.num(gen)[~is_top] == 1)
    assert np.all(ak.to_numpy(gen.pdgId[is_top][:, 0]) == jets.PDG_TOP)
    assert np.all((gen.pt[:, 0] >= jets.PT_MIN) & (gen.pt[:, 0] <= jets.PT_MAX))
    # a jet has many particles (fragmentation), plus the soft underlying event
    from_jet = ak.sum(particles.parton >= 0, axis=1)
    assert 25 < ak.mean(from_jet) < 90 and ak.min(from_jet) >= 4
    ue = particles[particles.parton < 0]
    assert ak.max(ue.pt) < 20 and 0.5 < ak.mean(ue.pt) < 1.2
    # fragmentation conserves four-momentum: the jet's particles add up to the parton
    total = _sum4(particles[particles.parton >= 0])
    parton = np.stack([ak.to_numpy(gen[f][:, 0]) for f in ("px", "py", "pz", "E")], axis=-1)
    np.testing.assert_allclose(total, parton, atol=0.05)
    # final particles are photons or charged pions (masses checked where float32 resolves
    # them: below 10 GeV)
    soft = particles[particles.E < 10]
    m = jets.mass(np.stack([ak.to_numpy(ak.flatten(soft[f])) for f in
                            ("px", "py", "pz", "E")], axis=-1))
    charged = ak.to_numpy(ak.flatten(soft.charge)) != 0
    assert 0.55 < charged.mean() < 0.8
    assert np.all(m[~charged] < 0.03) and np.all(np.abs(m[charged] - jets.M_PION) < 0.01)


def test_top_jet_mass_peaks_at_top_mass_and_qcd_is_lighter(jet_sample):
    is_top, particles, gen = (jet_sample[k] for k in ("is_top", "Particle", "GenPart"))
    mass = _cone_mass(particles, gen.eta[:, 0], gen.phi[:, 0])
    top, qcd = mass[is_top], mass[~is_top]
    assert abs(_mode(top, 100, 250, 10) - 173) <= 10
    assert np.mean(np.abs(top - 173) < 20) > 0.35       # a prong may fall outside R = 0.8
    assert qcd.mean() < 90 and np.median(qcd) < 70
    assert np.mean(qcd > 150) < 0.05


def test_w_mass_from_generator_prongs(jet_sample):
    is_top, particles, gen = (jet_sample[k] for k in ("is_top", "Particle", "GenPart"))
    tops = particles[is_top]
    # particles from the two light quarks (GenPart 3 and 4), within R = 0.4 of their quark
    keep = []
    for index in (3, 4):
        eta0, phi0 = gen.eta[is_top][:, index], gen.phi[is_top][:, index]
        dphi = (tops.phi - phi0 + np.pi) % (2 * np.pi) - np.pi
        keep.append((tops.parton == index) & ((tops.eta - eta0) ** 2 + dphi ** 2 < 0.16))
    w = jets.mass(_sum4(tops[keep[0] | keep[1]]))
    assert abs(np.median(w) - 80.4) < 6
    assert abs(_mode(w, 40, 120, 5) - 80.4) <= 7.5
    # all their particles: exactly the W (four-momentum conservation)
    w_all = jets.mass(_sum4(tops[(tops.parton == 3) | (tops.parton == 4)]))
    np.testing.assert_allclose(w_all, ak.to_numpy(gen.mass[is_top][:, 1]), atol=0.05)
    assert abs(np.median(w_all) - jets.MW) < 1.0


def test_fastjet_top_mass_and_w_subjets(jet_sample):
    fastjet = pytest.importorskip("fastjet")
    is_top, particles = jet_sample["is_top"], jet_sample["Particle"]
    vectors = ak.zip({f: particles[f] for f in ("px", "py", "pz", "E")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sequence = fastjet.ClusterSequence(vectors,
                                           fastjet.JetDefinition(fastjet.antikt_algorithm, 0.8))
        found = sequence.inclusive_jets()
        leading = ak.argmax(np.hypot(found.px, found.py), axis=1, keepdims=True)
        jet = ak.firsts(found[leading])
        constituents = ak.firsts(sequence.constituents()[leading])
        subjets = fastjet.ClusterSequence(
            constituents, fastjet.JetDefinition(fastjet.kt_algorithm, 0.8)
        ).exclusive_jets(n_jets=3)
    mass = jets.mass(np.stack([ak.to_numpy(jet[f]) for f in ("px", "py", "pz", "E")], -1))
    assert abs(_mode(mass[is_top], 100, 250, 10) - 173) <= 10
    assert mass[~is_top].mean() < mass[is_top].mean() - 60
    pairs = ak.combinations(subjets, 2)
    pair_mass = jets.mass(np.stack([ak.to_numpy(ak.flatten(pairs["0"][f] + pairs["1"][f]))
                                    for f in ("px", "py", "pz", "E")], -1)).reshape(-1, 3)
    best = pair_mass[np.arange(len(pair_mass)), np.argmin(np.abs(pair_mass - 80.4), axis=1)]
    assert abs(np.median(best[is_top]) - 80.4) < 8
    near = np.abs(best - 80.4) < 15
    assert near[is_top].mean() > 0.5 and near[is_top].mean() > near[~is_top].mean() + 0.2


def test_jet_images_helper(jet_sample):
    particles, gen = jet_sample["Particle"][:4], jet_sample["GenPart"][:4]
    images = jets.jet_images(particles, gen.eta[:, 0], gen.phi[:, 0], npix=32, half_width=1.0)
    assert images.shape == (4, 32, 32) and images.dtype == np.float32
    deta = particles.eta - gen.eta[:, 0]
    dphi = (particles.phi - gen.phi[:, 0] + np.pi) % (2 * np.pi) - np.pi
    inside = (abs(deta) < 1.0) & (abs(dphi) < 1.0)
    np.testing.assert_allclose(images.sum(axis=(1, 2)),
                               ak.to_numpy(ak.sum(particles.pt[inside], axis=1)), rtol=1e-5)
    # the pT is centred on the jet axis (rows: eta, columns: phi)
    centre = (np.arange(32) + 0.5) / 32 * 2.0 - 1.0
    total = images.sum(axis=(1, 2))
    assert np.all(np.abs(images.sum(axis=2) @ centre / total) < 0.15)
    assert np.all(np.abs(images.sum(axis=1) @ centre / total) < 0.15)


# ---------------------------------------------------------------------------- HCAL
def test_hcal_geometry_and_conditions(hlt_sample):
    digis = hlt_sample["HcalDigi"]
    assert np.all(ak.num(digis) == 4500)
    flat = {f: ak.to_numpy(ak.flatten(digis[f])) for f in digis.fields}
    absi = np.abs(flat["ieta"])
    assert absi.min() == 1 and absi.max() == 29
    assert np.all((flat["iphi"] >= 1) & (flat["iphi"] <= 72))
    assert np.all(flat["iphi"][absi >= 21] % 2 == 1)
    barrel = absi <= 16
    assert np.all(flat["subdet"][barrel] == hcal.SUBDET_HB)
    assert np.all(flat["subdet"][~barrel] == hcal.SUBDET_HE)
    assert flat["depth"][barrel].max() == 4 and flat["depth"][~barrel].max() == 7
    assert flat["depth"].min() == 1
    # each event's channels are distinct
    key = (flat["ieta"].astype(np.int64) * 100 + flat["iphi"]) * 10 + flat["depth"]
    for start in range(0, len(key), 4500):
        assert len(np.unique(key[start:start + 4500])) == 4500
    # conditions depend on the channel only, with ~10 % gain spread per subdetector/depth
    for f in ("gain", "pedestal", "noise"):
        order = np.argsort(key, kind="stable")
        k, v = key[order], flat[f][order]
        same = k[1:] == k[:-1]
        assert same.sum() > 1000 and np.all(v[1:][same] == v[:-1][same])
    for subdet in (hcal.SUBDET_HB, hcal.SUBDET_HE):
        sel = (hcal.GEOMETRY["subdet"] == subdet) & (hcal.GEOMETRY["depth"] == 2)
        gains = hcal.CONDITIONS["gain"][sel]
        assert 0.07 < gains.std() / gains.mean() < 0.13
    assert hcal.N_CHANNELS == len(np.unique(hcal.GEOMETRY["ieta"].astype(np.int64) * 10000
                                            + hcal.GEOMETRY["iphi"] * 10
                                            + hcal.GEOMETRY["depth"]))


def test_hcal_energy_spectrum(hlt_sample):
    energy = ak.to_numpy(ak.flatten(hlt_sample["HcalDigi"].trueEnergy))
    assert np.all(energy >= 0)
    assert np.median(energy) < 1.0                       # mostly pileup
    assert 1 < np.sum(energy > 20) / 60 < 30             # some jet/hadron deposits per event
    assert energy.max() > 100


def test_hcal_reconstruction_from_digis_matches_true_energy(hlt_sample):
    digis = hlt_sample["HcalDigi"]
    f = {name: ak.to_numpy(ak.flatten(digis[name])).astype(np.float64) for name in digis.fields}
    true = f["trueEnergy"]
    soi = hcal.SOI
    reco = f["gain"] * (f[f"q{soi}"] + f[f"q{soi + 1}"] - 2 * f["pedestal"]) \
        / (hcal.PULSE_FRACTIONS[0] + hcal.PULSE_FRACTIONS[1])
    high = true > 20
    assert high.sum() > 100
    rel = (reco[high] - true[high]) / true[high]
    assert abs(rel.mean()) < 0.03 and rel.std() < 0.10
    np.testing.assert_allclose(hcal.simple_energy(digis), reco, rtol=1e-5, atol=1e-5)
    # the pulse: pedestal-subtracted charge over the samples follows PULSE_FRACTIONS
    # (relative to the SOI, so that out-of-time pileup elsewhere does not dilute it)
    q = np.stack([f[f"q{i}"] - f["pedestal"] for i in range(hcal.N_SAMPLES)], axis=1)[high]
    ratios = np.median(q / q[:, soi:soi + 1], axis=0)
    np.testing.assert_allclose(ratios[soi + 1:soi + 3],
                               hcal.PULSE_FRACTIONS[1:3] / hcal.PULSE_FRACTIONS[0], atol=0.01)
    assert np.all(np.abs(ratios[:soi]) < 0.01)


def test_hcal_pedestal_and_noise(monkeypatch):
    # without pileup, a channel with no deposit holds pedestal + Gaussian noise in every TS
    monkeypatch.setattr(hcal, "PU_HITS_PER_BX", 0.0)
    digis = generate_hcal_events(3, seed=4, channels=3000)["HcalDigi"]
    f = {name: ak.to_numpy(ak.flatten(digis[name])).astype(np.float64) for name in digis.fields}
    quiet = f["trueEnergy"] == 0
    assert quiet.sum() > 3000
    pulls = np.concatenate([(f[f"q{i}"] - f["pedestal"])[quiet] / f["noise"][quiet]
                            for i in range(hcal.N_SAMPLES)])
    assert abs(pulls.mean()) < 0.03 and abs(pulls.std() - 1) < 0.03


def test_pulse_shape():
    fr = hcal.PULSE_FRACTIONS
    assert len(fr) == 8 and 0.99 < fr.sum() <= 1.0
    assert np.argmax(fr) == 0 and 0.6 < fr[0] < 0.8 and 0.9 < fr[0] + fr[1] < 1.0
    assert np.all(np.diff(fr) < 0)


def test_facile_inputs(hlt_sample):
    digis = hlt_sample["HcalDigi"]
    x = hcal.facile_inputs(digis)
    assert len(hcal.FACILE_INPUTS) == 15 == len(set(hcal.FACILE_INPUTS))
    assert x.shape == (60 * 4500, 15) and x.dtype == np.float32
    for i, name in enumerate(hcal.FACILE_INPUTS):
        np.testing.assert_array_equal(x[:, i], ak.to_numpy(ak.flatten(digis[name])))
    # one event's digis, and a structured array of them, give the same rows
    np.testing.assert_array_equal(hcal.facile_inputs(digis[1]), x[4500:9000])


# ---------------------------------------------------------------------------- ECAL
def _images(sample) -> np.ndarray:
    return ak.to_numpy(ak.flatten(sample["Electron_image"], axis=1)).astype(np.float64)


def test_electron_events_structure(electron_sample):
    electrons = electron_sample["Electron"]
    counts = ak.to_numpy(ak.num(electrons))
    assert counts.min() >= 1 and 4.5 < counts.mean() < 5.7
    images = _images(electron_sample)
    assert images.shape == (counts.sum(), 4, 56, 11)
    assert str(electron_sample["Electron_image"].type.content) == "var * 4 * 56 * 11 * float32"
    energy = ak.to_numpy(ak.flatten(electrons.trueEnergy))
    assert energy.min() >= 5 and energy.max() <= 500 and np.median(energy) < 40
    assert np.all(np.abs(ak.to_numpy(ak.flatten(electrons.eta))) <= ecal.ETA_MAX)
    # showers are centred: most of the middle layer's energy within 3 x 3 middle cells
    middle = images[:, 2]
    core = middle[:, 28 - 12:28 + 12, 4:7].sum(axis=(1, 2))
    assert np.median(core / middle.sum(axis=(1, 2))) > 0.9


@pytest.fixture(scope="module")
def electron_truth():
    """The events of ``electron_sample`` (seed 21, events 1-300) with the generator's truth:
    flat per-electron arrays, plus ``mu`` per electron (its event's)."""
    events = [ecal.generate_event(np.random.default_rng([21, k, ecal.STREAM]), truth=True)
              for k in range(1, 301)]
    flat = {name: np.concatenate([ev[name] for ev in events]).astype(np.float64)
            for name in ("energy", "eta", "trueEnergy", "image", "shares", "pileup")}
    flat["mu"] = np.concatenate([np.full(len(ev["energy"]), ev["mu"]) for ev in events])
    return flat


def test_truth_events_are_the_generated_events(electron_sample, electron_truth):
    # asking for the truth draws nothing more: same images, same nominal energies
    np.testing.assert_array_equal(electron_truth["image"], _images(electron_sample))
    np.testing.assert_array_equal(
        electron_truth["energy"], ak.to_numpy(ak.flatten(electron_sample["Electron"].energy)))


def _band(eta, lo, hi):
    return (np.abs(eta) >= lo) & (np.abs(eta) < hi)


def test_ecal_layer_fractions_match_the_longitudinal_model(electron_truth):
    t = electron_truth
    layers = (t["image"] - t["pileup"]).sum(axis=(2, 3))
    measured = layers / layers.sum(axis=1, keepdims=True)
    model = ecal.layer_fractions(t["trueEnergy"], t["eta"])
    diff = measured.mean(axis=0) - model.mean(axis=0)
    # the per-electron shower fluctuations (GFLASH) shift the mean shares a little
    assert np.all(np.abs(diff) < 0.015), diff
    big = model.mean(axis=0) > 0.1
    assert np.all(np.abs(diff[big] / model.mean(axis=0)[big]) < 0.05)
    # the model itself: strips and middle dominate; showers get deeper with energy
    assert set(np.argsort(model.mean(axis=0))[-2:]) == {1, 2}
    low, high = t["trueEnergy"] < 20, t["trueEnergy"] > 100
    assert measured[high, 0].mean() < measured[low, 0].mean()
    assert measured[high, 2].mean() > measured[low, 2].mean()


def test_ecal_longitudinal_shares_depend_on_eta(electron_truth):
    """The layers are thicker in X0 at large |eta| (longer path) and more material is in
    front: the presampler and the strips see more of the shower, the middle less."""
    t = electron_truth
    layers = t["image"].sum(axis=(2, 3))
    frac = layers / layers.sum(axis=1, keepdims=True)
    mid = (t["trueEnergy"] > 15) & (t["trueEnergy"] < 150)
    central, forward = mid & _band(t["eta"], 0, 0.6), mid & _band(t["eta"], 1.5, 2.47)
    assert central.sum() > 50 and forward.sum() > 50
    assert frac[forward, 0].mean() > 1.5 * frac[central, 0].mean()
    assert frac[forward, 1].mean() > frac[central, 1].mean() + 0.1
    assert frac[forward, 2].mean() < frac[central, 2].mean() - 0.1
    model = ecal.layer_fractions(50.0, [0.0, 1.7])
    assert model[1, 1] > model[0, 1] + 0.1


def test_ecal_upstream_loss_grows_with_eta_and_the_presampler_sees_it(electron_truth):
    t = electron_truth
    lost = t["shares"][:, 0] + t["shares"][:, 2]            # upstream + between PS and strips
    central, forward = _band(t["eta"], 0, 0.6), _band(t["eta"], 1.5, 2.0)
    assert lost[forward].mean() > 3 * lost[central].mean()
    assert np.all(np.diff(ecal.upstream_x0([0.0, 0.5, 1.0, 1.5])) > 0)
    assert ecal.upstream_x0(0.0) == pytest.approx(2.0) and 4 <= ecal.upstream_x0(1.7) <= 6
    # the mean visible fraction falls where the material is
    assert ecal.visible_fraction(50.0, 1.7)[0] < ecal.visible_fraction(50.0, 0.0)[0] - 0.05
    # electron by electron, the loss fluctuates and the presampler measures part of it
    sel = forward & (t["trueEnergy"] > 15)
    assert lost[sel].std() > 0.02
    presampler = t["image"][:, 0].sum(axis=(1, 2)) / t["trueEnergy"]
    assert np.corrcoef(lost[sel], presampler[sel])[0, 1] > 0.4


def test_ecal_pileup_in_and_around_the_window(electron_truth):
    t = electron_truth
    pileup = t["pileup"]
    assert np.all(pileup >= 0)
    assert 0.002 < (pileup > 0).mean() < 0.05                  # sparse
    window = pileup[:, :, ecal.WINDOW_ETA, ecal.WINDOW_PHI].sum(axis=(1, 2, 3))
    outside = pileup.sum(axis=(1, 2, 3)) - window
    # the window's mean pileup is what the nominal calibration subtracts
    assert window.mean() == pytest.approx(ecal.NOMINAL_PILEUP_OFFSET, rel=0.15)
    # it fluctuates with mu and cosh(eta), which the cells outside the window measure
    level = t["mu"] * np.cosh(t["eta"])
    assert np.corrcoef(level, window)[0, 1] > 0.5
    assert np.corrcoef(outside, window)[0, 1] > 0.5
    # seen in the images themselves: the outermost eta rows, far from the shower
    edges = np.concatenate([t["image"][:, :, :4], t["image"][:, :, -4:]], axis=2)
    edge_energy = edges.sum(axis=(1, 2, 3))
    assert np.corrcoef(level, edge_energy)[0, 1] > 0.5
    # pileup deposits are larger in the middle layer than in the back one
    per_layer = pileup.sum(axis=(0, 2, 3))
    assert per_layer[2] > 3 * per_layer[3]


def test_ecal_image_sum_matches_the_visible_energy(electron_truth):
    t = electron_truth
    true = t["trueEnergy"]
    visible = true * t["shares"][:, list(ecal.VISIBLE)].sum(axis=1)
    total = (t["image"] - t["pileup"]).sum(axis=(1, 2, 3))
    ratio = total / visible
    assert abs(ratio.mean() - 1) < 0.01
    pulls = (total - visible) / ecal.expected_resolution(visible)
    assert 0.8 < pulls.std() < 1.25
    # resolution improves with energy, as the stochastic term says
    assert ratio[true > 100].std() < 0.5 * ratio[true < 15].std()


def test_ecal_nominal_is_calibrated_on_average(electron_truth):
    t = electron_truth
    response = t["energy"] / t["trueEnergy"]
    # one scale and one pileup offset for all electrons: right for the median electron...
    assert abs(np.median(response) - 1) < 0.02
    np.testing.assert_allclose(
        t["energy"], ecal.nominal_energy(t["image"].astype(np.float32)), rtol=1e-5, atol=1e-5)
    # ... not per electron: low where the material is, and it rises with energy
    central, forward = _band(t["eta"], 0, 0.6), _band(t["eta"], 1.5, 2.0)
    assert np.median(response[forward]) < np.median(response[central]) - 0.03
    low, high = t["trueEnergy"] < 15, t["trueEnergy"] > 50
    assert np.median(response[high]) > np.median(response[low])


# ---------------------------------------------------------------------------- determinism
def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if name == "Electron_image":
            assert np.array_equal(_images(a), _images(b))
        else:
            assert ak.to_list(a[name]) == ak.to_list(b[name]), name


def test_same_seed_same_events_different_seed_different():
    a = generate_hlt_events(3, seed=7, channels=200)
    b = generate_hlt_events(3, seed=7, channels=200)
    c = generate_hlt_events(3, seed=8, channels=200)
    _assert_same(a, b)
    assert not np.array_equal(ak.to_numpy(ak.flatten(a["HcalDigi"].q3)),
                              ak.to_numpy(ak.flatten(c["HcalDigi"].q3)))
    assert not np.array_equal(_images(a)[:1], _images(c)[:1])
    j1, j2, j3 = (generate_jet_events(4, seed=s) for s in (7, 7, 8))
    _assert_same(j1, j2)
    assert ak.to_list(j1["Particle"].px) != ak.to_list(j3["Particle"].px)


def test_event_k_does_not_depend_on_how_many_are_generated():
    five = generate_hlt_events(5, seed=3, channels=300)
    ten = generate_hlt_events(10, seed=3, channels=300)
    later = generate_hlt_events(3, seed=3, channels=300, first_event=4)   # events 4, 5, 6
    for name in ("run", "luminosityBlock", "event", "HcalDigi", "Electron"):
        assert ak.to_list(five[name]) == ak.to_list(ten[name][:5]), name
        assert ak.to_list(later[name][:2]) == ak.to_list(five[name][3:5]), name
    assert np.array_equal(_images(five), _images({"Electron_image": ten["Electron_image"][:5]}))
    jets5, jets10 = generate_jet_events(5, seed=3), generate_jet_events(10, seed=3)
    assert ak.to_list(jets5["Particle"]) == ak.to_list(jets10["Particle"][:5])
    # the HLT file's digis and electrons are the hcal and electrons commands' events
    hc = generate_hcal_events(5, seed=3, channels=300)
    el = generate_electron_events(5, seed=3)
    assert ak.to_list(hc["HcalDigi"]) == ak.to_list(five["HcalDigi"])
    assert ak.to_list(el["Electron"]) == ak.to_list(five["Electron"])


def test_generation_speed():
    start = time.perf_counter()
    generate_hlt_events(100, seed=1, channels=4500)
    assert time.perf_counter() - start < 15       # ~1-2 s on 2 cores; generous for CI noise


# ---------------------------------------------------------------------------- recorun-gen
def _run(*args):
    return subprocess.run([sys.executable, "-m", "recorun.data.generate", *map(str, args)],
                          cwd=ROOT_DIR, capture_output=True, text=True, timeout=120)


HLT_BRANCHES = (["run", "luminosityBlock", "event", "nHcalDigi"]
                + [f"HcalDigi_{f}" for f in hcal.FIELDS]
                + ["nElectron"] + [f"Electron_{f}" for f in ecal.FIELDS]
                + ["nElectron_image", "Electron_image"])


def test_recorun_gen_hlt_round_trip(tmp_path):
    out = tmp_path / "hlt.root"
    result = _run("hlt", out, "--events", 4, "--seed", 3, "--channels", 300)
    assert result.returncode == 0, result.stderr
    expected = generate_hlt_events(4, seed=3, channels=300)
    with uproot.open(out) as file:
        tree = file["Events"]
        assert tree.keys() == HLT_BRANCHES
        assert tree["HcalDigi_q3"].typename == "float[]"
        assert tree["HcalDigi_ieta"].typename == "int16_t[]"
        assert tree["event"].typename == "uint64_t"
        shapes = read_shapes(file)
        assert shapes == {"Electron_image": (4, 56, 11)}
        arrays = tree.arrays()
    assert arrays["event"].tolist() == [1, 2, 3, 4]
    assert arrays["luminosityBlock"].tolist() == [1, 1, 1, 1]
    assert np.all(arrays["nHcalDigi"] == 300)
    assert arrays["nElectron"].tolist() == ak.num(expected["Electron"]).tolist()
    for f in hcal.FIELDS:
        assert ak.all(arrays[f"HcalDigi_{f}"] == expected["HcalDigi"][f]), f
    for f in ecal.FIELDS:
        assert ak.all(arrays[f"Electron_{f}"] == expected["Electron"][f]), f
    images = restore_inner(arrays["Electron_image"], shapes["Electron_image"])
    assert images.type.content == expected["Electron_image"].type.content
    assert np.array_equal(_images({"Electron_image": images}), _images(expected))


def test_recorun_gen_jets_rntuple_round_trip(tmp_path):
    out = tmp_path / "jets.root"
    result = _run("jets", out, "--events", 6, "--seed", 2, "--format", "rntuple",
                  "--top-fraction", 1.0, "--first-event", 1000)
    assert result.returncode == 0, result.stderr
    expected = generate_jet_events(6, seed=2, top_fraction=1.0, first_event=1000)
    with uproot.open(out) as file:
        arrays = file["Events"].arrays()
    assert arrays.fields == ["run", "luminosityBlock", "event", "is_top", "Particle", "GenPart"]
    assert arrays["event"].tolist() == list(range(1000, 1006))
    assert arrays["luminosityBlock"].tolist() == [2] * 6
    assert arrays["is_top"].tolist() == [True] * 6
    assert ak.to_list(arrays["Particle"]) == ak.to_list(expected["Particle"])
    assert ak.to_list(arrays["GenPart"]) == ak.to_list(expected["GenPart"])


def test_recorun_gen_electrons_rntuple_images_native(tmp_path):
    out = tmp_path / "el.root"
    assert _run("electrons", out, "-n", 3, "--format", "rntuple", "-q").returncode == 0
    with uproot.open(out) as file:
        arrays = file["Events"].arrays()
        assert read_shapes(file) == {}
    assert str(arrays["Electron_image"].type.content) == "var * 4 * 56 * 11 * float32"
    expected = generate_electron_events(3)
    assert np.array_equal(_images(arrays), _images(expected))


def test_recorun_gen_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "x.root"
    result = _run("hlt", missing, "--events", 2)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not missing.parent.exists()
    for bad in (["hlt", tmp_path / "a.root", "--events", 0],
                ["hcal", tmp_path / "a.root", "--events", 2, "--channels", 99999],
                ["jets", tmp_path / "a.root", "--events", 2, "--top-fraction", 1.5],
                ["jets", tmp_path / "a.root"],
                ["nonsense", tmp_path / "a.root", "--events", 2]):
        result = _run(*bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "error" in result.stderr
    assert list(tmp_path.iterdir()) == []
