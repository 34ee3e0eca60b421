"""The contract every method implements, and what methods share (solo-learn's BaseMethod, made small).

A method is one file: its config section (a `MethodConfig` dataclass, the `method:` section of a run's YAML),
its number of views, its training forward, the no-grad work after each step and at the end of each epoch,
inference, the readouts evaluation reports, and what several processes must add up. The trainer knows
nothing else about it: it builds the method from the registry (`fastmice.methods`), feeds it views and
indices, steps its optimizer and calls these hooks.

Device rules: a method never moves tensors between devices and never waits on the host in `forward` or
`after_step` (the hot path); `end_epoch` runs once an epoch and may synchronise.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fastmice.core.errors import ConfigError
from fastmice.ops.kmeans import spherical_kmeans


@dataclass
class MethodConfig:
    """The settings every method has; a method's own section subclasses this."""
    name: str = ""                  # the method's registry name (mice, moco, simclr, mixem, ...)
    num_clusters: int = 10          # K
    embed_dim: int = 128            # D

    def validate(self) -> None:
        if self.num_clusters < 1:
            raise ConfigError(f"method.num_clusters must be >= 1, got {self.num_clusters}")
        if self.embed_dim < 1:
            raise ConfigError(f"method.embed_dim must be >= 1, got {self.embed_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StepOutput:
    """What the training forward returns: the loss (0-dim, to minimise) and, where the method has one, the
    detached (B, K) posterior of this rank's samples. Methods extend it with what `after_step` needs."""
    loss: Tensor
    posterior: Tensor | None = None


@dataclass
class EpochData:
    """What a method's end-of-epoch hook may read. `images` is the whole training set, (N, 3, H, W) uint8 on
    the training device, or None when DALI streams it from disk (then `Method.needs_images` must be None).
    `views(x, generator)` augments a global batch x as training does and returns this process's share."""
    epoch: int                       # the epoch that ends, 0-based
    lr: float                        # the schedule's learning rate at the epoch's last step
    momentum: float                  # optim.momentum, for a method's own end-of-epoch SGD
    images: Tensor | None
    batch_size: int                  # the global batch
    views: Callable[[Tensor, torch.Generator], list[Tensor]]
    autocast: Callable[[], Any]      # a context-manager factory: the run's precision
    device: torch.device
    seed: int

    def batches(self, generator: torch.Generator) -> Iterator[list[Tensor]]:
        """One pass over the images in an order drawn from `generator`: the views of each full global batch."""
        if self.images is None:
            raise RuntimeError("this method's end-of-epoch pass needs the images in memory (data.loader=memory)")
        n, bs = self.images.shape[0], self.batch_size
        perm = torch.randperm(n, device=self.device, generator=generator)
        for i in range(n // bs):
            yield self.views(self.images[perm[i * bs:(i + 1) * bs]], generator)


class Method(nn.Module):
    """Base class of every method. Subclasses set `Config`, `num_views` and `backbone_key`, build their
    networks in __init__, and implement `forward`, `infer` and `backbones`; the other hooks default to doing
    nothing."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    num_views: int = 2                         # augmented views of each image per step
    backbone_key: ClassVar[str] = "backbone."  # where its backbone's weights sit in its state_dict
    # predict --embeddings NAME writes infer()'s output KEY: {NAME: KEY}
    embedding_outputs: ClassVar[dict[str, str]] = {"features": "features"}

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg
        self.num_clusters = cfg.num_clusters

    # ---- configuration and data checks -----------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Checks across sections on the whole run config (cfg.method is this method's section); raise
        ConfigError naming the settings. Called when the config is read, before anything is built."""

    def check_data(self, num_images: int) -> None:
        """Checks against the dataset; raise ValueError naming the setting and the limit."""
        if self.num_clusters > num_images:
            raise ValueError(f"method.num_clusters={self.num_clusters} exceeds the dataset size ({num_images})")

    def needs_images(self) -> str | None:
        """Why this method's end-of-epoch work needs the whole dataset in memory (DALI is then refused), or None."""
        return None

    @property
    def find_unused_parameters(self) -> bool:
        """Whether some trainable parameters get no gradient in `forward` (DistributedDataParallel must know)."""
        return False

    def set_shuffle_bn(self, on: bool) -> None:
        """Several processes: whether the teacher uses MoCo's shuffle-BN (methods without a teacher ignore it)."""

    # ---- training ----------------------------------------------------------------------------------------
    def forward(self, views: list[Tensor], index: Tensor | None = None) -> StepOutput:
        """The training forward on this rank's views (num_views tensors (B, 3, S, S), the run's dtype and
        layout) of the samples `index` ((B,) int64 dataset rows on the device, or None); returns the loss."""
        raise NotImplementedError

    def upgrade_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's model state in this version's names: a tensor an earlier version did not save gets the
        value that reproduces how that version ran. Called before the names are checked on every load (resume,
        eval, report, init_from). Default: unchanged."""
        return dict(state)

    def set_progress(self, epoch: float) -> None:
        """Before each training step: how far training is, in epochs (0-based, fractional: epoch + step / steps
        per epoch), for a method whose loss follows a schedule of its own. Must not synchronise the device."""

    @torch.no_grad()
    def after_step(self, out: StepOutput) -> None:
        """No-grad bookkeeping after the optimizer step (EMA, enqueue, running sums): device ops only."""

    def end_epoch(self, data: EpochData | None = None) -> dict[str, Any]:
        """Work at the end of each epoch (may iterate over `data`); returns values for the epoch's record in
        metrics.jsonl (JSON-serialisable)."""
        return {}

    def rank_local_buffers(self) -> list[Tensor]:
        """Buffers each process accumulates on its own samples; the checkpoint holds their sum over processes."""
        return []

    def param_groups(self, weight_decay: float, optim_cfg: Any = None) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: every trainable parameter, with weight decay."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def backbones(self) -> list[nn.Module]:
        """The backbones `--init-from` loads pre-trained weights into (a student and its teacher, say)."""
        raise NotImplementedError

    def load_backbone_weights(self, weights: dict[str, Tensor]) -> None:
        for backbone in self.backbones():
            backbone.load_state_dict(weights)

    # ---- inference and evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: Tensor) -> dict[str, Tensor]:
        """Readouts of normalised, un-augmented images x (B, 3, S, S): at least `features` (B, F) and
        `embedding` (B, D), the unit-length representation k-means clusters; `probs` (B, K) where the method
        has cluster probabilities. Reads the state, never writes it."""
        raise NotImplementedError

    def readouts(self, out: dict[str, Tensor], eval_cfg: Any, seed: int) -> dict[str, np.ndarray]:
        """Cluster assignments (N,) of every readout, the primary one first, from infer()'s outputs over the
        dataset. Default: spherical k-means of the embeddings, best of eval.kmeans_restarts."""
        return {"kmeans": kmeans_readout(out["embedding"], self.num_clusters, eval_cfg, seed,
                                         nredo=eval_cfg.kmeans_restarts)}

    def cluster_probabilities(self, out: dict[str, Tensor]) -> Tensor | None:
        """(N, K) cluster probabilities of infer()'s outputs, or None where the method has none."""
        probs = out.get("probs")
        return probs if probs is not None and probs.shape[1] > 1 else None


def kmeans_readout(x: Tensor, k: int, eval_cfg: Any, seed: int, **kw: Any) -> np.ndarray:
    """Spherical k-means assignments (N,) of x (N, D) with evaluation's iteration count and the run's seed."""
    labels, _ = spherical_kmeans(x, k, niter=eval_cfg.kmeans_niter, seed=seed, **kw)
    return np.asarray(labels)
