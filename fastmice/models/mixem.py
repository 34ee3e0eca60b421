"""MIX'EM (Varamesh & Tuytelaars, ACCV 2020) and plain SimCLR, which is MIX'EM with the mixture removed.

SimCLR's NT-Xent on two views, with a mixture-of-embeddings head: K component MLPs (F -> H -> ReLU -> D, each
output L2-normalised) and a mixing MLP (F -> H -> ReLU -> K, softmax pi); the embedding is z = sum_k pi_k e_k.
Three extra losses shape the mixture: (i) maximise the entropy of the batch-mean pi, (ii) make each sample's
pi confident, (iii) an associative embedding loss on the pseudo-labels argmax pi.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice import distributed
from fastmice.models.resnet import ResNet
from fastmice.ntxent import nt_xent

EPS = 1e-8


@dataclass
class MixEMWeights:
    entropy: float = 2.0        # (i) weight of -H(mean_b pi)
    confidence: float = 0.1     # (ii) weight of the per-sample confidence term
    confidence_kind: str = "entropy"   # "entropy": mean_b H(pi_b) (the paper); "max": mean_b (1 - max_k pi_b) (public code)
    pull: float = 0.1           # (iii) pull embeddings to their pseudo-class mean
    push: float = 0.05          # (iii) push pseudo-class means apart


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


@dataclass
class MixEMOutput:
    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    posterior: Tensor | None = None     # pi of the first view, (B, K)


class MixEM(nn.Module):
    num_views = 2

    def __init__(self, backbone: ResNet, k: int, out_dim: int = 32, hidden: int = 512, mixture: bool = True,
                 temperature: float = 0.5, weights: MixEMWeights | None = None):
        super().__init__()
        self.k, self.mixture, self.temperature = k, mixture, temperature
        self.weights = weights or MixEMWeights()
        if self.weights.confidence_kind not in ("entropy", "max"):
            raise ValueError(f"confidence_kind must be 'entropy' or 'max', got {self.weights.confidence_kind!r}")
        self.backbone = backbone
        if mixture:
            self.head = MixtureHead(backbone.out_dim, k, hidden, out_dim)
        else:
            self.head = nn.Sequential(nn.Linear(backbone.out_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, out_dim))

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(features h (B, F), embedding z (B, D), pi (B, K) or None)."""
        h = self.backbone(x)
        if self.mixture:
            _, pi, z = self.head(h)
            return h, z, pi
        return h, self.head(h).float(), None

    def forward(self, x1: Tensor, x2: Tensor) -> MixEMOutput:
        # Both views in one pass, as SimCLR does: BatchNorm sees the 2N views together.
        _, z, pi = self.embed(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        posterior = None if pi is None else pi[: x1.shape[0]].detach()
        if distributed.active():
            # Several processes: every rank's z and pi in rank order, with gradients (one all_gather), so the
            # losses below are those of the global batch and every rank's samples are negatives.
            cols = [z1, z2] + ([] if pi is None else list(pi.chunk(2)))
            cols = distributed.gather_cat(torch.cat(cols, 1)).split([t.shape[1] for t in cols], 1)
            z1, z2, z = cols[0], cols[1], torch.cat(cols[:2])
            pi = None if pi is None else torch.cat(cols[2:])
        loss = nt_xent(z1, z2, self.temperature)
        parts = {"nt_xent": loss.detach()}
        if pi is not None:
            w = self.weights
            ent = batch_entropy(pi)
            conf = instance_entropy(pi) if w.confidence_kind == "entropy" else instance_unconfidence(pi)
            pull, push = associative_losses(z, pi.argmax(1).detach(), self.k)
            loss = loss - w.entropy * ent + w.confidence * conf + w.pull * pull + w.push * push
            parts.update(batch_entropy=ent.detach(), confidence=conf.detach(), pull=pull.detach(), push=push.detach())
        return MixEMOutput(loss, parts, posterior)

    # The trainer's hooks: nothing to do between steps or at the end of an epoch.
    def after_step(self, out: MixEMOutput) -> None:
        pass

    def end_epoch(self) -> dict:
        return {}

    @torch.no_grad()
    def infer(self, x: Tensor) -> dict[str, Tensor]:
        h, z, pi = self.embed(x)
        out = {"features": h.float(), "embedding": F.normalize(h.float(), dim=1), "z": F.normalize(z, dim=1)}
        if pi is not None:
            out["probs"] = pi
        return out
