"""Shuffled batches of a uint8 dataset that lives on the training device (the cifar10-airbench way).

One permutation per epoch from a dedicated generator; batch i is a gather of rows perm[i*B:(i+1)*B]. The
position advances only when the trainer says a step finished, so a checkpoint taken between steps resumes
the epoch exactly where it stopped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class DeviceBatches:
    def __init__(self, images: Tensor, batch_size: int, generator: torch.Generator):
        n = images.shape[0]
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} images); "
                             f"lower optim.batch_size")
        self.images = images                      # (N, 3, H, W) uint8 on the device
        self.batch_size = batch_size
        self.generator = generator
        self.steps_per_epoch = n // batch_size    # drop_last: every step sees a full batch
        self.perm: Tensor | None = None
        self.pos = 0

    def start_epoch(self) -> None:
        self.perm = torch.randperm(self.images.shape[0], device=self.images.device, generator=self.generator)
        self.pos = 0

    @property
    def epoch_done(self) -> bool:
        return self.perm is None or self.pos >= self.steps_per_epoch

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(indices (B,), images (B, 3, H, W) uint8) of the current position; call advance() after the step."""
        assert self.perm is not None, "start_epoch() first"
        idx = self.perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        return idx, self.images[idx]

    def advance(self) -> None:
        self.pos += 1

    def state_dict(self) -> dict[str, Any]:
        return {"perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm = None if state["perm"] is None else state["perm"].to(self.images.device)
        self.pos = state["pos"]
        self.generator.set_state(state["generator"])
