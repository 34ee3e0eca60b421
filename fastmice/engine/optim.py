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
    """Step decay at optim.lr_steps (Appendix D) or cosine decay, after an optional linear warm-up."""
    o = cfg.optim
    progress = epoch + step / steps_per_epoch
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1e-9)
        lr = o.lr * 0.5 * (1 + math.cos(math.pi * min(max(progress - o.warmup_epochs, 0.0) / span, 1.0)))
    else:
        lr = o.lr * o.lr_gamma ** sum(epoch >= s for s in o.lr_steps)
    if progress < o.warmup_epochs:
        lr = o.lr * (progress + 1.0 / steps_per_epoch) / o.warmup_epochs
    return lr
