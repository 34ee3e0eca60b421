"""Tests for fastmice.views.randaugment and its wiring into fastmice.views.augment (config fields, recipes).

torchvision does not import next to this torch, so each op is checked against a small per-image
reference written here from torchvision's / PIL's definitions (torchvision's inverse affine matrix,
PIL's equalize loop, the _blend formula, ...), plus hand-made images for directions and exact identities.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastmice.views.augment import MOCO_V1, RECIPES, SIMCLR, AugmentConfig, augment_batch, recipe_overrides
from fastmice.config import load_config
from fastmice.views.randaugment import OPS, apply_ops, rand_augment, sample_ops

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
LUMA = (0.299, 0.587, 0.114)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def u8_images(B=8, H=16, W=16, seed=0) -> torch.Tensor:
    """Random images on the uint8 grid as float (B, 3, H, W): smooth-ish gradients plus noise, so
    equalize and autocontrast have non-trivial histograms."""
    g = gen(seed)
    ramp = torch.linspace(0, 1, W).view(1, 1, 1, W) * torch.rand(B, 3, 1, 1, generator=g)
    x = 0.2 * torch.rand(B, 3, 1, 1, generator=g) + 0.5 * ramp + 0.3 * torch.rand(B, 3, H, W, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def one_op(img, name, magnitude, negate=False):
    B = img.shape[0]
    op = torch.full((B,), OPS.index(name), dtype=torch.long)
    return apply_ops(img, op, torch.full((B,), negate), magnitude)


# ----------------------------------------------------------------------------------- references

def tv_inverse_affine(center, angle, translate, scale, shear):
    """torchvision.transforms.functional._get_inverse_affine_matrix (inverted=True)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def tv_geometric_matrix(name, mag, H, W):
    """The matrix torchvision's RandAugment._apply_op hands to the tensor F.affine / F.rotate."""
    def affine(angle=0.0, translate=(0, 0), shear=(0.0, 0.0), center=None):
        center_f = [0.0, 0.0] if center is None else [c - s * 0.5 for c, s in zip(center, (W, H))]
        return tv_inverse_affine(center_f, angle, [float(t) for t in translate], 1.0, shear)

    if name == "ShearX":
        return affine(shear=(math.degrees(math.atan(mag)), 0.0), center=(0, 0))
    if name == "ShearY":
        return affine(shear=(0.0, math.degrees(math.atan(mag))), center=(0, 0))
    if name == "TranslateX":
        return affine(translate=(int(mag), 0))
    if name == "TranslateY":
        return affine(translate=(0, int(mag)))
    assert name == "Rotate"
    return tv_inverse_affine([0.0, 0.0], -mag, [0.0, 0.0], 1.0, [0.0, 0.0])


def affine_reference(img: np.ndarray, m) -> np.ndarray:
    """Nearest-neighbour inverse mapping of one (3, H, W) image, zeros outside (grid_sample semantics)."""
    _, H, W = img.shape
    out = np.zeros_like(img)
    for i in range(H):
        for j in range(W):
            x, y = j + 0.5 - W / 2, i + 0.5 - H / 2
            col = np.rint(m[0] * x + m[1] * y + m[2] + W / 2 - 0.5)
            row = np.rint(m[3] * x + m[4] * y + m[5] + H / 2 - 0.5)
            if 0 <= col < W and 0 <= row < H:
                out[:, i, j] = img[:, int(row), int(col)]
    return out


def pil_equalize_channel(chan: np.ndarray) -> np.ndarray:
    """PIL.ImageOps.equalize on one uint8 channel (its loop, verbatim in spirit)."""
    h = np.bincount(chan.ravel(), minlength=256).tolist()
    histo = [v for v in h if v]
    if len(histo) <= 1:
        return chan
    step = (sum(histo) - histo[-1]) // 255
    if not step:
        return chan
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return np.asarray(lut, dtype=np.int64)[chan]


def magnitude_of(lo, hi, m):
    return float(torch.linspace(lo, hi, 31)[m])


# -------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
@pytest.mark.parametrize("magnitude", [9, 30])
def test_geometric_ops_match_torchvision_inverse_affine(name, magnitude):
    H, W = 12, 16                          # not square, to catch H/W mix-ups
    img = u8_images(B=2, H=H, W=W, seed=1)
    hi = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331 * W, "TranslateY": 150 / 331 * H,
          "Rotate": 30.0}[name]
    for negate in (False, True):
        out = one_op(img, name, magnitude, negate)
        mag = magnitude_of(0.0, hi, magnitude) * (-1 if negate else 1)
        ref = affine_reference(img[0].numpy(), tv_geometric_matrix(name, mag, H, W))
        np.testing.assert_array_equal(out[0].numpy(), ref)
        torch.testing.assert_close(out[1], torch.from_numpy(
            affine_reference(img[1].numpy(), tv_geometric_matrix(name, mag, H, W))), atol=0, rtol=0)


def test_translate_shifts_content_by_whole_pixels():
    img = u8_images(B=1, H=32, W=32, seed=2)
    k = int(150 / 331 * 32 * 9 / 30)      # 4 pixels at magnitude 9 on a 32-pixel side
    assert k == 4
    right = one_op(img, "TranslateX", 9)
    assert torch.equal(right[..., :, k:], img[..., :, :-k]) and (right[..., :, :k] == 0).all()
    left = one_op(img, "TranslateX", 9, negate=True)
    assert torch.equal(left[..., :, :-k], img[..., :, k:]) and (left[..., :, -k:] == 0).all()
    down = one_op(img, "TranslateY", 9)
    assert torch.equal(down[..., k:, :], img[..., :-k, :]) and (down[..., :k, :] == 0).all()


def test_rotate_is_counter_clockwise_and_identity_at_zero():
    img = u8_images(B=2, H=16, W=16, seed=3)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert torch.equal(one_op(img, name, 0), img), name
    dot = torch.zeros(1, 3, 17, 17)
    dot[..., 8, 14] = 1.0                  # right of the centre (8, 8)
    rows, cols = torch.nonzero(one_op(dot, "Rotate", 30)[0, 0], as_tuple=True)
    assert rows.float().mean() < 8 and cols.float().mean() < 14     # moved up: counter-clockwise
    rows, _ = torch.nonzero(one_op(dot, "Rotate", 30, negate=True)[0, 0], as_tuple=True)
    assert rows.float().mean() > 8                                     # clockwise


def test_shear_x_leans_about_the_top_left_corner():
    line = torch.zeros(1, 3, 16, 16)
    line[..., 8] = 1.0                     # a vertical line
    out = one_op(line, "ShearX", 30)[0, 0]  # m = 0.3: row i reads x + 0.3 (i + 0.5)
    cols = out.argmax(dim=1)
    assert cols[0] == 8 and cols[-1] == 8 - round(0.3 * 15.5)       # top row fixed, lower rows lean left
    assert (cols[1:] <= cols[:-1]).all()


# ---------------------------------------------------------------------------------------- colour

@pytest.mark.parametrize("name", ["Brightness", "Color", "Contrast", "Sharpness"])
def test_enhance_ops_match_blend_reference(name):
    img = torch.rand(4, 3, 10, 12, generator=gen(4))
    for magnitude, negate in ((9, False), (30, True), (30, False)):
        f = 1.0 + magnitude_of(0.0, 0.9, magnitude) * (-1 if negate else 1)
        out = one_op(img, name, magnitude, negate)
        for i in range(img.shape[0]):
            x = img[i].double()
            gray = sum(w * x[c] for c, w in enumerate(LUMA)).unsqueeze(0)
            if name == "Brightness":
                ref = torch.zeros_like(x)
            elif name == "Color":
                ref = gray.expand_as(x)
            elif name == "Contrast":
                ref = gray.mean().expand_as(x)
            else:                          # PIL's SMOOTH kernel on the interior, border kept
                ref = x.clone()
                for r in range(1, x.shape[1] - 1):
                    for c in range(1, x.shape[2] - 1):
                        ref[:, r, c] = (x[:, r - 1:r + 2, c - 1:c + 2].sum(dim=(1, 2)) + 4 * x[:, r, c]) / 13
            want = (f * x + (1 - f) * ref).clamp(0, 1).float()
            torch.testing.assert_close(out[i], want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("magnitude", [0, 2, 9, 17, 30])
def test_posterize_and_solarize_on_uint8_levels(magnitude):
    img = u8_images(B=4, seed=5)
    u8 = (img * 255).round().to(torch.int64).numpy()
    bits = 8 - int(round(magnitude / 7.5))
    post = one_op(img, "Posterize", magnitude)
    np.testing.assert_array_equal((post * 255).round().numpy().astype(np.int64), u8 & -(2 ** (8 - bits)))
    # torchvision compares the uint8 tensor with the float threshold after promotion to float32.
    thr = np.float32(255.0 * magnitude_of(1.0, 0.0, magnitude))
    sol = one_op(img, "Solarize", magnitude)
    np.testing.assert_array_equal((sol * 255).round().numpy().astype(np.int64),
                                  np.where(u8.astype(np.float32) >= thr, 255 - u8, u8))
    assert torch.equal(post, (post * 255).round() / 255) and torch.equal(sol, (sol * 255).round() / 255)


def test_autocontrast_per_channel_stretch():
    img = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=gen(6))
    img[1, 2] = 0.5                                                   # constant channel: unchanged
    out = one_op(img, "AutoContrast", 9)
    x = img.double()
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    want = torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-12), x).float()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert torch.equal(out[1, 2], img[1, 2])


def test_equalize_matches_pil_per_channel():
    img = u8_images(B=6, H=16, W=16, seed=7)
    img[1] = (img[1] * 40).round() / 255                              # narrow histogram
    img[2, 0] = 128 / 255                                             # constant channel (step 0)
    img[3, 1] = torch.where(torch.rand(16, 16, generator=gen(8)) < 0.5, 10 / 255, 200 / 255)   # two levels
    out = one_op(img, "Equalize", 9)
    u8 = (img * 255).round().to(torch.int64).numpy()
    got = (out * 255).round().to(torch.int64).numpy()
    for i in range(img.shape[0]):
        for c in range(3):
            np.testing.assert_array_equal(got[i, c], pil_equalize_channel(u8[i, c]), err_msg=f"sample {i} ch {c}")
    assert torch.equal(out[2, 0], img[2, 0])


# ------------------------------------------------------------------------------------ rand_augment

def test_zero_ops_and_identity_like_ops_give_the_input():
    img = u8_images(B=4, seed=9)
    g = gen()
    state = g.get_state()
    assert rand_augment(img, 0, 9, g) is img
    assert torch.equal(g.get_state(), state)                          # no draws when off
    identity_like = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                     "Color", "Contrast", "Sharpness", "Posterize"]   # at magnitude 0 (Posterize: 8 bits)
    for name in identity_like:
        assert torch.equal(one_op(img, name, 0), img), name
        assert torch.equal(one_op(img, name, 0, negate=True), img), name


def test_range_shape_and_determinism():
    img = torch.rand(32, 3, 16, 16, generator=gen(10))
    for magnitude in (9, 30):
        out = rand_augment(img, 3, magnitude, gen(1))
        assert out.shape == img.shape and out.dtype == img.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, rand_augment(img, 3, magnitude, gen(1)))
        assert not torch.equal(out, rand_augment(img, 3, magnitude, gen(2)))


def test_batched_equals_per_sample_application():
    img = u8_images(B=28, H=12, W=12, seed=11)
    op = torch.arange(28) % len(OPS)                                  # every op, both signs
    negate = torch.arange(28) >= len(OPS)
    out = apply_ops(img, op, negate, 9)
    for i in range(28):
        torch.testing.assert_close(out[i:i + 1], apply_ops(img[i:i + 1], op[i:i + 1], negate[i:i + 1], 9),
                                   atol=0, rtol=0)
    # rand_augment = its drawn rounds, in order.
    g = gen(3)
    ops, negs = sample_ops(28, 2, g, torch.device("cpu"))
    want = apply_ops(apply_ops(img, ops[:, 0], negs[:, 0], 9), ops[:, 1], negs[:, 1], 9)
    assert torch.equal(rand_augment(img, 2, 9, gen(3)), want)


def test_ops_are_drawn_per_sample_uniformly():
    op, negate = sample_ops(4096, 2, gen(12), torch.device("cpu"))
    freq = torch.bincount(op.flatten(), minlength=len(OPS)).double() / op.numel()
    assert (freq - 1 / len(OPS)).abs().max() < 0.012                  # SE ~ 0.004
    assert abs(negate.double().mean().item() - 0.5) < 0.02
    # Samples of one image get different ops: the outputs differ across the batch.
    img = u8_images(B=1, seed=13).expand(16, -1, -1, -1)
    out = rand_augment(img, 1, 9, gen(14))
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 6


def test_rejects_bad_arguments():
    img = torch.rand(2, 3, 8, 8)
    for kwargs in (dict(num_ops=-1), dict(magnitude=31), dict(magnitude=-1), dict(num_ops=True)):
        args = dict(num_ops=2, magnitude=9) | kwargs
        with pytest.raises(ValueError):
            rand_augment(img, args["num_ops"], args["magnitude"], gen())
    with pytest.raises(ValueError):
        rand_augment((img * 255).to(torch.uint8), 2, 9, gen())


# ----------------------------------------------------------------------------- augment_batch wiring

def legacy_draws(g: torch.Generator, B: int) -> None:
    """The uniforms augment_batch drew before RandAugment existed: crop (B, 22), coins (B, 4),
    jitter factors (B, 4), jitter coins (B,), jitter order (B, 4)."""
    for shape in ((B, 22), (B, 4), (B, 4), (B,), (B, 4)):
        torch.rand(shape, generator=g)


def test_augment_batch_unchanged_when_randaugment_is_off():
    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=gen(0))
    # Per-sample sums of two consecutive views, computed with augment.py before RandAugment was added.
    golden = {"moco": ([149.66568, 281.20507, 284.57757, 273.39763], [151.6601, 161.05639, 201.0789, 267.20405]),
              "simclr": ([43.04248, 142.25725, 91.46143, 130.16153], [84.1795, 96.85896, 95.96235, 95.88995])}
    for name, cfg, size in (("moco", MOCO_V1, 12), ("simclr", SIMCLR, 8)):
        off = dataclasses.replace(cfg, randaugment_ops=0, randaugment_magnitude=30)
        g1, g2 = gen(1), gen(1)
        for want in golden[name]:
            a = augment_batch(x, cfg, size, generator=g1, **RAW)
            b = augment_batch(x, off, size, generator=g2, **RAW)
            assert torch.equal(a, b)
            torch.testing.assert_close(a.double().sum(dim=(1, 2, 3)), torch.tensor(want, dtype=torch.float64),
                                       atol=1e-3, rtol=0)
        ref = gen(1)
        legacy_draws(ref, 4)
        legacy_draws(ref, 4)
        assert torch.equal(g1.get_state(), ref.get_state())           # same draw count as before


def test_augment_batch_randaugment_draws_last_and_applies():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(0))
    cfg = AugmentConfig(**RECIPES["randaugment"])
    g = gen(5)
    y = augment_batch(x, cfg, 16, generator=g, **RAW)
    ref = gen(5)
    legacy_draws(ref, 8)
    torch.rand((8, cfg.randaugment_ops, 2), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    assert y.shape == (8, 3, 16, 16) and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, augment_batch(x, cfg, 16, generator=gen(5), **RAW))
    # = the same pipeline without RandAugment, then rand_augment with the generator where it stopped.
    g = gen(5)
    base = augment_batch(x, dataclasses.replace(cfg, randaugment_ops=0), 16, generator=g, **RAW)
    assert torch.equal(y, rand_augment(base, 2, 9, g))
    assert not torch.equal(y, base)


def test_config_validation():
    for kwargs, match in ((dict(randaugment_ops=-1), "randaugment_ops"), (dict(randaugment_ops=1.5), "integer"),
                          (dict(randaugment_ops=True), "integer"), (dict(randaugment_magnitude=31), "0..30"),
                          (dict(randaugment_magnitude=-1), "0..30")):
        with pytest.raises(ValueError, match=match):
            AugmentConfig(**kwargs)
    assert AugmentConfig(randaugment_ops=2, randaugment_magnitude=30).randaugment_ops == 2


# ----------------------------------------------------------------------------------------- recipes

def test_recipes_cover_every_field():
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    assert set(RECIPES) == {"moco", "simclr", "randaugment"}
    for recipe in RECIPES.values():
        assert set(recipe) == names
    assert AugmentConfig(**RECIPES["moco"]) == AugmentConfig() == MOCO_V1
    assert AugmentConfig(**RECIPES["simclr"]) == SIMCLR
    ra = AugmentConfig(**RECIPES["randaugment"])
    assert (ra.crop_scale, ra.flip_p, ra.order) == ((0.2, 1.0), 0.5, "moco")
    assert ra.jitter_p == ra.grayscale_p == ra.blur_p == 0
    assert (ra.randaugment_ops, ra.randaugment_magnitude) == (2, 9)


@pytest.mark.parametrize("name", ["moco", "simclr", "randaugment"])
def test_recipe_overrides_round_trip_through_load_config(name):
    overrides = recipe_overrides(name)
    assert "--augment.crop_scale=[0.2, 1.0]" in overrides or name == "simclr"
    assert all(o.startswith("--augment.") for o in overrides)
    cfg = load_config("digits", overrides)
    assert cfg.augment == AugmentConfig(**RECIPES[name])
    if name == "randaugment":
        assert cfg.augment.randaugment_ops == 2
    # Explicit overrides after the recipe win.
    assert load_config("digits", overrides + ["--augment.flip_p=0.0"]).augment.flip_p == 0.0


def test_unknown_recipe_raises():
    with pytest.raises(ValueError, match="moco, simclr, randaugment"):
        recipe_overrides("autoaugment")


def test_dali_refuses_randaugment_instead_of_skipping_it():
    from fastmice.views.augment import RECIPES, AugmentConfig
    from fastmice.views.dali import _configs

    with pytest.raises(ValueError, match="RandAugment is not in the DALI pipeline"):
        _configs(AugmentConfig(**RECIPES["randaugment"]), 3)
    assert len(_configs(AugmentConfig(**RECIPES["moco"]), 3)) == 3
