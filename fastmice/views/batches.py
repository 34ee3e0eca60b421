"""The positions behind the trainer's two feeds (fastmice.views.feeds).

DeviceBatches: shuffled batches of a uint8 dataset that lives on the training device (the cifar10-airbench
way). One permutation per epoch from a dedicated generator; batch i is a gather of rows perm[i*B:(i+1)*B];
the trainer augments them with batched torch ops.

DaliBatches: the augmented views straight from NVIDIA DALI (data.loader: dali), this process's share of
the global batch.

In both the position advances only when the trainer says a step finished, so a checkpoint taken between
steps resumes the epoch where it stopped.
"""
from __future__ import annotations

from typing import Any, Callable

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
        self.epochs_started = 0                   # names the permutation (with pos: a batch) for prefetching
        self.before_draw: Callable[[], None] | None = None   # called before the generator is drawn from or set

    def start_epoch(self) -> None:
        if self.before_draw is not None:
            self.before_draw()
        self.perm = torch.randperm(self.images.shape[0], device=self.images.device, generator=self.generator)
        self.pos = 0
        self.epochs_started += 1

    @property
    def epoch_done(self) -> bool:
        return self.perm is None or self.pos >= self.steps_per_epoch

    @property
    def started(self) -> bool:
        return self.perm is not None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(indices (B,), images (B, 3, H, W) uint8) of the current position; call advance() after the step."""
        idx = self.rows(self.pos)
        return idx, self.images[idx]

    def batch(self, pos: int) -> Tensor:
        """The uint8 images (B, 3, H, W) of position `pos` of this epoch."""
        return self.images[self.rows(pos)]

    def rows(self, pos: int) -> Tensor:
        """The dataset rows (B,) of position `pos` of this epoch, on the device."""
        assert self.perm is not None, "start_epoch() first"
        return self.perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    def advance(self) -> None:
        self.pos += 1

    def state_dict(self) -> dict[str, Any]:
        return {"perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], epoch: int | None = None) -> None:
        """`epoch` (the trainer's completed epochs) matters only to DaliBatches."""
        if self.before_draw is not None:
            self.before_draw()
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        if "perm" not in state:   # saved by DaliBatches (data.loader changed): the epoch goes on in a new order
            self.perm = None
            if state["epoch"] >= 0:
                self.start_epoch()
        else:
            self.perm = None if state["perm"] is None else state["perm"].to(self.images.device)
        self.pos = state["pos"]
        self.epochs_started += 1


class DaliBatches:
    """Views from DALI in epochs of ``num_images // batch_size`` global steps, whatever the number of processes.

    Each epoch is a permutation of the rows, a function of (seed, epoch) alone, cut to whole global batches;
    global step k reads rows[k*B:(k+1)*B], process r the r-th 1/world of them. At the first batch of an epoch
    (or of the rest of one, after a resume) ``make_loader(rows, seed)`` builds this process's DALI loader over
    the rows laid out for DALI's sharding (shard r reads the r-th contiguous 1/world of the list, batch_size //
    world per step): every process's slices, one process after the other. The state is (epoch, position): a
    checkpoint resumes on any number of processes, and the rest of the epoch, exactly the rows not yet seen, is
    read in a fresh pipeline.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, make_loader: Callable[[Tensor, int], Any],
                 generator: torch.Generator | None = None, world: int = 1):
        if batch_size > num_images:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({num_images} images); "
                             f"lower optim.batch_size")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.make_loader = make_loader
        self.generator = generator   # the trainer's views() stream; DALI draws its own
        self.world = world
        self.steps_per_epoch = num_images // batch_size
        self.epoch = -1               # epochs started (the permutation's index)
        self.pos = 0
        self._loader = self._it = None

    @property
    def started(self) -> bool:
        return self.epoch >= 0

    @property
    def epoch_done(self) -> bool:
        return not self.started or self.pos >= self.steps_per_epoch

    def epoch_rows(self, epoch: int) -> Tensor:
        """The rows of epoch ``epoch`` in training order, (steps_per_epoch * batch_size,) int64 on the CPU."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_images, generator=g)[:self.steps_per_epoch * self.batch_size]

    def start_epoch(self) -> None:
        self.close()
        self.epoch += 1
        self.pos = 0

    def next_views(self) -> list[Tensor]:
        """This process's views of the current global batch; call advance() after the step."""
        assert self.started and not self.epoch_done, "start_epoch() first"
        if self._it is None:
            rows = self.epoch_rows(self.epoch)[self.pos * self.batch_size:]
            rows = rows.view(-1, self.world, self.batch_size // self.world).transpose(0, 1).reshape(-1)
            self._loader = self.make_loader(rows, self.seed + 7919 * (self.epoch + 1) + self.pos)
            self._it = iter(self._loader)
        return next(self._it).views

    def advance(self) -> None:
        self.pos += 1
        if self.pos >= self.steps_per_epoch:
            self.close()

    def close(self) -> None:
        """Release the epoch's pipeline (threads, GPU buffers)."""
        if self._it is not None:
            self._it.close()
            self._loader.close()
            self._it = self._loader = None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "dali", "epoch": self.epoch, "pos": self.pos,
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], epoch: int = 0) -> None:
        """`epoch`: the trainer's completed epochs, which name the permutations when the state was saved by
        DeviceBatches (data.loader changed): the epoch in progress, or the one about to start. The rest of an
        epoch in progress then comes from another permutation."""
        self.close()
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self.pos = state["pos"]
        if "epoch" in state:
            self.epoch = state["epoch"]
        else:
            in_progress = state["perm"] is not None and self.pos < self.steps_per_epoch
            self.epoch = epoch if in_progress else epoch - 1
