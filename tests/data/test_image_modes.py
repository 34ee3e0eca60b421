"""to_rgb_uint8 for every Pillow mode: images with known pixels, written to a file where the mode can be saved
and read back, compared with values worked out by hand (in the comments)."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from fastmice.data.folder import decode_image as decode_file
from fastmice.data.image_modes import to_rgb_image, to_rgb_uint8


def roundtrip(im: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def png_bytes(w: int, h: int, depth: int, color_type: int, rows: list[bytes], extra: bytes = b"") -> bytes:
    """A PNG written by hand (for depths and colour types Pillow cannot write itself)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def open_bytes(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def grey(*levels: int) -> np.ndarray:
    """The expected (1, N, 3) array of grey levels."""
    return np.repeat(np.array([levels], dtype=np.uint8)[..., None], 3, axis=2)


def check(out: np.ndarray, expected) -> None:
    expected = np.asarray(expected, dtype=np.uint8)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    np.testing.assert_array_equal(out, expected)


# ---- 16-bit and deep images -------------------------------------------------------------------------------

SIXTEEN = [0, 257, 1000, 32768, 61380, 65535]
# round(v / 257): 0, 1, 3.89 -> 4, 127.5 -> 128, 238.83 -> 239, 255
SIXTEEN_8 = [0, 1, 4, 128, 239, 255]


def test_i16_png_from_the_issue_is_scaled_not_saturated():
    """Bug 4: a 16-bit grey PNG (values 0-61380); convert("RGB") saturated almost all of it."""
    values = np.linspace(0, 61380, 200).astype(np.uint16).reshape(10, 20)
    im = open_bytes(png_bytes(20, 10, 16, 0, [r.astype(">u2").tobytes() for r in values]))
    assert im.mode == "I;16"
    old = np.asarray(im.convert("RGB"))
    assert (old == 255).mean() > 0.98                          # the bug, as reported
    out = to_rgb_uint8(im)
    expected = (values.astype(np.int64) * 255 + 32767) // 65535
    check(out, np.repeat(expected[..., None], 3, axis=2))
    assert out.max() == 239 and (out == 255).sum() == 0


def test_i16_png_hand_values():
    im = roundtrip(Image.fromarray(np.array([SIXTEEN], dtype=np.uint16)), "PNG")
    assert im.mode == "I;16"
    check(to_rgb_uint8(im), grey(*SIXTEEN_8))


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_i16_variants_through_tiff(mode, dtype):
    im = Image.frombytes(mode, (len(SIXTEEN), 1), np.array(SIXTEEN, dtype=dtype).tobytes())
    back = roundtrip(im, "TIFF")
    assert back.mode in ("I;16", "I;16B")                      # TIFF reads I;16L back as I;16
    check(to_rgb_uint8(back), grey(*SIXTEEN_8))
    check(to_rgb_uint8(im), grey(*SIXTEEN_8))                   # and in memory, before the round trip


def test_i16_colour_key_composites_when_asked():
    """A 16-bit grey PNG with a tRNS colour key (value 257): drop keeps the level, black/white replace it."""
    data = png_bytes(2, 1, 16, 0, [np.array([257, 61380], dtype=">u2").tobytes()],
                     png_chunk(b"tRNS", struct.pack(">H", 257)))
    im = open_bytes(data)
    assert im.mode == "I;16" and im.info["transparency"] == 257
    check(to_rgb_uint8(im), grey(1, 239))
    check(to_rgb_uint8(im, alpha="black"), grey(0, 239))
    check(to_rgb_uint8(im, alpha="white"), grey(255, 239))


def test_mode_i_within_16_bits_scales_as_16_bit():
    im = roundtrip(Image.fromarray(np.array([SIXTEEN], dtype=np.int32), "I"), "TIFF")
    assert im.mode == "I"
    check(to_rgb_uint8(im), grey(*SIXTEEN_8))


def test_mode_i_beyond_16_bits_is_stretched_over_its_range():
    # min -1000, max 99000: (v + 1000) / 100000 * 255 -> 0, 2.55 -> 3, 127.5 -> 128, 255
    im = roundtrip(Image.fromarray(np.array([[-1000, 0, 49000, 99000]], dtype=np.int32), "I"), "TIFF")
    check(to_rgb_uint8(im), grey(0, 3, 128, 255))
    flat = Image.fromarray(np.full((1, 3), 70000, dtype=np.int32), "I")
    check(to_rgb_uint8(flat), grey(0, 0, 0))                    # a constant image: 0, no division by zero


def test_float_in_unit_range_scales_by_255():
    # 0.5 * 255 = 127.5 -> 128; 0.25 * 255 = 63.75 -> 64; 0.002 * 255 = 0.51 -> 1
    im = roundtrip(Image.fromarray(np.array([[0.0, 0.002, 0.25, 0.5, 1.0]], dtype=np.float32), "F"), "TIFF")
    assert im.mode == "F"
    check(to_rgb_uint8(im), grey(0, 1, 64, 128, 255))


def test_float_8_bit_levels_are_rounded():
    im = roundtrip(Image.fromarray(np.array([[0.0, 1.5, 2.4, 254.6, 255.0]], dtype=np.float32), "F"), "TIFF")
    check(to_rgb_uint8(im), grey(0, 2, 2, 255, 255))


def test_float_other_range_is_stretched_and_non_finite_handled():
    # finite range -2..2: (v + 2) / 4 * 255 -> 0, 63.75 -> 64, 127.5 -> 128, 255; nan -> 0, inf -> 255
    a = np.array([[-2.0, -1.0, 0.0, 2.0, np.nan, np.inf, -np.inf]], dtype=np.float32)
    check(to_rgb_uint8(Image.fromarray(a, "F")), grey(0, 64, 128, 255, 0, 255, 0))
    # non-finite values do not widen the range: [0, 1] finite -> scaled by 255
    b = np.array([[0.0, 0.5, np.nan, np.inf]], dtype=np.float32)
    check(to_rgb_uint8(Image.fromarray(b, "F")), grey(0, 128, 0, 255))
    check(to_rgb_uint8(Image.fromarray(np.full((1, 2), np.nan, np.float32), "F")), grey(0, 0))


def test_48_bit_png_is_what_pillow_gives():
    """Pillow reads a 16-bit-per-channel RGB PNG as mode RGB keeping the high byte (v >> 8)."""
    px = np.array([[[0, 257, 65535], [61380, 32768, 1000]]], dtype=">u2")
    im = open_bytes(png_bytes(2, 1, 16, 2, [px[0].tobytes()]))
    assert im.mode == "RGB"
    check(to_rgb_uint8(im), [[[0, 1, 255], [239, 128, 3]]])


def test_64_bit_rgba_and_32_bit_la_pngs():
    rgba = open_bytes(png_bytes(1, 1, 16, 6, [np.array([1000, 65535, 61380, 32768], ">u2").tobytes()]))
    assert rgba.mode == "RGBA"                                 # 8-bit after Pillow: (3, 255, 239, 128)
    check(to_rgb_uint8(rgba), [[[3, 255, 239]]])
    # composite on black: round(c * 128 / 255): 3 -> 1.51 -> 2, 255 -> 128, 239 -> 119.97 -> 120
    check(to_rgb_uint8(rgba, alpha="black"), [[[2, 128, 120]]])
    la = open_bytes(png_bytes(2, 1, 16, 4, [np.array([1000, 65535, 61380, 32768], ">u2").tobytes()]))
    assert la.mode == "RGBA"                                   # Pillow reads 16-bit grey+alpha as RGBA
    check(to_rgb_uint8(la), grey(3, 239))


# ---- 8-bit modes ------------------------------------------------------------------------------------------

def test_mode_1():
    im = roundtrip(Image.fromarray(np.array([[0, 1, 1, 0]], dtype=bool)), "PNG")
    assert im.mode == "1"
    check(to_rgb_uint8(im), grey(0, 255, 255, 0))


def test_mode_l():
    im = roundtrip(Image.fromarray(np.array([[0, 7, 128, 255]], dtype=np.uint8), "L"), "PNG")
    check(to_rgb_uint8(im), grey(0, 7, 128, 255))


def test_low_depth_grey_pngs():
    two = open_bytes(png_bytes(4, 1, 2, 0, [bytes([0b00011011])]))   # levels 0..3 -> x 85
    check(to_rgb_uint8(two), grey(0, 85, 170, 255))
    four = open_bytes(png_bytes(2, 1, 4, 0, [bytes([0x0F])]))        # levels 0, 15 -> x 17
    check(to_rgb_uint8(four), grey(0, 255))


def palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([200, 100, 50, 10, 20, 30, 255, 255, 255])
    im.putdata([0, 1, 2])
    return im


def test_palette_without_transparency():
    im = roundtrip(palette_image(), "PNG")
    assert im.mode == "P" and "transparency" not in im.info
    check(to_rgb_uint8(im), [[[200, 100, 50], [10, 20, 30], [255, 255, 255]]])


def test_palette_with_trns_bytes():
    im = roundtrip(palette_image(), "PNG", transparency=bytes([128, 0, 255]))
    assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # Pillow's convert("RGB") warns here; we must not
        drop, black, white = (to_rgb_uint8(im, a) for a in ("drop", "black", "white"))
    check(drop, [[[200, 100, 50], [10, 20, 30], [255, 255, 255]]])
    # alpha 128: round(200 * 128 / 255) = round(100.39) = 100, 100 -> 50.2 -> 50, 50 -> 25.1 -> 25; alpha 0: bg
    check(black, [[[100, 50, 25], [0, 0, 0], [255, 255, 255]]])
    # white: round((200 * 128 + 255 * 127) / 255) = round(227.39) = 227, 100 -> 177.2 -> 177, 50 -> 152.1 -> 152
    check(white, [[[227, 177, 152], [255, 255, 255], [255, 255, 255]]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(drop, np.asarray(im.convert("RGB")))   # drop = the old pixels


def test_gif_transparent_index():
    im = roundtrip(palette_image(), "GIF", transparency=1)
    assert im.info["transparency"] == 1
    check(to_rgb_uint8(im), [[[200, 100, 50], [10, 20, 30], [255, 255, 255]]])
    check(to_rgb_uint8(im, alpha="white"), [[[200, 100, 50], [255, 255, 255], [255, 255, 255]]])


def test_la():
    im = roundtrip(Image.fromarray(np.array([[[200, 128], [90, 0], [30, 255]]], dtype=np.uint8), "LA"), "PNG")
    assert im.mode == "LA"
    check(to_rgb_uint8(im), grey(200, 90, 30))
    check(to_rgb_uint8(im, alpha="black"), grey(100, 0, 30))    # 200 * 128 / 255 = 100.39 -> 100


def test_rgba():
    px = np.array([[[200, 100, 50, 128], [1, 2, 3, 0], [9, 8, 7, 255]]], dtype=np.uint8)
    im = roundtrip(Image.fromarray(px, "RGBA"), "PNG")
    check(to_rgb_uint8(im), px[..., :3])                       # drop: what convert("RGB") gives
    np.testing.assert_array_equal(to_rgb_uint8(im), np.asarray(im.convert("RGB")))
    check(to_rgb_uint8(im, alpha="black"), [[[100, 50, 25], [0, 0, 0], [9, 8, 7]]])
    check(to_rgb_uint8(im, alpha="white"), [[[227, 177, 152], [255, 255, 255], [9, 8, 7]]])


def test_rgb_colour_key():
    data = png_bytes(2, 1, 8, 2, [bytes([10, 20, 30, 40, 50, 60])], png_chunk(b"tRNS", struct.pack(">HHH", 10, 20, 30)))
    im = open_bytes(data)
    assert im.mode == "RGB" and im.info["transparency"] == (10, 20, 30)
    check(to_rgb_uint8(im), [[[10, 20, 30], [40, 50, 60]]])
    check(to_rgb_uint8(im, alpha="black"), [[[0, 0, 0], [40, 50, 60]]])


def test_premultiplied_and_padded_modes():
    # La: l = 50 premultiplied by alpha 128 -> un-premultiplied 50 * 255 / 128 = 99.6 (Pillow: 99)
    la = Image.frombytes("La", (2, 1), bytes([50, 128, 200, 255]))
    check(to_rgb_uint8(la), grey(99, 200))
    rgba_pre = Image.frombytes("RGBa", (1, 1), bytes([100, 50, 0, 128]))
    check(to_rgb_uint8(rgba_pre), [[[199, 99, 0]]])
    pa = roundtrip(Image.frombytes("PA", (1, 1), bytes([0, 128])), "TIFF")
    assert pa.mode == "PA"
    check(to_rgb_uint8(pa), [[[0, 0, 0]]])
    check(to_rgb_uint8(Image.frombytes("RGBX", (1, 1), bytes([1, 2, 3, 4]))), [[[1, 2, 3]]])


def test_cmyk():
    px = bytes([255, 0, 0, 0, 0, 0, 0, 128, 0, 0, 0, 255, 0, 255, 0, 0])
    im = roundtrip(Image.frombytes("CMYK", (4, 1), px), "TIFF")
    assert im.mode == "CMYK"
    # (255 - K) * (1 - C/255) per channel: cyan -> (0, 255, 255); K=128 -> 127; K=255 -> 0; magenta -> G=0
    check(to_rgb_uint8(im), [[[0, 255, 255], [127, 127, 127], [0, 0, 0], [255, 0, 255]]])


def test_ycbcr():
    im = roundtrip(Image.frombytes("YCbCr", (2, 1), bytes([128, 128, 128, 76, 85, 255])), "TIFF")
    assert im.mode == "YCbCr"
    # JFIF: R = Y + 1.402 (Cr - 128) = 76 + 178.05 = 254.05; G = 76 - 0.344 * -43 - 0.714 * 127 = 0.1; B < 0
    check(to_rgb_uint8(im), [[[128, 128, 128], [254, 0, 0]]])


def test_hsv():
    im = Image.frombytes("HSV", (3, 1), bytes([0, 255, 255, 85, 255, 255, 0, 0, 128]))   # not savable
    check(to_rgb_uint8(im), [[[255, 0, 0], [0, 255, 0], [128, 128, 128]]])


def test_lab():
    # L=255 (L*=100), a*=b*=0: white; L=0: black; L=128: L*=50.196, Y=((50.196+16)/116)^3=0.18584,
    # sRGB 1.055 * Y^(1/2.4) - 0.055 = 0.46829 -> 119.4 -> 119; (138, 81, 70) is sRGB red in D50 Lab
    # (L*=54.29, a*=80.8, b*=69.9); (128, -40, 0) is a green-cyan grey: G > R
    px = np.array([[[255, 0, 0], [0, 0, 0], [128, 0, 0], [138, 81, 70], [128, 216, 0]]], dtype=np.uint8)
    im = roundtrip(Image.fromarray(px, "LAB"), "TIFF")
    assert im.mode == "LAB"
    out = to_rgb_uint8(im)
    check(out[:, :3], grey(255, 0, 119))
    assert np.abs(out[0, 3].astype(int) - [255, 0, 0]).max() <= 1
    assert out[0, 4, 1] > out[0, 4, 0] + 30
    assert not np.array_equal(out, np.asarray(im.convert("RGB")))   # Pillow's own LAB -> RGB is wrong


def test_lab_agrees_with_littlecms():
    ImageCms = pytest.importorskip("PIL.ImageCms")
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    try:
        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        to_rgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    except Exception as e:  # noqa: BLE001 - a Pillow built without littlecms
        pytest.skip(f"no littlecms: {e}")
    lab = ImageCms.applyTransform(Image.fromarray(rgb), to_lab)
    ours = to_rgb_uint8(lab).astype(int)
    ref = np.asarray(ImageCms.applyTransform(lab, to_rgb)).astype(int)
    diff = np.abs(ours - ref)
    assert diff.mean() < 1.5 and (diff <= 1).mean() > 0.8
    assert np.abs(ours - rgb).mean() < 1.0                     # the round trip to the original colours


# ---- no behaviour change for ordinary images --------------------------------------------------------------

@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (48, 64, 3)).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_rgb_is_exactly_convert_rgb(noise, fmt):
    im = roundtrip(Image.fromarray(noise), fmt)
    assert im.mode == "RGB"
    assert to_rgb_image(im) is im
    np.testing.assert_array_equal(to_rgb_uint8(im), np.asarray(im.convert("RGB")))
    if fmt in ("PNG", "BMP"):
        np.testing.assert_array_equal(to_rgb_uint8(im), noise)


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "RGBA", "LA", "RGBX"])
def test_8_bit_modes_are_exactly_convert_rgb(noise, mode):
    im = Image.fromarray(noise).convert(mode)
    np.testing.assert_array_equal(to_rgb_uint8(im), np.asarray(im.convert("RGB")))


def old_decode(path, size):
    """fastmice.data.folder's decoder as of d7a9124 (convert("RGB")), the reference for decode_image."""
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (size, size))
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        if size is not None and (w, h) != (size, size):
            c = min(w, h)
            left, top = (w - c) / 2, (h - c) / 2
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + c, top + c))
        return np.asarray(im)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "P"),
                                      ("PNG", "RGBA")])
@pytest.mark.parametrize("size", [None, 32, 20])
def test_decode_file_matches_the_old_decoder(tmp_path, noise, fmt, mode, size):
    path = tmp_path / f"x.{fmt.lower()}"
    big = np.kron(noise, np.ones((2, 2, 1), np.uint8))         # 96 x 128: the JPEG draft path is taken
    Image.fromarray(big).convert(mode).save(path, format=fmt)
    np.testing.assert_array_equal(decode_file(path, size), old_decode(path, size))
    assert decode_file(path, size).shape == ((96, 128, 3) if size is None else (size, size, 3))


def test_decode_file_scales_16_bit(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 30), 61380, np.uint16)).save(path)
    out = decode_file(path, 16)
    assert out.shape == (16, 16, 3) and (out == 239).all()
    assert (old_decode(path, 16) == 255).all()


def test_bad_alpha_and_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="alpha must be one of"):
        to_rgb_uint8(Image.new("RGB", (1, 1)), alpha="grey")


def test_every_pillow_mode_gives_uint8_rgb():
    for mode in getattr(Image, "MODES", []):
        out = to_rgb_uint8(Image.new(mode, (3, 2)))
        assert out.shape == (2, 3, 3) and out.dtype == np.uint8, mode
