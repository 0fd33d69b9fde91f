"""The served models: sizes, shapes, where their weights come from, that the trained ones
reconstruct energies on fresh events (and that untrained ones would not pass the same
checks), and that training is reproducible from its seed. Fast: well under 30 s."""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recorun.server import validate
from recorun.model_specs import SPECS
from recorun.server.models import make_model, parameter_count
from recorun.server.train import main as train_main
from recorun.server.validate import deepcalo_comparison, facile_comparison, response
from recorun.server.weights import INIT_SEED, load_model, origin, weights_path

REPO = Path(__file__).resolve().parent.parent
FRESH_SEED = 4242            # neither the training seed (1) nor validate's default (2024)


@pytest.fixture(autouse=True, scope="module")
def _threads_and_cached_samples():
    """2 torch threads; each fresh sample generated once for the module's tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    patch = pytest.MonkeyPatch()
    patch.setattr(validate, "hcal_sample", functools.lru_cache(maxsize=4)(validate.hcal_sample))
    patch.setattr(validate, "electron_sample",
                  functools.lru_cache(maxsize=4)(validate.electron_sample))
    yield
    patch.undo()
    torch.set_num_threads(previous)


def _untrained(name: str) -> torch.nn.Module:
    torch.manual_seed(INIT_SEED)
    return make_model(name).eval()


class _Scaled(torch.nn.Module):
    """A model whose output is multiplied by a constant."""

    def __init__(self, model: torch.nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


def _calibrated(model: torch.nn.Module, bias: float) -> torch.nn.Module:
    """``model`` scaled so that its median response (1 + ``bias``) becomes 1: an untrained
    model made to pass the bias check, for the resolution check to catch."""
    return _Scaled(model, 1.0 / (1.0 + bias)).eval()


# ---------------------------------------------------------------------------- sizes, shapes
def test_parameter_counts():
    counts = {name: parameter_count(make_model(name)) for name in SPECS}
    assert counts["resnet50"] == 23_512_130
    assert 1_700_000 <= counts["deepcalo"] <= 1_850_000          # paper: 1.8 M
    assert 1_400 <= counts["facile"] <= 2_000                     # paper: ~2 k
    assert counts["facile"] == 1_553 and counts["deepcalo"] == 1_776_417


@pytest.mark.parametrize("name", list(SPECS))
def test_output_shapes_follow_specs(name):
    spec = SPECS[name]
    model = load_model(name)
    batch = 3
    x = torch.randn(batch, *spec.inputs[0].shape, dtype=getattr(torch, spec.inputs[0].dtype))
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (batch, *spec.outputs[0].shape)
    assert y.dtype == getattr(torch, spec.outputs[0].dtype)
    assert torch.isfinite(y).all()
    if name == "resnet50":                          # class probabilities
        torch.testing.assert_close(y.sum(dim=1), torch.ones(batch))


# ---------------------------------------------------------------------------- weights' origin
@pytest.mark.parametrize("name", ["facile", "deepcalo"])
def test_trained_weights_are_loaded(name):
    assert weights_path(name).exists()
    assert origin(name).startswith("trained")
    assert f"server.train {name}" in origin(name)          # the command that made them
    checkpoint = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    loaded = load_model(name).state_dict()
    assert set(loaded) == set(checkpoint["state_dict"])
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(loaded[key], value), key
    assert not all(torch.equal(loaded[k], v) for k, v in _untrained(name).state_dict().items())


def test_resnet50_is_seeded_not_trained():
    assert not weights_path("resnet50").exists()
    assert origin("resnet50").startswith("untrained")
    assert str(INIT_SEED) in origin("resnet50")
    first, second = load_model("resnet50").state_dict(), load_model("resnet50").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------- physics
def _facile_check(model):
    """Above 20 GeV: |median bias| < 5 % and resolution < 1.5 x the simple method's."""
    (_, _, res), = facile_comparison(30, FRESH_SEED, model, bins=((20.0, np.inf),))
    fac, simple = res["FACILE"], res["simple"]
    return abs(fac.bias) < 0.05 and fac.resolution < 1.5 * simple.resolution, fac, simple


def test_facile_reconstructs_channel_energy():
    ok, fac, simple = _facile_check(load_model("facile"))
    assert ok, (fac, simple)
    assert fac.n >= 50


def test_facile_check_fails_for_untrained_weights():
    ok, fac, simple = _facile_check(_untrained("facile"))
    assert not ok, (fac, simple)
    # even rescaled to the right median: the resolution check fails
    ok, fac, simple = _facile_check(_calibrated(_untrained("facile"), fac.bias))
    assert abs(fac.bias) < 0.01 and not ok, (fac, simple)


def _deepcalo_check(model):
    """Above 50 GeV: median response within 10 % of 1 and resolution < 2 x the nominal's."""
    (_, _, res), = deepcalo_comparison(300, FRESH_SEED, model, bins=((50.0, np.inf),))
    dc, nominal = res["DeepCalo"], res["nominal"]
    return abs(dc.bias) < 0.10 and dc.resolution < 2.0 * nominal.resolution, dc, nominal


def test_deepcalo_reconstructs_electron_energy():
    ok, dc, nominal = _deepcalo_check(load_model("deepcalo"))
    assert ok, (dc, nominal)
    assert dc.n >= 200


def test_deepcalo_check_fails_for_untrained_weights():
    ok, dc, nominal = _deepcalo_check(_untrained("deepcalo"))
    assert not ok, (dc, nominal)
    ok, dc, nominal = _deepcalo_check(_calibrated(_untrained("deepcalo"), dc.bias))
    assert abs(dc.bias) < 0.01 and not ok, (dc, nominal)


def test_response_measures():
    true = np.full(1001, 10.0)
    reco = true * (1.02 + 0.05 * np.linspace(-1, 1, 1001))      # uniform 0.97..1.07
    r = response(reco, true)
    assert r.n == 1001
    assert r.bias == pytest.approx(0.02, abs=1e-9)
    assert r.resolution == pytest.approx(0.05 * 0.68, abs=1e-3)  # half of the 16-84 % width
    assert np.isnan(response([1.0], [1.0]).bias)


def test_validate_writes_the_model_card(tmp_path, capsys):
    out = tmp_path / "MODELS.md"
    assert validate.main(["--out", str(out), "--seed", str(FRESH_SEED), "--hcal-events", "2",
                          "--electron-events", "40"]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    for what in ("23,512,130", "1,776,417", "1,553"):
        assert what in text and what in printed
    assert "| FACILE bias | FACILE resolution | simple bias |" in text
    assert "| DeepCalo bias | DeepCalo resolution | nominal bias |" in text
    assert origin("facile") in text and origin("resnet50") in text
    assert "no GPU" in text or "GPU:" in text
    assert "MAHI" in text


def test_validate_refuses_the_training_seed(capsys):
    with pytest.raises(SystemExit) as exc:
        validate.main(["--out", "-", "--seed", str(validate.trained_seed("facile"))])
    assert exc.value.code == 2
    assert "fresh" in capsys.readouterr().err


# ---------------------------------------------------------------------------- training
def _train(tmp: Path, name: str, seed: int, subprocess_: bool = True) -> dict:
    """``python -m recorun.server.train facile`` on 3 events (1 epoch), in a new process or not."""
    out = tmp / name
    args = ["facile", "--events", "3", "--epochs", "1", "--seed", str(seed), "--out", str(out)]
    if subprocess_:
        subprocess.run([sys.executable, "-m", "recorun.server.train", *args], cwd=REPO, check=True,
                       capture_output=True, timeout=120)
    else:
        assert train_main(args) == 0
    return torch.load(out, map_location="cpu", weights_only=True)


def test_training_is_reproducible_from_its_seed(tmp_path):
    first = _train(tmp_path, "a.pt", 3)
    second = _train(tmp_path, "b.pt", 3)
    other = _train(tmp_path, "c.pt", 4, subprocess_=False)
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert not all(torch.equal(v, other["state_dict"][k])
                   for k, v in first["state_dict"].items())
    assert first["origin"].startswith("trained on 48000 synthetic HCAL channels")
    assert "seed=3" in first["origin"]
    assert first["origin"].endswith(
        f"command: python -m recorun.server.train facile --events 3 --epochs 1 --seed 3 --out "
        f"{tmp_path / 'a.pt'}")
    model = make_model("facile")
    model.load_state_dict(first["state_dict"])       # loads into the served architecture
