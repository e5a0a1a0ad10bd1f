"""The run description: hyperparameters a student sets, plus what the competition fixes.

Everything here is plain data (pydantic). `app` imports this module to validate submissions and to
publish the JSON Schema; nothing here imports torch, so the API can validate without loading it.

Bounds on `TrainConfig` are the engine's hard limits. A competition narrows them further with a
search space (see `SearchSpace`), and its budget caps epochs and seconds.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

Frac = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    # allow_inf_nan=False: JSON bodies may spell NaN and Infinity (Python's parser accepts them); no
    # hyperparameter, bound or budget means anything non-finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------------
# Hyperparameters (what a submission sets)
# ----------------------------------------------------------------------------------------------------


class TrainConfig(_Strict):
    """One training recipe. Every field has a default, so `{}` is a valid (and decent) config."""

    # -- optimizer
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.2, gt=0.0, le=10.0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (sgd only, needs momentum > 0).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam/AdamW beta1.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam/AdamW beta2.")
    weight_decay: float = Field(
        5e-4, ge=0.0, le=1.0, description="Weight decay (L2 for sgd/adam, decoupled for adamw)."
    )
    no_decay_norm_bias: bool = Field(True, description="Exclude norm weights and biases from weight decay.")
    lr_mult_stem: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for the stem.")
    lr_mult_layer1: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for layer1.")
    lr_mult_layer2: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for layer2.")
    lr_mult_layer3: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for layer3.")
    lr_mult_layer4: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for layer4.")
    lr_mult_fc: float = Field(1.0, ge=0.0, le=10.0, description="LR multiplier for the classifier.")

    # -- batching
    batch_size: int = Field(
        256, ge=1, le=8192, description="Examples per micro-step; effective batch is batch_size * grad_accum_steps."
    )
    epochs: int = Field(10, ge=1, le=1000, description="Epochs; unset means the whole budget (budget.max_epochs), "
                        "and a competition refuses more than that.")
    grad_accum_steps: int = Field(1, ge=1, le=128, description="Micro-steps accumulated per optimizer step.")
    grad_clip_norm: float | None = Field(None, gt=0.0, le=1000.0, description="Clip the global grad norm (None: off).")

    # -- schedule
    schedule: Literal["constant", "step", "multistep", "cosine", "onecycle"] = Field("onecycle")
    warmup_epochs: float = Field(0.0, ge=0.0, le=100.0, description="Linear warmup in front of the schedule.")
    final_lr_frac: float = Field(
        0.0, ge=0.0, le=1.0, description="Final lr as a fraction of the peak (cosine, onecycle)."
    )
    step_size: int = Field(30, ge=1, le=1000, description="Epochs between decays (step).")
    milestones: list[int] = Field(
        default_factory=lambda: [50, 75], description="Epochs at which lr decays (multistep)."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Decay factor (step, multistep).")
    onecycle_pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="Fraction of training spent rising (onecycle).")

    # -- regularisation
    label_smoothing: float = Field(0.1, ge=0.0, le=0.5)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0, description="Mixup Beta(alpha, alpha); 0 disables.")
    mixup_prob: Frac = Field(1.0, description="Chance a batch gets mixup (when alpha > 0).")
    cutmix_alpha: float = Field(0.0, ge=0.0, le=10.0, description="CutMix Beta(alpha, alpha); 0 disables.")
    cutmix_prob: Frac = Field(1.0, description="Chance a batch gets cutmix (when alpha > 0).")
    ema_decay: float | None = Field(
        0.99, ge=0.5, lt=1.0, description="EMA of weights (decay ramps up over the first steps), evaluated "
        "instead of the raw weights; null disables."
    )
    ema_every: int = Field(1, ge=1, le=1000, description="Optimizer steps between EMA updates.")
    swa_epochs: int = Field(0, ge=0, le=1000, description="Average weights over the last N epochs (0: off).")

    # -- augmentation (all run batched on the device, drawn per sample)
    crop_padding: int = Field(4, ge=0, le=64, description="Random crop with reflect padding (0: off).")
    random_resized_crop: bool = Field(False, description="Random resized crop instead of padded crop.")
    rrc_scale_min: float = Field(0.35, gt=0.0, le=1.0)
    rrc_scale_max: float = Field(1.0, gt=0.0, le=1.0)
    flip: bool = Field(True, description="Random horizontal flip.")
    cutout_size: int = Field(0, ge=0, le=512, description="Cutout square side in pixels (0: off).")
    cutout_prob: Frac = Field(1.0)
    erasing_prob: Frac = Field(0.0, description="Random erasing probability.")
    erasing_scale_max: float = Field(0.33, gt=0.0, le=1.0, description="Largest erased area fraction.")
    jitter_brightness: float = Field(0.0, ge=0.0, le=1.0)
    jitter_contrast: float = Field(0.0, ge=0.0, le=1.0)
    jitter_saturation: float = Field(0.0, ge=0.0, le=1.0)
    jitter_hue: float = Field(0.0, ge=0.0, le=0.5, description="Hue shift uniform in [-h, h] turns of the colour "
                              "wheel, as torchvision's ColorJitter(hue=h).")
    grayscale_prob: Frac = Field(0.0)
    rotation_degrees: float = Field(0.0, ge=0.0, le=45.0)

    # -- evaluation
    tta: Literal["none", "flip", "flip_translate"] = Field("flip_translate", description="Test-time augmentation.")

    # -- architecture (a competition must enable anything but the defaults)
    stem: Literal["cifar", "imagenet", "deep"] = Field("cifar")
    se_blocks: bool = Field(False, description="Squeeze-and-excitation in every residual block.")

    # -- precision
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: on CUDA bf16 if supported, else fp16 with loss scaling; on CPU bf16 where "
        "the CPU has native bf16 (AVX512-BF16 or AMX), else fp32."
    )
    channels_last: bool = Field(True)
    compile: bool = Field(False, description="torch.compile the model (only where the competition enables it).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.rrc_scale_min > self.rrc_scale_max:
            raise ValueError("rrc_scale_min must be <= rrc_scale_max")
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ValueError("milestones must be ascending positive epoch numbers")
        return self


HYPERPARAMETERS: tuple[str, ...] = tuple(TrainConfig.model_fields)
# Fields a {min, max} range applies to (ints and floats, optional or not; not bools, literals or lists).
NUMERIC: frozenset[str] = frozenset(
    name for name, f in TrainConfig.model_fields.items()
    if str(f.annotation) in ("<class 'int'>", "<class 'float'>", "int | None", "float | None")
)


# ----------------------------------------------------------------------------------------------------
# What the competition fixes
# ----------------------------------------------------------------------------------------------------


class ModelSpec(_Strict):
    arch: Literal["resnet18"] = "resnet18"
    width: int = Field(64, ge=4, le=512, description="Channels of the first stage (64 is the standard ResNet18).")


class DataSpec(_Strict):
    name: Literal["cifar10", "imagefolder"] = "cifar10"
    path: str | None = Field(None, max_length=4096, pattern=r"^[^\x00-\x1f]*$",
                             description="Image-folder tree, tarball, or torchvision CIFAR-10 root.")
    image_size: int = Field(32, ge=8, le=1024)
    train_subset: int | None = Field(None, ge=10, description="Class-balanced training subset size.")
    test_subset: int | None = Field(None, ge=10, description="Class-balanced test subset size.")


class Budget(_Strict):
    max_epochs: int = Field(10, ge=1, le=1000)
    max_seconds: float | None = Field(None, gt=0, description="Device-seconds of training; evaluation is extra.")
    compile_counts: bool = Field(True, description="Whether torch.compile warm-up counts against max_seconds.")

    def epochs_for(self, cfg: TrainConfig) -> int:
        """The one place the epoch cap lives: a config that leaves epochs unset gets the whole budget; one
        that sets them gets at most max_epochs. RunSpec applies it, the engine trains it, and the API
        refuses a submission that asks for more (check_in_space)."""
        return min(cfg.epochs, self.max_epochs) if "epochs" in cfg.model_fields_set else self.max_epochs


class RunSpec(_Strict):
    """Everything one run needs: the same object runs on a worker and in `hparena train`."""

    config: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    budget: Budget = Field(default_factory=Budget)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    deterministic: bool = False
    eval_every_epoch: bool = Field(True, description="Evaluate the public test half after every epoch.")

    @model_validator(mode="after")
    def _epochs_within_budget(self) -> RunSpec:
        """Resolve epochs against the budget (Budget.epochs_for), so the spec says how many epochs it trains.
        A stored spec never needs the cut (the API refuses such a submission); a local `hparena train` does."""
        epochs = self.budget.epochs_for(self.config)
        if epochs != self.config.epochs or "epochs" not in self.config.model_fields_set:
            # Assignment re-runs this validator once; the copy has epochs set, so it stops there.
            self.config = self.config.model_copy(update={"epochs": epochs})
        return self

    def identity(self) -> str:
        """SHA-256 of the spec's canonical JSON. Equal identities were asked for the same computation (data,
        model, budget, config and seed); their results match bit for bit only with `deterministic` on the
        same code and hardware."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Search space: how a competition narrows TrainConfig
# ----------------------------------------------------------------------------------------------------


class Range(_Strict):
    min: float | None = None
    max: float | None = None


class Choices(_Strict):
    choices: list[Any] = Field(min_length=1)


SearchSpace = dict[str, Range | Choices]

# Architecture options and compile are off unless a competition enables them.
DEFAULT_RESTRICTIONS: dict[str, Choices] = {
    "stem": Choices(choices=["cifar"]),
    "se_blocks": Choices(choices=[False]),
    "compile": Choices(choices=[False]),
}


def effective_space(space: dict[str, Any] | None) -> dict[str, Range | Choices]:
    """The competition's space over the defaults; unknown keys are an error."""
    out: dict[str, Range | Choices] = dict(DEFAULT_RESTRICTIONS)
    for name, rule in (space or {}).items():
        if name not in TrainConfig.model_fields:
            raise ValueError(f"search space names unknown hyperparameter {name!r}")
        if not isinstance(rule, Range | Choices):
            rule = Choices.model_validate(rule) if isinstance(rule, dict) and "choices" in rule \
                else Range.model_validate(rule)
        if isinstance(rule, Range):
            if name not in NUMERIC:
                raise ValueError(f"{name!r} is not numeric: restrict it with {{'choices': [...]}}, not a range")
            if rule.min is not None and rule.max is not None and rule.min > rule.max:
                raise ValueError(f"search space for {name!r} has min {rule.min} > max {rule.max}")
        else:
            try:  # every listed choice must itself be a valid value, or no submission could ever pass
                for choice in rule.choices:
                    TrainConfig.model_validate({name: choice})
            except ValueError as e:
                raise ValueError(f"search space for {name!r} lists a value the engine rejects: {e}") from None
        out[name] = rule
    return out


class Violation(NamedTuple):
    """One hyperparameter outside a competition's space: its value, why in words, and what is allowed
    (`{"choices": [...]}` or `{"min": ..., "max": ...}`)."""

    field: str
    value: Any
    why: str
    allowed: dict[str, Any]

    @property
    def message(self) -> str:
        return f"{self.field}={self.value!r} is outside the competition's search space: {self.why}"


def check_in_space(cfg: TrainConfig, space: dict[str, Any] | None, budget: Budget) -> list[Violation]:
    """Every field of `cfg` outside the competition's space, and epochs over its budget; empty if none.
    Unset epochs are checked as what they resolve to: the whole budget."""
    violations: list[Violation] = []
    values = cfg.model_dump()
    values["epochs"] = budget.epochs_for(cfg)
    rules = effective_space(space)
    for name, rule in rules.items():
        value = values[name]
        if isinstance(rule, Choices):
            if value not in rule.choices:
                violations.append(Violation(name, value, f"must be one of {rule.choices}", {"choices": rule.choices}))
        elif value is not None and isinstance(value, int | float) and not isinstance(value, bool):
            lo = -math.inf if rule.min is None else rule.min
            hi = math.inf if rule.max is None else rule.max
            if not lo <= value <= hi:
                violations.append(Violation(name, value, f"must be within [{rule.min}, {rule.max}]", rule.model_dump()))
    if "epochs" in cfg.model_fields_set and values["epochs"] < cfg.epochs:
        violations.append(Violation("epochs", cfg.epochs, f"must be within [1, {budget.max_epochs}] (competition "
                                    "budget)", {"min": 1, "max": budget.max_epochs}))
    return violations
