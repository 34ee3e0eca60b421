"""The random draws and pixel operations that the batched augmentations share (fastmice.views.augment and
fastmice.views.randaugment)."""
from __future__ import annotations

import torch
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)    # ITU-R 601-2 luma (PIL's convert("L"))


def rand_uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) float32 drawn on the generator's own device (torch requires that), then moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def grayscale(img: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return LUMA[0] * img[:, 0:1] + LUMA[1] * img[:, 1:2] + LUMA[2] * img[:, 2:3]
