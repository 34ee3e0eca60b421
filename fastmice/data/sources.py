"""Dataset readers: every source is decoded once into one uint8 tensor kept whole in memory.

The trainer keeps the full dataset on the device as uint8 (airbench style), so all readers return
an :class:`ImageDataset` whose images share one height and width. The image-folder reader lives in
:mod:`fastmice.data.folder` and is re-exported here as ``load_image_folder``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastmice.data.dataset import DataError, ImageDataset, resize_images
from fastmice.data.folder import load_image_folder
from fastmice.data.stream import stream_folder, stream_image_folder

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_SUPERCLASS",
    "CIFAR100_SUPERCLASS_NAMES",
    "STL10_CLASSES",
    "SOURCES",
    "DataError",
    "DataSourceConfig",
    "ImageDataset",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_stl10",
    "resize_images",
]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

CIFAR100_SUPERCLASS_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)

# Fine label id (CIFAR-100's alphabetical order, apple=0 .. worm=99) -> superclass id
# (CIFAR-100's coarse label order above). Same as the pickles' coarse_labels; 10 per row.
CIFAR100_SUPERCLASS: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer",
                 "dog", "horse", "monkey", "ship", "truck")

SOURCES = ("digits", "cifar10", "cifar100", "cifar100_20", "stl10", "folder")


# ----------------------------------------------------------------------------------------------
# CIFAR (python pickle format)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to what the CIFAR pickles hold (dicts, lists, bytes, numpy arrays), so a
    tampered file cannot run code."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}
    _OTHER = {("_codecs", "encode"), ("builtins", "bytearray")}  # bytes in protocol 2 / 5 pickles

    def find_class(self, module: str, name: str) -> Any:
        if (module.split(".")[0] == "numpy" and name in self._NUMPY) or (module, name) in self._OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _field(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):  # real files use bytes keys; accept str too
        if k in d:
            return d[k]
    raise DataError(f"{path}: no key {key!r} (keys: {sorted(map(str, d))})")


def _find_folder(root: str | Path, folder: str, marker: str) -> Path:
    """``root`` may be the extracted ``folder`` itself or its parent."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    for cand in (root / folder, root):
        if (cand / marker).is_file():
            return cand
    raise DataError(f"{root}: expected {folder}/{marker} (or {marker} directly inside); "
                    f"try `fastmice data download` or point root at the extracted folder")


def _cifar_images(d: dict, path: Path) -> np.ndarray:
    data = np.asarray(_field(d, "data", path), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' should be (N, 3072) uint8, got {data.shape}")
    return data.reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane, each row-major


def load_cifar(root: str | Path, which: str) -> ImageDataset:
    """CIFAR-10 / CIFAR-100 (fine) / CIFAR-100-20 (superclasses) from the python pickles,
    train then test concatenated (60,000 images)."""
    if which not in ("cifar10", "cifar100", "cifar100_20"):
        raise DataError(f"unknown CIFAR variant {which!r}; use cifar10, cifar100 or cifar100_20")
    if which == "cifar10":
        base = _find_folder(root, "cifar-10-batches-py", "data_batch_1")
        files = [base / f"data_batch_{i}" for i in range(1, 6)] + [base / "test_batch"]
    else:
        base = _find_folder(root, "cifar-100-python", "train")
        files = [base / "train", base / "test"]
    images, labels = [], []
    for path in files:
        d = _read_pickle(path)
        x = _cifar_images(d, path)
        y = np.asarray(_field(d, "labels" if which == "cifar10" else "fine_labels", path), np.int64)
        if which == "cifar100_20":
            y = _to_superclass(y, d, path)
        if len(y) != len(x):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    y = np.concatenate(labels)
    if which == "cifar10":
        names = list(CIFAR10_CLASSES)
    elif which == "cifar100_20":
        names = list(CIFAR100_SUPERCLASS_NAMES)
    else:
        names = _cifar100_fine_names(base)
    n_cls = len(names)
    if y.size and (y.min() < 0 or y.max() >= n_cls):
        raise DataError(f"{base}: labels outside 0..{n_cls - 1}")
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(y), names, which)


def _to_superclass(fine: np.ndarray, d: dict, path: Path) -> np.ndarray:
    if fine.size and (fine.min() < 0 or fine.max() > 99):
        raise DataError(f"{path}: fine labels outside 0..99")
    coarse = np.asarray(CIFAR100_SUPERCLASS, np.int64)[fine]
    stored = d.get(b"coarse_labels", d.get("coarse_labels"))
    # The file's own coarse labels must agree; a mismatch means a foreign or damaged file.
    if stored is not None and not np.array_equal(np.asarray(stored, np.int64), coarse):
        raise DataError(f"{path}: coarse_labels disagree with the standard CIFAR-100 superclasses")
    return coarse


def _cifar100_fine_names(base: Path) -> list[str]:
    meta = base / "meta"
    if meta.is_file():
        names = _field(_read_pickle(meta), "fine_label_names", meta)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(100)]


# ----------------------------------------------------------------------------------------------
# STL-10 (binary format)


def _read_stl_split(base: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xp, yp = base / f"{split}_X.bin", base / f"{split}_y.bin"
    for p in (xp, yp):
        if not p.is_file():
            raise DataError(f"missing file {p}")
    x = np.fromfile(xp, dtype=np.uint8)
    per = 3 * 96 * 96
    if x.size % per:
        raise DataError(f"{xp}: size {x.size} bytes is not a multiple of 3*96*96 (truncated?)")
    # Each image is stored column-major: (3, W, H) in C order, hence the last two axes swap.
    x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    y = np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1
    if len(y) != len(x):
        raise DataError(f"{yp}: {len(y)} labels for {len(x)} images in {xp.name}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{yp}: labels must be 1..10")
    return x, y


def load_stl10(root: str | Path) -> ImageDataset:
    """STL-10 labelled images, train (5,000) then test (8,000); 96x96."""
    base = _find_folder(root, "stl10_binary", "train_X.bin")
    parts = [_read_stl_split(base, s) for s in ("train", "test")]
    x = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y = np.concatenate([p[1] for p in parts])
    names = list(STL10_CLASSES)
    names_file = base / "class_names.txt"
    if names_file.is_file():
        lines = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(lines) != 10:
            raise DataError(f"{names_file}: expected 10 class names, found {len(lines)}")
        names = lines
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), names, "stl10")


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(image_size: int = 8) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (0..16 scaled to 0..255), 3 channels; upsampled to
    ``image_size`` with bilinear interpolation (smooth strokes rather than nearest's blocks)."""
    from sklearn.datasets import load_digits as _sk_digits

    if image_size < 1:
        raise DataError(f"digits: image_size must be >= 1, got {image_size}")
    d = _sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    x = resize_images(x, image_size)
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageDataset(x, y, [str(i) for i in range(10)], "digits")


# ----------------------------------------------------------------------------------------------
# Config + dispatcher


@dataclass
class DataSourceConfig:
    """Where the images come from; embedded in the main config as ``data``."""

    source: str = "digits"  # digits | cifar10 | cifar100 | cifar100_20 | stl10 | folder
    root: str | list[str] | None = None  # required except for digits; a list only for folder
    splits: list[str] | None = None  # folder only, e.g. ["train", "test"]
    image_size: int | None = None  # resize to image_size x image_size; None keeps native size
    on_corrupt: str = "skip"  # skip | error (folder only)
    cache_dir: str | None = None  # folder only: decoded-array cache
    num_workers: int = 0  # folder only: decoding threads
    # How training reads the images. memory: decoded once into memory and kept on the device as uint8,
    # augmented by batched torch ops (fastest for datasets that fit: CIFAR, STL-10, ImageNet-Dog).
    # dali: NVIDIA DALI every epoch (a folder: files read by fn.readers.file, decoded by nvJPEG on the GPU,
    # never held whole; an in-memory source: fed through fn.external_source). auto: memory, unless a folder's
    # decoded pixels would exceed memory_limit_gb, then dali.
    loader: str = "auto"
    memory_limit_gb: float = 16.0

    def validate(self) -> None:
        """Raise DataError with a message naming the offending field."""
        if self.source not in SOURCES:
            raise DataError(f"data.source: unknown source {self.source!r}; "
                            f"valid sources: {', '.join(SOURCES)}")
        if self.source != "digits" and not self.root:
            raise DataError(f"data.root is required for source {self.source!r} "
                            f"(a folder path{', or a list of them' if self.source == 'folder' else ''})")
        if isinstance(self.root, (list, tuple)):
            if self.source != "folder":
                raise DataError("data.root: a list of roots is only allowed for source 'folder'")
            if not all(isinstance(r, (str, Path)) and str(r) for r in self.root):
                raise DataError(f"data.root: every entry must be a non-empty path, got {self.root!r}")
        elif self.root is not None and not isinstance(self.root, (str, Path)):
            raise DataError(f"data.root must be a path string, got {type(self.root).__name__}")
        if self.splits is not None:
            if self.source != "folder":
                raise DataError("data.splits only applies to source 'folder' "
                                "(binary sources always load train+test)")
            if isinstance(self.splits, str) or not all(isinstance(s, str) and s for s in self.splits):
                raise DataError(f"data.splits must be a list of folder names, got {self.splits!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool)
                                            or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise DataError(f"data.image_size must be a positive integer or null, got {self.image_size!r}")
        if self.on_corrupt not in ("skip", "error"):
            raise DataError(f"data.on_corrupt must be 'skip' or 'error', got {self.on_corrupt!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.loader not in ("auto", "memory", "dali"):
            raise DataError(f"data.loader must be auto, memory or dali, got {self.loader!r}")
        if isinstance(self.memory_limit_gb, bool) or not isinstance(self.memory_limit_gb, (int, float)) \
                or not self.memory_limit_gb > 0:
            raise DataError(f"data.memory_limit_gb must be a positive number, got {self.memory_limit_gb!r}")


def load_dataset(cfg: DataSourceConfig, progress: bool = True) -> ImageDataset:
    """Load the source described by ``cfg`` (validated first)."""
    cfg.validate()
    if cfg.source == "digits":
        return load_digits(cfg.image_size or 8)
    if cfg.source == "folder":
        if stream_folder(cfg):
            return stream_image_folder(cfg.root, image_size=cfg.image_size, splits=cfg.splits,
                                       on_corrupt=cfg.on_corrupt, num_workers=cfg.num_workers, progress=progress)
        return load_image_folder(cfg.root, image_size=cfg.image_size, splits=cfg.splits,
                                 on_corrupt=cfg.on_corrupt, num_workers=cfg.num_workers,
                                 progress=progress, cache_dir=cfg.cache_dir)
    if cfg.source == "stl10":
        ds = load_stl10(cfg.root)
    else:
        ds = load_cifar(cfg.root, cfg.source)
    if cfg.image_size is not None:
        ds.images = resize_images(ds.images, cfg.image_size)
    return ds
