"""MIX'EM (Varamesh & Tuytelaars, ACCV 2020): SimCLR with a mixture-of-embeddings head.

K component MLPs (F -> H -> ReLU -> D, each output L2-normalised) and a mixing MLP (F -> H -> ReLU -> K, softmax
pi) give the embedding z = sum_k pi_k e_k, trained with NT-Xent plus three terms that shape the mixture: the
entropy of the batch-mean pi (maximised), each sample's confidence, and an associative embedding loss on the
pseudo-labels argmax pi (fastmice.ops.mixem_losses).

`method.recipe: official` (the default) computes these terms as the authors' public code does (the function
behind the published 78/82/44%); `paper` as the README/paper words them. Each item has its own switch (null:
the recipe's value), so each can be tried alone; docs/recipes.md lists them with the sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.methods.base import kmeans_readout
from fastmice.methods.simclr import SimCLR, SimCLRConfig, SimCLROutput, official_kmeans
from fastmice.models.heads import MixtureHead
from fastmice.models.resnet import ResNet
from fastmice.ops.mixem_losses import (associative_losses, batch_entropy, instance_entropy, instance_unconfidence,
                                       official_associative_losses)
from fastmice.ops.ntxent import nt_xent


@dataclass
class MixEMConfig(SimCLRConfig):
    name: str = "mixem"
    entropy: float = 2.0        # (i) weight of -H(mean_b pi)
    confidence: float = 0.1     # (ii) weight of the per-sample confidence term
    pull: float = 0.1           # (iii) pull embeddings to their pseudo-class mean
    push: float = 0.05          # (iii) push pseudo-class means apart
    # The recipe items (null: method.recipe's value; official | paper in brackets):
    entropy_per_view: bool | None = None     # sum of each view's -H(mean pi) (true) | one H over both views (false)
    confidence_kind: str | None = None       # max: mean (1 - max_k pi) (max) | entropy: mean H(pi_b) (entropy)
    confidence_per_view: bool | None = None  # summed over the two views, twice the joint mean (true) | mean (false)
    associative: str | None = None           # official: per view, zero vectors appended, Euclidean pull, linear
                                             # push (official) | paper: squared pull, exp(-d^2/2) push (paper)

    RECIPE_ITEMS: ClassVar[dict[str, dict[str, Any]]] = {
        **SimCLRConfig.RECIPE_ITEMS,
        "entropy_per_view": {"official": True, "paper": False},
        "confidence_kind": {"official": "max", "paper": "entropy"},
        "confidence_per_view": {"official": True, "paper": False},
        "associative": {"official": "official", "paper": "paper"}}
    ITEM_CHOICES: ClassVar[dict[str, tuple[str, ...] | None]] = {
        **SimCLRConfig.ITEM_CHOICES, "entropy_per_view": None, "confidence_kind": ("max", "entropy"),
        "confidence_per_view": None, "associative": ("official", "paper")}


class MixEM(SimCLR):
    Config = MixEMConfig

    def __init__(self, cfg: MixEMConfig, backbone: ResNet):
        super().__init__(cfg, backbone)
        self.k = cfg.num_clusters
        self.items = {item: cfg.setting(item) for item in cfg.RECIPE_ITEMS}   # resolved once

    def build_head(self, cfg: MixEMConfig, in_dim: int) -> nn.Module:
        return MixtureHead(in_dim, cfg.num_clusters, cfg.hidden_dim, cfg.embed_dim)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.backbone(x)
        _, pi, z = self.head(h)
        return h, z, pi

    def mixture_terms(self, z1: Tensor, z2: Tensor, pi1: Tensor, pi2: Tensor) -> dict[str, Tensor]:
        """The unweighted entropy, confidence, pull and push (0-dim each) of the two views' z (B, D) and pi
        (B, K), as the recipe items say: per view (summed over the views) or over both views together."""
        it = self.items
        both = torch.cat([pi1, pi2])
        ent = batch_entropy(pi1) + batch_entropy(pi2) if it["entropy_per_view"] else batch_entropy(both)
        conf_fn = instance_unconfidence if it["confidence_kind"] == "max" else instance_entropy
        conf = conf_fn(pi1) + conf_fn(pi2) if it["confidence_per_view"] else conf_fn(both)
        if it["associative"] == "official":   # each view's own means; the hard labels carry no gradient
            a1 = official_associative_losses(z1, pi1.argmax(1).detach(), self.k)
            a2 = official_associative_losses(z2, pi2.argmax(1).detach(), self.k)
            pull, push = a1[0] + a2[0], a1[1] + a2[1]
        else:
            pull, push = associative_losses(torch.cat([z1, z2]), both.argmax(1).detach(), self.k)
        return {"batch_entropy": ent, "confidence": conf, "pull": pull, "push": push}

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> SimCLROutput:
        z1, z2, pi1, pi2 = self.embed_views(*views)
        posterior = pi1.detach()
        if distributed.active():
            # Several processes: every rank's z and pi in rank order, with gradients (one all_gather), so the
            # losses below are those of the global batch and every rank's samples are negatives.
            cols = [z1, z2, pi1, pi2]
            z1, z2, pi1, pi2 = distributed.gather_cat(torch.cat(cols, 1)).split([t.shape[1] for t in cols], 1)
        loss = nt_xent(z1, z2, self.temperature)
        parts = {"nt_xent": loss.detach()}
        terms = self.mixture_terms(z1, z2, pi1, pi2)
        w = self.cfg
        loss = (loss - w.entropy * terms["batch_entropy"] + w.confidence * terms["confidence"]
                + w.pull * terms["pull"] + w.push * terms["push"])
        parts.update({name: t.detach() for name, t in terms.items()})
        return SimCLROutput(loss, posterior, parts)

    def readouts(self, out: dict[str, Tensor], eval_cfg: Any, seed: int) -> dict[str, np.ndarray]:
        """k-means on the normalised representation initialised from the mixture components (the mean of the
        samples whose argmax pi is k), argmax pi, and randomly initialised k-means with restarts. readout
        sklearn: the public code's Euclidean KMeans, 10 iterations, from the component means as they are (and
        k-means++ with 50 restarts); spherical: fastmice's spherical k-means (eval.kmeans_niter iterations,
        eval.kmeans_restarts restarts). A component that is never the argmax starts from a random sample of
        the run's seed (the public code draws a uniform vector in the features' bounding box instead)."""
        emb, k = out["embedding"], self.num_clusters
        pi_labels = out["probs"].argmax(1)
        onehot = torch.nn.functional.one_hot(pi_labels, k).to(emb.dtype)               # (N, K)
        counts = onehot.sum(0)
        centres = onehot.t() @ emb / counts.clamp_min(1).unsqueeze(1)                   # (K, D) means
        empty = counts == 0
        if bool(empty.any()):  # an unused component: start that centre from a random sample instead
            g = torch.Generator().manual_seed(seed)
            pick = torch.randint(0, emb.shape[0], (int(empty.sum()),), generator=g).to(emb.device)
            centres[empty] = emb[pick]
        if self.readout == "sklearn":
            return {"kmeans_mixture_init": official_kmeans(emb, k, seed, init_centroids=centres),
                    "mixture": pi_labels.cpu().numpy(),
                    "kmeans": official_kmeans(emb, k, seed)}
        return {"kmeans_mixture_init": kmeans_readout(emb, k, eval_cfg, seed, init_centroids=centres),
                "mixture": pi_labels.cpu().numpy(),
                "kmeans": kmeans_readout(emb, k, eval_cfg, seed, nredo=eval_cfg.kmeans_restarts)}
