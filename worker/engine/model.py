"""ResNet18 as the competitions use it: torchvision's ResNet with a configurable width, stem, SE and dropout.

The network stays a `torchvision.models.resnet.ResNet` underneath, with torchvision's module names
(`conv1`, `bn1`, `maxpool`, `layer1`..`layer4`, `fc`). `worker.engine.optim` groups parameters by those
names (stem = `conv1.*` + `bn1.*`), so every variant keeps its stem inside `conv1`/`bn1`/`maxpool`.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from worker.engine.config import ModelSpec, TrainConfig

Stem = Literal["cifar", "imagenet", "deep"]

# torchvision's ResNet builds its stages for a first-stage width of 64; we scale from there.
_TORCHVISION_WIDTH = 64
_RESNET18_LAYERS = [2, 2, 2, 2]


# ----------------------------------------------------------------------------------------------------
# Squeeze-and-excitation
# ----------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Channel gating from Hu et al. (2018): global pool -> bottleneck MLP -> sigmoid scale.

    1x1 convolutions instead of Linear layers keep the tensors 4-d, so channels_last stays intact.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        # reduction 16 collapses narrow stages to 1-2 units; a floor of 8 (never above the channel
        # count itself) keeps the gate expressive for the small widths competitions use.
        hidden = max(channels // reduction, min(min_hidden, channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class SEBasicBlock(BasicBlock):
    """torchvision's BasicBlock with SE on the residual branch, applied before the skip addition.

    Subclassing (rather than wrapping) keeps `isinstance(m, BasicBlock)` true, so torchvision's
    `zero_init_residual` still zeroes `bn2` and the block starts as an identity.
    """

    def __init__(self, inplanes: int, planes: int, *args, **kwargs) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcite(planes * self.expansion)

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.se(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = out + identity
        return self.relu(out)


# ----------------------------------------------------------------------------------------------------
# Stems
# ----------------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def make_stem(stem: Stem, width: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(conv1, bn1, maxpool) for a stem; ResNet.forward runs conv1 -> bn1 -> relu -> maxpool."""
    if stem == "cifar":
        # 32x32 inputs cannot afford the 4x downsampling of the ImageNet stem.
        conv: nn.Module = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        pool: nn.Module = nn.Identity()
    elif stem == "imagenet":
        conv = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    elif stem == "deep":
        # ResNet-C style: three 3x3 convs see the same 7x7 field with more nonlinearity. The last
        # conv's BN+ReLU are the ResNet's own bn1/relu, so the stem is still conv1.* + bn1.*.
        half = max(width // 2, 1)
        conv = nn.Sequential(
            *_conv_bn_relu(3, half),
            *_conv_bn_relu(half, half),
            nn.Conv2d(half, width, 3, stride=1, padding=1, bias=False),
        )
        pool = nn.Identity()
    else:
        raise ValueError(f"unknown stem {stem!r}")

    # Same initialisation torchvision applies to the stem it builds itself.
    for m in conv.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return conv, nn.BatchNorm2d(width), pool


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


class ResNet18(ResNet):
    """torchvision ResNet18 with stage widths (w, 2w, 4w, 8w), a choice of stem, optional SE and dropout."""

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = _TORCHVISION_WIDTH,
        stem: Stem = "cifar",
        se_blocks: bool = False,
        dropout: float = 0.0,
    ) -> None:
        # Read by _make_layer, which ResNet.__init__ calls, so it has to exist before super().__init__.
        # (nn.Module accepts plain attributes before its own __init__.)
        self.width = width
        block = SEBasicBlock if se_blocks else BasicBlock
        # zero_init_residual: every block starts as the identity, which trains noticeably better on the
        # short schedules competitions run (Goyal et al., 2017).
        super().__init__(block, _RESNET18_LAYERS, num_classes=num_classes, zero_init_residual=True)

        self.stem = stem
        self.conv1, self.bn1, self.maxpool = make_stem(stem, width)
        features = 8 * width * block.expansion
        head = nn.Linear(features, num_classes)
        self.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == _TORCHVISION_WIDTH:
            # layer1: torchvision set inplanes for its fixed 64-channel stem; ours has `width`.
            self.inplanes = self.width
        planes = planes * self.width // _TORCHVISION_WIDTH  # 64,128,256,512 -> w,2w,4w,8w exactly
        return super()._make_layer(block, planes, blocks, stride, dilate)


def build_model(spec: ModelSpec, cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network a run trains: architecture/width from the competition, stem/SE/dropout from the config."""
    if spec.arch != "resnet18":
        raise ValueError(f"unsupported architecture {spec.arch!r}")
    return ResNet18(
        num_classes,
        width=spec.width,
        stem=cfg.stem,
        se_blocks=cfg.se_blocks,
        dropout=cfg.dropout,
    )


# ----------------------------------------------------------------------------------------------------
# Memory format: channels_last, except where oneDNN is known to corrupt memory
# ----------------------------------------------------------------------------------------------------

# oneDNN's CPU backward for a 1x1 stride-2 convolution in channels_last with 2-7 input channels corrupts
# the heap ("double free or corruption", SIGSEGV) when oneDNN runs its AVX2 kernels (an AVX2-only CPU, or
# ONEDNN_MAX_CPU_ISA=AVX2); AVX-512 kernels and contiguous tensors are fine, and so is a single input
# channel. Measured with torch 2.14.1 (tests/engine/test_memory_format.py maps the boundary): in a
# ResNet18 these are the downsample convolutions of layer2..layer4, so every width below 8 hits it.
# The guard applies on every CPU, not only AVX2 ones, so one spec lays its tensors out the same way (and
# computes the same numbers) on whichever CPU runs it.
ONEDNN_NARROW_STRIDED_1X1 = range(2, 8)


def _hits_onednn_fault(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels in ONEDNN_NARROW_STRIDED_1X1)


def choose_memory_format(model: nn.Module, device_type: str, channels_last: bool) -> tuple[bool, str | None]:
    """-> (use channels_last, why the request was overridden or None).

    Contiguous on CPU when the model has a layer in oneDNN's known-bad channels_last case (see above).
    """
    if not channels_last or device_type != "cpu":
        return channels_last, None
    bad = next((name for name, m in model.named_modules() if _hits_onednn_fault(m)), None)
    if bad is None:
        return True, None
    conv = model.get_submodule(bad)
    return False, (f"contiguous instead of channels_last: {bad} is a 1x1 stride-2 convolution with "
                   f"{conv.in_channels} input channels, whose channels_last backward corrupts memory in "
                   "oneDNN's AVX2 CPU kernels (widths below 8)")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ResNet18", "SEBasicBlock", "SqueezeExcite", "build_model", "choose_memory_format", "count_parameters",
           "make_stem"]
