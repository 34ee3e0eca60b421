"""MiCE (Tsai, Li & Zhu, ICLR 2021): K expert heads and a gating head on one student backbone, an EMA teacher,
a (K, V, D) queue, gating prototypes omega (Max-Mahalanobis, Algorithm 2) and expert prototypes mu, trained by
SGD and reset at the end of each epoch (Eq. 13). The loss is the negative ELBO (fastmice.ops.mice_elbo).

Ablations of Table 3 are switches of this section: a uniform prior (A3: the gating view is dropped), one
shared expert head (A4), no class-level term (A5), mu by SGD only / by Eq. 13 only, omega drawn at random or
learned, and Appendix E's SGD on mu alone at the end of each epoch.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.core.errors import ConfigError
from fastmice.methods.base import EpochData, MethodConfig, StepOutput, kmeans_readout
from fastmice.methods.momentum import MomentumMethod
from fastmice.models.heads import ExpertEmbedder
from fastmice.models.resnet import ResNet
from fastmice.ops.mice_elbo import mice_elbo
from fastmice.ops.prototypes import mmd_prototypes

QUEUE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MiCEConfig(MethodConfig):
    name: str = "mice"
    queue_size: int = 16384         # V; must not exceed the dataset size
    tau: float = 1.0                # expert temperature
    kappa: float = 1.0              # gating temperature
    ema_momentum: float = 0.999     # teacher m
    queue_dtype: str = "float32"    # float32 | bfloat16 | float16
    single_pass: bool = False       # x_f and x_g through the student backbone in one batch (faster; changes BN)
    # Table 3's ablations; the defaults are the full model.
    prior: str = "gating"           # gating (the paper) | uniform: kappa -> inf, pi_k = 1/K (assumption A3)
    shared_head: bool = False       # one output layer shared by the K experts (assumption A4)
    class_term: bool = True         # mu in the expert logits; off: instance-level term only (assumption A5)
    mu_analytical: bool = True      # the end-of-epoch update of mu (Eq. 13); off: SGD only
    mu_grad: bool = True            # mu trained by SGD; off: the analytical update only
    omega_init: str = "mmd"         # mmd: Max-Mahalanobis centres (Algorithm 2) | uniform: random unit vectors
    omega_learned: bool = False     # train omega by gradient instead of keeping it fixed
    # Appendix E's alternative to Eq. 13: after each epoch, SGD on mu alone (networks fixed) for up to this many
    # passes over the data, stopping early once mu moves less than mu_sgd_tol (mean |delta mu|) in a pass.
    # The paper reaches Eq. 13's accuracy this way at >10x the training time; use with mu_analytical: false.
    mu_sgd_passes: int = 0
    mu_sgd_tol: float = 1e-4
    # A warm-up of the gating prior (not in the paper): for the first prior_uniform_epochs the prior is uniform
    # (A3's pi_k = 1/K; the gating head gets a zero gradient), then over prior_ramp_epochs 1/kappa rises linearly
    # from 0 to its value, per step. On small data the prior otherwise collapses to ~K/2 clusters in the first
    # epochs, and a merged pair of classes can stay merged (bench/RESULTS.md, the digits).
    # Under prior=uniform (A3) the prior is uniform throughout and these two change nothing.
    prior_uniform_epochs: float = 0.0
    prior_ramp_epochs: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size must be positive, got {self.queue_size}")
        if self.tau <= 0 or self.kappa <= 0:
            raise ConfigError(f"method.tau and method.kappa must be > 0, got {self.tau}, {self.kappa}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"method.ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.queue_dtype not in QUEUE_DTYPES:
            raise ConfigError(f"method.queue_dtype must be one of {', '.join(QUEUE_DTYPES)}, got {self.queue_dtype!r}")
        for key, allowed in (("prior", ("gating", "uniform")), ("omega_init", ("mmd", "uniform"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"method.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.mu_sgd_passes < 0 or self.mu_sgd_tol < 0:
            raise ConfigError(f"method.mu_sgd_passes and method.mu_sgd_tol must be >= 0, got "
                              f"{self.mu_sgd_passes}, {self.mu_sgd_tol}")
        if self.omega_init == "mmd" and self.num_clusters > self.embed_dim + 1:
            raise ConfigError(f"method.num_clusters={self.num_clusters} needs method.embed_dim >= K-1 (the gating "
                              f"prototypes are K maximally separated unit vectors in R^D); raise embed_dim or "
                              f"use method.omega_init=uniform")
        if self.prior_uniform_epochs < 0 or self.prior_ramp_epochs < 0:
            raise ConfigError(f"method.prior_uniform_epochs and method.prior_ramp_epochs must be >= 0, got "
                              f"{self.prior_uniform_epochs}, {self.prior_ramp_epochs}")
        if self.mu_sgd_passes and not self.class_term:
            raise ConfigError("method.mu_sgd_passes (Appendix E) trains mu, which method.class_term=false leaves "
                              "out of the loss; drop one of them")


@dataclass
class MiCEOutput(StepOutput):
    v: Tensor | None = None            # (B, K, D) teacher embeddings of x_v, to enqueue and to accumulate into mu
    v_all: Tensor | None = None        # several processes: every rank's v in rank order, what is enqueued


class MiCE(MomentumMethod):
    Config = MiCEConfig
    embedding_outputs = {"gating": "g", "features": "features"}
    posterior_bins = 10   # the paper's Fig. 3: the posterior values of an epoch in 10 bins over [0, 1]

    def __init__(self, cfg: MiCEConfig, backbone: ResNet):
        k, dim = cfg.num_clusters, cfg.embed_dim
        student = ExpertEmbedder(backbone, k, dim, shared=cfg.shared_head)
        super().__init__(cfg, student)
        self.k, self.dim = k, dim          # experts and embedding size
        self.tau, self.kappa = cfg.tau, cfg.kappa
        self.single_pass, self.prior, self.class_term = cfg.single_pass, cfg.prior, cfg.class_term
        self.mu_analytical, self.omega_learned = cfg.mu_analytical, cfg.omega_learned
        self.mu_sgd_passes, self.mu_sgd_tol = cfg.mu_sgd_passes, cfg.mu_sgd_tol
        self.num_views = 3 if cfg.prior == "gating" else 2       # x_f, x_v (, x_g)
        self.gate = nn.Linear(backbone.out_dim, dim)             # gating head on the shared student backbone
        # Expert prototypes: trained by SGD and reset analytically each epoch (Eq. 13); random unit vectors
        # to start (the official code left them as uninitialised memory).
        self.mu = nn.Parameter(F.normalize(torch.randn(k, dim), dim=1), requires_grad=cfg.mu_grad)
        omega = mmd_prototypes(k, dim) if cfg.omega_init == "mmd" else F.normalize(torch.randn(k, dim), dim=1)
        if cfg.omega_learned:
            self.omega = nn.Parameter(omega)                                          # (K, D) by gradient
        else:
            self.register_buffer("omega", omega)                                      # (K, D) fixed
        self.init_queue(k, cfg.queue_size, dim, getattr(torch, cfg.queue_dtype))
        self.register_buffer("mu_sum", torch.zeros(k, dim))                        # (K, D)
        self.register_buffer("mu_count", torch.zeros(k))                           # (K,)
        self.register_buffer("posterior_hist", torch.zeros(self.posterior_bins))   # (10,) this epoch's q_k values
        # () the prior warm-up's factor on 1/kappa (g is scaled by it): 0 = uniform prior, 1 = the full prior. A
        # buffer, not a float, so that a compiled forward is not rebuilt as it changes.
        self.prior_uniform_epochs, self.prior_ramp_epochs = cfg.prior_uniform_epochs, cfg.prior_ramp_epochs
        self.register_buffer("prior_scale", torch.tensor(self.prior_strength(0.0)))
        self._prior_scale_set = self.prior_strength(0.0)

    # ---- configuration ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        if cfg.data.loader == "dali" and cfg.method.mu_sgd_passes:
            raise ConfigError("method.mu_sgd_passes (Appendix E) re-reads the data between epochs, which only the "
                              "in-memory loader does; use data.loader=memory (or auto) with it")
        warm = cfg.method.prior_uniform_epochs + cfg.method.prior_ramp_epochs
        if cfg.method.prior == "gating" and warm > cfg.optim.epochs:
            warnings.warn(f"method.prior_uniform_epochs + prior_ramp_epochs = {warm:g} is more than optim.epochs = "
                          f"{cfg.optim.epochs}: the run ends before the gating prior reaches its full strength "
                          f"(1/kappa); shorten the warm-up with the epochs, e.g. --method.prior_ramp_epochs="
                          f"{cfg.optim.epochs / 4:g}", stacklevel=2)

    def needs_images(self) -> str | None:
        if self.mu_sgd_passes:
            return "method.mu_sgd_passes (Appendix E) re-reads the data between epochs"
        return None

    @property
    def find_unused_parameters(self) -> bool:
        """Trainable parameters that get no gradient (uniform prior: the gate; no class term: mu)."""
        return self.prior == "uniform" or not self.class_term

    def rank_local_buffers(self) -> list[Tensor]:
        return [self.mu_sum, self.mu_count, self.posterior_hist]

    def param_groups(self, weight_decay: float, optim_cfg: Any = None) -> list[dict[str, Any]]:
        """mu in a group of its own: whether it is decayed is optim.mu_weight_decay (the public code does)."""
        net = [p for n, p in self.named_parameters() if p.requires_grad and n != "mu"]
        decay_mu = optim_cfg is None or optim_cfg.mu_weight_decay
        return [{"params": net, "weight_decay": weight_decay},
                {"params": [self.mu], "weight_decay": weight_decay if decay_mu else 0.0}]

    # ---- training ---------------------------------------------------------------------------------------
    def prior_strength(self, epoch: float) -> float:
        """The warm-up's factor on 1/kappa at `epoch` (fractional, 0-based): 0 for the first prior_uniform_epochs,
        then linear to 1 over prior_ramp_epochs; 1 without a warm-up."""
        t = epoch - self.prior_uniform_epochs
        if t < 0:
            return 0.0
        return 1.0 if t >= self.prior_ramp_epochs else t / self.prior_ramp_epochs

    def set_progress(self, epoch: float) -> None:
        s = self.prior_strength(epoch)
        if s != self._prior_scale_set:       # a device write only when it changes (never without a warm-up)
            self.prior_scale.fill_(s)
            self._prior_scale_set = s

    def upgrade_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        state = dict(state)
        # A checkpoint written before the warm-up existed has no prior_scale: it trained with the full prior.
        if "mu" in state and "prior_scale" not in state:
            state["prior_scale"] = torch.ones(())
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prior_scale_set = float("nan")   # the next set_progress writes the buffer again

    def student_embed(self, x_f: Tensor, x_g: Tensor) -> tuple[Tensor, Tensor]:
        """Student expert embeddings f (B,K,D) of x_f and gating embeddings g (B,D) of x_g."""
        if self.single_pass:  # faster, but BatchNorm then sees 2B mixed views instead of B of each
            h = self.student.backbone(torch.cat([x_f, x_g]))
            h_f, h_g = h.chunk(2)
        else:
            h_f, h_g = self.student.backbone(x_f), self.student.backbone(x_g)
        return self.student.heads(h_f), F.normalize(self.gate(h_g).float(), dim=-1)

    def _mu_used(self) -> Tensor:
        return self.mu if self.class_term else torch.zeros_like(self.mu)  # normalize(0) = 0: s = f

    def _student(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(f, g) of the views x_f (, x_g); under a uniform prior (A3) g = 0, so log pi = -log K."""
        if self.prior == "gating":
            return self.student_embed(views[0], views[2])
        f = self.student(views[0])
        return f, torch.zeros(f.shape[0], self.dim, device=f.device)

    def forward(self, views: list[Tensor], index: Tensor | None = None) -> MiCEOutput:
        """views: x_f (student experts), x_v (teacher), x_g (gating; absent under a uniform prior)."""
        v, v_all = self.teacher_keys(views[1])                                    # (B, K, D)
        f, g = self._student(views)
        loss, posterior = mice_elbo(f, v, g * self.prior_scale, self._mu_used(), self.omega, self.queue, self.tau, self.kappa,
                                     learn_omega=self.omega_learned)
        return MiCEOutput(loss, posterior, v, v_all)

    @torch.no_grad()
    def after_step(self, out: MiCEOutput) -> None:
        """EMA teacher, enqueue (after the loss, as MoCo and the paper do), and the mu sums of Eq. 13."""
        self.ema_update()
        self.enqueue(out.v if out.v_all is None else out.v_all)
        if self.class_term:
            self.accumulate_mu(out.v, out.posterior)
            self.posterior_hist += torch.histc(out.posterior.float(), self.posterior_bins, 0.0, 1.0)

    def end_epoch(self, data: EpochData | None = None) -> dict[str, Any]:
        """Appendix E's SGD on mu (if asked), then the epoch's cluster sizes and posterior histogram, then Eq. 13."""
        extra = self.refine_mu(data) if self.mu_sgd_passes else {}
        with torch.no_grad():
            for t in self.rank_local_buffers():        # several processes: the sums over every rank's samples
                distributed.all_reduce_sum_(t)
            sizes = [int(c) for c in self.mu_count.tolist()]   # argmax-posterior cluster sizes of this epoch
            hist = [int(c) for c in self.posterior_hist.tolist()]
            self.posterior_hist.zero_()
            if self.class_term and self.mu_analytical:
                self.update_mu()
            else:
                self.mu_sum.zero_()
                self.mu_count.zero_()
        return ({"cluster_sizes": sizes, "posterior_hist": hist} if self.class_term else {}) | extra

    def mu_only_loss(self, views: list[Tensor]) -> Tensor:
        """The loss as a function of mu alone, the networks held fixed: Appendix E's alternative to Eq. 13.
        Shuffle-BN and gathering are not needed: nothing is enqueued."""
        with torch.no_grad():
            v = self.teacher(views[1])
            f, g = self._student(views)
        loss, _ = mice_elbo(f, v, g * self.prior_scale, self.mu, self.omega, self.queue, self.tau, self.kappa)
        return loss

    def refine_mu(self, data: EpochData) -> dict[str, Any]:
        """Appendix E: SGD on mu alone, the networks fixed, for up to method.mu_sgd_passes passes over the data
        (a random stream of its own, so the training stream and exact resume are untouched)."""
        opt = torch.optim.SGD([self.mu], lr=data.lr, momentum=data.momentum)
        gen = torch.Generator(device=data.device)
        gen.manual_seed(data.seed * 1_000_003 + data.epoch)
        passes, change = 0, float("inf")
        trainable = self.mu.requires_grad
        self.mu.requires_grad_(True)      # also under method.mu_grad: false (no SGD on mu during the epoch)
        was_training = self.training
        self.train()
        while passes < self.mu_sgd_passes and change > self.mu_sgd_tol:
            start = self.mu.detach().clone()
            for views in data.batches(gen):
                with data.autocast():
                    loss = self.mu_only_loss(views)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if distributed.active():   # the mean gradient over the ranks, as DDP would give
                    distributed.all_reduce_sum_(self.mu.grad).div_(distributed.world())
                opt.step()
            passes += 1
            change = float((self.mu.detach() - start).abs().mean())   # once per pass: a host sync is fine here
        self.mu.requires_grad_(trainable)
        self.mu.grad = None
        self.train(was_training)
        return {"mu_sgd_passes": passes, "mu_sgd_change": change}

    @torch.no_grad()
    def accumulate_mu(self, v: Tensor, posterior: Tensor) -> None:
        """Sum the teacher embeddings v_{n,k} of the samples whose argmax posterior is k (Eq. 13)."""
        onehot = F.one_hot(posterior.argmax(dim=1), self.k).to(v.dtype)          # (B, K)
        self.mu_sum += torch.einsum("bk,bkd->kd", onehot, v).float()
        self.mu_count += onehot.sum(0).float()

    @torch.no_grad()
    def update_mu(self) -> None:
        """End of epoch: mu_k <- normalised sum (kept where cluster k received no sample); reset the sums."""
        nonempty = (self.mu_count > 0).unsqueeze(1)                                # (K, 1)
        self.mu.copy_(torch.where(nonempty, F.normalize(self.mu_sum, dim=1), self.mu))
        self.mu_sum.zero_()
        self.mu_count.zero_()

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: Tensor) -> dict[str, Tensor]:
        """posterior = probs (B, K) with the queue frozen, features (B, F), and under the gating prior the
        gating prior (B, K) and the gating embeddings g = embedding (B, D). Nothing is enqueued."""
        h = self.student.backbone(x)
        f = self.student.heads(h)
        if self.prior == "gating":
            g = F.normalize(self.gate(h).float(), dim=-1)
        else:
            g = torch.zeros(f.shape[0], self.dim, device=f.device)
        v = self.teacher(x)
        _, posterior = mice_elbo(f, v, g * self.prior_scale, self._mu_used(), self.omega, self.queue, self.tau,
                                 self.kappa, learn_omega=self.omega_learned)
        out = {"posterior": posterior, "probs": posterior, "features": h.float()}
        if self.prior == "gating":
            out.update(gating=torch.softmax(g @ self.omega.t() * self.prior_scale / self.kappa, dim=-1), g=g, embedding=g)
        else:  # one expert (MoCo) or a uniform prior: the mean expert embedding is the representation to cluster
            out["embedding"] = F.normalize(f.mean(1), dim=-1)
        return out

    def readouts(self, out: dict[str, Tensor], eval_cfg: Any, seed: int) -> dict[str, np.ndarray]:
        """argmax posterior, argmax gating prior (gating prior only), spherical k-means on the embeddings."""
        result = {"posterior": out["posterior"].argmax(1).cpu().numpy()}
        if "gating" in out:
            # argmax of the logits, not of the probabilities: the same for any prior strength > 0, and no
            # all-way tie (every image in cluster 0) while a warm-up holds the prior uniform
            result["gating"] = (out["g"] @ self.omega.t().to(out["g"])).argmax(1).cpu().numpy()
        result["kmeans"] = kmeans_readout(out["embedding"], self.num_clusters, eval_cfg, seed)
        return result
