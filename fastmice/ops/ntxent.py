"""SimCLR's NT-Xent loss (Chen et al., 2020): the normalised-temperature cross-entropy over 2N views."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """0-dim loss for two views z1, z2 (N, D) of the same N samples.

    Cosine similarity; for each of the 2N anchors the other view of its sample is the positive and the
    other 2N - 2 embeddings are the negatives; averaged over the 2N anchors.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs two (N, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError("nt_xent needs at least 2 samples (the negatives are the other samples)")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)                        # (2N, D)
    sim = z @ z.t() / temperature                                              # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # i <-> i + N
    return F.cross_entropy(sim, target)
