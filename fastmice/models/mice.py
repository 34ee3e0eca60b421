"""MiCE: a student with K expert heads and a gating head, an EMA teacher, the queue and the prototypes.

Follows MoCo's builder, made explicit: the queue, its pointer and the end-of-epoch mu accumulators are
buffers (so they are checkpointed with the model), and the EMA update, the enqueue and the mu update are
no-grad methods the trainer calls. Nothing here moves tensors between devices or synchronises with the host.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice import distributed
from fastmice.loss import mice_elbo
from fastmice.models.resnet import ResNet
from fastmice.prototypes import mmd_prototypes


@dataclass
class MiCEOutput:
    loss: Tensor       # 0-dim negative ELBO
    posterior: Tensor  # (B, K) detached
    v: Tensor          # (B, K, D) teacher embeddings of x_v, to enqueue and to accumulate into mu
    v_all: Tensor | None = None  # several processes: every rank's v in rank order, what is enqueued


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


class MiCE(nn.Module):
    shuffle_bn = True    # several processes: MoCo's shuffle-BN for the teacher (the trainer sets train.shuffle_bn)
    rank_local_sums = ("mu_sum", "mu_count", "posterior_hist")   # several processes: per-rank, summed at epoch end
    posterior_bins = 10   # the paper's Fig. 3: the posterior values of an epoch in 10 bins over [0, 1]

    def __init__(self, backbone: ResNet, k: int, dim: int = 128, queue_size: int = 16384,
                 tau: float = 1.0, kappa: float = 1.0, ema_momentum: float = 0.999,
                 queue_dtype: torch.dtype = torch.float32, single_pass: bool = False,
                 prior: str = "gating", class_term: bool = True, shared_head: bool = False,
                 mu_analytical: bool = True, mu_grad: bool = True, omega_init: str = "mmd",
                 omega_learned: bool = False):
        super().__init__()
        if k < 1:
            raise ValueError(f"number of clusters K must be >= 1, got {k}")
        if queue_size < 1:
            raise ValueError(f"queue size must be >= 1, got {queue_size}")
        self.k, self.dim, self.queue_size = k, dim, queue_size
        self.tau, self.kappa, self.ema_momentum = tau, kappa, ema_momentum
        self.single_pass = single_pass
        if prior not in ("gating", "uniform"):
            raise ValueError(f"prior must be 'gating' or 'uniform', got {prior!r}")
        # Ablations of the paper (Sec. 5.3, App. C): a uniform prior is assumption A3 (kappa -> inf) and drops
        # the gating view; no class-level term is A5 (mu left out of the expert logits). With one expert and
        # both, MiCE is MoCo: the loss is InfoNCE over the queue (Theorem 3).
        self.prior, self.class_term = prior, class_term
        self.mu_analytical, self.omega_learned = mu_analytical, omega_learned
        self.num_views = 3 if prior == "gating" else 2
        self.student = ExpertEmbedder(backbone, k, dim, shared=shared_head)
        self.gate = nn.Linear(backbone.out_dim, dim)  # gating head on the shared student backbone
        self.teacher = copy.deepcopy(self.student)     # teacher.params = student.params at start
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # Expert prototypes: trained by SGD and reset analytically each epoch (Eq. 13); random unit vectors
        # to start (the official code left them as uninitialised memory).
        self.mu = nn.Parameter(F.normalize(torch.randn(k, dim), dim=1), requires_grad=mu_grad)
        if omega_init not in ("mmd", "uniform"):
            raise ValueError(f"omega_init must be 'mmd' or 'uniform', got {omega_init!r}")
        omega = mmd_prototypes(k, dim) if omega_init == "mmd" else F.normalize(torch.randn(k, dim), dim=1)
        if omega_learned:
            self.omega = nn.Parameter(omega)                                          # (K, D) by gradient
        else:
            self.register_buffer("omega", omega)                                      # (K, D) fixed
        self.register_buffer("queue", F.normalize(torch.randn(k, queue_size, dim), dim=-1).to(queue_dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("mu_sum", torch.zeros(k, dim))                        # (K, D)
        self.register_buffer("mu_count", torch.zeros(k))                           # (K,)
        self.register_buffer("posterior_hist", torch.zeros(self.posterior_bins))   # (10,) this epoch's q_k values

    # ---- training -----------------------------------------------------------------------------------
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

    def forward(self, x_f: Tensor, x_v: Tensor, x_g: Tensor | None = None) -> MiCEOutput:
        """Views x_f (student experts), x_v (teacher), x_g (gating; unused under a uniform prior)."""
        with torch.no_grad():  # several processes: v_all is every rank's v (the queue stays the same everywhere)
            v, v_all = distributed.teacher_forward(self.teacher, x_v, self.shuffle_bn)   # (B, K, D)
        if self.prior == "gating":
            f, g = self.student_embed(x_f, x_g)
        else:  # A3: a zero gating embedding gives log pi = -log K for every sample
            f = self.student(x_f)
            g = torch.zeros(f.shape[0], self.dim, device=f.device)
        loss, posterior = mice_elbo(f, v, g, self._mu_used(), self.omega, self.queue, self.tau, self.kappa,
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

    @torch.no_grad()
    def end_epoch(self) -> dict:
        for name in self.rank_local_sums:        # several processes: the sums over every rank's samples
            distributed.all_reduce_sum_(getattr(self, name))
        sizes = [int(c) for c in self.mu_count.tolist()]   # argmax-posterior cluster sizes of this epoch
        hist = [int(c) for c in self.posterior_hist.tolist()]
        self.posterior_hist.zero_()
        if self.class_term and self.mu_analytical:
            self.update_mu()
        else:
            self.mu_sum.zero_()
            self.mu_count.zero_()
        return {"cluster_sizes": sizes, "posterior_hist": hist} if self.class_term else {}

    def mu_only_loss(self, x_f: Tensor, x_v: Tensor, x_g: Tensor) -> Tensor:
        """The loss as a function of mu alone, the networks held fixed: Appendix E's alternative to Eq. 13
        (extra end-of-epoch SGD on mu). Shuffle-BN and gathering are not needed: nothing is enqueued."""
        with torch.no_grad():
            v = self.teacher(x_v)
            f, g = self.student_embed(x_f, x_g)
        loss, _ = mice_elbo(f, v, g, self.mu, self.omega, self.queue, self.tau, self.kappa)
        return loss

    @property
    def has_unused_parameters(self) -> bool:
        """Trainable parameters that get no gradient (uniform prior: the gate; no class term: mu); DDP must know."""
        return self.prior == "uniform" or not self.class_term

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student, over parameters (BatchNorm buffers stay the teacher's)."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - self.ema_momentum)

    @torch.no_grad()
    def enqueue(self, v: Tensor) -> None:
        """Write v (B, K, D) over the oldest B entries, wrapping around; the pointer stays on the device."""
        b = v.shape[0]
        if b > self.queue_size:
            raise ValueError(f"batch of {b} is larger than the queue ({self.queue_size})")
        idx = (self.queue_ptr + torch.arange(b, device=v.device)) % self.queue_size  # (B,)
        self.queue.index_copy_(1, idx, v.transpose(0, 1).to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + b) % self.queue_size)

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

    # ---- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, x: Tensor) -> dict[str, Tensor]:
        """Deterministic readouts of un-augmented images; the queue is read, never written."""
        h = self.student.backbone(x)
        f = self.student.heads(h)
        if self.prior == "gating":
            g = F.normalize(self.gate(h).float(), dim=-1)
        else:
            g = torch.zeros(f.shape[0], self.dim, device=f.device)
        v = self.teacher(x)
        _, posterior = mice_elbo(f, v, g, self._mu_used(), self.omega, self.queue, self.tau, self.kappa,
                                     learn_omega=self.omega_learned)
        out = {"posterior": posterior, "probs": posterior, "features": h.float()}
        if self.prior == "gating":
            out.update(gating=torch.softmax(g @ self.omega.t() / self.kappa, dim=-1), g=g, embedding=g)
        else:  # MoCo: the (single) expert embedding is the representation to cluster
            out["embedding"] = F.normalize(f.mean(1), dim=-1)
        return out
