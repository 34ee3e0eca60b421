"""The registry of methods: each builds a model the one trainer drives through the same hooks.

A method's model has `num_views` (augmented views per image), `forward(*views)` returning an object with
`.loss` (0-dim) and `.posterior` ((B, K) or None), `after_step(out)` and `end_epoch() -> dict` (no-grad
bookkeeping: EMA, queue, prototypes), and `infer(x) -> dict` with at least `features` (B, F) and
`embedding` (B, D), the L2-normalised representation that k-means clusters, plus `probs` (B, K) where the
method has cluster probabilities of its own.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastmice.models.mice import MiCE
from fastmice.models.mixem import MixEM
from fastmice.models.resnet import ResNet


def _mice(cfg) -> nn.Module:
    m = cfg.model
    return MiCE(ResNet(m.arch, m.stem, m.width), m.num_clusters, m.embed_dim, m.queue_size, m.tau, m.kappa,
                m.ema_momentum, queue_dtype=getattr(torch, m.queue_dtype), single_pass=m.single_pass,
                prior=m.prior, class_term=m.class_term, shared_head=m.shared_head, mu_analytical=m.mu_analytical,
                mu_grad=m.mu_grad, omega_init=m.omega_init, omega_learned=m.omega_learned)


def _moco(cfg) -> nn.Module:
    # MoCo is MiCE with one expert, a uniform prior (A3) and no class-level term (A5): one code path.
    m = cfg.model
    return MiCE(ResNet(m.arch, m.stem, m.width), 1, m.embed_dim, m.queue_size, m.tau, 1.0, m.ema_momentum,
                queue_dtype=getattr(torch, m.queue_dtype), prior="uniform", class_term=False)


def _mixem(cfg, mixture: bool = True) -> nn.Module:
    m = cfg.model
    return MixEM(ResNet(m.arch, m.stem, m.width), m.num_clusters, m.embed_dim, m.hidden_dim, mixture=mixture,
                 temperature=m.tau, weights=cfg.mixem)


METHODS: dict[str, Callable[..., nn.Module]] = {
    "mice": _mice,
    "moco": _moco,
    "mixem": _mixem,
    "simclr": lambda cfg: _mixem(cfg, mixture=False),
}


def build_model(cfg) -> nn.Module:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; available: {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)
