"""param_groups / build_optimizer / set_lr on a small ResNet18."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.config import ModelSpec, TrainConfig
from worker.engine.model import build_model
from worker.engine.optim import STAGES, build_optimizer, param_groups, set_lr, stage_of

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

MULTS = {"stem": 0.1, "layer1": 0.2, "layer2": 0.3, "layer3": 0.4, "layer4": 0.5, "fc": 2.0}


def _model(**cfg) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(width=8), TrainConfig(**cfg), 10)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{f"lr_mult_{k}": v for k, v in MULTS.items()}, **kw)


def _ids(groups: list[dict]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


# ----------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["cifar", "deep"])
@pytest.mark.parametrize("no_decay", [True, False])
def test_every_trainable_param_in_exactly_one_group(stem: str, no_decay: bool) -> None:
    model = _model(stem=stem, se_blocks=True, dropout=0.2)
    groups = param_groups(model, _cfg(no_decay_norm_bias=no_decay))
    ids = _ids(groups)
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(g["params"] for g in groups)
    assert all({"params", "weight_decay", "lr_mult", "name"} <= g.keys() for g in groups)


def test_no_decay_flags_on_one_dim_params() -> None:
    cfg = _cfg(weight_decay=1e-3, no_decay_norm_bias=True)
    groups = param_groups(_model(), cfg)
    assert [g["name"] for g in groups] == [f"{s}/{k}" for s in STAGES for k in ("decay", "no_decay")]
    for g in groups:
        if g["name"].endswith("/no_decay"):
            assert g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in g["params"])


def test_decay_everything_when_exclusion_off() -> None:
    groups = param_groups(_model(), _cfg(weight_decay=1e-3, no_decay_norm_bias=False))
    assert [g["name"] for g in groups] == list(STAGES)
    assert all(g["weight_decay"] == 1e-3 for g in groups)


def test_lr_mult_per_stage_and_stem_is_conv1_bn1() -> None:
    model = _model(stem="deep")
    groups = param_groups(model, _cfg())
    for g in groups:
        assert g["lr_mult"] == MULTS[g["name"].split("/")[0]]
    stem_ids = set(_ids([g for g in groups if g["name"].startswith("stem")]))
    expected = {id(p) for n, p in model.named_parameters() if n.startswith(("conv1.", "bn1."))}
    assert stem_ids == expected and len(expected) > 2  # deep stem: 3 convs + 3 BNs


def test_frozen_params_are_left_out_and_empty_groups_omitted() -> None:
    model = _model()
    for p in model.fc.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, _cfg())
    assert not any(g["name"].startswith("fc") for g in groups)
    assert id(model.fc.weight) not in set(_ids(groups))


def test_stage_of_handles_wrappers_and_rejects_unknown() -> None:
    assert stage_of("_orig_mod.layer3.1.conv2.weight") == "layer3"
    assert stage_of("module.bn1.bias") == "stem"
    assert stage_of("fc.1.weight") == "fc"
    with pytest.raises(ValueError, match="head"):
        stage_of("head.weight")


# ----------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW)])
def test_each_optimizer_builds_and_steps(name: str, cls: type) -> None:
    model = _model()
    cfg = _cfg(optimizer=name, lr=0.05, beta1=0.8, beta2=0.99)
    opt = build_optimizer(model, cfg)
    assert type(opt) is cls
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.05 * g["lr_mult"])
    if name != "sgd":
        assert opt.param_groups[0]["betas"] == (0.8, 0.99)

    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert moved > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sgd_nesterov_only_with_momentum() -> None:
    assert build_optimizer(_model(), _cfg(momentum=0.9, nesterov=True)).defaults["nesterov"] is True
    # torch raises on nesterov without momentum; the config allows it, so it is dropped.
    opt = build_optimizer(_model(), _cfg(momentum=0.0, nesterov=True))
    assert opt.defaults["nesterov"] is False


def test_no_decay_groups_reach_the_optimizer() -> None:
    opt = build_optimizer(_model(), _cfg(optimizer="adamw", weight_decay=0.05))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["layer2/decay"]["weight_decay"] == 0.05
    assert by_name["layer2/no_decay"]["weight_decay"] == 0.0


def test_set_lr_applies_base_mult_and_factor() -> None:
    opt = build_optimizer(_model(), _cfg(lr=0.4))
    set_lr(opt, 0.4, 0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.4 * g["lr_mult"] * 0.25)
    set_lr(opt, 0.4, 0.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
