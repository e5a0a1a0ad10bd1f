"""Metrics, temperature scaling, the public/private split and TTA inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worker.engine.evaluate import (
    accuracy,
    ece,
    evaluate_halves,
    fit_temperature,
    per_class_accuracy,
    predict_logits,
    split_public_private,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _overconfident(n: int = 2000, k: int = 5, noise: float = 0.3, scale: float = 10.0, seed: int = 0):
    """Logits that rank the true class first (mostly) but are far too sharp, on noisy labels."""
    g = torch.Generator().manual_seed(seed)
    y_clean = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y_clean] += 1.5
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, torch.randint(0, k, (n,), generator=g), y_clean)
    return logits * scale, y


class _Probe(nn.Module):
    """A deterministic model whose logits depend on horizontal position, so a flip changes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)  # behaves differently in train mode: checks eval() is used
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).flatten(1))


def _images(m: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (m, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------


def test_accuracy_and_per_class() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, y) == pytest.approx(0.5)
    pc = per_class_accuracy(logits, y, 4)
    assert pc[0] == pytest.approx(1.0) and pc[1] == pytest.approx(1 / 3)
    assert math.isnan(pc[2]) and math.isnan(pc[3])  # classes without examples


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------


def test_ece_zero_for_confident_correct_predictions() -> None:
    y = torch.tensor([0, 1, 2, 1])
    logits = torch.full((4, 3), -50.0)
    logits[torch.arange(4), y] = 50.0
    assert ece(logits, y) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_toy_case() -> None:
    # Two confident-0.8 predictions (one right) and two confident-0.6 predictions (both right):
    # ECE = 2/4 * |1/2 - 0.8| + 2/4 * |1 - 0.6| = 0.15 + 0.20 = 0.35.
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.4, 0.6], [0.4, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1])
    assert ece(probs.log(), y, n_bins=10) == pytest.approx(0.35, abs=1e-9)
    # With a single bin, ECE is |accuracy - mean confidence| = |0.75 - 0.7|.
    assert ece(probs.log(), y, n_bins=1) == pytest.approx(0.05, abs=1e-9)


def test_fitted_temperature_above_one_for_overconfident_logits_and_reduces_ece() -> None:
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t > 1.0
    assert ece(logits / t, y) < 0.5 * ece(logits, y)
    # T is a minimiser of the NLL: nudging it either way does not help.
    nll = lambda s: nn.functional.cross_entropy(logits.double() / s, y).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))
    assert fit_temperature(logits, y) == t  # deterministic


def test_fitted_temperature_below_one_for_underconfident_logits() -> None:
    logits, y = _overconfident(noise=0.0, scale=0.2)
    assert fit_temperature(logits, y) < 1.0


# ----------------------------------------------------------------------------------------------------
# Public / private split
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 11, 1000])
def test_split_disjoint_covering_and_deterministic(n: int) -> None:
    pub, priv = split_public_private(n)
    assert len(pub) == n // 2 and len(priv) == n - n // 2
    assert set(pub.tolist()).isdisjoint(priv.tolist())
    assert sorted(pub.tolist() + priv.tolist()) == list(range(n))
    again = split_public_private(n)
    assert torch.equal(pub, again[0]) and torch.equal(priv, again[1])


def test_split_is_shuffled_and_seed_dependent() -> None:
    pub, _ = split_public_private(1000)
    assert pub.tolist() != list(range(500))  # not simply the first half
    assert 200 < int((pub < 500).sum()) < 300  # roughly even across the index range
    assert not torch.equal(pub, split_public_private(1000, seed=1)[0])


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def test_evaluate_halves_report() -> None:
    logits, y = _overconfident(n=1000)
    pub, priv = split_public_private(1000)
    rep = evaluate_halves(logits, y, 5, pub, priv)
    assert rep["temperature"] == pytest.approx(fit_temperature(logits[pub], y[pub]))  # fitted on public
    assert rep["accuracy_all"] == pytest.approx(accuracy(logits, y))
    for name, idx in (("public", pub), ("private", priv)):
        half = rep[name]
        assert half["accuracy"] == pytest.approx(accuracy(logits[idx], y[idx]))
        assert len(half["per_class_accuracy"]) == 5
        assert half["ece"] == pytest.approx(ece(logits[idx], y[idx]))
        assert half["ece_temperature"] == pytest.approx(ece(logits[idx] / rep["temperature"], y[idx]))
        assert half["ece_temperature"] < half["ece"]


# ----------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------


def test_predict_logits_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    model = _Probe().train()
    x = _images(10)
    out = predict_logits(model, x, 4, device="cpu", mean=MEAN, std=STD, tta="none")
    assert out.shape == (10, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    model.eval()
    with torch.no_grad():
        expected = model(_normalise(x))
    torch.testing.assert_close(out, expected)
    assert model.training is False  # left as we set it


def test_predict_logits_restores_training_mode() -> None:
    model = _Probe().train()
    predict_logits(model, _images(3), 2, device="cpu", mean=MEAN, std=STD, tta="none")
    assert model.training is True


def test_flip_tta_is_mean_of_both_views() -> None:
    torch.manual_seed(0)
    model = _Probe().eval()
    x = _images(10)
    out = predict_logits(model, x, 3, device="cpu", mean=MEAN, std=STD, tta="flip")
    with torch.no_grad():
        plain = model(_normalise(x))
        flipped = model(_normalise(x).flip(3))
    assert not torch.allclose(plain, flipped)  # the probe does see the flip
    torch.testing.assert_close(out, (plain + flipped) / 2)


@pytest.mark.parametrize("tta", ["flip_translate"])
def test_tta_translate_and_options_run(tta: str) -> None:
    model = _Probe()
    x = _images(5)
    out = predict_logits(model, x, 2, device="cpu", mean=MEAN, std=STD, tta=tta,
                         autocast_dtype=torch.bfloat16, channels_last=True)
    assert out.shape == (5, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_predict_logits_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        predict_logits(_Probe(), torch.zeros(2, 3, 8, 8), 2, device="cpu", mean=MEAN, std=STD, tta="none")
