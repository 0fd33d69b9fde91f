"""The ResNet-50 top tagger's training (server/train_toptag.py) and its partial checkpoint
(a seeded backbone regenerated at load, server/weights.py)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recorun.server import train_toptag, weights  # noqa: E402
from recorun.server.models import make_model  # noqa: E402
from recorun.server.serve import ModelLoadError, load_weights  # noqa: E402


def test_the_head_folds_standardisation_and_regression_into_fc():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (50, 2048))
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    w, b = rng.normal(0, 0.05, 2048), 0.3
    model = make_model("resnet50")
    train_toptag.set_head(model, w, b, mean, std)
    with torch.no_grad():
        top = torch.softmax(model.fc(torch.from_numpy(x).float()), dim=1)[:, 1].numpy()
    expected = 1.0 / (1.0 + np.exp(-(((x - mean) / std) @ w + b)))
    np.testing.assert_allclose(top, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A tagger trained on 40 events: fast, not a physics result."""
    out = tmp_path_factory.mktemp("tagger") / "resnet50.pt"
    assert train_toptag.main(["--events", "40", "--seed", "5", "--out", str(out)]) == 0
    return out


def test_a_checkpoint_stores_the_norms_and_the_head_not_the_backbone(small_checkpoint):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    assert small_checkpoint.stat().st_size < 1_000_000
    assert checkpoint["backbone"]["seed"] == weights.INIT_SEED
    stored = set(checkpoint["state_dict"])
    assert {"fc.weight", "fc.bias", "stem.1.running_mean", "stem.1.running_var"} <= stored
    assert "stem.0.weight" not in stored
    assert "recorun.data.jets.generate(seed=5)" in checkpoint["origin"]
    assert "python -m recorun.server.train resnet50 --seed 5 --events 40" in checkpoint["origin"]

    model = weights.model_from_checkpoint("resnet50", checkpoint)
    state = model.state_dict()
    torch.manual_seed(weights.INIT_SEED)
    seeded = make_model("resnet50").state_dict()
    assert torch.equal(state["stem.0.weight"], seeded["stem.0.weight"])          # backbone
    assert torch.equal(state["fc.weight"], checkpoint["state_dict"]["fc.weight"])  # head
    # the measured statistics, not the initial 0 and 1
    assert not torch.equal(state["stem.1.running_var"], seeded["stem.1.running_var"])


def test_training_is_reproducible_from_its_seed(small_checkpoint, tmp_path):
    again = tmp_path / "again.pt"
    assert train_toptag.main(["--events", "40", "--seed", "5", "--out", str(again)]) == 0
    first = torch.load(small_checkpoint, weights_only=True)["state_dict"]
    second = torch.load(again, weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_backbone_drawn_differently_is_refused_with_the_retraining_command(
        small_checkpoint, tmp_path):
    # fault injection: a checkpoint whose fingerprint is not this torch's seeded backbone (as
    # when another torch version draws other numbers from the seed)
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    checkpoint["backbone"]["fingerprint"] = "0" * 64
    with pytest.raises(weights.WeightsError,
                       match=r"python -m recorun.server.train resnet50") as info:
        weights.model_from_checkpoint("resnet50", checkpoint, "somewhere/resnet50.pt")
    assert "somewhere/resnet50.pt" in str(info.value)
    torch.save(checkpoint, tmp_path / "resnet50.pt")
    with pytest.raises(ModelLoadError, match="resnet50"):
        load_weights("resnet50", tmp_path)


def test_a_checkpoint_missing_more_than_the_backbone_is_refused(small_checkpoint):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    del checkpoint["state_dict"]["fc.weight"], checkpoint["sha256"]
    with pytest.raises(weights.WeightsError, match="does not fit the model .missing: fc.weight"):
        weights.model_from_checkpoint("resnet50", checkpoint)


# ---------------------------------------------------------------------------- damaged checkpoints
def test_a_checkpoint_is_written_with_its_model_and_checksum(small_checkpoint):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    assert checkpoint["model"] == "resnet50"
    assert checkpoint["sha256"] == weights.state_digest(checkpoint["state_dict"])


def test_a_checkpoint_of_another_model_says_which(small_checkpoint, tmp_path):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    torch.save(checkpoint, tmp_path / "facile.pt")
    with pytest.raises(ModelLoadError, match="this is a checkpoint of model 'resnet50'"):
        load_weights("facile", tmp_path)
    # a checkpoint without the model's name (an older one): its keys do not fit
    del checkpoint["model"]
    with pytest.raises(weights.WeightsError, match="does not fit the model .*its origin: top tagger"):
        weights.model_from_checkpoint("facile", checkpoint)


def test_damaged_checkpoints_are_refused(small_checkpoint, tmp_path):
    # fault injection: tensors changed after writing (as bytes flipped on disk would)
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    checkpoint["state_dict"]["stem.1.running_var"][:3] = -88.7
    with pytest.raises(weights.WeightsError, match="damaged: its tensors do not match"):
        weights.model_from_checkpoint("resnet50", checkpoint)
    del checkpoint["sha256"]                     # no checksum: the values themselves are checked
    with pytest.raises(weights.WeightsError, match="stem.1.running_var holds negative variances"):
        weights.model_from_checkpoint("resnet50", checkpoint)
    checkpoint["state_dict"]["stem.1.running_var"][:3] = float("nan")
    with pytest.raises(weights.WeightsError, match="non-finite"):
        weights.model_from_checkpoint("resnet50", checkpoint)
    for content in (b"", b"not a checkpoint at all", small_checkpoint.read_bytes()[:5000]):
        (tmp_path / "resnet50.pt").write_bytes(content)
        with pytest.raises(ModelLoadError, match="cannot be read as a checkpoint"):
            load_weights("resnet50", tmp_path)


def test_too_few_events_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_toptag.main(["--events", "39"])
    assert info.value.code == 2
    assert "--events must be >= 40" in capsys.readouterr().err
    assert train_toptag.split_events(40) == (30, 10)
    assert train_toptag.split_events(3000) == (2700, 300)
