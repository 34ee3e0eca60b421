"""The naive reference: a MiCE step the way the official code (and most research code) runs it.

Kept only as the baseline of bench/bench_train.py and the oracle of tests/test_fast_step.py; nothing trains
with it. Everything the fast step (fastmice.engine.trainer) does differently is undone here:

- fp32, NCHW (no autocast, no channels_last), eager (no torch.compile);
- the student backbone run separately on x_f and on x_g, the teacher on x_v;
- the loss is `mice_elbo_reference` (plain torch, materialises the (B, K, V) logits);
- torch.optim.SGD with foreach=False (a Python loop over the parameters);
- the EMA teacher one parameter at a time, `p_t = m p_t + (1 - m) p_s` (MoCo's loop);
- the enqueue after the loss with the pointer read on the host (a sync every step), the mu sums one cluster at
  a time, and the loss read with .item() every step (a loss meter);
- data from a torch Dataset in a CPU DataLoader with per-sample transforms: torchvision.transforms (MoCo v1:
  RandomResizedCrop, RandomGrayscale, ColorJitter, RandomHorizontalFlip, ToTensor, Normalize) when torchvision
  imports; otherwise fastmice.views.augment.augment_batch applied to each image alone (B = 1) in the workers, the
  same distribution as the batched path, computed the slow way (per-sample Python).

The functions act on a fastmice MiCE model (build_model / a Trainer's model): same module, same weights, same
buffers, so a naive step and a fast step from a deep copy of one model can be compared tensor for tensor. The
model must be fp32 and NCHW (`naive_copy` makes such a copy).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from fastmice.views.augment import AugmentConfig, augment_batch
from fastmice.ops.mice_elbo import mice_elbo_reference


@dataclass
class NaiveOutput:
    loss: Tensor        # 0-dim, with its graph
    posterior: Tensor   # (B, K) detached
    v: Tensor           # (B, K, D) teacher embeddings of x_v


def naive_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a MiCE model in fp32, NCHW (contiguous) memory format, on the same device."""
    return copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)


def naive_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's parameter groups (mu on its own) with plain per-parameter SGD (foreach=False)."""
    from fastmice.engine.optim import build_optimizer
    return build_optimizer(cfg, model, impl="loop")


def naive_forward(model, x_f: Tensor, x_v: Tensor, x_g: Tensor | None) -> NaiveOutput:
    """Teacher on x_v, then the student backbone on x_f and again on x_g; the fp32 reference loss."""
    with torch.no_grad():
        v = model.teacher(x_v)                                      # (B, K, D)
    f = model.student.heads(model.student.backbone(x_f))            # (B, K, D)
    if model.prior == "gating":
        g = F.normalize(model.gate(model.student.backbone(x_g)).float(), dim=-1)   # (B, D)
    else:                                                           # uniform prior (MoCo): no gating view
        g = torch.zeros(f.shape[0], model.dim, device=f.device)
    mu = model.mu if model.class_term else torch.zeros_like(model.mu)
    g = g * model.prior_scale                                       # the gating prior's warm-up (1 without one)
    loss, posterior = mice_elbo_reference(f, v, g, mu, model.omega, model.queue, model.tau, model.kappa,
                                          learn_omega=model.omega_learned)
    return NaiveOutput(loss, posterior, v)


def naive_backward(model, optimizer: torch.optim.Optimizer, x_f: Tensor, x_v: Tensor,
                   x_g: Tensor | None) -> NaiveOutput:
    """Forward and backward; the gradients are left in .grad."""
    model.train()
    out = naive_forward(model, x_f, x_v, x_g)
    optimizer.zero_grad()
    out.loss.backward()
    return out


@torch.no_grad()
def naive_update(model, optimizer: torch.optim.Optimizer, out: NaiveOutput, lr: float | None = None) -> None:
    """SGD step, EMA one parameter at a time, enqueue with a host-side pointer, mu sums cluster by cluster."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    m = model.ema_momentum
    for p_t, p_s in zip(model.teacher.parameters(), model.student.parameters()):
        p_t.data = p_t.data * m + p_s.data * (1.0 - m)
    v, b, size = out.v, out.v.shape[0], model.queue_size
    ptr = int(model.queue_ptr)                                      # host sync, as the official code does
    idx = torch.arange(ptr, ptr + b, device=v.device) % size
    model.queue[:, idx] = v.transpose(0, 1).to(model.queue.dtype)
    model.queue_ptr.fill_((ptr + b) % size)
    if model.class_term:
        pred = out.posterior.argmax(dim=1)
        for k in range(model.k):
            chosen = pred == k
            model.mu_sum[k] += v[chosen, k].float().sum(0)
            model.mu_count[k] += chosen.sum().float()
        model.posterior_hist += torch.histc(out.posterior.float(), model.posterior_bins, 0.0, 1.0)


def naive_step(model, optimizer: torch.optim.Optimizer, x_f: Tensor, x_v: Tensor, x_g: Tensor | None,
               lr: float | None = None) -> tuple[float, Tensor]:
    """One naive training step on fp32 NCHW views; returns (loss as a Python float, posterior)."""
    out = naive_backward(model, optimizer, x_f, x_v, x_g)
    naive_update(model, optimizer, out, lr)
    return out.loss.item(), out.posterior


# ---- data -----------------------------------------------------------------------------------------------
def torchvision_transform(aug: AugmentConfig, crop_size: int, mean: Sequence[float], std: Sequence[float]):
    """MoCo v1's torchvision pipeline from an AugmentConfig, or None where torchvision does not import or the
    config asks for something this pipeline leaves out (SimCLR order, blur, RandAugment)."""
    if aug.order != "moco" or aug.blur_p > 0 or aug.randaugment_ops > 0:
        return None
    try:
        from torchvision import transforms as T
    except Exception:  # noqa: BLE001 - missing, or a wheel built for another torch
        return None
    jitter = T.ColorJitter(*aug.jitter)
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio)),
        T.RandomGrayscale(p=aug.grayscale_p),
        jitter if aug.jitter_p >= 1.0 else T.RandomApply([jitter], p=aug.jitter_p),
        T.RandomHorizontalFlip(p=aug.flip_p),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


class NaiveViews(Dataset):
    """`num_views` independently augmented views of image i, made per sample (in a DataLoader worker).

    `source`: a uint8 (N, 3, H, W) CPU tensor, or a list of image files decoded on every access (the
    ImageFolder way; `image_size` resizes them as fastmice's folder loader does)."""

    def __init__(self, source: Tensor | list[str | Path], aug: AugmentConfig, crop_size: int,
                 mean: Sequence[float], std: Sequence[float], num_views: int = 3, image_size: int | None = None):
        self.source, self.aug, self.crop_size = source, aug, crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_views, self.image_size = num_views, image_size
        self.transform = torchvision_transform(aug, crop_size, mean, std)
        self.kind = ("torchvision.transforms per image" if self.transform is not None
                     else "fastmice.views.augment.augment_batch on one image at a time (torchvision unavailable)")

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, i: int):
        if isinstance(self.source, Tensor):
            return self.source[i]                                   # (3, H, W) uint8
        from fastmice.data.folder import decode_image
        return torch.from_numpy(decode_image(str(self.source[i]), self.image_size).transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        img = self._image(i)
        if self.transform is not None:
            from PIL import Image
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            return tuple(self.transform(pil) for _ in range(self.num_views))
        return tuple(augment_batch(img[None], self.aug, self.crop_size, self.mean, self.std)[0]
                     for _ in range(self.num_views))


def naive_loader(dataset: NaiveViews, batch_size: int, num_workers: int, num_samples: int | None = None,
                 seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Shuffled batches of views, drop_last; num_samples > len(dataset) runs over several permutations in one
    iterator (no worker restart between epochs)."""
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, num_samples=num_samples, generator=gen)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=pin_memory, persistent_workers=False)
