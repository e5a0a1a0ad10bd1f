import pytest
import torch

from worker.engine import augment as A
from worker.engine.config import TrainConfig

MEAN = torch.tensor(A.CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(A.CIFAR10_STD).view(1, 3, 1, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 8, h: int = 12, w: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=gen(seed))


def same_images(b: int, h: int = 12, w: int = 10) -> torch.Tensor:
    """b copies of one image whose every pixel is distinct, so any shift or flip is visible."""
    img = torch.arange(3 * h * w, dtype=torch.float32).view(1, 3, h, w) / (3 * h * w)
    return img.repeat(b, 1, 1, 1)


def distinct_count(x: torch.Tensor) -> int:
    return len({tuple(v.flatten().tolist()) for v in x})


# Every augmentation with a setting that actually changes things, for the shape/seed checks.
AUGS = {
    "random_crop": lambda x, g: A.random_crop(x, 3, g),
    "random_resized_crop": lambda x, g: A.random_resized_crop(x, 0.3, 0.9, g),
    "hflip": lambda x, g: A.hflip(x, g),
    "rotate": lambda x, g: A.rotate(x, 30, g),
    "cutout": lambda x, g: A.cutout(x, 4, 0.7, g),
    "random_erasing": lambda x, g: A.random_erasing(x, 0.7, 0.4, g),
    "color_jitter": lambda x, g: A.color_jitter(x, 0.4, 0.4, 0.4, g),
    "hue_jitter": lambda x, g: A.color_jitter(x, 0, 0, 0, g, hue=0.3),
    "random_grayscale": lambda x, g: A.random_grayscale(x, 0.5, g),
}


@pytest.mark.parametrize("name", AUGS)
def test_shape_dtype_and_seed_reproducibility(name):
    fn = AUGS[name]
    x = batch()
    out = fn(x, gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert torch.equal(out, fn(x, gen(3)))
    assert not torch.equal(out, fn(x, gen(4)))


@pytest.mark.parametrize("name", ["random_crop", "random_resized_crop", "rotate", "color_jitter"])
def test_draws_differ_per_sample(name):
    out = AUGS[name](same_images(16), gen())
    assert distinct_count(out) > 8


def test_random_crop_is_a_shift_of_the_reflect_padded_image():
    x = same_images(32)
    out = A.random_crop(x, 2, gen())
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="reflect")
    windows = {(oy, ox): padded[0, :, oy:oy + 12, ox:ox + 10] for oy in range(5) for ox in range(5)}
    seen = set()
    for img in out:
        match = [k for k, v in windows.items() if torch.equal(v, img)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 10
    assert A.random_crop(x, 0, gen()) is x


def test_random_resized_crop_interpolates_inside_the_image():
    x = batch()
    out = A.random_resized_crop(x, 0.3, 1.0, gen())
    # Bilinear resampling of a box inside the image never leaves the input's value range...
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5
    # ...and a constant image stays constant (no padding is ever sampled).
    flat = torch.full((4, 3, 8, 8), 0.7)
    assert torch.allclose(A.random_resized_crop(flat, 0.1, 1.0, gen()), flat)


def test_hflip_flips_some_but_not_all():
    x = same_images(64)
    out = A.hflip(x, gen())
    flipped = torch.tensor([torch.equal(o, x[0].flip(2)) for o in out])
    kept = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert (flipped | kept).all()
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(A.hflip(x, gen(), p=0.0), x)
    assert torch.equal(A.hflip(x, gen(), p=1.0), x.flip(3))


def test_rotate_zero_degrees_is_identity_and_keeps_center():
    x = batch(h=9, w=9)
    assert A.rotate(x, 0, gen()) is x
    out = A.rotate(x, 45, gen())
    # The center pixel of an odd-sized image is the rotation's fixed point.
    assert torch.allclose(out[:, :, 4, 4], x[:, :, 4, 4], atol=1e-5)


def test_cutout_zeroes_exact_square_count():
    x = torch.ones(64, 3, 20, 20)
    out = A.cutout(x, 4, 1.0, gen())
    zeros = (out == 0).all(1).sum((1, 2))  # zeroed pixels per sample
    # Clipped at the borders, so never more than 16; an interior center gives exactly 16.
    assert (zeros <= 16).all() and (zeros > 0).all()
    assert (zeros == 16).sum() > 32
    for img, z in zip(out, zeros, strict=True):
        rows = (img[0] == 0).any(1).nonzero().flatten()
        cols = (img[0] == 0).any(0).nonzero().flatten()
        assert len(rows) * len(cols) == z  # a solid rectangle, not scattered pixels
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()


def test_cutout_probability():
    x = torch.ones(200, 1, 8, 8)
    hit = (A.cutout(x, 3, 0.5, gen()) == 0).flatten(1).any(1)
    assert 60 < int(hit.sum()) < 140
    assert torch.equal(A.cutout(x, 3, 0.0, gen()), x)


def test_random_erasing_fills_a_rectangle_with_noise():
    x = torch.full((64, 3, 16, 16), 5.0)
    out = A.random_erasing(x, 1.0, 0.33, gen())
    changed = (out != 5.0).any(1)  # (B, H, W)
    area = changed.sum((1, 2)).float() / 256
    assert (area > 0).all() and (area <= 0.5).all()
    assert out[out != 5.0].abs().max() < 6  # standard-normal noise, not the fill value
    assert torch.equal(A.random_erasing(x, 0.0, 0.33, gen()), x)


def test_color_jitter_zero_strength_is_identity():
    x = batch()
    assert torch.equal(A.color_jitter(x, 0, 0, 0, gen()), x)


def test_color_jitter_brightness_scales_pixels():
    u = torch.rand(16, 3, 6, 6, generator=gen(5)) * 0.5  # room to brighten without clamping
    x = (u - MEAN) / STD
    out = A.color_jitter(x, 0.5, 0, 0, gen()) * STD + MEAN
    ratio = out / u
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-3)
    assert ((per_sample[:, 0] >= 0.5 - 1e-4) & (per_sample[:, 0] <= 1.5 + 1e-4)).all()
    assert per_sample[:, 0].std() > 0.05


def test_color_jitter_stays_in_pixel_range():
    x = batch() * 3
    out = A.color_jitter(x, 0.8, 0.8, 0.8, gen()) * STD + MEAN
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5


def test_hue_shift_matches_torchvision_per_sample():
    from torchvision.transforms.v2 import functional as TF

    u = torch.rand(6, 3, 7, 9, generator=gen(8))
    u[0, :, :2] = 0.5  # grey pixels have no hue: they must come back unchanged
    shifts = torch.tensor([0.0, 0.1, -0.25, 0.5, -0.5, 0.37])
    out = A.adjust_hue(u, shifts)
    for i, h in enumerate(shifts.tolist()):
        assert torch.allclose(out[i], TF.adjust_hue(u[i], h), atol=1e-5), i
    assert torch.allclose(out[0], u[0], atol=1e-5)


def test_hue_jitter_draws_per_sample_and_keeps_value():
    u = torch.rand(32, 3, 5, 5, generator=gen(9)) * 0.9 + 0.05
    x = (u - MEAN) / STD
    out = A.color_jitter(x, 0, 0, 0, gen(), hue=0.5) * STD + MEAN
    assert torch.allclose(out.amax(1), u.amax(1), atol=1e-5)  # a hue rotation keeps V = max(R, G, B)
    moved = (out - u).abs().flatten(1).amax(1)
    assert (moved > 1e-3).sum() >= 30  # nearly every sample got its own non-trivial shift
    assert torch.equal(A.color_jitter(x, 0, 0, 0, gen(), hue=0.0), x)


def test_random_grayscale_equal_channels_in_pixel_space():
    x = (torch.rand(32, 3, 5, 5, generator=gen(2)) - MEAN) / STD
    u = A.random_grayscale(x, 0.5, gen()) * STD + MEAN
    gray = (u[:, 0] - u[:, 1]).abs().amax((1, 2)) < 1e-5
    assert 5 < int(gray.sum()) < 27
    pix = x * STD + MEAN
    luma = 0.299 * pix[:, :1] + 0.587 * pix[:, 1:2] + 0.114 * pix[:, 2:]
    all_gray = A.random_grayscale(x, 1.0, gen()) * STD + MEAN
    assert torch.allclose(all_gray, luma.expand_as(pix), atol=1e-5)


def test_augment_batch_all_off_returns_x():
    c = TrainConfig(crop_padding=0, flip=False)
    x = batch()
    assert A.augment_batch(x, c, gen()) is x


def test_augment_batch_everything_on():
    c = TrainConfig(random_resized_crop=True, rotation_degrees=10, flip=True, jitter_brightness=0.2,
                    jitter_contrast=0.2, jitter_saturation=0.2, jitter_hue=0.1, grayscale_prob=0.2, cutout_size=4,
                    erasing_prob=0.5)
    x = batch()
    out = A.augment_batch(x, c, gen(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, A.augment_batch(x, c, gen(7)))
    assert not torch.equal(out, x)


def test_mix_batch_off_is_passthrough():
    x, y = batch(), torch.arange(8)
    out, ya, yb, lam = A.mix_batch(x, y, TrainConfig(), gen())
    assert out is x and ya is y and yb is y and lam == 1.0


def test_mixup_is_a_convex_combination():
    x, y = batch(16), torch.arange(16)
    out, ya, yb, lam = A.mix_batch(x, y, TrainConfig(mixup_alpha=1.0), gen())
    assert 0.0 <= lam <= 1.0 and ya.shape == yb.shape == y.shape
    assert torch.equal(ya, y) and sorted(yb.tolist()) == list(range(16))
    assert torch.allclose(out, lam * x + (1 - lam) * x[yb])  # y == arange, so yb is the permutation
    assert A.mix_batch(x, y, TrainConfig(mixup_alpha=1.0), gen())[3] == lam  # reproducible


def test_cutmix_lam_is_the_unpasted_area_fraction():
    lams = []
    for seed in range(20):
        x = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 3, 10, 12).clone()
        y = torch.arange(16)
        out, ya, yb, lam = A.mix_batch(x, y, TrainConfig(cutmix_alpha=1.0), gen(seed))
        assert 0.0 <= lam <= 1.0 and ya.shape == yb.shape == y.shape
        kept = (out == x).all(1).float().mean((1, 2))  # per sample fraction of its own pixels
        pasted_from_partner = (out == x[yb]).all(1).float().mean((1, 2))
        moved = yb != y  # a sample paired with itself looks unchanged
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam))
        assert torch.allclose(pasted_from_partner[moved], torch.full_like(kept[moved], 1 - lam))
        lams.append(lam)
    assert len(set(lams)) > 5


def test_mix_batch_prob_and_choice():
    x, y = batch(4), torch.arange(4)
    never = TrainConfig(mixup_alpha=1.0, mixup_prob=0.0, cutmix_alpha=1.0, cutmix_prob=0.0)
    assert A.mix_batch(x, y, never, gen())[3] == 1.0
    both = TrainConfig(mixup_alpha=1.0, cutmix_alpha=1.0)
    kinds = set()
    for seed in range(30):
        out = A.mix_batch(x, y, both, gen(seed))[0]
        # CutMix leaves some pixels exactly as they were; mixup (almost surely) changes all of them.
        kinds.add("cutmix" if (out == x).any() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_tta_views():
    x = batch()
    assert len(A.tta_views(x, "none")) == 1
    flip = A.tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(3))
    six = A.tta_views(x, "flip_translate")
    assert len(six) == 6 and all(v.shape == x.shape for v in six)
    assert torch.equal(six[2][:, :, 2:, 2:], x[:, :, :-2, :-2])  # shifted down-right by 2
    assert torch.equal(six[3][:, :, :-2, :-2], x[:, :, 2:, 2:])  # shifted up-left by 2
    with pytest.raises(ValueError):
        A.tta_views(x, "bogus")


def test_uint8_batches_are_cropped_flipped_then_normalized():
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    c = TrainConfig(crop_padding=0, flip=True)
    out = A.augment_batch(x, c, gen(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = (x.float() / 255 - 0.5) / 0.25
    flipped = [bool(torch.allclose(o, r.flip(2), atol=1e-5)) for o, r in zip(out, ref, strict=True)]
    unflipped = [bool(torch.allclose(o, r, atol=1e-5)) for o, r in zip(out, ref, strict=True)]
    assert all(f or u for f, u in zip(flipped, unflipped, strict=True))
    assert 10 < sum(flipped) < 54  # per-sample draws, not one coin for the batch
    # Nothing enabled: a uint8 batch is only normalized.
    plain = A.augment_batch(x, TrainConfig(crop_padding=0, flip=False), gen(), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.allclose(plain, ref, atol=1e-5)


def test_fused_crop_flip_matches_crop_then_reversed_columns():
    x = torch.randn(32, 3, 10, 10)
    plain = A.random_crop(x, 3, gen(7))
    fused = A.random_crop(x, 3, gen(7), flip_p=1.0)  # same offsets (drawn first), every sample flipped
    assert torch.equal(fused, plain.flip(3))
    u8 = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
    assert A.random_crop(u8, 3, gen(7)).dtype == torch.uint8


def test_cutout_on_bytes_matches_cutout_after_normalizing():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    c = TrainConfig(crop_padding=2, flip=True, cutout_size=5)
    early = A.augment_batch(x, c, gen(3), mean=mean, std=std)  # the uint8 fast path
    late = A.cutout(A.normalize(A.random_crop(x, 2, gen(3), flip_p=0.5), mean, std), 5, 1.0,
                    _after_crop(x, 2, 3))
    # Same boxes from the same draws; inside them the fill is the mean colour rounded to a byte.
    assert torch.allclose(early, late, atol=0.5 / 255 / 0.25 + 1e-6)
    assert (early.abs() < 0.01).sum() >= 16 * 3 * 9  # every sample got an occluded region


def _after_crop(x, padding, seed):
    """A generator advanced past random_crop's draws, so cutout draws what augment_batch drew."""
    g = gen(seed)
    A.random_crop(x, padding, g, flip_p=0.5)
    return g
