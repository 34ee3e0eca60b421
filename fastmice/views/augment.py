"""Batched image augmentation as pure tensor ops (the cifar10-airbench way).

The dataset lives on the device as uint8 (B, 3, H, W). Every transform here acts on the whole batch
at once with per-sample parameters drawn from one torch.Generator, so there is no per-sample Python,
no host-device sync, and a run is exactly reproducible from the generator state (the trainer saves
and restores it for exact resume).

The transforms follow torchvision's semantics (RandomResizedCrop, RandomGrayscale, ColorJitter,
RandomHorizontalFlip, GaussianBlur), plus an optional batched RandAugment (fastmice.views.randaugment). The
deliberate differences are listed in `augment_batch`. RECIPES names complete configs (MoCo v1, SimCLR,
crop + flip + RandAugment); recipe_overrides turns one into `--augment.key=value` overrides.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmice.views.pixels import grayscale, rand_uniform
from fastmice.views.randaugment import rand_augment

_ORDERS = ("moco", "simclr")
_CROP_TRIES = 10                 # torchvision's RandomResizedCrop.get_params tries 10 times
_BLUR_SIGMA = (0.1, 2.0)         # SimCLR's Gaussian blur sigma range
_RA_BINS = 31                    # RandAugment magnitude bins (torchvision's num_magnitude_bins default)


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)       # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)   # aspect ratio w/h range, sampled log-uniformly
    grayscale_p: float = 0.2
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)  # brightness, contrast, saturation, hue
    jitter_p: float = 1.0          # MoCo v1 applies ColorJitter always; SimCLR uses 0.8
    flip_p: float = 0.5
    blur_p: float = 0.0            # SimCLR: 0.5
    blur_kernel_frac: float = 0.1  # Gaussian blur kernel ~10% of the side, sigma in [0.1, 2.0]
    # "moco": crop, grayscale, jitter, flip (MoCo v1's order); "simclr": crop, flip, jitter(p), grayscale, blur
    order: str = "moco"
    # RandAugment (torchvision semantics) after the crop, flip and the colour ops above: ops per image
    # (0 = off, RandAugment's N) at magnitude bin randaugment_magnitude in 0..30 (M; 9 in the paper).
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so configs stay hashable and compare equal.
        for name in ("crop_scale", "crop_ratio", "jitter"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def interval(name: str, pair, lo: float, hi: float) -> None:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{name} must be a (lo, hi) pair, got {pair!r}")
            a, b = number(name, pair[0]), number(name, pair[1])
            if a > b:
                raise ValueError(f"{name} must have lo <= hi, got {pair!r}")
            if a <= lo or b > hi:
                raise ValueError(f"{name} must lie in ({lo}, {hi}], got {pair!r}")

        interval("crop_scale", self.crop_scale, 0.0, 1.0)
        interval("crop_ratio", self.crop_ratio, 0.0, math.inf)
        for name in ("grayscale_p", "jitter_p", "flip_p", "blur_p"):
            if not 0.0 <= number(name, getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {getattr(self, name)!r}")
        if not isinstance(self.jitter, (tuple, list)) or len(self.jitter) != 4:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue), got {self.jitter!r}")
        for name, value in zip(("brightness", "contrast", "saturation", "hue"), self.jitter):
            if number(f"jitter {name}", value) < 0:
                raise ValueError(f"jitter {name} must be >= 0, got {value!r}")
        if self.jitter[3] > 0.5:
            raise ValueError(f"jitter hue is a fraction of a turn and must be <= 0.5, got {self.jitter[3]!r}")
        if not 0.0 < number("blur_kernel_frac", self.blur_kernel_frac) <= 1.0:
            raise ValueError(f"blur_kernel_frac must lie in (0, 1], got {self.blur_kernel_frac!r}")
        if self.order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {self.order!r}")
        for name in ("randaugment_ops", "randaugment_magnitude"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.randaugment_ops < 0:
            raise ValueError(f"randaugment_ops is the number of RandAugment ops per image (0 = off) and must "
                             f"be >= 0, got {self.randaugment_ops!r}")
        if not 0 <= self.randaugment_magnitude < _RA_BINS:
            raise ValueError(f"randaugment_magnitude is a bin of RandAugment's {_RA_BINS}-step magnitude scale "
                             f"and must lie in 0..{_RA_BINS - 1}, got {self.randaugment_magnitude!r}")


# Named augmentation recipes, each a value for EVERY AugmentConfig field, so applying one fully
# determines the augmentation (the CLI's --augment-recipe; explicit --augment.* overrides go on top).
RECIPES: dict[str, dict[str, object]] = {
    # MoCo v1 (MiCE's): crop 0.2-1, grayscale 0.2, jitter 0.4 always, flip; this is AugmentConfig().
    "moco": dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), grayscale_p=0.2, jitter=(0.4, 0.4, 0.4, 0.4),
                 jitter_p=1.0, flip_p=0.5, blur_p=0.0, blur_kernel_frac=0.1, order="moco",
                 randaugment_ops=0, randaugment_magnitude=9),
    # SimCLR: crop 0.08-1, flip, jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5.
    "simclr": dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), grayscale_p=0.2, jitter=(0.8, 0.8, 0.8, 0.2),
                   jitter_p=0.8, flip_p=0.5, blur_p=0.5, blur_kernel_frac=0.1, order="simclr",
                   randaugment_ops=0, randaugment_magnitude=9),
    # MiCE's Table 4 "(RA)": crop 0.2-1, flip, then RandAugment N=2, M=9; no jitter, grayscale or blur.
    "randaugment": dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), grayscale_p=0.0,
                        jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, flip_p=0.5, blur_p=0.0, blur_kernel_frac=0.1,
                        order="moco", randaugment_ops=2, randaugment_magnitude=9),
}

MOCO_V1 = AugmentConfig(**RECIPES["moco"])
SIMCLR = AugmentConfig(**RECIPES["simclr"])


def recipe_overrides(name: str) -> list[str]:
    """The recipe `name` as override strings, e.g. ["--augment.crop_scale=[0.2, 1.0]", ...], one per field."""
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    # JSON is YAML: parse_overrides reads each value back (tuples as lists, which the config turns back)
    return [f"--augment.{key}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for key, v in RECIPES[name].items()]


# ----------------------------------------------------------------------------------------- randomness

def sample_crop_boxes(
    B: int, H: int, W: int, scale: Sequence[float], ratio: Sequence[float],
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's RandomResizedCrop.get_params for B samples at once -> (top, left, h, w), each (B,) int64.

    Each sample gets 10 candidates (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the
    first that fits is taken, which has the same distribution as torchvision's try-until-success loop.
    If none fits, the central crop clamped to the ratio range is used, as in torchvision.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    # Columns: 10 areas, 10 log-ratios, top, left. fp64 so w, h round as torchvision's Python floats do.
    u = rand_uniform((B, 2 * _CROP_TRIES + 2), generator, device).double()
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :_CROP_TRIES])                   # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _CROP_TRIES:2 * _CROP_TRIES])        # (B, 10)
    w = torch.round(torch.sqrt(area * aspect)).long()      # round-half-even, like Python's round()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)                                           # (B, 10)

    tries = torch.arange(_CROP_TRIES, device=device).expand(B, -1)
    first = torch.where(fits, tries, _CROP_TRIES).amin(dim=1)                                # (B,) 10 = none fits
    found = first < _CROP_TRIES
    pick = first.clamp(max=_CROP_TRIES - 1).unsqueeze(1)
    w = w.gather(1, pick).squeeze(1)                                                         # (B,)
    h = h.gather(1, pick).squeeze(1)
    # Integer offsets uniform over [0, H - h] and [0, W - w] (torch.randint in torchvision).
    top = torch.minimum((u[:, -2] * (H - h + 1)).floor().long(), H - h)
    left = torch.minimum((u[:, -1] * (W - w + 1)).floor().long(), W - w)

    # Fallback (static, since it only depends on the shape): the central crop clamped to the ratio range.
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    top = torch.where(found, top, (H - fh) // 2)
    left = torch.where(found, left, (W - fw) // 2)
    return top, left, torch.where(found, h, fh), torch.where(found, w, fw)


# ------------------------------------------------------------------------------------------ geometry

def _resized_crop(img: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, flip: Tensor, out_size: int) -> Tensor:
    """Crop each sample's box and resize it to out_size x out_size (bilinear), mirrored where `flip`.

    One grid_sample for the whole batch (align_corners=False), on the grid F.affine_grid would build for
    theta = [[+-w/W, 0, cx], [0, h/H, cy]]: output pixel j samples input x = left + (j + 0.5) * w / S - 0.5,
    exactly the source coordinate of F.interpolate(crop, S, mode="bilinear", align_corners=False).
    The grid is built elementwise instead of by affine_grid because affine_grid is a bmm, which runs in
    TF32 on GPUs where the trainer allows TF32 matmuls (~0.01 px errors); this is exact fp32 and cheaper.
    Negating the x scale mirrors the output about the box centre, so the horizontal flip costs nothing.
    """
    B, _, H, W = img.shape
    S = out_size
    top, left, h, w = (t.to(img.dtype).view(B, 1, 1) for t in (top, left, h, w))
    centres = (2 * torch.arange(S, dtype=img.dtype, device=img.device) + 1) / S - 1   # output pixel centres
    sx = torch.where(flip.view(B, 1, 1), -w / W, w / W)
    gx = sx * centres.view(1, 1, S) + (2 * left + w) / W - 1                # (B, 1, S) in [-1, 1] coordinates
    gy = (h / H) * centres.view(1, S, 1) + (2 * top + h) / H - 1            # (B, S, 1)
    # When upsampling, the outermost output pixels map slightly outside the box; F.interpolate on the
    # cropped tensor clamps to the box's edge pixels there. Clamp to the centres of the box's border
    # pixels so pixels outside the box never bleed in (symmetric, so it commutes with the flip).
    gx = torch.minimum(torch.maximum(gx, (2 * left + 1) / W - 1), (2 * (left + w) - 1) / W - 1)
    gy = torch.minimum(torch.maximum(gy, (2 * top + 1) / H - 1), (2 * (top + h) - 1) / H - 1)
    grid = torch.stack([gx.expand(B, S, S), gy.expand(B, S, S)], dim=-1)    # (B, S, S, 2) as (x, y)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, S, S)


# -------------------------------------------------------------------------------------------- colour

def _hue_max_chroma(img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3, H, W) RGB in [0, 1] -> hue in [0, 1) turns, max (= V) and chroma max - min (= V * S),
    each (..., H, W); torchvision's _rgb2hsv math."""
    r, g, b = img.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # torchvision's hue in sixths: (bc - gc), 2 + (rc - bc), 4 + (gc - rc) with xc = (max - x) / chroma,
    # i.e. offset + (g - b, b - r or r - g) / chroma; one division instead of three.
    is_r, is_g = maxc == r, maxc == g
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    # Guard the division: achromatic pixels get hue 0 (num is 0 there), as in torchvision.
    h = offset + num / torch.where(chroma == 0, 1.0, chroma)
    return torch.remainder(h / 6.0, 1.0), maxc, chroma


def _hue_to_rgb(h: Tensor, v: Tensor, chroma: Tensor) -> Tensor:
    """Inverse of _hue_max_chroma, (..., H, W) x 3 -> (..., 3, H, W). Branch-free form of the piecewise
    HSV->RGB formula (same values as torchvision's _hsv2rgb, without its one-hot einsum): channel
    n in (R, G, B) = (5, 3, 1) is v - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6."""
    h, v, chroma = h.unsqueeze(-3), v.unsqueeze(-3), chroma.unsqueeze(-3)
    n = torch.arange(5.0, 0.0, -2.0, dtype=h.dtype, device=h.device).view(3, 1, 1)   # (5, 3, 1), made on the device
    k = torch.remainder(n + 6.0 * h, 6.0)                                  # (..., 3, H, W)
    return v - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _rgb_to_hsv(img: Tensor) -> Tensor:
    """(..., 3, H, W) RGB -> HSV (hue in turns). Saturation is 0 for black, as in torchvision."""
    h, v, chroma = _hue_max_chroma(img)
    return torch.stack([h, chroma / torch.where(v == 0, 1.0, v), v], dim=-3)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(dim=-3)
    return _hue_to_rgb(h, v, v * s)


def _adjust_hue(img: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by shift (B,) turns; torchvision's adjust_hue. V and S (so max and min) are kept, so
    the output stays in [0, 1] and needs no clamp; saturation is never formed explicitly."""
    h, v, chroma = _hue_max_chroma(img)                                    # (B, H, W) each
    return _hue_to_rgb(torch.remainder(h + shift.view(-1, 1, 1), 1.0), v, chroma)


def _sample_jitter(B: int, cfg: AugmentConfig, generator, device) -> tuple[Tensor, Tensor]:
    """Per-sample ColorJitter parameters: factors (B, 4) = (brightness, contrast, saturation, hue shift)
    and the order perm (B, 4) (perm[i, k] = op applied to sample i in round k). Samples outside the
    jitter_p mask get the identity factors (1, 1, 1, 0)."""
    b, c, s, hue = cfg.jitter
    # torchvision: multiplicative factors ~ U(max(0, 1 - v), 1 + v); hue shift ~ U(-hue, hue).
    # Built column by column from Python scalars: a torch.tensor(list, device="cuda") would be a
    # blocking host-to-device copy, i.e. a sync on every call.
    lo = (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue)
    hi = (1 + b, 1 + c, 1 + s, hue)
    identity = (1.0, 1.0, 1.0, 0.0)
    u = rand_uniform((B, 4), generator, device)
    apply = rand_uniform((B,), generator, device) < cfg.jitter_p
    factors = torch.stack([torch.where(apply, lo[i] + (hi[i] - lo[i]) * u[:, i], identity[i]) for i in range(4)], dim=1)
    perm = torch.argsort(rand_uniform((B, 4), generator, device), dim=1)         # a uniform random order per sample
    return factors, perm


def _blend_round(img: Tensor, factors: Tensor, op: Tensor) -> Tensor:
    """One jitter round for the blend ops: sample i gets op[i] in {0: brightness, 1: contrast,
    2: saturation}; any other op value leaves it unchanged (exactly: factor 1).

    All three are torchvision's _blend(img, ref, f) = clamp(f * img + (1 - f) * ref) with ref = 0, the
    mean of the grayscale image, or the grayscale image, so a round is one blend with per-sample (f, ref).
    """
    B = img.shape[0]
    f = torch.where(op < 3, factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1), 1.0).view(B, 1, 1, 1)
    gray = grayscale(img)                                                 # (B, 1, H, W)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)                          # (B, 1, 1, 1)
    op = op.view(B, 1, 1, 1)
    ref = torch.where(op == 1, mean, torch.where(op == 2, gray, 0.0))     # (B, 1, H, W)
    return (f * img + (1.0 - f) * ref).clamp_(0.0, 1.0)


def _color_jitter(img: Tensor, factors: Tensor, perm: Tensor, blend: bool = True, hue: bool = True) -> Tensor:
    """Apply ColorJitter to (B, 3, H, W) in [0, 1], each sample in its own op order perm (B, 4).

    The hue op is ~3x the cost of a blend, so rather than 4 rounds that each compute every op for the
    whole batch, the blend ops before each sample's hue run in 3 rounds, then the hue for all samples
    at once, then the blend ops after it in 3 more rounds (6 blends + 1 hue instead of 4 + 4). Slots a
    sample does not use are exact identities. `blend`/`hue` skip work statically when the config has
    those ranges at zero.
    """
    B = img.shape[0]
    if not hue:
        for k in range(4):
            img = _blend_round(img, factors, perm[:, k])
        return img
    none = torch.full_like(perm[:, 0], 3)                                  # "no blend op" (hue's index)
    hue_at = torch.argsort(perm, dim=1)[:, 3]                              # (B,) position of hue in the order
    if blend:
        for k in range(3):                                                 # ops before the hue
            img = _blend_round(img, factors, torch.where(hue_at > k, perm[:, k], none))
    shift = factors[:, 3]
    img = torch.where((shift != 0).view(B, 1, 1, 1), _adjust_hue(img, shift), img)
    if blend:
        for k in range(3):                                                 # ops after the hue
            j = hue_at + 1 + k                                             # (B,) slot in the order
            op = perm.gather(1, j.clamp(max=3).unsqueeze(1)).squeeze(1)
            img = _blend_round(img, factors, torch.where(j < 4, op, none))
    return img


# ---------------------------------------------------------------------------------------------- blur

def _blur_kernel_size(out_size: int, frac: float) -> int:
    k = int(frac * out_size)
    k = max(3, k if k % 2 == 1 else k + 1)
    return min(k, 2 * out_size - 1)        # reflect padding needs pad < side


def _gaussian_blur(img: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with per-sample sigma (B,), reflect padding (torchvision's
    gaussian_blur), as two depthwise convs with the batch folded into the channels."""
    B, C, H, W = img.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=img.device, dtype=img.dtype)
    kernel = torch.exp(-0.5 * (x / sigma.view(B, 1)) ** 2)                 # (B, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, k)
    p = kernel_size // 2
    out = F.pad(img.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    out = F.conv2d(out, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)   # along W
    out = F.conv2d(out, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)   # along H
    return out.view(B, C, H, W)


# ------------------------------------------------------------------------------------------ public API

def _to_unit_float(x: Tensor) -> Tensor:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.is_floating_point():              # already in [0, 1]
        return x.float()
    raise ValueError(f"images must be uint8 (or float in [0, 1]), got {x.dtype}")


@functools.lru_cache(maxsize=32)
def _stats_on(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached so that sequences become device tensors once, not with a blocking copy on every call.
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(v <= 0 for v in std):
        raise ValueError(f"std must be positive, got {std!r}")
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))


def _normalize(img: Tensor, mean, std, out_dtype: torch.dtype, channels_last: bool) -> Tensor:
    if isinstance(mean, Tensor) or isinstance(std, Tensor):   # pass these on img's device to avoid a copy
        mean = torch.as_tensor(mean, dtype=torch.float32, device=img.device)
        std = torch.as_tensor(std, dtype=torch.float32, device=img.device)
        if mean.numel() != 3 or std.numel() != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean.numel()} and {std.numel()}")
        mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    else:
        mean, std = _stats_on(tuple(float(v) for v in mean), tuple(float(v) for v in std), img.device)
    out = ((img - mean) / std).to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augment_batch(
    x: Tensor, cfg: AugmentConfig, out_size: int, mean: Tensor | Sequence[float], std: Tensor | Sequence[float],
    generator: torch.Generator | None = None, out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
    rows: slice | None = None,
) -> Tensor:
    """One augmented view of a (B, 3, H, W) uint8 batch -> (B, 3, out_size, out_size) normalised out_dtype.

    rows: augment and return only these rows (a process's share of a global batch), with the random draws of
    the whole batch, so they equal the same rows of the whole batch's views at a fraction of the work.

    mean/std are on the [0, 1] scale (e.g. CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616)).
    All randomness comes from `generator`, always in the same amount for a given B, so the config never
    shifts the stream; the one exception is RandAugment, which when on (randaugment_ops = N > 0) draws
    2 N more uniforms per sample after all the others and runs last, just before normalisation (see
    fastmice.views.randaugment for its own differences from torchvision). Nothing here syncs the host with the
    device as long as the generator (and mean/std, if tensors) are on x.device; a generator on another
    device works but its draws are copied over.

    Deliberate differences from torchvision:
    - Parameters are per sample (torchvision draws them per call, i.e. per image in a DataLoader, so the
      distribution is the same) and from our generator, so streams differ from torchvision's.
    - The crop box is resampled with plain bilinear interpolation, no antialiasing. torchvision's PIL
      path always antialiases when shrinking; its tensor path did not by default in v0.14 (antialias=None)
      and does now (the documented default is antialias=True; the switch came in v0.17 as far as we know).
      This only matters when the box is larger than out_size (e.g. 32 -> 24, or STL-10 96 -> 64): 32x32
      CIFAR crops resized back to 32 never shrink, and there the result equals F.interpolate of the
      cropped tensor (edge pixels clamped to the box, not blended with pixels outside it).
    - The horizontal flip is folded into the crop's resampling, i.e. done first. For order="simclr" that
      is torchvision's place for it. For order="moco" torchvision flips last, after grayscale and jitter;
      that is equivalent because those ops act per pixel (contrast's global mean is flip-invariant).
      RandAugment (not per pixel) always comes after the flip, as in crop, flip, RandAugment pipelines.
    - Grayscale uses the ITU-R 601 weights (0.299, 0.587, 0.114) like PIL; torchvision's tensor path
      uses 0.2989 for red.
    """
    cfg.validate()
    if not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")
    B, _, H, W = x.shape
    device = x.device
    part = rows if rows is not None else slice(None)
    img = _to_unit_float(x[part])                                         # (b, 3, H, W) float32 in [0, 1]

    # Draw every random quantity up front for the whole batch, in a fixed order and amount; keep `rows`'.
    top, left, h, w = (t[part] for t in
                       sample_crop_boxes(B, H, W, cfg.crop_scale, cfg.crop_ratio, generator, device=device))
    coins = rand_uniform((B, 4), generator, device)[part]                       # flip, grayscale, blur, sigma
    flip = coins[:, 0] < cfg.flip_p       # folded into the crop: colour ops are per pixel, so flip order is free
    gray_on = (coins[:, 1] < cfg.grayscale_p).view(-1, 1, 1, 1)
    blur_on = (coins[:, 2] < cfg.blur_p).view(-1, 1, 1, 1)
    sigma = _BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * coins[:, 3]
    factors, perm = (t[part] for t in _sample_jitter(B, cfg, generator, device))

    img = _resized_crop(img, top, left, h, w, flip, out_size)             # (B, 3, S, S)

    def maybe_gray(t: Tensor) -> Tensor:
        return torch.where(gray_on, grayscale(t).expand_as(t), t) if cfg.grayscale_p > 0 else t

    def jitter(t: Tensor) -> Tensor:
        blend, hue = any(v > 0 for v in cfg.jitter[:3]), cfg.jitter[3] > 0
        if cfg.jitter_p == 0 or not (blend or hue):
            return t
        return _color_jitter(t, factors, perm, blend=blend, hue=hue)

    if cfg.order == "moco":
        img = jitter(maybe_gray(img))
    else:
        img = maybe_gray(jitter(img))
        if cfg.blur_p > 0 and out_size > 1:
            k = _blur_kernel_size(out_size, cfg.blur_kernel_frac)
            img = torch.where(blur_on, _gaussian_blur(img, sigma, k), img)
    if cfg.randaugment_ops > 0:            # its draws come after all of the above: off leaves the stream as is
        img = rand_augment(img, cfg.randaugment_ops, cfg.randaugment_magnitude, generator, num_bins=_RA_BINS,
                           rows=(B, part))
    return _normalize(img, mean, std, out_dtype, channels_last)


def normalize_batch(
    x: Tensor, mean: Tensor | Sequence[float], std: Tensor | Sequence[float], out_size: int | None = None,
    out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
) -> Tensor:
    """The evaluation transform: optional bilinear (antialiased) resize of the whole image, then normalise."""
    img = _to_unit_float(x)                                               # (B, 3, H, W)
    if out_size is not None and tuple(img.shape[-2:]) != (out_size, out_size):
        img = F.interpolate(img, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
        img = img.clamp_(0.0, 1.0)         # bilinear cannot overshoot, but the antialias path may by float error
    return _normalize(img, mean, std, out_dtype, channels_last)


def make_views(
    x: Tensor, cfgs: list[AugmentConfig] | AugmentConfig, n_views: int, out_size: int,
    mean: Tensor | Sequence[float], std: Tensor | Sequence[float], generator: torch.Generator | None = None,
    out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
) -> list[Tensor]:
    """n_views independent augmentations of the same batch (MiCE: 3 for x_f, x_v, x_g; SimCLR: 2),
    one augment_batch call each, in order, with the same generator. `cfgs` is one config for all
    views or one per view."""
    if isinstance(cfgs, AugmentConfig):
        cfgs = [cfgs] * n_views
    if len(cfgs) != n_views:
        raise ValueError(f"got {len(cfgs)} configs for {n_views} views")
    return [augment_batch(x, c, out_size, mean, std, generator, out_dtype, channels_last) for c in cfgs]
