"""The optimizer and the learning-rate schedule of every method."""
from __future__ import annotations

import math

import torch

from fastmice.config import Config
from fastmice.methods import Method


def optimizer_flags(impl: str, device: torch.device) -> dict[str, bool]:
    """optim.impl as torch.optim keyword arguments. auto: fused on CUDA (one kernel for every parameter),
    foreach elsewhere (on the CPU bit for bit the per-parameter loop's results, and no slower)."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        return {"fused": True, "foreach": False}
    return {"fused": False, "foreach": impl == "foreach"}


def build_optimizer(cfg: Config, method: Method, impl: str | None = None) -> torch.optim.Optimizer:
    """SGD (MiCE, MoCo) or Adam (MIX'EM, SimCLR) over the method's parameter groups (MiCE: mu in a group of its
    own). `impl` overrides optim.impl (the naive reference passes "loop")."""
    o = cfg.optim
    groups = method.param_groups(o.weight_decay, o)
    device = next(method.parameters()).device
    flags = optimizer_flags(impl or o.impl, device)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, **flags)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **flags)


def learning_rate(cfg: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of step `step` (0-based) of epoch `epoch` (0-based): a pure function of the two, so a
    resumed run continues the schedule exactly. base = optim.lr, W = optim.warmup_epochs, T = optim.epochs.

    step: base * lr_gamma ** #{s in lr_steps: epoch >= s} (Appendix D), per step.
    cosine: base * (1 + cos(pi * min(max(p - W, 0) / (T - W), 1))) / 2 with p = epoch + step / steps_per_epoch.
      Both: while p < W, instead a linear per-step warm-up base * (p + 1 / steps_per_epoch) / W.
    mice_official (MiCE's util.adjust_learning_rate, called once at the start of each epoch): one value per
      epoch, step ignored. epoch e <= W: base * e / W (epoch 0 runs at lr 0; e == W, and W = 0, at base);
      e > W: base * lr_gamma ** #{s in lr_steps: e > s} (strictly greater: epoch 480 still runs at base for
      lr_steps [480, ...]).
    mixem_official (MIX'EM's train.py: Adam at base, CosineAnnealingLR(T_max=T, eta_min=0) stepped at the end
      of each 1-based epoch >= 10, i.e. 0-based epoch >= W - 1 with W = 10): one value per epoch, step ignored.
      With t = max(0, e + 1 - max(W, 1)) the scheduler steps taken before epoch e: base * (1 + cos(pi * t / T)) / 2.
      So epochs 0..W-1 run at base (held, no ramp), epoch W at base * (1 + cos(pi / T)) / 2, and the last epoch
      T - 1 at base * (1 + cos(pi * (T - W) / T)) / 2 (6.16e-7 for base 1e-4, T 200, W 10), never 0. W = 0 is
      W = 1 (the official loop cannot step before the first epoch ends).
    """
    o = cfg.optim
    if o.schedule == "mice_official":
        if epoch <= o.warmup_epochs:
            return o.lr * (epoch / o.warmup_epochs if epoch < o.warmup_epochs else 1.0)
        return o.lr * o.lr_gamma ** sum(epoch > s for s in o.lr_steps)
    if o.schedule == "mixem_official":
        t = max(0.0, epoch + 1 - max(o.warmup_epochs, 1.0))
        return o.lr * (1 + math.cos(math.pi * t / o.epochs)) / 2
    progress = epoch + step / steps_per_epoch
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1e-9)
        lr = o.lr * 0.5 * (1 + math.cos(math.pi * min(max(progress - o.warmup_epochs, 0.0) / span, 1.0)))
    else:
        lr = o.lr * o.lr_gamma ** sum(epoch >= s for s in o.lr_steps)
    if progress < o.warmup_epochs:
        lr = o.lr * (progress + 1.0 / steps_per_epoch) / o.warmup_epochs
    return lr
