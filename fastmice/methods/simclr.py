"""SimCLR (Chen et al., 2020): NT-Xent on two views through a projection MLP, then k-means of the backbone's
normalised features: MIX'EM's first stage and a baseline of its own.

`method.recipe` (official | paper) picks the default of each item switch left null: `bn` (per_view: each view
through the network as its own batch, as MIX'EM's public code does; joint: both views in one batch, BatchNorm
statistics over 2B) and `readout` (sklearn: the public code's Euclidean KMeans with 10 iterations; spherical:
fastmice's spherical k-means with eval.kmeans_niter iterations). docs/recipes.md has the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.core.errors import ConfigError
from fastmice.methods.base import Method, MethodConfig, StepOutput
from fastmice.models.resnet import ResNet
from fastmice.ops.kmeans import euclidean_kmeans
from fastmice.ops.ntxent import nt_xent

RECIPES = ("official", "paper")
# The public readout (MIX'EM's cluster_eval.py): scikit-learn KMeans, 10 Lloyd iterations, random_state 0 (the
# run's train.seed here, 0 by default); k-means++ with 50 restarts, or one run from given centres.
OFFICIAL_KMEANS_ITERS = 10
OFFICIAL_KMEANS_RESTARTS = 50


def official_kmeans(x: Tensor, k: int, seed: int, init_centroids: Tensor | None = None) -> np.ndarray:
    """MIX'EM's public k-means readout of x (N, D) (already L2-normalised by the caller): assignments (N,)."""
    return euclidean_kmeans(x, k, init_centroids=init_centroids, max_iter=OFFICIAL_KMEANS_ITERS, seed=seed,
                            n_init=1 if init_centroids is not None else OFFICIAL_KMEANS_RESTARTS)


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    embed_dim: int = 128            # output of the projection MLP
    hidden_dim: int = 512           # hidden width of the projection MLP(s)
    temperature: float = 0.5        # NT-Xent's temperature
    # official: as the authors' public code trains and evaluates (MIX'EM's repository, whose plain SimCLR is
    # the 70% STL-10 baseline) | paper: the papers' wording. Each item below left null follows the recipe.
    recipe: str = "official"
    bn: str | None = None           # per_view (official) | joint (paper: both views in one batch)
    readout: str | None = None      # sklearn (official: Euclidean KMeans, 10 iterations) | spherical (paper)

    # item -> {recipe: value}; item -> its valid values (None: a boolean)
    RECIPE_ITEMS: ClassVar[dict[str, dict[str, Any]]] = {
        "bn": {"official": "per_view", "paper": "joint"},
        "readout": {"official": "sklearn", "paper": "spherical"}}
    ITEM_CHOICES: ClassVar[dict[str, tuple[str, ...] | None]] = {
        "bn": ("per_view", "joint"), "readout": ("sklearn", "spherical")}

    def setting(self, item: str) -> Any:
        """The value of a recipe item: its own setting, or the recipe's value when that is null."""
        value = getattr(self, item)
        return self.RECIPE_ITEMS[item][self.recipe] if value is None else value

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim < 1 or self.temperature <= 0:
            raise ConfigError(f"method.hidden_dim must be >= 1 and method.temperature > 0, got "
                              f"{self.hidden_dim}, {self.temperature}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"method.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for item, choices in self.ITEM_CHOICES.items():
            value = getattr(self, item)
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"method.{item} must be one of {', '.join(choices)} (or null: the recipe's "
                                  f"choice), got {value!r}")


@dataclass
class SimCLROutput(StepOutput):
    parts: dict[str, Tensor] = field(default_factory=dict)   # the loss's terms, detached (for inspection)


class SimCLR(Method):
    Config = SimCLRConfig
    num_views = 2

    def __init__(self, cfg: SimCLRConfig, backbone: ResNet):
        super().__init__(cfg)
        self.temperature = cfg.temperature
        self.bn = cfg.setting("bn")
        self.readout = cfg.setting("readout")
        self.backbone = backbone
        self.head = self.build_head(cfg, backbone.out_dim)

    def build_head(self, cfg: SimCLRConfig, in_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(cfg.hidden_dim, cfg.embed_dim))

    def backbones(self) -> list[nn.Module]:
        return [self.backbone]

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(features h (B, F), embedding z (B, D), mixture weights pi (B, K) or None)."""
        h = self.backbone(x)
        return h, self.head(h).float(), None

    def embed_views(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(z1, z2, pi1, pi2) of the two views. bn per_view: each view is its own batch (BatchNorm statistics,
        and running statistics updated twice, per view, as in the public code); joint: one pass over both."""
        if self.bn == "per_view":
            _, z1, pi1 = self.embed(x1)
            _, z2, pi2 = self.embed(x2)
            return z1, z2, pi1, pi2
        _, z, pi = self.embed(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
        pi1, pi2 = pi.chunk(2) if pi is not None else (None, None)
        return z1, z2, pi1, pi2

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> SimCLROutput:
        z1, z2, _, _ = self.embed_views(*views)
        if distributed.active():   # every rank's z with gradients: the loss of the global batch
            z1, z2 = distributed.gather_cat(torch.cat([z1, z2], 1)).chunk(2, dim=1)
        loss = nt_xent(z1, z2, self.temperature)
        return SimCLROutput(loss, None, {"nt_xent": loss.detach()})

    @torch.no_grad()
    def infer(self, x: Tensor) -> dict[str, Tensor]:
        h, z, pi = self.embed(x)
        out = {"features": h.float(), "embedding": F.normalize(h.float(), dim=1), "z": F.normalize(z, dim=1)}
        if pi is not None:
            out["probs"] = pi
        return out

    def readouts(self, out: dict[str, Tensor], eval_cfg: Any, seed: int) -> dict[str, np.ndarray]:
        """k-means of the normalised representation: readout sklearn, the public code's Euclidean KMeans
        (k-means++, 50 restarts, 10 iterations); spherical, fastmice's (eval.kmeans_restarts, kmeans_niter)."""
        if self.readout == "sklearn":
            return {"kmeans": official_kmeans(out["embedding"], self.num_clusters, seed)}
        return super().readouts(out, eval_cfg, seed)
