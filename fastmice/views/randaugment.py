"""Batched RandAugment (Cubuk et al. 2020) as pure tensor ops, with torchvision.transforms.RandAugment's
op set and magnitude ranges (its `_augmentation_space` with num_bins=31).

Each sample draws `num_ops` ops, uniformly and independently per round, from the 14 below, applied at
the one fixed magnitude bin (signed ops get a random sign). A round is computed for the whole batch at
once: one nearest-neighbour F.grid_sample for the geometric ops (identity matrix for everyone else), one
blend for Brightness/Color/Contrast/Sharpness, then Posterize, Solarize, AutoContrast and Equalize for
the whole batch, and each sample keeps its own op's result by torch.where. No per-sample Python, no
host-device sync; all randomness comes from one generator, 2 * num_ops draws per sample, up front.

Deliberate differences from torchvision (whose RandAugment usually runs on PIL or uint8 images):
- Images stay float in [0, 1] between ops, as torchvision's float-tensor path does; the PIL/uint8 paths
  round every op's output to uint8 levels. Posterize, Solarize and Equalize are uint8 operations in
  torchvision, so here they see the image rounded to the nearest level, round(255 x), and return levels
  (k / 255). Rounding, not the truncation of torchvision's float -> uint8 conversion, so images that come
  from uint8 keep their values exactly and resampled ones get what PIL's resize would have stored.
- Solarize uses threshold 255 * linspace(1, 0, bins)[magnitude] on those levels (newer torchvision's
  float-aware form; older releases used linspace(255, 0) on any dtype).
- Color (saturation) and Contrast use the ITU-R 601 luma (0.299, 0.587, 0.114), like PIL and
  fastmice.views.augment; torchvision's tensor path uses 0.2989 for red.
- The affine sampling grid is built elementwise in fp32 rather than by torchvision's bmm (which can run
  in TF32 on GPUs); a source coordinate that falls exactly on a half-pixel may round the other way.
- Parameters are per sample from our generator (a sign is drawn even for unsigned ops), so the random
  streams differ from torchvision's; the distribution over ops, signs and magnitudes is the same.
Equalize follows torchvision's `_scale_channel` exactly (integer arithmetic, per sample and channel).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmice.views.pixels import grayscale, rand_uniform

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")   # torchvision's order
(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR, CONTRAST, SHARPNESS,
 POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE) = range(len(OPS))


@functools.lru_cache(maxsize=64)
def magnitudes(magnitude: int, num_bins: int, H: int, W: int) -> dict[str, float]:
    """The unsigned magnitude of each parametrised op at bin `magnitude`, as Python numbers.

    Read from fp32 torch.linspace like torchvision, so e.g. int() truncates translations identically.
    CPU only and cached per (magnitude, bins, size): nothing here touches the device.
    """
    def bin_of(lo: float, hi: float) -> float:
        return float(torch.linspace(lo, hi, num_bins)[magnitude])

    return {
        "shear": bin_of(0.0, 0.3),
        "translate_x": float(int(bin_of(0.0, 150.0 / 331.0 * W))),    # whole pixels, as in torchvision
        "translate_y": float(int(bin_of(0.0, 150.0 / 331.0 * H))),
        "rotate": bin_of(0.0, 30.0),                                  # degrees, counter-clockwise
        "enhance": bin_of(0.0, 0.9),                                  # blend factor 1 +- this
        "posterize_bits": int(8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()[magnitude]),
        "solarize": 255.0 * bin_of(1.0, 0.0),                         # threshold on the 0..255 levels
    }


# ------------------------------------------------------------------------------------------ geometry

def _affine_nearest(img: Tensor, op: Tensor, sign: Tensor, mag: dict[str, float]) -> Tensor:
    """The geometric ops for samples whose op is one; an exact identity map for all others.

    torchvision's F.affine / F.rotate on tensors: pixel centres in coordinates relative to the image
    centre, (x, y) = (j + 0.5 - W/2, i + 0.5 - H/2); output pixel (x, y) reads the source at
    x_in = a x + b y + c, y_in = d x + e y + f, nearest neighbour, zeros outside (fill=None):
      ShearX (centre (0, 0), the top-left corner): x_in = x + m (y + H/2)
      ShearY:                                      y_in = y + m (x + W/2)
      TranslateX/Y by t pixels:                    x_in = x - t / y_in = y - t   (content moves by +t)
      Rotate by theta counter-clockwise about the centre: x_in = cos x - sin y, y_in = sin x + cos y
    """
    B, _, H, W = img.shape
    sh, rad = mag["shear"] * sign, math.radians(mag["rotate"])
    sin = math.sin(rad) * sign                                              # (B,) sin(+-theta)
    is_rot = op == ROTATE
    a = torch.where(is_rot, math.cos(rad), 1.0)                             # (B,) each
    b = torch.where(op == SHEAR_X, sh, torch.where(is_rot, -sin, 0.0))
    c = torch.where(op == SHEAR_X, sh * (H / 2), torch.where(op == TRANSLATE_X, -mag["translate_x"] * sign, 0.0))
    d = torch.where(op == SHEAR_Y, sh, torch.where(is_rot, sin, 0.0))
    e = a
    f = torch.where(op == SHEAR_Y, sh * (W / 2), torch.where(op == TRANSLATE_Y, -mag["translate_y"] * sign, 0.0))
    a, b, c, d, e, f = (t.to(img.dtype).view(B, 1, 1) for t in (a, b, c, d, e, f))

    x = (torch.arange(W, dtype=img.dtype, device=img.device) + (0.5 - W / 2)).view(1, 1, W)
    y = (torch.arange(H, dtype=img.dtype, device=img.device) + (0.5 - H / 2)).view(1, H, 1)
    gx = (a * x + b * y + c) / (W / 2)                                      # (B, H, W) in [-1, 1] units
    gy = (d * x + e * y + f) / (H / 2)
    grid = torch.stack([gx, gy], dim=-1)                                    # (B, H, W, 2) as (x, y)
    return F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# -------------------------------------------------------------------------------------------- colour

def _sharpness_reference(img: Tensor) -> Tensor:
    """torchvision's _blurred_degenerate_image: 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 on the
    interior, border pixels unchanged. (B, 3, H, W) -> (B, 3, H, W)."""
    B, C, H, W = img.shape
    if H <= 2 or W <= 2:                       # torchvision leaves such images untouched
        return img
    kernel = torch.ones(1, 1, 3, 3, dtype=img.dtype, device=img.device)
    kernel[..., 1, 1] = 5.0
    blurred = F.conv2d(img.reshape(B * C, 1, H, W), kernel / 13.0).view(B, C, H - 2, W - 2)
    out = img.clone()
    out[..., 1:-1, 1:-1] = blurred
    return out


def _enhance(img: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """Brightness, Color, Contrast and Sharpness in one blend: torchvision's _blend(img, ref, f) =
    clamp(f img + (1 - f) ref) with ref = 0, the luma image, the mean luma, or the smoothed image.
    Samples with another op get f = 1, i.e. the input (f img + 0 ref = img exactly)."""
    B = img.shape[0]
    is_enhance = (op >= BRIGHTNESS) & (op <= SHARPNESS)
    f = torch.where(is_enhance, factor, 1.0).view(B, 1, 1, 1)
    gray = grayscale(img)                                                  # (B, 1, H, W)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)                           # (B, 1, 1, 1)
    op = op.view(B, 1, 1, 1)
    ref = torch.where(op == COLOR, gray, torch.where(op == CONTRAST, mean, 0.0))
    ref = torch.where(op == SHARPNESS, _sharpness_reference(img), ref)      # (B, 3, H, W)
    return (f * img + (1.0 - f) * ref).clamp(0.0, 1.0)


def _autocontrast(img: Tensor) -> Tensor:
    """torchvision's autocontrast for floats: each channel stretched to [0, 1]; constant channels kept."""
    lo = img.amin(dim=(-2, -1), keepdim=True)                               # (B, 3, 1, 1)
    hi = img.amax(dim=(-2, -1), keepdim=True)
    scale = 1.0 / (hi - lo)
    flat = ~torch.isfinite(scale)
    lo, scale = torch.where(flat, 0.0, lo), torch.where(flat, 1.0, scale)
    return ((img - lo) * scale).clamp(0.0, 1.0)


def _equalize(q: Tensor) -> Tensor:
    """torchvision's equalize on levels q (B, 3, H, W) int64 in 0..255, per sample and channel:
    hist = 256-bin histogram, step = (pixels - count of the last non-empty bin) // 255,
    lut[v] = (cumsum(hist)[v - 1] + step // 2) // step clamped to 255 (lut[0] = 0); unchanged if step = 0."""
    B, C, H, W = q.shape
    flat = q.reshape(B * C, H * W)                                          # (BC, HW)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=q.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))                       # (BC, 256)
    last = hist.gather(1, flat.amax(dim=1, keepdim=True))                   # (BC, 1) the top level's count
    step = torch.div(H * W - last, 255, rounding_mode="floor")
    cum = torch.cumsum(hist, dim=1)
    lut = torch.div(cum + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)                          # lut[v] uses cumsum[v - 1]
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.view(B, C, H, W)


# ------------------------------------------------------------------------------------------- a round

def apply_ops(img: Tensor, op: Tensor, negate: Tensor, magnitude: int, num_bins: int = 31) -> Tensor:
    """One RandAugment round with given per-sample ops: img (B, 3, H, W) float in [0, 1], op (B,) int64
    indices into OPS, negate (B,) bool (flips the sign of signed ops) -> (B, 3, H, W)."""
    B, _, H, W = img.shape
    mag = magnitudes(magnitude, num_bins, H, W)
    sign = torch.where(negate, -1.0, 1.0).to(img.dtype)                    # (B,)
    geometric = _affine_nearest(img, op, sign, mag)
    enhanced = _enhance(img, op, 1.0 + mag["enhance"] * sign)

    q = (img * 255.0).round().clamp(0.0, 255.0)                             # uint8 levels, kept as float
    shift = 2.0 ** (8 - mag["posterize_bits"])
    posterized = torch.floor(q / shift) * shift / 255.0                     # q & -(2 ** (8 - bits))
    solarized = torch.where(q >= mag["solarize"], 255.0 - q, q) / 255.0
    equalized = _equalize(q.long()).to(img.dtype) / 255.0

    op = op.view(B, 1, 1, 1)
    out = torch.where((op >= SHEAR_X) & (op <= ROTATE), geometric, img)
    out = torch.where((op >= BRIGHTNESS) & (op <= SHARPNESS), enhanced, out)
    out = torch.where(op == POSTERIZE, posterized, out)
    out = torch.where(op == SOLARIZE, solarized, out)
    out = torch.where(op == AUTOCONTRAST, _autocontrast(img), out)
    return torch.where(op == EQUALIZE, equalized, out)


def sample_ops(B: int, num_ops: int, generator: torch.Generator | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """All draws of rand_augment, up front: op (B, num_ops) int64 uniform over OPS, negate (B, num_ops)
    bool with probability 1/2. Exactly B * num_ops * 2 uniforms from the generator."""
    u = rand_uniform((B, num_ops, 2), generator, device)
    op = (u[..., 0] * len(OPS)).long().clamp(max=len(OPS) - 1)
    return op, u[..., 1] < 0.5


def rand_augment(img: Tensor, num_ops: int, magnitude: int, generator: torch.Generator | None,
                 num_bins: int = 31, rows: tuple[int, slice] | None = None) -> Tensor:
    """torchvision's RandAugment(num_ops, magnitude, num_magnitude_bins=num_bins) on a batch:
    img (B, 3, H, W) float in [0, 1] -> same shape, each sample with its own ops and signs.
    rows=(total, slice): img holds those rows of a batch of `total`; the ops are drawn for all of it."""
    if img.dim() != 4 or img.shape[1] != 3 or not img.is_floating_point():
        raise ValueError(f"images must be float (B, 3, H, W) in [0, 1], got {img.dtype} {tuple(img.shape)}")
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be an int in 0..{num_bins - 1}, got {magnitude!r}")
    if num_ops == 0:
        return img
    total, part = rows if rows is not None else (img.shape[0], slice(None))
    op, negate = sample_ops(total, num_ops, generator, img.device)  # (total, num_ops) each
    op, negate = op[part], negate[part]
    for k in range(num_ops):
        img = apply_ops(img, op[:, k], negate[:, k], magnitude, num_bins)
    return img
