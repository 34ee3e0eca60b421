"""Gating prototypes omega: the centres of a Max-Mahalanobis distribution (MiCE Appendix B, Algorithm 2)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def mmd_prototypes(k: int, d: int) -> Tensor:
    """K unit vectors in R^d with pairwise inner product -1/(K-1): the most spread-out set (needs K <= d+1).

    Algorithm 2: omega_1 = e_1; for i >= 2, omega_ij = -(1/(K-1) + omega_i . omega_j) / omega_jj for j < i,
    then omega_ii = sqrt(1 - ||omega_i||^2) (the line the paper's text extraction garbles).
    Computed in float64 so the constraints hold to ~1e-12 before the cast to float32.
    """
    if k < 1 or d < 1:
        raise ValueError(f"mmd_prototypes needs k >= 1 and d >= 1, got k={k}, d={d}")
    if k > d + 1:
        raise ValueError(
            f"mmd_prototypes: K={k} centres with pairwise inner product -1/(K-1) need K <= d+1 = {d + 1}; "
            f"raise the gating embedding size or lower K")
    omega = torch.zeros(k, d, dtype=torch.float64)
    omega[0, 0] = 1.0
    if k == 1:
        return omega.float()
    c = 1.0 / (k - 1)
    for i in range(1, k):
        for j in range(i):
            omega[i, j] = -(c + omega[i] @ omega[j]) / omega[j, j]
        if i < d:  # for K = d+1 the last centre is fully determined by the others (its remainder is 0)
            omega[i, i] = math.sqrt(max(0.0, 1.0 - float(omega[i] @ omega[i])))
    return omega.float()
