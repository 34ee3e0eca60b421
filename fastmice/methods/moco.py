"""MoCo (He et al., 2020) with spherical k-means, the MiCE paper's two-stage baseline.

Built as MiCE with one expert, a uniform prior (A3) and no class-level term (A5): then MiCE's loss is exactly
MoCo's InfoNCE over the queue (Theorem 3, tested), so both share one code path. `num_clusters` is the K of
the k-means readout, not a number of experts.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastmice.core.errors import ConfigError
from fastmice.methods.base import Method, MethodConfig
from fastmice.methods.mice import QUEUE_DTYPES, MiCE, MiCEConfig
from fastmice.models.resnet import ResNet


@dataclass
class MoCoConfig(MethodConfig):
    name: str = "moco"
    queue_size: int = 16384         # V; must not exceed the dataset size
    tau: float = 1.0                # InfoNCE temperature
    ema_momentum: float = 0.999     # teacher m
    queue_dtype: str = "float32"    # float32 | bfloat16 | float16

    def validate(self) -> None:
        super().validate()
        if self.queue_size < 1 or self.tau <= 0 or not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"method.queue_size must be positive, method.tau > 0 and method.ema_momentum in "
                              f"[0, 1); got {self.queue_size}, {self.tau}, {self.ema_momentum}")
        if self.queue_dtype not in QUEUE_DTYPES:
            raise ConfigError(f"method.queue_dtype must be one of {', '.join(QUEUE_DTYPES)}, got {self.queue_dtype!r}")


class MoCo(MiCE):
    Config = MoCoConfig
    embedding_outputs = {"features": "features"}

    def __init__(self, cfg: MoCoConfig, backbone: ResNet):
        one_expert = MiCEConfig(num_clusters=1, embed_dim=cfg.embed_dim, queue_size=cfg.queue_size, tau=cfg.tau,
                                kappa=1.0, ema_momentum=cfg.ema_momentum, queue_dtype=cfg.queue_dtype,
                                prior="uniform", class_term=False)
        super().__init__(one_expert, backbone)
        self.cfg = cfg
        self.num_clusters = cfg.num_clusters

    @classmethod
    def check_config(cls, cfg) -> None:
        """The base's checks only: MiCE's are about settings (mu passes, the prior warm-up) MoCo does not have."""
        super(MiCE, cls).check_config(cfg)   # skips MiCE's own, as readouts below skips MiCE's readouts

    def readouts(self, out, eval_cfg, seed):
        """Spherical k-means of the (single) expert embeddings, best of eval.kmeans_restarts."""
        return Method.readouts(self, out, eval_cfg, seed)   # the base's k-means, not MiCE's posterior readouts

    def cluster_probabilities(self, out):
        return None        # one expert: the clusters are k-means over the training set
