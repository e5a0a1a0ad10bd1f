"""build_model: shapes for every stem and width, torchvision lineage, parameter accounting."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from worker.engine.config import ModelSpec, TrainConfig
from worker.engine.model import SEBasicBlock, SqueezeExcite, build_model, count_parameters

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _model(width: int = 8, num_classes: int = 10, **cfg) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(width=width), TrainConfig(**cfg), num_classes)


# ----------------------------------------------------------------------------------------------------
# Shapes and structure
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["cifar", "imagenet", "deep"])
@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_every_stem_and_width(stem: str, width: int, size: int) -> None:
    model = _model(width, num_classes=7, stem=stem).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_is_torchvision_resnet_with_standard_module_names() -> None:
    model = _model()
    assert isinstance(model, ResNet)
    names = {n for n, _ in model.named_children()}
    assert {"conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"} <= names


@pytest.mark.parametrize("width", [4, 8, 24])
def test_stage_widths_scale(width: int) -> None:
    model = _model(width)
    widths = [getattr(model, f"layer{i}")[-1].bn2.num_features for i in range(1, 5)]
    assert widths == [width, 2 * width, 4 * width, 8 * width]
    assert model.fc.in_features == 8 * width
    # layer1 keeps its width and stride, so it needs no projection shortcut.
    assert model.layer1[0].downsample is None


def test_stems_differ_as_documented() -> None:
    cifar, imagenet, deep = (_model(16, stem=s) for s in ("cifar", "imagenet", "deep"))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    convs = [m for m in deep.conv1.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1)), (8, 16, (3, 3), (1, 1))]
    assert isinstance(deep.maxpool, nn.Identity)
    assert deep.bn1.num_features == 16


def test_cifar_stem_keeps_resolution_imagenet_stem_divides_by_four() -> None:
    x = torch.randn(1, 3, 32, 32)
    for stem, side in (("cifar", 32), ("deep", 32), ("imagenet", 8)):
        m = _model(8, stem=stem).eval()
        with torch.no_grad():
            assert m.maxpool(m.relu(m.bn1(m.conv1(x)))).shape[-1] == side


# ----------------------------------------------------------------------------------------------------
# Parameter accounting
# ----------------------------------------------------------------------------------------------------


def test_width64_cifar_parameter_count_matches_torchvision_minus_stem_kernel() -> None:
    ours = count_parameters(_model(64, stem="cifar"))
    reference = count_parameters(torchvision.models.resnet18(num_classes=10))
    # Only the stem conv differs: 3 -> 64 channels with a 7x7 kernel vs a 3x3 kernel.
    assert reference - ours == 3 * 64 * (7 * 7 - 3 * 3)


def test_width64_imagenet_stem_is_exactly_torchvision_resnet18() -> None:
    ours = _model(64, stem="imagenet")
    reference = torchvision.models.resnet18(num_classes=10)
    shapes = {n: p.shape for n, p in ours.named_parameters()}
    assert shapes == {n: p.shape for n, p in reference.named_parameters()}


def test_se_blocks_add_parameters_in_every_block() -> None:
    plain, se = _model(16), _model(16, se_blocks=True)
    blocks = [m for m in se.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(isinstance(b, SEBasicBlock) for b in blocks)
    extra = sum(count_parameters(b.se) for b in blocks)
    assert extra > 0
    assert count_parameters(se) == count_parameters(plain) + extra


def test_se_gate_scales_channels_between_zero_and_input() -> None:
    se = SqueezeExcite(32)
    x = torch.rand(2, 32, 4, 4) + 0.1
    y = se(x)
    assert y.shape == x.shape
    assert (y >= 0).all() and (y <= x).all()


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = _model(8, se_blocks=True)
    for block in (m for m in model.modules() if isinstance(m, BasicBlock)):
        assert torch.all(block.bn2.weight == 0)


# ----------------------------------------------------------------------------------------------------
# Head
# ----------------------------------------------------------------------------------------------------


def test_dropout_in_fc_only_when_requested() -> None:
    assert isinstance(_model(8).fc, nn.Linear)
    fc = _model(8, dropout=0.3).fc
    assert isinstance(fc, nn.Sequential)
    assert isinstance(fc[0], nn.Dropout) and fc[0].p == pytest.approx(0.3)
    assert isinstance(fc[1], nn.Linear) and fc[1].out_features == 10


def test_backward_runs_through_every_parameter() -> None:
    model = _model(8, stem="deep", se_blocks=True, dropout=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    # bn2 weights start at 0, which zeroes the grads of the convs before them on the first step;
    # every parameter still gets a gradient tensor, i.e. the graph reaches all of them.
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_arch_rejected() -> None:
    spec = ModelSpec.model_construct(arch="resnet50", width=64)
    with pytest.raises(ValueError, match="resnet50"):
        build_model(spec, TrainConfig(), 10)
