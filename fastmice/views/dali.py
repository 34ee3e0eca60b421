"""NVIDIA DALI data path: augmented views straight from image files (or from memory) on the GPU.

Two loaders give batches in the trainer's format, ``DaliBatch(views, index, labels)`` with ``views`` a
list of ``num_views`` tensors (B, 3, S, S) like ``Trainer.views`` makes (MiCE: 3, SimCLR/MIX'EM: 2):

* :func:`dali_file_loader` reads encoded files with ``fn.readers.file`` (an ImageFolder tree, listed
  exactly as :func:`fastmice.data.folder.load_image_folder` lists it, or an explicit list of files and
  labels), decodes them with ``fn.decoders.image`` (``device="mixed"``, i.e. nvJPEG on the GPU, when
  ``device_id`` is a GPU; on the CPU when ``device_id=None``) and augments on the same device.
  Images may differ in size; nothing is held in memory but the file list.
* :func:`dali_memory_loader` feeds an in-memory uint8 dataset (a CPU or CUDA tensor (N, 3, H, W) or
  (N, H, W, 3): CIFAR pickles, digits, an ``ImageDataset.images``) through ``fn.external_source``
  into the same augmentation graph.

Both run the recipe of an :class:`fastmice.views.augment.AugmentConfig` (one per view, or one for all):
RandomResizedCrop, RandomGrayscale, ColorJitter with probability ``jitter_p``, horizontal flip,
Gaussian blur (``order="simclr"``), normalisation with ``mean``/``std`` (on the [0, 1] scale, like
``augment_batch``), each view with its own independent random parameters.

Install: ``pip install nvidia-dali-cuda130`` (the ``fastmice[dali]`` extra; CUDA 13 builds; it also
runs CPU-only pipelines, which the tests use). Nothing here imports DALI at module import time, so
``import fastmice.views.dali`` always works and :func:`dali_available` says whether DALI is there.

Epochs, shuffling and shards
----------------------------
* ``shuffle=True`` gives a fresh global permutation every epoch. For files, the list is first
  permuted with ``seed`` and the reader's ``shuffle_after_epoch`` reshuffles it every epoch. The
  reader's ``random_shuffle`` is deliberately not used: it shuffles only inside a buffer of
  ``initial_fill`` (1024) samples, so on a class-sorted ImageFolder listing most batches would hold one
  or two classes. (``shuffle_after_epoch`` uses a fixed internal seed, hence the permutation by ``seed``
  first; the order therefore depends on ``seed`` and the epoch only.)
* ``shard_id``/``num_shards``: shard ``i`` of ``n`` reads rows ``[N*i//n, N*(i+1)//n)`` of each
  epoch's permutation, which is the same on every shard (pass the same ``seed`` to all ranks), so the
  shards are disjoint and together cover the epoch. The pipeline seed for the augmentation is
  ``seed + 1000 * shard_id``, so shards draw different augmentations.
* ``drop_last=True`` (the trainer's semantics): every shard yields ``(N // num_shards) // batch_size``
  full batches per epoch, the same number on every shard (what data-parallel training needs); the rest
  of the epoch is skipped. ``drop_last=False``: every sample of the shard once per epoch, the last batch
  smaller. The file reader runs with ``pad_last_batch=True``: DALI pads each shard to
  ``ceil(N / num_shards)`` samples and then to whole batches by repeating the shard's last sample, so
  every epoch starts on a batch boundary; the padding is cut off here (or the padded batches are run and
  skipped with ``drop_last=True``), so no duplicate ever reaches the caller. With ``drop_last=False`` and
  shards of unequal size (N not a multiple of num_shards), shards may yield different batch counts.
* Iterating a loader (``for batch in loader``) runs one epoch; breaking out of the loop and iterating
  again continues the same epoch where it stopped.
* The output tensors are fresh copies (``feed_ndarray`` into new torch tensors on torch's current
  stream) made before DALI's next run, which reuses its buffers, so they may be kept.
* DALI runs on its own threads and streams and cannot be captured in a CUDA graph: call the loader
  outside any captured region.

Deliberate differences from torchvision (and from :func:`fastmice.views.augment.augment_batch`)
-----------------------------------------------------------------------------------------
* Crop: ``fn.random_resized_crop`` samples the area fraction uniformly and the aspect ratio
  log-uniformly (10 attempts) like torchvision, but it also rejects a box whose *rounded* w/h falls
  outside the ratio range (torchvision keeps it), and its fallback is the whole image clamped to the
  ratio range and shrunk to the largest allowed area (torchvision: the clamped central crop, unshrunk).
  Both only matter for tiny images or extreme ranges. The box is resampled with DALI's bilinear
  filter, antialiased when shrinking (``antialias=True``, like torchvision's PIL path and, by default,
  its tensor path in recent versions; ``augment_batch`` does not antialias; ``antialias=False`` turns
  it off). DALI's antialiasing filter reproduces a linear ramp only to about 0.1 px. Pixels just
  outside the box may contribute to the edge pixels (DALI resamples the region of interest from the
  whole image); ``augment_batch`` clamps to the box.
* Colour jitter runs in a fixed order, brightness -> contrast -> saturation -> hue (torchvision draws
  a random order per call); there is no random order in DALI.
* ``color="exact"`` (default), in float: brightness multiplies and clamps; contrast blends with the mean
  of the image's luma (torchvision's definition) and clamps; saturation and hue are one ``fn.hsv``
  call, i.e. a linear map in YIQ space: saturation scales the chroma (I, Q), which equals
  torchvision's blend with the grayscale image, but the hue shift is a *rotation of (I, Q)* by
  ``hue * 360`` degrees (DALI takes degrees; torchvision's hue is a fraction of a turn and shifts H in
  HSV space). The result is clamped once after saturation and hue (torchvision clamps after saturation;
  its HSV hue shift never leaves the gamut, a YIQ rotation can).
* ``color="fused"``: one ``fn.color_twist`` on uint8, faster: the same YIQ saturation/hue matrix, but
  contrast pivots on mid-grey (128) instead of the image mean, the order is saturation -> hue ->
  contrast -> brightness, and there is a single clamp/rounding at the end.
* Grayscale: luma Y of YIQ (0.299, 0.587, 0.114, as PIL and ``augment_batch``; torchvision's tensor path
  uses 0.2989 for red), applied as saturation 0 in the same ``fn.hsv``/``fn.color_twist`` call, i.e.
  after brightness and contrast in both orders. For ``order="moco"`` torchvision converts to gray
  *before* the jitter; that is the same image up to the clamping after brightness/contrast, since
  brightness and contrast act alike on every channel and a gray image stays gray under hue and
  saturation.
* Flip: folded into ``fn.crop_mirror_normalize`` (``mirror``), i.e. applied last; every other op acts
  per pixel or is mirror-symmetric, so the place does not matter.
* Blur (``order="simclr"``, probability ``blur_p``): ``fn.gaussian_blur`` with the kernel size rule of
  ``augment_batch`` (about ``blur_kernel_frac`` of the side, odd, at least 3) and sigma ~ U(0.1, 2.0),
  DALI's reflect-101 border (torchvision's "reflect"). Samples drawn without blur get sigma 1e-3,
  whose kernel is exactly the identity.
* Randomness comes from DALI's per-operator generators, seeded from the pipeline seed: runs are
  reproducible for a given seed, shard and DALI version, but the streams differ from torch's, and the
  exact values may differ between DALI's CPU and GPU operators.
* Output dtype: float32 or float16 straight from DALI; bfloat16 is not a DALI type, so it is made in
  torch from DALI's float32 output. ``channels_last=True`` makes DALI write HWC, which *is* the
  channels-last layout of the (B, 3, S, S) tensor, at no extra cost.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastmice.views.augment import MOCO_V1, AugmentConfig

__all__ = ["DaliBatch", "DaliLoader", "dali_available", "dali_device_id", "dali_file_loader", "dali_memory_loader",
           "build_views", "blur_kernel_size", "COLOR_MODES", "INSTALL_HINT"]

INSTALL_HINT = "pip install nvidia-dali-cuda130   (or: pip install 'fastmice[dali]')"
COLOR_MODES = ("exact", "fused")
_LUMA = (0.299, 0.587, 0.114)         # YIQ's Y row = ITU-R 601 luma (PIL, augment_batch)
_BLUR_SIGMA = (0.1, 2.0)              # SimCLR's sigma range, as in augment_batch
_NO_BLUR_SIGMA = 1e-3                 # exp(-0.5 / sigma^2) underflows to 0: an exact identity kernel
_SHARD_SEED_STRIDE = 1000


class DaliBatch(NamedTuple):
    """One batch: ``views`` (num_views tensors (B, 3, S, S)), ``index`` (B,) int64 rows of the file
    list / in-memory dataset, ``labels`` (B,) int64 or None; all on the loader's device."""
    views: list[Tensor]
    index: Tensor
    labels: Tensor | None


def dali_available() -> bool:
    """True if ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError(f"the DALI data path needs NVIDIA DALI: {INSTALL_HINT}") from e
    return dali, fn, types, dmath


def blur_kernel_size(out_size: int, frac: float) -> int:
    """Odd Gaussian kernel of about ``frac * out_size`` pixels, at least 3 (augment_batch's rule)."""
    k = int(frac * out_size)
    k = max(3, k if k % 2 == 1 else k + 1)
    return min(k, 2 * out_size - 1)


# ------------------------------------------------------------------------------------- the graph

def _coin(fn, p: float):
    """Per-sample 0/1 (int32) with P(1) = p; a Python int where p is 0 or 1 (no operator)."""
    if p <= 0:
        return 0
    if p >= 1:
        return 1
    return fn.random.coin_flip(probability=float(p))


def _is_const(v, c: int) -> bool:
    return isinstance(v, int) and v == c


def _one_view(img, cfg: AugmentConfig, size: int, mean255: list[float], std255: list[float],
              dali_dtype, layout: str, color: str, antialias: bool):
    """The augmentation of one view: uint8 HWC batch (CPU or GPU node) -> normalised CHW/HWC batch."""
    _, fn, types, dmath = _dali()
    exact = color == "exact"
    x = fn.random_resized_crop(img, size=[size, size], random_area=[float(v) for v in cfg.crop_scale],
                               random_aspect_ratio=[float(v) for v in cfg.crop_ratio], num_attempts=10,
                               antialias=antialias, dtype=types.FLOAT if exact else types.UINT8)

    # Per-sample parameters (CPU argument inputs). None = identity, no operator.
    b_r, c_r, s_r, h_r = (float(v) for v in cfg.jitter)
    b = c = s = h = None
    if cfg.jitter_p > 0 and any(v > 0 for v in cfg.jitter):
        on = _coin(fn, cfg.jitter_p)

        def factor(lo: float, hi: float, identity: float):
            u = fn.random.uniform(range=[lo, hi])
            return u if _is_const(on, 1) else identity + on * (u - identity)

        b = factor(max(0.0, 1 - b_r), 1 + b_r, 1.0) if b_r > 0 else None
        c = factor(max(0.0, 1 - c_r), 1 + c_r, 1.0) if c_r > 0 else None
        s = factor(max(0.0, 1 - s_r), 1 + s_r, 1.0) if s_r > 0 else None
        h = factor(-360.0 * h_r, 360.0 * h_r, 0.0) if h_r > 0 else None   # turns -> degrees
    gray = _coin(fn, cfg.grayscale_p)
    if _is_const(gray, 1):                 # grayscale = saturation 0, folded into the same op
        s = 0.0
    elif not _is_const(gray, 0):
        s = 1.0 - gray if s is None else s * (1.0 - gray)

    if exact:
        if b is not None:
            x = dmath.clamp(x * b, 0.0, 255.0)
        if c is not None:
            channel_means = fn.reductions.mean(x, axes=[0, 1])                               # (3,)
            luma_mean = fn.reductions.sum(channel_means * types.Constant(np.float32(_LUMA)))  # ()
            x = dmath.clamp(x * c + luma_mean * (1.0 - c), 0.0, 255.0)
        if s is not None or h is not None:
            x = fn.hsv(x, saturation=1.0 if s is None else s, hue=0.0 if h is None else h, dtype=types.FLOAT)
            x = dmath.clamp(x, 0.0, 255.0)
    elif any(v is not None for v in (b, c, s, h)):
        x = fn.color_twist(x, brightness=1.0 if b is None else b, contrast=1.0 if c is None else c,
                           saturation=1.0 if s is None else s, hue=0.0 if h is None else h)

    if cfg.order == "simclr" and cfg.blur_p > 0 and size > 1:
        sigma = fn.random.uniform(range=list(_BLUR_SIGMA))
        on = _coin(fn, cfg.blur_p)
        if not _is_const(on, 1):
            sigma = sigma * on + (1.0 - on) * _NO_BLUR_SIGMA
        x = fn.gaussian_blur(x, window_size=blur_kernel_size(size, cfg.blur_kernel_frac), sigma=sigma)

    return fn.crop_mirror_normalize(x, dtype=dali_dtype, output_layout=layout, mean=mean255, std=std255,
                                    mirror=_coin(fn, cfg.flip_p))


def build_views(images, cfgs: Sequence[AugmentConfig], size: int, mean: Sequence[float], std: Sequence[float],
                dali_dtype=None, channels_last: bool = False, color: str = "exact", antialias: bool = True) -> list:
    """Inside a pipeline definition: one augmented, normalised view of the uint8 HWC RGB batch node
    ``images`` per config. ``mean``/``std`` on the [0, 1] scale. Returns the DALI nodes."""
    _, _, types, _ = _dali()
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    mean255 = [255.0 * float(v) for v in mean]
    std255 = [255.0 * float(v) for v in std]
    if len(mean255) != 3 or len(std255) != 3 or min(std255) <= 0:
        raise ValueError(f"mean and std need 3 values each (RGB, std > 0), got {mean!r} and {std!r}")
    dali_dtype = types.FLOAT if dali_dtype is None else dali_dtype
    layout = "HWC" if channels_last else "CHW"
    return [_one_view(images, c, size, mean255, std255, dali_dtype, layout, color, antialias) for c in cfgs]


# ------------------------------------------------------------------------------------ the loader

def _configs(augment: AugmentConfig | Sequence[AugmentConfig], num_views: int) -> list[AugmentConfig]:
    cfgs = [augment] * num_views if isinstance(augment, AugmentConfig) else list(augment)
    if num_views < 1 or len(cfgs) != num_views:
        raise ValueError(f"got {len(cfgs)} augment configs for {num_views} views")
    for c in cfgs:
        c.validate()
        if c.randaugment_ops:   # not silently skipped: the batched torch path has it, this pipeline does not
            raise ValueError("augment.randaugment_ops > 0: RandAugment is not in the DALI pipeline; use the "
                             "in-memory torch augmentation (fastmice.views.augment) for the randaugment recipe")
    return cfgs


def _floats(v: Tensor | Sequence[float]) -> list[float]:
    return [float(x) for x in (v.detach().cpu().flatten().tolist() if isinstance(v, Tensor) else v)]


def _dali_out_dtype(out_dtype: torch.dtype):
    """The DALI output type for the requested torch dtype (bfloat16 is made in torch from float32)."""
    _, _, types, _ = _dali()
    if out_dtype == torch.float32 or out_dtype == torch.bfloat16:
        return types.FLOAT
    if out_dtype == torch.float16:
        return types.FLOAT16
    raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def _check_sharding(n: int, batch_size: int, shard_id: int, num_shards: int, drop_last: bool) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n // num_shards < (batch_size if drop_last else 1):
        raise ValueError(f"{n} images in {num_shards} shard(s) give {n // num_shards} per shard, fewer than "
                         f"one batch of {batch_size}" + ("" if drop_last else " images"))


class DaliLoader:
    """Iterable over :class:`DaliBatch`; one ``for`` loop is one epoch (``len()`` batches).

    Attributes: ``steps_per_epoch``, ``epoch`` (completed epochs), ``batch_size``, ``num_views``,
    ``device``, ``pipe`` (the DALI pipeline), ``labels`` (per row, or None), ``files``/``class_names``
    (file loader). A loader holds DALI threads and (on a GPU) memory until :meth:`close`.
    """

    def __init__(self, pipe, *, num_views: int, batch_size: int, steps_per_epoch: int, runs_per_epoch: int,
                 last_valid: int, device: torch.device, out_dtype: torch.dtype, channels_last: bool,
                 labels: Tensor | None):
        self.pipe = pipe
        self.num_views = num_views
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch      # batches yielded per epoch
        self._runs_per_epoch = runs_per_epoch       # pipeline runs per epoch (> steps: padded batches)
        self._last_valid = last_valid               # real samples in the last yielded batch
        self.device = device
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.int64)
        self.epoch = 0
        self._run = 0                               # pipeline runs done in the current epoch
        self.files: list[str] | None = None
        self.class_names: list[str] | None = None
        # An unshuffled file reader: its list, where this shard starts in it, and DALI's prefetch depth, so that a
        # failed run can be traced to the files it was reading.
        self.reader_files: list[str] | None = None
        self._reader_lo = 0
        self._prefetch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _copy(self, tensor_list) -> Tensor:
        """A fresh torch copy of a dense DALI batch, on self.device (DALI reuses its buffers)."""
        from nvidia.dali.backend import TensorGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        t = tensor_list.as_tensor()             # dense (B, ...) view of DALI's buffer
        on_gpu = isinstance(t, TensorGPU)
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device if on_gpu else "cpu")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        return out.to(self.device, non_blocking=True)

    def _convert(self, outs, valid: int) -> DaliBatch:
        views = []
        for tl in outs[:self.num_views]:
            v = self._copy(tl)
            if self.channels_last:              # DALI wrote (B, S, S, 3): the channels-last form of NCHW
                v = v.permute(0, 3, 1, 2)
            if v.dtype != self.out_dtype:
                v = v.to(self.out_dtype)        # bfloat16 (keeps the memory format)
            views.append(v[:valid])
        index = self._copy(outs[self.num_views])
        index = index.reshape(-1)[:valid].to(torch.int64)
        labels = self.labels[index] if self.labels is not None else None
        return DaliBatch(views, index, labels)

    def __iter__(self):
        while self._run < self._runs_per_epoch:
            try:
                outs = self.pipe.run()
            except RuntimeError as e:
                raise self._read_error(e) from e
            r = self._run
            self._run += 1
            if r < self.steps_per_epoch:        # later runs: DALI's padding batches, skipped
                yield self._convert(outs, self.batch_size if r < self.steps_per_epoch - 1 else self._last_valid)
        self._run = 0
        self.epoch += 1

    def _read_error(self, error: RuntimeError) -> Exception:
        """A failed pipeline run, as an error that names the files: DALI's says which operator failed, not which
        file. The candidates are the files of the batches DALI was working on (this one and those prefetched);
        the ones Pillow cannot decode either are named, else all of them are."""
        from fastmice.data.folder import decode_image
        from fastmice.data.sources import DataError

        if self.reader_files is None:   # in-memory data or a shuffled reader: no file to name
            return error
        start = self._reader_lo + self._run * self.batch_size
        window = self.reader_files[start:start + (self._prefetch + 1) * self.batch_size]
        bad = []
        for path in window:
            try:
                decode_image(path, None)
            except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed files
                bad.append(f"{path} ({type(e).__name__}: {e})")
        where = ("cannot be decoded: " + "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                 if bad else f"is one of these {len(window)} files, which Pillow decodes: {window[0]} ... "
                             f"{window[-1]}")
        first_line = next((ln for ln in str(error).splitlines() if ln.strip() and "Critical" not in ln), "")
        return DataError(f"DALI could not read a batch ({first_line.strip()}); the culprit {where}. Remove or "
                         f"replace it (`fastmice data check folder ROOT` lists unreadable files), then resume.")

    def close(self) -> None:
        """Release the pipeline (threads, GPU buffers)."""
        self.pipe = None


def dali_device_id(device: torch.device) -> int | None:
    """DALI's device_id for a torch device: the GPU's index ("cuda" alone: the current one), None on the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _device_for(device_id: int | None) -> torch.device:
    return torch.device("cpu") if device_id is None else torch.device("cuda", device_id)


def dali_file_loader(
    folder: str | Path | Sequence[str | Path] | None = None, *, files: Sequence[str | Path] | None = None,
    labels: Sequence[int] | Tensor | None = None, splits: Sequence[str] | None = None,
    batch_size: int, crop_size: int, mean: Tensor | Sequence[float], std: Tensor | Sequence[float],
    num_views: int = 2, augment: AugmentConfig | Sequence[AugmentConfig] = MOCO_V1,
    device_id: int | None = 0, seed: int = 0, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
    drop_last: bool = True, num_threads: int = 4, prefetch: int = 2, out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False, image_size: int | None = None, antialias: bool = True, color: str = "exact",
) -> DaliLoader:
    """Augmented views of image files, decoded by DALI (nvJPEG on GPU ``device_id``; CPU if None).

    ``folder``: ImageFolder root(s) (``root/<class>/**/<image>``; or images directly inside: unlabelled),
    with optional ``splits`` sub-folders, listed and labelled exactly as ``load_image_folder`` does; or
    ``files`` (with optional ``labels``). ``image_size``: first resize the shorter side to it and centre
    crop a square (``load_image_folder(image_size=...)``'s preprocessing), then augment. Other arguments:
    see the module docstring and :func:`fastmice.views.augment.augment_batch`.
    """
    dali, fn, types, _ = _dali()
    if (folder is None) == (files is None):
        raise ValueError("give either folder (an ImageFolder root) or files (a list of image paths)")
    class_names = None
    if folder is not None:
        from fastmice.data.folder import list_folder_images, resolve_roots
        listed, lab, class_names = list_folder_images(resolve_roots(folder), splits)
        if labels is None and lab is not None:
            labels = lab
        file_list = listed
    else:
        file_list = [str(f) for f in files]
    n = len(file_list)
    if n == 0:
        raise ValueError("no image files given")
    label_t = None
    if labels is not None:
        label_t = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if label_t.numel() != n:
            raise ValueError(f"{n} files but {label_t.numel()} labels")
    _check_sharding(n, batch_size, shard_id, num_shards, drop_last)
    cfgs = _configs(augment, num_views)
    dali_dtype = _dali_out_dtype(out_dtype)

    # The reader's label is the row in file_list, so the batch says which files it holds.
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    reader_kw: dict[str, Any] = dict(files=[file_list[i] for i in order], labels=[int(i) for i in order],
                                     shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name="Reader")
    if shuffle:
        reader_kw["shuffle_after_epoch"] = True       # a global reshuffle each epoch (implies stick_to_shard)
    else:
        reader_kw["stick_to_shard"] = True            # each shard keeps its rows in every epoch

    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         seed=seed + _SHARD_SEED_STRIDE * shard_id, prefetch_queue_depth=prefetch)
    with pipe:
        encoded, index = fn.readers.file(**reader_kw)
        images = _decode_square(fn, types, encoded, device_id, image_size)
        views = build_views(images, cfgs, crop_size, _floats(mean), _floats(std), dali_dtype, channels_last,
                            color, antialias)
        pipe.set_outputs(*views, index)
    pipe.build()

    # Per-shard sizes as DALI splits them; DALI pads every shard to ceil(N / shards) samples, then
    # to whole batches.
    real = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
    runs = math.ceil(math.ceil(n / num_shards) / batch_size)
    if drop_last:
        steps, last_valid = (n // num_shards) // batch_size, batch_size
    else:
        steps = math.ceil(real / batch_size)
        last_valid = real - (steps - 1) * batch_size
    loader = DaliLoader(pipe, num_views=num_views, batch_size=batch_size, steps_per_epoch=steps,
                        runs_per_epoch=runs, last_valid=last_valid, device=_device_for(device_id),
                        out_dtype=out_dtype, channels_last=channels_last, labels=label_t)
    loader.files, loader.class_names = file_list, class_names
    if not shuffle:
        loader.reader_files, loader._reader_lo, loader._prefetch = reader_kw["files"], n * shard_id // num_shards, prefetch
    return loader


def _decode_square(fn, types, encoded, device_id: int | None, image_size: int | None):
    """Decoded RGB (nvJPEG on a GPU); with image_size: shorter side to it, then the centred square."""
    images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
    if image_size is not None:
        images = fn.resize(images, resize_shorter=image_size, antialias=True)
        images = fn.crop(images, crop=[image_size, image_size])   # centred (crop_pos 0.5)
    return images


class _MemorySource:
    """external_source callback: the next batch (uint8 (b, H, W, 3), int64 rows (b,)) of an endless
    sequence of epochs; each epoch is a permutation from its own generator, cut to this shard."""

    def __init__(self, images: Tensor, hwc: bool, batch_size: int, shard_id: int, num_shards: int,
                 shuffle: bool, drop_last: bool, seed: int):
        self.images, self.hwc, self.batch_size = images, hwc, batch_size
        n = images.shape[0]
        self.lo, self.hi = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.steps = (n // num_shards) // batch_size if drop_last else math.ceil((self.hi - self.lo) / batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.step = 0

    def __call__(self):
        if self.rows is None or self.step >= self.steps:
            n = self.images.shape[0]
            perm = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            self.rows = perm[self.lo:self.hi].to(self.images.device)
            self.step = 0
        idx = self.rows[self.step * self.batch_size:(self.step + 1) * self.batch_size]
        self.step += 1
        x = self.images[idx]
        if not self.hwc:
            x = x.permute(0, 2, 3, 1)
        x = x.contiguous()
        if x.device.type == "cpu":         # numpy for CPU data: DALI asks torch for a CUDA stream otherwise
            return x.numpy(), idx.numpy()
        return x, idx


def dali_memory_loader(
    images: Tensor, labels: Tensor | Sequence[int] | None = None, *, batch_size: int, crop_size: int,
    mean: Tensor | Sequence[float], std: Tensor | Sequence[float], num_views: int = 2,
    augment: AugmentConfig | Sequence[AugmentConfig] = MOCO_V1, device_id: int | None = 0, seed: int = 0,
    shard_id: int = 0, num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, num_threads: int = 4,
    prefetch: int = 2, out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
    layout: str | None = None, antialias: bool = True, color: str = "exact",
) -> DaliLoader:
    """Augmented views of an in-memory uint8 dataset through ``fn.external_source``.

    ``images``: uint8 (N, 3, H, W) (``ImageDataset.images``) or (N, H, W, 3); ``layout`` ("NCHW" or
    "NHWC") settles the case where both dims are 3. A CUDA tensor is fed to DALI on the GPU directly
    (must be on ``device_id``); a CPU tensor is copied to the GPU by DALI (or stays on the CPU when
    ``device_id=None``). Shuffling, shards and ``drop_last`` as in :func:`dali_file_loader`; the
    permutation comes from a torch generator seeded with ``seed``. Batches are gathered from ``images``
    (no copy of the whole dataset is made).
    """
    dali, fn, types, _ = _dali()
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 tensor (N, 3, H, W) or (N, H, W, 3)")
    if layout is None:
        if images.shape[1] == 3 and images.shape[3] != 3:
            layout = "NCHW"
        elif images.shape[3] == 3 and images.shape[1] != 3:
            layout = "NHWC"
        elif images.shape[1] == 3:
            layout = "NCHW"                       # both 3: the ImageDataset convention
        else:
            raise ValueError(f"images of shape {tuple(images.shape)} have no 3-channel axis")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    n = images.shape[0]
    label_t = None
    if labels is not None:
        label_t = torch.as_tensor(labels).to(torch.int64).flatten()
        if label_t.numel() != n:
            raise ValueError(f"{n} images but {label_t.numel()} labels")
    _check_sharding(n, batch_size, shard_id, num_shards, drop_last)
    cfgs = _configs(augment, num_views)
    dali_dtype = _dali_out_dtype(out_dtype)
    if images.is_cuda:
        if device_id is None:
            images = images.cpu()
        elif images.device.index != device_id:
            raise ValueError(f"images are on {images.device} but device_id={device_id}")
    es_device = "gpu" if images.is_cuda else "cpu"

    source = _MemorySource(images, layout == "NHWC", batch_size, shard_id, num_shards, shuffle, drop_last, seed)
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         seed=seed + _SHARD_SEED_STRIDE * shard_id, prefetch_queue_depth=prefetch)
    with pipe:
        batch, index = fn.external_source(source=source, num_outputs=2, batch=True, device=es_device,
                                          layout=["HWC", ""], dtype=[types.UINT8, types.INT64], ndim=[3, 0])
        if device_id is not None and es_device == "cpu":
            batch = batch.gpu()
        views = build_views(batch, cfgs, crop_size, _floats(mean), _floats(std), dali_dtype, channels_last,
                            color, antialias)
        pipe.set_outputs(*views, index)
    pipe.build()

    real = source.hi - source.lo
    last_valid = batch_size if drop_last else real - (source.steps - 1) * batch_size
    loader = DaliLoader(pipe, num_views=num_views, batch_size=batch_size, steps_per_epoch=source.steps,
                        runs_per_epoch=source.steps, last_valid=last_valid, device=_device_for(device_id),
                        out_dtype=out_dtype, channels_last=channels_last, labels=label_t)
    return loader
