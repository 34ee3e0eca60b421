"""SimCLR (Chen et al., 2020): NT-Xent on two views through a projection MLP, then spherical k-means of the
backbone's features: MIX'EM's first stage and a baseline of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.core.errors import ConfigError
from fastmice.methods.base import Method, MethodConfig, StepOutput
from fastmice.models.resnet import ResNet
from fastmice.ops.ntxent import nt_xent


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    embed_dim: int = 128            # output of the projection MLP
    hidden_dim: int = 512           # hidden width of the projection MLP(s)
    temperature: float = 0.5        # NT-Xent's temperature

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim < 1 or self.temperature <= 0:
            raise ConfigError(f"method.hidden_dim must be >= 1 and method.temperature > 0, got "
                              f"{self.hidden_dim}, {self.temperature}")


@dataclass
class SimCLROutput(StepOutput):
    parts: dict[str, Tensor] = field(default_factory=dict)   # the loss's terms, detached (for inspection)


class SimCLR(Method):
    Config = SimCLRConfig
    num_views = 2

    def __init__(self, cfg: SimCLRConfig, backbone: ResNet):
        super().__init__(cfg)
        self.temperature = cfg.temperature
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

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> SimCLROutput:
        x1, x2 = views
        # Both views in one pass, as SimCLR does: BatchNorm sees the 2N views together.
        _, z, _ = self.embed(torch.cat([x1, x2]))
        z1, z2 = z.chunk(2)
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
