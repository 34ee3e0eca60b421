"""Which loader a run uses, and the feed that gives the trainer its views (fastmice.views.feeds)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastmice.core import distributed
from fastmice.core.device import Precision
from fastmice.data.dataset import ImageDataset
from fastmice.data.stream import is_streamed
from fastmice.methods import Method
from fastmice.views.dali import INSTALL_HINT, dali_available, dali_device_id, dali_file_loader, dali_memory_loader
from fastmice.views.feeds import DaliFeed, MemoryFeed, ViewSpec


def resolve_loader(cfg: Any, dataset: ImageDataset, method: Method) -> str:
    """data.loader as a run uses it: dali for a folder streamed from disk (or data.loader: dali), else memory.
    auto never picks dali for data that is in memory already: batched torch ops on device-resident uint8 images
    measured 4x DALI's rate on the H100 (102,800 against 24,400 CIFAR samples/s)."""
    streamed = is_streamed(dataset)
    if cfg.data.loader != "dali" and not streamed:
        return "memory"
    if cfg.data.loader == "memory":
        raise ValueError(f"data.loader=memory, but the dataset given is {dataset.images!r}; load it with "
                         f"fastmice.data.sources.load_dataset(cfg.data) to decode it into memory")
    why = ("data.loader=dali" if cfg.data.loader == "dali" else
           f"the folder's decoded images ({dataset.images.decoded_bytes() / 1e9:.1f} GB) exceed "
           f"data.memory_limit_gb={cfg.data.memory_limit_gb}, so it is streamed with DALI")
    if not dali_available():
        raise RuntimeError(f"{why}, but NVIDIA DALI is not installed: {INSTALL_HINT}" +
                           ("" if cfg.data.loader == "dali" else
                            "; or raise data.memory_limit_gb, or set data.loader=memory"))
    if cfg.augment.randaugment_ops:
        raise ValueError(f"{why}, but RandAugment (augment.randaugment_ops) is not in the DALI pipeline; "
                         f"use data.loader=memory for this recipe")
    reason = method.needs_images()
    if reason:
        raise ValueError(f"{why}, but {reason}, which only the in-memory loader does; use data.loader=memory")
    return "dali"


def build_feed(cfg: Any, dataset: ImageDataset, method: Method, device: torch.device, precision: Precision,
               crop_size: int) -> tuple[str, MemoryFeed | DaliFeed]:
    """(the loader's name, the feed of this process's views), seeded from train.seed."""
    loader = resolve_loader(cfg, dataset, method)
    spec = ViewSpec(cfg.augment, crop_size, torch.tensor(cfg.data.mean, device=device),
                    torch.tensor(cfg.data.std, device=device), method.num_views, precision.view_dtype,
                    precision.channels_last)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.train.seed + 1)
    if loader == "memory":
        return loader, MemoryFeed(dataset.images.to(device), cfg.optim.batch_size, gen, spec,
                                  prefetch=cfg.train.prefetch)
    image_size = dataset.images.shape[-1]

    def make_loader(rows: Tensor, seed: int) -> Any:
        """This process's DALI loader over dataset rows `rows` (in that order, laid out for DALI's shards): the
        views of its share of each global batch, in the format the torch path makes them."""
        world = distributed.world()
        common = dict(batch_size=cfg.optim.batch_size // world, crop_size=crop_size, mean=cfg.data.mean,
                      std=cfg.data.std, num_views=method.num_views, augment=cfg.augment,
                      device_id=dali_device_id(device), seed=seed, shard_id=distributed.rank(),
                      num_shards=world, shuffle=False, drop_last=True, num_threads=cfg.data.num_workers or 4,
                      out_dtype=precision.view_dtype, channels_last=precision.channels_last)
        images = dataset.images
        if isinstance(images, Tensor):
            return dali_memory_loader(images[rows], **common)
        return dali_file_loader(files=[images.paths[i] for i in rows.tolist()], image_size=image_size, **common)

    return loader, DaliFeed(len(dataset), cfg.optim.batch_size, cfg.train.seed + 1, make_loader, gen, spec, device)
