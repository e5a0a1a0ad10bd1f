import math

import pytest

from worker.engine.config import TrainConfig
from worker.engine.schedule import lr_curve, lr_factor


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_constant_is_one_everywhere():
    assert lr_curve(50, 10, cfg(schedule="constant")) == [1.0] * 50


def test_onecycle_start_peak_and_end():
    c = cfg(schedule="onecycle", onecycle_pct_start=0.25, final_lr_frac=0.0)
    # 101 steps: t = step / 100, so the peak lands exactly on step 25.
    assert lr_factor(0, 101, 10, c) == pytest.approx(0.04)
    assert lr_factor(25, 101, 10, c) == pytest.approx(1.0)
    assert lr_factor(100, 101, 10, c) == pytest.approx(0.0)
    # Linear in between: halfway up and halfway down.
    assert lr_factor(50, 101, 10, c) == pytest.approx(1 - 25 / 75)
    assert lr_factor(12, 101, 10, c) == pytest.approx(0.04 + 0.96 * 12 / 25)
    curve = lr_curve(101, 10, c)
    assert max(curve) == pytest.approx(1.0) and curve.index(max(curve)) == 25


def test_onecycle_final_frac():
    c = cfg(schedule="onecycle", final_lr_frac=0.1)
    assert lr_factor(99, 100, 10, c) == pytest.approx(0.1)


def test_cosine_ends_and_midpoint():
    c = cfg(schedule="cosine", final_lr_frac=0.0)
    assert lr_factor(0, 101, 10, c) == pytest.approx(1.0)
    assert lr_factor(50, 101, 10, c) == pytest.approx(0.5)
    assert lr_factor(100, 101, 10, c) == pytest.approx(0.0, abs=1e-12)
    c = cfg(schedule="cosine", final_lr_frac=0.2)
    assert lr_factor(50, 101, 10, c) == pytest.approx(0.6)
    assert lr_factor(100, 101, 10, c) == pytest.approx(0.2)
    assert lr_factor(25, 101, 10, c) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_step_decays_on_the_epoch_boundary():
    c = cfg(schedule="step", step_size=2, gamma=0.5)
    spe = 7  # odd, so epochs are fractional between boundaries
    assert lr_factor(0, 100, spe, c) == 1.0
    assert lr_factor(13, 100, spe, c) == 1.0  # epoch 1.86
    assert lr_factor(14, 100, spe, c) == 0.5  # epoch 2.0 exactly
    assert lr_factor(27, 100, spe, c) == 0.5
    assert lr_factor(28, 100, spe, c) == 0.25


def test_multistep_milestones():
    c = cfg(schedule="multistep", milestones=[2, 5], gamma=0.1)
    spe = 3
    assert lr_factor(5, 30, spe, c) == 1.0
    assert lr_factor(6, 30, spe, c) == pytest.approx(0.1)
    assert lr_factor(14, 30, spe, c) == pytest.approx(0.1)
    assert lr_factor(15, 30, spe, c) == pytest.approx(0.01)
    assert lr_factor(29, 30, spe, c) == pytest.approx(0.01)


def test_warmup_ramp_then_schedule_over_remaining_steps():
    c = cfg(schedule="cosine", warmup_epochs=0.5, final_lr_frac=0.0)
    spe = 8  # warmup = 4 steps
    assert [lr_factor(s, 25, spe, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine runs over steps 4..24: starts at 1, midpoint at step 14, ends at 0 on step 24.
    assert lr_factor(4, 25, spe, c) == pytest.approx(1.0)
    assert lr_factor(14, 25, spe, c) == pytest.approx(0.5)
    assert lr_factor(24, 25, spe, c) == pytest.approx(0.0, abs=1e-12)


def test_warmup_rounds_to_steps_and_overrides_step_schedules():
    c = cfg(schedule="constant", warmup_epochs=0.3)
    spe = 10  # round(3.0) = 3 warmup steps
    assert lr_curve(6, spe, c) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    c = cfg(schedule="step", warmup_epochs=1, step_size=1, gamma=0.5)
    assert lr_curve(6, 2, c) == pytest.approx([0.5, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_single_step_and_bad_args():
    assert lr_factor(0, 1, 1, cfg(schedule="cosine")) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, 0, 1, cfg())
    with pytest.raises(ValueError):
        lr_factor(-1, 10, 1, cfg())
