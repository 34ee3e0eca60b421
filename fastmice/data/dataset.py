"""The in-memory dataset every reader returns: one uint8 tensor (N, 3, H, W), labels, class names, paths."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastmice.core.errors import DataError

__all__ = ["DataError", "ImageDataset", "resize_images"]


@dataclass
class ImageDataset:
    """A whole dataset as one uint8 tensor (N, 3, H, W) plus optional labels. For a folder streamed from disk
    (data.loader: dali) ``images`` is a FileImages, which decodes the rows it is indexed with."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    name: str
    paths: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"{self.name}: images must be uint8 (N, 3, H, W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if isinstance(self.images, torch.Tensor):   # else a folder decoded on demand (fastmice.data.stream)
            self.images = self.images.contiguous()
        n = self.images.shape[0]
        if self.labels is not None:
            self.labels = self.labels.to(torch.int64).contiguous()
            if self.labels.shape != (n,):
                raise DataError(f"{self.name}: {n} images but labels of shape {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != n:
            raise DataError(f"{self.name}: {n} images but {len(self.paths)} paths")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) shared by all images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, idx: torch.Tensor | Sequence[int] | np.ndarray) -> ImageDataset:
        """Rows ``idx`` (integer indices or a boolean mask), with labels and paths kept aligned."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        paths = None
        if self.paths is not None:
            paths = [self.paths[i] for i in idx.tolist()]
        labels = self.labels[idx] if self.labels is not None else None
        images = self.images[idx] if isinstance(self.images, torch.Tensor) else self.images.take(idx)
        return ImageDataset(images, labels, self.class_names, self.name, paths,
                            list(self.skipped))


# ----------------------------------------------------------------------------------------------
# Resizing (whole-tensor, used for binary sources and digits)


def resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 (N, 3, H, W) to (N, 3, size, size): bilinear (antialiased when shrinking),
    after a centre crop to a square so the aspect ratio is kept."""
    n, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    images = images[:, :, top:top + s, left:left + s]
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(0, n, chunk):  # chunks bound the float32 temporary
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < s)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
