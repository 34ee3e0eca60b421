"""The MiCE objective: the negative ELBO of Eq. (11) with the queue estimator of Eq. (9).

`mice_elbo` is the public op. It dispatches to the fused Triton kernel where one is available
(see fastmice.ops.kernels) and to `mice_elbo_reference`, the pure-torch oracle, elsewhere.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shapes(f: Tensor, v: Tensor, g: Tensor, mu: Tensor, omega: Tensor, queue: Tensor) -> None:
    if f.dim() != 3:
        raise ValueError(f"f must be (B, K, D), got shape {tuple(f.shape)}")
    B, K, D = f.shape
    expected = {"v": (v, (B, K, D)), "g": (g, (B, D)), "mu": (mu, (K, D)), "omega": (omega, (K, D))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match f {tuple(f.shape)}, got {tuple(t.shape)}")
    if queue.dim() != 3 or queue.shape[0] != K or queue.shape[2] != D:
        raise ValueError(f"queue must be (K, V, D) = ({K}, V, {D}), got {tuple(queue.shape)}")


def mice_elbo_reference(
    f: Tensor, v: Tensor, g: Tensor, mu: Tensor, omega: Tensor, queue: Tensor,
    tau: float = 1.0, kappa: float = 1.0, *, learn_omega: bool = False,
) -> tuple[Tensor, Tensor]:
    """Plain-torch MiCE loss, computed in fp32 log space. Materialises the (B, K, V) logits."""
    f, g, mu = f.float(), g.float(), mu.float()
    v, queue = v.detach().float(), queue.detach().float()
    omega = omega.float() if learn_omega else omega.detach().float()
    s = f + F.normalize(mu, dim=1)                                 # (B, K, D) student + class-level term
    l_pos = (v * s).sum(-1) / tau                                  # (B, K)
    l_neg = torch.einsum("kvd,bkd->bkv", queue, s) / tau           # (B, K, V)
    log_z = torch.logsumexp(torch.cat([l_pos.unsqueeze(-1), l_neg], dim=-1), dim=-1)  # (B, K)
    log_phi = l_pos - log_z                                        # (B, K) expert log-likelihoods
    log_pi = F.log_softmax(g @ omega.t() / kappa, dim=-1)          # (B, K) gating log-prior
    joint = log_pi + log_phi                                       # (B, K)
    log_evidence = torch.logsumexp(joint, dim=-1)                  # (B,)
    posterior = torch.exp(joint - log_evidence.unsqueeze(-1)).detach()
    # -ELBO with the exact posterior equals -log sum_k pi_k phi_k (the KL term vanishes).
    loss = -log_evidence.mean()
    return loss, posterior


def _backend(device: torch.device) -> str:
    forced = os.environ.get("FASTMICE_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise ValueError(f"FASTMICE_KERNELS must be 'triton' or 'torch', got {forced!r}")
    return "triton" if device.type == "cuda" else "torch"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def mice_elbo(
    f: Tensor, v: Tensor, g: Tensor, mu: Tensor, omega: Tensor, queue: Tensor,
    tau: float = 1.0, kappa: float = 1.0, *, learn_omega: bool = False,
) -> tuple[Tensor, Tensor]:
    """MiCE negative ELBO and posterior.

    f (B,K,D) student expert embeddings, v (B,K,D) teacher embeddings, g (B,D) gating embeddings (all
    L2-normalised); mu (K,D) expert prototypes (normalised inside); omega (K,D) gating prototypes;
    queue (K,V,D) negatives. Returns (loss: 0-dim, differentiable in f, g, mu; posterior: (B,K) detached).
    learn_omega=True also lets the gradient reach omega (the ablation "omega learned by gradient").
    """
    _check_shapes(f, v, g, mu, omega, queue)
    if _backend(f.device) == "triton":
        forced = os.environ.get("FASTMICE_KERNELS", "").strip().lower() == "triton"
        if forced and f.device.type != "cuda" and not _triton_interpret():
            raise RuntimeError(
                f"FASTMICE_KERNELS=triton with tensors on {f.device.type}: the Triton kernels run off-GPU only in "
                "the Triton interpreter. Set TRITON_INTERPRET=1 (before fastmice.ops.kernels.mice_elbo is first "
                "imported), or unset FASTMICE_KERNELS to use the torch reference.")
        try:
            from fastmice.ops.kernels.mice_elbo import mice_elbo_triton
        except ImportError as exc:
            if forced:
                raise ImportError(
                    "FASTMICE_KERNELS=triton but the Triton kernel fastmice.ops.kernels.mice_elbo cannot be imported "
                    f"({exc}). Install triton (pip install 'fastmice[kernels]') or unset FASTMICE_KERNELS."
                ) from exc
            mice_elbo_triton = None  # kernels not available for this install: the reference is always correct
        if mice_elbo_triton is not None:
            return mice_elbo_triton(f, v, g, mu, omega, queue, tau, kappa, learn_omega=learn_omega)
    return mice_elbo_reference(f, v, g, mu, omega, queue, tau, kappa, learn_omega=learn_omega)
