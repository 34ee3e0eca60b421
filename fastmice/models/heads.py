"""Output heads on a backbone: K expert projections (MiCE's f and v) and MIX'EM's mixture of embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice.models.resnet import ResNet


class ExpertEmbedder(nn.Module):
    """Backbone followed by K linear expert heads, each L2-normalised: the student's and teacher's f/v."""

    def __init__(self, backbone: ResNet, k: int, dim: int, shared: bool = False):
        super().__init__()
        self.backbone = backbone
        self.k, self.dim, self.shared = k, dim, shared
        # K heads 512 -> D as one matmul; `shared`: one head for all experts (ablation A4)
        self.experts = nn.Linear(backbone.out_dim, dim if shared else k * dim)

    def heads(self, h: Tensor) -> Tensor:              # (B, F) -> (B, K, D)
        e = self.experts(h).view(h.shape[0], 1 if self.shared else self.k, self.dim)
        return F.normalize(e.float(), dim=-1).expand(-1, self.k, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.backbone(x))


class MixtureHead(nn.Module):
    """K component MLPs evaluated as batched matmuls, and the mixing MLP."""

    def __init__(self, in_dim: int, k: int, hidden: int, out_dim: int):
        super().__init__()
        self.k = k
        bound1, bound2 = 1 / math.sqrt(in_dim), 1 / math.sqrt(hidden)   # nn.Linear's default init
        self.w1 = nn.Parameter(torch.empty(k, in_dim, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(k, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(k, hidden, out_dim).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(k, out_dim).uniform_(-bound2, bound2))
        self.mixing = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, k))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, F) -> e (B, K, D) unit components, pi (B, K), z (B, D) = sum_k pi_k e_k."""
        a = torch.relu(torch.einsum("bf,kfh->bkh", h, self.w1) + self.b1)
        e = F.normalize((torch.einsum("bkh,khd->bkd", a, self.w2) + self.b2).float(), dim=-1)
        pi = torch.softmax(self.mixing(h).float(), dim=-1)
        z = (pi.unsqueeze(-1) * e).sum(1)
        return e, pi, z
