"""The DALI data path (fastmice.views.dali), in DALI's CPU mode (device_id=None) and, where a CUDA GPU
is present, on GPU 0 too (tests marked "gpu": "mixed" nvJPEG decoding and the GPU operators).

Distribution checks feed special images whose output reveals the parameters drawn: a horizontal
gradient (flip), a colourful image (grayscale), constant grey (brightness), two-level stripes
(contrast), one colour (hue, as a rotation in YIQ), alternating columns (blur sigma) and an image whose
red/green channels encode the x/y coordinates (the crop box). The whole module skips without DALI.
"""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from PIL import Image  # noqa: E402

from fastmice.views import augment  # noqa: E402
from fastmice.views.augment import MOCO_V1, SIMCLR, AugmentConfig, sample_crop_boxes  # noqa: E402
from fastmice.views.dali import (DaliBatch, blur_kernel_size, dali_available, dali_file_loader,  # noqa: E402
                                dali_memory_loader)
from fastmice.data.folder import list_folder_images  # noqa: E402

from tests.helpers import CIFAR10_JPEG  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))     # output * 255 = pixel value
# The full image, resampled 1:1, nothing else: views equal the input.
IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), grayscale_p=0.0, jitter=(0, 0, 0, 0),
                         jitter_p=0.0, flip_p=0.0)
CPU = dict(device_id=None, num_threads=2)
# Distribution checks run in DALI's CPU mode, and also on GPU 0 where there is one (the "gpu" marker).
DEVICES = [pytest.param(None, id="cpu"), pytest.param(0, id="gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def only(**kw) -> AugmentConfig:
    """IDENTITY with some fields changed."""
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), grayscale_p=0.0, jitter=(0, 0, 0, 0), jitter_p=1.0,
                flip_p=0.0)
    base.update(kw)
    return AugmentConfig(**base)


def copies(img_hwc: np.ndarray, n: int = 256) -> torch.Tensor:
    """n copies of one (H, W, 3) uint8 image as (n, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(img_hwc)).permute(2, 0, 1)
    return x.unsqueeze(0).expand(n, -1, -1, -1).contiguous()


def sample_views(img_hwc: np.ndarray, cfg: AugmentConfig, epochs: int = 2, views: int = 4, size: int | None = None,
                 device_id: int | None = None, **kw) -> torch.Tensor:
    """Pixel values (0..255 scale, float64, on the CPU) of views of one image: (epochs * 256 * views, 3, S, S)."""
    size = size or img_hwc.shape[0]
    loader = dali_memory_loader(copies(img_hwc), batch_size=128, crop_size=size, num_views=views, augment=cfg,
                                seed=kw.pop("seed", 0), device_id=device_id, num_threads=2, **RAW, **kw)
    out = [v.cpu() for _ in range(epochs) for b in loader for v in b.views]
    return torch.cat(out).double() * 255.0


def rate_ok(frac: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(frac - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled ImageFolder of 15 PNGs (3 classes x 5, sizes vary) with their pixels."""
    root = tmp_path_factory.mktemp("dali_folder")
    rng = np.random.default_rng(0)
    pixels = {}
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir()
        for i in range(5):
            h, w = 16 + 2 * i, 16 + i
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / name / f"{i:02d}.png"
            Image.fromarray(arr).save(path)
            pixels[str(path)] = arr
    return root, pixels


# ------------------------------------------------------------------------------------------ plumbing

def test_dali_available():
    assert dali_available()


def test_file_loader_shapes_labels_and_epochs(folder):
    root, _ = folder
    files, labels, classes = list_folder_images([root.resolve()], None)
    loader = dali_file_loader(root, batch_size=4, crop_size=12, num_views=3, mean=CIFAR_MEAN, std=CIFAR_STD,
                              seed=1, **CPU)
    assert loader.class_names == classes == ["cat", "dog", "emu"] and loader.files == files
    assert len(loader) == 15 // 4                                  # drop_last
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == 3 and loader.epoch == epoch + 1
        seen = torch.cat([b.index for b in batches])
        assert len(set(seen.tolist())) == 12                       # no repeats within an epoch
        for b in batches:
            assert isinstance(b, DaliBatch) and len(b.views) == 3
            for v in b.views:
                assert v.shape == (4, 3, 12, 12) and v.dtype == torch.float32 and torch.isfinite(v).all()
            assert b.index.dtype == torch.int64
            assert b.labels.tolist() == [labels[i] for i in b.index.tolist()]
            assert not torch.equal(b.views[0], b.views[1])         # independent views


def test_file_loader_in_order_without_drop_last(folder):
    root, pixels = folder
    loader = dali_file_loader(root, batch_size=4, crop_size=16, num_views=1, augment=IDENTITY, shuffle=False,
                              drop_last=False, image_size=16, **RAW, **CPU)
    for _ in range(2):                                             # the padding never leaks into the next epoch
        batches = list(loader)
        assert [b.views[0].shape[0] for b in batches] == [4, 4, 4, 3]
        assert torch.cat([b.index for b in batches]).tolist() == list(range(15))
    # image_size: shorter side to 16, centre crop; square 16x16 sources come through unchanged
    b = batches[0]
    for k, i in enumerate(b.index.tolist()):
        arr = pixels[loader.files[i]]
        if arr.shape[:2] == (16, 16):
            got = (b.views[0][k] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(got, arr)


def test_file_and_memory_paths_agree(folder):
    """Same images from PNG files and from a uint8 tensor: same format, same pixels (identity recipe)."""
    root, pixels = folder
    files = [f for f, a in pixels.items() if a.shape[:2] == (16, 16)]  # one size, so they stack
    arrays = np.stack([pixels[f] for f in files])                      # (n, H, W, 3)
    kw = dict(batch_size=len(files), crop_size=16, num_views=2, augment=IDENTITY, shuffle=False, **RAW, **CPU)
    a = next(iter(dali_file_loader(files=files, labels=[7] * len(files), **kw)))
    for imgs in (torch.from_numpy(arrays), torch.from_numpy(arrays).permute(0, 3, 1, 2)):   # NHWC and NCHW
        b = next(iter(dali_memory_loader(imgs, torch.full((len(files),), 7), **kw)))
        assert [v.shape for v in a.views] == [v.shape for v in b.views] and a.views[0].dtype == b.views[0].dtype
        assert a.index.tolist() == b.index.tolist() and a.labels.tolist() == b.labels.tolist() == [7] * len(files)
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va, vb)
        assert torch.equal((a.views[0][0] * 255).round().to(torch.uint8).permute(1, 2, 0),
                           torch.from_numpy(arrays[0]))


@pytest.mark.skipif(not (CIFAR10_JPEG / "train").is_dir(), reason="shared/datasets/cifar10-jpeg not present")
def test_cifar_jpeg_files_decode_and_normalise():
    listing, labels, _ = list_folder_images([(CIFAR10_JPEG / "train").resolve()], None)
    pick = list(range(0, len(listing), len(listing) // 64))[:64]      # all classes
    files, labs = [listing[i] for i in pick], [labels[i] for i in pick]
    # Decoding: identity views equal PIL's decode (libjpeg-turbo both; allow small IDCT differences).
    loader = dali_file_loader(files=files, labels=labs, batch_size=32, crop_size=32, num_views=1,
                              augment=IDENTITY, shuffle=False, **RAW, **CPU)
    b = next(iter(loader))
    pil = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in b.index.tolist()])
    got = (b.views[0] * 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - pil).mean() < 1.5 and b.labels.tolist() == [labs[i] for i in b.index.tolist()]
    # MoCo v1 views, CIFAR normalisation: roughly zero mean, unit spread per channel
    loader = dali_file_loader(files=files, labels=labs, batch_size=32, crop_size=32, num_views=3, mean=CIFAR_MEAN,
                              std=CIFAR_STD, **CPU)
    views = torch.cat([v for b in loader for v in b.views])            # (192, 3, 32, 32)
    assert views.shape == (192, 3, 32, 32)
    mean, std = views.mean(dim=(0, 2, 3)), views.std(dim=(0, 2, 3))
    assert (mean.abs() < 0.5).all() and ((std > 0.6) & (std < 1.4)).all(), (mean, std)


@pytest.mark.parametrize("kind", ["files", "memory"])
def test_two_shards_are_disjoint_halves(folder, kind):
    root, _ = folder
    n = 15 if kind == "files" else 20
    per_epoch = []
    for shard in (0, 1):
        kw = dict(batch_size=3, crop_size=8, num_views=1, seed=5, shard_id=shard, num_shards=2, drop_last=False,
                  **RAW, **CPU)
        loader = (dali_file_loader(root, **kw) if kind == "files"
                  else dali_memory_loader(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), **kw))
        per_epoch.append([torch.cat([b.index for b in loader]).tolist() for _ in range(2)])
    for e in range(2):
        a, b = per_epoch[0][e], per_epoch[1][e]
        assert len(a) == len(set(a)) == n // 2 and len(b) == len(set(b)) == n - n // 2
        assert not set(a) & set(b) and set(a) | set(b) == set(range(n))
    assert per_epoch[0][0] != per_epoch[0][1]                      # reshuffled every epoch
    # drop_last: both shards take the same number of full batches
    steps = [len(dali_file_loader(root, batch_size=3, crop_size=8, shard_id=s, num_shards=2, **RAW, **CPU))
             for s in (0, 1)]
    assert steps == [7 // 3, 7 // 3]


def test_seed_determinism(folder):
    root, _ = folder
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def first(seed, kind):
        kw = dict(batch_size=8, crop_size=10, num_views=2, augment=SIMCLR, seed=seed, mean=CIFAR_MEAN,
                  std=CIFAR_STD, **CPU)
        loader = dali_file_loader(root, **kw) if kind == "files" else dali_memory_loader(x, **kw)
        return [b for _, b in zip(range(2), loader)]

    for kind in ("files", "memory"):
        a, b, c = first(3, kind), first(3, kind), first(4, kind)
        for ba, bb in zip(a, b):
            assert torch.equal(ba.index, bb.index)
            assert all(torch.equal(va, vb) for va, vb in zip(ba.views, bb.views))
        assert not all(torch.equal(va, vc) for va, vc in zip(a[0].views, c[0].views))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("color", ["exact", "fused"])
def test_dtypes_channels_last_and_colour_modes(out_dtype, color):
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = dali_memory_loader(x, batch_size=16, crop_size=12, num_views=2, mean=CIFAR_MEAN, std=CIFAR_STD,
                             color=color, seed=2, **CPU)
    loader = dali_memory_loader(x, batch_size=16, crop_size=12, num_views=2, mean=CIFAR_MEAN, std=CIFAR_STD,
                                out_dtype=out_dtype, channels_last=True, color=color, seed=2, **CPU)
    for b, r in zip(loader, ref):
        for v, rv in zip(b.views, r.views):
            assert v.shape == (16, 3, 12, 12) and v.dtype == out_dtype
            assert v.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(v.float(), rv, atol=0.02, rtol=0.01)   # same values, other layout/type


def test_bad_arguments(folder):
    root, _ = folder
    x = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        dali_memory_loader(x, batch_size=16, crop_size=8, **RAW, **CPU)
    with pytest.raises(ValueError, match="shard_id"):
        dali_memory_loader(x, batch_size=2, crop_size=8, shard_id=2, num_shards=2, **RAW, **CPU)
    with pytest.raises(ValueError, match="configs for 3 views"):
        dali_memory_loader(x, batch_size=2, crop_size=8, num_views=3, augment=[MOCO_V1, SIMCLR], **RAW, **CPU)
    with pytest.raises(ValueError, match="either folder"):
        dali_file_loader(root, files=["a.jpg"], batch_size=2, crop_size=8, **RAW, **CPU)
    with pytest.raises(ValueError, match="out_dtype"):
        dali_memory_loader(x, batch_size=2, crop_size=8, out_dtype=torch.int8, **RAW, **CPU)


# ------------------------------------------------------------------ augmentation vs the specification

@pytest.mark.parametrize("device_id", DEVICES)
def test_flip_rate(device_id):
    grad = np.repeat(np.repeat((np.arange(16) * 16).astype(np.uint8)[None, :, None], 16, 0), 3, 2)  # R=G=B=16x
    v = sample_views(grad, only(flip_p=0.5), device_id=device_id)
    flipped = v[:, 0, :, 0] > v[:, 0, :, -1]                        # per row
    assert (flipped.all(dim=1) | (~flipped).all(dim=1)).all()       # whole-image flips
    frac = flipped[:, 0].double().mean().item()
    assert rate_ok(frac, 0.5, len(v)), frac
    # unflipped views are the input itself (the crop is the identity here)
    same = v[~flipped[:, 0]]
    assert (same[:, 0] - torch.from_numpy(grad[..., 0]).double()).abs().max() < 1e-3


@pytest.mark.parametrize("device_id", DEVICES)
def test_grayscale_rate_and_luma(device_id):
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    v = sample_views(img, only(grayscale_p=0.2, jitter_p=0.0), device_id=device_id)
    spread = (v.amax(dim=1) - v.amin(dim=1)).amax(dim=(1, 2))       # max channel difference per view
    gray = spread < 1.5                                             # YIQ round trip: within ~1 level
    assert ((spread < 1.5) | (spread > 20)).all()                   # gray or untouched, nothing between
    assert rate_ok(gray.double().mean().item(), 0.2, len(v))
    luma = torch.from_numpy(img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    assert (v[gray] - luma).abs().max() < 1.0                       # ITU-R 601 luma
    assert (v[~gray][0] - torch.from_numpy(img).permute(2, 0, 1).double()).abs().max() < 1e-3


@pytest.mark.parametrize("device_id", DEVICES)
@pytest.mark.parametrize("color", ["exact", "fused"])
def test_brightness_factor_range(color, device_id):
    grey = np.full((8, 8, 3), 100, np.uint8)
    f = sample_views(grey, only(jitter=(0.4, 0, 0, 0)), color=color, device_id=device_id)[:, :, 4, 4]
    f = f.mean(dim=1) / 100.0
    tol = 1e-4 if color == "exact" else 0.006                         # fused rounds to uint8
    assert f.min() >= 0.6 - tol and f.max() <= 1.4 + tol
    assert f.min() < 0.63 and f.max() > 1.37                        # the whole range is used
    assert abs(f.mean().item() - 1.0) < 0.03 and rate_ok((f < 1).double().mean().item(), 0.5, len(f))
    # jitter_p: the other samples keep factor 1 exactly
    f = sample_views(grey, only(jitter=(0.4, 0, 0, 0), jitter_p=0.3), color=color, device_id=device_id)
    f = f[:, 0, 4, 4] / 100.0
    assert rate_ok(((f - 1).abs() > tol + 1e-6).double().mean().item(), 0.3, len(f))


@pytest.mark.parametrize("device_id", DEVICES)
def test_contrast_pivots_on_the_image_mean(device_id):
    """exact: torchvision's contrast keeps the mean luma; fused (color_twist) pivots on mid-grey."""
    img = np.full((16, 16, 3), 60, np.uint8)
    img[:, 8:] = 160                                                # mean 110
    cfg = only(jitter=(0, 0.4, 0, 0))
    v = sample_views(img, cfg, device_id=device_id)
    c = (v[:, 0, 0, 15] - v[:, 0, 0, 0]) / 100.0
    assert c.min() >= 0.6 - 1e-4 and c.max() <= 1.4 + 1e-4 and c.min() < 0.63 and c.max() > 1.37
    assert (v.mean(dim=(1, 2, 3)) - 110).abs().max() < 1e-3
    v = sample_views(img, cfg, color="fused", epochs=1, device_id=device_id)
    c = (v[:, 0, 0, 15] - v[:, 0, 0, 0]) / 100.0
    assert (v.mean(dim=(1, 2, 3)) - (128 + c * (110 - 128))).abs().max() < 1.0


def _yiq(v: torch.Tensor) -> torch.Tensor:
    m = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], dtype=v.dtype)
    return torch.einsum("ij,bj->bi", m, v)


@pytest.mark.parametrize("device_id", DEVICES)
def test_hue_is_a_yiq_rotation_in_degrees(device_id):
    colour = np.array([150, 110, 100], np.uint8)                   # low chroma: stays in gamut when rotated
    img = np.broadcast_to(colour, (8, 8, 3)).copy()
    v = sample_views(img, only(jitter=(0, 0, 0, 0.4)), device_id=device_id)[:, :, 4, 4]   # (n, 3)
    before, after = _yiq(torch.from_numpy(colour).double()[None]), _yiq(v)
    assert (after[:, 0] - before[:, 0]).abs().max() < 0.6          # luma kept
    assert ((after[:, 1:].norm(dim=1) - before[:, 1:].norm()).abs() < 1.0).all()   # chroma kept: a rotation
    angle = torch.rad2deg(torch.atan2(after[:, 2], after[:, 1]) - torch.atan2(before[0, 2], before[0, 1]))
    angle = (angle + 180) % 360 - 180
    # torchvision's hue 0.4 of a turn = 144 degrees, uniform in [-144, 144]
    assert angle.abs().max() <= 144 + 3 and angle.abs().max() > 135
    assert rate_ok((angle.abs() < 72).double().mean().item(), 0.5, len(angle))
    assert abs(angle.mean().item()) < 8


def _crop_boxes(antialias: bool, device_id: int | None, S: int = 16, W: int = 64):
    """(left, top, w, h) of each view's crop box, read back from an image with R = 4x, G = 4y."""
    x = np.arange(W)
    img = np.zeros((W, W, 3), np.uint8)
    img[..., 0], img[..., 1] = 4 * x[None, :], 4 * x[:, None]
    v = sample_views(img, only(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3)), size=S, antialias=antialias,
                     device_id=device_id) / 4.0
    j1, j2 = 2, S - 3                                              # inner pixels: away from edge effects
    cx, cy = v[:, 0].mean(dim=1), v[:, 1].mean(dim=2)              # source x per output column, y per row
    # output pixel j samples source coordinate left + (j + 0.5) * w / S - 0.5 (pixel centres at integers)
    w = (cx[:, j2] - cx[:, j1]) * S / (j2 - j1)
    h = (cy[:, j2] - cy[:, j1]) * S / (j2 - j1)
    return cx[:, j1] - (j1 + 0.5) * w / S + 0.5, cy[:, j1] - (j1 + 0.5) * h / S + 0.5, w, h


@pytest.mark.parametrize("device_id", DEVICES)
def test_crop_box_area_and_aspect_match_random_resized_crop(device_id):
    W = 64
    left, top, w, h = _crop_boxes(antialias=False, device_id=device_id)   # plain bilinear: exact on a ramp
    assert ((w - w.round()).abs() < 1e-3).all() and ((h - h.round()).abs() < 1e-3).all()   # integer boxes
    assert (left > -1e-3).all() and (top > -1e-3).all() and (left + w < W + 1e-3).all() and (top + h < W + 1e-3).all()
    area, ratio = w * h / W ** 2, w / h
    assert area.min() > 0.2 - 0.02 and area.max() < 1.0 + 1e-3
    assert ratio.min() > 3 / 4 - 0.02 and ratio.max() < 4 / 3 + 0.02
    # Same distribution as torchvision's get_params (fastmice.views.augment.sample_crop_boxes): quantiles agree.
    _, _, th, tw = sample_crop_boxes(20000, W, W, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    q = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    ref_area, ref_logr = (th * tw).double() / W ** 2, (tw.double() / th.double()).log()
    assert (area.quantile(q) - ref_area.quantile(q)).abs().max() < 0.04
    assert (ratio.log().quantile(q) - ref_logr.quantile(q)).abs().max() < 0.04
    pos = left[w < W - 0.5] / (W - w[w < W - 0.5])                 # uniform in [0, 1]
    assert abs(pos.mean().item() - 0.5) < 0.05 and pos.min() < 0.05 and pos.max() > 0.95
    # antialias=True (the default) filters when shrinking: same boxes, ramp reproduced only approximately
    left, top, w, h = _crop_boxes(antialias=True, device_id=device_id)
    area = w * h / W ** 2
    assert area.min() > 0.2 - 0.04 and area.max() < 1.0 + 0.04 and (w / h).min() > 3 / 4 - 0.04


@pytest.mark.parametrize("device_id", DEVICES)
def test_blur_rate_and_sigma_range(device_id):
    S = 32
    assert blur_kernel_size(S, 0.1) == 3
    ref = getattr(augment, "_blur_kernel_size", None)              # the same rule as augment_batch
    if ref is not None:
        assert all(blur_kernel_size(n, f) == ref(n, f) for n in (1, 2, 8, 32, 96) for f in (0.05, 0.1, 0.5, 1.0))
    stripes = np.repeat(np.repeat(((np.arange(S) % 2) * 255).astype(np.uint8)[None, :, None], S, 0), 3, 2)
    v = sample_views(stripes, only(blur_p=0.5, order="simclr", jitter_p=0.0), epochs=1, device_id=device_id)
    # 3-tap kernel [e, 1, e] / (1 + 2e), e = exp(-1 / (2 sigma^2)), on alternating columns: the
    # contrast is multiplied by r = (1 - 2e) / (1 + 2e), monotone in sigma (negative past sigma 0.85)
    r = (v[:, 0, 10, 11] - v[:, 0, 10, 10]) / 255.0                # column 11 is 255, column 10 is 0
    blurred = r < 0.999
    e = (1 - r[blurred]) / (2 * (1 + r[blurred]))
    sigma = torch.sqrt(-1 / (2 * e.log()))
    e_min = 0.001 / (2 * 1.999)
    sigma_min = math.sqrt(-1 / (2 * math.log(e_min)))              # sigma below this: r > 0.999
    expected = 0.5 * (2.0 - sigma_min) / 1.9                       # blur_p * P(sigma > sigma_min)
    assert rate_ok(blurred.double().mean().item(), expected, len(r))
    assert sigma.max() <= 2.0 + 0.01 and sigma.min() >= sigma_min - 0.01 and sigma.max() > 1.9
    assert abs(sigma.mean().item() - (sigma_min + 2.0) / 2) < 0.1   # uniform on [sigma_min, 2]
    assert (r > 1 - 1e-6).double().mean() > 0.45                  # the unblurred half is untouched
    assert ((v[:, 0] - v[:, 1]).abs().max() < 1e-3)                # gray input stays gray


def test_views_are_independent():
    img = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    loader = dali_memory_loader(copies(img, 128), batch_size=128, crop_size=16, num_views=3, augment=MOCO_V1,
                                **RAW, **CPU)
    b = next(iter(loader))
    # every pair of views of every sample differs: each view draws its own parameters
    for i in range(3):
        for j in range(i):
            assert (b.views[i] - b.views[j]).flatten(1).abs().amax(dim=1).gt(1e-6).all()


# ------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["files", "memory_cuda", "memory_cpu"])
@pytest.mark.parametrize("out_dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_gpu_loaders_match_the_cpu_pipeline(folder, kind, out_dtype, channels_last):
    """nvJPEG/GPU operators give the CPU pipeline's pixels for the identity recipe, on cuda:0."""
    root, pixels = folder
    files = [f for f, a in pixels.items() if a.shape[:2] == (16, 16)]
    x = torch.from_numpy(np.stack([pixels[f] for f in files])).permute(0, 3, 1, 2).contiguous()
    kw = dict(batch_size=len(files), crop_size=16, num_views=2, augment=IDENTITY, shuffle=False, num_threads=2, **RAW)

    def make(device_id, **extra):
        if kind == "files":
            return dali_file_loader(files=files, device_id=device_id, **kw, **extra)
        return dali_memory_loader(x.cuda() if kind == "memory_cuda" and device_id is not None else x,
                                  device_id=device_id, **kw, **extra)

    ref = next(iter(make(None)))
    got = next(iter(make(0, out_dtype=out_dtype, channels_last=channels_last)))
    assert got.index.device.type == "cuda" and torch.equal(got.index.cpu(), ref.index)
    for v, r in zip(got.views, ref.views):
        assert v.device.type == "cuda" and v.dtype == out_dtype and v.shape == r.shape
        assert v.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(v.float().cpu(), r, atol=1.5 / 255 + 0.01 * (out_dtype != torch.float32), rtol=0)
    # MoCo views on the GPU: several epochs without drift of the batch count
    loader = make(0) if kind != "files" else dali_file_loader(root, device_id=0, batch_size=4, crop_size=12,
                                                               num_views=3, mean=CIFAR_MEAN, std=CIFAR_STD)
    for _ in range(3):
        assert sum(1 for _ in loader) == len(loader)
