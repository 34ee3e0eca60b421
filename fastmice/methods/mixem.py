"""MIX'EM (Varamesh & Tuytelaars, ACCV 2020): SimCLR with a mixture-of-embeddings head.

K component MLPs (F -> H -> ReLU -> D, each output L2-normalised) and a mixing MLP (F -> H -> ReLU -> K, softmax
pi) give the embedding z = sum_k pi_k e_k, trained with NT-Xent plus three terms that shape the mixture: the
entropy of the batch-mean pi (maximised), each sample's confidence, and an associative embedding loss on the
pseudo-labels argmax pi (fastmice.ops.mixem_losses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.core.errors import ConfigError
from fastmice.methods.base import kmeans_readout
from fastmice.methods.simclr import SimCLR, SimCLRConfig, SimCLROutput
from fastmice.models.heads import MixtureHead
from fastmice.models.resnet import ResNet
from fastmice.ops.mixem_losses import associative_losses, batch_entropy, instance_entropy, instance_unconfidence
from fastmice.ops.ntxent import nt_xent


@dataclass
class MixEMConfig(SimCLRConfig):
    name: str = "mixem"
    entropy: float = 2.0        # (i) weight of -H(mean_b pi)
    confidence: float = 0.1     # (ii) weight of the per-sample confidence term
    confidence_kind: str = "entropy"   # entropy: mean_b H(pi_b) (the paper) | max: mean_b (1 - max_k pi_b)
    pull: float = 0.1           # (iii) pull embeddings to their pseudo-class mean
    push: float = 0.05          # (iii) push pseudo-class means apart

    def validate(self) -> None:
        super().validate()
        if self.confidence_kind not in ("entropy", "max"):
            raise ConfigError(f"method.confidence_kind must be 'entropy' or 'max', got {self.confidence_kind!r}")


class MixEM(SimCLR):
    Config = MixEMConfig

    def __init__(self, cfg: MixEMConfig, backbone: ResNet):
        super().__init__(cfg, backbone)
        self.k = cfg.num_clusters

    def build_head(self, cfg: MixEMConfig, in_dim: int) -> nn.Module:
        return MixtureHead(in_dim, cfg.num_clusters, cfg.hidden_dim, cfg.embed_dim)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.backbone(x)
        _, pi, z = self.head(h)
        return h, z, pi

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> SimCLROutput:
        x1, x2 = views
        # Both views in one pass, as SimCLR does: BatchNorm sees the 2N views together.
        _, z, pi = self.embed(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        posterior = pi[: x1.shape[0]].detach()
        if distributed.active():
            # Several processes: every rank's z and pi in rank order, with gradients (one all_gather), so the
            # losses below are those of the global batch and every rank's samples are negatives.
            cols = [z1, z2] + list(pi.chunk(2))
            cols = distributed.gather_cat(torch.cat(cols, 1)).split([t.shape[1] for t in cols], 1)
            z1, z2, z = cols[0], cols[1], torch.cat(cols[:2])
            pi = torch.cat(cols[2:])
        loss = nt_xent(z1, z2, self.temperature)
        parts = {"nt_xent": loss.detach()}
        w = self.cfg
        ent = batch_entropy(pi)
        conf = instance_entropy(pi) if w.confidence_kind == "entropy" else instance_unconfidence(pi)
        pull, push = associative_losses(z, pi.argmax(1).detach(), self.k)
        loss = loss - w.entropy * ent + w.confidence * conf + w.pull * pull + w.push * push
        parts.update(batch_entropy=ent.detach(), confidence=conf.detach(), pull=pull.detach(), push=push.detach())
        return SimCLROutput(loss, posterior, parts)

    def readouts(self, out: dict[str, Tensor], eval_cfg: Any, seed: int) -> dict[str, np.ndarray]:
        """k-means on the normalised representation initialised from the mixture components (the mean of the
        samples whose argmax pi is k), argmax pi, and randomly initialised k-means with restarts."""
        emb, k = out["embedding"], self.num_clusters
        pi_labels = out["probs"].argmax(1)
        onehot = torch.nn.functional.one_hot(pi_labels, k).to(emb.dtype)               # (N, K)
        centres = onehot.t() @ emb                                                      # (K, D) sums
        empty = onehot.sum(0) == 0
        if bool(empty.any()):  # an unused component: start that centre from a random sample instead
            g = torch.Generator().manual_seed(seed)
            pick = torch.randint(0, emb.shape[0], (int(empty.sum()),), generator=g).to(emb.device)
            centres[empty] = emb[pick]
        return {"kmeans_mixture_init": kmeans_readout(emb, k, eval_cfg, seed, init_centroids=centres),
                "mixture": pi_labels.cpu().numpy(),
                "kmeans": kmeans_readout(emb, k, eval_cfg, seed, nredo=eval_cfg.kmeans_restarts)}
