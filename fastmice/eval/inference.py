"""Inference over a dataset: normalise (no augmentation), run the method's `infer`, collect the outputs."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from fastmice.core import distributed
from fastmice.views.augment import normalize_batch


def _batches(images: Any, bs: int) -> Iterator[torch.Tensor]:
    """images[i:i+bs] in order. Files decoded on demand (FileImages): the next batch decodes in a thread while
    the model runs on this one."""
    starts = range(0, images.shape[0], bs)
    if isinstance(images, torch.Tensor):
        yield from (images[s:s + bs] for s in starts)
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(images.__getitem__, slice(0, bs))
        for s in starts:
            x = ahead.result()
            if s + bs < images.shape[0]:
                ahead = pool.submit(images.__getitem__, slice(s + bs, s + 2 * bs))
            yield x


@torch.no_grad()
def infer_dataset(model: torch.nn.Module, images: torch.Tensor, cfg: Any, device: torch.device,
                  crop_size: int, autocast=None, channels_last: bool = False,
                  progress: bool = False, sharded: bool = False) -> dict[str, torch.Tensor]:
    """Run model.infer over uint8 images (N, 3, H, W) (a tensor, or FileImages) in batches; outputs stay on
    `device`. sharded (several processes, every one calling this): each infers its 1/W of the rows and every
    one gets all N outputs, in order. The images are normalised by data.mean/std, or left in [0, 1] under
    eval.normalize: false."""
    model.eval()
    norm = cfg.eval.normalize
    mean = torch.tensor(cfg.data.mean if norm else (0.0, 0.0, 0.0), device=device)
    std = torch.tensor(cfg.data.std if norm else (1.0, 1.0, 1.0), device=device)
    outs: dict[str, list[torch.Tensor]] = {}
    bs = cfg.eval.batch_size
    n = images.shape[0]
    sharded = sharded and distributed.active() and n >= distributed.world()
    if sharded:   # this process's rows; the others' are gathered at the end
        rows = distributed.uneven_rows(n)
        images = images[rows] if isinstance(images, torch.Tensor) else images.take(rows)
    for x in tqdm(_batches(images, bs), total=-(-images.shape[0] // bs), desc="evaluating",
                  disable=not progress, leave=False):
        x = x.to(device, non_blocking=True)
        x = normalize_batch(x, mean, std, out_size=crop_size, channels_last=channels_last)
        with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            out = model.infer(x)
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float())
    result = {k: torch.cat(v) for k, v in outs.items()}
    if sharded:
        result = {k: distributed.gather_uneven(v, n) for k, v in result.items()}
    return result
