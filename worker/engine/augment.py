"""Batched, on-device data augmentation.

Every function takes a normalized float batch (B, C, H, W) on any device and a `torch.Generator` on
that same device, and draws its randomness per sample from that generator only: the same generator
state gives the same output, on CPU and on CUDA alike. No PIL and no Python loop over samples; a whole
batch costs a handful of kernel launches, so augmentation keeps up with the GPU.

Pixel-space operations (color jitter, grayscale) un-normalize with `mean`/`std`, which default to the
CIFAR-10 statistics. Regions that are "blanked" (cutout, the corners a rotation exposes) are set to 0
in normalized space, i.e. the dataset's mean color.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.config import TrainConfig

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights torchvision's rgb_to_grayscale uses


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, x: Tensor) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=x.device)


def _chance(n: int, p: float, gen: torch.Generator, x: Tensor) -> Tensor:
    """Per-sample Bernoulli(p) as a bool vector."""
    return torch.rand(n, generator=gen, device=x.device) < p


def _bcast(v: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1), to scale or select whole samples."""
    return v.view(-1, 1, 1, 1)


def _warp(x: Tensor, theta: Tensor, padding_mode: str) -> Tensor:
    # grid_sample lacks half kernels on some backends; warping in fp32 and casting back is cheap.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype)


# ---- crops ----


def _reflect(i: Tensor, n: int) -> Tensor:
    """Map indices in [-n+1, 2n-2] onto [0, n-1] the way reflect padding does (edge not repeated)."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@functools.lru_cache(maxsize=32)
def _crop_tables(padding: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every offset o in [0, 2 * padding]: the source rows (2p+1, H) and columns (2(2p+1), W) of a crop
    at o from the reflect-padded image, columns flipped in the second half. Built once per shape, so a
    batch's indices are two row lookups instead of a dozen small ops (this pipeline is op-bound on CPU)."""
    off = torch.arange(2 * padding + 1, device=device)[:, None] - padding
    rows, cols = off + torch.arange(h, device=device), off + torch.arange(w, device=device)
    if padding < min(h, w):
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:  # reflect needs padding < size; beyond that, replicate is the nearest sensible border
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    return rows, torch.cat([cols, cols.flip(1)])


def random_crop(x: Tensor, padding: int, gen: torch.Generator, flip_p: float = 0.0) -> Tensor:
    """Reflect-pad by `padding`, then crop back to H x W at a per-sample random offset; with flip_p > 0,
    also flip each sample left-right with that probability, in the same pass.

    The padding is never materialised: each sample's source pixels are reflected indices into the
    flattened image, looked up in `_crop_tables` and read with one `gather`, about 4x faster on CPU than
    padding plus a 4-D fancy index. A flip is just the column indices reversed, so it costs nothing extra.
    Works on any dtype (uint8 too).
    """
    if padding <= 0 and flip_p <= 0:
        return x
    b, c, h, w = x.shape
    padding = max(padding, 0)
    rows, cols = _crop_tables(padding, h, w, x.device)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    if flip_p > 0:
        ox = ox + (2 * padding + 1) * _chance(b, flip_p, gen, x)
    idx = (rows.index_select(0, oy)[:, :, None] * w + cols.index_select(0, ox)[:, None, :]).view(b, 1, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, idx.expand(b, c, h * w)).view(b, c, h, w)


def random_resized_crop(x: Tensor, scale_min: float, scale_max: float, gen: torch.Generator) -> Tensor:
    """Crop a per-sample box (area fraction in [scale_min, scale_max], aspect log-uniform in [3/4, 4/3],
    random position) and resample it bilinearly back to H x W.

    Unlike torchvision we do not retry boxes that do not fit: a side that would exceed the image is
    clamped to it, which only ever shrinks the area (and only when the aspect is far from square).
    """
    b, _, h, w = x.shape
    area = _uniform(b, scale_min, scale_max, gen, x)
    ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3), gen, x))
    # Box sides as fractions of W and H, chosen so the box has `ratio` in pixels, not in fractions.
    fw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)
    fh = torch.sqrt(area / ratio * w / h).clamp(max=1.0)
    # affine_grid works in [-1, 1]: the box's half-extent is fw, its center may move by 1 - fw.
    cx = (1 - fw) * (2 * torch.rand(b, generator=gen, device=x.device) - 1)
    cy = (1 - fh) * (2 * torch.rand(b, generator=gen, device=x.device) - 1)
    zero = torch.zeros_like(fw)
    theta = torch.stack([torch.stack([fw, zero, cx], 1), torch.stack([zero, fh, cy], 1)], 1)
    return _warp(x, theta, "reflection")


# ---- geometric ----


def hflip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each sample left-right with probability p."""
    return torch.where(_bcast(_chance(x.shape[0], p, gen, x)), x.flip(3), x)


def rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each sample by an angle uniform in [-degrees, degrees]; exposed corners get 0 (the mean)."""
    if degrees <= 0:
        return x
    b, _, h, w = x.shape
    a = torch.deg2rad(_uniform(b, -degrees, degrees, gen, x))
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # affine_grid's coordinates are scaled per axis; the H/W factors make it a true rotation in pixels
    # for non-square images (S^-1 R S with S = diag(W, H)).
    rows = [torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)]
    theta = torch.stack(rows, 1)
    return _warp(x, theta, "zeros")


# ---- occlusion ----


def _box_mask(x: Tensor, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor, on: Tensor) -> Tensor:
    """(B, 1, H, W) bool mask of the per-sample boxes [y0, y1) x [x0, x1), only where `on`."""
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_y = (ys >= y0[:, None]) & (ys < y1[:, None]) & on[:, None]  # (B, H); `on` folded in while small
    in_x = (xs >= x0[:, None]) & (xs < x1[:, None])  # (B, W)
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


@functools.lru_cache(maxsize=32)
def _band_table(size: int, n: int, device: torch.device) -> Tensor:
    """(n, n) bool: row c marks the positions of a size-wide band centred on c, clipped at the borders."""
    lo = torch.arange(n, device=device)[:, None] - size // 2
    pos = torch.arange(n, device=device)
    return (pos >= lo) & (pos < lo + size)


def cutout(x: Tensor, size: int, prob: float, gen: torch.Generator, fill: Tensor | None = None) -> Tensor:
    """Zero a size x size square (center anywhere in the image, clipped at the borders) per sample,
    each sample independently with probability `prob`. `fill` (1, C, 1, 1) replaces zero: on a uint8
    batch, the mean colour in bytes is what zero is once normalized."""
    if size <= 0 or prob <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen, device=x.device)
    cx = torch.randint(0, w, (b,), generator=gen, device=x.device)
    on = _chance(b, prob, gen, x)
    in_y = _band_table(size, h, x.device).index_select(0, cy) & on[:, None]  # (B, H)
    in_x = _band_table(size, w, x.device).index_select(0, cx)  # (B, W)
    inside = (in_y[:, :, None] & in_x[:, None, :])[:, None].to(x.dtype)
    # Multiplying by a 0/1 mask is exact (one of the two products is 0) and ~6x faster on CPU than
    # masked_fill or where, whose broadcast of a (B, 1, H, W) mask over channels takes a slow path.
    kept = x * (1 - inside)
    return kept if fill is None else kept + fill * inside


def random_erasing(x: Tensor, prob: float, scale_max: float, gen: torch.Generator) -> Tensor:
    """Per sample with probability `prob`, fill a rectangle (area fraction uniform in [0.02, scale_max],
    aspect log-uniform in [0.3, 3.3], fully inside the image) with standard-normal noise."""
    if prob <= 0:
        return x
    b, _, h, w = x.shape
    area = _uniform(b, min(0.02, scale_max), scale_max, gen, x) * h * w
    ratio = torch.exp(_uniform(b, math.log(0.3), math.log(3.3), gen, x))
    # Clamping instead of torchvision's rejection loop keeps this one pass; it trims extreme boxes.
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
    y0 = (torch.rand(b, generator=gen, device=x.device) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=gen, device=x.device) * (w - ew + 1)).long()
    on = _chance(b, prob, gen, x)
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return torch.where(_box_mask(x, y0, y0 + eh, x0, x0 + ew, on), noise, x)


# ---- color ----


def _stats(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return m, s


def _gray(u: Tensor) -> Tensor:
    """(B, 1, H, W) luminance of a [0, 1] batch; for non-RGB input the channel mean."""
    if u.shape[1] != 3:
        return u.mean(1, keepdim=True)
    wts = torch.as_tensor(_LUMA, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
    return (u * wts).sum(1, keepdim=True)


def _rgb_to_hsv(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) in [0, 1] -> hue in [0, 1), saturation, value, each (B, H, W); torchvision's formulas."""
    r, g, b = u.unbind(1)
    maxc, minc = u.amax(1), u.amin(1)
    flat = maxc == minc  # grey pixels: hue 0, saturation 0, and no division by zero below
    one = torch.ones_like(maxc)
    cr = maxc - minc
    s = cr / torch.where(flat, one, maxc)
    cr = torch.where(flat, one, cr)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of `_rgb_to_hsv`: (B, H, W) each -> (B, 3, H, W)."""
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long() % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    # For each of the six sectors, which of (v, q, p, t) each of R, G, B takes.
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, sector[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def adjust_hue(u: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of a [0, 1] RGB batch by `shift` (B,) turns of the colour wheel, per sample."""
    h, s, v = _rgb_to_hsv(u)
    return _hsv_to_rgb(torch.remainder(h + shift.view(-1, 1, 1), 1.0), s, v)


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, gen: torch.Generator,
                 hue: float = 0.0, *, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> Tensor:
    """Per-sample brightness, contrast and saturation factors uniform in [1-s, 1+s] and a hue shift uniform
    in [-hue, hue], applied in that fixed order in [0, 1] pixel space, clamping after each step as
    torchvision does. Hue needs RGB input; it is skipped for other channel counts."""
    if brightness <= 0 and contrast <= 0 and saturation <= 0 and hue <= 0:
        return x  # skip the un-normalize round trip, which is not bit-exact
    b = x.shape[0]
    m, s = _stats(x, mean, std)
    u = x * s + m
    if brightness > 0:
        u = (u * _bcast(_uniform(b, 1 - brightness, 1 + brightness, gen, x))).clamp(0, 1)
    if contrast > 0:
        f = _bcast(_uniform(b, 1 - contrast, 1 + contrast, gen, x))
        u = (f * u + (1 - f) * _gray(u).mean((2, 3), keepdim=True)).clamp(0, 1)
    if saturation > 0:
        f = _bcast(_uniform(b, 1 - saturation, 1 + saturation, gen, x))
        u = (f * u + (1 - f) * _gray(u)).clamp(0, 1)
    if hue > 0 and u.shape[1] == 3:
        u = adjust_hue(u, _uniform(b, -hue, hue, gen, x))
    return (u - m) / s


def random_grayscale(x: Tensor, prob: float, gen: torch.Generator, *, mean: Sequence[float] = CIFAR10_MEAN,
                     std: Sequence[float] = CIFAR10_STD) -> Tensor:
    """Per sample with probability `prob`, replace the pixels by their luminance (equal channels in
    pixel space; re-normalized per channel, so not equal after normalization)."""
    if prob <= 0:
        return x
    m, s = _stats(x, mean, std)
    gray = (_gray(x * s + m) - m) / s  # (B,1,H,W) broadcasts against the per-channel stats
    return torch.where(_bcast(_chance(x.shape[0], prob, gen, x)), gray, x)


# ---- pipeline ----


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, C, H, W) -> float32 (x/255 - mean) / std, in two passes over the float copy."""
    m = torch.tensor([255.0 * v for v in mean], device=x.device).view(1, -1, 1, 1)
    inv = torch.tensor([1.0 / (255.0 * v) for v in std], device=x.device).view(1, -1, 1, 1)
    return x.float().sub_(m).mul_(inv)


def augment_batch(x: Tensor, cfg: TrainConfig, gen: torch.Generator, *, mean: Sequence[float] = CIFAR10_MEAN,
                  std: Sequence[float] = CIFAR10_STD) -> Tensor:
    """Apply every augmentation `cfg` enables, in a fixed order: crop and flip, rotate, color jitter,
    grayscale, cutout, random erasing. Occlusions come last so they are never warped or recolored.

    `x` is either a normalized float batch, or a raw uint8 batch: then the padded crop and the flip run on
    the uint8 bytes (a quarter of the memory traffic) and the batch is normalized with mean/std right after.
    Flipping before rather than after a rotation draws from the same distribution (the angle is symmetric).
    """
    fused = not cfg.random_resized_crop and (cfg.crop_padding > 0 or (cfg.flip and x.dtype == torch.uint8))
    if fused:
        x = random_crop(x, cfg.crop_padding, gen, flip_p=0.5 if cfg.flip else 0.0)
    # With nothing float-only between the crop and the occlusion, cutout runs on the bytes as well:
    # a quarter of the memory traffic, and the same image up to rounding the mean colour to a byte.
    early_cutout = x.dtype == torch.uint8 and cfg.cutout_size > 0 and not (
        cfg.random_resized_crop or cfg.rotation_degrees > 0 or cfg.jitter_brightness > 0
        or cfg.jitter_contrast > 0 or cfg.jitter_saturation > 0 or cfg.jitter_hue > 0 or cfg.grayscale_prob > 0)
    if early_cutout:
        fill = torch.tensor([round(255 * v) for v in mean], dtype=torch.uint8, device=x.device).view(1, -1, 1, 1)
        x = cutout(x, cfg.cutout_size, cfg.cutout_prob, gen, fill=fill)
    if x.dtype == torch.uint8:
        x = normalize(x, mean, std)
    if cfg.random_resized_crop:
        x = random_resized_crop(x, cfg.rrc_scale_min, cfg.rrc_scale_max, gen)
    if cfg.rotation_degrees > 0:
        x = rotate(x, cfg.rotation_degrees, gen)
    if cfg.flip and not fused:
        x = hflip(x, gen)
    if cfg.jitter_brightness > 0 or cfg.jitter_contrast > 0 or cfg.jitter_saturation > 0 or cfg.jitter_hue > 0:
        x = color_jitter(x, cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, gen,
                         cfg.jitter_hue, mean=mean, std=std)
    if cfg.grayscale_prob > 0:
        x = random_grayscale(x, cfg.grayscale_prob, gen, mean=mean, std=std)
    if cfg.cutout_size > 0 and not early_cutout:
        x = cutout(x, cfg.cutout_size, cfg.cutout_prob, gen)
    if cfg.erasing_prob > 0:
        x = random_erasing(x, cfg.erasing_prob, cfg.erasing_scale_max, gen)
    return x


def mix_batch(
    x: Tensor, y: Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mixup or CutMix on a whole batch; returns (x_mixed, y_a, y_b, lam) for the loss
    `lam * CE(out, y_a) + (1 - lam) * CE(out, y_b)`.

    At most one of the two per batch (a fair coin when both are enabled), applied with its probability.
    lam ~ Beta(alpha, alpha) is drawn as G1 / (G1 + G2) with G1, G2 ~ Gamma(alpha, 1) from
    `torch._standard_gamma(..., generator=gen)`, so it is exact and reproducible from `gen` alone.
    CutMix pastes one box (the same for the whole batch) of area about (1 - lam) from the permuted
    batch, then sets lam to the fraction of pixels actually kept, since clipping shrinks the box.
    """
    modes = [m for m, a in (("mixup", cfg.mixup_alpha), ("cutmix", cfg.cutmix_alpha)) if a > 0]
    if not modes:
        return x, y, y, 1.0
    # One host sync for every scalar draw: pick, apply?, box center (y, x).
    pick, apply, ry, rx = torch.rand(4, generator=gen, device=x.device).tolist()
    mode = modes[0] if len(modes) == 1 else modes[int(pick < 0.5)]
    if mode == "mixup":
        alpha, prob = cfg.mixup_alpha, cfg.mixup_prob
    else:
        alpha, prob = cfg.cutmix_alpha, cfg.cutmix_prob
    if apply >= prob:
        return x, y, y, 1.0
    # float64: with a small alpha, float32 gammas can both underflow to 0.
    g1, g2 = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64, device=x.device),
                                   generator=gen).tolist()
    lam = g1 / (g1 + g2) if g1 + g2 > 0 else 0.5
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(ry * h), int(rx * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)


# ---- test-time augmentation ----


def _translate(x: Tensor, pad: int, oy: int, ox: int) -> Tensor:
    h, w = x.shape[2:]
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")[:, :, oy:oy + h, ox:ox + w]


def tta_views(x: Tensor, mode: str) -> list[Tensor]:
    """Views whose logits get averaged at evaluation: "none" -> [x]; "flip" -> [x, flipped];
    "flip_translate" -> [x, flipped] plus each shifted 2 px down-right and 2 px up-left (6 views)."""
    if mode == "none":
        return [x]
    views = [x, x.flip(3)]
    if mode == "flip":
        return views
    if mode == "flip_translate":
        return views + [_translate(v, 2, o, o) for v in views for o in (0, 4)]
    raise ValueError(f"unknown tta mode {mode!r}")
