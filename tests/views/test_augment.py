"""Tests for fastmice.views.augment.

torchvision cannot be installed next to this torch, so the transforms are checked against the
specification instead: distributions of the sampled parameters, per-sample reference implementations
(F.interpolate on cropped tensors, colorsys for HSV, a direct 2-D Gaussian conv), and exact identities.
"""
from __future__ import annotations

import colorsys
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmice.views import augment as A
from fastmice.views.augment import MOCO_V1, SIMCLR, AugmentConfig, augment_batch, make_views, normalize_batch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# mean 0 / std 1 leaves the [0, 1] image untouched, so statistics tests read it directly.
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# Everything off: full-image crop at ratio 1, no colour ops, no flip.
IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), grayscale_p=0.0,
                         jitter=(0.0, 0.0, 0.0, 0.0), flip_p=0.0)
N = 4096   # samples for the statistical checks (binomial SE at p = 0.5: 0.008)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raw_views(x, cfg, seed=0, out_size=None):
    """Augmented view as a float image in [0, 1] (mean 0, std 1)."""
    return augment_batch(x, cfg, out_size or x.shape[-1], generator=gen(seed), **RAW)


def constant_images(rgb, B=N, side=16):
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(B, 3, side, side).contiguous()


def ks_uniform(samples, lo, hi) -> float:
    """Kolmogorov-Smirnov distance of samples from U(lo, hi)."""
    s = np.sort(np.asarray(samples, dtype=np.float64))
    cdf = np.clip((s - lo) / (hi - lo), 0, 1)
    n = len(s)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


# ---------------------------------------------------------------------------------------- crop boxes

def test_crop_boxes_in_bounds_scale_and_ratio():
    H = W = 64
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = A.sample_crop_boxes(N, H, W, scale, ratio, gen())
    assert all(t.dtype == torch.int64 and t.shape == (N,) for t in (top, left, h, w))
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # Rounding w and h moves the area by at most ~(w + h) / 2 pixels.
    area, slack = (h * w).double(), 0.5 * (h + w + 1).double()
    assert (area >= scale[0] * H * W - slack).all() and (area <= scale[1] * H * W + slack).all()
    log_r, tol = torch.log(w.double() / h.double()), 0.5 / h.double() + 0.5 / w.double()
    assert (log_r.abs() <= math.log(4 / 3) + tol).all()

    # Mean area fraction vs the torchvision algorithm in the continuum (square image, no fallback):
    # a try with area s and log-ratio ~ U(-L, L) fits iff |log r| <= -log s, and the first fitting
    # try is distributed as one try conditioned on fitting. Rejecting large elongated boxes pulls the
    # mean below the naive E[s] = 0.6, to about 0.538.
    L = math.log(4 / 3)
    s = np.linspace(0.2, 1.0, 200001)
    p_fit = np.clip(-np.log(s) / L, 0.0, 1.0)
    expected = float((s * p_fit).sum() / p_fit.sum())
    assert 0.53 < expected < 0.55
    assert abs((area / (H * W)).mean().item() - expected) < 0.015


def test_crop_log_ratio_and_offsets_uniform():
    # A small scale range on a large image: every try fits, so log-ratio is exactly U(log 3/4, log 4/3).
    H = W = 256
    top, left, h, w = A.sample_crop_boxes(N, H, W, (0.05, 0.1), (3 / 4, 4 / 3), gen(1))
    log_r = torch.log(w.double() / h.double())
    assert ks_uniform(log_r, math.log(3 / 4), math.log(4 / 3)) < 0.04
    area = (h * w).double() / (H * W)
    assert ks_uniform(area, 0.05, 0.1) < 0.04
    # Offsets uniform over the valid integer positions.
    for pos, size, side in ((top, h, H), (left, w, W)):
        frac = pos.double() / (side - size).double()
        assert abs(frac.mean().item() - 0.5) < 0.02
        assert ks_uniform(frac, 0.0, 1.0) < 0.04


@pytest.mark.parametrize("ratio, box", [((2.0, 3.0), (8, 0, 16, 32)),        # too wide: w = W, h = W / 2
                                        ((1 / 3, 1 / 2), (0, 8, 32, 16))])   # too tall: h = H, w = H / 2
def test_crop_fallback_is_central_crop_clamped_to_ratio(ratio, box):
    # Whole-image area at a ratio the square image cannot hold: no try fits.
    top, left, h, w = A.sample_crop_boxes(64, 32, 32, (1.0, 1.0), ratio, gen())
    for t, want in zip((top, left, h, w), box):
        assert (t == want).all()


@pytest.mark.parametrize("H, W, out_size", [(20, 24, 16), (20, 24, 40), (32, 32, 32)])
def test_resized_crop_matches_interpolate_of_cropped_tensor(H, W, out_size):
    B = 16
    img = torch.rand(B, 3, H, W, generator=gen(2))
    top, left, h, w = A.sample_crop_boxes(B, H, W, (0.05, 1.0), (0.5, 2.0), gen(3))
    flip = torch.arange(B) % 2 == 0
    out = A._resized_crop(img, top, left, h, w, flip, out_size)
    assert out.shape == (B, 3, out_size, out_size)
    for i in range(B):
        t, l, hh, ww = (int(v[i]) for v in (top, left, h, w))
        ref = F.interpolate(img[i:i + 1, :, t:t + hh, l:l + ww], size=(out_size, out_size), mode="bilinear",
                            align_corners=False, antialias=False)
        if flip[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ whole pipeline

def test_identity_config_reproduces_input():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen())
    y = augment_batch(x, IDENTITY, 16, CIFAR_MEAN, CIFAR_STD, gen())
    un = y * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(un, x.float() / 255, atol=1e-5, rtol=0)


def test_grayscale_rate():
    x = torch.randint(0, 256, (N, 3, 16, 16), dtype=torch.uint8, generator=gen())
    y = raw_views(x, replace(IDENTITY, grayscale_p=0.2))
    is_gray = ((y[:, 0] == y[:, 1]) & (y[:, 1] == y[:, 2])).flatten(1).all(1)
    assert abs(is_gray.float().mean().item() - 0.2) < 0.03
    # ITU-R 601 luma.
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]) / 255
    torch.testing.assert_close(y[is_gray, 0], luma[is_gray], atol=1e-5, rtol=0)


def test_flip_rate_and_exactness():
    ramp = torch.arange(16, dtype=torch.uint8) * 16                        # left-to-right gradient
    x = ramp.view(1, 1, 1, 16).expand(N, 3, 16, 16).contiguous()
    y = raw_views(x, replace(IDENTITY, flip_p=0.5))
    flipped = y[:, 0, 0, 0] > y[:, 0, 0, -1]
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    ref = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x).float() / 255
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_brightness_factor_range_and_uniformity():
    x = constant_images((128, 128, 128))
    y = raw_views(x, replace(IDENTITY, jitter=(0.4, 0.0, 0.0, 0.0)))
    ratio = y.flatten(1) / (128 / 255)
    assert (ratio.std(1) < 1e-5).all()                                     # one factor per image
    f = ratio[:, 0]
    assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5
    assert ks_uniform(f, 0.6, 1.4) < 0.04


def test_contrast_factor_range_and_mean_preserved():
    x = constant_images((64, 64, 64))
    x[..., 8:] = 192                                                        # two grey halves, mean 128
    y = raw_views(x, replace(IDENTITY, jitter=(0.0, 0.4, 0.0, 0.0)))
    f = (y[:, 0, 0, -1] - y[:, 0, 0, 0]) / (128 / 255)                      # blend towards the mean scales the gap
    assert f.min() >= 0.6 - 1e-4 and f.max() <= 1.4 + 1e-4
    assert ks_uniform(f, 0.6, 1.4) < 0.04
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.full((N,), 128 / 255), atol=1e-5, rtol=0)


def test_saturation_factor_range():
    x = constant_images((153, 102, 51))
    y = raw_views(x, replace(IDENTITY, jitter=(0.0, 0.0, 0.4, 0.0)))
    f = (y[:, 0, 0, 0] - y[:, 1, 0, 0]) / (51 / 255)                        # the luma cancels in R - G
    assert f.min() >= 0.6 - 1e-4 and f.max() <= 1.4 + 1e-4
    assert ks_uniform(f, 0.6, 1.4) < 0.04


def test_hue_shift_of_pure_red_within_range():
    x = constant_images((255, 0, 0))
    y = raw_views(x, replace(IDENTITY, jitter=(0.0, 0.0, 0.0, 0.4)))
    hsv = A._rgb_to_hsv(y[:, :, 0, 0].view(N, 3, 1, 1)).view(N, 3)
    shift = torch.remainder(hsv[:, 0] + 0.5, 1.0) - 0.5                    # wrap to [-0.5, 0.5)
    assert shift.abs().max() <= 0.4 + 1e-5
    assert ks_uniform(shift, -0.4, 0.4) < 0.04
    torch.testing.assert_close(hsv[:, 1:], torch.ones(N, 2), atol=1e-5, rtol=0)   # S and V kept


def test_jitter_p_mask():
    # Samples outside the mask are bitwise untouched (identity factors, hue skipped).
    x = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=gen())
    y = raw_views(x, replace(IDENTITY, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8))
    untouched = (y == raw_views(x, IDENTITY)).flatten(1).all(1)
    assert abs(untouched.float().mean().item() - 0.2) < 0.03


def test_jitter_order_permutations_uniform():
    factors, perm = A._sample_jitter(N, MOCO_V1, gen(), torch.device("cpu"))
    assert (perm.sort(1).values == torch.arange(4)).all()
    first = torch.bincount(perm[:, 0], minlength=4).float() / N
    assert (first - 0.25).abs().max() < 0.03
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.4]), torch.tensor([1.4, 1.4, 1.4, 0.4])
    assert ((factors >= lo) & (factors <= hi)).all()


def _reference_jitter(img: np.ndarray, f, order) -> np.ndarray:
    """torchvision's ColorJitter ops on one (3, H, W) float64 image, in the given order; hue via colorsys."""
    gray = lambda im: 0.299 * im[0] + 0.587 * im[1] + 0.114 * im[2]        # noqa: E731
    for op in order:
        if op == 0:
            img = np.clip(f[0] * img, 0, 1)
        elif op == 1:
            img = np.clip(f[1] * img + (1 - f[1]) * gray(img).mean(), 0, 1)
        elif op == 2:
            img = np.clip(f[2] * img + (1 - f[2]) * gray(img)[None], 0, 1)
        else:
            out = np.empty_like(img)
            for i, j in np.ndindex(*img.shape[1:]):
                h, s, v = colorsys.rgb_to_hsv(*img[:, i, j])
                out[:, i, j] = colorsys.hsv_to_rgb((h + f[3]) % 1.0, s, v)
            img = out
    return img


@pytest.mark.parametrize("blend, hue", [(True, True), (True, False), (False, True)])
def test_color_jitter_matches_sequential_reference_for_every_order(blend, hue):
    orders = list(itertools.permutations(range(4)))                         # all 24 op orders
    B = len(orders)
    img = torch.rand(B, 3, 4, 4, generator=gen(5))
    # Wide factor ranges so that the clamps after each op matter and the order changes the result.
    u = torch.rand(B, 4, generator=gen(6))
    factors = torch.stack([0.2 + 1.6 * u[:, 0], 0.2 + 1.6 * u[:, 1], 1.6 * u[:, 2], u[:, 3] - 0.5], dim=1)
    if not blend:
        factors[:, :3] = 1.0
    if not hue:
        factors[:, 3] = 0.0
    out = A._color_jitter(img, factors, torch.tensor(orders), blend=blend, hue=hue)
    for i, order in enumerate(orders):
        ref = _reference_jitter(img[i].double().numpy(), factors[i].double().numpy(), order)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("order, stays_constant", [("moco", True), ("simclr", False)])
def test_grayscale_position_in_order(order, stays_constant):
    # moco: grayscale before jitter, so a hue shift cannot recolour it; simclr: hue first, then grayscale.
    x = constant_images((255, 0, 0), B=256, side=4)
    y = raw_views(x, replace(IDENTITY, grayscale_p=1.0, jitter=(0.0, 0.0, 0.0, 0.4), order=order))
    spread = (y.max() - y.min()).item()
    assert (spread < 1e-5) == stays_constant


def test_blur_rate_and_reference():
    # A 0/1 checkerboard: every neighbour differs, so any blur shows (a noise image would hide the
    # smallest sigmas under a tolerance). The same seed without blur gives
    # the same crop draws, so unblurred samples are bitwise equal to it.
    board = ((torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2 * 255).to(torch.uint8)
    x = board.expand(N, 3, 16, 16).contiguous()
    y = raw_views(x, replace(IDENTITY, blur_p=0.5, order="simclr"))
    blurred = (y != raw_views(x, replace(IDENTITY, order="simclr"))).flatten(1).any(1)
    # Even sigma = 0.1 (neighbour weight exp(-50) ~ 2e-22) shows on the board's 0 pixels.
    assert abs(blurred.float().mean().item() - 0.5) < 0.03
    plain = torch.rand(8, 3, 16, 16, generator=gen())
    assert A._blur_kernel_size(32, 0.1) == 3 and A._blur_kernel_size(224, 0.1) == 23
    assert A._blur_kernel_size(96, 0.1) == 9 and A._blur_kernel_size(2, 0.1) == 3

    # Per-sample kernels against a direct 2-D conv with torchvision's kernel formula.
    img, sigma, k = plain[:6], torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7]), 5
    out = A._gaussian_blur(img, sigma, k)
    xs = torch.linspace(-2, 2, k)
    for i in range(6):
        g1 = torch.exp(-0.5 * (xs / sigma[i]) ** 2)
        g1 = g1 / g1.sum()
        kernel = (g1[:, None] * g1[None, :]).expand(3, 1, k, k)
        ref = F.conv2d(F.pad(img[i:i + 1], (2, 2, 2, 2), mode="reflect"), kernel, groups=3)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(A._gaussian_blur(flat, torch.tensor([0.5, 2.0]), 3), flat)


@pytest.mark.parametrize("cfg", [MOCO_V1, SIMCLR], ids=["moco", "simclr"])
def test_normalised_views_of_uniform_images_are_sane(cfg):
    x = torch.randint(0, 256, (512, 3, 16, 16), dtype=torch.uint8, generator=gen())
    y = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, gen())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    m, s = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert (y >= -m / s - 1e-4).all() and (y <= (1 - m) / s + 1e-4).all()
    assert abs(y.mean().item()) < 0.5 and 0.3 < y.std().item() < 1.6


# --------------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("cfg", [MOCO_V1, SIMCLR], ids=["moco", "simclr"])
def test_same_seed_same_views_different_seed_different(cfg):
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=gen())
    a = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, gen(7))
    b = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, gen(7))
    c = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Saving and restoring the generator state replays the stream (exact resume).
    g = gen(9)
    state = g.get_state()
    first = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, g)
    second = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, g)
    g.set_state(state)
    assert torch.equal(augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, g), first)
    assert not torch.equal(first, second)


def test_default_generator_follows_global_seed():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen())
    torch.manual_seed(3)
    a = augment_batch(x, MOCO_V1, 16, CIFAR_MEAN, CIFAR_STD)
    torch.manual_seed(3)
    assert torch.equal(a, augment_batch(x, MOCO_V1, 16, CIFAR_MEAN, CIFAR_STD))


# ------------------------------------------------------------------------------- shapes and options

@pytest.mark.parametrize("side, out_size", [(32, 24), (8, 16)])
def test_out_size_differs_from_input(side, out_size):
    x = torch.randint(0, 256, (16, 3, side, side), dtype=torch.uint8, generator=gen())
    for cfg in (MOCO_V1, SIMCLR):
        assert augment_batch(x, cfg, out_size, CIFAR_MEAN, CIFAR_STD, gen()).shape == (16, 3, out_size, out_size)
    # Full-image crop = plain bilinear resize of the whole image (no antialiasing, also when shrinking).
    ref = F.interpolate(x.float() / 255, size=(out_size, out_size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(raw_views(x, IDENTITY, out_size=out_size), ref, atol=1e-5, rtol=0)


def test_non_square_input():
    x = torch.randint(0, 256, (16, 3, 24, 32), dtype=torch.uint8, generator=gen())
    assert augment_batch(x, SIMCLR, 20, CIFAR_MEAN, CIFAR_STD, gen()).shape == (16, 3, 20, 20)


def test_dtype_and_channels_last():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen())
    ref = augment_batch(x, SIMCLR, 16, CIFAR_MEAN, CIFAR_STD, gen())
    y = augment_batch(x, SIMCLR, 16, CIFAR_MEAN, CIFAR_STD, gen(), out_dtype=torch.bfloat16, channels_last=True)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref.to(torch.bfloat16))
    # mean/std may also be tensors.
    z = augment_batch(x, SIMCLR, 16, torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD), gen())
    assert torch.equal(z, ref)


@pytest.mark.parametrize("cfg", [MOCO_V1, SIMCLR], ids=["moco", "simclr"])
def test_batch_of_one(cfg):
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=gen())
    y = augment_batch(x, cfg, 16, CIFAR_MEAN, CIFAR_STD, gen())
    assert y.shape == (1, 3, 16, 16) and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------ HSV

def test_hsv_round_trip_and_colorsys():
    rgb = torch.rand(64, 3, 4, 4, generator=gen())
    rgb[0] = 0.0                                                            # black
    rgb[1] = 1.0                                                            # white
    rgb[2] = 0.4                                                            # grey
    rgb[3, 1] = rgb[3, 0]                                                   # ties between channels
    hsv = A._rgb_to_hsv(rgb)
    torch.testing.assert_close(A._hsv_to_rgb(hsv), rgb, atol=1e-6, rtol=0)
    for b, i, j in [(0, 0, 0), (2, 1, 1), (3, 2, 3)] + [(b, b % 4, (b // 4) % 4) for b in range(4, 64)]:
        want = colorsys.rgb_to_hsv(*rgb[b, :, i, j].tolist())
        got = hsv[b, :, i, j].tolist()
        hue_gap = abs(got[0] - want[0]) % 1.0
        assert min(hue_gap, 1 - hue_gap) < 1e-5 and abs(got[1] - want[1]) < 1e-5 and abs(got[2] - want[2]) < 1e-6


def test_half_turn_hue_shift_turns_red_into_cyan():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(A._adjust_hue(red, torch.tensor([0.5])).flatten(), torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(A._adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]))


# ------------------------------------------------------------------------------ eval and views

def test_normalize_batch():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen())
    m, s = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_batch(x, CIFAR_MEAN, CIFAR_STD), (x.float() / 255 - m) / s)
    small = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    y = normalize_batch(x, CIFAR_MEAN, CIFAR_STD, out_size=16, out_dtype=torch.bfloat16, channels_last=True)
    assert y.shape == (4, 3, 16, 16) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), (small - m) / s, atol=2e-2, rtol=1e-2)


def test_make_views():
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=gen())
    views = make_views(x, MOCO_V1, 3, 16, CIFAR_MEAN, CIFAR_STD, gen(4))
    assert len(views) == 3 and all(v.shape == (16, 3, 16, 16) for v in views)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    g = gen(4)
    for v in views:                                                         # = sequential calls on one generator
        assert torch.equal(v, augment_batch(x, MOCO_V1, 16, CIFAR_MEAN, CIFAR_STD, g))
    mixed = make_views(x, [MOCO_V1, SIMCLR], 2, 16, CIFAR_MEAN, CIFAR_STD, gen(4))
    assert torch.equal(mixed[0], views[0])
    with pytest.raises(ValueError, match="2 configs for 3 views"):
        make_views(x, [MOCO_V1, SIMCLR], 3, 16, CIFAR_MEAN, CIFAR_STD, gen())


# ---------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, match", [
    (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
    (dict(crop_scale=(0.5, 0.2)), "lo <= hi"),
    (dict(crop_scale=(0.2, 1.5)), "crop_scale"),
    (dict(crop_scale=(float("nan"), 1.0)), "finite"),
    (dict(crop_scale=(0.2,)), "pair"),
    (dict(crop_ratio=(0.0, 1.0)), "crop_ratio"),
    (dict(crop_ratio=(2.0, 1.0)), "lo <= hi"),
    (dict(grayscale_p=1.5), "grayscale_p"),
    (dict(jitter_p=-0.1), "jitter_p"),
    (dict(flip_p=2), "flip_p"),
    (dict(blur_p=1.1), "blur_p"),
    (dict(jitter=(0.4, 0.4, 0.4, 0.6)), "hue"),
    (dict(jitter=(-0.1, 0.0, 0.0, 0.0)), "brightness"),
    (dict(jitter=(0.4, 0.4, 0.4)), "jitter"),
    (dict(blur_kernel_frac=0.0), "blur_kernel_frac"),
    (dict(order="byol"), "order"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


def test_config_lists_become_tuples():
    assert AugmentConfig(crop_scale=[0.2, 1.0], jitter=[0.4, 0.4, 0.4, 0.4]) == MOCO_V1
    SIMCLR.validate()


@pytest.mark.parametrize("x, out_size, mean, std, match", [
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 8, CIFAR_MEAN, CIFAR_STD, r"\(B, 3, H, W\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int32), 8, CIFAR_MEAN, CIFAR_STD, "uint8"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0, CIFAR_MEAN, CIFAR_STD, "out_size"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, CIFAR_MEAN, (0.2, 0.0, 0.2), "std"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, (0.5, 0.5), CIFAR_STD, "3 values"),
])
def test_augment_batch_argument_errors(x, out_size, mean, std, match):
    with pytest.raises(ValueError, match=match):
        augment_batch(x, MOCO_V1, out_size, mean, std, gen())


@pytest.mark.parametrize("recipe", ["moco", "simclr", "randaugment"])
@pytest.mark.parametrize("rows", [slice(0, 12), slice(8, 16), slice(20, 24)])
def test_rows_are_those_of_the_whole_batch(recipe, rows):
    """A process's share (rows=...): the same pixels as those rows of the whole batch's views, and the generator
    ends where the whole batch leaves it (the next views stay in step)."""
    import dataclasses

    from fastmice.views.augment import MOCO_V1, SIMCLR
    cfg = {"moco": MOCO_V1, "simclr": SIMCLR,
           "randaugment": dataclasses.replace(SIMCLR, randaugment_ops=2, randaugment_magnitude=9)}[recipe]
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g_full, g_part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = augment_batch(x, cfg, 24, (0.5,) * 3, (0.25,) * 3, generator=g_full)
    part = augment_batch(x, cfg, 24, (0.5,) * 3, (0.25,) * 3, generator=g_part, rows=rows)
    assert part.shape[0] == rows.stop - rows.start and torch.equal(full[rows], part)
    assert torch.equal(g_full.get_state(), g_part.get_state())
