"""Every Pillow image mode to 8-bit RGB, with deep and float images scaled rather than clipped.

``Image.convert("RGB")`` is right for the 8-bit modes but clips everything else to 0..255: a 16-bit PNG
(mode ``I;16``, values up to 65535) comes out almost all white, a float image in [0, 1] almost all black,
and Pillow's ``LAB -> RGB`` is not a colour conversion at all (L=100, a=b=0, i.e. white, gives (0, 255, 255)).
:func:`to_rgb_image` / :func:`to_rgb_uint8` convert each mode as follows (``v`` a pixel value):

============================  =========================================================================
mode                          conversion
============================  =========================================================================
RGB                           unchanged (the same object / ``np.asarray(im)``)
1, L, P, RGBX, YCbCr, CMYK,   ``im.convert("RGB")``, exactly as before (CMYK with Pillow's formula
HSV                           ``(255 - K) * (1 - C/255)``, no ICC profile; YCbCr with JFIF's full-range
                              matrix)
RGBA, LA, PA, La, RGBa; P,    alpha per ``alpha=`` below (premultiplied La/RGBa un-premultiplied first);
L, RGB with a                 "drop" (the default) gives the same pixels as ``im.convert("RGB")``, without
``transparency``              Pillow's "Palette images with Transparency" ``UserWarning``
I;16, I;16B, I;16L, I;16N     16-bit: ``round(v * 255 / 65535)`` = ``round(v / 257)``: 257 -> 1,
                              61380 -> 239, 65535 -> 255. The container's depth is the scale: 12-bit data
                              stored in 16 bits (max 4095) comes out dark, because Pillow does not expose
                              PNG's sBIT chunk and a per-image stretch would change the brightness of each
                              image differently.
I (32-bit signed)             all values in 0..65535: as 16-bit above (Pillow < 10 read 16-bit PNGs as
                              ``I``, so that is what such an image most likely is). Otherwise (negative
                              values, or above 65535: a 32-bit TIFF whose depth is unknown) the image's own
                              range is stretched: ``round((v - min) / (max - min) * 255)``; a constant image
                              gives 0.
F (32-bit float)              non-finite values are excluded from the range; then all finite values in
                              [0, 1] (the float convention of numpy/torchvision/scikit-image):
                              ``round(v * 255)``; else all in [0, 255] (8-bit levels held as floats, e.g.
                              ``L`` converted to ``F``): ``round(v)``; else the min-max stretch as for ``I``.
                              NaN and -inf give 0, +inf gives 255.
LAB                           CIELAB to sRGB as ICC colour management does it: Lab relative to the D50
                              white (the ICC convention, Photoshop's Lab TIFFs, and ``ImageCms``'s LAB),
                              Bradford-adapted to sRGB's D65, so a* = b* = 0 is neutral grey. Pillow's
                              encoding (TIFF CIELab's and ``ImageCms``'s): L* = L * 100 / 255, a* and b*
                              the bytes read as signed 8-bit integers. Pure numpy (no littlecms needed);
                              on random colours within one level of ``ImageCms``'s LAB -> sRGB for most
                              pixels (mean difference about 1; dark saturated colours differ more, both
                              being limited by 8-bit Lab's quantisation).
============================  =========================================================================

Rounding is half up (``floor(x + 0.5)``) throughout.

Alpha (``alpha=``), for every mode with an alpha band or a ``transparency`` entry in ``im.info`` (a palette
with a PNG ``tRNS`` chunk or a GIF transparent index, a grey or RGB colour key):

* ``"drop"`` (default): the colour stored under each pixel, alpha ignored. That is what ``convert("RGB")``
  and therefore torchvision's ``ImageFolder`` loader (and this project's decoder so far) do, so existing
  datasets with alpha keep their exact pixels and results stay comparable with the reference
  implementations.
* ``"black"`` / ``"white"``: composite over that background, ``round((c * a + bg * (255 - a)) / 255)``, for
  data where transparent pixels hold arbitrary colours (e.g. icons, cut-out objects).

Deep images with alpha: Pillow itself reduces 16-bit LA/RGBA and 48-bit RGB PNGs to 8 bits on reading (mode
``RGBA``/``RGB``, keeping the high byte: ``v >> 8``; 1000 -> 3 where ``round(v / 257)`` would give 4), so
those arrive here already 8-bit and are converted as 8-bit images; the difference from the rounding above
is at most one level.

The result of :func:`to_rgb_image` is a mode ``RGB`` image, to be resized like any other; resize after the
conversion, as the project's decoder does, so the interpolation works on the 8-bit values it always has.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["ALPHA_CHOICES", "decode_file", "to_rgb_image", "to_rgb_uint8"]

ALPHA_CHOICES = ("drop", "black", "white")

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_PLAIN = ("1", "L", "P", "RGBX", "YCbCr", "CMYK", "HSV")   # convert("RGB") is right for these
_WITH_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
_D50 = (0.96422, 1.0, 0.82521)                          # the ICC profile connection space's white
_XYZ_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314],     # linear sRGB from XYZ (D65)
                         [-0.9692660, 1.8760108, 0.0415560],
                         [0.0556434, -0.2040259, 1.0572252]])
_BRADFORD_D50_TO_D65 = np.array([[0.9555766, -0.0230393, 0.0631636],
                                 [-0.0282895, 1.0099416, 0.0210077],
                                 [0.0122982, -0.0204830, 1.3299098]])
_D50_LAB_TO_SRGB = _XYZ_TO_SRGB @ _BRADFORD_D50_TO_D65


def to_rgb_uint8(im: Image.Image, alpha: str = "drop") -> np.ndarray:
    """(H, W, 3) uint8 of ``im``, any Pillow mode, converted as the module docstring's table says.

    For a mode RGB image this is exactly ``np.asarray(im.convert("RGB"))`` (bit for bit), and so it is for
    the other 8-bit modes listed as ``convert("RGB")`` there. Raises ``ValueError`` for an unknown ``alpha``
    and for a mode Pillow cannot convert (naming the mode)."""
    return np.asarray(to_rgb_image(im, alpha))


def to_rgb_image(im: Image.Image, alpha: str = "drop") -> Image.Image:
    """``im`` as a mode ``RGB`` image (``im`` itself when it already is one), per the module docstring.

    Loads the image (a lazily opened file is decoded here). Never emits Pillow's transparency warning."""
    if alpha not in ALPHA_CHOICES:
        raise ValueError(f"alpha must be one of {ALPHA_CHOICES}, got {alpha!r}")
    mode = im.mode
    if mode == "RGB" and (alpha == "drop" or "transparency" not in im.info):
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        levels = _scale_deep(np.asarray(im), mode)
        if alpha != "drop" and "transparency" in im.info and mode != "F":
            keyed = np.asarray(im) == im.info["transparency"]     # a grey colour key (PNG tRNS on 16-bit grey)
            levels = np.where(keyed, _background(alpha), levels).astype(np.uint8)
        return Image.fromarray(np.repeat(levels[..., None], 3, axis=2), "RGB")
    if mode == "LAB":
        return Image.fromarray(_lab_to_srgb(np.asarray(im)), "RGB")
    if mode == "La":
        im, mode = im.convert("LA"), "LA"        # un-premultiply; Pillow converts La to nothing else
    has_alpha = mode in _WITH_ALPHA or "transparency" in im.info
    if not has_alpha:
        if mode not in _PLAIN:
            raise ValueError(f"image mode {mode!r} is not supported (supported: RGB, {', '.join(_PLAIN)}, "
                             f"{', '.join(_WITH_ALPHA)}, LAB, I, F, {', '.join(_SIXTEEN_BIT)})")
        return im.convert("RGB")
    rgba = np.asarray(im if mode == "RGBA" else im.convert("RGBA"))   # palette/colour key -> alpha here
    if alpha == "drop":
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")
    a = rgba[..., 3:].astype(np.uint32)
    mixed = rgba[..., :3].astype(np.uint32) * a + _background(alpha) * (255 - a)
    return Image.fromarray(((mixed + 127) // 255).astype(np.uint8), "RGB")


def _background(alpha: str) -> int:
    return 0 if alpha == "black" else 255


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def _scale_deep(a: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) uint8 levels of a 16-bit, 32-bit integer or float single-band image."""
    if mode in _SIXTEEN_BIT:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)   # exact integer rounding
    if mode == "I":
        a = a.astype(np.int64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return ((a * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(a.astype(np.float64), np.ones(a.shape, bool))
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        out = np.zeros(a.shape, np.uint8)
    else:
        lo, hi = a[finite].min(), a[finite].max()
        if lo >= 0.0 and hi <= 1.0:
            out = _round_half_up(np.where(finite, a, 0.0) * 255.0).astype(np.uint8)
        elif lo >= 0.0 and hi <= 255.0:
            out = _round_half_up(np.where(finite, a, 0.0)).astype(np.uint8)
        else:
            out = _stretch(a, finite)
    out[np.isposinf(a)] = 255
    out[np.isnan(a) | np.isneginf(a)] = 0
    return out


def _stretch(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Min-max stretch of the valid values to 0..255; a constant image gives 0."""
    if not valid.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[valid].min(), a[valid].max()
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    scaled = (np.where(valid, a, lo) - lo) / (hi - lo) * 255.0
    return _round_half_up(scaled).astype(np.uint8)


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 LAB in Pillow's encoding (signed a*, b*), D50 white, to sRGB (Bradford-adapted to
    D65, as ICC colour management does); out-of-gamut colours clipped."""
    L = lab[..., 0].astype(np.float64) * (100.0 / 255.0)
    ab = np.ascontiguousarray(lab[..., 1:]).view(np.int8).astype(np.float64)   # signed a*, b*
    fy = (L + 16.0) / 116.0
    fx = fy + ab[..., 0] / 500.0
    fz = fy - ab[..., 1] / 200.0
    eps, kappa = 216.0 / 24389.0, 24389.0 / 27.0

    def f_inv(t: np.ndarray) -> np.ndarray:
        return np.where(t ** 3 > eps, t ** 3, (116.0 * t - 16.0) / kappa)

    y = np.where(L > kappa * eps, fy ** 3, L / kappa)
    xyz = np.stack([f_inv(fx) * _D50[0], y * _D50[1], f_inv(fz) * _D50[2]], axis=-1)
    lin = np.clip(xyz @ _D50_LAB_TO_SRGB.T, 0.0, 1.0)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.power(lin, 1.0 / 2.4) - 0.055)
    return _round_half_up(np.clip(srgb, 0.0, 1.0) * 255.0).astype(np.uint8)
