"""MIX'EM's losses on the mixture (Varamesh & Tuytelaars, ACCV 2020): entropy, confidence and the associative
embedding terms. All are batched tensor ops with masks, so none waits on the host.

Two associative losses: `associative_losses` is the paper's wording (Newell et al.'s associative embedding:
squared pull, exp(-d^2/2) push over non-empty pairs); `official_associative_losses` is what the authors' public
code computes (alivaramesh/MIXEM train.py), the function behind the published numbers. Which one a run uses,
and whether the terms are taken per view, is MixEMConfig's choice (fastmice.methods.mixem, docs/recipes.md).
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


def official_associative_losses(z: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(pull, push) of one view as MIX'EM's public code computes them, unweighted.

    z (B, D) the mixed embeddings (not renormalised), labels (B,) int64 hard pseudo-labels in [0, k) (argmax pi,
    detached by the caller). One zero vector labelled c is appended for every component c, so with n_c members
    the mean is mu_c = sum_{y_n = c} z_n / (n_c + 1) (an empty component's mean is the zero vector) and
        pull = (1/K) sum_c (||0 - mu_c|| + sum_{y_n = c} ||z_n - mu_c||) / (n_c + 1)      (Euclidean, not squared)
        push = -(1/(K^2 - K)) sum over the K^2 - K ordered pairs c != c' of ||mu_c - mu_c'||   (linear, unbounded)
    push is 0 for K = 1. The norms are torch.linalg.vector_norm, whose gradient at a zero distance is 0 (as in
    the official code: coincident means, or a sample at its mean, push and pull nothing), never NaN.
    Returns two 0-dim tensors in z's dtype; differentiable in z.
    """
    onehot = F.one_hot(labels, k).to(z.dtype)                                   # (B, K)
    counts = onehot.sum(0) + 1                                                  # members + the zero vector
    means = onehot.t() @ z / counts.unsqueeze(1)                                # (K, D)
    member = torch.linalg.vector_norm(z - onehot @ means, dim=1)                # (B,) ||z_n - mu_{y_n}||
    per_component = (onehot.t() @ member + torch.linalg.vector_norm(means, dim=1)) / counts
    pull = per_component.sum() / k
    if k < 2:
        return pull, z.new_zeros(())
    # the diagonal (c = c') is a zero distance: it adds 0 to the sum and, with vector_norm, 0 to the gradient
    dist = torch.linalg.vector_norm(means.unsqueeze(1) - means.unsqueeze(0), dim=-1)   # (K, K)
    push = -dist.sum() / (k * k - k)
    return pull, push
