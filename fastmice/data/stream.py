"""Image folders too big to decode into memory: listed once, decoded on demand.

With ``data.loader: dali`` (or ``auto`` on a folder whose decoded pixels would exceed
``data.memory_limit_gb``) training reads the files through DALI every epoch (fastmice.views.batches.DaliBatches)
and nothing holds the whole dataset. Evaluation, reports and prediction still index the dataset's
``images``; for such a folder that is a :class:`FileImages`, which has the shape of the in-memory
(N, 3, S, S) uint8 tensor and decodes only the rows asked for (a batch, a cluster's thumbnails), with
the in-memory reader's preprocessing (shorter side to S, centre crop).

When images must be resized (data.image_size differs from the files'), training sees DALI's resize and
evaluation PIL's (the in-memory reader's): both bilinear and antialiased, the same geometry, but not the same
pixels (on CIFAR-10 resized 32 -> 16 they differ by 4.4 of 255 on average). At the files' own size both
decoders give the same pixels. (Evaluation does not read through DALI: DALI 2.4's CPU decoder was seen to crash
the process, not raise, on a broken file in a later batch; Pillow names the file instead.)

Corrupt files are found when the folder is listed, by reading each file's header in a thread pool (the
same ``data.on_corrupt`` rule as the in-memory reader); a file whose header reads but whose body is broken
fails later with its path named.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fastmice.data.folder import decode_image, list_folder_images, report_skipped, resolve_roots
from fastmice.data.dataset import DataError, ImageDataset

LOADERS = ("auto", "memory", "dali")


class FileImages:
    """uint8 images (N, 3, S, S) decoded from ``paths`` when indexed; ``images[i:j]``, ``images[index_tensor]``."""

    dtype = torch.uint8

    def __init__(self, paths: Sequence[str], size: int, num_workers: int = 0):
        self.paths = list(paths)
        self.size = size
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size, self.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def _rows(self, idx: Any) -> list[int]:
        if isinstance(idx, slice):
            return list(range(*idx.indices(len(self.paths))))
        t = torch.as_tensor(idx)
        if t.dtype == torch.bool:
            t = t.nonzero().flatten()
        rows = t.flatten().tolist()
        n = len(self.paths)
        bad = [r for r in rows if not -n <= r < n]
        if bad:
            raise IndexError(f"index {bad[0]} is out of range for {n} images")
        return [r % n for r in rows]

    def _decode_row(self, row: int) -> np.ndarray:
        try:
            return decode_image(self.paths[row], self.size).transpose(2, 0, 1)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed files
            raise DataError(f"cannot decode {self.paths[row]}: {type(e).__name__}: {e} (its header read "
                            f"when the folder was listed; remove or replace the file)") from e

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]        # (3, S, S), as a tensor's integer index gives
        rows = self._rows(idx)
        out = np.empty((len(rows), 3, self.size, self.size), dtype=np.uint8)
        if len(rows) > 1 and self.num_workers > 1:
            # Threads: Pillow releases the GIL while decoding.
            with ThreadPoolExecutor(self.num_workers) as pool:
                for i, arr in enumerate(pool.map(self._decode_row, rows)):
                    out[i] = arr
        else:
            for i, r in enumerate(rows):
                out[i] = self._decode_row(r)
        return torch.from_numpy(out)

    def take(self, idx: Any) -> "FileImages":
        """The rows ``idx`` as another FileImages (nothing decoded)."""
        return FileImages([self.paths[r] for r in self._rows(idx)], self.size, self.num_workers)

    def numel(self) -> int:
        return len(self.paths) * 3 * self.size * self.size

    def decoded_bytes(self) -> int:
        return self.numel()

    def __repr__(self) -> str:
        return f"FileImages({len(self.paths)} files, {self.size}px, decoded on demand)"


def _header(path: str) -> tuple[int, int] | str:
    """(width, height) from the file's header, or the reason it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def check_headers(files: Sequence[str], num_workers: int = 0, progress: bool = True
                  ) -> list[tuple[int, int] | str]:
    """Each file's (width, height), or why it cannot be opened; threaded, with a progress bar."""
    from tqdm.auto import tqdm

    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_header, files, chunksize=256), total=len(files), desc="checking images",
                         unit="img", disable=None if progress else True, leave=False))


def folder_size(files: Sequence[str], image_size: int | None) -> int:
    """The side S a folder's images are decoded at: image_size, or the first readable image's (square) size."""
    if image_size is not None:
        return image_size
    for p in files:
        wh = _header(p)
        if isinstance(wh, tuple):
            w, h = wh
            if w != h:
                raise DataError(f"{p} is {w}x{h}: a folder streamed with data.loader=dali needs square images "
                                f"or data.image_size (every image is then resized to one square size)")
            return w
    raise DataError(f"none of the {len(files)} images could be opened (first: {files[0]})")


def stream_image_folder(roots: str | Path | Sequence[str | Path], image_size: int | None = None,
                        splits: Sequence[str] | None = None, on_corrupt: str = "skip", num_workers: int = 0,
                        progress: bool = True) -> ImageDataset:
    """An ImageDataset over a folder whose ``images`` is a :class:`FileImages`: listed and header-checked,
    not decoded. Files, labels and order are those of ``load_image_folder``."""
    roots = resolve_roots(roots)
    if isinstance(splits, str):
        splits = [splits]
    files, labels, class_names = list_folder_images(roots, splits)
    headers = check_headers(files, num_workers, progress)
    skipped = [(f, h) for f, h in zip(files, headers) if isinstance(h, str)]
    report_skipped(skipped, len(files), on_corrupt)
    keep = [i for i, h in enumerate(headers) if not isinstance(h, str)]
    if not keep:
        raise DataError(f"none of the {len(files)} images under {roots[0]} could be read "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    kept = [files[i] for i in keep]
    size = folder_size(kept, image_size)
    if image_size is None:   # as the in-memory reader: one size for all, or data.image_size to resize them
        other = [(files[i], headers[i]) for i in keep if headers[i] != (size, size)]
        if other:
            (path, (w, h)) = other[0]
            raise DataError(f"{path} is {w}x{h} but {kept[0]} ({size}x{size}) sets the size for this folder "
                            f"({len(other)} image(s) differ); set data.image_size to resize every image to one "
                            f"square size")
    lab = torch.tensor([labels[i] for i in keep], dtype=torch.int64) if labels is not None else None
    name = "folder:" + ",".join(str(r) for r in roots)
    return ImageDataset(FileImages(kept, size, num_workers), lab, class_names, name, kept, skipped)


def is_streamed(dataset: ImageDataset) -> bool:
    return isinstance(dataset.images, FileImages)


def stream_folder(cfg: Any) -> bool:
    """Whether a folder source (a DataSourceConfig) is streamed: data.loader=dali, or auto with decoded pixels
    (files x 3 x S x S bytes) above data.memory_limit_gb. Lists the folder; opens one header if S is unknown."""
    if cfg.source != "folder" or cfg.loader == "memory":
        return False
    if cfg.loader == "dali":
        return True
    with warnings.catch_warnings():   # the reader that runs next lists the folder again and says it once
        warnings.simplefilter("ignore")
        files, _, _ = list_folder_images(resolve_roots(cfg.root), cfg.splits)
    side = cfg.image_size
    if side is None:
        wh = next((h for h in map(_header, files[:16]) if isinstance(h, tuple)), None)
        if wh is None:
            return False            # the in-memory reader reports the unreadable files
        side = max(wh)
    return len(files) * 3 * side * side > cfg.memory_limit_gb * 1e9
