"""The trainer's one data interface: this process's augmented views of each global batch, with the batch's
dataset rows, in epochs, with a checkpointable position.

    feed.start_epoch(); views, index = feed.next_views(); ...the step...; feed.advance()

`MemoryFeed`: the dataset lives on the device as uint8 (the cifar10-airbench way) and is augmented there by
batched tensor ops; with `prefetch`, the next batch's views are made on a side CUDA stream while the step
runs (the same draws in the same order: identical training). `DaliFeed`: NVIDIA DALI decodes and augments
the files each epoch (data.loader: dali). Both advance only when told that a step finished, so a checkpoint
taken between steps resumes the epoch exactly where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fastmice.core import distributed
from fastmice.views.augment import AugmentConfig, augment_batch
from fastmice.views.batches import DaliBatches, DeviceBatches
from fastmice.views.prefetch import ViewPrefetcher


@dataclass
class ViewSpec:
    """How a method's views are made: `num_views` independent augmentations of each image, normalised, of side
    `crop_size`, in `dtype` and (channels_last) layout on the device of `mean`/`std` ((3,) float32)."""
    augment: AugmentConfig
    crop_size: int
    mean: Tensor
    std: Tensor
    num_views: int
    dtype: torch.dtype
    channels_last: bool

    def make(self, x: Tensor, generator: torch.Generator, rows: slice | None = None) -> list[Tensor]:
        """Views of uint8 images x (B, 3, H, W): the draws of all B, the pixels of `rows` only (None: all)."""
        return [augment_batch(x, self.augment, self.crop_size, self.mean, self.std, generator=generator,
                              out_dtype=self.dtype, channels_last=self.channels_last, rows=rows)
                for _ in range(self.num_views)]

    def shard(self, x: Tensor, generator: torch.Generator) -> list[Tensor]:
        """This process's share of a global batch's views: the same random stream as in one process."""
        return self.make(x, generator, distributed.shard_rows(x.shape[0]))


class Feed:
    """What both feeds share: the position, kept by `self.batches` (DeviceBatches or DaliBatches)."""

    batches: Any
    spec: ViewSpec

    generator = property(lambda self: self.batches.generator)
    steps_per_epoch = property(lambda self: self.batches.steps_per_epoch)
    pos = property(lambda self: self.batches.pos)
    epoch_done = property(lambda self: self.batches.epoch_done)
    started = property(lambda self: self.batches.started)

    def start_epoch(self) -> None:
        self.batches.start_epoch()

    def advance(self) -> None:
        self.batches.advance()

    def load_state_dict(self, state: dict[str, Any], epoch: int = 0) -> None:
        """`epoch`: the trainer's completed epochs (aligns a state saved by the other kind of feed)."""
        self.batches.load_state_dict(state, epoch=epoch)


class MemoryFeed(Feed):
    """Views of a device-resident uint8 dataset (N, 3, H, W), batch by batch of a seeded permutation."""

    def __init__(self, images: Tensor, batch_size: int, generator: torch.Generator, spec: ViewSpec,
                 prefetch: bool = False):
        self.batches = DeviceBatches(images, batch_size, generator)
        self.spec = spec
        self.prefetcher = ViewPrefetcher(images.device) if prefetch else None
        if self.prefetcher is not None:
            self.batches.before_draw = self.cancel_prefetch   # a new permutation or a loaded state

    images = property(lambda self: self.batches.images)

    def cancel_prefetch(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.cancel(self.batches.generator)

    def views(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """This process's views of a global batch x made outside the loop (from the feed's generator unless
        one is given: a pending prefetch is cancelled first, so the training draws stay in order)."""
        if generator is None:
            self.cancel_prefetch()
            generator = self.batches.generator
        return self.spec.shard(x, generator)

    def next_views(self) -> tuple[list[Tensor], Tensor]:
        """(this process's views, their dataset rows (B_local,) on the device) of the current batch; with
        prefetch, the next batch's augmentation is enqueued (on a side CUDA stream) before this step is."""
        b = self.batches
        rows = distributed.shard_rows(b.batch_size)
        index = b.rows(b.pos) if rows is None else b.rows(b.pos)[rows]

        def make(pos: int) -> Callable[[], list[Tensor]]:
            return lambda: self.spec.shard(b.batch(pos), b.generator)
        if self.prefetcher is None:
            return make(b.pos)(), index
        views = self.prefetcher.take((b.epochs_started, b.pos), make(b.pos), b.generator)
        if b.pos + 1 < b.steps_per_epoch:
            self.prefetcher.prefetch((b.epochs_started, b.pos + 1), make(b.pos + 1), b.generator)
        return views, index

    def state_dict(self) -> dict[str, Any]:
        state = self.batches.state_dict()
        if self.prefetcher is not None:   # the generator as it was before the next batch's views were drawn
            state["generator"] = self.prefetcher.generator_state(self.batches.generator)
        return state

    def close(self) -> None:
        """Nothing to release: a pending prefetch stays (the checkpoint holds the generator from before it)."""


class DaliFeed(Feed):
    """Views straight from NVIDIA DALI: `make_loader(rows, seed)` builds this process's pipeline over the rows
    (fastmice.views.batches.DaliBatches lays out the epochs and the shards)."""

    def __init__(self, num_images: int, batch_size: int, seed: int, make_loader: Callable[[Tensor, int], Any],
                 generator: torch.Generator, spec: ViewSpec, device: torch.device):
        self.batches = DaliBatches(num_images, batch_size, seed, make_loader, generator,
                                   world=distributed.world())
        self.spec = spec
        self.device = device
        self._rows: Tensor | None = None          # this epoch's rows on the device, for the indices
        self._rows_epoch = -2

    images = None                                  # nothing is held in memory

    def views(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        return self.spec.shard(x, generator if generator is not None else self.batches.generator)

    def next_views(self) -> tuple[list[Tensor], Tensor]:
        b = self.batches
        if self._rows_epoch != b.epoch:           # once an epoch: the rows to the device (not once a step)
            self._rows = b.epoch_rows(b.epoch).to(self.device)
            self._rows_epoch = b.epoch
        index = self._rows[b.pos * b.batch_size:(b.pos + 1) * b.batch_size]
        rows = distributed.shard_rows(b.batch_size)
        return b.next_views(), (index if rows is None else index[rows])

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def close(self) -> None:
        """Release the epoch's pipeline (threads, GPU buffers)."""
        self.batches.close()
