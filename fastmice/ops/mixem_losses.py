"""MIX'EM's losses on the mixture (Varamesh & Tuytelaars, ACCV 2020): entropy, confidence and the associative
embedding terms. All are batched tensor ops with masks, so none waits on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


def batch_entropy(pi: Tensor) -> Tensor:
    """H(mean_b pi): log K at most, reached when the clusters are used equally."""
    p = pi.mean(0)
    return -(p * torch.log(p + EPS)).sum()


def instance_entropy(pi: Tensor) -> Tensor:
    """mean_b H(pi_b): 0 when every sample's mixture is one-hot."""
    return -(pi * torch.log(pi + EPS)).sum(1).mean()


def instance_unconfidence(pi: Tensor) -> Tensor:
    """mean_b (1 - max_k pi_b,k): the public code's confidence term."""
    return (1.0 - pi.max(1).values).mean()


def associative_losses(z: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(pull, push) of the associative embedding loss (Newell et al., 2017) on pseudo-labels.

    pull = mean_n ||z_n - c_{y_n}||^2; push = mean over pairs of distinct non-empty clusters of
    exp(-||c_k - c_k'||^2 / 2). Computed with one-hot matmuls: no host synchronisation, empty clusters masked.
    """
    onehot = F.one_hot(labels, k).to(z.dtype)                                   # (B, K)
    counts = onehot.sum(0)                                                      # (K,)
    centres = onehot.t() @ z / counts.clamp_min(1).unsqueeze(1)                 # (K, D)
    pull = (z - onehot @ centres).pow(2).sum(1).mean()
    nonempty = counts > 0
    pair = nonempty.unsqueeze(0) & nonempty.unsqueeze(1) & ~torch.eye(k, dtype=torch.bool, device=z.device)
    d2 = torch.cdist(centres, centres).pow(2)
    push = (torch.exp(-d2 / 2) * pair).sum() / pair.sum().clamp_min(1)
    return pull, push
